//! Database plumbing that is not part of the data path: installing the SQL, and the embedded
//! Postgres used when no `DATABASE_URL` is given.

pub mod embedded;
pub mod migrate;
