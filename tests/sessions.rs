//! Session semantics under transaction pooling: settings follow their client to any backend
//! and never leak to another client; SET LOCAL and rolled-back SETs leave nothing; DEALLOCATE
//! and DISCARD ALL behave as on a server; session pooling keeps one backend.

mod common;

use common::{connect, raw};
use tokio::io::AsyncWriteExt;
use tokio_postgres::SimpleQueryMessage;

const SETUP: &str = "
CREATE SCHEMA s1;
CREATE TABLE public.marker (v text);
CREATE TABLE s1.marker (v text);
INSERT INTO public.marker VALUES ('public');
INSERT INTO s1.marker VALUES ('s1');
CREATE ROLE reader;
GRANT reader TO app;
GRANT USAGE ON SCHEMA s1 TO app, reader;
GRANT ALL ON ALL TABLES IN SCHEMA public, s1 TO app, reader;
";

/// One connection per pool, so every client shares the same backends.
async fn small_pools() -> common::Env {
    pools_of(1).await
}

/// `primary` connections to the primary and one to each replica.
async fn pools_of(primary: usize) -> common::Env {
    let env = common::start_with(Default::default(), |cfg| {
        *cfg = cfg.replace(
            "[primary]",
            &format!("[pool]\nprimary_max = {primary}\nreplica_max = 1\n\n[primary]"),
        );
    })
    .await;
    env.primary_admin()
        .await
        .batch_execute(SETUP)
        .await
        .unwrap();
    env.caught_up().await;
    env
}

async fn first_value(c: &tokio_postgres::Client, sql: &str) -> String {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// (marker seen, port) of a read.
async fn marker(c: &tokio_postgres::Client, sql: &str) -> (String, u16) {
    let row = c
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    (row.get(0), row.get::<_, i32>(1) as u16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_follow_their_client_and_never_leak() {
    let env = small_pools().await;
    let a = env.client().await;
    let b = env.client().await;
    a.batch_execute("SET search_path = s1, public")
        .await
        .unwrap();
    let read = "SELECT v, inet_server_port() FROM marker";
    let write = "/* causeway:primary */ SELECT v, inet_server_port() FROM marker";
    let mut ports = std::collections::BTreeSet::new();
    for _ in 0..10 {
        // A's own reads (on replicas) and its transactions (on the primary) see s1 ...
        let (v, port) = marker(&a, read).await;
        assert_eq!(v, "s1");
        ports.insert(port);
        let (v, port) = marker(&a, write).await;
        assert_eq!((v.as_str(), port), ("s1", env.node_port(0)));
        // ... and B, on the very same backends, never does.
        let (v, port) = marker(&b, read).await;
        assert_eq!(v, "public", "A's search_path leaked into B on port {port}");
        let (v, _) = marker(&b, write).await;
        assert_eq!(v, "public");
    }
    assert_eq!(
        ports.len(),
        2,
        "reads should still spread over replicas: {ports:?}"
    );
    let tx = "BEGIN; INSERT INTO marker VALUES ('x'); SELECT v FROM marker ORDER BY v LIMIT 1";
    assert_eq!(first_value(&a, tx).await, "s1");
    a.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        first_value(&b, "SHOW search_path").await,
        "\"$user\", public"
    );
    assert_eq!(first_value(&a, "SHOW search_path").await, "s1, public");
    // SET ROLE follows A and is undone for B.
    a.batch_execute("SET ROLE reader").await.unwrap();
    for _ in 0..3 {
        assert_eq!(first_value(&a, "SELECT current_user").await, "reader");
        assert_eq!(first_value(&b, "SELECT current_user").await, "app");
    }
    a.batch_execute("RESET ROLE").await.unwrap();
    assert_eq!(first_value(&a, "SELECT current_user").await, "app");
    // RESET returns to the default.
    a.batch_execute("RESET search_path").await.unwrap();
    assert_eq!(marker(&a, read).await.0, "public");
    // Pinning was never needed.
    let pins = env
        .proxy
        .shared
        .stats
        .pins
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(pins, 0);
}

/// A setting whose text ends in a line comment is replayed whole, and so are the settings
/// after it: the comment must not swallow the `SET ROLE` replayed behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_ending_in_comments_replay_whole() {
    let env = small_pools().await;
    let a = env.client().await;
    let b = env.client().await;
    a.batch_execute("SET application_name = 'billing' -- set by the ORM")
        .await
        .unwrap();
    a.batch_execute("SET search_path = s1, public; -- tagged\n")
        .await
        .unwrap();
    a.batch_execute("SET ROLE reader").await.unwrap();
    let who = "SELECT current_user || ' ' || current_setting('application_name') || ' ' || \
               current_setting('search_path') || ' ' || inet_server_port()";
    let mut ports = std::collections::BTreeSet::new();
    // Six rounds at least, and on until both replicas served A: under load the monitor may
    // keep one out of the read set for a while.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for round in 0.. {
        if round >= 6 && (ports.len() == 2 || std::time::Instant::now() > deadline) {
            break;
        }
        // B takes each backend in turn, so A's settings are replayed on it every time.
        assert!(first_value(&b, who).await.starts_with("app "));
        let got = first_value(&a, who).await;
        let port = got.rsplit(' ').next().unwrap().to_string();
        assert_eq!(
            got,
            format!("reader billing s1, public {port}"),
            "A's settings replayed on port {port}"
        );
        ports.insert(port);
        assert!(
            first_value(&a, &format!("/* causeway:primary */ {who}"))
                .await
                .starts_with("reader billing s1, public "),
            "on the primary"
        );
    }
    assert_eq!(
        ports.len(),
        2,
        "reads should reach both replicas: {ports:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_local_failed_and_rolled_back_sets_leave_nothing() {
    let env = small_pools().await;
    let a = env.client().await;
    let read = "SELECT v FROM marker";
    a.batch_execute("BEGIN; SET LOCAL search_path = s1")
        .await
        .unwrap();
    assert_eq!(first_value(&a, read).await, "s1");
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(first_value(&a, read).await, "public");

    for stmt in ["BEGIN", "SET search_path = s1"] {
        a.batch_execute(stmt).await.unwrap();
    }
    assert_eq!(first_value(&a, read).await, "s1");
    a.batch_execute("ROLLBACK").await.unwrap();
    for _ in 0..3 {
        assert_eq!(first_value(&a, read).await, "public");
    }

    for stmt in ["BEGIN", "SET search_path = s1", "COMMIT"] {
        a.batch_execute(stmt).await.unwrap();
    }
    for _ in 0..3 {
        assert_eq!(first_value(&a, read).await, "s1");
    }

    let err = a
        .batch_execute("SET statement_timeout = 'soon'")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"));
    assert_eq!(first_value(&a, "SHOW statement_timeout").await, "0");

    // An error later in the transaction rolls the SET back too.
    for stmt in ["BEGIN", "SET work_mem = '7MB'"] {
        a.batch_execute(stmt).await.unwrap();
    }
    assert!(a.batch_execute("SELECT 1/0").await.is_err());
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(first_value(&a, "SHOW work_mem").await, "4MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_are_session_settings() {
    let env = small_pools().await;
    let a = connect(&format!(
        "{} application_name=reporting options='-c search_path=s1,public -c statement_timeout=1234'",
        env.conninfo()
    ))
    .await;
    let b = env.client().await;
    for _ in 0..3 {
        assert_eq!(first_value(&a, "SHOW application_name").await, "reporting");
        assert_eq!(first_value(&a, "SHOW statement_timeout").await, "1234ms");
        assert_eq!(first_value(&a, "SELECT v FROM marker").await, "s1");
        assert_eq!(first_value(&b, "SHOW application_name").await, "causeway");
        assert_eq!(first_value(&b, "SELECT v FROM marker").await, "public");
    }
    // A parameter the server refuses refuses the login, as the server would, instead of
    // failing later and leaving the parameters after it (search_path) unset.
    for bad in [
        "-c no_such_setting=1 -c search_path=s1",
        "-c statement_timeout=soon",
    ] {
        let url = format!("{} options='{bad}'", env.conninfo());
        let err = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("login with {bad} was accepted"));
        let code = err.code().map(|c| c.code().to_string());
        assert!(
            matches!(code.as_deref(), Some("42704" | "22023")),
            "{bad}: {err}"
        );
    }
    // Refused parameters leave no trace on the pooled connections.
    for _ in 0..3 {
        assert_eq!(first_value(&b, "SELECT v FROM marker").await, "public");
        assert_eq!(first_value(&b, "SHOW statement_timeout").await, "0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_and_discard_all() {
    let env = small_pools().await;
    // Protocol-level statements by name, as a driver would prepare them.
    let mut raw = common::raw::login(common::trust_proxy(&env).await.addr).await;
    let mut prep = raw::parse("mine", "SELECT v FROM marker");
    prep.extend(raw::sync());
    raw::roundtrip(&mut raw, &prep).await;
    let mut run = raw::bind("mine");
    run.extend(raw::execute());
    run.extend(raw::sync());
    let ok = raw::roundtrip(&mut raw, &run).await;
    assert!(ok.iter().any(|(t, _)| *t == b'D'), "{ok:?}");
    raw::roundtrip(&mut raw, &raw::query("DEALLOCATE mine")).await;
    let gone = raw::roundtrip(&mut raw, &run).await;
    let err = gone.iter().find(|(t, _)| *t == b'E').expect("an error");
    assert_eq!(raw::error_code(&err.1), "26000");
    let unknown = raw::roundtrip(&mut raw, &raw::query("DEALLOCATE nonesuch")).await;
    let err = unknown.iter().find(|(t, _)| *t == b'E').expect("an error");
    assert_eq!(raw::error_code(&err.1), "26000");
    raw::roundtrip(&mut raw, &prep).await;
    raw::roundtrip(&mut raw, &raw::query("DEALLOCATE ALL")).await;
    let gone = raw::roundtrip(&mut raw, &run).await;
    assert!(
        gone.iter().any(|(t, _)| *t == b'E'),
        "DEALLOCATE ALL left it: {gone:?}"
    );

    let a = env.client().await;
    let again = a.prepare("SELECT v FROM marker").await.unwrap();
    a.batch_execute("SET search_path = s1, public")
        .await
        .unwrap();
    a.batch_execute("DISCARD ALL").await.unwrap();
    assert!(
        a.query_one(&again, &[]).await.is_err(),
        "DISCARD ALL drops statements"
    );
    assert_eq!(first_value(&a, "SELECT v FROM marker").await, "public");
    // A pinned session is released by DISCARD ALL (it drops what pinned it).
    a.batch_execute("LISTEN ch").await.unwrap();
    let primary = env.node_port(0).to_string();
    assert_eq!(first_value(&a, "SELECT inet_server_port()").await, primary);
    a.batch_execute("DISCARD ALL").await.unwrap();
    let mut ports = std::collections::BTreeSet::new();
    for _ in 0..10 {
        ports.insert(first_value(&a, "SELECT inet_server_port()").await);
    }
    assert!(
        !ports.contains(&primary),
        "still pinned after DISCARD ALL: {ports:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_shared_plan_is_reprepared() {
    let env = small_pools().await;
    let a = env.client().await;
    let b = env.client().await;
    // A prepares the text first; B's identical statement shares A's backend copy.
    let sa = a
        .prepare("/* causeway:primary */ SELECT * FROM marker")
        .await
        .unwrap();
    a.query(&sa, &[]).await.unwrap();
    env.primary_admin()
        .await
        .batch_execute("ALTER TABLE public.marker ADD COLUMN n int DEFAULT 7")
        .await
        .unwrap();
    // B prepares after the change: with a server of its own it would just work.
    let sb = b
        .prepare("/* causeway:primary */ SELECT * FROM marker")
        .await
        .unwrap();
    assert_eq!(sb.columns().len(), 2);
    let rows = b.query(&sb, &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i32>(1), 7);
    // A was told one column when it prepared: like a server, the proxy refuses rather than
    // send it rows of the new shape.
    let err = a.query(&sa, &[]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err}");
    let msg = err.as_db_error().map(|e| e.message().to_string());
    assert_eq!(
        msg.as_deref(),
        Some("cached plan must not change result type")
    );
    // Named as the server names it: asyncpg re-prepares on this routine only.
    let routine = err.as_db_error().and_then(|e| e.routine());
    assert_eq!(routine, Some("RevalidateCachedQuery"));
    // Re-preparing is the cure, as with a server.
    let sa = a
        .prepare("/* causeway:primary */ SELECT * FROM marker")
        .await
        .unwrap();
    assert_eq!(a.query(&sa, &[]).await.unwrap()[0].get::<_, i32>(1), 7);
}

/// asyncpg prepares with Flush, not Sync. Meeting a shared copy whose plan went stale, such a
/// prepare is run again on a fresh connection like any other, instead of waiting forever for a
/// ReadyForQuery that a Flush never brings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_shared_plan_is_reprepared_for_a_prepare_ended_by_flush() {
    let env = small_pools().await;
    let proxy = common::trust_proxy(&env).await;
    let sql = "/* causeway:primary */ SELECT * FROM marker";
    let mut a = raw::login(proxy.addr).await;
    let mut first = raw::parse("a", sql);
    first.extend(raw::sync());
    raw::roundtrip(&mut a, &first).await;
    env.primary_admin()
        .await
        .batch_execute("ALTER TABLE public.marker ADD COLUMN n int DEFAULT 7")
        .await
        .unwrap();

    let mut b = raw::login(proxy.addr).await;
    let mut prepare = raw::parse("b", sql);
    prepare.extend(raw::describe_statement("b"));
    prepare.extend(raw::flush());
    b.write_all(&prepare).await.unwrap();
    let msgs = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        raw::read_until(&mut b, |t| t == b'T' || t == b'E'),
    )
    .await
    .expect("a prepare ended by Flush got no answer");
    let tags: Vec<char> = msgs.iter().map(|(t, _)| *t as char).collect();
    assert_eq!(tags, ['1', 't', 'T'], "{msgs:?}");
    let columns = i16::from_be_bytes([msgs[2].1[0], msgs[2].1[1]]);
    assert_eq!(columns, 2, "described with the new column");
    let mut run = raw::bind("b");
    run.extend(raw::execute());
    run.extend(raw::sync());
    let msgs = raw::roundtrip(&mut b, &run).await;
    let tags: Vec<char> = msgs.iter().map(|(t, _)| *t as char).collect();
    assert_eq!(tags, ['2', 'D', 'C', 'Z'], "{msgs:?}");
}

/// A FunctionCall (fast path) names its function by OID alone, so what it leaves on the backend
/// (`set_config(…, false)`, a session advisory lock) cannot be followed: it pins the session,
/// its client keeps that state, and the backend is closed when the client leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_calls_pin_the_session_and_never_leak() {
    let env = small_pools().await;
    let proxy = common::trust_proxy(&env).await;
    let mut a = raw::login(proxy.addr).await;
    // set_config(text, text, bool) is OID 2078, pg_advisory_lock(bigint) 2880.
    let set = raw::function_call(2078, &[b"search_path", b"s1", b"false"]);
    let msgs = raw::roundtrip(&mut a, &set).await;
    assert!(msgs.iter().any(|m| m.0 == b'V'), "{msgs:?}");
    let lock = raw::roundtrip(&mut a, &raw::function_call(2880, &[b"4242"])).await;
    assert!(lock.iter().any(|m| m.0 == b'V'), "{lock:?}");
    // The client's own reads see what it set: they stay on its backend.
    for _ in 0..3 {
        let read = raw::roundtrip(&mut a, &raw::query("SELECT v FROM marker")).await;
        assert_eq!(raw::first_value(&read).as_deref(), Some("s1"), "{read:?}");
    }
    let pins = proxy
        .shared
        .stats
        .pins
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(pins, 1);
    drop(a);
    // The next client of the one primary connection sees none of it.
    let b = env.client_via(&proxy).await;
    let (v, _) = marker(
        &b,
        "/* causeway:primary */ SELECT v, inet_server_port() FROM marker",
    )
    .await;
    assert_eq!(v, "public");
    let admin = env.primary_admin().await;
    let locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242";
    let mut held = 1;
    for _ in 0..100 {
        held = admin.query_one(locks, &[]).await.unwrap().get::<_, i64>(0);
        if held == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(held, 0, "the advisory lock outlived its client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_keeps_one_backend() {
    let env = common::start_with(Default::default(), |cfg| {
        *cfg = cfg.replace("[primary]", "[pool]\nmode = \"session\"\n\n[primary]");
    })
    .await;
    let a = env.client().await;
    let pid = first_value(&a, "SELECT pg_backend_pid()").await;
    a.batch_execute("SET search_path = pg_catalog; CREATE TEMP TABLE t (a int)")
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(first_value(&a, "SELECT pg_backend_pid()").await, pid);
        assert_eq!(
            first_value(&a, "SELECT inet_server_port()").await,
            env.node_port(0).to_string()
        );
    }
    assert_eq!(first_value(&a, "SHOW search_path").await, "pg_catalog");
}

/// COMMIT AND CHAIN right after a BEGIN the proxy has not sent yet opens the chained
/// transaction: a ROLLBACK then undoes what ran in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_chain_after_a_deferred_begin_keeps_the_transaction() {
    let env = small_pools().await;
    let owner = env.owner().await;
    owner
        .batch_execute("CREATE TABLE chained (id int)")
        .await
        .unwrap();
    let a = env.client().await;
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("COMMIT AND CHAIN").await.unwrap();
    a.batch_execute("INSERT INTO chained VALUES (1)")
        .await
        .unwrap();
    a.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = owner
        .query_one("SELECT count(*) FROM chained", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n, 0,
        "the INSERT in the chained transaction survived its ROLLBACK"
    );
}

/// Session state set in ways the proxy must see through never reaches another client sharing
/// the backend: SET and RESET through the extended protocol (a prepared RESET that never ran
/// included), DISCARD ALL through it, state changed inside a DO block, and changes a savepoint
/// or COMMIT AND CHAIN leaves the backend holding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_never_crosses_to_another_client() {
    const TENANT: &str = "SELECT coalesce(current_setting('app.tenant', true), '')";
    let env = small_pools().await;
    let client = || async {
        let c = env.client().await;
        c.batch_execute("SET causeway.route = 'primary'")
            .await
            .unwrap();
        c
    };
    let mut leaks = Vec::new();

    // SET through the extended protocol keeps each client's own value.
    let (a, b) = (client().await, client().await);
    a.execute("SET app.tenant = '42'", &[]).await.unwrap();
    b.execute("SET app.tenant = '7'", &[]).await.unwrap();
    if first_value(&a, TENANT).await != "42" || first_value(&b, TENANT).await != "7" {
        leaks.push("SET through the extended protocol");
    }
    drop((a, b));

    // A RESET only prepared, never executed, changes nothing.
    let (a, b) = (client().await, client().await);
    a.batch_execute("SET app.tenant = '42'").await.unwrap();
    let _prepared = a.prepare("RESET app.tenant").await.unwrap();
    if first_value(&b, TENANT).await == "42" || first_value(&a, TENANT).await != "42" {
        leaks.push("a prepared RESET that never ran");
    }
    drop((a, b));

    // DISCARD ALL through the extended protocol, by a client pinned by a temp table.
    let a = client().await;
    a.batch_execute("CREATE TEMP TABLE marker (v text); INSERT INTO marker VALUES ('a-secret')")
        .await
        .unwrap();
    let _ = a.execute("DISCARD ALL", &[]).await;
    let b = client().await;
    let seen = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        first_value(&b, "SELECT v FROM marker"),
    )
    .await;
    if seen.as_deref().is_ok_and(|v| v != "public") {
        leaks.push("DISCARD ALL through the extended protocol");
    }
    drop((a, b));

    // State changed inside DO blocks: the client keeps its backend, which closes with it.
    for (change, check, clean) in [
        (
            "DO $$BEGIN PERFORM set_config('app.tenant', '42', false); END$$",
            TENANT,
            "",
        ),
        (
            "DO $$BEGIN EXECUTE 'SET ROLE reader'; END$$",
            "SELECT current_user::text",
            "app",
        ),
        (
            "DO $$BEGIN CREATE TEMP TABLE marker AS SELECT 'a-secret'::text AS v; END$$",
            "SELECT v FROM marker",
            "public",
        ),
    ] {
        let a = client().await;
        a.batch_execute(change).await.unwrap();
        drop(a);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let b = client().await;
        if first_value(&b, check).await != clean {
            leaks.push(change);
        }
    }

    // A RESET undone by ROLLBACK TO SAVEPOINT, and one rolled back after COMMIT AND CHAIN.
    for steps in [
        &[
            "BEGIN",
            "SET app.tenant = '42'",
            "SAVEPOINT s",
            "RESET app.tenant",
            "ROLLBACK TO SAVEPOINT s",
            "COMMIT",
        ][..],
        &[
            "BEGIN",
            "SET app.tenant = '42'",
            "COMMIT AND CHAIN",
            "RESET app.tenant",
            "ROLLBACK",
        ][..],
    ] {
        let (a, b) = (client().await, client().await);
        for s in steps {
            a.batch_execute(s).await.unwrap();
        }
        if first_value(&b, TENANT).await == "42" {
            leaks.push(steps[2]);
        }
    }
    assert!(leaks.is_empty(), "state crossed clients after: {leaks:#?}");
}

/// A replay of the client's settings that the server refuses (here a role it may no longer
/// take) leaves what the backend carries unknown: that connection is closed, so none of the
/// client's later requests runs there as if its settings were in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_settings_replay_closes_its_backend() {
    const WHO: &str = "SELECT current_user || ' ' || v FROM marker";
    let env = small_pools().await;
    let client = || async {
        let c = env.client().await;
        c.batch_execute("SET causeway.route = 'primary'")
            .await
            .unwrap();
        c
    };
    let a = client().await;
    a.batch_execute("SET search_path = s1, public")
        .await
        .unwrap();
    a.batch_execute("SET ROLE reader").await.unwrap();
    assert_eq!(first_value(&a, WHO).await, "reader s1");
    env.primary_admin()
        .await
        .batch_execute(
            "CREATE TABLE public.ran_as (who text); GRANT ALL ON public.ran_as TO PUBLIC; \
             REVOKE reader FROM app",
        )
        .await
        .unwrap();
    // B takes the one primary connection, so A's settings must be replayed after it.
    let b = client().await;
    assert_eq!(first_value(&b, WHO).await, "app public");
    for _ in 0..3 {
        match a.simple_query(WHO).await {
            Err(e) => assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}"),
            Ok(rows) => assert_eq!(
                common::first_text(&rows).as_deref(),
                Some("reader s1"),
                "A's request ran without its settings"
            ),
        }
    }
    assert_eq!(first_value(&b, WHO).await, "app public");
    // Whatever A sends next must not run with the login's privileges instead of its role's:
    // neither on its own, nor as the first statement of a transaction.
    const INSERT: &str = "INSERT INTO public.ran_as VALUES (current_user)";
    let _ = first_value(&b, WHO).await;
    let err = a.batch_execute(INSERT).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err}");
    let _ = first_value(&b, WHO).await;
    a.batch_execute("BEGIN").await.unwrap();
    let err = a.batch_execute(INSERT).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err}");
    let err = a.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"), "{err}");
    a.batch_execute("ROLLBACK").await.unwrap();
    let ran: i64 = env
        .primary_admin()
        .await
        .query_one("SELECT count(*) FROM public.ran_as", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ran, 0, "a request ran without the role it was meant for");
}

/// A standby refuses every transaction of a session whose default isolation is serializable
/// (0A000, "cannot use serializable mode in a hot standby"). Such a session, however the
/// setting was made, reads on the primary, where its reads work as they would on a server of
/// its own; pooled replica connections never carry that default to other clients. A
/// serializable `SET TRANSACTION` outside a transaction block, which the primary only warns
/// about, runs there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_sessions_read_on_the_primary() {
    const PORT: &str = "SELECT inet_server_port()::text";
    let env = small_pools().await;
    let primary = env.node_port(0).to_string();
    let with_options = |options: &str| {
        let conninfo = format!("{} options='{options}'", env.conninfo());
        async move { connect(&conninfo).await }
    };
    let by_set = env.client().await;
    by_set
        .batch_execute("SET default_transaction_isolation = 'SERIALIZABLE'")
        .await
        .unwrap();
    let by_word = env.client().await;
    by_word
        .batch_execute("set session Default_Transaction_Isolation to serializable")
        .await
        .unwrap();
    let by_option = with_options("-c default_transaction_isolation=serializable").await;
    let by_long_option = with_options("--default-transaction-isolation=Serializable").await;
    let unrelated = [
        env.client().await,
        with_options("-c statement_timeout=5000").await,
    ];
    for _ in 0..4 {
        for c in [&by_set, &by_word, &by_option, &by_long_option] {
            assert_eq!(first_value(c, PORT).await, primary);
            assert_eq!(
                first_value(c, "SHOW default_transaction_isolation").await,
                "serializable"
            );
            c.batch_execute("BEGIN READ ONLY").await.unwrap();
            assert_eq!(
                first_value(c, "SHOW transaction_isolation").await,
                "serializable"
            );
            assert_eq!(first_value(c, PORT).await, primary);
            c.batch_execute("COMMIT").await.unwrap();
        }
        for c in &unrelated {
            assert_ne!(first_value(c, PORT).await, primary);
            assert_eq!(
                first_value(c, "SHOW default_transaction_isolation").await,
                "read committed"
            );
        }
    }
    by_set
        .batch_execute("RESET default_transaction_isolation")
        .await
        .unwrap();
    assert_ne!(first_value(&by_set, PORT).await, primary);

    let c = env.client().await;
    for sql in [
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET transaction_isolation = 'serializable'",
        "SET TRANSACTION READ ONLY, ISOLATION LEVEL SERIALIZABLE",
    ] {
        c.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY")
        .await
        .unwrap();
    assert_eq!(first_value(&c, PORT).await, primary);
    c.batch_execute("COMMIT").await.unwrap();
    // They shaped only their own transaction.
    assert_ne!(first_value(&c, PORT).await, primary);
    assert_eq!(
        first_value(&c, "SHOW transaction_isolation").await,
        "read committed"
    );

    // set_config pins the session to its primary connection, so drop it last.
    let pinned = env.client().await;
    first_value(
        &pinned,
        "SELECT set_config('default_transaction_isolation', 'serializable', false)",
    )
    .await;
    assert_eq!(first_value(&pinned, PORT).await, primary);
    drop(pinned);
    for c in &unrelated {
        assert_ne!(first_value(c, PORT).await, primary);
    }
}

/// RESET, RESET ALL, `SET … TO DEFAULT` and DISCARD ALL return each setting to the client's
/// startup value, and one not given at startup to the server's default, as a server of its
/// own would: on any backend, inside a transaction, and on a pinned session's backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_return_to_startup_values() {
    const SHOW: &str = "SELECT concat_ws(' | ', current_setting('search_path'), \
        current_setting('statement_timeout'), current_setting('application_name'), \
        current_setting('work_mem'))";
    const STARTUP: &str = "s1,public | 1234ms | myapp | 4MB";
    const CHANGE: &str = "SET search_path = public; SET statement_timeout = 5; \
        SET application_name = other; SET work_mem = '7MB'";
    let env = small_pools().await;
    let a = connect(&format!(
        "{} application_name=myapp options='-c search_path=s1,public -c statement_timeout=1234'",
        env.conninfo()
    ))
    .await;
    let b = env.client().await;
    let change = |c: &'static str| {
        let a = &a;
        async move {
            for stmt in c.split("; ") {
                a.batch_execute(stmt).await.unwrap();
            }
        }
    };
    assert_eq!(first_value(&a, SHOW).await, STARTUP);
    for reset in [
        "RESET ALL",
        "DISCARD ALL",
        "RESET search_path; RESET statement_timeout; RESET application_name; RESET work_mem",
        "SET search_path TO DEFAULT; SET statement_timeout TO DEFAULT; \
         SET application_name TO DEFAULT; SET work_mem TO DEFAULT",
    ] {
        change(CHANGE).await;
        assert_ne!(first_value(&a, SHOW).await, STARTUP);
        for stmt in reset.split("; ") {
            a.batch_execute(stmt).await.unwrap();
        }
        for _ in 0..3 {
            assert_eq!(first_value(&a, SHOW).await, STARTUP, "after {reset}");
            assert_eq!(
                first_value(&b, SHOW).await,
                "\"$user\", public | 0 | causeway | 4MB",
                "B after A's {reset}"
            );
        }
    }
    // In a transaction, RESET shows the startup value at once, and keeps it once committed.
    a.batch_execute("SET search_path = public").await.unwrap();
    for stmt in ["BEGIN", "RESET search_path"] {
        a.batch_execute(stmt).await.unwrap();
    }
    assert_eq!(first_value(&a, "SHOW search_path").await, "s1,public");
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(first_value(&a, SHOW).await, STARTUP);
    // A pinned session keeps its backend, which ran the RESET itself.
    a.batch_execute("LISTEN ch").await.unwrap();
    change(CHANGE).await;
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(first_value(&a, SHOW).await, STARTUP);
    change(CHANGE).await;
    a.batch_execute("RESET search_path").await.unwrap();
    assert_eq!(first_value(&a, SHOW).await, "s1,public | 5ms | other | 7MB");
}

/// asyncpg's Pool resets a connection it takes back with one string, `SELECT
/// pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`. Resets among statements
/// that leave no session state are followed rather than pinned: the session's reads keep
/// reaching replicas, with the settings the server has after the string (and none of its
/// changes when it failed). A SET among other statements still pins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_among_other_statements_do_not_pin() {
    const PORT: &str = "SELECT inet_server_port()::text";
    let env = small_pools().await;
    let primary = env.node_port(0).to_string();
    let pins = || {
        env.proxy
            .shared
            .stats
            .pins
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let a = connect(&format!(
        "{} options='-c search_path=s1,public'",
        env.conninfo()
    ))
    .await;
    a.batch_execute("SET work_mem = '7MB'").await.unwrap();
    a.batch_execute("SET search_path = public").await.unwrap();
    a.batch_execute("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;")
        .await
        .unwrap();
    let mut ports = std::collections::BTreeSet::new();
    for _ in 0..6 {
        ports.insert(first_value(&a, PORT).await);
        assert_eq!(first_value(&a, "SELECT v FROM marker").await, "s1");
        assert_eq!(first_value(&a, "SHOW work_mem").await, "4MB");
    }
    assert!(!ports.contains(&primary), "pinned: {ports:?}");
    assert_eq!(pins(), 0);
    // A string that fails changes nothing.
    a.batch_execute("SET work_mem = '7MB'").await.unwrap();
    assert!(a.batch_execute("RESET work_mem; SELECT 1/0").await.is_err());
    for _ in 0..3 {
        assert_eq!(first_value(&a, "SHOW work_mem").await, "7MB");
    }
    a.batch_execute("RESET search_path; SELECT 1; RESET work_mem")
        .await
        .unwrap();
    assert_eq!(first_value(&a, "SHOW work_mem").await, "4MB");
    assert_eq!(pins(), 0);
    // A SET among other statements is not followed: the session keeps its backend.
    a.batch_execute("SELECT 1; SET search_path = public")
        .await
        .unwrap();
    assert_eq!(pins(), 1);
    assert_eq!(first_value(&a, PORT).await, primary);
    assert_eq!(first_value(&a, "SELECT v FROM marker").await, "public");
    // On that backend too, a failed string leaves the settings as they were.
    assert!(a.batch_execute("SELECT 1/0; RESET ALL").await.is_err());
    assert_eq!(first_value(&a, "SELECT v FROM marker").await, "public");
    a.batch_execute("SELECT 1; RESET ALL").await.unwrap();
    assert_eq!(first_value(&a, "SELECT v FROM marker").await, "s1");
}

/// Rows of every result of a simple query string, first column, as text.
async fn column(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect()
}

/// The SQLSTATE a statement fails with, or `None` if it succeeds.
async fn error_code(c: &tokio_postgres::Client, sql: &str) -> Option<String> {
    c.simple_query(sql)
        .await
        .err()
        .map(|e| e.code().map_or("none", |s| s.code()).to_string())
}

/// Objects a client makes in its temporary schema, whether it names `pg_temp` or its
/// search_path lists it (set by SET or at startup), stay with that client: its own reads find
/// them (never a permanent table of the same name on a replica), and with one connection per
/// pool the next client, on the very backends it used, finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_objects_never_reach_another_client() {
    let env = small_pools().await;
    env.primary_admin()
        .await
        .batch_execute(
            "CREATE TABLE public.secret (a text); INSERT INTO public.secret VALUES ('permanent');
             GRANT ALL ON public.secret TO app;",
        )
        .await
        .unwrap();
    env.caught_up().await;
    let with_options = |options: &str| {
        let conninfo = format!("{} options='{options}'", env.conninfo());
        async move { connect(&conninfo).await }
    };
    let mut leaks = Vec::new();
    let cases: [(&str, &[&str], &str); 5] = [
        (
            "",
            &[
                "SET search_path = pg_temp, public",
                "CREATE TABLE secret (a text)",
                "INSERT INTO secret VALUES ('private')",
            ],
            "SELECT a FROM pg_temp.secret",
        ),
        (
            "-c search_path=pg_temp,public",
            &[
                "CREATE TABLE secret (a text)",
                "INSERT INTO secret VALUES ('private')",
            ],
            "SELECT a FROM pg_temp.secret",
        ),
        (
            "",
            &[
                "CREATE FUNCTION pg_temp.secret() RETURNS text LANGUAGE sql AS $$ SELECT 'private' $$",
            ],
            "SELECT pg_temp.secret()",
        ),
        (
            "",
            &["CREATE DOMAIN pg_temp.secret AS text CHECK (VALUE = 'private')"],
            "SELECT 'private'::pg_temp.secret::text",
        ),
        (
            "",
            &[
                "BEGIN",
                "SET search_path = pg_temp, public",
                "CREATE TABLE secret (a text)",
                "INSERT INTO secret VALUES ('private')",
                "COMMIT",
            ],
            "SELECT a FROM pg_temp.secret",
        ),
    ];
    for (options, make, probe) in cases {
        let a = with_options(options).await;
        for s in make {
            if let Err(e) = a.batch_execute(s).await {
                leaks.push(format!("{make:?}: {s} failed: {e:?}"));
            }
        }
        // Twice: a read must not wander to a replica after the first.
        for _ in 0..2 {
            match a.simple_query(probe).await {
                Ok(m) if common::first_text(&m).as_deref() == Some("private") => {}
                other => leaks.push(format!(
                    "{make:?}: the client lost its own object: {other:?}"
                )),
            }
        }
        if make.iter().any(|s| s.contains("search_path")) || !options.is_empty() {
            let own = first_value(&a, "SELECT a FROM secret").await;
            if own != "private" {
                leaks.push(format!(
                    "{make:?}: the client read {own:?} for its own table"
                ));
            }
        }
        drop(a);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let b = env.client().await;
        let hinted = format!("/* causeway:primary */ {probe}");
        if let Ok(m) = b.simple_query(&hinted).await {
            leaks.push(format!(
                "{make:?}: the next client saw {:?}",
                common::first_text(&m)
            ));
        }
    }
    assert!(leaks.is_empty(), "{leaks:#?}");
}

/// With standard_conforming_strings off the server ends a string literal where the proxy's
/// parser does not: `'\' , '` is one literal to it, so the text below runs a second statement
/// the proxy never saw. Such a session keeps one primary backend, which closes with it, so the
/// hidden statement runs on the primary and nothing it leaves (a session lock) reaches anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonstandard_strings_keep_the_session_on_one_primary_backend() {
    const HIDDEN: &str =
        r"SELECT '\' , ' ; SELECT inet_server_port()::text, pg_advisory_lock(99); --'";
    // Each of the three sessions below keeps a primary backend.
    let env = pools_of(3).await;
    let primary = env.node_port(0).to_string();
    let locks_held = || env.advisory_locks(Some(99));
    let by_set = env.client().await;
    by_set
        .batch_execute("SET standard_conforming_strings = off")
        .await
        .unwrap();
    let by_option = connect(&format!(
        "{} options='-c standard_conforming_strings=off'",
        env.conninfo()
    ))
    .await;
    let in_a_string = env.client().await;
    in_a_string
        .batch_execute("SELECT 1; SET standard_conforming_strings = off")
        .await
        .unwrap();
    for (what, c) in [
        ("SET", &by_set),
        ("options", &by_option),
        ("a SET among others", &in_a_string),
    ] {
        let rows = column(c, HIDDEN).await;
        assert_eq!(rows, [r"' , ".to_string(), primary.clone()], "{what}");
        assert_eq!(
            first_value(c, "SHOW standard_conforming_strings").await,
            "off"
        );
        c.batch_execute("SELECT pg_advisory_unlock_all()")
            .await
            .unwrap();
    }
    // Left holding the hidden statement's lock: it goes with its client.
    column(&by_set, HIDDEN).await;
    drop((by_set, by_option, in_a_string));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(locks_held().await, [0, 0, 0]);
    // Another client reads strings as standard.
    let b = env.client().await;
    assert_eq!(column(&b, r"SELECT '\' , ' ; SELECT 2; --'").await.len(), 1);
    assert_eq!(
        first_value(&b, "SHOW standard_conforming_strings").await,
        "on"
    );
}

/// A driver escapes literals by the standard_conforming_strings it is told at login: the
/// proxy tells it what the login asked for, not the server's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_greeting_reports_the_strings_the_login_asked_for() {
    let env = common::start().await;
    let proxy = common::trust_proxy(&env).await;
    for (options, want) in [
        (None, "on"),
        (Some("-c standard_conforming_strings=off"), "off"),
        (Some("-c standard_conforming_strings=false"), "off"),
    ] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let mut params = vec![("user", "app"), ("database", "app")];
        params.extend(options.map(|o| ("options", o)));
        s.write_all(&raw::startup(&params)).await.unwrap();
        let msgs = raw::read_until_ready(&mut s).await;
        let reported: Vec<String> = msgs
            .iter()
            .filter(|m| m.0 == b'S')
            .map(|m| String::from_utf8_lossy(&m.1).into_owned())
            .filter(|p| p.starts_with("standard_conforming_strings\0"))
            .collect();
        assert_eq!(
            reported,
            [format!("standard_conforming_strings\0{want}\0")],
            "{options:?}"
        );
    }
}

/// Statements whose class comes from a literal are not shared by shape: one client's
/// `SET transaction_read_only = 'on'` does not make another's `= 'off'` a read-only transaction
/// on a replica, nor one's `'read committed'` send another's `'serializable'` to a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_read_by_value_are_classified_by_value() {
    let env = small_pools().await;
    let a = env.client().await;
    for s in [
        "BEGIN",
        "SET transaction_read_only =   'on'",
        "SELECT 1",
        "COMMIT",
    ] {
        a.batch_execute(s).await.unwrap();
    }
    let b = env.client().await;
    b.batch_execute("BEGIN").await.unwrap();
    b.batch_execute("SET transaction_read_only =   'off'")
        .await
        .unwrap();
    let write = b
        .batch_execute("INSERT INTO marker VALUES ('read-write')")
        .await;
    b.batch_execute("ROLLBACK").await.unwrap();
    assert!(write.is_ok(), "read-write transaction refused: {write:?}");
    a.batch_execute("SET transaction_isolation =   'read committed'")
        .await
        .unwrap();
    assert_eq!(
        error_code(&b, "SET transaction_isolation =   'serializable'").await,
        None
    );
}

/// Drivers that ask `SHOW transaction_read_only` to find a writable server (pgJDBC's
/// targetServerType, libpq's target_session_attrs before PostgreSQL 14) find one: outside a
/// transaction the primary answers; inside a read-only transaction its own backend does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writability_questions_are_answered_by_the_primary() {
    let env = small_pools().await;
    let c = env.client().await;
    for _ in 0..3 {
        assert_eq!(first_value(&c, "SHOW transaction_read_only").await, "off");
        let prepared = c
            .query_one("SHOW transaction_read_only", &[])
            .await
            .unwrap();
        assert_eq!(prepared.get::<_, String>(0), "off");
        assert_eq!(first_value(&c, "SHOW in_hot_standby").await, "off");
    }
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(first_value(&c, "SHOW transaction_read_only").await, "on");
    c.batch_execute("COMMIT").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SET TRANSACTION READ ONLY").await.unwrap();
    // Its first statement chooses the server with the modes named: a replica for a read.
    assert_eq!(
        first_value(&c, "SELECT pg_is_in_recovery()::text").await,
        "true",
        "a read-only transaction still runs on a replica"
    );
    assert_eq!(first_value(&c, "SHOW transaction_read_only").await, "on");
    c.batch_execute("COMMIT").await.unwrap();
}

/// In session pooling a client's connection goes back to the pool when it leaves: settings the
/// proxy did not follow are reset before the next client gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_resets_what_it_did_not_follow() {
    let env = common::start_with(Default::default(), |cfg| {
        *cfg = cfg.replace(
            "[primary]",
            "[pool]\nmode = \"session\"\nprimary_max = 1\n\n[primary]",
        );
    })
    .await;
    let a = env.client().await;
    a.batch_execute(
        "SELECT 1; SET search_path = pg_temp, public; SET standard_conforming_strings = off",
    )
    .await
    .unwrap();
    assert_eq!(
        first_value(&a, "SHOW standard_conforming_strings").await,
        "off"
    );
    drop(a);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let b = env.client().await;
    assert_eq!(
        first_value(&b, "SHOW standard_conforming_strings").await,
        "on"
    );
    assert_eq!(
        first_value(&b, "SHOW search_path").await,
        "\"$user\", public"
    );
}

/// In session pooling a client that leaves state on its connection that no reset undoes (a
/// temporary table, a session advisory lock, a LISTEN) takes the connection with it: the next
/// client never finds any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_never_hands_on_session_state() {
    let env = common::start_with(Default::default(), |cfg| {
        *cfg = cfg.replace(
            "[primary]",
            "[pool]\nmode = \"session\"\nprimary_max = 1\n\n[primary]",
        );
    })
    .await;
    let a = env.client().await;
    a.batch_execute("CREATE TEMP TABLE private_notes (t text)")
        .await
        .unwrap();
    a.batch_execute("INSERT INTO private_notes VALUES ('secret')")
        .await
        .unwrap();
    a.batch_execute("SELECT pg_advisory_lock(4343)")
        .await
        .unwrap();
    a.batch_execute("LISTEN private_channel").await.unwrap();
    // An SQL-level prepared statement lives on the client's connection, and so does its end.
    a.batch_execute("PREPARE mine AS SELECT 1").await.unwrap();
    a.batch_execute("EXECUTE mine").await.unwrap();
    a.batch_execute("DEALLOCATE mine").await.unwrap();
    drop(a);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let b = env.client().await;
    let e = b
        .simple_query("SELECT t FROM pg_temp.private_notes")
        .await
        .unwrap_err();
    assert_eq!(
        e.as_db_error().map(|d| d.code()),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE),
        "{e}"
    );
    assert_eq!(
        first_value(
            &b,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        )
        .await,
        "0"
    );
    assert_eq!(
        first_value(&b, "SELECT count(*) FROM pg_listening_channels()").await,
        "0"
    );
}

/// In session pooling the next client on a connection finds it as a fresh server connection
/// would be: no `currval`/`lastval` of the previous client's sequences, none of its prepared
/// statements, and the statements it prepares itself work at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_hands_on_a_connection_as_fresh() {
    let env = common::start_with(Default::default(), |cfg| {
        *cfg = cfg.replace(
            "[primary]",
            "[pool]\nmode = \"session\"\nprimary_max = 1\n\n[primary]",
        );
    })
    .await;
    let a = env.client().await;
    let pid = first_value(&a, "SELECT pg_backend_pid()").await;
    a.batch_execute("CREATE SEQUENCE handed_on").await.unwrap();
    assert_eq!(first_value(&a, "SELECT nextval('handed_on')").await, "1");
    assert_eq!(first_value(&a, "SELECT lastval()").await, "1");
    // A statement the proxy prepares on the connection for this client.
    let n: i32 = a
        .query_one("SELECT $1::int + 1", &[&1i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    drop(a);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let b = env.client().await;
    assert_eq!(
        first_value(&b, "SELECT pg_backend_pid()").await,
        pid,
        "B was meant to get A's connection"
    );
    for sql in ["SELECT currval('handed_on')", "SELECT lastval()"] {
        let e = b.simple_query(sql).await.unwrap_err();
        assert_eq!(
            e.as_db_error().map(|d| d.code()),
            Some(&tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
            "{sql}: {e}"
        );
    }
    // A's statement is gone (the proxy's own `causeway_token` may be there, for B).
    assert_eq!(
        first_value(
            &b,
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%$1::int + 1'"
        )
        .await,
        "0"
    );
    let n: i32 = b
        .query_one("SELECT $1::int + 1", &[&2i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    assert_eq!(first_value(&b, "SELECT nextval('handed_on')").await, "2");
    assert_eq!(first_value(&b, "SELECT currval('handed_on')").await, "2");
}
