//! Capture: from committed rows to an ordered stream of changes.
//!
//! The triggers of `sql/pgrelay.sql` do the writing side inside the application's transactions.
//! This module is the reading side: [`listener`] turns `NOTIFY` into wake-ups (which writers send
//! only while a relay sleeps: [`wakeup`]), [`reader`] reads
//! [`outbox`] batches between two snapshots and hands them on, and [`position`] names a point in
//! that stream so a client can come back to it ([`seal`] makes it opaque and unforgeable). [`changed`] works out what an UPDATE changed;
//! [`retention`] keeps the outbox from growing.

pub mod changed;
pub mod listener;
pub mod outbox;
pub mod position;
pub mod reader;
pub mod retention;
pub mod seal;
pub mod wakeup;
