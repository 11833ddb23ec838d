//! An UPDATE's `old`: the previous values of the columns that changed.
//!
//! The capture records the whole old row and the outbox read (`pgrelay.read_batch`) ships it as
//! it is, minus the columns clients never see. Reducing it to the changed columns is done here,
//! in the relay, because in SQL (`jsonb_each` over the old row) it was about 40% of what the read
//! cost its Postgres backend, which shares the CPU with every writer.
//!
//! The result must be what `pgrelay.batch()` and `pgrelay.changes_between()` compute in SQL, byte
//! for byte, so clients cannot tell the two apart:
//!
//! - a column is in `old` when the new row lacks it or holds a value that is not equal as jsonb
//!   (`IS DISTINCT FROM`). jsonb's equality is structural, with numbers compared as numerics:
//!   `1.0` equals `1.00`. (The capture still records a `1.0` → `1.00` rewrite, because it compares
//!   rows byte for byte; such an UPDATE reaches clients with an `old` that lacks that column.)
//! - `old` keeps the old row's column order (jsonb's own: shorter names first) and jsonb's text
//!   format (`{"a": 1, "b": 2}`), with each value's text as Postgres wrote it.
//!
//! Both inputs are jsonb's text output, which writes every value in one canonical way except
//! numbers (`1.0` and `1.00` are different texts of equal numerics): objects list their keys in
//! jsonb's order without duplicates, strings escape the same characters the same way. So two
//! values are equal as jsonb exactly when their texts match token by token, numbers compared by
//! value.

use std::borrow::Cow;
use std::fmt;

use anyhow::Context;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The columns of `old` (a whole row) whose values differ from those in `row`, as a JSON object.
/// Errors only when either text is not a JSON object.
pub fn changed_columns(row: &str, old: &str) -> anyhow::Result<Box<RawValue>> {
    let new: Members =
        serde_json::from_str(row).context("the outbox's row is not a JSON object")?;
    let old: Members =
        serde_json::from_str(old).context("the outbox's old row is not a JSON object")?;
    let mut out = String::with_capacity(64);
    out.push('{');
    // Both rows of one UPDATE have the same columns in the same (jsonb's) order, so the column at
    // the next position is almost always the one sought; the search is for anything else.
    let mut next = 0;
    for (key, value) in &old.0 {
        let at = match new.0.get(next) {
            Some((k, _)) if k == key => Some(next),
            _ => new.0.iter().position(|(k, _)| k == key),
        };
        if let Some(at) = at {
            next = at + 1;
            if equal(new.0[at].1.get(), value.get()) {
                continue;
            }
        }
        if out.len() > 1 {
            out.push_str(", ");
        }
        // serde_json escapes a string exactly as Postgres' jsonb output does (`"`, `\`, and
        // control characters, as \n, \t, ... or \u00xx).
        out.push_str(&serde_json::to_string(key.as_ref()).context("writing a column name")?);
        out.push_str(": ");
        out.push_str(value.get());
    }
    out.push('}');
    RawValue::from_string(out).context("the changed columns are not JSON")
}

/// Whether two JSON texts written by Postgres' jsonb output are equal as jsonb.
fn equal(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let (mut a, mut b) = (Tokens::new(a), Tokens::new(b));
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(Token::Number(x)), Some(Token::Number(y))) => {
                if !numbers_equal(x, y) {
                    return false;
                }
            }
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Token<'a> {
    /// `{ } [ ] : ,`
    Punct(u8),
    /// A string's text between its quotes, escapes as written.
    Str(&'a [u8]),
    Number(&'a [u8]),
    /// `true`, `false`, `null`.
    Word(&'a [u8]),
}

/// The tokens of a JSON text (already known to be valid JSON: serde_json parsed it).
struct Tokens<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Tokens<'a> {
    fn new(text: &'a str) -> Tokens<'a> {
        Tokens {
            text: text.as_bytes(),
            at: 0,
        }
    }

    fn take_while(&mut self, start: usize, more: impl Fn(u8) -> bool) -> &'a [u8] {
        let text = self.text;
        let mut end = start;
        while end < text.len() && more(text[end]) {
            end += 1;
        }
        self.at = end;
        &text[start..end]
    }
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let text = self.text;
        while self.at < text.len() && text[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
        let start = self.at;
        let first = *text.get(start)?;
        Some(match first {
            b'{' | b'}' | b'[' | b']' | b':' | b',' => {
                self.at += 1;
                Token::Punct(first)
            }
            b'"' => {
                // Up to the first quote that no backslash escapes.
                let mut end = start + 1;
                while end < text.len() && text[end] != b'"' {
                    end += if text[end] == b'\\' { 2 } else { 1 };
                }
                let end = end.min(text.len());
                self.at = (end + 1).min(text.len());
                Token::Str(&text[start + 1..end])
            }
            b'-' | b'0'..=b'9' => Token::Number(self.take_while(start, |b| {
                b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')
            })),
            b'a'..=b'z' => Token::Word(self.take_while(start, |b| b.is_ascii_alphabetic())),
            // Nothing else starts a token of valid JSON; compared as it is.
            _ => {
                self.at += 1;
                Token::Word(&text[start..=start])
            }
        })
    }
}

/// Whether two JSON numbers are equal as numerics: `1.0` = `1.00` = `1` = `10e-1`, `-0` = `0`.
fn numbers_equal(a: &[u8], b: &[u8]) -> bool {
    match (Decimal::parse(a), Decimal::parse(b)) {
        (Some(a), Some(b)) => a == b,
        // An exponent beyond i64, which Postgres never writes (numeric output has none): the
        // texts differ, so call them different. At worst a client sees an unchanged value.
        _ => false,
    }
}

/// A number as sign, significant digits (no leading or trailing zeros) and power of ten: the
/// value is `digits × 10^exponent`. Zero has no digits and no sign.
#[derive(PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: Vec<u8>,
    exponent: i64,
}

impl Decimal {
    fn parse(text: &[u8]) -> Option<Decimal> {
        let (negative, text) = match text.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, text),
        };
        let (mantissa, exponent) = match text.iter().position(|&b| b == b'e' || b == b'E') {
            Some(e) => {
                let written = std::str::from_utf8(&text[e + 1..]).ok()?;
                (&text[..e], written.parse::<i64>().ok()?)
            }
            None => (text, 0),
        };
        let (int, frac) = match mantissa.iter().position(|&b| b == b'.') {
            Some(dot) => (&mantissa[..dot], &mantissa[dot + 1..]),
            None => (mantissa, &[][..]),
        };
        let mut digits: Vec<u8> = int.iter().chain(frac).copied().collect();
        let mut exponent = exponent.checked_sub(i64::try_from(frac.len()).ok()?)?;
        while digits.last() == Some(&b'0') {
            digits.pop();
            exponent = exponent.checked_add(1)?;
        }
        let leading = digits.iter().take_while(|&&d| d == b'0').count();
        digits.drain(..leading);
        if digits.is_empty() {
            return Some(Decimal {
                negative: false,
                digits,
                exponent: 0,
            });
        }
        Some(Decimal {
            negative,
            digits,
            exponent,
        })
    }
}

/// A JSON object's members in their order, values as their raw text.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Members<'de>, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(Key(key)) = map.next_key()? {
                    members.push((key, map.next_value()?));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// A column name, borrowed from the text unless it holds escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a column name")
            }
            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }
            fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(row: &str, old: &str) -> String {
        changed_columns(row, old).expect("json").get().to_owned()
    }

    #[test]
    fn only_changed_columns_in_the_old_rows_order_and_jsonbs_format() {
        assert_eq!(
            changed(
                r#"{"id": 1, "title": "b", "status": "done", "priority": 2}"#,
                r#"{"id": 1, "title": "a", "status": "todo", "priority": 2}"#
            ),
            r#"{"title": "a", "status": "todo"}"#
        );
        assert_eq!(
            changed(r#"{"id": 1, "n": 2}"#, r#"{"id": 1, "n": 2}"#),
            "{}"
        );
        assert_eq!(changed("{}", "{}"), "{}");
    }

    #[test]
    fn nulls_are_values_like_any_other() {
        assert_eq!(
            changed(r#"{"a": null, "b": 1}"#, r#"{"a": 1, "b": null}"#),
            r#"{"a": 1, "b": null}"#
        );
        assert_eq!(changed(r#"{"a": null}"#, r#"{"a": null}"#), "{}");
    }

    #[test]
    fn numbers_compare_as_numerics() {
        assert_eq!(
            changed(
                r#"{"a": 1.00, "b": 100, "c": 0.0, "d": -1.5, "e": 2}"#,
                r#"{"a": 1.0, "b": 1e2, "c": -0, "d": -1.50, "e": 2.000000000000000000001}"#
            ),
            r#"{"e": 2.000000000000000000001}"#
        );
        // Beyond what a float holds.
        assert_eq!(
            changed(
                r#"{"a": 12345678901234567890.1}"#,
                r#"{"a": 12345678901234567890.2}"#
            ),
            r#"{"a": 12345678901234567890.2}"#
        );
        assert_eq!(changed(r#"{"a": 10}"#, r#"{"a": 1}"#), r#"{"a": 1}"#);
        assert_eq!(changed(r#"{"a": -1}"#, r#"{"a": 1}"#), r#"{"a": 1}"#);
        assert_eq!(changed(r#"{"a": 1}"#, r#"{"a": "1"}"#), r#"{"a": "1"}"#);
    }

    #[test]
    fn documents_compare_structurally_with_numbers_by_value() {
        assert_eq!(
            changed(
                r#"{"doc": {"n": [1.0, {"x": 2.50}], "s": "a"}}"#,
                r#"{"doc": {"n": [1, {"x": 2.5}], "s": "a"}}"#
            ),
            "{}"
        );
        assert_eq!(
            changed(r#"{"doc": [1, 2]}"#, r#"{"doc": [1, 2, 3]}"#),
            r#"{"doc": [1, 2, 3]}"#
        );
        assert_eq!(
            changed(r#"{"doc": {"a": 1}}"#, r#"{"doc": {"b": 1}}"#),
            r#"{"doc": {"b": 1}}"#
        );
        // Strings that hold quotes and backslashes are compared whole.
        assert_eq!(
            changed(r#"{"s": "a\"b\\"}"#, r#"{"s": "a\"b\\\""}"#),
            r#"{"s": "a\"b\\\""}"#
        );
        assert_eq!(
            changed(r#"{"s": "1.0"}"#, r#"{"s": "1.00"}"#),
            r#"{"s": "1.00"}"#
        );
    }

    #[test]
    fn names_that_need_escapes_are_written_as_postgres_writes_them() {
        assert_eq!(
            changed(r#"{"a\"b\n\u0001": 1}"#, r#"{"a\"b\n\u0001": 2}"#),
            r#"{"a\"b\n\u0001": 2}"#
        );
    }

    #[test]
    fn a_column_the_new_row_lacks_counts_as_changed() {
        // What SQL's `row -> key IS DISTINCT FROM value` says; and changes recorded by older
        // versions hold only the changed columns, which stay as they are.
        assert_eq!(
            changed(r#"{"a": 1, "c": 3}"#, r#"{"a": 1, "b": 2, "c": 4}"#),
            r#"{"b": 2, "c": 4}"#
        );
        assert_eq!(changed(r#"{"a": 1, "b": 5}"#, r#"{"b": 2}"#), r#"{"b": 2}"#);
    }

    #[test]
    fn rows_that_are_not_objects_are_errors() {
        assert!(changed_columns("[1]", "{}").is_err());
        assert!(changed_columns("{}", "null").is_err());
        assert!(changed_columns("{", "{}").is_err());
    }
}
