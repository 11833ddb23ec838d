//! Database plumbing that is not part of the data path: making connections (TLS included), the
//! settings the relay's connections start with, installing the SQL, and the embedded Postgres
//! used when no `DATABASE_URL` is given.

pub mod connect;
pub mod embedded;
pub mod migrate;
pub mod settings;

pub use connect::Database;
