//! Positions: where a reader is in the stream of committed changes.
//!
//! A Postgres snapshot (`xmin:xmax:xip,...`) tells, for every transaction, whether it had committed
//! when the snapshot was taken. That makes it a precise bookmark: "everything visible in this
//! snapshot has been seen". The relay reads the outbox in *batches* between two snapshots
//! (`since` → `upto`, see `pgrelay.changes_between`), so a position in the middle of a batch is the
//! batch plus the last change delivered from it:
//!
//! ```text
//!   <snapshot>                           everything committed as of the snapshot  (pgrelay.position())
//!   <since>~<upto>~<change id>           ... plus the part of batch since→upto up to that change
//! ```
//!
//! A snapshot is written as Postgres prints it with URL-safe separators (`.` for `:`, `_` for `,`):
//! the form logs and tests use. Positions carry no server state: any relay process, now or after
//! a restart, can interpret one.
//!
//! Clients only ever see positions sealed by [`PositionCodec`] (see [`super::seal`]): event ids,
//! `joined.position`, and `pgrelay.position()`, which seals in SQL. Plain positions would tell a
//! user how many changes and transactions happened between two of their events, including ones
//! they may not see, and would let anyone name a position pgrelay never issued.

use std::fmt;
use std::str::FromStr;

/// A transaction snapshot as returned by `pg_current_snapshot()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    /// Transactions in progress when the snapshot was taken (sorted, all in `xmin..xmax`).
    xip: Vec<u64>,
}

impl Snapshot {
    /// Parses Postgres' text form, `xmin:xmax:xip1,xip2`.
    pub fn from_pg(text: &str) -> Result<Snapshot, BadPosition> {
        Self::parse(text, ':', ',')
    }

    /// Postgres' text form, for binding as `$1::pg_snapshot`.
    pub fn to_pg(&self) -> String {
        self.write(':', ',')
    }

    fn parse(text: &str, sep: char, list_sep: char) -> Result<Snapshot, BadPosition> {
        let number = |s: &str| -> Result<u64, BadPosition> {
            // Digits only (no sign, no spaces): exactly what Postgres prints.
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(BadPosition);
            }
            s.parse().map_err(|_| BadPosition)
        };
        let parts: Vec<&str> = text.split(sep).collect();
        let [xmin, xmax, list] = parts.as_slice() else {
            return Err(BadPosition);
        };
        let (xmin, xmax) = (number(xmin)?, number(xmax)?);
        let xip = match *list {
            "" => Vec::new(),
            list => list
                .split(list_sep)
                .map(number)
                .collect::<Result<Vec<_>, _>>()?,
        };
        let in_range = xip.iter().all(|&x| xmin <= x && x < xmax);
        let sorted = xip.windows(2).all(|w| w[0] < w[1]);
        if xmin == 0 || xmin > xmax || !in_range || !sorted {
            return Err(BadPosition);
        }
        Ok(Snapshot { xmin, xmax, xip })
    }

    fn write(&self, sep: char, list_sep: char) -> String {
        let list: Vec<String> = self.xip.iter().map(u64::to_string).collect();
        format!(
            "{}{sep}{}{sep}{}",
            self.xmin,
            self.xmax,
            list.join(&list_sep.to_string())
        )
    }

    /// The oldest transaction still running when the snapshot was taken.
    pub fn xmin(&self) -> u64 {
        self.xmin
    }

    /// Whether a committed transaction was visible in the snapshot.
    pub fn is_visible(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }

    /// Whether every transaction visible in `other` is visible in `self` too.
    pub fn covers(&self, other: &Snapshot) -> bool {
        other.xmax <= self.xmax
            && self
                .xip
                .iter()
                .filter(|&&x| x < other.xmax)
                .all(|&x| !other.is_visible(x))
    }

    /// True when `later` could not have been taken before `self` (used to reject nonsense).
    pub fn precedes_or_equals(&self, later: &Snapshot) -> bool {
        self.xmin <= later.xmin && self.xmax <= later.xmax
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.write('.', '_'))
    }
}

/// A resume position: a batch boundary, or a change inside a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Position {
    /// Every change visible in this snapshot has been seen.
    At(Snapshot),
    /// Every change visible in `since`, and the changes of batch `since → upto` up to and
    /// including `change_id` in commit order.
    Within {
        since: Snapshot,
        upto: Snapshot,
        change_id: i64,
    },
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::At(snapshot) => write!(f, "{snapshot}"),
            Position::Within {
                since,
                upto,
                change_id,
            } => write!(f, "{since}~{upto}~{change_id}"),
        }
    }
}

/// What a client at some position has already seen, in terms a change can be checked against.
///
/// For [`Position::Within`] the relay looks up the commit-order key of the named change (see
/// `crate::resume`): changes of the batch `since → upto` up to that key count as seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub since: Snapshot,
    /// The batch end and the `(transaction's last change id, change id)` key reached in it.
    pub within: Option<(Snapshot, (i64, i64))>,
}

impl Seen {
    /// Whether a committed change (its transaction id and commit-order key) was already seen.
    pub fn contains(&self, xid: u64, key: (i64, i64)) -> bool {
        if self.since.is_visible(xid) {
            return true;
        }
        match &self.within {
            Some((upto, reached)) => upto.is_visible(xid) && key <= *reached,
            None => false,
        }
    }
}

/// A position that is not one pgrelay issued (garbage or tampered with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a valid position")]
pub struct BadPosition;

impl FromStr for Position {
    type Err = BadPosition;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_POSITION_TEXT {
            return Err(BadPosition);
        }
        let parts: Vec<&str> = s.split('~').collect();
        match parts.as_slice() {
            [snapshot] => Ok(Position::At(Snapshot::parse(snapshot, '.', '_')?)),
            [since, upto, id] => {
                let since = Snapshot::parse(since, '.', '_')?;
                let upto = Snapshot::parse(upto, '.', '_')?;
                let change_id = id.parse::<i64>().map_err(|_| BadPosition)?;
                if !since.precedes_or_equals(&upto) || change_id <= 0 {
                    return Err(BadPosition);
                }
                Ok(Position::Within {
                    since,
                    upto,
                    change_id,
                })
            }
            _ => Err(BadPosition),
        }
    }
}

pub use super::seal::PositionCodec;

/// Positions grow with the number of transactions in progress (a snapshot lists them); this is
/// far beyond any real one and still bounds the work a client can cause.
pub(crate) const MAX_POSITION_TEXT: usize = 1 << 20;

/// Compact binary form: a tag, then LEB128 varints (snapshots relative to their xmin). What is
/// sealed; `pgrelay.position()` writes the same bytes for a snapshot (tag 0) in SQL.
pub(crate) fn to_bytes(position: &Position) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    let snapshot = |out: &mut Vec<u8>, s: &Snapshot, base: u64| {
        varint(out, s.xmin - base);
        varint(out, s.xmax - s.xmin);
        varint(out, s.xip.len() as u64);
        for x in &s.xip {
            varint(out, x - s.xmin);
        }
    };
    match position {
        Position::At(s) => {
            out.push(0);
            snapshot(&mut out, s, 0);
        }
        Position::Within {
            since,
            upto,
            change_id,
        } => {
            out.push(1);
            snapshot(&mut out, since, 0);
            snapshot(&mut out, upto, since.xmin);
            varint(&mut out, *change_id as u64);
        }
    }
    out
}

pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Position, BadPosition> {
    let mut input = bytes;
    let snapshot = |input: &mut &[u8], base: u64| -> Result<Snapshot, BadPosition> {
        let xmin = base.checked_add(read_varint(input)?).ok_or(BadPosition)?;
        let xmax = xmin.checked_add(read_varint(input)?).ok_or(BadPosition)?;
        let n = read_varint(input)?;
        if n > 100_000 {
            return Err(BadPosition);
        }
        let xip = (0..n)
            .map(|_| read_varint(input).and_then(|d| xmin.checked_add(d).ok_or(BadPosition)))
            .collect::<Result<Vec<_>, _>>()?;
        // Validate exactly as the text form does.
        Snapshot::parse(&Snapshot { xmin, xmax, xip }.to_pg(), ':', ',')
    };
    let (&tag, rest) = input.split_first().ok_or(BadPosition)?;
    input = rest;
    let position = match tag {
        0 => Position::At(snapshot(&mut input, 0)?),
        1 => {
            let since = snapshot(&mut input, 0)?;
            let upto = snapshot(&mut input, since.xmin)?;
            let change_id = i64::try_from(read_varint(&mut input)?).map_err(|_| BadPosition)?;
            // Re-validate through the text form's rules.
            Position::Within {
                since,
                upto,
                change_id,
            }
            .to_string()
            .parse()?
        }
        _ => return Err(BadPosition),
    };
    if input.is_empty() {
        Ok(position)
    } else {
        Err(BadPosition)
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(input: &mut &[u8]) -> Result<u64, BadPosition> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first().ok_or(BadPosition)?;
        *input = rest;
        value |= u64::from(byte & 0x7f)
            .checked_shl(shift)
            .ok_or(BadPosition)?;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(BadPosition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips_through_both_forms() {
        let s = Snapshot::from_pg("100:105:100,103").expect("valid snapshot");
        assert_eq!(s.to_pg(), "100:105:100,103");
        assert_eq!(s.to_string(), "100.105.100_103");
        let empty = Snapshot::from_pg("7:7:").expect("valid snapshot");
        assert_eq!(empty.to_string(), "7.7.");
    }

    #[test]
    fn visibility_follows_postgres_rules() {
        let s = Snapshot::from_pg("100:105:100,103").expect("valid");
        assert!(s.is_visible(99), "below xmin: committed before");
        assert!(!s.is_visible(100), "in progress");
        assert!(s.is_visible(101));
        assert!(!s.is_visible(103), "in progress");
        assert!(s.is_visible(104));
        assert!(!s.is_visible(105), "at or above xmax: started after");
    }

    #[test]
    fn covering_means_seeing_at_least_as_much() {
        let s = |t: &str| Snapshot::from_pg(t).expect("valid");
        assert!(s("10:20:").covers(&s("10:15:12")));
        assert!(s("10:20:12").covers(&s("10:15:12")), "12 is unseen in both");
        assert!(
            !s("10:20:13").covers(&s("10:15:12")),
            "13 is visible in the other only"
        );
        assert!(!s("10:15:").covers(&s("10:20:")), "the other saw 15..20");
        assert!(s("10:15:").covers(&s("10:15:")));
    }

    #[test]
    fn seen_covers_the_batch_prefix_only() {
        let since = Snapshot::from_pg("10:12:10").expect("valid");
        let upto = Snapshot::from_pg("13:13:").expect("valid");
        let seen = Seen {
            since: since.clone(),
            within: Some((upto, (50, 48))),
        };
        assert!(seen.contains(11, (0, 1)), "visible in since");
        assert!(seen.contains(10, (50, 48)), "the change itself");
        assert!(seen.contains(12, (40, 40)), "earlier in the batch");
        assert!(
            !seen.contains(12, (50, 49)),
            "later in the same transaction"
        );
        assert!(!seen.contains(10, (60, 55)), "later in the batch");
        assert!(
            !seen.contains(13, (1, 1)),
            "after the batch, whatever its key"
        );
        assert!(!Seen {
            since,
            within: None
        }
        .contains(12, (0, 0)));
    }

    #[test]
    fn positions_round_trip() {
        for text in ["774.774.", "100.105.100_103~104.110.104~42"] {
            let p: Position = text.parse().expect("valid position");
            assert_eq!(p.to_string(), text);
        }
    }

    #[test]
    fn garbage_and_tampered_positions_are_rejected() {
        for text in [
            "",
            "abc",
            "1.2",
            "5.3.",                    // xmin > xmax
            "1.5.7",                   // in-progress xid outside the snapshot
            "1.9.5_3",                 // unsorted
            "1.5.~2.6.~0",             // change id must be positive
            "9.9.~1.1.~5",             // batch ends before it starts
            "1.5.~2.6.",               // missing change id
            "18446744073709551616.1.", // overflow
            "1.5.~2.6.~3~4",
            "0.0.",  // Postgres rejects xmin 0
            "+1.2.", // signs are not Postgres' output
            "1. 2.",
        ] {
            assert_eq!(text.parse::<Position>(), Err(BadPosition), "{text:?}");
        }
    }
}
