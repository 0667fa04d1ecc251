//! What the proxy answers or follows itself: `causeway.*` commands, hints in comments, and
//! the session commands recognised only when they stand alone.

use super::*;

#[test]
#[rustfmt::skip]
fn proxy_commands() {
    use ProxyCommand::*;
    let var = |name: &str, value: Option<&str>| SetVar {
        name: name.into(),
        value: value.map(Into::into),
    };
    let cases: Vec<(&str, Option<ProxyCommand>)> = vec![
        ("SET causeway.route = 'replica'", Some(SetRoute(RouteMode::Replica))),
        ("SET causeway.route TO replica", Some(SetRoute(RouteMode::Replica))),
        ("SET SESSION causeway.route = 'auto'", Some(SetRoute(RouteMode::Auto))),
        ("set CAUSEWAY.ROUTE = 'Replica'", Some(SetRoute(RouteMode::Replica))),
        ("SET \"causeway.route\" = 'primary'", Some(SetRoute(RouteMode::Primary))),
        ("RESET causeway.route", Some(Reset { name: "route".into() })),
        ("SET causeway.route TO DEFAULT", Some(SetRoute(RouteMode::Auto))),
        ("SET causeway.route = 'bogus'", Some(var("route", Some("bogus")))),
        ("SET causeway.read_your_writes = 'on'", Some(var("read_your_writes", Some("on")))),
        ("SET causeway.max_lag = 5", Some(var("max_lag", Some("5")))),
        ("SET causeway.Priority TO analytic", Some(var("priority", Some("analytic")))),
        ("RESET causeway.priority", Some(Reset { name: "priority".into() })),
        ("SET causeway.priority TO DEFAULT", Some(var("priority", None))),
        ("SHOW causeway.last_write_lsn", Some(Show { name: "last_write_lsn".into(), })),
        ("SHOW CAUSEWAY.Route", Some(Show { name: "route".into(), })),
        ("/* causeway:primary */ SET causeway.route = 'replica'", Some(SetRoute(RouteMode::Replica))),
        ("SET causeway.route = 'replica'; SELECT 1", Some(Misplaced)),
        ("SHOW causeway.route; SHOW causeway.route", Some(Misplaced)),
        ("SELECT 1; SET causeway.consistency_key = 'k'", Some(Misplaced)),
        ("SELECT 1; SHOW search_path", None),
        ("SET causewayx.route = 'replica'", None),
        ("SHOW search_path", None),
    ];
    let cat = catalog();
    for (sql, expected) in cases {
        let c = run(sql, &cat);
        assert_eq!(c.proxy, expected, "{sql:?}");
        assert_eq!(c.access, R, "{sql:?}");
        if c.proxy.is_some() || sql.contains(';') {
            assert_eq!(c.pin, None, "{sql:?}");
        }
    }
}

#[test]
#[rustfmt::skip]
fn hints() {
    let h = |route: Option<RouteHint>, key: Option<&str>, lsn: Option<&str>, prio: Option<&str>| {
        Hints {
            route,
            key: key.map(Into::into),
            min_lsn: lsn.map(Into::into),
            priority: prio.map(Into::into),
        }
    };
    let none = Hints::default();
    let cases = vec![
        ("/* causeway:primary */ SELECT 1", h(Some(RouteHint::Primary), None, None, None)),
        ("/* causeway:replica */ INSERT INTO t VALUES (1)", h(Some(RouteHint::Replica), None, None, None)),
        ("/* causeway:key=user:42 */ SELECT 1", h(None, Some("user:42"), None, None)),
        ("/* causeway:min_lsn=0/3000060 */ SELECT 1", h(None, None, Some("0/3000060"), None)),
        ("/* causeway:priority=analytic */ SELECT 1", h(None, None, None, Some("analytic"))),
        ("/* causeway:replica causeway:key=user:42 */ SELECT 1", h(Some(RouteHint::Replica), Some("user:42"), None, None)),
        ("/* causeway:replica, key=user:42, min_lsn=0/3000060 */ SELECT 1", h( Some(RouteHint::Replica), Some("user:42"), Some("0/3000060"), None, )),
        ("/*causeway:replica,causeway:priority=low*/SELECT 1", h(Some(RouteHint::Replica), None, None, Some("low"))),
        ("/* causeway:replica */ /* causeway:key=k1 */ SELECT 1", h(Some(RouteHint::Replica), Some("k1"), None, None)),
        ("-- causeway:primary\nSELECT 1", h(Some(RouteHint::Primary), None, None, None)),
        ("-- causeway:key=a\n/* causeway:replica */\n SELECT 1", h(Some(RouteHint::Replica), Some("a"), None, None)),
        ("/* CAUSEWAY:PRIMARY */ SELECT 1", h(Some(RouteHint::Primary), None, None, None)),
        ("/* causeway:route=replica */ SELECT 1", h(Some(RouteHint::Replica), None, None, None)),
        ("/* app=web causeway:replica */ SELECT 1", h(Some(RouteHint::Replica), None, None, None)),
        ("/* outer /* causeway:primary */ still outer */ SELECT 1", h(Some(RouteHint::Primary), None, None, None)),
        ("/* causeway:replica */ /* causeway:primary */ SELECT 1", h(Some(RouteHint::Primary), None, None, None)),
        ("/* causeway:route=replica */", h(Some(RouteHint::Replica), None, None, None)),
        ("SELECT 1 /* causeway:primary */", none.clone()),
        ("SELECT /* causeway:primary */ 1", none.clone()),
        ("SELECT 1; /* causeway:primary */ SELECT 2", none.clone()),
        ("/* causeway:secondary */ SELECT 1", none.clone()),
        ("/* causeway:route=elsewhere */ SELECT 1", none.clone()),
        // Malformed tokens are kept so the proxy can refuse them (22023).
        ("/* causeway:min_lsn=zzz */ SELECT 1", h(None, None, Some("zzz"), None)),
        (
            "/* causeway:min_lsn=0/123456789 */ SELECT 1",
            h(None, None, Some("0/123456789"), None),
        ),
        ("/* causeway:key= */ SELECT 1", none.clone()),
        ("/* causeway:priority=a b */ SELECT 1", h(None, None, None, Some("a"))),
        ("/* causeway:priority=a+b */ SELECT 1", none.clone()),
        ("/* hello */ SELECT 1", none.clone()),
        ("/* replica */ SELECT 1", none.clone()),
        ("/* causeway:replica", none.clone()),
    ];
    let cat = catalog();
    for (sql, expected) in cases {
        assert_eq!(run(sql, &cat).hints, expected, "{sql:?}");
    }
    // The hint never changes the access decision.
    assert_eq!(run("/* causeway:replica */ DELETE FROM t", &cat).access, W);
}

#[test]
fn session_commands_are_recognised_only_alone() {
    use SessionCommand as S;
    let set = |n: &str, v: &str| {
        Some(S::Set {
            name: n.into(),
            value: Some(v.into()),
        })
    };
    let reset = |n: &str| Some(S::Reset { name: n.into() });
    let resets = |names: &[Option<&str>]| {
        Some(S::Resets(
            names.iter().map(|n| n.map(str::to_string)).collect(),
        ))
    };
    let cases: Vec<(&str, Option<S>)> = vec![
        ("SET search_path = public", set("search_path", "public")),
        (
            "set SESSION Statement_Timeout to 5000",
            set("statement_timeout", "5000"),
        ),
        ("SET TIME ZONE 'UTC'", set("timezone", "UTC")),
        ("SET ROLE bob", set("role", "bob")),
        ("SET search_path = a, 'b c'", set("search_path", "a, b c")),
        (
            "SET default_transaction_isolation TO SERIALIZABLE",
            set("default_transaction_isolation", "serializable"),
        ),
        (
            "SET search_path FROM CURRENT",
            Some(S::Set {
                name: "search_path".into(),
                value: None,
            }),
        ),
        ("SET application_name TO DEFAULT", reset("application_name")),
        ("RESET search_path", reset("search_path")),
        ("RESET ALL", Some(S::ResetAll)),
        (
            "DEALLOCATE foo",
            Some(S::Deallocate {
                name: Some("foo".into()),
            }),
        ),
        (
            "DEALLOCATE PREPARE foo",
            Some(S::Deallocate {
                name: Some("foo".into()),
            }),
        ),
        ("DEALLOCATE ALL", Some(S::Deallocate { name: None })),
        ("DISCARD ALL", Some(S::DiscardAll)),
        ("DISCARD PLANS", None),
        ("SET LOCAL search_path = x", None),
        ("SET SESSION AUTHORIZATION bob", None),
        ("SET TRANSACTION READ ONLY", None),
        // They shape only the transaction they run in.
        ("SET transaction_isolation = 'serializable'", None),
        ("SET transaction_read_only = on", None),
        ("SET SESSION transaction_deferrable TO on", None),
        ("RESET transaction_isolation", None),
        ("SET causeway.route = 'primary'", None),
        ("SET search_path = x; SELECT 1", None),
        ("SELECT set_config('search_path', 'x', false)", None),
        // Resets among statements that leave no session state: the string is all or nothing.
        (
            "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;",
            resets(&[None]),
        ),
        (
            "RESET search_path; SELECT 1; SET work_mem TO DEFAULT; RESET ALL",
            resets(&[Some("search_path"), Some("work_mem"), None]),
        ),
        ("SET LOCAL a.b = 1; RESET a.c", resets(&[Some("a.c")])),
        ("UPDATE t SET a = 1; RESET ALL", resets(&[None])),
        ("SELECT 1; SELECT 2", None),
        // What the proxy cannot follow keeps pinning: SETs, other session state, transaction
        // control (a COMMIT in the middle keeps what came before it whatever follows).
        ("RESET ALL; SET search_path = x", None),
        ("RESET ALL; LISTEN ch", None),
        ("RESET ALL; SELECT pg_advisory_lock(1)", None),
        ("RESET ALL; CREATE TEMP TABLE tt (a int)", None),
        ("RESET ALL; DEALLOCATE ALL", None),
        ("RESET ALL; DISCARD ALL", None),
        ("BEGIN; RESET ALL; COMMIT", None),
        ("RESET ALL; COMMIT; SELECT 1/0", None),
        ("SAVEPOINT a; RESET ALL", None),
        ("SELECT set_config('a.b', 'x', false); RESET ALL", None),
        ("RESET ALL; SET causeway.route = 'primary'", None),
    ];
    let cat = catalog();
    for (sql, want) in cases {
        assert_eq!(classify(sql, &cat).session, want, "{sql}");
    }
    // A SET the proxy cannot replay still pins.
    assert_eq!(
        classify("SET SESSION AUTHORIZATION bob", &cat).pin,
        Some(P::SessionSet)
    );
    for sql in ["RESET ALL; SET search_path = x", "RESET ALL; LISTEN ch"] {
        assert!(classify(sql, &cat).pin.is_some(), "{sql}");
    }
}
