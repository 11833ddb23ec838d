// The TanStack Query helper, with TanStack's real QueryClient.
import { test } from "node:test";
import assert from "node:assert/strict";
import { QueryClient } from "@tanstack/query-core";
import { createClient } from "../../dist/index.js";
import { syncQueries, patchList } from "../../dist/query.js";
import { FakeSocket, jwt, tick } from "./fake.js";

const event = (op, row, id = "E") => ({ type: "event", room: "project:1", id, event: `task_${op}`, table: "tasks", op, row, ts: "t" });

test("patchList: INSERT adds, UPDATE merges in place, DELETE removes", () => {
  const rows = [{ id: 1, t: "a" }, { id: 2, t: "b" }];
  assert.deepEqual(patchList(rows, event("INSERT", { id: 3, t: "c" })), [...rows, { id: 3, t: "c" }]);
  assert.deepEqual(patchList(rows, event("UPDATE", { id: 1, t: "z" })), [{ id: 1, t: "z" }, { id: 2, t: "b" }]);
  assert.deepEqual(patchList(rows, event("DELETE", { id: 2 })), [{ id: 1, t: "a" }]);
});

test("events patch the cached list, unknown queries are invalidated, resync invalidates all", async () => {
  FakeSocket.reset();
  const client = createClient("http://relay.test", { WebSocket: FakeSocket, transports: ["websocket"], autoConnect: true, token: () => jwt(Date.now() + 3_600_000) });
  await tick();
  const socket = FakeSocket.last;
  socket.accept();
  const room = client.join("project:1");
  socket.receive({ type: "joined", room: "project:1", position: "P", ref: socket.sentOf("join")[0].ref });
  const queries = new QueryClient();
  queries.setQueryData(["tasks"], [{ id: 1, status: "todo" }]);
  queries.setQueryData(["projects"], [{ id: 1 }]);
  const stop = syncQueries(queries, room);
  socket.receive(event("UPDATE", { id: 1, status: "done" }));
  assert.deepEqual(queries.getQueryData(["tasks"]), [{ id: 1, status: "done" }], "the list was patched");
  assert.equal(queries.getQueryState(["tasks"]).isInvalidated, false);
  socket.receive({ type: "joined", room: "project:1", position: "Q", recovered: false });
  assert.equal(queries.getQueryState(["projects"]).isInvalidated, true, "resync refetches everything");
  stop();
  socket.receive(event("DELETE", { id: 1 }));
  assert.deepEqual(queries.getQueryData(["tasks"]), [{ id: 1, status: "done" }], "stopped");
  client.close();
});
