// The client's pure decisions: backoff, close codes, positions, presence, token timing, pacing.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  backoffDelay,
  closeDecision,
  positionAfterJoined,
  applyPresenceDiff,
  refreshDelay,
  tokenExpiry,
  tokenUsable,
  JoinPacer,
  readEventStream,
} from "../../dist/index.js";
import { jwt } from "./fake.js";

test("backoff: full jitter stays within [0, min(max, base*2^n)) and is capped", () => {
  const opts = { base: 500, max: 30_000 };
  for (let attempt = 0; attempt < 40; attempt++) {
    const ceiling = Math.min(30_000, 500 * 2 ** attempt);
    assert.equal(backoffDelay(attempt, opts, () => 0), 0, "the floor is zero: full jitter");
    const top = backoffDelay(attempt, opts, () => 0.999999);
    assert.ok(top < ceiling && top >= ceiling - 1, `attempt ${attempt}: ${top} just under ${ceiling}`);
  }
  assert.equal(backoffDelay(3, opts, () => 0.5), 2_000, "half of 500*2^3");
  // Spread: a thousand clients do not come back together.
  const delays = new Set(Array.from({ length: 1000 }, () => backoffDelay(6, opts)));
  assert.ok(delays.size > 900, `jitter spreads retries (${delays.size} distinct of 1000)`);
});

test("close codes decide what follows", () => {
  assert.deepEqual(closeDecision(4001, false, 10_000), { reconnect: true, newToken: true, minDelay: 0 });
  assert.deepEqual(closeDecision(4029, false, 10_000), { reconnect: true, newToken: false, minDelay: 10_000 });
  for (const code of [4008, 1001, 1006, 1000, 1009, 1011]) {
    assert.deepEqual(closeDecision(code, false, 10_000), { reconnect: true, newToken: false, minDelay: 0 }, `code ${code}`);
  }
  assert.deepEqual(closeDecision(1000, true, 10_000), { reconnect: false }, "client.close() stays closed");
});

test("positions: fresh join, resume before any event, resume that could not recover", () => {
  const joined = (extra) => ({ type: "joined", room: "project:1", position: "NOW", ...extra });
  assert.equal(positionAfterJoined(null, undefined, joined()), "NOW", "a fresh join starts at joined.position");
  assert.equal(positionAfterJoined("E5", undefined, joined()), "E5", "an event already seen is kept");
  assert.equal(
    positionAfterJoined("J0", "J0", joined({ recovered: true })),
    "J0",
    "no event yet: the resume keeps its position until replayed events move it",
  );
  assert.equal(positionAfterJoined("E7", "E7", joined({ recovered: true })), "E7");
  assert.equal(positionAfterJoined("E7", "E7", joined({ recovered: false })), "NOW", "too old: start over at now");
});

test("presence: state plus diffs, by conn_id; a user goes with their last meta", () => {
  let users = { u1: [{ conn_id: "a" }], u2: [{ conn_id: "b" }, { conn_id: "c" }] };
  users = applyPresenceDiff(users, { u3: [{ conn_id: "d" }] }, { u2: [{ conn_id: "b" }] });
  assert.deepEqual(users, { u1: [{ conn_id: "a" }], u2: [{ conn_id: "c" }], u3: [{ conn_id: "d" }] });
  // A meta change: the old meta leaves, the new one joins, for the same connection.
  users = applyPresenceDiff(users, { u1: [{ conn_id: "a", status: "editing" }] }, { u1: [{ conn_id: "a" }] });
  assert.deepEqual(users.u1, [{ conn_id: "a", status: "editing" }]);
  users = applyPresenceDiff(users, {}, { u2: [{ conn_id: "c" }], u3: [{ conn_id: "d" }] });
  assert.deepEqual(Object.keys(users), ["u1"], "no ghosts: users with no meta left are gone");
  const before = { u1: [{ conn_id: "a" }] };
  applyPresenceDiff(before, {}, { u1: [{ conn_id: "a" }] });
  assert.deepEqual(before, { u1: [{ conn_id: "a" }] }, "the input is not mutated (React compares identity)");
});

test("token refresh timing: ahead of expiry by a fifth of the lifetime, 5 s to 60 s", () => {
  const now = 1_000_000;
  assert.equal(refreshDelay(now + 3_600_000, now, now), 3_540_000, "1 h token: a minute early");
  assert.equal(refreshDelay(now + 20_000, now, now), 15_000, "20 s token: 5 s early");
  assert.equal(refreshDelay(now + 100_000, now, now), 80_000, "100 s token: 20 s early");
  assert.equal(refreshDelay(now - 1, now - 10_000, now), 0, "already due: at once");
  assert.equal(refreshDelay(now + 3_600_000, now, now + 3_000_000), 540_000, "counted from now");
});

test("an expired token is never usable; exp is read from the JWT", () => {
  const now = Date.now();
  assert.equal(tokenExpiry(jwt(now + 60_000)), Math.floor((now + 60_000) / 1000) * 1000);
  assert.equal(tokenUsable(jwt(now + 60_000), now), true);
  assert.equal(tokenUsable(jwt(now - 1_000), now), false, "expired");
  assert.equal(tokenUsable(jwt(now + 1_000), now), false, "about to expire (within the margin)");
  assert.equal(tokenExpiry("not-a-jwt"), null);
  assert.equal(tokenUsable("opaque-token", now), true, "a token without a readable exp is the relay's to judge");
});

test("joins are paced under the relay's join rate", () => {
  const pacer = new JoinPacer(8, 16, 0);
  const waits = Array.from({ length: 20 }, () => pacer.take(0));
  assert.deepEqual(waits.slice(0, 16), Array(16).fill(0), "a burst of 16 goes at once");
  assert.deepEqual(waits.slice(16), [125, 250, 375, 500], "then 8 a second");
  assert.equal(pacer.take(10_000), 0, "the bucket refills");
});

test("the SSE parser: named and unnamed events, multi-line data, comments, split chunks", async () => {
  const text = ": keep-alive\n\nevent: joined\ndata: {\"a\":1}\n\nid: X\ndata: line1\ndata: line2\n\n";
  const bytes = new TextEncoder().encode(text);
  const stream = new ReadableStream({
    start(c) {
      for (let i = 0; i < bytes.length; i += 7) c.enqueue(bytes.slice(i, i + 7));
      c.close();
    },
  });
  const got = [];
  await readEventStream(new Response(stream), (name, data) => got.push([name, data]));
  assert.deepEqual(got, [["joined", '{"a":1}'], ["message", "line1\nline2"]]);
});
