// pgrelay-client against real relays and a real Postgres: joins, refusals, a relay SIGKILLed
// while changes are committed, token refresh, SSE fallback, caughtUp, and every frame checked
// against docs/protocol.schema.json.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import WebSocket from "ws";
import Ajv2020 from "ajv/dist/2020.js";
import { createClient } from "../../dist/index.js";
import { devRelay, relayOn, tokens, until, ROOT } from "../relay.js";

let dev;
let users;
/** Every frame any client received, for the schema check at the end. */
const frames = [];

/** `ws` as the pluggable WebSocket constructor (Node 20 has none built in), recording frames. */
class RecordingSocket extends WebSocket {
  constructor(url) {
    super(url);
    this.addEventListener("message", (ev) => frames.push(JSON.parse(String(ev.data))));
  }
}

function clientOf(user, url = dev.url, options = {}) {
  return createClient(url, {
    token: () => users[user],
    WebSocket: RecordingSocket,
    backoff: { base: 100, max: 1_000 },
    ...options,
  });
}

before(async () => {
  dev = await devRelay();
  users = await tokens(dev.url);
});

after(async () => {
  await dev?.stop();
});

function collect(room) {
  const events = [];
  room.on("event", (e) => events.push(e));
  return events;
}

test("join, then receive a change made in SQL", async () => {
  const client = clientOf("u1");
  const room = client.join("project:1");
  await room.ready;
  assert.equal(client.status, "open");
  assert.ok(room.position, "joined.position before any event");
  const updates = [];
  room.on("task_updated", (e) => updates.push(e));
  await dev.db.query("UPDATE tasks SET status = 'doing' WHERE id = 1");
  await until(() => updates.length === 1, "task_updated");
  assert.equal(updates[0].row.status, "doing");
  assert.equal(room.position, updates[0].id, "the position follows the last event");
  client.close();
});

test("a room the user may not join rejects ready with forbidden", async () => {
  const client = clientOf("u4");
  const room = client.join("project:1");
  await assert.rejects(room.ready, (err) => err.code === "forbidden");
  const allowed = client.join("user:u4");
  await allowed.ready; // the connection is fine; only that room was refused
  client.close();
});

test("a relay SIGKILLed while changes are committed: the client resumes and misses nothing", async () => {
  const relay = await relayOn(dev.dbUrl);
  const client = clientOf("u1", relay.url);
  const room = client.join("project:1");
  const events = collect(room);
  await room.ready;
  await dev.db.query("UPDATE tasks SET title = 'before the crash' WHERE id = 2");
  await until(() => events.length === 1, "the first event");
  await relay.kill();
  await until(() => client.status === "reconnecting", "reconnecting");
  for (const n of [1, 2, 3]) await dev.db.query(`UPDATE tasks SET title = 'while down ${n}' WHERE id = 2`);
  await dev.db.query("INSERT INTO tasks (project_id, title, created_by) VALUES (1, 'created while down', 'u1')");
  await relay.start();
  await until(() => events.length === 5, "the missed events", 20_000);
  assert.deepEqual(
    events.map((e) => e.row.title),
    ["before the crash", "while down 1", "while down 2", "while down 3", "created while down"],
    "every change, once, in commit order",
  );
  assert.equal(client.status, "open");
  await dev.db.query("UPDATE tasks SET title = 'after' WHERE id = 2");
  await until(() => events.length === 6, "a live event after the resume");
  assert.equal(new Set(events.map((e) => e.id)).size, 6, "no duplicates");
  client.close();
  await relay.stop();
});

test("a short-lived token is refreshed in band before it expires", async () => {
  const short = await tokens(dev.url, 10); // 10 s tokens: refreshed 5 s early
  let calls = 0;
  const client = createClient(dev.url, {
    token: async () => {
      calls++;
      return (await tokens(dev.url, 10)).u2;
    },
    WebSocket: RecordingSocket,
  });
  assert.ok(short.u2);
  const statuses = [];
  client.on("status", (s) => statuses.push(s));
  const room = client.join("project:1");
  const events = collect(room);
  await room.ready;
  await until(() => calls >= 2, "a refresh", 9_000);
  // Past the first token's expiry the same connection still delivers (the relay would have
  // closed it with 4001 at exp without the refresh).
  await new Promise((r) => setTimeout(r, 6_000));
  await dev.db.query("UPDATE tasks SET priority = 3 WHERE id = 1");
  await until(() => events.length === 1, "an event after the first token expired");
  assert.deepEqual(statuses, ["open"], "never disconnected");
  client.close();
});

test("WebSocket blocked: the client falls back to SSE behind the same API", async () => {
  // A WebSocket that never opens, as behind a proxy that refuses upgrades.
  class Blocked {
    constructor() {
      this.readyState = 0;
      setTimeout(() => this.onclose?.({ code: 1006, reason: "" }), 10);
    }
    send() {}
    close() {}
  }
  const client = clientOf("u2", dev.url, { WebSocket: Blocked });
  const room = client.join("project:1");
  const events = collect(room);
  await room.ready;
  assert.equal(client.transport, "sse");
  assert.ok(room.position);
  await dev.db.query("UPDATE tasks SET status = 'done' WHERE id = 1");
  await until(() => events.length === 1, "an event over SSE");
  assert.equal(events[0].event, "task_updated");
  assert.equal(room.position, events[0].id);
  const refused = client.join("project:2");
  await assert.rejects(refused.ready, (err) => err.code === "forbidden");
  await dev.db.query("UPDATE tasks SET status = 'todo' WHERE id = 1");
  await until(() => events.length === 2, "the stream goes on without the refused room");
  client.close();
});

test("caughtUp resolves after the write arrived, and when it is invisible to the user", async () => {
  const client = clientOf("u2");
  const room = client.join("project:1");
  const events = collect(room);
  await room.ready;
  await dev.db.query("UPDATE tasks SET title = 'visible write' WHERE id = 1");
  const { rows } = await dev.db.query("SELECT pgrelay.position() AS p");
  await room.caughtUp(rows[0].p);
  assert.equal(events.at(-1)?.row.title, "visible write", "the write had arrived when caughtUp resolved");
  const before = events.length;
  await dev.db.query("UPDATE tasks SET title = 'private write' WHERE id = 3"); // bob may not read task 3
  const { rows: after } = await dev.db.query("SELECT pgrelay.position() AS p");
  await room.caughtUp(after[0].p);
  assert.equal(events.length, before, "nothing about the private task, yet caughtUp resolved");
  client.close();
});

test("thirty rooms rejoin after a relay restart, paced under the relay's join rate", async () => {
  const { rows } = await dev.db.query(
    "INSERT INTO tasks (project_id, title, created_by) SELECT 1, 'bulk ' || n, 'u1' FROM generate_series(1, 30) n RETURNING id::int",
  );
  const relay = await relayOn(dev.dbUrl);
  const client = clientOf("u1", relay.url);
  const rooms = rows.map((r) => client.join(`task:${r.id}`));
  await Promise.all(rooms.map((r) => r.ready));
  await relay.kill();
  await until(() => client.status === "reconnecting", "reconnecting");
  const last = rows.at(-1).id;
  await dev.db.query("UPDATE tasks SET title = 'changed while down' WHERE id = $1", [last]);
  await relay.start();
  const seen = [];
  rooms.at(-1).on("event", (e) => seen.push(e.row.title));
  await until(() => seen.length === 1, "the missed change in the last of thirty rooms", 20_000);
  assert.equal(seen[0], "changed while down");
  const limited = frames.filter((f) => f.type === "error" && f.code === "rate_limited");
  assert.equal(limited.length, 0, "no join was refused for going too fast (relay: 10/s, burst 20)");
  client.close();
  await relay.stop();
});

test("every frame the clients received matches docs/protocol.schema.json", () => {
  const schema = JSON.parse(readFileSync(join(ROOT, "docs/protocol.schema.json"), "utf8"));
  const ajv = new Ajv2020({ strict: false });
  const validate = ajv.compile({ ...schema, anyOf: undefined, $ref: "#/$defs/serverMessage" });
  const types = new Set(frames.map((f) => f.type));
  for (const t of ["ready", "joined", "event", "presence_state", "error", "synced"]) assert.ok(types.has(t), `saw ${t}`);
  for (const frame of frames) assert.ok(validate(frame), `${JSON.stringify(frame)}: ${ajv.errorsText(validate.errors)}`);
});
