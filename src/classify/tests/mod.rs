#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

use Access::{Read as R, Write as W};
use PinReason as P;
use TxEffect as Tx;

/// Catalog used by most cases: a small pg_proc plus operator overrides.
fn catalog() -> FunctionCatalog {
    let rows = [
        ("my_volatile_fn", 'v'),
        ("my_stable_fn", 's'),
        ("my_immutable_fn", 'i'),
        ("audit_safe_fn", 'v'),
        ("my_stable_but_writes", 's'),
        ("overloaded_fn", 'i'),
        ("overloaded_fn", 'v'),
        ("MixedCase", 's'),
        ("now", 's'),
        ("count", 'i'),
        ("sum", 'i'),
        ("lower", 'i'),
        ("upper", 'i'),
        ("substring", 'i'),
        ("generate_series", 'i'),
        ("current_setting", 's'),
        ("pg_backend_pid", 's'),
        ("version", 's'),
        ("inet_server_port", 's'),
        ("json_build_object", 's'),
        ("nextval", 'v'),
        ("setval", 'v'),
        ("random", 'v'),
        ("clock_timestamp", 'v'),
        ("txid_current", 's'),
        ("pg_advisory_lock", 'v'),
        ("set_config", 'v'),
        ("lo_get", 'v'),
        ("pg_stat_get_activity", 's'),
    ];
    FunctionCatalog::from_pg_proc(
        rows.iter().map(|(n, v)| (n.to_string(), *v)),
        &["audit_safe_fn".to_string()],
        &["My_Stable_But_Writes".to_string()],
    )
}

/// Classifies through the public entry point and checks that the full-tree path agrees.
fn run(sql: &str, cat: &FunctionCatalog) -> Classification {
    let c = classify(sql, cat);
    let full = classify_full(sql, cat, hints::parse_hints(sql).0);
    assert_eq!(c, full, "fast and full paths disagree for {sql:?}");
    c
}

type Row = (
    &'static str,
    Access,
    TxEffect,
    Option<PinReason>,
    &'static str,
);

fn check_rows(rows: &[Row], cat: &FunctionCatalog) {
    let mut failures = Vec::new();
    for &(sql, access, tx, pin, reason) in rows {
        let c = run(sql, cat);
        let got = (c.access, c.tx, c.pin, c.reason);
        if got != (access, tx, pin, reason) || c.parse_error {
            failures.push(format!(
                "{sql:?}: expected {:?}, got {got:?} (parse_error={})",
                (access, tx, pin, reason),
                c.parse_error
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
#[rustfmt::skip]
fn reads() {
    let rows: &[Row] = &[
        ("SELECT 1", R, Tx::None, None, "select"),
        ("select * from users where id = $1", R, Tx::None, None, "select"),
        ("SeLeCt id, name FROM users WHERE id = 42 ORDER BY name LIMIT 10", R, Tx::None, None, "select"),
        ("VALUES (1), (2)", R, Tx::None, None, "select"),
        ("TABLE users", R, Tx::None, None, "select"),
        ("(SELECT 1)", R, Tx::None, None, "select"),
        ("SELECT now(), count(*) FROM t", R, Tx::None, None, "select"),
        ("SELECT inet_server_port(), current_setting('x'), pg_backend_pid(), version()", R, Tx::None, None, "select"),
        ("SHOW search_path", R, Tx::None, None, "show"),
        ("SHOW ALL", R, Tx::None, None, "show"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", R, Tx::None, None, "select"),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 10) SELECT * FROM r", R, Tx::None, None, "select"),
        ("SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE u.x = lower('A'))", R, Tx::None, None, "select"),
        ("SELECT random(), clock_timestamp(), timeofday(), gen_random_uuid()", R, Tx::None, None, "select"),
        ("SELECT pg_sleep(1)", R, Tx::None, None, "select"),
        ("SELECT pg_last_wal_replay_lsn(), pg_is_in_recovery(), pg_last_xact_replay_timestamp()", R, Tx::None, None, "select"),
        ("SELECT * FROM pg_stat_get_activity(NULL)", R, Tx::None, None, "select"),
        ("SELECT my_stable_fn(1), my_immutable_fn(2)", R, Tx::None, None, "select"),
        ("SELECT audit_safe_fn()", R, Tx::None, None, "select"),
        ("SELECT \"MixedCase\"()", R, Tx::None, None, "select"),
        ("SELECT * FROM generate_series(1, 10) g(i)", R, Tx::None, None, "select"),
        ("SELECT a FROM t UNION SELECT b FROM u EXCEPT SELECT c FROM v", R, Tx::None, None, "select"),
        ("SELECT CAST(x AS numeric(10,2)), y::varchar(20) FROM t", R, Tx::None, None, "select"),
        ("SELECT substring(name from 1 for 3) FROM t", R, Tx::None, None, "select"),
        ("SELECT count(*) FILTER (WHERE x > 0), sum(a) OVER (PARTITION BY y) FROM t", R, Tx::None, None, "select"),
        ("SELECT 'insert into t values (1); delete from t'", R, Tx::None, None, "select"),
        ("SELECT \"update\", \"delete\" FROM t", R, Tx::None, None, "select"),
        ("SELECT 1 -- trailing comment", R, Tx::None, None, "select"),
        ("/* hello */ SELECT 1;", R, Tx::None, None, "select"),
        ("SELECT lo_get(42)", R, Tx::None, None, "select"),
        ("SELECT * FROM t WHERE created_at > now() - interval '1 day' ORDER BY id FETCH FIRST 5 ROWS ONLY", R, Tx::None, None, "select"),
        ("SELECT current_timestamp, current_user, localtime", R, Tx::None, None, "select"),
        ("SELECT json_build_object('a', 1)", R, Tx::None, None, "select"),
        ("EXPLAIN SELECT * FROM t", R, Tx::None, None, "explain"),
        ("EXPLAIN DELETE FROM t", R, Tx::None, None, "explain"),
        ("EXPLAIN (VERBOSE, COSTS OFF) INSERT INTO t VALUES (nextval('s'))", R, Tx::None, None, "explain"),
        ("EXPLAIN (ANALYZE false) DELETE FROM t", R, Tx::None, None, "explain"),
        ("EXPLAIN (ANALYZE off) UPDATE t SET a = 1", R, Tx::None, None, "explain"),
        ("EXPLAIN ANALYZE SELECT * FROM t", R, Tx::None, None, "explain_analyze"),
        ("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t", R, Tx::None, None, "explain_analyze"),
        ("COPY (SELECT 1) TO STDOUT", R, Tx::None, None, "copy_to"),
        ("COPY t TO STDOUT", R, Tx::None, None, "copy_to"),
        ("COPY t (a, b) TO STDOUT WITH (FORMAT csv)", R, Tx::None, None, "copy_to"),
        ("DECLARE c CURSOR FOR SELECT * FROM t", R, Tx::None, None, "declare_cursor"),
        ("DECLARE c SCROLL CURSOR WITHOUT HOLD FOR SELECT * FROM t", R, Tx::None, None, "declare_cursor"),
        ("FETCH 10 FROM c", R, Tx::None, None, "cursor"),
        ("MOVE NEXT IN c", R, Tx::None, None, "cursor"),
        ("CLOSE c", R, Tx::None, None, "cursor"),
        ("select 1; select 2", R, Tx::None, None, "select"),
    ];
    check_rows(rows, &catalog());
}

#[test]
#[rustfmt::skip]
fn writes() {
    let rows: &[Row] = &[
        ("INSERT INTO t VALUES (1)", W, Tx::None, None, "insert"),
        ("insert into t (a) select a from u", W, Tx::None, None, "insert"),
        ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = excluded.a", W, Tx::None, None, "insert"),
        ("INSERT INTO t VALUES (1) RETURNING id", W, Tx::None, None, "insert"),
        ("INSERT INTO t WITH x AS (SELECT 1) SELECT * FROM x", W, Tx::None, None, "insert"),
        ("UPDATE t SET a = 1 WHERE id = 2", W, Tx::None, None, "update"),
        ("update t set a = a + 1 from u where u.id = t.id", W, Tx::None, None, "update"),
        ("DELETE FROM t WHERE id = 1", W, Tx::None, None, "delete"),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a", W, Tx::None, None, "merge"),
        ("CREATE TABLE t (id int)", W, Tx::None, None, "ddl"),
        ("CREATE TABLE t (id int DEFAULT nextval('s'))", W, Tx::None, None, "ddl"),
        ("ALTER TABLE t ADD COLUMN x int", W, Tx::None, None, "ddl"),
        ("DROP TABLE t", W, Tx::None, None, "ddl"),
        ("COMMENT ON TABLE t IS 'x'", W, Tx::None, None, "ddl"),
        ("GRANT SELECT ON t TO bob", W, Tx::None, None, "ddl"),
        ("REVOKE SELECT ON t FROM bob", W, Tx::None, None, "ddl"),
        ("CREATE INDEX CONCURRENTLY i ON t (a)", W, Tx::None, None, "ddl"),
        ("CREATE VIEW v AS SELECT 1", W, Tx::None, None, "ddl"),
        ("CREATE UNLOGGED TABLE u (id int)", W, Tx::None, None, "ddl"),
        ("CREATE MATERIALIZED VIEW mv AS SELECT 1", W, Tx::None, None, "ddl"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END", W, Tx::None, None, "ddl"),
        ("ALTER SYSTEM SET work_mem = '64MB'", W, Tx::None, None, "ddl"),
        ("CREATE EXTENSION pg_trgm", W, Tx::None, None, "ddl"),
        ("TRUNCATE t", W, Tx::None, None, "truncate"),
        ("VACUUM t", W, Tx::None, None, "maintenance"),
        ("VACUUM (FULL, ANALYZE) t", W, Tx::None, None, "maintenance"),
        ("ANALYZE t", W, Tx::None, None, "maintenance"),
        ("CLUSTER t USING i", W, Tx::None, None, "maintenance"),
        ("REINDEX TABLE t", W, Tx::None, None, "maintenance"),
        ("REFRESH MATERIALIZED VIEW CONCURRENTLY mv", W, Tx::None, None, "maintenance"),
        ("CHECKPOINT", W, Tx::None, None, "maintenance"),
        ("SELECT * FROM t FOR UPDATE", W, Tx::None, None, "for_update"),
        ("SELECT * FROM t FOR NO KEY UPDATE", W, Tx::None, None, "for_update"),
        ("SELECT * FROM t FOR SHARE", W, Tx::None, None, "for_update"),
        ("select * from t for key share nowait", W, Tx::None, None, "for_update"),
        ("SELECT * FROM t WHERE id = 1 FOR UPDATE OF t SKIP LOCKED", W, Tx::None, None, "for_update"),
        ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", W, Tx::None, None, "for_update"),
        ("WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x", W, Tx::None, None, "for_update"),
        ("SELECT * FROM t WHERE id IN (SELECT id FROM u FOR SHARE)", W, Tx::None, None, "for_update"),
        ("SELECT 1 UNION ALL (SELECT 2 FOR UPDATE)", W, Tx::None, None, "for_update"),
        ("SELECT * INTO newt FROM t", W, Tx::None, None, "select_into"),
        ("SELECT * INTO TEMP newt FROM t", W, Tx::None, Some(P::TempTable), "select_into"),
        ("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", W, Tx::None, None, "writable_cte"),
        ("WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x", W, Tx::None, None, "writable_cte"),
        ("WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x", W, Tx::None, None, "writable_cte"),
        ("WITH m AS (MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE RETURNING t.*) SELECT * FROM m", W, Tx::None, None, "writable_cte"),
        ("WITH a AS (SELECT 1), b AS (WITH c AS (DELETE FROM t RETURNING id) SELECT * FROM c) SELECT * FROM b", W, Tx::None, None, "writable_cte"),
        ("SELECT * FROM (WITH d AS (DELETE FROM t RETURNING id) SELECT * FROM d) s", W, Tx::None, None, "writable_cte"),
        ("SELECT * FROM t WHERE EXISTS (WITH d AS (DELETE FROM t RETURNING id) SELECT 1 FROM d)", W, Tx::None, None, "writable_cte"),
        ("COPY t FROM STDIN", W, Tx::None, None, "copy_from"),
        ("COPY t (a) FROM STDIN WITH (FORMAT csv) WHERE a > 0", W, Tx::None, None, "copy_from"),
        ("COPY t TO '/tmp/x.csv'", W, Tx::None, None, "copy_to_file"),
        ("COPY t TO PROGRAM 'gzip > /tmp/x.gz'", W, Tx::None, None, "copy_to_file"),
        ("COPY (SELECT nextval('s')) TO STDOUT", W, Tx::None, None, "write_function"),
        ("COPY (DELETE FROM t RETURNING *) TO STDOUT", W, Tx::None, None, "delete"),
        ("EXPLAIN ANALYZE DELETE FROM t", W, Tx::None, None, "delete"),
        ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", W, Tx::None, None, "update"),
        ("EXPLAIN (ANALYZE true) INSERT INTO t VALUES (1)", W, Tx::None, None, "insert"),
        ("EXPLAIN ANALYZE SELECT nextval('s')", W, Tx::None, None, "write_function"),
        ("EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE", W, Tx::None, None, "for_update"),
        ("EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1", W, Tx::None, None, "ddl"),
        ("CALL p()", W, Tx::None, None, "call"),
        ("DO $$BEGIN PERFORM 1; END$$", W, Tx::None, Some(P::SessionSet), "do"),
        ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", W, Tx::None, None, "lock"),
        ("NOTIFY ch, 'x'", W, Tx::None, None, "notify"),
        ("UNLISTEN ch", W, Tx::None, None, "unlisten"),
        ("UNLISTEN *", W, Tx::None, None, "unlisten"),
        ("EXECUTE p", W, Tx::None, None, "execute"),
        ("EXECUTE p(1, 'x')", W, Tx::None, None, "execute"),
        ("EXPLAIN ANALYZE EXECUTE p", W, Tx::None, None, "execute"),
        ("DEALLOCATE p", W, Tx::None, None, "deallocate"),
        ("DEALLOCATE ALL", W, Tx::None, None, "deallocate"),
        ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", W, Tx::None, None, "for_update"),
        ("select 1; insert into t values(1)", W, Tx::None, None, "insert"),
        ("SELECT 1; SELECT nextval('s')", W, Tx::None, None, "write_function"),
        ("/* causeway:replica */ INSERT INTO t VALUES (1)", W, Tx::None, None, "insert"),
    ];
    check_rows(rows, &catalog());
}

#[test]
#[rustfmt::skip]
fn functions() {
    let rows: &[Row] = &[
        ("SELECT nextval('s')", W, Tx::None, None, "write_function"),
        ("SELECT * FROM t WHERE id = nextval('s')", W, Tx::None, None, "write_function"),
        ("select pg_catalog.nextval('x')", W, Tx::None, None, "write_function"),
        ("SELECT NEXTVAL('s')", W, Tx::None, None, "write_function"),
        ("SELECT setval('s', 10)", W, Tx::None, None, "write_function"),
        ("SELECT currval('s'), lastval()", W, Tx::None, None, "write_function"),
        ("SELECT pg_advisory_lock(1)", W, Tx::None, Some(P::AdvisoryLock), "advisory_lock"),
        ("SELECT pg_try_advisory_lock(1)", W, Tx::None, Some(P::AdvisoryLock), "advisory_lock"),
        ("SELECT pg_advisory_lock_shared(1)", W, Tx::None, Some(P::AdvisoryLock), "advisory_lock"),
        ("SELECT pg_try_advisory_lock_shared(1, 2)", W, Tx::None, Some(P::AdvisoryLock), "advisory_lock"),
        ("SELECT pg_catalog.pg_advisory_lock(hashtext('job'))", W, Tx::None, Some(P::AdvisoryLock), "advisory_lock"),
        ("UPDATE jobs SET taken = true WHERE pg_try_advisory_lock(id)", W, Tx::None, Some(P::AdvisoryLock), "advisory_lock"),
        ("DELETE FROM jobs WHERE id = 1 RETURNING pg_advisory_lock(id)", W, Tx::None, Some(P::AdvisoryLock), "advisory_lock"),
        ("SELECT pg_advisory_xact_lock(1)", W, Tx::None, None, "advisory_lock"),
        ("SELECT pg_try_advisory_xact_lock(1)", W, Tx::None, None, "advisory_lock"),
        ("SELECT pg_advisory_xact_lock_shared(1)", W, Tx::None, None, "advisory_lock"),
        ("SELECT pg_try_advisory_xact_lock_shared(1)", W, Tx::None, None, "advisory_lock"),
        ("SELECT pg_advisory_unlock(1)", W, Tx::None, None, "advisory_lock"),
        ("SELECT pg_advisory_unlock_shared(1)", W, Tx::None, None, "advisory_lock"),
        ("SELECT pg_advisory_unlock_all()", W, Tx::None, None, "advisory_lock"),
        ("SELECT pg_notify('c', 'p')", W, Tx::None, None, "write_function"),
        ("SELECT set_config('search_path', 'x', false)", W, Tx::None, Some(P::SessionSet), "write_function"),
        ("SELECT set_config('search_path', 'x', 'off')", W, Tx::None, Some(P::SessionSet), "write_function"),
        ("SELECT set_config('search_path', 'x', true)", W, Tx::None, None, "write_function"),
        ("SELECT set_config('a', 'b', $1)", W, Tx::None, Some(P::SessionSet), "write_function"),
        ("SELECT setseed(0.5)", W, Tx::None, Some(P::SessionSet), "write_function"),
        ("SELECT lo_create(0)", W, Tx::None, None, "write_function"),
        ("SELECT lo_creat(-1)", W, Tx::None, None, "write_function"),
        ("SELECT lo_import('/x')", W, Tx::None, None, "write_function"),
        ("SELECT lo_export(1, '/tmp/x')", W, Tx::None, None, "write_function"),
        ("SELECT lo_unlink(123)", W, Tx::None, None, "write_function"),
        ("SELECT lo_put(1, 0, 'x')", W, Tx::None, None, "write_function"),
        ("SELECT lo_from_bytea(0, 'x')", W, Tx::None, None, "write_function"),
        ("SELECT lo_open(1, 131072)", W, Tx::None, None, "write_function"),
        ("SELECT lowrite(0, 'x')", W, Tx::None, None, "write_function"),
        ("SELECT lo_truncate(0, 1)", W, Tx::None, None, "write_function"),
        ("SELECT txid_current()", W, Tx::None, None, "write_function"),
        ("SELECT pg_current_xact_id()", W, Tx::None, None, "write_function"),
        ("SELECT pg_current_wal_lsn()", W, Tx::None, None, "write_function"),
        ("SELECT pg_current_wal_insert_lsn()", W, Tx::None, None, "write_function"),
        ("SELECT pg_switch_wal()", W, Tx::None, None, "write_function"),
        ("SELECT pg_create_restore_point('x')", W, Tx::None, None, "write_function"),
        ("SELECT pg_stat_reset()", W, Tx::None, None, "write_function"),
        ("SELECT my_volatile_fn()", W, Tx::None, None, "volatile_function"),
        ("SELECT my_unknown_fn()", W, Tx::None, None, "unknown_function"),
        ("SELECT public.my_unknown_fn(1)", W, Tx::None, None, "unknown_function"),
        ("SELECT my_stable_but_writes()", W, Tx::None, None, "write_function"),
        ("SELECT overloaded_fn()", W, Tx::None, None, "volatile_function"),
        ("SELECT mixedcase()", R, Tx::None, None, "select"),
        // function calls in every corner of the tree
        ("SELECT * FROM my_volatile_fn()", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM ROWS FROM (generate_series(1, 2), my_volatile_fn())", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t ORDER BY my_volatile_fn()", W, Tx::None, None, "volatile_function"),
        ("VALUES (1, my_volatile_fn())", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t WHERE a = (SELECT my_volatile_fn())", W, Tx::None, None, "volatile_function"),
        ("SELECT CASE WHEN a THEN my_volatile_fn() ELSE 0 END FROM t", W, Tx::None, None, "volatile_function"),
        ("SELECT coalesce(a, my_volatile_fn()) FROM t", W, Tx::None, None, "volatile_function"),
        ("SELECT greatest(1, my_volatile_fn())", W, Tx::None, None, "volatile_function"),
        ("SELECT ARRAY[my_volatile_fn()]", W, Tx::None, None, "volatile_function"),
        ("SELECT ROW(1, my_volatile_fn())", W, Tx::None, None, "volatile_function"),
        ("SELECT count(*) FILTER (WHERE my_volatile_fn() > 0) FROM t", W, Tx::None, None, "volatile_function"),
        ("SELECT sum(a) OVER (ORDER BY my_volatile_fn()) FROM t", W, Tx::None, None, "volatile_function"),
        ("SELECT sum(a) OVER w FROM t WINDOW w AS (PARTITION BY my_volatile_fn())", W, Tx::None, None, "volatile_function"),
        ("SELECT a FROM t GROUP BY a HAVING sum(my_volatile_fn()) > 1", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t LIMIT my_volatile_fn()", W, Tx::None, None, "volatile_function"),
        ("SELECT my_volatile_fn()::text", W, Tx::None, None, "volatile_function"),
        ("SELECT (my_volatile_fn()).x", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t JOIN u ON my_volatile_fn() = u.id", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t, LATERAL my_volatile_fn(t.a) f", W, Tx::None, None, "volatile_function"),
        ("SELECT a IS NULL OR my_volatile_fn() IS NOT TRUE FROM t", W, Tx::None, None, "volatile_function"),
        ("SELECT my_stable_fn(my_volatile_fn())", W, Tx::None, None, "volatile_function"),
        ("SELECT x FROM t WHERE a = ANY(ARRAY[my_volatile_fn()])", W, Tx::None, None, "volatile_function"),
        ("SELECT DISTINCT ON (my_volatile_fn()) a FROM t", W, Tx::None, None, "volatile_function"),
        ("SELECT JSON_OBJECT('a' : my_volatile_fn())", W, Tx::None, None, "volatile_function"),
        ("SELECT a COLLATE \"C\" FROM t WHERE my_volatile_fn() > 0", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t TABLESAMPLE bernoulli (my_volatile_fn())", W, Tx::None, None, "volatile_function"),
        ("WITH x AS (SELECT my_volatile_fn()) SELECT * FROM x", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t WHERE a IN (VALUES (my_volatile_fn()))", W, Tx::None, None, "volatile_function"),
        ("SELECT xmlelement(name foo, my_volatile_fn())", W, Tx::None, None, "volatile_function"),
        // TREAT(x AS t) calls pg_catalog.t(x): a hidden call with no `name(` in the text.
        ("SELECT TREAT('s' AS nextval)", W, Tx::None, None, "write_function"),
        ("SELECT 1 WHERE true AND EXISTS (SELECT 1 WHERE nextval('s') > 0)", W, Tx::None, None, "write_function"),
        ("SELECT * FROM t WHERE a = 1 AND b IN (SELECT x FROM u WHERE y = my_volatile_fn())", W, Tx::None, None, "volatile_function"),
        ("UPDATE t SET a = my_stable_fn() WHERE id = (SELECT pg_advisory_lock(1))", W, Tx::None, Some(P::AdvisoryLock), "advisory_lock"),
        ("INSERT INTO t SELECT setseed(0.1)", W, Tx::None, Some(P::SessionSet), "insert"),
    ];
    check_rows(rows, &catalog());
}

#[test]
fn parse_errors_and_empty() {
    let cat = catalog();
    for sql in [
        "SELEC 1",
        "SELECT FROM WHERE",
        "garbage !!!",
        "SELECT 'unterminated",
        "INSERT INTO",
        "SELECT 1; garbage",
        "SELECT (1",
        "SELECT 1\0",
        "/* causeway:replica",
    ] {
        let c = run(sql, &cat);
        assert_eq!(
            (c.access, c.parse_error, c.reason),
            (W, true, "parse_error"),
            "{sql:?}"
        );
        assert_eq!(
            (c.tx, c.pin, c.proxy.clone()),
            (Tx::None, None, None),
            "{sql:?}"
        );
    }
    for sql in [
        "",
        "   \n\t",
        "\x0b\x0c",
        "/* only a comment */",
        "-- just a comment",
        ";",
    ] {
        let c = run(sql, &cat);
        assert_eq!(
            (c.access, c.parse_error, c.statements, c.reason),
            (R, false, 0, "empty"),
            "{sql:?}"
        );
    }
}

#[test]
fn deep_nesting_does_not_crash() {
    let cat = catalog();
    for depth in [50, 500, 5_000] {
        let parens = format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth));
        let sum = format!("SELECT 1{}", "+1".repeat(depth));
        let subs = format!("SELECT {}1{}", "(SELECT ".repeat(depth), ")".repeat(depth));
        for sql in [parens, sum, subs] {
            let c = classify(&sql, &cat);
            assert!(c.access == W || !c.parse_error, "depth {depth}");
        }
    }
    let deep_write = format!(
        "SELECT {}nextval('s'){}",
        "(SELECT ".repeat(200),
        ")".repeat(200)
    );
    assert_eq!(classify(&deep_write, &cat).access, W);
}

#[test]
fn statement_counts() {
    let cat = catalog();
    for (sql, n) in [
        ("SELECT 1", 1),
        ("SELECT 1;", 1),
        ("select 1; select 2", 2),
        ("BEGIN; SELECT 1; COMMIT;", 3),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END",
            1,
        ),
    ] {
        assert_eq!(run(sql, &cat).statements, n, "{sql:?}");
    }
}

#[test]
#[rustfmt::skip]
fn builtin_only_catalog() {
    let cat = FunctionCatalog::builtin_only(&["my_report".to_string()], &["Lower".to_string()]);
    let rows: &[Row] = &[
        ("SELECT now(), count(*), upper(name) FROM t", R, Tx::None, None, "select"),
        ("SELECT random(), pg_sleep(0), current_setting('x')", R, Tx::None, None, "select"),
        ("SELECT my_report(1)", R, Tx::None, None, "select"),
        ("SELECT my_stable_fn()", W, Tx::None, None, "unknown_function"),
        ("SELECT nextval('s')", W, Tx::None, None, "write_function"),
        ("SELECT lower('A')", W, Tx::None, None, "write_function"),
        ("SELECT pg_advisory_lock(1)", W, Tx::None, Some(P::AdvisoryLock), "advisory_lock"),
    ];
    check_rows(rows, &cat);
}

#[test]
fn catalog_is_write() {
    let cat = catalog();
    assert!(cat.is_write("pg_catalog.NEXTVAL"));
    assert!(cat.is_write("my_volatile_fn"));
    assert!(cat.is_write("public.My_Volatile_Fn"));
    assert!(cat.is_write("nobody_knows_me"));
    assert!(cat.is_write("my_stable_but_writes"));
    assert!(cat.is_write("pg_advisory_unlock_all"));
    assert!(!cat.is_write("now"));
    assert!(!cat.is_write("pg_catalog.now"));
    assert!(!cat.is_write("audit_safe_fn"));
    assert!(!cat.is_write("random"));
    assert!(!cat.is_write("pg_stat_get_db_xact_commit"));
    // read_only_overrides cannot clear a built-in writer.
    let c = FunctionCatalog::from_pg_proc(Vec::new(), &["nextval".into()], &[]);
    assert!(c.is_write("nextval"));
    // write_overrides beat harmless built-ins.
    let c = FunctionCatalog::from_pg_proc(Vec::new(), &[], &["random".into()]);
    assert!(c.is_write("random"));
}

mod cache;
mod commands;
mod hidden_calls;
mod setting_values;
mod transactions;
