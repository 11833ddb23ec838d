//! Reading the outbox (`pgrelay.changes`) batch by batch, in commit order.
//!
//! One statement takes a fresh snapshot `upto` and returns the changes committed between the
//! reader's last snapshot and it (`pgrelay.read_batch`, which explains why this never skips a
//! row). Rows are streamed, not collected, so a 100,000-row UPDATE is handed on in chunks. An
//! UPDATE arrives with its whole old row, which the relay reduces to the changed columns
//! ([`super::changed`]): it is cheaper here than on the database, whose CPU the writers share.
//!
//! A batch that fails half-way (the database went away) is read again with the *same* two
//! snapshots, which yields exactly the same changes in exactly the same order; the caller skips
//! what it already delivered. That is what makes a retry free of duplicates.

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::value::RawValue;
use tokio_postgres::{Client, RowStream, Statement};

use super::changed::changed_columns;
use super::position::Snapshot;

/// One captured row change, as stored by the triggers. Its `Debug` leaves out the row and the
/// old values: rows stay out of logs.
pub struct Change {
    pub id: i64,
    /// The writing transaction.
    pub xid: u64,
    /// The last change its transaction wrote: commit order is `(txn_last, id)` within a batch.
    pub txn_last: i64,
    pub table: String,
    /// Singular name for event names: `task` → `task_created`.
    pub entity: String,
    pub op: Op,
    pub rooms: Vec<String>,
    /// The new row (the old row for DELETE), as JSON text straight from Postgres.
    pub row: Box<RawValue>,
    /// UPDATE only: previous values of the changed columns (as `pgrelay.changes_between` gives them).
    pub old: Option<Box<RawValue>>,
    /// When the statement ran, ISO 8601.
    pub ts: String,
    /// The same, in microseconds since the Unix epoch (for the relay's latency metrics).
    pub ts_micros: i64,
    /// What authorization needs besides the row (see [`crate::authorize`]).
    pub policy: PolicyInputs,
    /// An event whose `row` and `old` together are longer than this is sent truncated (see
    /// [`crate::fanout::event_frame`]).
    pub max_event_bytes: usize,
    /// The table's primary key columns: what a truncated event keeps of the row.
    pub key_columns: Vec<String>,
    /// Not a row change but an invalidation (a `TRUNCATE`, a replaced function; see
    /// "Invalidations" in `sql/pgrelay.sql`): delivered to nobody, it makes the relay forget every
    /// remembered answer and re-check every room.
    pub control: bool,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Change")
            .field("id", &self.id)
            .field("xid", &self.xid)
            .field("table", &self.table)
            .field("op", &self.op)
            .field("rooms", &self.rooms)
            .field(
                "row",
                &format_args!("<{} bytes, redacted>", self.row.get().len()),
            )
            .field("ts", &self.ts)
            .finish_non_exhaustive()
    }
}

/// How a change's policy answers may be remembered (`pgrelay.read_batch` computes these from the full
/// row, hidden columns included).
#[derive(Debug, Default, Clone)]
pub struct PolicyInputs {
    /// The policy and the values of the columns it reads; `None`: judge every time.
    pub key: Option<String>,
    /// The same for the row before an UPDATE (when `knows_old`).
    pub key_old: Option<String>,
    /// An UPDATE that recorded previous values: the old version is judged too.
    pub knows_old: bool,
    /// Tables whose remembered answers this change may have made wrong.
    pub flush: Vec<String>,
    /// Kinds of rooms whose join policy reads this change's table: their members are re-checked.
    pub recheck: Vec<String>,
}

impl PolicyInputs {
    /// An UPDATE that left every column the policy reads as it was: whoever could not read the
    /// row before still cannot, for the same reasons.
    pub fn unchanged(&self) -> bool {
        self.knows_old && self.key.is_some() && self.key == self.key_old
    }
}

#[cfg(test)]
impl Change {
    /// A change of `tasks` with an empty row, for tests of what is decided from `policy` alone.
    pub fn of_policy(op: Op, policy: PolicyInputs) -> Change {
        Change {
            id: 1,
            xid: 1,
            txn_last: 1,
            table: "tasks".into(),
            entity: "task".into(),
            op,
            rooms: vec![],
            row: RawValue::from_string("{}".into()).expect("json"),
            old: None,
            ts: String::new(),
            ts_micros: 0,
            policy,
            max_event_bytes: 1 << 20,
            key_columns: vec!["id".into()],
            control: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Op> {
        match s {
            "INSERT" => Ok(Op::Insert),
            "UPDATE" => Ok(Op::Update),
            "DELETE" => Ok(Op::Delete),
            other => anyhow::bail!("unknown op {other:?} in pgrelay.changes"),
        }
    }
}

/// The columns of a change (of `pgrelay.read_batch()` as `c`), as [`change_from_row`] reads them
/// after the two every read starts with (a snapshot and the retention horizon). Every query whose
/// rows become changes selects them with this, so none can fall behind when a column is added.
macro_rules! change_columns {
    () => {
        r#"c.id, c.xid::text, c.txn_last, c.tbl, c.entity, c.op, c.rooms,
       c."row"::text, c.old::text, to_json(c.ts) #>> '{}',
       c.policy_key, c.policy_key_old, c.knows_old, c.flush, c.max_event_bytes, c.key_columns,
       c.recheck, c.control, (extract(epoch FROM c.ts) * 1000000)::int8"#
    };
}
pub(crate) use change_columns;

/// `$1` = since, `$2` = upto or NULL for "now", `$3` = only changes to these rooms, or NULL for
/// all. The snapshot comes first in every row so an empty batch still reports how far it read.
/// The `ORDER BY` is what puts the changes in commit order: `pgrelay.read_batch()` leaves them
/// unsorted, so that they are sorted once.
///
/// Prepare it once per connection ([`Batch::read`] takes the statement): planning the inlined
/// `pgrelay.read_batch()` costs about as much as running it, on every read.
pub const READ_BATCH: &str = concat!(
    "SELECT s.upto::text, (SELECT horizon FROM pgrelay.retention)::text, ",
    change_columns!(),
    r#"
FROM (SELECT coalesce($2::text::pg_snapshot, pg_current_snapshot()) AS upto) AS s
LEFT JOIN LATERAL (
    SELECT * FROM pgrelay.read_batch($1::text::pg_snapshot, s.upto) AS b
    WHERE $3::text[] IS NULL OR b.rooms && $3::text[]
) AS c ON true
ORDER BY c.txn_last, c.id
"#
);

/// The changes of one batch, streaming from the database.
pub struct Batch {
    pub since: Snapshot,
    pub upto: Snapshot,
    /// Retention's horizon when the batch was read: if `since` is older, changes after it may
    /// already have been removed (see `pgrelay.maintain()`).
    pub horizon: u64,
    first: Option<Change>,
    rows: std::pin::Pin<Box<RowStream>>,
    /// A finished `RowStream` must not be polled again (it would report a closed connection).
    done: bool,
    /// Changes streamed so far, kept or not.
    read: u64,
}

impl Batch {
    /// Whether retention may have removed changes of this batch before they were read.
    pub fn incomplete(&self) -> bool {
        self.since.xmin() < self.horizon
    }

    /// Starts reading the changes committed after `since`, up to `upto` or, when `None`, up to a
    /// snapshot taken now; only those published to one of `rooms`, when given.
    pub async fn read(
        client: &Client,
        statement: &Statement,
        since: &Snapshot,
        upto: Option<&Snapshot>,
        rooms: Option<&[&str]>,
    ) -> anyhow::Result<Batch> {
        let since_text = since.to_pg();
        let upto_text = upto.map(Snapshot::to_pg);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&since_text, &upto_text, &rooms];
        let rows = client
            .query_raw(statement, params)
            .await
            .context("reading the outbox")?;
        let mut rows = Box::pin(rows);
        let first = rows
            .next()
            .await
            .context("the outbox query returned no snapshot")?
            .context("reading the outbox")?;
        let upto = Snapshot::from_pg(first.try_get(0)?)
            .map_err(|_| anyhow::anyhow!("Postgres returned an unreadable snapshot"))?;
        let horizon: &str = first.try_get(1)?;
        Ok(Batch {
            horizon: horizon.parse().context("unreadable retention horizon")?,
            since: since.clone(),
            upto,
            first: change_from_row(&first)?,
            rows,
            done: false,
            read: 0,
        })
    }

    /// The next changes `keep` keeps, in commit order, read up to `max` at a time (a chunk it
    /// empties is skipped); `None` when the batch is done. Everything that walks a batch (the
    /// reader, a replay, `pgrelay tail`) walks it with this.
    pub async fn next_kept(
        &mut self,
        max: usize,
        mut keep: impl FnMut(&Change) -> bool,
    ) -> anyhow::Result<Option<Vec<Change>>> {
        loop {
            let mut chunk = self.next_chunk(max).await?;
            if chunk.is_empty() {
                return Ok(None);
            }
            self.read += chunk.len() as u64;
            chunk.retain(&mut keep);
            if !chunk.is_empty() {
                return Ok(Some(chunk));
            }
        }
    }

    /// How many changes were streamed so far, kept or not.
    pub fn changes_read(&self) -> u64 {
        self.read
    }

    /// The next up to `max` changes, in commit order; empty when the batch is done.
    pub async fn next_chunk(&mut self, max: usize) -> anyhow::Result<Vec<Change>> {
        let mut chunk = Vec::new();
        if let Some(first) = self.first.take() {
            chunk.push(first);
        }
        while chunk.len() < max && !self.done {
            match self.rows.next().await {
                None => self.done = true,
                Some(row) => {
                    if let Some(change) = change_from_row(&row.context("reading the outbox")?)? {
                        chunk.push(change);
                    }
                }
            }
        }
        Ok(chunk)
    }
}

/// One row of [`READ_BATCH`] (or a query with its columns) as a change; `None` for the row an
/// empty read returns.
pub fn change_from_row(row: &tokio_postgres::Row) -> anyhow::Result<Option<Change>> {
    let Some(id) = row.try_get::<_, Option<i64>>(2)? else {
        return Ok(None); // the empty side of the LEFT JOIN: nothing new
    };
    let json = |text: String| RawValue::from_string(text).context("outbox row is not JSON");
    let xid: &str = row.try_get(3)?;
    let new_row: String = row.try_get(9)?;
    // The whole old row (only shipped columns): `old` is what of it changed.
    let old = match row.try_get::<_, Option<&str>>(10)? {
        Some(old) => Some(
            changed_columns(&new_row, old)
                .with_context(|| format!("the old row of change {id}"))?,
        ),
        None => None,
    };
    Ok(Some(Change {
        id,
        xid: xid.parse().context("outbox xid is not a number")?,
        txn_last: row.try_get(4)?,
        table: row.try_get(5)?,
        entity: row.try_get(6)?,
        op: Op::parse(row.try_get(7)?)?,
        rooms: row.try_get(8)?,
        row: json(new_row)?,
        old,
        ts: row.try_get(11)?,
        policy: PolicyInputs {
            key: row.try_get(12)?,
            key_old: row.try_get(13)?,
            knows_old: row.try_get(14)?,
            flush: row.try_get(15)?,
            recheck: row.try_get(18)?,
        },
        max_event_bytes: usize::try_from(row.try_get::<_, i32>(16)?).unwrap_or(0),
        key_columns: row.try_get(17)?,
        control: row.try_get(19)?,
        ts_micros: row.try_get(20)?,
    }))
}

/// The database's current snapshot: where a reader that starts now begins.
pub async fn current_snapshot(client: &Client) -> anyhow::Result<Snapshot> {
    let row = client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .context("taking a snapshot")?;
    Snapshot::from_pg(row.try_get(0)?)
        .map_err(|_| anyhow::anyhow!("Postgres returned an unreadable snapshot"))
}
