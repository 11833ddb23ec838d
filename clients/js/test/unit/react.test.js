// The React bindings: StrictMode's double mount joins once; the server renders without a socket.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createElement, StrictMode } from "react";
import { renderToString } from "react-dom/server";
import TestRenderer from "react-test-renderer";
import { createClient } from "../../dist/index.js";
import { PgrelayProvider, useRoom, useConnectionStatus, usePresence, useTyping } from "../../dist/react.js";
import { FakeSocket, jwt, tick } from "./fake.js";

globalThis.IS_REACT_ACT_ENVIRONMENT = true;
const { act } = TestRenderer;

function makeClient() {
  FakeSocket.reset();
  return createClient("http://relay.test", {
    WebSocket: FakeSocket,
    transports: ["websocket"],
    token: () => jwt(Date.now() + 3_600_000),
    autoConnect: false,
  });
}

function Board({ seen }) {
  const status = useConnectionStatus();
  const room = useRoom("project:1", { onEvent: (e) => seen.push(e.id) });
  const presence = usePresence(room);
  const { users } = useTyping(room);
  return createElement("p", null, `${status} ${Object.keys(presence).join(",")} ${users.join(",")}`);
}

test("StrictMode mounts twice but the relay sees one join, and events arrive once", async () => {
  const client = makeClient();
  const seen = [];
  let renderer;
  await act(async () => {
    renderer = TestRenderer.create(
      createElement(StrictMode, null, createElement(PgrelayProvider, { client }, createElement(Board, { seen }))),
    );
  });
  await act(async () => {
    await tick();
    FakeSocket.last.accept();
  });
  await act(async () => {
    await new Promise((r) => setTimeout(r, 10)); // the deferred leave of the first mount
  });
  const socket = FakeSocket.last;
  assert.equal(socket.sentOf("join").length, 1, "one join");
  assert.equal(socket.sentOf("leave").length, 0, "no leave from the discarded mount");
  await act(async () => {
    socket.receive({ type: "joined", room: "project:1", position: "P", ref: socket.sentOf("join")[0].ref });
    socket.receive({ type: "presence_state", room: "project:1", users: { u1: [{ conn_id: "a" }] } });
    socket.receive({ type: "typing", room: "project:1", user: "u2", typing: true });
    socket.receive({ type: "event", room: "project:1", id: "E1", event: "task_updated", table: "tasks", op: "UPDATE", row: { id: 1 }, ts: "t" });
  });
  assert.deepEqual(seen, ["E1"], "one handler call per event");
  assert.equal(renderer.toJSON().children.join(""), "open u1 u2");
  await act(async () => renderer.unmount());
  await act(async () => new Promise((r) => setTimeout(r, 10)));
  assert.equal(socket.sentOf("leave").length, 1, "unmounting leaves");
  client.close();
});

test("server rendering opens no socket", () => {
  const client = makeClient();
  const html = renderToString(createElement(PgrelayProvider, { client }, createElement(Board, { seen: [] })));
  assert.match(html, /connecting/);
  assert.equal(FakeSocket.all.length, 0, "no WebSocket on the server");
});
