// A WebSocket stand-in that records what the client sends and lets a test play the relay.
export class FakeSocket {
  static all = [];
  static reset() {
    FakeSocket.all = [];
  }
  static get last() {
    return FakeSocket.all[FakeSocket.all.length - 1];
  }
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code, reason) {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }
  // ---- the relay's side ----
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  receive(message) {
    this.onmessage?.({ data: JSON.stringify(message) });
  }
  drop(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  sentOf(type) {
    return this.sent.filter((m) => m.type === type);
  }
  /** Opens, answers auth with ready. */
  accept(expiresInMs = 3_600_000) {
    this.open();
    const auth = this.sent.find((m) => m.type === "auth");
    this.receive({ type: "ready", user: "u1", expires_at: new Date(Date.now() + expiresInMs).toISOString(), ref: auth?.ref });
  }
}

/** An unsigned JWT whose `exp` is `expMs` (the client only reads `exp`). */
export function jwt(expMs, sub = "u1") {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256" })}.${b64({ sub, exp: Math.floor(expMs / 1000) })}.sig`;
}

export const tick = () => new Promise((r) => setImmediate(r));
