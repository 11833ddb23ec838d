// pgrelay-client: rooms over WebSocket (or SSE), lossless resume by position, presence, typing,
// token refresh and a connection that heals itself. No runtime dependencies: it runs in
// browsers, Node 20+ and React Native, given a WebSocket constructor.
//
// The pure decisions (backoff, close codes, positions, presence, token timing, join pacing) are
// exported functions, so they are unit-tested on their own and the client below only wires them.

import type {
  ClientMessage,
  ErrorCode,
  EventMessage,
  JoinedMessage,
  PresenceMeta,
  PresenceUsers,
  ServerMessage,
} from "./protocol.js";

export type * from "./protocol.js";

// ---------------------------------------------------------------------------------------------
// Pure decisions
// ---------------------------------------------------------------------------------------------

export interface BackoffOptions {
  /** First retry's upper bound, ms. */
  base: number;
  /** No retry waits longer than this, ms. */
  max: number;
}

/** Exponential backoff with full jitter: a uniform delay in [0, min(max, base·2^attempt)].
 * Full jitter spreads a crowd of clients that lost the same relay, so they do not all come back
 * in the same millisecond. `random` is injectable for tests. */
export function backoffDelay(attempt: number, opts: BackoffOptions, random: () => number = Math.random): number {
  const ceiling = Math.min(opts.max, opts.base * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

export type CloseDecision =
  | { reconnect: false }
  | { reconnect: true; newToken: boolean; minDelay: number };

/** What a closed WebSocket means for what follows (see docs/client.md, "Close codes"). */
export function closeDecision(code: number, closedByUs: boolean, rateLimitedDelay: number): CloseDecision {
  if (closedByUs) return { reconnect: false };
  switch (code) {
    case 4001: // unauthorized or expired: a new token, then at once
      return { reconnect: true, newToken: true, minDelay: 0 };
    case 4029: // rate limited: come back noticeably later
      return { reconnect: true, newToken: false, minDelay: rateLimitedDelay };
    default:
      // 1001 shutting down, 4008 too slow, 1006 network, 1000 idle timeout, 1009 too big:
      // reconnect and resume with every room's position.
      return { reconnect: true, newToken: false, minDelay: 0 };
  }
}

/** A room's position after `joined`. A fresh join starts at `joined.position`; a resume that
 * recovered keeps the position it resumed from (the missed events follow and advance it); a
 * resume that could not recover starts over at `joined.position`. */
export function positionAfterJoined(current: string | null, sentSince: string | undefined, joined: JoinedMessage): string {
  if (sentSince === undefined) return current ?? joined.position;
  if (joined.recovered === false) return joined.position;
  return current ?? sentSince;
}

/** Applies a presence diff: leaves first (by `conn_id`), then joins. Returns a new object. */
export function applyPresenceDiff(users: PresenceUsers, joins: PresenceUsers, leaves: PresenceUsers): PresenceUsers {
  const next: PresenceUsers = {};
  for (const [user, metas] of Object.entries(users)) next[user] = metas.slice();
  for (const [user, metas] of Object.entries(leaves)) {
    const gone = new Set(metas.map((m) => m.conn_id));
    const kept = (next[user] ?? []).filter((m) => !gone.has(m.conn_id));
    if (kept.length > 0) next[user] = kept;
    else delete next[user];
  }
  for (const [user, metas] of Object.entries(joins)) {
    const present = next[user] ?? [];
    const replaced = new Set(metas.map((m) => m.conn_id));
    next[user] = present.filter((m) => !replaced.has(m.conn_id)).concat(metas);
  }
  return next;
}

/** The `exp` of a JWT in ms since the epoch, or null if it has none or cannot be read. The
 * client never verifies tokens; it only reads `exp` so that it never sends an expired one. */
export function tokenExpiry(token: string): number | null {
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "=".repeat((4 - (b64.length % 4)) % 4);
    const json = typeof atob === "function" ? atob(padded) : "";
    const exp = (JSON.parse(json) as { exp?: unknown }).exp;
    return typeof exp === "number" ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/** How long before `expiresAt` to refresh: a fifth of the token's lifetime, between 5 s and 60 s,
 * so a one-hour token refreshes a minute early and a 20-second one 5 s early. */
export function refreshDelay(expiresAt: number, issuedAt: number, now: number): number {
  const lifetime = Math.max(0, expiresAt - issuedAt);
  const ahead = Math.min(60_000, Math.max(5_000, lifetime / 5));
  return Math.max(0, expiresAt - ahead - now);
}

/** A token may be sent only if it is valid for at least this much longer (clock skew, latency). */
export const TOKEN_MARGIN_MS = 2_000;

export function tokenUsable(token: string, now: number): boolean {
  const exp = tokenExpiry(token);
  return exp === null || exp - TOKEN_MARGIN_MS > now;
}

/** Paces joins under the relay's join rate (10 per second, burst 20): a token bucket that says
 * how long to wait before the next join may go. */
export class JoinPacer {
  private tokens: number;
  private last: number;
  constructor(private readonly perSecond: number, private readonly burst: number, now: number) {
    this.tokens = burst;
    this.last = now;
  }
  /** Takes a slot: 0 if a join may go now, else the ms to wait (the slot is then reserved). */
  take(now: number): number {
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.perSecond);
    this.last = now;
    this.tokens -= 1;
    if (this.tokens >= 0) return 0;
    return Math.ceil((-this.tokens / this.perSecond) * 1000);
  }
}

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

export type Status = "connecting" | "open" | "reconnecting" | "offline" | "closed";
export type Transport = "websocket" | "sse";

/** The subset of the WebSocket API the client uses (browsers', `ws`, React Native's). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ClientOptions {
  /** Returns a JWT. Called to connect, ahead of expiry, and after a 4001. */
  token: () => Promise<string> | string;
  /** In order of preference. Default `["websocket", "sse"]`. */
  transports?: Transport[];
  /** WebSocket implementation (default `globalThis.WebSocket`): `ws` in Node 20, React Native's. */
  WebSocket?: WebSocketConstructor;
  /** fetch implementation for SSE and the reachability probe (default `globalThis.fetch`). */
  fetch?: typeof fetch;
  /** Reconnect backoff, ms (default base 500, max 30 000). */
  backoff?: Partial<BackoffOptions>;
  /** Least wait after a 4029 (rate limited), ms. Default 10 000. */
  rateLimitedDelay?: number;
  /** `lost` fires after this long without a connection, ms. Default 5 000. */
  lostConnectionTimeout?: number;
  /** Application-level ping interval, ms. Default 20 000. */
  pingInterval?: number;
  /** A ping unanswered for this long means the socket is dead, ms. Default 5 000. */
  pongTimeout?: number;
  /** Joins per second when (re)joining many rooms (default 8, burst 16: under the relay's 10/20). */
  joinRate?: { perSecond: number; burst: number };
  /** Over SSE (which cannot ask the relay), `caughtUp` resolves after this long, ms. Default 1 500. */
  sseCaughtUpDelay?: number;
  /** Start connecting at once (default: in a browser); else on the first `join` or `connect()`. */
  autoConnect?: boolean;
}

export interface JoinOptions {
  /** Resume after this position (an event id, or `pgrelay.position()` from your API). */
  since?: string;
}

/** An error from the relay (or the client) with the relay's code. */
export class PgrelayError extends Error {
  constructor(public readonly code: ErrorCode | "closed" | "left" | "unsupported", message: string) {
    super(message);
    this.name = "PgrelayError";
  }
}

type Listener = (...args: any[]) => void;

class Emitter {
  private listeners = new Map<string, Set<Listener>>();
  on(name: string, fn: Listener): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(fn);
    return () => this.off(name, fn);
  }
  off(name: string, fn: Listener): void {
    this.listeners.get(name)?.delete(fn);
  }
  emit(name: string, ...args: unknown[]): void {
    for (const fn of [...(this.listeners.get(name) ?? [])]) {
      try {
        fn(...args);
      } catch (err) {
        // One application handler that throws must not stop the others, nor the client.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }
  has(name: string): boolean {
    return (this.listeners.get(name)?.size ?? 0) > 0;
  }
}

export interface TypingState {
  /** Users typing now (never yourself). */
  users: string[];
}

/** What `room.on(...)` can listen to. Any other name is an event name (`task_updated`). */
export interface RoomEvents {
  event: (event: EventMessage) => void;
  resync: (joined: JoinedMessage) => void;
  presence: (users: PresenceUsers) => void;
  typing: (state: TypingState) => void;
  joined: (joined: JoinedMessage) => void;
  left: (reason: string) => void;
  error: (error: PgrelayError) => void;
}

/** One handle on a room. Joins of the same room share one subscription; each handle's `leave()`
 * gives back its own reference, and the room is left when the last one is. */
export interface Room {
  readonly name: string;
  /** Resolves on the relay's `joined`; rejects with a `PgrelayError` (`forbidden`, ...). */
  readonly ready: Promise<void>;
  /** The last event id seen in this room, or `joined.position` before any event. */
  readonly position: string | null;
  /** User id → that user's metas (one per connection). */
  readonly presence: PresenceUsers;
  /** Users typing now. */
  readonly typingUsers: string[];
  on<K extends keyof RoomEvents>(name: K, fn: RoomEvents[K]): () => void;
  on(name: string, fn: (event: EventMessage) => void): () => void;
  setPresence(meta: Record<string, unknown>): void;
  /** `typing(true)` on each keystroke: sent at most once a second, ends by itself 3 s after the
   * last call. `typing(false)` ends it now. */
  typing(active: boolean): void;
  /** Resolves once every change up to `position` that this user may read in this room has been
   * delivered (to this room's listeners). */
  caughtUp(position: string): Promise<void>;
  leave(): void;
}

// ---------------------------------------------------------------------------------------------
// Rooms
// ---------------------------------------------------------------------------------------------

const TYPING_REFRESH_MS = 1_000;
const TYPING_IDLE_MS = 3_000;
/** Someone else's `typing: true` not refreshed for this long is dropped (the relay ends it at 5 s). */
const TYPING_STALE_MS = 6_000;

class RoomState {
  refs = 0;
  position: string | null;
  presence: PresenceUsers = {};
  meta: Record<string, unknown> | null = null;
  /** Joined on the current connection. */
  joined = false;
  /** Refused for good (forbidden, revoked): not rejoined. */
  failed: PgrelayError | null = null;
  ready: Promise<void>;
  resolveReady!: () => void;
  rejectReady!: (err: PgrelayError) => void;
  readySettled = false;
  /** The `since` the pending join was sent with. */
  sentSince: string | undefined;
  joinRef: string | null = null;
  /** The relay refused the position: the next `joined` must tell the app to refetch. */
  resyncPending = false;
  emitter = new Emitter();
  others = new Map<string, ReturnType<typeof setTimeout>>();
  typingSince = 0;
  typingStop: ReturnType<typeof setTimeout> | null = null;
  /** caughtUp calls not yet answered: ref → position and its promise's settle functions. */
  syncs = new Map<string, { position: string; resolve: () => void; reject: (e: PgrelayError) => void }>();

  constructor(readonly name: string, since: string | undefined) {
    this.position = since ?? null;
    this.ready = new Promise<void>((resolve, reject) => {
      this.resolveReady = () => {
        this.readySettled = true;
        resolve();
      };
      this.rejectReady = (err) => {
        this.readySettled = true;
        reject(err);
      };
    });
    // A rejection nobody awaits is not an unhandled error: `on("error")` also reports it.
    this.ready.catch(() => {});
  }

  typingUsers(): string[] {
    return [...this.others.keys()];
  }
}

class RoomHandle implements Room {
  private unsubscribes: (() => void)[] = [];
  private left = false;
  constructor(private readonly client: PgrelayClient, private readonly state: RoomState) {}
  get name() {
    return this.state.name;
  }
  get ready() {
    return this.state.ready;
  }
  get position() {
    return this.state.position;
  }
  get presence() {
    return this.state.presence;
  }
  get typingUsers() {
    return this.state.typingUsers();
  }
  on(name: string, fn: Listener): () => void {
    const off = this.state.emitter.on(name, fn);
    this.unsubscribes.push(off);
    return off;
  }
  setPresence(meta: Record<string, unknown>): void {
    this.state.meta = meta;
    if (this.state.joined) this.client.sendPresence(this.state);
  }
  typing(active: boolean): void {
    this.client.setTyping(this.state, active);
  }
  caughtUp(position: string): Promise<void> {
    return this.client.caughtUp(this.state, position);
  }
  leave(): void {
    if (this.left) return;
    this.left = true;
    for (const off of this.unsubscribes) off();
    this.client.release(this.state);
  }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

const WS_OPEN = 1;
/** The code the client closes a socket with when it decides the socket is dead or replaced. */
const CLOSE_DEAD = 4000;

interface Connection {
  transport: Transport;
  send(message: ClientMessage): void;
  close(): void;
}

export class PgrelayClient {
  private readonly emitter = new Emitter();
  private readonly rooms = new Map<string, RoomState>();
  private readonly opts: Required<Omit<ClientOptions, "WebSocket" | "fetch" | "backoff">> & {
    backoff: BackoffOptions;
  };
  private readonly WS: WebSocketConstructor | undefined;
  private readonly fetchFn: typeof fetch | undefined;
  private readonly wsUrl: string;
  private readonly httpUrl: string;
  private _status: Status = "connecting";
  private conn: Connection | null = null;
  /** Bumped on every new connection attempt: callbacks of older ones are ignored. */
  private generation = 0;
  private attempt = 0;
  private closed = false;
  private started = false;
  private token: string | null = null;
  private tokenIssuedAt = 0;
  private forceNewToken = false;
  private transportIndex = 0;
  private refNo = 0;
  private pacer: JoinPacer;
  private joinQueue: RoomState[] = [];
  private joinTimer: ReturnType<typeof setTimeout> | null = null;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private refreshTimer: ReturnType<typeof setTimeout> | null = null;
  private pingTimer: ReturnType<typeof setInterval> | null = null;
  private pongTimer: ReturnType<typeof setTimeout> | null = null;
  private lostTimer: ReturnType<typeof setTimeout> | null = null;
  private lostFired = false;
  private pendingPing: string | null = null;
  private removeWindowListeners: (() => void) | null = null;
  /** SSE: the stream's last event id (its rooms share one commit order). */
  private streamPosition: string | null = null;
  /** SSE: the rooms the open stream was opened for. */
  private streamRooms = "";
  private reopenTimer: ReturnType<typeof setTimeout> | null = null;
  private everOpen = false;
  /** Authenticated on the current connection (the status may say `offline` meanwhile). */
  private isOpen = false;

  constructor(url: string, options: ClientOptions) {
    this.opts = {
      token: options.token,
      transports: options.transports ?? ["websocket", "sse"],
      backoff: { base: 500, max: 30_000, ...options.backoff },
      rateLimitedDelay: options.rateLimitedDelay ?? 10_000,
      lostConnectionTimeout: options.lostConnectionTimeout ?? 5_000,
      pingInterval: options.pingInterval ?? 20_000,
      pongTimeout: options.pongTimeout ?? 5_000,
      joinRate: options.joinRate ?? { perSecond: 8, burst: 16 },
      sseCaughtUpDelay: options.sseCaughtUpDelay ?? 1_500,
      // Not on a server (SSR): there, only an explicit connect() or join() connects.
      autoConnect: options.autoConnect ?? typeof document !== "undefined",
    };
    this.WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    const f = options.fetch ?? globalThis.fetch;
    this.fetchFn = f ? f.bind(globalThis) : undefined;
    const base = url.replace(/\/+$/, "").replace(/\/(ws|sse)$/, "");
    this.wsUrl = base.replace(/^http/, "ws") + "/ws";
    this.httpUrl = base.replace(/^ws/, "http");
    this.pacer = new JoinPacer(this.opts.joinRate.perSecond, this.opts.joinRate.burst, Date.now());
    if (this.opts.autoConnect) this.connect();
  }

  get status(): Status {
    return this._status;
  }

  /** The transport in use (or to be tried next). */
  get transport(): Transport {
    return this.opts.transports[this.transportIndex] ?? "websocket";
  }

  on(name: "status", fn: (status: Status) => void): () => void;
  on(name: "lost", fn: () => void): () => void;
  on(name: "error", fn: (error: unknown) => void): () => void;
  on(name: string, fn: Listener): () => void {
    return this.emitter.on(name, fn);
  }

  /** Starts connecting (only needed with `autoConnect: false`). */
  connect(): void {
    if (this.started || this.closed) return;
    this.started = true;
    this.watchEnvironment();
    void this.open();
  }

  join(name: string, options: JoinOptions = {}): Room {
    if (this.closed) throw new PgrelayError("closed", "the client is closed");
    let state = this.rooms.get(name);
    if (!state) {
      state = new RoomState(name, options.since);
      this.rooms.set(name, state);
      state.refs = 1;
      this.connect();
      this.scheduleJoin(state);
    } else {
      state.refs += 1;
    }
    return new RoomHandle(this, state);
  }

  /** Closes the connection for good: rooms are left, pending promises rejected. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.clearTimers();
    this.removeWindowListeners?.();
    const conn = this.conn;
    this.conn = null;
    this.generation++;
    conn?.close();
    for (const state of this.rooms.values()) this.failRoom(state, new PgrelayError("closed", "the client was closed"), false);
    this.rooms.clear();
    this.setStatus("closed");
  }

  // ---- used by room handles ----

  release(state: RoomState): void {
    state.refs -= 1;
    if (state.refs > 0) return;
    this.rooms.delete(state.name);
    this.joinQueue = this.joinQueue.filter((s) => s !== state);
    this.stopTyping(state, false);
    for (const timer of state.others.values()) clearTimeout(timer);
    for (const sync of state.syncs.values()) sync.reject(new PgrelayError("left", "the room was left"));
    state.syncs.clear();
    if (!state.readySettled) state.rejectReady(new PgrelayError("left", "the room was left before it was joined"));
    if (this.conn?.transport === "websocket" && state.joined) {
      this.conn.send({ type: "leave", room: state.name });
    } else if (this.conn?.transport === "sse") {
      this.reopenStream();
    }
    state.joined = false;
  }

  sendPresence(state: RoomState): void {
    if (state.meta && this.conn?.transport === "websocket" && state.joined) {
      this.conn.send({ type: "presence", room: state.name, meta: state.meta });
    }
  }

  setTyping(state: RoomState, active: boolean): void {
    if (!active) {
      this.stopTyping(state, true);
      return;
    }
    const now = Date.now();
    if (state.typingStop) clearTimeout(state.typingStop);
    state.typingStop = setTimeout(() => this.stopTyping(state, true), TYPING_IDLE_MS);
    if (now - state.typingSince >= TYPING_REFRESH_MS) {
      state.typingSince = now;
      if (this.conn?.transport === "websocket" && state.joined) {
        this.conn.send({ type: "typing", room: state.name, typing: true });
      }
    }
  }

  caughtUp(state: RoomState, position: string): Promise<void> {
    if (state.failed) return Promise.reject(state.failed);
    return new Promise<void>((resolve, reject) => {
      const ref = this.nextRef("s");
      state.syncs.set(ref, { position, resolve, reject });
      this.sendSync(state, ref);
    });
  }

  // ---- connecting ----

  private async open(): Promise<void> {
    if (this.closed) return;
    const generation = ++this.generation;
    if (this._status !== "offline") this.setStatus(this.everOpen ? "reconnecting" : "connecting");
    let token: string;
    try {
      token = await this.freshToken();
    } catch (err) {
      if (generation !== this.generation) return;
      this.emitter.emit("error", err);
      this.scheduleReconnect(0);
      return;
    }
    if (generation !== this.generation || this.closed) return;
    const transport = this.transport;
    if (transport === "websocket" && this.WS) this.openWebSocket(generation, token);
    else if (transport === "sse" && this.fetchFn) this.openStream(generation, token);
    else {
      this.emitter.emit("error", new PgrelayError("unsupported", `no ${transport} implementation available`));
      this.advanceTransport();
      this.scheduleReconnect(0);
    }
  }

  /** A token that is not expired: the cached one if still good, else a new one from `token()`. */
  private async freshToken(): Promise<string> {
    const now = Date.now();
    if (this.token && !this.forceNewToken && tokenUsable(this.token, now)) return this.token;
    let token = await this.opts.token();
    if (!tokenUsable(token, Date.now())) {
      // One more try: an app that caches tokens may hand back the stale one first.
      token = await this.opts.token();
      if (!tokenUsable(token, Date.now())) throw new PgrelayError("unauthorized", "token() returned an expired token");
    }
    this.token = token;
    this.tokenIssuedAt = Date.now();
    this.forceNewToken = false;
    return token;
  }

  private openWebSocket(generation: number, token: string): void {
    let socket: WebSocketLike;
    try {
      socket = new this.WS!(this.wsUrl);
    } catch (err) {
      this.emitter.emit("error", err);
      void this.onOpenFailed(generation);
      return;
    }
    let opened = false;
    let closedByUs = false;
    const conn: Connection = {
      transport: "websocket",
      send: (message) => {
        if (socket.readyState === WS_OPEN) socket.send(JSON.stringify(message));
      },
      close: () => {
        closedByUs = true;
        socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
        try {
          socket.close(1000, "client closed");
        } catch {
          /* already closed */
        }
      },
    };
    this.conn = conn;
    socket.onopen = () => {
      if (generation !== this.generation) return;
      opened = true;
      // In band, never in the URL: URLs end up in proxy and server logs.
      socket.send(JSON.stringify({ type: "auth", token, ref: "auth" }));
    };
    socket.onmessage = (ev) => {
      if (generation !== this.generation) return;
      this.alive();
      let message: ServerMessage;
      try {
        message = JSON.parse(String(ev.data)) as ServerMessage;
      } catch {
        return;
      }
      this.onMessage(message);
    };
    socket.onerror = () => {};
    socket.onclose = (ev) => {
      if (generation !== this.generation) return;
      this.conn = null;
      this.disconnected();
      if (!opened) {
        void this.onOpenFailed(generation);
        return;
      }
      const decision = closeDecision(ev.code, closedByUs, this.opts.rateLimitedDelay);
      if (!decision.reconnect) return;
      if (decision.newToken) this.forceNewToken = true;
      this.scheduleReconnect(decision.minDelay);
    };
  }

  /** A WebSocket that never opened: if the relay answers HTTP, WebSockets are blocked on the way
   * (a proxy, a firewall) and the next transport is tried; if it does not, the relay is down
   * and the same transport is retried with backoff. */
  private async onOpenFailed(generation: number): Promise<void> {
    this.conn = null;
    this.disconnected();
    if (this.opts.transports.length > 1 && (await this.reachable())) {
      if (generation !== this.generation) return;
      this.advanceTransport();
      this.scheduleReconnect(0, true);
      return;
    }
    if (generation !== this.generation) return;
    this.scheduleReconnect(0);
  }

  private async reachable(): Promise<boolean> {
    if (!this.fetchFn) return false;
    try {
      // no-cors: only whether the relay answered matters, so no CORS headers are needed.
      await this.fetchFn(this.httpUrl + "/healthz", { mode: "no-cors", cache: "no-store" });
      return true;
    } catch {
      return false;
    }
  }

  private advanceTransport(): void {
    this.transportIndex = (this.transportIndex + 1) % this.opts.transports.length;
  }

  private onMessage(message: ServerMessage): void {
    switch (message.type) {
      case "ready": {
        const wasOpen = this._status === "open";
        const exp = Date.parse(message.expires_at);
        this.scheduleRefresh(exp);
        if (message.ref === "auth" && !wasOpen) this.connected();
        return;
      }
      case "pong":
        if (message.ref && message.ref === this.pendingPing) {
          this.pendingPing = null;
          if (this.pongTimer) clearTimeout(this.pongTimer);
          this.pongTimer = null;
        }
        return;
      case "joined":
        return this.onJoined(message);
      case "event":
        return this.onEvent(message);
      case "left":
        return this.onLeft(message.room, message.reason);
      case "presence_state": {
        const state = this.rooms.get(message.room);
        if (!state) return;
        state.presence = message.users;
        state.emitter.emit("presence", state.presence);
        return;
      }
      case "presence_diff": {
        const state = this.rooms.get(message.room);
        if (!state) return;
        state.presence = applyPresenceDiff(state.presence, message.joins, message.leaves);
        state.emitter.emit("presence", state.presence);
        return;
      }
      case "typing":
        return this.onTyping(message.room, message.user, message.typing);
      case "synced": {
        const state = this.rooms.get(message.room);
        const sync = message.ref ? state?.syncs.get(message.ref) : undefined;
        if (state && sync && message.ref) {
          state.syncs.delete(message.ref);
          sync.resolve();
        }
        return;
      }
      case "error":
        return this.onError(message.code, message.message, message.ref);
    }
  }

  private onJoined(message: JoinedMessage): void {
    const state = this.rooms.get(message.room);
    if (!state) return;
    state.position = positionAfterJoined(state.position, state.sentSince, message);
    state.joined = true;
    state.joinRef = null;
    state.emitter.emit("joined", message);
    if (message.recovered === false || state.resyncPending) state.emitter.emit("resync", message);
    state.resyncPending = false;
    if (!state.readySettled) state.resolveReady();
    this.sendPresence(state);
    if (this.conn?.transport === "websocket") for (const ref of state.syncs.keys()) this.sendSync(state, ref);
  }

  private onEvent(message: EventMessage): void {
    const state = this.rooms.get(message.room);
    if (!state) return;
    state.position = message.id;
    if (this.conn?.transport === "sse") this.streamPosition = message.id;
    state.emitter.emit(message.event, message);
    state.emitter.emit("event", message);
  }

  private onLeft(room: string, reason: string): void {
    const state = this.rooms.get(room);
    if (!state || reason === "requested") return;
    state.joined = false;
    if (reason === "replay_failed") {
      // Resume again from the last event that did arrive.
      this.scheduleJoin(state);
      return;
    }
    // Revoked (or anything new): the user may not be here any more. Not rejoined.
    this.failRoom(state, new PgrelayError("forbidden", `left ${room}: ${reason}`), true);
    state.emitter.emit("left", reason);
  }

  private onTyping(room: string, user: string, typing: boolean): void {
    const state = this.rooms.get(room);
    if (!state) return;
    const timer = state.others.get(user);
    if (timer) clearTimeout(timer);
    if (typing) {
      state.others.set(user, setTimeout(() => this.onTyping(room, user, false), TYPING_STALE_MS));
    } else {
      state.others.delete(user);
      if (!timer) return;
    }
    state.emitter.emit("typing", { users: state.typingUsers() });
  }

  private onError(code: ErrorCode, text: string, ref: string | undefined): void {
    if (!ref) return;
    if (ref === "auth" || ref === "refresh") {
      // A bad refresh: the relay keeps the session until the old token expires; try again.
      if (ref === "refresh") this.scheduleRefreshRetry();
      return;
    }
    const join = [...this.rooms.values()].find((s) => s.joinRef === ref);
    if (join) {
      join.joinRef = null;
      if (code === "rate_limited" || code === "internal") {
        setTimeout(() => this.rooms.get(join.name) === join && this.scheduleJoin(join), 1_000);
      } else if (code === "bad_request" && join.sentSince !== undefined) {
        // A position this relay cannot use (another database): start over, and say so.
        join.position = null;
        join.resyncPending = true;
        this.scheduleJoin(join, true);
      } else {
        this.failRoom(join, new PgrelayError(code, text), true);
      }
      return;
    }
    for (const state of this.rooms.values()) {
      const sync = state.syncs.get(ref);
      if (sync) {
        state.syncs.delete(ref);
        if (code === "rate_limited") setTimeout(() => this.resendSync(state, ref, sync), 1_000);
        else sync.reject(new PgrelayError(code, text));
        return;
      }
    }
  }

  private resendSync(state: RoomState, ref: string, sync: { position: string; resolve: () => void; reject: (e: PgrelayError) => void }): void {
    if (this.rooms.get(state.name) !== state) return;
    state.syncs.set(ref, sync);
    this.sendSync(state, ref);
  }

  private failRoom(state: RoomState, err: PgrelayError, emit: boolean): void {
    state.failed = err;
    state.joined = false;
    if (!state.readySettled) state.rejectReady(err);
    for (const sync of state.syncs.values()) sync.reject(err);
    state.syncs.clear();
    if (emit) state.emitter.emit("error", err);
  }

  private sendSync(state: RoomState, ref: string): void {
    const sync = state.syncs.get(ref);
    if (!sync || !state.joined || !this.conn) return;
    if (this.conn.transport === "websocket") {
      this.conn.send({ type: "sync", room: state.name, position: sync.position, ref });
    } else {
      // SSE carries nothing from client to relay, so it cannot ask: wait longer than the relay
      // takes to deliver a change (it reads at least every second).
      setTimeout(() => {
        if (state.syncs.delete(ref)) sync.resolve();
      }, this.opts.sseCaughtUpDelay);
    }
  }

  // ---- joins ----

  private scheduleJoin(state: RoomState, forgetSince = false): void {
    if (forgetSince) state.sentSince = undefined;
    if (!this.joinQueue.includes(state)) this.joinQueue.push(state);
    this.pumpJoins();
  }

  private pumpJoins(): void {
    if (this.joinTimer || !this.conn || this._status !== "open") return;
    if (this.conn.transport === "sse") {
      this.joinQueue = [];
      this.reopenStream();
      return;
    }
    while (this.joinQueue.length > 0) {
      const wait = this.pacer.take(Date.now());
      if (wait > 0) {
        this.joinTimer = setTimeout(() => {
          this.joinTimer = null;
          this.sendJoin();
          this.pumpJoins();
        }, wait);
        return;
      }
      this.sendJoin();
    }
  }

  private sendJoin(): void {
    const state = this.joinQueue.shift();
    if (!state || !this.conn || this.rooms.get(state.name) !== state || state.failed) return;
    const ref = this.nextRef("j");
    state.joinRef = ref;
    state.sentSince = state.position ?? undefined;
    const message: ClientMessage = state.sentSince
      ? { type: "join", room: state.name, since: state.sentSince, ref }
      : { type: "join", room: state.name, ref };
    this.conn.send(message);
  }

  private nextRef(prefix: string): string {
    return `${prefix}${++this.refNo}`;
  }

  // ---- connection lifecycle ----

  private connected(): void {
    this.everOpen = true;
    this.isOpen = true;
    this.attempt = 0;
    this.lostFired = false;
    if (this.lostTimer) clearTimeout(this.lostTimer);
    this.lostTimer = null;
    this.setStatus("open");
    if (this.conn?.transport === "websocket") {
      this.startPings();
      for (const state of this.rooms.values()) if (!state.failed) this.scheduleJoin(state);
    } else if (this.conn?.transport === "sse" && this.liveRoomNames() !== this.streamRooms) {
      this.reopenStream(); // rooms were joined or left while the stream was opening
    }
  }

  private liveRoomNames(): string {
    return [...this.rooms.values()].filter((s) => !s.failed).map((s) => s.name).join(",");
  }

  private disconnected(): void {
    this.isOpen = false;
    this.stopPings();
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    if (this.joinTimer) clearTimeout(this.joinTimer);
    this.joinTimer = null;
    this.joinQueue = [];
    for (const state of this.rooms.values()) {
      state.joined = false;
      state.joinRef = null;
      this.stopTyping(state, false);
    }
    if (!this.lostTimer && !this.lostFired && !this.closed) {
      this.lostTimer = setTimeout(() => {
        this.lostTimer = null;
        this.lostFired = true;
        this.emitter.emit("lost");
      }, this.opts.lostConnectionTimeout);
    }
  }

  private scheduleReconnect(minDelay: number, immediate = false): void {
    if (this.closed) return;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    if (this._status !== "offline") this.setStatus(this.everOpen ? "reconnecting" : "connecting");
    const delay = immediate ? 0 : Math.max(minDelay, backoffDelay(this.attempt, this.opts.backoff));
    this.attempt += 1;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      void this.open();
    }, delay);
  }

  /** Drops the current connection (it is dead or being replaced) and reconnects. */
  private reconnectNow(): void {
    const conn = this.conn;
    this.conn = null;
    this.generation++;
    conn?.close();
    this.disconnected();
    this.scheduleReconnect(0, true);
  }

  private scheduleRefresh(expiresAt: number): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    if (!Number.isFinite(expiresAt)) return;
    const delay = refreshDelay(expiresAt, this.tokenIssuedAt || Date.now(), Date.now());
    this.refreshTimer = setTimeout(() => void this.refresh(), delay);
  }

  private scheduleRefreshRetry(): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => void this.refresh(), 2_000);
  }

  /** Fetches a new token ahead of expiry and hands it to the relay in band. */
  private async refresh(): Promise<void> {
    this.refreshTimer = null;
    const conn = this.conn;
    if (!conn || this.closed) return;
    this.forceNewToken = true;
    let token: string;
    try {
      token = await this.freshToken();
    } catch (err) {
      this.emitter.emit("error", err);
      if (this.conn === conn) this.scheduleRefreshRetry();
      return;
    }
    if (this.conn !== conn) return;
    if (conn.transport === "websocket") conn.send({ type: "auth", token, ref: "refresh" });
    else this.reconnectNow(); // the SSE token is in the URL: a new stream resumes by position
  }

  private startPings(): void {
    this.stopPings();
    this.pingTimer = setInterval(() => this.checkLiveness(), this.opts.pingInterval);
  }

  private stopPings(): void {
    if (this.pingTimer) clearInterval(this.pingTimer);
    if (this.pongTimer) clearTimeout(this.pongTimer);
    this.pingTimer = this.pongTimer = null;
    this.pendingPing = null;
  }

  /** Anything from the relay proves the socket alive. */
  private alive(): void {
    if (this.pongTimer) clearTimeout(this.pongTimer);
    this.pongTimer = null;
    this.pendingPing = null;
  }

  /** Pings now; no answer within `pongTimeout` means the socket is half-open: reconnect. */
  checkLiveness(): void {
    const conn = this.conn;
    if (!conn || conn.transport !== "websocket" || !this.isOpen || this.pongTimer) return;
    const ref = this.nextRef("p");
    this.pendingPing = ref;
    conn.send({ type: "ping", ref });
    this.pongTimer = setTimeout(() => {
      this.pongTimer = null;
      if (this.conn === conn) this.reconnectNow();
    }, this.opts.pongTimeout);
  }

  /** The browser's `online`/`offline`/`visibilitychange`: check at once instead of waiting for
   * the next ping (timers in background tabs are throttled, sleeping laptops run none). */
  private watchEnvironment(): void {
    const w = globalThis as unknown as {
      addEventListener?: (n: string, f: () => void) => void;
      removeEventListener?: (n: string, f: () => void) => void;
      document?: { visibilityState?: string; addEventListener?: (n: string, f: () => void) => void; removeEventListener?: (n: string, f: () => void) => void };
    };
    if (typeof w.addEventListener !== "function" || !w.document) return;
    const wake = () => {
      if (this.closed) return;
      if (this.isOpen) {
        this.checkLiveness();
        if (this.token && !tokenUsable(this.token, Date.now() + 5_000)) void this.refresh();
      } else if (this.retryTimer) {
        this.attempt = 0;
        this.scheduleReconnect(0, true);
      }
    };
    const online = () => {
      if (this._status === "offline") this.setStatus(this.isOpen ? "open" : "reconnecting");
      wake();
    };
    const offline = () => {
      if (this.closed) return;
      this.setStatus("offline");
      this.checkLiveness();
    };
    const visible = () => {
      if (w.document?.visibilityState === "visible") wake();
    };
    w.addEventListener("online", online);
    w.addEventListener("offline", offline);
    w.document.addEventListener?.("visibilitychange", visible);
    this.removeWindowListeners = () => {
      w.removeEventListener?.("online", online);
      w.removeEventListener?.("offline", offline);
      w.document?.removeEventListener?.("visibilitychange", visible);
    };
  }

  private setStatus(status: Status): void {
    if (this._status === status) return;
    this._status = status;
    this.emitter.emit("status", status);
  }

  private clearTimers(): void {
    for (const t of [this.retryTimer, this.refreshTimer, this.pongTimer, this.lostTimer, this.joinTimer, this.reopenTimer]) if (t) clearTimeout(t);
    if (this.pingTimer) clearInterval(this.pingTimer);
    this.retryTimer = this.refreshTimer = this.pongTimer = this.lostTimer = this.joinTimer = this.pingTimer = this.reopenTimer = null;
  }

  private stopTyping(state: RoomState, send: boolean): void {
    if (state.typingStop) clearTimeout(state.typingStop);
    state.typingStop = null;
    const wasTyping = state.typingSince > 0;
    state.typingSince = 0;
    if (send && wasTyping && this.conn?.transport === "websocket" && state.joined) {
      this.conn.send({ type: "typing", room: state.name, typing: false });
    }
  }

  // ---- SSE ----

  /** Opens `/sse` for every room at once with fetch (which, unlike `EventSource`, shows the HTTP
   * status: 403 forbidden, 401 expired). The token goes in the URL (a header would need a CORS
   * preflight), and so does the stream's last position: a new stream resumes where the last
   * one ended. */
  private openStream(generation: number, token: string): void {
    const live = [...this.rooms.values()].filter((s) => !s.failed);
    this.streamRooms = this.liveRoomNames();
    const controller = new AbortController();
    const conn: Connection = { transport: "sse", send: () => {}, close: () => controller.abort() };
    this.conn = conn;
    if (live.length === 0) {
      // Nothing to stream yet: an SSE "connection" is open as soon as there is a room.
      this.connected();
      return;
    }
    const since = this.streamPosition ?? live.map((s) => s.position).find((p) => p !== null) ?? undefined;
    const params = new URLSearchParams({ rooms: live.map((s) => s.name).join(","), token });
    if (since) params.set("since", since);
    for (const s of live) s.sentSince = since ?? undefined;
    const url = `${this.httpUrl}/sse?${params}`;
    const finish = (retry: boolean, minDelay = 0) => {
      if (generation !== this.generation) return;
      this.conn = null;
      this.disconnected();
      if (retry) this.scheduleReconnect(minDelay);
    };
    void (async () => {
      let response: Response;
      try {
        const headers: Record<string, string> = { accept: "text/event-stream" };
        // Last-Event-ID too where it costs no CORS preflight (same origin, or not a browser):
        // relays that predate the `since` parameter resume from it.
        const loc = (globalThis as { location?: { origin?: string } }).location;
        if (since && (!loc?.origin || new URL(url).origin === loc.origin)) headers["last-event-id"] = since;
        response = await this.fetchFn!(url, { headers, cache: "no-store", signal: controller.signal });
      } catch {
        return finish(true);
      }
      if (generation !== this.generation) return;
      if (!response.ok) {
        let body: { code?: ErrorCode; message?: string } = {};
        try {
          body = (await response.json()) as typeof body;
        } catch {
          /* no JSON body */
        }
        if (response.status === 401) {
          this.forceNewToken = true;
          return finish(true);
        }
        if (response.status === 403 || response.status === 400) {
          // One refused room refuses the stream: fail the room named (or all not yet joined).
          const named = live.find((s) => body.message?.includes(s.name));
          for (const s of named ? [named] : live.filter((x) => !x.readySettled)) {
            this.failRoom(s, new PgrelayError(body.code ?? "forbidden", body.message ?? `HTTP ${response.status}`), true);
          }
          if (!named && live.every((s) => s.readySettled)) return finish(true); // nothing to learn: retry
          return finish(true, 0);
        }
        return finish(true, response.status === 429 ? this.opts.rateLimitedDelay : 0);
      }
      this.connected();
      const exp = tokenExpiry(token);
      if (exp !== null) this.scheduleRefresh(exp);
      try {
        await readEventStream(response, (name, data) => {
          if (generation !== this.generation) return;
          this.alive();
          let message: ServerMessage;
          try {
            message = JSON.parse(data) as ServerMessage;
          } catch {
            return;
          }
          if (name === "message" || name === message.type) this.onMessage(message);
        });
      } catch {
        /* the stream broke: reconnect below */
      }
      finish(true);
    })();
  }

  /** The SSE stream's rooms changed, or its token: a new stream, resuming by position. */
  private reopenStream(): void {
    if (this.conn?.transport !== "sse" || this.reopenTimer) return;
    // Coalesced: joining three rooms in one tick opens one stream, not three.
    this.reopenTimer = setTimeout(() => {
      this.reopenTimer = null;
      if (this.conn?.transport === "sse" && this.liveRoomNames() !== this.streamRooms) this.reconnectNow();
    }, 0);
  }
}

/** Parses a `text/event-stream` body, calling `onEvent(name, data)` per message. */
export async function readEventStream(response: Response, onEvent: (name: string, data: string) => void): Promise<void> {
  const body = response.body;
  if (!body) return;
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let name = "message";
  let data: string[] = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let nl: number;
    while ((nl = buffer.search(/\r\n|\n|\r/)) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + (buffer[nl] === "\r" && buffer[nl + 1] === "\n" ? 2 : 1));
      if (line === "") {
        if (data.length > 0) onEvent(name, data.join("\n"));
        name = "message";
        data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = value;
        else if (field === "data") data.push(value);
      }
    }
  }
}

/** Creates a client; it connects at once (unless `autoConnect: false`). */
export function createClient(url: string, options: ClientOptions): PgrelayClient {
  return new PgrelayClient(url, options);
}

export type { PresenceMeta, PresenceUsers };
