// The wire messages of pgrelay's WebSocket protocol (docs/protocol.md), as TypeScript types.
// They mirror docs/protocol.schema.json; test/unit/schema.test.js checks that the two agree, so
// a field added to one and not the other fails the tests.

/** An opaque, sealed resume position issued by the relay (an event `id`, `joined.position`, or
 * the result of `pgrelay.position()` in SQL). */
export type Position = string;

/** A presence meta: what a connection set with `setPresence`, plus the relay's `conn_id`. */
export interface PresenceMeta {
  conn_id: string;
  [key: string]: unknown;
}

/** User id → one meta per connection of that user in the room. */
export type PresenceUsers = Record<string, PresenceMeta[]>;

export type ErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "not_joined"
  | "rate_limited"
  | "too_many_rooms"
  | "internal";

// ---- client → relay ----

export interface AuthMessage { type: "auth"; token: string; ref?: string }
export interface JoinMessage { type: "join"; room: string; since?: Position; ref?: string }
export interface LeaveMessage { type: "leave"; room: string; ref?: string }
export interface PresenceMessage { type: "presence"; room: string; meta: Record<string, unknown>; ref?: string }
export interface TypingMessage { type: "typing"; room: string; typing: boolean; ref?: string }
export interface PingMessage { type: "ping"; ref?: string }
export interface SyncMessage { type: "sync"; room: string; position: Position; ref?: string }

export type ClientMessage =
  | AuthMessage
  | JoinMessage
  | LeaveMessage
  | PresenceMessage
  | TypingMessage
  | PingMessage
  | SyncMessage;

// ---- relay → client ----

export interface ReadyMessage { type: "ready"; user: string; expires_at: string; ref?: string }
export interface JoinedMessage {
  type: "joined";
  room: string;
  position: Position;
  /** Present when the join had `since`: true = every missed event follows, false = refetch. */
  recovered?: boolean;
  ref?: string;
}
export interface LeftMessage { type: "left"; room: string; reason: string; ref?: string }
export interface EventMessage<Row = Record<string, unknown>> {
  type: "event";
  room: string;
  id: Position;
  event: string;
  table: string;
  op: "INSERT" | "UPDATE" | "DELETE";
  row: Row;
  old?: Partial<Row>;
  truncated?: boolean;
  ts: string;
}
export interface PresenceStateMessage { type: "presence_state"; room: string; users: PresenceUsers }
export interface PresenceDiffMessage {
  type: "presence_diff";
  room: string;
  joins: PresenceUsers;
  leaves: PresenceUsers;
}
export interface TypingNotice { type: "typing"; room: string; user: string; typing: boolean }
export interface PongMessage { type: "pong"; ref?: string }
export interface SyncedMessage { type: "synced"; room: string; position: Position; ref?: string }
export interface ErrorMessage { type: "error"; code: ErrorCode; message: string; ref?: string }

export type ServerMessage =
  | ReadyMessage
  | JoinedMessage
  | LeftMessage
  | EventMessage
  | PresenceStateMessage
  | PresenceDiffMessage
  | TypingNotice
  | PongMessage
  | SyncedMessage
  | ErrorMessage;
