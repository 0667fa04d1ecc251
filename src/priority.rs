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
/// is not kept on the hot path).
fn read_class(sql: &str) -> Class {
    let lower = sql.to_ascii_lowercase();
    let has = |w: &str| contains_word(&lower, w);
    let aggregates = [
        "count(",
        "sum(",
        "avg(",
        "min(",
        "max(",
        "string_agg(",
        "array_agg(",
    ]
    .iter()
    .any(|f| lower.contains(f));
    let filtered = has("where");
    if (aggregates || has("group")) && !filtered {
        return Class::Analytic;
    }
    if let Some(n) = limit_of(&lower)
        && n <= POINT_LIMIT
        && !has("group")
    {
        return Class::PointRead;
    }
    if filtered && lower.contains('=') && !aggregates && !has("group") && !has("join") {
        return Class::PointRead;
    }
    Class::Read
}

fn contains_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        let boundary = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
        boundary(before) && boundary(after)
    })
}

fn limit_of(lower: &str) -> Option<u64> {
    let (_, rest) = lower.rsplit_once("limit")?;
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
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
        ];
        for (sql, in_tx, want) in cases {
            assert_eq!(class(sql, in_tx), want, "{sql} (in transaction: {in_tx})");
        }
    }
}
