//! Calls a statement makes without naming them, and relations a standby cannot serve: what the
//! catalog's operators, attribute-notation functions, shadowed built-in names, views and
//! unlogged relations mean for routing.

use super::*;

/// One function fact; oids are the row's position plus one.
fn proc(schema: &str, name: &str, volatility: char, origin: Origin, attr: bool) -> ProcFact {
    ProcFact {
        oid: 0,
        schema: schema.into(),
        name: name.into(),
        volatility,
        origin,
        attribute_call: attr,
    }
}

fn relation(oid: u32, name: &str, unlogged: bool, definition: Option<&str>) -> RelationFact {
    RelationFact {
        oid,
        name: name.into(),
        unlogged,
        definition: definition.map(str::to_string),
    }
}

/// A database like the one the audit used: a lock-taking function callable as `t.lockrow`, an
/// operator over a lock-taking function, a user `gen_random_uuid` that takes a lock, an
/// extension's harmless volatile functions, lock-taking views and unlogged relations.
fn facts() -> CatalogFacts {
    use Origin::{Extension as E, System as S, User as U};
    let mut procs = vec![
        proc("pg_catalog", "now", 's', S, false),
        proc("pg_catalog", "count", 'i', S, true),
        proc("pg_catalog", "row_to_json", 's', S, true),
        proc("pg_catalog", "random", 'v', S, false),
        proc("pg_catalog", "gen_random_uuid", 'v', S, false),
        proc("pg_catalog", "pg_try_advisory_lock", 'v', S, false),
        proc("pg_catalog", "int8pl", 'i', S, false),
        proc("public", "lockrow", 'v', U, true),
        proc("public", "row_label", 's', U, true),
        proc("public", "op_lock", 'v', U, false),
        proc("public", "gen_random_uuid", 'v', U, false),
        proc("public", "uuid_generate_v4", 'v', E, false),
        proc("public", "report", 's', U, false),
        proc("audit", "report", 'v', U, false),
        proc("public", "wfn", 'v', U, false),
        proc("public", "lock_all", 'v', U, false),
    ];
    for (i, p) in procs.iter_mut().enumerate() {
        p.oid = i as u32 + 1;
    }
    let oid = |name: &str| procs.iter().find(|p| p.name == name).map_or(0, |p| p.oid);
    let operators = vec![
        ("###".to_string(), oid("op_lock")),
        ("@@@".to_string(), oid("pg_try_advisory_lock")),
        ("+++".to_string(), oid("int8pl")),
    ];
    let relations = vec![
        relation(
            100,
            "vlock",
            false,
            Some("SELECT pg_try_advisory_lock(4242::bigint) AS got"),
        ),
        relation(101, "vw", false, Some("SELECT wfn() AS id")),
        relation(102, "vvw", false, Some("SELECT vw.id FROM vw")),
        relation(
            103,
            "vclock",
            false,
            Some("SELECT now() AS at, random() AS r"),
        ),
        relation(104, "ucache", true, None),
        relation(105, "vu", false, Some("SELECT k FROM ucache")),
        relation(106, "par", false, None),
        relation(107, "par1", true, None),
        relation(108, "useq", true, None),
        relation(
            109,
            "vop",
            false,
            Some("SELECT (1)::bigint ### (2)::bigint AS x"),
        ),
        relation(110, "cycle_a", false, Some("SELECT 1")),
        relation(111, "cycle_b", false, Some("SELECT 1")),
    ];
    CatalogFacts {
        procs,
        operators,
        relations,
        // vvw reads vw, vu reads ucache, par holds par1; a and b read each other.
        reads: vec![(102, 101), (105, 104), (106, 107), (110, 111), (111, 110)],
    }
}

fn cat() -> FunctionCatalog {
    FunctionCatalog::from_facts(&facts(), &[], &[])
}

#[test]
#[rustfmt::skip]
fn attribute_notation_calls_a_known_writer() {
    let rows: &[Row] = &[
        ("SELECT t.lockrow FROM t", W, Tx::None, None, "volatile_function"),
        ("SELECT t.lockrow FROM t WHERE id = 1", W, Tx::None, None, "volatile_function"),
        ("SELECT (t).lockrow FROM t", W, Tx::None, None, "volatile_function"),
        ("SELECT public.t.lockrow FROM public.t", W, Tx::None, None, "volatile_function"),
        ("SELECT id FROM t WHERE t.LockRow", W, Tx::None, None, "volatile_function"),
        // Columns, and functions that are not writers, stay reads.
        ("SELECT t.id, t.v FROM t", R, Tx::None, None, "select"),
        ("SELECT lockrow FROM t", R, Tx::None, None, "select"),
        ("SELECT t.row_label, t.count, t.row_to_json FROM t", R, Tx::None, None, "select"),
    ];
    check_rows(rows, &cat());
}

#[test]
#[rustfmt::skip]
fn user_operators_are_judged_by_their_function() {
    let rows: &[Row] = &[
        ("SELECT 1::bigint ### 2::bigint", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t WHERE a ### b", W, Tx::None, None, "volatile_function"),
        ("SELECT 1 OPERATOR(public.###) 2", W, Tx::None, None, "volatile_function"),
        ("SELECT 1 ### ANY (SELECT 2)", W, Tx::None, None, "volatile_function"),
        ("SELECT a FROM t ORDER BY a USING ###", W, Tx::None, None, "volatile_function"),
        ("SELECT 1 @@@ 2", W, Tx::None, Some(P::AdvisoryLock), "write_function"),
        ("SELECT 1 +++ 2, 1 + 2, 'a' || 'b', 1 <> 2, 1 != 2", R, Tx::None, None, "select"),
        // A name inside a string or a comment is no operator.
        ("SELECT '###' /* ### */", R, Tx::None, None, "select"),
    ];
    check_rows(rows, &cat());
}

#[test]
#[rustfmt::skip]
fn a_user_function_shadowing_a_harmless_built_in_is_not_trusted() {
    let rows: &[Row] = &[
        ("SELECT public.gen_random_uuid()", W, Tx::None, None, "volatile_function"),
        // search_path may put public first: the unqualified name is the user's too.
        ("SELECT gen_random_uuid()", W, Tx::None, None, "volatile_function"),
        ("SELECT pg_catalog.gen_random_uuid()", R, Tx::None, None, "select"),
        // Extensions' functions keep the built-in lists' judgement.
        ("SELECT uuid_generate_v4(), public.uuid_generate_v4()", R, Tx::None, None, "select"),
        ("SELECT random(), pg_catalog.random()", R, Tx::None, None, "select"),
        // A qualified call is judged by that schema's function.
        ("SELECT public.report()", R, Tx::None, None, "select"),
        ("SELECT audit.report()", W, Tx::None, None, "volatile_function"),
        ("SELECT report()", W, Tx::None, None, "volatile_function"),
        ("SELECT nowhere.report()", W, Tx::None, None, "unknown_function"),
        ("SELECT mydb.public.report()", R, Tx::None, None, "select"),
        ("SELECT public.pg_try_advisory_lock(1)", W, Tx::None, Some(P::AdvisoryLock), "write_function"),
    ];
    check_rows(rows, &cat());
    // Without a shadowing definition the built-in stays trusted.
    let plain = FunctionCatalog::from_pg_proc([("gen_random_uuid".to_string(), 'v')], &[], &[]);
    assert_eq!(run("SELECT gen_random_uuid()", &plain).access, R);
}

#[test]
#[rustfmt::skip]
fn views_calling_writers_and_unlogged_relations_need_the_primary() {
    let rows: &[Row] = &[
        // A view taking a session advisory lock pins the session like the call itself.
        ("SELECT * FROM vlock", W, Tx::None, Some(P::AdvisoryLock), "view_calls_writer"),
        ("SELECT got FROM public.vlock", W, Tx::None, Some(P::AdvisoryLock), "view_calls_writer"),
        ("SELECT * FROM vw", W, Tx::None, None, "view_calls_writer"),
        ("SELECT * FROM vvw", W, Tx::None, None, "view_calls_writer"),
        ("SELECT * FROM vop", W, Tx::None, None, "view_calls_writer"),
        ("SELECT * FROM t WHERE id IN (SELECT id FROM vw)", W, Tx::None, None, "view_calls_writer"),
        ("SELECT * FROM ucache", W, Tx::None, None, "unlogged_relation"),
        ("SELECT * FROM ucache WHERE k = 1", W, Tx::None, None, "unlogged_relation"),
        ("TABLE ucache", W, Tx::None, None, "unlogged_relation"),
        ("SELECT * FROM t JOIN ucache ON true", W, Tx::None, None, "unlogged_relation"),
        ("SELECT * FROM vu", W, Tx::None, None, "unlogged_relation"),
        ("SELECT * FROM par", W, Tx::None, None, "unlogged_relation"),
        ("SELECT last_value FROM useq", W, Tx::None, None, "unlogged_relation"),
        ("COPY ucache TO STDOUT", W, Tx::None, None, "unlogged_relation"),
        ("COPY (SELECT * FROM ucache) TO STDOUT", W, Tx::None, None, "unlogged_relation"),
        // Planning alone opens an unlogged relation; it runs no function.
        ("EXPLAIN SELECT * FROM ucache", W, Tx::None, None, "unlogged_relation"),
        ("EXPLAIN SELECT * FROM vlock", R, Tx::None, None, "explain"),
        ("EXPLAIN INSERT INTO ucache VALUES (1)", W, Tx::None, None, "unlogged_relation"),
        ("EXPLAIN UPDATE t SET v = 'x' FROM ucache", W, Tx::None, None, "unlogged_relation"),
        ("EXPLAIN UPDATE t SET v = 'x'", R, Tx::None, None, "explain"),
        ("UPDATE ucache SET v = 'x'", W, Tx::None, None, "update"),
        ("SELECT * FROM vclock", R, Tx::None, None, "select"),
        ("SELECT * FROM cycle_a", R, Tx::None, None, "select"),
        ("SELECT * FROM t", R, Tx::None, None, "select"),
        // A quoted name is another relation; a string is none.
        ("SELECT * FROM \"UCache\" WHERE v = 'ucache'", R, Tx::None, None, "select"),
    ];
    check_rows(rows, &cat());
}

#[test]
fn the_fast_path_leaves_flagged_words_to_the_tree_and_costs_nothing_without_them() {
    let cat = cat();
    for sql in [
        "SELECT t.lockrow FROM t",
        "SELECT 1 ### 2",
        "SELECT * FROM vlock",
        "SELECT * FROM ucache WHERE k = $1",
    ] {
        assert!(fast::try_fast(sql, &cat).is_none(), "{sql}");
    }
    for sql in [
        "SELECT t.id FROM t WHERE id = $1",
        "SELECT 1 + 2",
        "UPDATE t SET v = $1 WHERE id = $2",
    ] {
        assert!(fast::try_fast(sql, &cat).is_some(), "{sql}");
    }
    // A catalog without such objects has nothing to look for.
    let plain = FunctionCatalog::from_pg_proc([("now".to_string(), 's')], &[], &[]);
    assert!(!plain.hides_calls() && !plain.has_relations());
    assert!(fast::try_fast("SELECT t.lockrow FROM ucache t", &plain).is_some());
}

#[test]
fn an_operator_or_attribute_over_an_unknown_function_counts_as_a_writer() {
    let mut f = facts();
    f.operators.push(("%%%".into(), 9999));
    let cat = FunctionCatalog::from_facts(&f, &[], &[]);
    assert_eq!(run("SELECT 1 %%% 2", &cat).access, W);
    // Operator overrides apply to the functions behind operators and attribute calls too.
    let cat = FunctionCatalog::from_facts(&facts(), &["op_lock".into()], &["row_label".into()]);
    assert_eq!(run("SELECT 1 ### 2", &cat).access, R);
    assert_eq!(run("SELECT t.row_label FROM t", &cat).access, W);
}

/// Keywords that run an operator without naming it (`IN`, `LIKE`, `BETWEEN`, `CASE x WHEN`,
/// …) use a user's `=` or `~~` as much as the operator token does.
#[test]
#[rustfmt::skip]
fn keywords_run_the_operators_they_stand_for() {
    let mut f = facts();
    let op_lock = f.procs.iter().find(|p| p.name == "op_lock").map_or(0, |p| p.oid);
    for op in ["=", "<>", "~~", ">=", "~"] {
        f.operators.push((op.to_string(), op_lock));
    }
    let with_ops = FunctionCatalog::from_facts(&f, &[], &[]);
    let rows: &[Row] = &[
        ("SELECT * FROM t WHERE c IN ('a', 'b')", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t WHERE c NOT IN ('a')", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t WHERE c LIKE 'a%'", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t WHERE c BETWEEN 'a' AND 'b'", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t WHERE c IS DISTINCT FROM 'a'", W, Tx::None, None, "volatile_function"),
        ("SELECT NULLIF(c, 'a') FROM t", W, Tx::None, None, "volatile_function"),
        ("SELECT CASE c WHEN 'a' THEN 1 END FROM t", W, Tx::None, None, "volatile_function"),
        ("SELECT * FROM t WHERE c SIMILAR TO 'a'", W, Tx::None, None, "volatile_function"),
    ];
    check_rows(rows, &with_ops);
    // Without such operators the same statements are reads.
    let plain: &[Row] = &[
        ("SELECT * FROM t WHERE c IN ('a', 'b')", R, Tx::None, None, "select"),
        ("SELECT CASE c WHEN 'a' THEN 1 END FROM t", R, Tx::None, None, "select"),
    ];
    check_rows(plain, &cat());
}
