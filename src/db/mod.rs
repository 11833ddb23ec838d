//! Database plumbing that is not part of the data path: installing the SQL, the settings the
//! relay's connections start with, and the embedded Postgres used when no `DATABASE_URL` is given.

pub mod embedded;
pub mod migrate;
pub mod settings;
