// The client's state machine against a fake socket: joins, positions across reconnects, token
// handling, presence and typing, as the relay would drive them.
import { test, mock } from "node:test";
import assert from "node:assert/strict";
import { createClient, PgrelayError } from "../../dist/index.js";
import { FakeSocket, jwt, tick } from "./fake.js";

function client(options = {}) {
  FakeSocket.reset();
  const tokens = [];
  const c = createClient("http://relay.test", {
    WebSocket: FakeSocket,
    transports: ["websocket"],
    token: () => {
      const t = jwt(Date.now() + 3_600_000);
      tokens.push(t);
      return t;
    },
    autoConnect: true,
    backoff: { base: 10, max: 20 },
    ...options,
  });
  return { c, tokens };
}

async function connected(options) {
  const made = client(options);
  await tick();
  FakeSocket.last.accept();
  return { ...made, socket: FakeSocket.last };
}

test("two joins of one room share one subscription; the last leave leaves", async () => {
  const { c, socket } = await connected();
  const a = c.join("project:1");
  const b = c.join("project:1");
  assert.equal(socket.sentOf("join").length, 1, "one join on the wire");
  const join = socket.sentOf("join")[0];
  socket.receive({ type: "joined", room: "project:1", position: "P0", ref: join.ref });
  await Promise.all([a.ready, b.ready]);
  const seenA = [];
  const seenB = [];
  a.on("task_updated", (e) => seenA.push(e.id));
  b.on("event", (e) => seenB.push(e.id));
  socket.receive({ type: "event", room: "project:1", id: "E1", event: "task_updated", table: "tasks", op: "UPDATE", row: { id: 1 }, ts: "t" });
  assert.deepEqual([seenA, seenB], [["E1"], ["E1"]], "both handles hear the event once");
  a.leave();
  assert.equal(socket.sentOf("leave").length, 0, "b still holds the room");
  socket.receive({ type: "event", room: "project:1", id: "E2", event: "task_updated", table: "tasks", op: "UPDATE", row: { id: 1 }, ts: "t" });
  assert.deepEqual(seenA, ["E1"], "a's listeners went with a");
  b.leave();
  assert.deepEqual(socket.sentOf("leave"), [{ type: "leave", room: "project:1" }]);
  c.close();
});

test("a room resumes from its last event, or from joined.position when none arrived", async () => {
  const { c, socket } = await connected();
  const busy = c.join("project:1");
  const quiet = c.join("task:7");
  const [j1, j2] = socket.sentOf("join");
  assert.equal(j1.since, undefined, "a fresh join has no since");
  socket.receive({ type: "joined", room: "project:1", position: "P0", ref: j1.ref });
  socket.receive({ type: "joined", room: "task:7", position: "Q0", ref: j2.ref });
  assert.equal(quiet.position, "Q0", "before any event: joined.position");
  socket.receive({ type: "event", room: "project:1", id: "E9", event: "task_created", table: "tasks", op: "INSERT", row: { id: 2 }, ts: "t" });
  assert.equal(busy.position, "E9");
  socket.drop(1006);
  assert.equal(c.status, "reconnecting");
  await new Promise((r) => setTimeout(r, 40));
  const next = FakeSocket.last;
  assert.notEqual(next, socket, "a new socket");
  next.accept();
  const rejoins = Object.fromEntries(next.sentOf("join").map((j) => [j.room, j.since]));
  assert.deepEqual(rejoins, { "project:1": "E9", "task:7": "Q0" }, "every room rejoined with since = its position");
  assert.equal(c.status, "open");
  c.close();
  assert.equal(c.status, "closed");
});

test("recovered: false fires resync and restarts the position", async () => {
  const { c, socket } = await connected();
  const room = c.join("project:1", { since: "OLD" });
  const join = socket.sentOf("join")[0];
  assert.equal(join.since, "OLD");
  let resynced = 0;
  room.on("resync", () => resynced++);
  socket.receive({ type: "joined", room: "project:1", position: "NOW", recovered: false, ref: join.ref });
  await room.ready;
  assert.equal(resynced, 1);
  assert.equal(room.position, "NOW");
  c.close();
});

test("forbidden rejects ready with the relay's code and is never retried", async () => {
  const { c, socket } = await connected();
  const room = c.join("project:2");
  const join = socket.sentOf("join")[0];
  socket.receive({ type: "error", code: "forbidden", message: "you may not join this room", ref: join.ref });
  await assert.rejects(room.ready, (err) => err instanceof PgrelayError && err.code === "forbidden");
  socket.drop(1001);
  await new Promise((r) => setTimeout(r, 40));
  FakeSocket.last.accept();
  assert.equal(FakeSocket.last.sentOf("join").length, 0, "a forbidden room is not rejoined");
  c.close();
});

test("4001 fetches a new token; an expired token is never sent", async () => {
  FakeSocket.reset();
  let calls = 0;
  const c = createClient("http://relay.test", {
    WebSocket: FakeSocket,
    transports: ["websocket"],
    autoConnect: true,
    backoff: { base: 10, max: 20 },
    // The first token handed out is already expired: the client asks again instead of sending it.
    token: () => (++calls === 1 ? jwt(Date.now() - 5_000) : jwt(Date.now() + 3_600_000, `u${calls}`)),
  });
  await tick();
  const socket = FakeSocket.last;
  socket.accept();
  const sent = socket.sentOf("auth")[0].token;
  assert.equal(calls, 2, "asked twice");
  assert.ok(JSON.parse(Buffer.from(sent.split(".")[1], "base64url")).exp * 1000 > Date.now(), "the fresh token went");
  assert.ok(!socket.url.includes("token="), "the token is sent in band, not in the URL");
  socket.drop(4001, "token expired");
  await new Promise((r) => setTimeout(r, 40));
  FakeSocket.last.accept();
  assert.equal(calls, 3, "4001 asked for a new token");
  assert.notEqual(FakeSocket.last.sentOf("auth")[0].token, sent);
  c.close();
});

test("the token is refreshed in band ahead of expires_at", async () => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"], now: 1_000_000 });
  try {
    FakeSocket.reset();
    let calls = 0;
    const c = createClient("http://relay.test", {
      WebSocket: FakeSocket,
      transports: ["websocket"],
      autoConnect: true,
      token: () => {
        calls++;
        return jwt(Date.now() + 30_000);
      },
    });
    await tick();
    await tick();
    const socket = FakeSocket.last;
    socket.accept(30_000);
    assert.equal(socket.sentOf("auth").length, 1);
    mock.timers.tick(23_000);
    await tick();
    assert.equal(socket.sentOf("auth").length, 1, "not before lifetime - lifetime/5 (24 s)");
    mock.timers.tick(1_100);
    await tick();
    await tick();
    const auths = socket.sentOf("auth");
    assert.equal(auths.length, 2, "refreshed at 24 s");
    assert.equal(auths[1].ref, "refresh");
    assert.equal(calls, 2);
    c.close();
  } finally {
    mock.timers.reset();
  }
});

test("a ping left unanswered means a half-open socket: reconnect", async () => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"], now: 1_000_000 });
  try {
    FakeSocket.reset();
    const c = createClient("http://relay.test", {
      WebSocket: FakeSocket,
      transports: ["websocket"],
      token: () => jwt(Date.now() + 3_600_000),
      autoConnect: true,
      pingInterval: 1_000,
      pongTimeout: 500,
    });
    await tick();
    const socket = FakeSocket.last;
    socket.accept();
    mock.timers.tick(1_000);
    const ping = socket.sentOf("ping")[0];
    assert.ok(ping, "an application-level ping");
    socket.receive({ type: "pong", ref: ping.ref });
    mock.timers.tick(1_000);
    assert.equal(socket.sentOf("ping").length, 2);
    mock.timers.tick(600); // no pong this time
    assert.equal(c.status, "reconnecting");
    assert.ok(socket.closedWith, "the dead socket was closed");
    c.close();
  } finally {
    mock.timers.reset();
  }
});

test("lost fires once after the configured time without a connection", async () => {
  const { c, socket } = await connected({ lostConnectionTimeout: 30, backoff: { base: 1000, max: 1000 } });
  let lost = 0;
  c.on("lost", () => lost++);
  socket.drop(1006);
  await new Promise((r) => setTimeout(r, 60));
  assert.equal(lost, 1);
  c.close();
});

test("presence and typing: reduced from state + diffs; typing refreshes and stops by itself", async () => {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"], now: 1_000_000 });
  try {
    FakeSocket.reset();
    const c = createClient("http://relay.test", { WebSocket: FakeSocket, transports: ["websocket"], autoConnect: true, token: () => jwt(Date.now() + 3_600_000) });
    await tick();
    const socket = FakeSocket.last;
    socket.accept();
    const room = c.join("task:7");
    room.setPresence({ status: "viewing" });
    assert.equal(socket.sentOf("presence").length, 0, "presence waits for joined");
    socket.receive({ type: "joined", room: "task:7", position: "P", ref: socket.sentOf("join")[0].ref });
    assert.deepEqual(socket.sentOf("presence")[0], { type: "presence", room: "task:7", meta: { status: "viewing" } });
    const views = [];
    room.on("presence", (users) => views.push(Object.keys(users).sort()));
    socket.receive({ type: "presence_state", room: "task:7", users: { u1: [{ conn_id: "a" }], u2: [{ conn_id: "b" }] } });
    socket.receive({ type: "presence_diff", room: "task:7", joins: {}, leaves: { u2: [{ conn_id: "b" }] } });
    assert.deepEqual(views, [["u1", "u2"], ["u1"]]);
    const typing = [];
    room.on("typing", (s) => typing.push(s.users));
    socket.receive({ type: "typing", room: "task:7", user: "u2", typing: true });
    assert.deepEqual(room.typingUsers, ["u2"]);
    mock.timers.tick(6_100); // never refreshed, never ended: dropped locally
    assert.deepEqual(typing, [["u2"], []]);
    // Our own typing: one message a second at most while keys are pressed, false 3 s after.
    for (let i = 0; i < 10; i++) {
      room.typing(true);
      mock.timers.tick(200);
    }
    const mine = socket.sentOf("typing");
    assert.deepEqual(mine.map((m) => m.typing), [true, true], "refreshed once a second over 2 s of typing");
    mock.timers.tick(3_000);
    assert.deepEqual(socket.sentOf("typing").map((m) => m.typing), [true, true, false], "stopped by itself");
    c.close();
  } finally {
    mock.timers.reset();
  }
});

test("caughtUp sends sync and resolves on synced; waits for the room to be joined", async () => {
  const { c, socket } = await connected();
  const room = c.join("project:1");
  const done = room.caughtUp("W1");
  assert.equal(socket.sentOf("sync").length, 0, "not before joined");
  socket.receive({ type: "joined", room: "project:1", position: "P0", ref: socket.sentOf("join")[0].ref });
  const sync = socket.sentOf("sync")[0];
  assert.deepEqual({ room: sync.room, position: sync.position }, { room: "project:1", position: "W1" });
  let resolved = false;
  done.then(() => (resolved = true));
  await tick();
  assert.equal(resolved, false);
  socket.receive({ type: "synced", room: "project:1", position: "W1", ref: sync.ref });
  await done;
  const bad = room.caughtUp("garbage");
  const ref = socket.sentOf("sync")[1].ref;
  socket.receive({ type: "error", code: "bad_request", message: "not a valid position", ref });
  await assert.rejects(bad, (e) => e.code === "bad_request");
  c.close();
});

test("a position the relay refuses: join afresh and tell the app to refetch", async () => {
  const { c, socket } = await connected();
  const room = c.join("project:1", { since: "FROM-ANOTHER-DB" });
  let resynced = 0;
  room.on("resync", () => resynced++);
  const first = socket.sentOf("join")[0];
  socket.receive({ type: "error", code: "bad_request", message: "`since`: not a valid position", ref: first.ref });
  const second = socket.sentOf("join")[1];
  assert.equal(second.since, undefined, "joined again without since");
  socket.receive({ type: "joined", room: "project:1", position: "NOW", ref: second.ref });
  await room.ready;
  assert.equal(resynced, 1);
  assert.equal(room.position, "NOW");
  c.close();
});

test("outside a browser the client connects only when asked", async () => {
  FakeSocket.reset();
  const c = createClient("http://relay.test", { WebSocket: FakeSocket, token: () => jwt(Date.now() + 3_600_000) });
  await tick();
  assert.equal(FakeSocket.all.length, 0, "no socket before join()");
  c.join("project:1");
  await tick();
  assert.equal(FakeSocket.all.length, 1);
  c.close();
});

test("visibilitychange and online check the socket at once; offline shows offline", async () => {
  const target = new EventTarget();
  const doc = new EventTarget();
  doc.visibilityState = "hidden";
  Object.assign(globalThis, {
    addEventListener: target.addEventListener.bind(target),
    removeEventListener: target.removeEventListener.bind(target),
    document: doc,
  });
  try {
    const { c, socket } = await connected({ pingInterval: 60_000, pongTimeout: 30 });
    try {
      doc.visibilityState = "visible";
      doc.dispatchEvent(new Event("visibilitychange"));
      assert.equal(socket.sentOf("ping").length, 1, "a tab coming back pings at once");
      socket.receive({ type: "pong", ref: socket.sentOf("ping")[0].ref });
      target.dispatchEvent(new Event("offline"));
      assert.equal(c.status, "offline");
      assert.equal(socket.sentOf("ping").length, 2, "going offline checks the socket");
      socket.receive({ type: "pong", ref: socket.sentOf("ping")[1].ref });
      target.dispatchEvent(new Event("online"));
      assert.equal(c.status, "open", "the socket survived the outage");
      assert.equal(socket.sentOf("ping").length, 3, "coming online checks again");
      await new Promise((r) => setTimeout(r, 60)); // no pong this time: the socket was half-open
      assert.ok(socket.closedWith, "closed the dead socket");
      assert.notEqual(FakeSocket.last, socket, "and opened a new one");
    } finally {
      c.close();
    }
  } finally {
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
    delete globalThis.document;
  }
});
