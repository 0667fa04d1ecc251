//! Where each statement runs: the classification list, in the simple and extended protocols,
//! asserted by which node's routing counter moved and by `inet_server_port()`.

mod common;

use common::Env;

const SETUP: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text);
CREATE TABLE t3 (a int);
INSERT INTO t SELECT g, 'row' || g FROM generate_series(1, 10) g;
CREATE SEQUENCE s;
CREATE MATERIALIZED VIEW mv AS SELECT count(*) FROM t;
CREATE FUNCTION vf() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';
CREATE FUNCTION sf() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1';
CREATE PROCEDURE p() LANGUAGE sql AS 'SELECT 1';
";

/// (statement, expected: true = primary, false = a replica)
const CASES: &[(&str, bool)] = &[
    ("SELECT 1", false),
    ("SELECT * FROM t WHERE id = 1", false),
    ("VALUES (1)", false),
    ("TABLE t", false),
    ("WITH x AS (SELECT 1) SELECT * FROM x", false),
    ("SHOW search_path", false),
    ("EXPLAIN SELECT * FROM t", false),
    ("EXPLAIN DELETE FROM t", false),
    ("SELECT sf()", false),
    ("SELECT now(), count(*) FROM t", false),
    ("SELECT inet_server_port()", false),
    ("/* causeway:primary */ SELECT 1", true),
    ("INSERT INTO t VALUES (100, 'a')", true),
    ("UPDATE t SET v = 'b' WHERE id = 100", true),
    ("DELETE FROM t WHERE id = 100", true),
    (
        "MERGE INTO t USING (SELECT 200 AS id) s ON t.id = s.id WHEN NOT MATCHED THEN INSERT VALUES (s.id, 'm')",
        true,
    ),
    ("CREATE TABLE t2 (a int)", true),
    ("ALTER TABLE t2 ADD COLUMN b int", true),
    ("DROP TABLE t2", true),
    ("TRUNCATE t3", true),
    ("VACUUM t3", true),
    ("ANALYZE t3", true),
    ("CLUSTER t USING t_pkey", true),
    ("REINDEX TABLE t3", true),
    ("REFRESH MATERIALIZED VIEW mv", true),
    ("SELECT * FROM t WHERE id = 1 FOR UPDATE", true),
    ("SELECT * FROM t WHERE id = 1 FOR NO KEY UPDATE", true),
    ("SELECT * FROM t WHERE id = 1 FOR SHARE", true),
    ("SELECT * FROM t WHERE id = 1 FOR KEY SHARE", true),
    ("SELECT * INTO t4 FROM t", true),
    (
        "WITH d AS (DELETE FROM t WHERE id = -1 RETURNING *) SELECT * FROM d",
        true,
    ),
    ("EXPLAIN ANALYZE DELETE FROM t WHERE id = -1", true),
    ("CALL p()", true),
    ("NOTIFY ch", true),
    ("SELECT nextval('s')", true),
    ("SELECT setval('s', 5)", true),
    ("SELECT pg_advisory_xact_lock(1)", true),
    ("SELECT pg_notify('ch', 'x')", true),
    ("SELECT lo_create(0)", true),
    ("SELECT vf()", true),
    ("SELECT 1; INSERT INTO t VALUES (300, 'x')", true),
    ("this is not sql", true),
];

/// Statements that pin the session: each runs on a fresh connection.
const PINNING: &[&str] = &[
    "LISTEN ch",
    "CREATE TEMP TABLE tmp (a int)",
    "SELECT pg_advisory_lock(7)",
    "PREPARE w AS SELECT 1",
    "SELECT set_config('application_name', 'x', false)",
    "DO $$BEGIN END$$",
];

async fn setup() -> Env {
    let env = common::start().await;
    let owner = env.owner().await;
    owner.batch_execute(SETUP).await.expect("setup");
    env.caught_up().await;
    env
}

/// Nodes whose routing counter moved between two snapshots (at least one must have).
fn moved(before: &[u64], after: &[u64], what: &str) -> Vec<usize> {
    let moved: Vec<usize> = (0..before.len())
        .filter(|i| after[*i] != before[*i])
        .collect();
    assert!(
        !moved.is_empty(),
        "{what}: no routing decision ({before:?} -> {after:?})"
    );
    moved
}

/// Whether every node that ran the statement was the primary (true) or a replica (false);
/// a mix fails the test.
fn on_primary(nodes: &[usize], what: &str) -> bool {
    let primary = nodes.contains(&0);
    assert!(
        !primary || nodes.len() == 1,
        "{what}: ran on the primary and a replica: {nodes:?}"
    );
    primary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classification_list_routes_in_simple_and_extended_protocol() {
    let env = setup().await;
    let client = env.client().await;
    for (sql, primary) in CASES {
        let before = env.routed();
        let _ = client.simple_query(sql).await;
        let nodes = moved(&before, &env.routed(), sql);
        assert_eq!(
            on_primary(&nodes, sql),
            *primary,
            "simple protocol: {sql} went to {nodes:?}"
        );
    }
    // Extended protocol (Parse/Bind/Execute/Sync): single statements only. A session of its
    // own: in the first one these reads would follow its writes, and replicas slow to replay
    // them (a loaded machine) would rightly send the reads to the primary.
    let client = env.client().await;
    for (sql, primary) in CASES.iter().filter(|(s, _)| !s.contains(';')) {
        let before = env.routed();
        let _ = client.query(*sql, &[]).await;
        let nodes = moved(&before, &env.routed(), sql);
        assert_eq!(
            on_primary(&nodes, sql),
            *primary,
            "extended protocol: {sql} went to {nodes:?}"
        );
    }
    for sql in PINNING {
        let c = env.client().await;
        let before = env.routed();
        c.simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let nodes = moved(&before, &env.routed(), sql);
        assert_eq!(nodes, vec![0], "{sql} must run on the primary");
        // Pinned: later reads stay on that primary backend.
        let port: i32 = c
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(port as u16, env.node_port(0), "after {sql}");
    }
    // Nothing was ever refused by a replica: no write reached one.
    let retries = env
        .proxy
        .shared
        .stats
        .routed(causeway::route::Reason::ReadOnlyRetry);
    assert_eq!(retries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_spread_over_replicas_and_report_their_port() {
    let env = setup().await;
    let client = env.client().await;
    let mut seen = std::collections::BTreeSet::new();
    let replicas: std::collections::BTreeSet<u16> = [env.node_port(1), env.node_port(2)].into();
    // Twenty reads at least, and on until both replicas answered one: under load the monitor
    // may keep one out of the read set for a while. The primary must never answer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for n in 0.. {
        if n >= 20 && (seen == replicas || std::time::Instant::now() > deadline) {
            break;
        }
        let port: i32 = client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        seen.insert(port as u16);
    }
    assert_eq!(seen, replicas, "reads should use both replicas");
    let row = client
        .query_one(
            "INSERT INTO t VALUES (500, 'w') RETURNING inet_server_port()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0) as u16, env.node_port(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_stay_on_one_backend() {
    let env = setup().await;
    let c = env.client().await;
    let port = |rows: Vec<tokio_postgres::SimpleQueryMessage>| -> u16 {
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
                _ => None,
            })
            .expect("a row")
    };
    let primary = env.node_port(0);
    let replicas = [env.node_port(1), env.node_port(2)];

    // A read-write transaction runs on the primary, reads included.
    c.simple_query("BEGIN").await.unwrap();
    assert_eq!(
        port(c.simple_query("SELECT inet_server_port()").await.unwrap()),
        primary
    );
    c.simple_query("INSERT INTO t VALUES (600, 'tx')")
        .await
        .unwrap();
    assert_eq!(
        port(c.simple_query("SELECT inet_server_port()").await.unwrap()),
        primary
    );
    c.simple_query("COMMIT").await.unwrap();

    // A session that never wrote: its read-only transactions need no token to wait for.
    let ro = env.client().await;
    for begin in [
        "BEGIN READ ONLY",
        "START TRANSACTION READ ONLY",
        "BEGIN; SET TRANSACTION READ ONLY",
    ] {
        for stmt in begin.split("; ") {
            ro.simple_query(stmt).await.unwrap();
        }
        let first = port(ro.simple_query("SELECT inet_server_port()").await.unwrap());
        assert!(replicas.contains(&first), "{begin}: ran on {first}");
        for _ in 0..3 {
            assert_eq!(
                port(ro.simple_query("SELECT inet_server_port()").await.unwrap()),
                first
            );
        }
        let err = ro
            .simple_query("INSERT INTO t VALUES (601, 'ro')")
            .await
            .unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("25006"), "{begin}");
        ro.simple_query("ROLLBACK").await.unwrap();
    }
    // A hot standby refuses SERIALIZABLE, so those read-only transactions run on the primary.
    for begin in [
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY",
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
        "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY",
    ] {
        for stmt in begin.split("; ") {
            ro.simple_query(stmt).await.unwrap();
        }
        let ran = port(ro.simple_query("SELECT inet_server_port()").await.unwrap());
        assert_eq!(ran, primary, "{begin}");
        ro.simple_query("COMMIT").await.unwrap();
    }

    // The transaction API of tokio-postgres (extended protocol).
    let mut c2 = env.client().await;
    let tx = c2.transaction().await.unwrap();
    let p: i32 = tx
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(p as u16, primary);
    tx.execute("INSERT INTO t VALUES (602, 'ext')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // An empty transaction and a rolled-back one behave as on a server.
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("COMMIT").await.unwrap();
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("INSERT INTO t VALUES (603, 'gone')")
        .await
        .unwrap();
    c.simple_query("ROLLBACK").await.unwrap();
    let admin = env.primary_admin().await;
    let n: i64 = admin
        .query_one("SELECT count(*) FROM t WHERE id IN (600, 602, 603)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_and_session_route_setting() {
    let env = setup().await;
    let c = env.client().await;
    let primary = env.node_port(0) as i32;
    let p: i32 = c
        .query_one("/* causeway:primary */ SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(p, primary);
    c.simple_query("SET causeway.route = 'primary'")
        .await
        .unwrap();
    let p: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(p, primary);
    let shown = c.simple_query("SHOW causeway.route").await.unwrap();
    assert!(
        matches!(&shown[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("primary"))
    );
    c.simple_query("SET causeway.route = 'auto'").await.unwrap();
    let p: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(p, primary);
    // A replica hint never sends a write to a replica.
    let row = c
        .query_one(
            "/* causeway:replica */ INSERT INTO t VALUES (700, 'h') RETURNING inet_server_port()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), primary);
    let err = c.simple_query("SET causeway.bogus = 1").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42704"));
    // A known setting with a value it cannot take, as PostgreSQL answers for its own.
    let err = c
        .simple_query("SET causeway.route = 'bogus'")
        .await
        .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "22023", "{err}");
    assert_eq!(
        db.message(),
        "invalid value for parameter \"causeway.route\": \"bogus\""
    );
    // RESET answers RESET, SET … TO DEFAULT answers SET.
    let trusting = common::trust_proxy(&env).await;
    let mut s = common::raw::login(trusting.addr).await;
    for (sql, tag) in [
        ("SET causeway.route = 'primary'", "SET"),
        ("RESET causeway.route", "RESET"),
        ("SET causeway.route TO DEFAULT", "SET"),
        ("RESET causeway.consistency_key", "RESET"),
    ] {
        let replies = common::raw::roundtrip(&mut s, &common::raw::query(sql)).await;
        let done = replies.iter().find(|(t, _)| *t == b'C');
        assert_eq!(
            done.map(|(_, body)| body.as_slice()),
            Some(format!("{tag}\0").as_bytes()),
            "{sql}: {replies:?}"
        );
    }
    // Among other statements a causeway.* setting is refused, never silently left out; the
    // string does not run at all.
    let err = c
        .simple_query("SET causeway.route = 'primary'; INSERT INTO t VALUES (701, 'x')")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err}");
    let shown = c.simple_query("SHOW causeway.route").await.unwrap();
    assert!(
        matches!(&shown[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("auto"))
    );
    let n: i64 = c
        .query_one(
            "/* causeway:primary */ SELECT count(*) FROM t WHERE id = 701",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// The causeway.* commands prepared under a name, as asyncpg, pgx and tokio-postgres prepare
/// every statement: a Parse (with Describe) only prepares, the Execute runs, and the name
/// stays usable and keeps the server's rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causeway_commands_as_named_prepared_statements() {
    use common::raw::{bind, describe_statement, execute, parse, sync};
    let env = setup().await;
    let c = env.client().await;
    // tokio-postgres prepares each query under a name of its own.
    let shown = c.prepare("SHOW causeway.route").await.unwrap();
    assert_eq!(shown.columns()[0].name(), "causeway.route");
    let route = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, String>(0);
    assert_eq!(route(c.query(&shown, &[]).await.unwrap()), "auto");
    let set = c.prepare("SET causeway.route = 'primary'").await.unwrap();
    assert_eq!(
        route(c.query(&shown, &[]).await.unwrap()),
        "auto",
        "applied at Parse"
    );
    c.execute(&set, &[]).await.unwrap();
    assert_eq!(route(c.query(&shown, &[]).await.unwrap()), "primary");
    let lsn = c
        .query_one("SHOW causeway.last_write_lsn", &[])
        .await
        .unwrap();
    assert_eq!(lsn.get::<_, String>(0), "0/0");

    // On the wire: Describe of the statement answers ParameterDescription and RowDescription
    // as a server does, and a second Parse of the name is refused with 42P05.
    let trusting = common::trust_proxy(&env).await;
    let mut s = common::raw::login(trusting.addr).await;
    let tags = |m: Vec<(u8, Vec<u8>)>| -> String {
        m.iter()
            .map(|(t, b)| match t {
                b'E' => format!("E{}", common::raw::error_code(b)),
                _ => (*t as char).to_string(),
            })
            .collect()
    };
    let prepare = [
        parse("r", "SHOW causeway.route"),
        describe_statement("r"),
        sync(),
    ]
    .concat();
    assert_eq!(tags(common::raw::roundtrip(&mut s, &prepare).await), "1tTZ");
    let run = [bind("r"), execute(), sync()].concat();
    assert_eq!(tags(common::raw::roundtrip(&mut s, &run).await), "2DCZ");
    let again = [parse("r", "SHOW causeway.min_lsn"), sync()].concat();
    assert_eq!(
        tags(common::raw::roundtrip(&mut s, &again).await),
        "E42P05Z"
    );
    let value = common::raw::roundtrip(&mut s, &run).await;
    assert_eq!(common::raw::first_value(&value).as_deref(), Some("auto"));
}

/// Servers named by their Unix-socket directory (as libpq's `host=/dir`): data connections,
/// the monitor and cancel requests all go through the socket, logging in with SCRAM as over TCP,
/// unencrypted even with `backend_mode = "require"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_reached_through_a_unix_socket_directory() {
    let env = common::start().await;
    let dir = env.cluster.socket_dir().display().to_string();
    // TLS is never negotiated on a socket (the test servers have none, so over TCP `require`
    // would fail every connection, the monitor's included).
    let config = env
        .config
        .replace("host = \"127.0.0.1\"", &format!("host = \"{dir}\""))
        + "\n[tls]\nbackend_mode = \"require\"\n";
    assert_eq!(config.matches(&dir).count(), 3, "{config}");
    let proxy = common::proxy_for(&config).await;
    let nodes = proxy.shared.cluster.nodes();
    let primary_sock = format!("{dir}/.s.PGSQL.{}", env.cluster.primary.port);
    assert_eq!(nodes[0].addr(), primary_sock);

    let c = env.client_via(&proxy).await;
    // `port` is the server's own setting: inet_server_port() is NULL over a Unix socket.
    let port_of = |rows: Vec<tokio_postgres::SimpleQueryMessage>| common::first_text(&rows);
    let over_socket = port_of(
        c.simple_query("SELECT inet_server_port() IS NULL")
            .await
            .unwrap(),
    );
    assert_eq!(
        over_socket.as_deref(),
        Some("t"),
        "the proxy's server link is not the socket"
    );
    c.batch_execute("CREATE TABLE sock (id int PRIMARY KEY)")
        .await
        .unwrap();
    let mut replica_reads = 0;
    for id in 0..20 {
        let wrote = port_of(
            c.simple_query(&format!(
                "INSERT INTO sock VALUES ({id}) RETURNING current_setting('port')"
            ))
            .await
            .unwrap(),
        );
        assert_eq!(wrote, Some(env.cluster.primary.port.to_string()));
        // Read-your-writes works through the socket too: the token came back over it and the
        // monitor reads the replicas' positions over theirs.
        let rows = c
            .simple_query(&format!(
                "SELECT count(*)::text || ':' || current_setting('port') FROM sock WHERE id = {id}"
            ))
            .await
            .unwrap();
        let seen = port_of(rows).unwrap();
        let (count, port) = seen.split_once(':').unwrap();
        assert_eq!(count, "1", "read after write saw no row (on port {port})");
        if port != env.cluster.primary.port.to_string() {
            replica_reads += 1;
        }
    }
    env.caught_up().await;
    for _ in 0..10 {
        let port = port_of(
            c.simple_query("SELECT current_setting('port')")
                .await
                .unwrap(),
        )
        .unwrap();
        if port != env.cluster.primary.port.to_string() {
            replica_reads += 1;
        }
    }
    assert!(replica_reads > 0, "no read ran on a replica");
    assert!(
        nodes[1..]
            .iter()
            .all(|n| n.lsn.load(std::sync::atomic::Ordering::Acquire) > 0),
        "the monitor read no replay position through the replicas' sockets"
    );

    // A cancel reaches the server through its socket.
    let token = c.cancel_token();
    let started = std::time::Instant::now();
    let sleeper = tokio::spawn(async move {
        let r = c
            .simple_query("/* causeway:primary */ SELECT pg_sleep(20)")
            .await;
        (c, r)
    });
    let mut cancelled = None;
    while started.elapsed() < std::time::Duration::from_secs(15) {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        if sleeper.is_finished() {
            cancelled = Some(sleeper.await.unwrap());
            break;
        }
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    }
    let (c, r) = cancelled.expect("the cancel did not reach the server");
    let code = r.unwrap_err().code().cloned();
    assert_eq!(code, Some(tokio_postgres::error::SqlState::QUERY_CANCELED));
    let v = port_of(c.simple_query("SELECT 7").await.unwrap());
    assert_eq!(v.as_deref(), Some("7"));
    proxy.stop().await;
}

/// Functions called without being named: in attribute notation, as an aggregate's transition
/// function, behind an operator, under a built-in's name, in a view. Each takes a session
/// advisory lock (one writes), never blocking: a lock left on a pooled connection must not
/// hang the next call.
const HIDDEN_CALLS: &str = "
CREATE TABLE log (id serial, msg text);
CREATE FUNCTION lockrow(r t) RETURNS boolean LANGUAGE sql VOLATILE
    AS $$ SELECT pg_try_advisory_lock(1000 + r.id) $$;
CREATE FUNCTION lock_sfunc(state bigint, k bigint) RETURNS bigint LANGUAGE plpgsql VOLATILE
    AS $$ BEGIN PERFORM pg_try_advisory_lock(k); RETURN coalesce(state, 0) + 1; END $$;
CREATE AGGREGATE lock_all(bigint) (SFUNC = lock_sfunc, STYPE = bigint);
CREATE FUNCTION op_lock(a bigint, b bigint) RETURNS boolean LANGUAGE sql VOLATILE
    AS $$ SELECT pg_try_advisory_lock(a::int, b::int) $$;
CREATE OPERATOR ### (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = op_lock);
CREATE FUNCTION public.gen_random_uuid() RETURNS uuid LANGUAGE plpgsql VOLATILE
    AS $$ BEGIN PERFORM pg_try_advisory_lock(31337);
          RETURN '00000000-0000-0000-0000-000000000000'::uuid; END $$;
CREATE VIEW vlock AS SELECT pg_try_advisory_lock(4242) AS got;
CREATE FUNCTION wfn() RETURNS int LANGUAGE sql VOLATILE
    AS $$ INSERT INTO log (msg) VALUES ('wfn') RETURNING id $$;
CREATE VIEW vw AS SELECT wfn() AS id;
CREATE VIEW vvw AS SELECT * FROM vw;
CREATE VIEW vclock AS SELECT now() AS at, random() AS r;
";

/// Where `sql` ran, in the simple and the extended protocol: true for the primary.
async fn ran_on_primary(env: &Env, c: &tokio_postgres::Client, sql: &str) -> [bool; 2] {
    let before = env.routed();
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let simple = on_primary(&moved(&before, &env.routed(), sql), sql);
    let before = env.routed();
    c.query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql} (extended): {e}"));
    let extended = on_primary(&moved(&before, &env.routed(), sql), sql);
    [simple, extended]
}

/// Session advisory locks held on each replica.
async fn replica_advisory_locks(env: &Env) -> Vec<i64> {
    env.advisory_locks(None).await.split_off(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_hidden_from_the_statement_text_run_on_the_primary() {
    let env = setup().await;
    env.owner().await.batch_execute(HIDDEN_CALLS).await.unwrap();
    env.caught_up().await;
    let c = env.client().await;
    for sql in [
        "SELECT t.lockrow FROM t WHERE id = 1",
        "SELECT (t).lockrow FROM t WHERE id = 2",
        "SELECT lock_all(x) FROM generate_series(501, 502) x",
        "SELECT 601::bigint ### 602::bigint",
        "SELECT public.gen_random_uuid()",
        "SELECT gen_random_uuid()",
        "SELECT * FROM vw",
        "SELECT * FROM vvw",
    ] {
        assert_eq!(ran_on_primary(&env, &c, sql).await, [true, true], "{sql}");
    }
    // Columns, pg_catalog's own function and a view of harmless functions stay on replicas.
    for sql in [
        "SELECT t.v FROM t WHERE id = 1",
        "SELECT pg_catalog.gen_random_uuid()",
        "SELECT count(*) FROM t",
        "SELECT * FROM vclock",
    ] {
        assert_eq!(ran_on_primary(&env, &c, sql).await, [false, false], "{sql}");
    }
    // The write went to the primary at once, not by way of a replica's refusal.
    let retries = env
        .proxy
        .shared
        .stats
        .routed(causeway::route::Reason::ReadOnlyRetry);
    assert_eq!(retries, 0);
    assert_eq!(replica_advisory_locks(&env).await, [0, 0]);
}

const UNLOGGED: &str = "
CREATE UNLOGGED TABLE ucache (k int, v text);
INSERT INTO ucache VALUES (1, 'cached');
CREATE VIEW vu AS SELECT * FROM ucache;
CREATE TABLE par (a int) PARTITION BY RANGE (a);
CREATE TABLE par0 PARTITION OF par FOR VALUES FROM (0) TO (10);
CREATE UNLOGGED TABLE par1 PARTITION OF par FOR VALUES FROM (10) TO (20);
CREATE UNLOGGED SEQUENCE useq;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_unlogged_relations_run_on_the_primary() {
    let env = setup().await;
    env.owner().await.batch_execute(UNLOGGED).await.unwrap();
    env.caught_up().await;
    let c = env.client().await;
    for sql in [
        "SELECT * FROM ucache WHERE k = 1",
        "TABLE ucache",
        "SELECT * FROM t JOIN ucache ON t.id = ucache.k",
        "SELECT * FROM vu",
        "SELECT * FROM par",
        "SELECT last_value FROM useq",
        "EXPLAIN SELECT * FROM ucache",
    ] {
        assert_eq!(ran_on_primary(&env, &c, sql).await, [true, true], "{sql}");
    }
    for sql in ["SELECT * FROM par0", "SELECT * FROM t WHERE id = 1"] {
        assert_eq!(ran_on_primary(&env, &c, sql).await, [false, false], "{sql}");
    }
    let retries = env
        .proxy
        .shared
        .stats
        .routed(causeway::route::Reason::ReadOnlyRetry);
    assert_eq!(retries, 0, "a replica was asked for an unlogged relation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_a_replica_refuses_for_an_unlogged_relation_is_rerun_on_the_primary() {
    let env = setup().await;
    let c = env.client().await;
    // The catalog is loaded: a table made now is unknown to it until the next refresh.
    c.simple_query("SELECT 1").await.unwrap();
    env.owner()
        .await
        .batch_execute("CREATE UNLOGGED TABLE fresh (a int); INSERT INTO fresh VALUES (7)")
        .await
        .unwrap();
    env.caught_up().await;
    let retries = || {
        env.proxy
            .shared
            .stats
            .routed(causeway::route::Reason::ReadOnlyRetry)
    };
    let rows = c.simple_query("SELECT a FROM fresh").await.unwrap();
    assert_eq!(common::first_text(&rows).as_deref(), Some("7"));
    assert_eq!(retries(), 1);
    let row = c.query_one("SELECT a FROM fresh", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    assert_eq!(retries(), 2);
    // Inside a transaction nothing is re-run: a read-only one on a replica gets the error.
    c.simple_query("BEGIN READ ONLY").await.unwrap();
    let err = c.simple_query("SELECT a FROM fresh").await.unwrap_err();
    assert_eq!(err.code().map(|s| s.code()), Some("0A000"));
    c.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(retries(), 2);
}

/// A view that takes a session advisory lock pins its reader's session as the call itself
/// would: the lock leaves with the client instead of staying on a pooled connection for the
/// next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_taking_a_session_lock_pins_its_reader() {
    let env = setup().await;
    env.owner().await.batch_execute(HIDDEN_CALLS).await.unwrap();
    env.caught_up().await;
    let c = env.client().await;
    let before = env.routed();
    c.simple_query("SELECT * FROM vlock").await.unwrap();
    assert!(on_primary(&moved(&before, &env.routed(), "vlock"), "vlock"));
    assert!(
        env.proxy
            .shared
            .stats
            .pins
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(
        env.advisory_locks(None).await,
        [1, 0, 0],
        "held on the primary"
    );
    drop(c);
    for _ in 0..50 {
        if env.advisory_locks(None).await == [0, 0, 0] {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the view's advisory lock stayed on the primary after its reader left");
}

/// Polls `sql` (one bigint) on `client` until it is at least `want`, for up to 10 s.
async fn until_count(client: &tokio_postgres::Client, sql: &str, want: i64) -> bool {
    for _ in 0..200 {
        let n: i64 = client.query_one(sql, &[]).await.unwrap().get(0);
        if n >= want {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// Takes an ACCESS EXCLUSIVE lock on `held` on the primary, in a transaction left open on the
/// connection returned, and makes sure a replica gets to replay it: the lock's WAL record is
/// sent once flushed, as any commit (here `primary`'s) flushes it.
async fn lock_held(env: &Env, primary: &tokio_postgres::Client) -> tokio_postgres::Client {
    let locker = env.owner().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    primary
        .batch_execute("INSERT INTO other VALUES (1)")
        .await
        .unwrap();
    locker
}

/// A replica cancels a read for a conflict with recovery: the primary takes an ACCESS
/// EXCLUSIVE lock on the table the read holds, and the replica (`max_standby_streaming_delay
/// = 0`) cancels the read to replay it. The proxy runs the read again on the primary, where
/// it waits for the lock, and the client gets its answer, not the 40001, in the simple and the
/// extended protocol. The replica's own conflict counter shows each cancel happened. With
/// `routing.fallback = "error"` the client gets the 40001 instead. A session the replica ends
/// for such a conflict does not get the replica banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_conflicts_rerun_reads_on_the_primary_and_ban_no_replica() {
    let opts = causeway::launcher::ClusterOptions {
        replicas: 1,
        replica_conf: vec![("max_standby_streaming_delay".into(), "0".into())],
        ..Default::default()
    };
    // Health checks far apart (and, in sticky mode, no replay-position polls between them): a
    // replica banned here stays banned for the rest of the test.
    let env = common::start_with(opts, |cfg| {
        *cfg = cfg.replace(
            "health_check_interval_ms = 200",
            "health_check_interval_ms = 600000",
        );
        cfg.push_str("\n[consistency]\nmode = \"sticky\"\n");
    })
    .await;
    env.owner()
        .await
        .batch_execute("CREATE TABLE held (a int); INSERT INTO held VALUES (1), (2); CREATE TABLE other (a int)")
        .await
        .unwrap();
    env.caught_up().await;
    let replica = common::connect(&env.cluster.superuser_conninfo(&env.cluster.replicas[0])).await;
    let primary = env.primary_admin().await;
    // The simple protocol, then the extended one with a statement prepared on the replica.
    for (round, sql) in [
        "SELECT count(*), pg_sleep(2)::text FROM held",
        "SELECT count(*), pg_sleep(2)::text FROM held WHERE a > $1",
    ]
    .into_iter()
    .enumerate()
    {
        let running = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE query = '{sql}' AND state = 'active'"
        );
        let c = env.client().await;
        let read = tokio::spawn(async move {
            if round == 0 {
                let rows = c.simple_query(sql).await?;
                Ok(common::first_text(&rows).unwrap_or_default())
            } else {
                let row = c.query_one(sql, &[&0i32]).await?;
                Ok::<_, tokio_postgres::Error>(row.get::<_, i64>(0).to_string())
            }
        });
        assert!(
            until_count(&replica, &running, 1).await,
            "round {round}: the read never ran on the replica"
        );
        let locker = lock_held(&env, &primary).await;
        // Run again on the primary, the read waits there for the lock.
        let waiting = format!("{running} AND wait_event_type = 'Lock'");
        assert!(
            until_count(&primary, &waiting, 1).await,
            "round {round}: the cancelled read did not run again on the primary"
        );
        locker.batch_execute("COMMIT").await.unwrap();
        let count = tokio::time::timeout(std::time::Duration::from_secs(20), read)
            .await
            .expect("the read finished")
            .unwrap()
            .expect("the read succeeded");
        assert_eq!(count, "2", "round {round}");
        let conflicts = "SELECT confl_lock FROM pg_stat_database_conflicts WHERE datname = 'app'";
        assert!(
            until_count(&replica, conflicts, round as i64 + 1).await,
            "round {round}: the replica cancelled nothing"
        );
    }
    let routed = env
        .proxy
        .shared
        .stats
        .routed(causeway::route::Reason::RecoveryConflict);
    assert_eq!(routed, 2);

    // Where reads may not fall back to the primary, the client gets the replica's error.
    let strict = common::proxy_for(&format!(
        "{}\n[routing]\nfallback = \"error\"\n",
        env.config
    ))
    .await;
    let sql = "SELECT count(*), pg_sleep(2)::text FROM held WHERE a > 1";
    let running =
        format!("SELECT count(*) FROM pg_stat_activity WHERE query = '{sql}' AND state = 'active'");
    let c = env.client_via(&strict).await;
    let read = tokio::spawn(async move { c.simple_query(sql).await });
    assert!(
        until_count(&replica, &running, 1).await,
        "the read never ran on the replica"
    );
    let locker = lock_held(&env, &primary).await;
    let err = tokio::time::timeout(std::time::Duration::from_secs(20), read)
        .await
        .expect("the read finished")
        .unwrap()
        .expect_err("the replica's cancel reaches the client");
    assert_eq!(err.code().map(|c| c.code()), Some("40001"), "{err}");
    locker.batch_execute("COMMIT").await.unwrap();
    let routed = strict
        .shared
        .stats
        .routed(causeway::route::Reason::RecoveryConflict);
    assert_eq!(routed, 0);

    // A session idle in a read-only transaction on the replica holds the table too, and the
    // replica ends that session with FATAL 40001. The client gets that error and its session
    // ends with it; the replica, which only ended one connection, is not banned for it. (A raw
    // client, which reads the FATAL and then the close, as libpq does at its next statement.)
    let trusting = common::trust_proxy(&env).await;
    let mut s = common::raw::login(trusting.addr).await;
    common::raw::roundtrip(&mut s, &common::raw::query("BEGIN READ ONLY")).await;
    let sql = "SELECT count(*) FROM held WHERE a > 0";
    common::raw::roundtrip(&mut s, &common::raw::query(sql)).await;
    let idle = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE query = '{sql}' AND state = 'idle in transaction'"
    );
    assert!(
        until_count(&replica, &idle, 1).await,
        "the read-only transaction is not on the replica"
    );
    let locker = lock_held(&env, &primary).await;
    let fatal = common::raw::read_until(&mut s, |t| t == b'E').await;
    assert_eq!(
        fatal.last().map(|(_, body)| common::raw::error_code(body)),
        Some("40001".to_string()),
        "{fatal:?}"
    );
    // Then the connection closes (read_until returns at the end of the stream).
    common::raw::read_until(&mut s, |_| false).await;
    locker.batch_execute("COMMIT").await.unwrap();
    let node = &trusting.shared.cluster.replicas()[0];
    assert_eq!(
        node.ban_reason(),
        None,
        "one ended session banned the replica"
    );
    assert!(node.is_usable());
}
