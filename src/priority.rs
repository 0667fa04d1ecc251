//! Priority classes for work waiting on a backend: finishing what has started (commits) first,
//! whole-table analytics last. Pure; derived from the classification and the statement text.

use crate::classify::{Access, Classification, TextTraits, TxEffect, traits};
use crate::pool::queue::Class;

/// Rows a `LIMIT` may name and still count as a point read.
const POINT_LIMIT: u64 = 100;

/// The class of a request. `in_transaction`: it runs inside an explicit transaction.
pub fn class_of(c: &Classification, sql: Option<&str>, in_transaction: bool) -> Class {
    if let Some(hint) = c.hints.priority.as_deref() {
        match hint.to_ascii_lowercase().as_str() {
            "commit" => return Class::Commit,
            "write" => return Class::Write,
            "point_read" | "point-read" => return Class::PointRead,
            "read" => return Class::Read,
            "analytic" => return Class::Analytic,
            _ => {}
        }
    }
    match c.tx {
        TxEffect::Commit | TxEffect::Rollback => return Class::Commit,
        TxEffect::Begin {
            read_only: false, ..
        } => return Class::Write,
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
    read_class(c.text, sql)
}

/// Point read, read or analytic, from the words of the statement (a cheap heuristic: the parse
/// tree is not kept on the hot path). The words were read once, with the classification; only
/// a `LIMIT`'s count is read from the text at hand, since it differs between texts of one shape.
fn read_class(t: TextTraits, sql: Option<&str>) -> Class {
    if (t.aggregate || t.grouped) && !t.filtered {
        return Class::Analytic;
    }
    if t.limit
        && !t.grouped
        && sql
            .and_then(traits::limit_count)
            .is_some_and(|n| n <= POINT_LIMIT)
    {
        return Class::PointRead;
    }
    if t.filtered && t.equality && !t.aggregate && !t.grouped && !t.joined {
        return Class::PointRead;
    }
    Class::Read
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{FunctionCatalog, classify};

    fn catalog() -> FunctionCatalog {
        FunctionCatalog::from_pg_proc(
            [("count", 'i'), ("sum", 'i'), ("now", 's')]
                .iter()
                .map(|(n, v)| (n.to_string(), *v)),
            &[],
            &[],
        )
    }

    fn class(sql: &str, in_tx: bool) -> Class {
        class_of(&classify(sql, &catalog()), Some(sql), in_tx)
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
            (
                "/* causeway:priority=point-read */ SELECT count(*) FROM t",
                false,
                Class::PointRead,
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

    #[test]
    fn the_words_come_from_the_classification_not_the_literals() {
        let cat = catalog();
        // A prepared statement's Bind carries no text: the class still follows its words.
        let prepared = classify("SELECT * FROM t WHERE id = $1", &cat);
        assert_eq!(class_of(&prepared, None, false), Class::PointRead);
        let report = classify("SELECT count(*) FROM t", &cat);
        assert_eq!(class_of(&report, None, false), Class::Analytic);
        // Keywords inside a string literal are not the statement's.
        assert_eq!(
            class("SELECT * FROM t WHERE note = 'group by x join y'", false),
            Class::PointRead
        );
        // A LIMIT's count is read from the text at hand: one shape, two classes.
        let few = "SELECT * FROM t ORDER BY id LIMIT 5";
        let many = "SELECT * FROM t ORDER BY id LIMIT 5000";
        let shared = classify(few, &cat);
        assert_eq!(class_of(&shared, Some(few), false), Class::PointRead);
        assert_eq!(class_of(&shared, Some(many), false), Class::Read);
    }
}
