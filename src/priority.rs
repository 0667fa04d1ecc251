//! Priority classes for work waiting on a backend: finishing what has started (commits) first,
//! whole-table analytics last. Pure; derived from the classification and the statement text.

use crate::classify::{Access, Classification, TxEffect};
use crate::pool::queue::Class;

/// Rows a `LIMIT` may name and still count as a point read.
const POINT_LIMIT: u64 = 100;

/// The class of a request. `in_transaction`: it runs inside an explicit transaction.
pub fn class_of(c: &Classification, sql: Option<&str>, in_transaction: bool) -> Class {
    if let Some(hint) = c.hints.priority.as_deref() {
        match hint.to_ascii_lowercase().as_str() {
            "commit" => return Class::Commit,
            "write" => return Class::Write,
            "point_read" => return Class::PointRead,
            "read" => return Class::Read,
            "analytic" => return Class::Analytic,
            _ => {}
        }
    }
    match c.tx {
        TxEffect::Commit | TxEffect::Rollback => return Class::Commit,
        TxEffect::Begin { read_only: false } => return Class::Write,
        _ => {}
    }
    if c.access == Access::Write {
        // An autocommit statement commits on its own: finishing it frees locks at once.
        return if in_transaction || c.statements > 1 {
            Class::Write
        } else {
            Class::Commit
        };
    }
    if in_transaction {
        return Class::Write;
    }
    match sql {
        Some(text) => read_class(text),
        None => Class::Read,
    }
}

/// Point read, read or analytic, from the shape of the text (a cheap heuristic: the parse tree
/// is not kept on the hot path). One pass over the words, without allocating.
fn read_class(sql: &str) -> Class {
    const AGGREGATES: [&[u8]; 7] = [
        b"count",
        b"sum",
        b"avg",
        b"min",
        b"max",
        b"string_agg",
        b"array_agg",
    ];
    let b = sql.as_bytes();
    let (mut aggregates, mut filtered, mut grouped, mut joined, mut equality) =
        (false, false, false, false, false);
    let mut limit = None;
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if !(c.is_ascii_alphabetic() || c == b'_') {
            equality |= c == b'=';
            i += 1;
            continue;
        }
        let start = i;
        while b
            .get(i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
        {
            i += 1;
        }
        let word = &b[start..i];
        let is = |w: &[u8]| word.eq_ignore_ascii_case(w);
        if is(b"where") {
            filtered = true;
        } else if is(b"group") {
            grouped = true;
        } else if is(b"join") {
            joined = true;
        } else if is(b"limit") {
            // The last LIMIT counts; one without a literal count (`LIMIT $1`) is unknown.
            let rest = &b[i..];
            let digits = rest.trim_ascii_start();
            let n = digits.iter().take_while(|c| c.is_ascii_digit()).count();
            limit = std::str::from_utf8(&digits[..n])
                .ok()
                .and_then(|d| d.parse::<u64>().ok());
        } else if b.get(i) == Some(&b'(') && AGGREGATES.iter().any(|a| is(a)) {
            aggregates = true;
        }
    }
    if (aggregates || grouped) && !filtered {
        return Class::Analytic;
    }
    if let Some(n) = limit
        && n <= POINT_LIMIT
        && !grouped
    {
        return Class::PointRead;
    }
    if filtered && equality && !aggregates && !grouped && !joined {
        return Class::PointRead;
    }
    Class::Read
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{FunctionCatalog, classify};

    fn class(sql: &str, in_tx: bool) -> Class {
        let cat = FunctionCatalog::from_pg_proc(
            [("count", 'i'), ("sum", 'i'), ("now", 's')]
                .iter()
                .map(|(n, v)| (n.to_string(), *v)),
            &[],
            &[],
        );
        class_of(&classify(sql, &cat), Some(sql), in_tx)
    }

    #[test]
    fn table() {
        let cases = [
            ("COMMIT", false, Class::Commit),
            ("ROLLBACK", true, Class::Commit),
            ("INSERT INTO t VALUES (1)", false, Class::Commit),
            ("INSERT INTO t VALUES (1)", true, Class::Write),
            ("UPDATE t SET a = 1 WHERE id = 2", false, Class::Commit),
            ("BEGIN", false, Class::Write),
            ("SELECT * FROM t WHERE id = 1", true, Class::Write),
            ("SELECT * FROM t WHERE id = $1", false, Class::PointRead),
            (
                "SELECT * FROM t ORDER BY id LIMIT 10",
                false,
                Class::PointRead,
            ),
            ("SELECT * FROM t ORDER BY id LIMIT 5000", false, Class::Read),
            ("SELECT * FROM t WHERE a > 5", false, Class::Read),
            ("SELECT count(*) FROM t", false, Class::Analytic),
            ("SELECT a, sum(b) FROM t GROUP BY a", false, Class::Analytic),
            ("SELECT count(*) FROM t WHERE a = 1", false, Class::Read),
            (
                "/* causeway:priority=analytic */ SELECT * FROM t WHERE id = 1",
                false,
                Class::Analytic,
            ),
            (
                "/* causeway:priority=commit */ SELECT 1",
                false,
                Class::Commit,
            ),
            ("SELECT * FROM t", false, Class::Read),
            ("SELECT * FROM wherever", false, Class::Read),
            ("select COUNT(*) from t", false, Class::Analytic),
            ("SELECT * FROM t LIMIT $1", false, Class::Read),
            ("SELECT * FROM t LIMIT 5000 OFFSET 10", false, Class::Read),
            (
                "SELECT * FROM t WHERE id = 1 LIMIT\n 1",
                false,
                Class::PointRead,
            ),
            (
                "SELECT * FROM a JOIN b ON a.id = b.id WHERE a.k = 1",
                false,
                Class::Read,
            ),
        ];
        for (sql, in_tx, want) in cases {
            assert_eq!(class(sql, in_tx), want, "{sql} (in transaction: {in_tx})");
        }
    }
}
