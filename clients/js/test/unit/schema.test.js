// docs/protocol.schema.json and the client's TypeScript types (src/protocol.ts) describe the same
// messages: the same `type`s in each direction, the same fields, the same required ones.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import ts from "typescript";

const schema = JSON.parse(readFileSync(fileURLToPath(new URL("../../../../docs/protocol.schema.json", import.meta.url)), "utf8"));
const sourcePath = fileURLToPath(new URL("../../src/protocol.ts", import.meta.url));
const source = ts.createSourceFile(sourcePath, readFileSync(sourcePath, "utf8"), ts.ScriptTarget.ES2020, true);

/** interface name → { type literal, fields: name → optional } */
function interfaces() {
  const out = new Map();
  for (const node of source.statements) {
    if (!ts.isInterfaceDeclaration(node)) continue;
    const fields = new Map();
    let type = null;
    for (const member of node.members) {
      if (!ts.isPropertySignature(member) || !member.name) continue;
      const name = member.name.getText(source);
      fields.set(name, Boolean(member.questionToken));
      if (name === "type" && member.type && ts.isLiteralTypeNode(member.type)) type = member.type.literal.text;
    }
    out.set(node.name.text, { type, fields });
  }
  return out;
}

/** The interfaces a union type alias lists. */
function union(name) {
  const alias = source.statements.find((s) => ts.isTypeAliasDeclaration(s) && s.name.text === name);
  assert.ok(alias && ts.isUnionTypeNode(alias.type), `${name} is a union`);
  return alias.type.types.map((t) => t.typeName.text);
}

function fromSchema(direction) {
  return schema.$defs[direction].oneOf.map(({ $ref }) => {
    const def = schema.$defs[$ref.split("/").pop()];
    return {
      type: def.properties.type.const,
      fields: new Map(Object.keys(def.properties).map((k) => [k, !def.required.includes(k)])),
    };
  });
}

for (const [union_, direction] of [["ClientMessage", "clientMessage"], ["ServerMessage", "serverMessage"]]) {
  test(`${union_} matches the schema's ${direction}`, () => {
    const all = interfaces();
    const typed = new Map(union(union_).map((n) => [all.get(n).type, { name: n, fields: all.get(n).fields }]));
    const described = fromSchema(direction);
    assert.deepEqual([...typed.keys()].sort(), described.map((d) => d.type).sort(), "the same message types");
    for (const d of described) {
      const t = typed.get(d.type);
      assert.deepEqual(
        Object.fromEntries([...t.fields].sort()),
        Object.fromEntries([...d.fields].sort()),
        `${t.name} vs the schema's ${d.type}: field → optional`,
      );
    }
  });
}
