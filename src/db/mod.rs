//! Database plumbing that is not part of the data path: making connections (TLS included),
//! installing the SQL, and the embedded Postgres used when no `DATABASE_URL` is given.

pub mod connect;
pub mod embedded;
pub mod migrate;

pub use connect::Database;
