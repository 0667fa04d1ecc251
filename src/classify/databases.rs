//! Statements the server runs only while no other session is connected to a database:
//! `DROP DATABASE`, `CREATE DATABASE … TEMPLATE`, `ALTER DATABASE … RENAME` and `… SET
//! TABLESPACE`. Idle pooled connections to that database count as sessions to the server, so
//! the proxy closes them first (see `Pools::close_idle_of`).

use pg_query::NodeEnum as N;
use pg_query::protobuf::ObjectType;

/// The template `CREATE DATABASE` copies when it names none.
const DEFAULT_TEMPLATE: &str = "template1";

/// The databases `sql` needs no other session connected to, if it is one such statement;
/// empty otherwise. Only a lone `CREATE`, `DROP` or `ALTER` mentioning a database is parsed.
pub fn exclusive_databases(sql: &str) -> Vec<String> {
    if !might_be_database_ddl(sql) {
        return Vec::new();
    }
    let Ok(parsed) = pg_query::parse(sql, 0) else {
        return Vec::new();
    };
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        // None of these statements runs in a multi-statement string (an implicit transaction).
        return Vec::new();
    };
    match raw.stmt.as_ref().and_then(|n| n.node.as_ref()) {
        Some(N::DropdbStmt(d)) => vec![d.dbname.clone()],
        Some(N::CreatedbStmt(c)) => {
            let template = option(&c.options, "template");
            match template {
                // `TEMPLATE DEFAULT` (no value) or no TEMPLATE at all.
                Some(Some(t)) => vec![t],
                _ => vec![DEFAULT_TEMPLATE.to_string()],
            }
        }
        Some(N::RenameStmt(r)) if r.rename_type == ObjectType::ObjectDatabase as i32 => {
            vec![r.subname.clone()]
        }
        Some(N::AlterDatabaseStmt(a)) if option(&a.options, "tablespace").is_some() => {
            vec![a.dbname.clone()]
        }
        _ => Vec::new(),
    }
}

/// Whether `sql` may be one of these statements: a cheap look at its words, so other DDL is
/// not parsed again.
fn might_be_database_ddl(sql: &str) -> bool {
    let first = skip_comments(sql)
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("");
    let verb = ["create", "drop", "alter"]
        .iter()
        .any(|v| first.eq_ignore_ascii_case(v));
    verb && sql
        .as_bytes()
        .windows(8)
        .any(|w| w.eq_ignore_ascii_case(b"database"))
}

/// `sql` from its first word on: leading white space and comments (hints) skipped.
fn skip_comments(mut sql: &str) -> &str {
    loop {
        sql = sql.trim_start();
        if let Some(rest) = sql.strip_prefix("--") {
            sql = rest.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(rest) = sql.strip_prefix("/*") {
            // Nested comments end early here; the parser, which runs next, has the last word.
            sql = rest.split_once("*/").map_or("", |(_, after)| after);
        } else {
            return sql;
        }
    }
}

/// The value of option `name` in a `WITH`-style list: `Some(None)` when named without a value
/// (or with `DEFAULT`), `None` when absent.
fn option(options: &[pg_query::Node], name: &str) -> Option<Option<String>> {
    options.iter().find_map(|o| match o.node.as_ref() {
        Some(N::DefElem(d)) if d.defname == name => Some(match d.arg.as_deref() {
            Some(pg_query::Node {
                node: Some(N::String(s)),
            }) => Some(s.sval.clone()),
            _ => None,
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::exclusive_databases;

    #[test]
    fn names_the_databases_a_statement_needs_to_itself() {
        let cases: &[(&str, &[&str])] = &[
            ("DROP DATABASE test_app", &["test_app"]),
            (
                "/* causeway:primary */ -- teardown\nDROP DATABASE t",
                &["t"],
            ),
            ("drop database if exists \"Test App\"", &["Test App"]),
            ("DROP DATABASE x WITH (FORCE)", &["x"]),
            ("CREATE DATABASE y TEMPLATE x", &["x"]),
            ("CREATE DATABASE y WITH TEMPLATE = \"X\" OWNER app", &["X"]),
            ("CREATE DATABASE y", &["template1"]),
            ("CREATE DATABASE y TEMPLATE DEFAULT", &["template1"]),
            ("ALTER DATABASE x RENAME TO y", &["x"]),
            ("  alter database x set tablespace ts", &["x"]),
            ("ALTER DATABASE x SET work_mem = '1MB'", &[]),
            ("ALTER DATABASE x OWNER TO app", &[]),
            ("DROP TABLE database", &[]),
            ("SELECT 'drop database x'", &[]),
            ("CREATE TABLE t (database int)", &[]),
            ("DROP DATABASE a; DROP DATABASE b", &[]),
            ("DROP DATABASE", &[]),
        ];
        for (sql, want) in cases {
            assert_eq!(exclusive_databases(sql), *want, "{sql}");
        }
    }
}
