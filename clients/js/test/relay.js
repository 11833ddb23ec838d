// Test harness: real relays and a real Postgres, started the way a developer starts them.
//
// `devRelay()` runs `pgrelay serve` without DATABASE_URL: an embedded Postgres in a temp dir,
// migrated, with the demo data, and the board's demo endpoints (tokens, data). `relayOn(db)`
// runs a second relay on that same database with DATABASE_URL, so a test can SIGKILL and restart
// it while the database, and SQL writes, carry on.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { createServer as createHttpServer } from "node:http";
import { readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, extname } from "node:path";
import { fileURLToPath } from "node:url";
import pg from "pg";

export const ROOT = fileURLToPath(new URL("../../../", import.meta.url));
export const BIN = process.env.PGRELAY_BIN ?? join(ROOT, "target/debug/pgrelay");
/** `pgrelay serve`'s development secret (src/main.rs), for the relay that runs on DATABASE_URL. */
export const DEV_SECRET = "pgrelay-dev-secret-not-for-production";

export async function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function waitReady(url, child, output) {
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`the relay exited (${child.exitCode}):\n${output()}`);
    try {
      if ((await fetch(`${url}/readyz`)).ok) return;
    } catch {
      /* not listening yet */
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`the relay at ${url} never became ready:\n${output()}`);
}

function launch(args, env) {
  const merged = { ...process.env, RUST_LOG: "pgrelay=warn", ...env };
  for (const [k, v] of Object.entries(merged)) if (v === undefined) delete merged[k];
  const child = spawn(BIN, args, { env: merged, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (out += d));
  return { child, output: () => out };
}

/** `pgrelay serve` in development mode on a fresh data dir. */
export async function devRelay() {
  const dataDir = mkdtempSync(join(tmpdir(), "pgrelay-js-"));
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const { child, output } = launch(["serve", "--bind", `127.0.0.1:${port}`, "--data-dir", dataDir], {
    DATABASE_URL: undefined,
  });
  await waitReady(url, child, output);
  const dbUrl = /psql (postgres:\/\/\S+)/.exec(output())?.[1];
  if (!dbUrl) throw new Error(`no database URL in the banner:\n${output()}`);
  const db = new pg.Client({ connectionString: dbUrl });
  await db.connect();
  return {
    url,
    dbUrl,
    db,
    async stop() {
      await db.end().catch(() => {});
      child.kill("SIGTERM");
      await new Promise((r) => (child.exitCode !== null ? r() : child.once("exit", r)));
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** A relay on an existing database; `kill()` is SIGKILL, `start()` again on the same port. */
export async function relayOn(dbUrl) {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  let proc = null;
  const relay = {
    url,
    async start() {
      proc = launch(["serve", "--bind", `127.0.0.1:${port}`], { DATABASE_URL: dbUrl, PGRELAY_JWT_SECRET: DEV_SECRET });
      await waitReady(url, proc.child, proc.output);
    },
    async kill() {
      const child = proc.child;
      child.kill("SIGKILL");
      await new Promise((r) => (child.exitCode !== null || child.signalCode ? r() : child.once("exit", r)));
    },
    async stop() {
      if (proc && proc.child.exitCode === null && !proc.child.signalCode) await relay.kill();
    },
  };
  await relay.start();
  return relay;
}

/** Dev tokens for the demo users, from the dev relay's demo endpoint. */
export async function tokens(devUrl, ttl) {
  const response = await fetch(`${devUrl}/demo/users${ttl ? `?ttl=${ttl}` : ""}`);
  const { users } = await response.json();
  return Object.fromEntries(users.map((u) => [u.id, u.token]));
}

/** Serves the board's files from another origin than the relay's, as an app's page would be. */
export async function boardServer() {
  const dir = join(ROOT, "src/demo/assets");
  const types = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };
  const server = createHttpServer((req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    const file = path === "/" ? "index.html" : path.slice(1);
    try {
      const body = readFileSync(join(dir, file.replace(/\.\.+/g, "")));
      res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  const port = await freePort();
  await new Promise((r) => server.listen(port, "127.0.0.1", r));
  return { url: `http://localhost:${port}`, close: () => new Promise((r) => server.close(r)) };
}

/** Waits until `check()` is truthy. */
export async function until(check, what, timeout = 15_000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
