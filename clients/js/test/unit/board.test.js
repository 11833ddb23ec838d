// The board's copy of the client (built into the relay binary) must be the current build.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { bundle, target } from "../../scripts/board-bundle.mjs";

test("src/demo/assets/pgrelay-client.js is the current build (run npm run build and commit it)", () => {
  assert.equal(readFileSync(target, "utf8"), bundle());
});
