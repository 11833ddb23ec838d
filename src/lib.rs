//! pgrelay: Postgres changes, authorized per user, delivered to WebSocket rooms in commit order.
//!
//! The modules follow a change from the database to the browser:
//!
//! 1. [`capture`]: triggers (in `sql/`) write each change to an outbox table and `NOTIFY`; the
//!    [`capture::listener`] wakes the [`capture::reader`], which reads the outbox by transaction
//!    snapshots, so changes come out exactly once and in commit order.
//! 2. [`authorize`]: SQL policy functions decide, in one batched query, which of the users in a
//!    change's rooms may read it.
//! 3. [`fanout`] and [`rooms`]: who is in which room, and the frames each of them receives.
//! 4. [`transport`]: WebSocket sessions, each with a send queue bounded in bytes.
//!
//! [`resume`] gives a returning client what it missed; [`subscribe`] is the join both transports use.
//! [`presence`] (who is in a room, who is typing) runs beside the change path, never on it.
//!
//! [`server`] wires them together; [`db`] holds the embedded Postgres and migrations.

pub mod authorize;
pub mod capture;
pub mod config;
pub mod db;
pub mod fanout;
pub mod history;
pub mod jwt;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod resume;
pub mod rooms;
pub mod server;
pub mod status;
pub mod subscribe;
pub mod transport;
