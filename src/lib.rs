//! pgrelay: Postgres changes, authorized per user, delivered to WebSocket rooms in commit order.
//!
//! The modules follow a change from the database to the browser; each imports only the ones
//! before it (and the shared vocabulary: [`protocol`], [`jwt`], [`metrics`], [`config`], [`backoff`]):
//!
//! 1. [`capture`]: triggers (in `sql/`) write each change to an outbox table and `NOTIFY`; the
//!    [`capture::listener`] wakes the [`capture::reader`], which reads the outbox by transaction
//!    snapshots, so changes come out exactly once and in commit order, and hands them on in
//!    chunks to a [`capture::reader::Consumer`].
//! 2. [`pipeline`]: the relay's consumer. [`authorize`]: SQL policy functions decide, in one
//!    batched query, which of the users in a change's rooms may read it; [`fanout`] turns the
//!    answers into frames for the members of [`rooms`] (who is in which room); [`recheck`]
//!    removes members who lost access to a room.
//! 3. [`queue`]: each client's send queue, bounded in bytes.
//! 4. [`transport`]: the edges that drain the queues, WebSocket sessions and SSE streams.
//!
//! [`resume`] gives a returning client what it missed; [`subscribe`] is the join both transports use.
//! [`presence`] (who is in a room, who is typing) runs beside the change path, never on it.
//!
//! [`server`] wires them together; [`db`] makes connections (TLS) and holds the embedded Postgres
//! and migrations; [`jwt`] verifies tokens, with keys from [`jwks`] URLs among others.

pub mod authorize;
pub mod backoff;
pub mod capture;
pub mod config;
pub mod db;
pub mod demo;
pub mod fanout;
pub mod history;
pub mod jwks;
pub mod jwt;
pub mod metrics;
pub mod open_files;
pub mod pipeline;
pub mod presence;
pub mod protocol;
pub mod queue;
pub mod recheck;
pub mod resume;
pub mod rooms;
pub mod server;
pub mod status;
pub mod subscribe;
pub mod sync;
pub mod transport;
