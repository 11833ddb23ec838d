// The live board in a real browser (Debian's chromium driven by playwright-core): two users in
// two browser contexts, the page on another origin than the relay, changes made in SQL.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, copyFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { devRelay, relayOn, boardServer, until, ROOT } from "../relay.js";

const ARTIFACTS = join(ROOT, "clients/js/artifacts");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

let dev;
let relay; // the relay the boards connect to; SIGKILLed in one test
let pages;
let browser;

before(async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  dev = await devRelay();
  relay = await relayOn(dev.dbUrl);
  pages = await boardServer();
  // Playwright's launch gives every run a fresh temporary profile (its own --user-data-dir).
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
  await pages?.close();
  await relay?.stop();
  await dev?.stop();
});

/** A board for `user` in its own browser context (its own cookies, storage, connections). */
async function openBoard(user, { base = pages.url, relayUrl = relay.url, init } = {}) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 400 } });
  const page = await context.newPage();
  if (init) await page.addInitScript(init);
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  const q = new URLSearchParams({ user, project: "1", relay: relayUrl, api: dev.url });
  await page.goto(`${base}/?${q}`);
  await page.waitForFunction(() => window.pgrelayBoard?.loaded >= 1 && window.pgrelayBoard.client.status === "open", null, { timeout: 20_000 });
  return { page, context, errors, state: () => page.evaluate(() => window.pgrelayBoard.state()) };
}

/** The tasks of project 1 `user` may read, as the board shows them. */
async function readable(user) {
  const { rows } = await dev.db.query(
    `SELECT id::int, status, title, is_private FROM tasks t
      WHERE project_id = 1 AND can_read_task($1, '{}'::jsonb, to_jsonb(t)) ORDER BY id`,
    [user],
  );
  return rows;
}

async function column(page, taskId) {
  return page.evaluate((id) => document.querySelector(`[data-task="${id}"]`)?.closest("[data-column]")?.dataset.column ?? null, taskId);
}

let alice;
let bob;

test("two users, two contexts, page and relay on different origins", async () => {
  alice = await openBoard("u1");
  bob = await openBoard("u2");
  assert.notEqual(new URL(pages.url).origin, new URL(relay.url).origin);
  assert.deepEqual(await alice.state(), await readable("u1"));
  assert.deepEqual(await bob.state(), await readable("u2"));
  assert.ok((await alice.state()).some((t) => t.is_private), "alice sees her private task");
  assert.ok(!(await bob.state()).some((t) => t.is_private), "bob does not");
  const badge = await alice.page.textContent("#status");
  assert.match(badge, /live · websocket/);
});

test("an UPDATE in SQL moves the card on both boards", async () => {
  await dev.db.query("UPDATE tasks SET status = 'done' WHERE id = 1");
  for (const board of [alice, bob]) await until(async () => (await column(board.page, 1)) === "done", "card 1 in done");
  await dev.db.query("UPDATE tasks SET status = 'doing' WHERE id = 1");
  for (const board of [alice, bob]) await until(async () => (await column(board.page, 1)) === "doing", "card 1 back in doing");
});

test("a private task appears only on the boards allowed to see it", async () => {
  const { rows } = await dev.db.query(
    "INSERT INTO tasks (project_id, title, status, is_private, created_by, assignee_id) VALUES (1, 'Secret offsite', 'todo', true, 'u1', 'u1') RETURNING id::int",
  );
  const id = rows[0].id;
  await until(async () => (await column(alice.page, id)) === "todo", "the private card on alice's board");
  assert.ok(await alice.page.$(`[data-task="${id}"].private`), "marked private");
  // Bob's board has caught up past that insert (a later public change arrived) without it.
  await dev.db.query("UPDATE tasks SET title = 'Book the venue (confirmed)' WHERE id = 2");
  await until(async () => (await bob.state()).some((t) => t.title === "Book the venue (confirmed)"), "bob's later change");
  assert.equal(await column(bob.page, id), null, "never on bob's board");
});

test("presence shows both users; typing shows on the other board", async () => {
  for (const board of [alice, bob]) {
    await until(async () => (await board.page.$$eval("#presence .avatar", (a) => a.map((x) => x.dataset.user).join(","))) === "u1,u2", "both avatars");
  }
  await alice.page.click('[data-task="1"]');
  await bob.page.click('[data-task="1"]');
  await bob.page.waitForFunction(() => window.pgrelayBoard.taskRoom, null);
  await alice.page.evaluate(() => window.pgrelayBoard.taskRoom.ready);
  await bob.page.evaluate(() => window.pgrelayBoard.taskRoom.ready);
  await bob.page.type("#comment", "Looks good", { delay: 40 });
  await alice.page.waitForFunction(() => document.querySelector("#typing").textContent.includes("bob"), null, { timeout: 10_000 });
  assert.equal((await bob.page.textContent("#typing")).trim(), "", "no one sees their own typing");
  const shot = join(ARTIFACTS, "board-alice.png");
  await alice.page.screenshot({ path: shot });
  await bob.page.screenshot({ path: join(ARTIFACTS, "board-bob.png") });
  if (process.env.UPDATE_README_SCREENSHOT) {
    copyFileSync(shot, join(ROOT, "docs/board.png"));
    assert.ok(statSync(join(ROOT, "docs/board.png")).size < 200_000, "the README's screenshot stays small");
  }
});

test("the relay is SIGKILLed and restarted while SQL changes continue: both boards end identical to the database", async () => {
  await relay.kill();
  for (const board of [alice, bob]) {
    await board.page.waitForFunction(() => window.pgrelayBoard.client.status !== "open", null, { timeout: 10_000 });
  }
  await until(async () => (await alice.page.textContent("#status")) !== "live · websocket", "the badge shows the outage");
  await alice.page.screenshot({ path: join(ARTIFACTS, "board-outage.png") });
  for (let i = 0; i < 6; i++) {
    await dev.db.query(`UPDATE tasks SET status = $1, title = 'moved while down ' || $2 WHERE id = 2`, [["todo", "doing", "done"][i % 3], i]);
  }
  await dev.db.query("INSERT INTO tasks (project_id, title, status, created_by) VALUES (1, 'Created during the outage', 'doing', 'u2')");
  await dev.db.query("UPDATE tasks SET is_private = true, assignee_id = 'u1' WHERE id = 1"); // leaves bob's view
  await relay.start();
  // More changes while the boards reconnect and resume.
  await dev.db.query("INSERT INTO tasks (project_id, title, status, created_by) VALUES (1, 'Created after the restart', 'todo', 'u1')");
  for (const [board, user] of [[alice, "u1"], [bob, "u2"]]) {
    const expected = await readable(user);
    await until(async () => JSON.stringify(await board.state()) === JSON.stringify(expected), `${user}'s board equal to the database`, 30_000);
    assert.equal(await board.page.evaluate(() => window.pgrelayBoard.client.status), "open");
    assert.deepEqual(board.errors, [], "no page errors");
  }
  assert.ok(!(await bob.state()).some((t) => t.id === 1), "task 1 left bob's board when it became private");
});

test("WebSocket blocked: the board works over SSE", async () => {
  // Browsers behind proxies that refuse upgrades: a WebSocket that never opens.
  const blocked = () => {
    window.WebSocket = class {
      constructor() {
        this.readyState = 3;
        setTimeout(() => this.onclose?.({ code: 1006, reason: "" }), 0);
      }
      send() {}
      close() {}
    };
  };
  // The page is on another origin than the relay, as in production: /sse must answer with CORS.
  const probe = await fetch(`${dev.url}/sse?rooms=project:1`, { headers: { origin: pages.url } });
  assert.equal(probe.headers.get("access-control-allow-origin"), pages.url, "CORS on /sse");
  await probe.body?.cancel();
  const carol = await openBoard("u3", { init: blocked, relayUrl: dev.url });
  assert.equal(await carol.page.evaluate(() => window.pgrelayBoard.client.transport), "sse");
  assert.match(await carol.page.textContent("#status"), /live · sse/);
  await dev.db.query("UPDATE tasks SET status = 'done' WHERE id = 4"); // project 2: carol is not looking
  await dev.db.query("UPDATE tasks SET status = 'todo' WHERE id = 2");
  await until(async () => (await column(carol.page, 2)) === "todo", "the card moved over SSE");
  assert.deepEqual(await carol.state(), await readable("u3"));
  await carol.page.screenshot({ path: join(ARTIFACTS, "board-sse.png") });
  await carol.context.close();
});
