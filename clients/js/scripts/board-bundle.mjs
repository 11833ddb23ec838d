// Copies the client's build into the relay's board assets (src/demo/assets), which the relay
// binary includes at compile time: building the relay needs no Node, and test/unit/board.test.js
// fails when the committed copy is not the current build.
import { readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

export const HEADER = "// Generated from clients/js/src/index.ts by `npm run build` (clients/js). Do not edit.\n";
export const source = fileURLToPath(new URL("../dist/index.js", import.meta.url));
export const target = fileURLToPath(new URL("../../../src/demo/assets/pgrelay-client.js", import.meta.url));

export function bundle() {
  return HEADER + readFileSync(source, "utf8");
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  writeFileSync(target, bundle());
}
