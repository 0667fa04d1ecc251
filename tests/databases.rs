//! Databases created, cloned, renamed and dropped through the proxy, as test runners and
//! migration tools do: a database the replicas have not replayed yet is read on the primary
//! without banning them, and the pool's idle connections never keep a database busy.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::Env;

/// A cluster whose application user may create databases, replayed everywhere.
async fn with_createdb(extra: &str) -> Env {
    let extra = extra.to_string();
    let env = common::start_with(Default::default(), move |cfg| cfg.push_str(&extra)).await;
    env.primary_admin()
        .await
        .batch_execute("ALTER ROLE app CREATEDB")
        .await
        .unwrap();
    env.caught_up().await;
    env
}

/// Connection string for database `db` through `port` (a proxy).
fn conninfo_db(env: &Env, port: u16, db: &str) -> String {
    env.conninfo()
        .replace(&format!("port={}", env.port()), &format!("port={port}"))
        .replace("dbname=app", &format!("dbname={db}"))
}

/// Stops (or resumes) WAL replay on every replica.
fn replay(env: &Env, on: bool) {
    let sql = if on {
        "SELECT pg_wal_replay_resume()"
    } else {
        "SELECT pg_wal_replay_pause()"
    };
    for r in &env.cluster.replicas {
        tokio::task::block_in_place(|| env.cluster.psql(r, sql)).unwrap();
    }
}

/// Which server answered a read, and whether it is a standby.
async fn where_read(c: &tokio_postgres::Client) -> (u16, bool) {
    let row = c
        .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
        .await
        .unwrap();
    (row.get::<_, i32>(0) as u16, row.get(1))
}

/// No replica was banned or counted a failure.
fn replicas_unharmed(proxy: &causeway::server::Running) {
    for n in proxy.shared.cluster.replicas().iter() {
        assert!(n.is_usable(), "{} banned: {:?}", n.name, n.ban_reason());
        assert_eq!(
            n.errors.load(Ordering::SeqCst),
            0,
            "{} counted errors",
            n.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_the_replicas_lack_is_read_on_the_primary_and_bans_nobody() {
    let env = with_createdb("").await;
    let strict = common::proxy_for(&format!(
        "{}\n[routing]\nfallback = \"error\"\n",
        env.config
    ))
    .await;
    replay(&env, false);
    let app = env.client().await;
    app.batch_execute("CREATE DATABASE fresh").await.unwrap();

    // fallback = "primary": the read runs, on the primary, as often as it is asked.
    let fresh = common::connect(&conninfo_db(&env, env.port(), "fresh")).await;
    for _ in 0..5 {
        assert_eq!(where_read(&fresh).await, (env.node_port(0), false));
    }
    replicas_unharmed(&env.proxy);
    // Other databases' reads keep their replicas (a session that has not written: `app`
    // waits for its own CREATE DATABASE).
    let other = env.client().await;
    let (port, standby) = where_read(&other).await;
    assert!(
        standby,
        "a read of database app left the replicas (port {port})"
    );
    replicas_unharmed(&env.proxy);

    // fallback = "error": the client is told why, and the replicas stay in use.
    let fresh_strict = common::connect(&conninfo_db(&env, strict.addr.port(), "fresh")).await;
    let err = fresh_strict
        .query_one("SELECT 1", &[])
        .await
        .expect_err("no replica has database fresh yet");
    let db = err.as_db_error().expect("an error from the proxy");
    assert_eq!(db.code().code(), "57P03");
    assert!(
        db.message()
            .contains("database \"fresh\" does not exist (3D000)")
            && db.message().contains("routing.fallback is \"error\""),
        "{}",
        db.message()
    );
    replicas_unharmed(&strict);
    let app_strict = common::connect(&conninfo_db(&env, strict.addr.port(), "app")).await;
    assert!(where_read(&app_strict).await.1);

    // Once the replicas have replayed the database, its reads go to them.
    replay(&env, true);
    env.caught_up().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if where_read(&fresh).await.1 && fresh_strict.query_one("SELECT 1", &[]).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "database fresh never read on a replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replicas_unharmed(&env.proxy);
    replicas_unharmed(&strict);
}

/// Uses database `db` through the proxy the way a test suite does, then leaves, and waits
/// until the proxy has seen it go.
async fn use_and_leave(env: &Env, db: &str) {
    let c = common::connect(&conninfo_db(env, env.port(), db)).await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    c.query_one("SELECT count(*) FROM t", &[]).await.unwrap();
    drop(c);
    let clients = &env.proxy.shared.clients;
    assert!(
        common::eventually(5, || clients.list().iter().all(|c| c.database != db)).await,
        "the proxy kept the client of {db}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_its_clients_left_can_be_cloned_renamed_and_dropped() {
    let env = with_createdb("").await;
    let app = env.client().await;
    app.batch_execute("CREATE DATABASE scratch").await.unwrap();
    use_and_leave(&env, "scratch").await;
    let started = Instant::now();
    // Django's parallel test runner clones the test database; teardown drops it.
    app.batch_execute("CREATE DATABASE scratch_1 TEMPLATE scratch")
        .await
        .unwrap();
    app.batch_execute("DROP DATABASE scratch_1").await.unwrap();
    app.batch_execute("ALTER DATABASE scratch RENAME TO scratch_old")
        .await
        .unwrap();
    use_and_leave(&env, "scratch_old").await;
    app.batch_execute("DROP DATABASE scratch_old")
        .await
        .unwrap();
    // None of them waited for a session to go (the server waits up to 5 s, then fails).
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    // The pools to it are empty, and a client of it is told it is gone (by the primary: the
    // replicas' refusals of it are theirs alone).
    for pool in env.proxy.shared.pools.all() {
        if pool.database().starts_with("scratch") {
            assert_eq!(pool.open.load(Ordering::SeqCst), 0, "{}", pool.name);
        }
    }
    let gone = common::connect(&conninfo_db(&env, env.port(), "scratch_old")).await;
    let err = gone.query_one("SELECT 1", &[]).await.expect_err("dropped");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("3D000"),
        "{err}"
    );
    replicas_unharmed(&env.proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_a_client_is_using_cannot_be_dropped() {
    let env = with_createdb("").await;
    let app = env.client().await;
    app.batch_execute("CREATE DATABASE busy").await.unwrap();
    let user = common::connect(&conninfo_db(&env, env.port(), "busy")).await;
    user.batch_execute("BEGIN; CREATE TABLE t (id int)")
        .await
        .unwrap();
    let err = app
        .batch_execute("DROP DATABASE busy")
        .await
        .expect_err("dropped a database inside a client's transaction");
    let db = err.as_db_error().expect("the server's error");
    assert_eq!(db.code().code(), "55006", "{}", db.message());
    assert!(db.message().contains("is being accessed by other users"));
    // The client's transaction was not disturbed.
    user.batch_execute("INSERT INTO t VALUES (1); COMMIT")
        .await
        .unwrap();
    drop(user);
    let clients = &env.proxy.shared.clients;
    assert!(common::eventually(5, || clients.list().iter().all(|c| c.database != "busy")).await);
    app.batch_execute("DROP DATABASE busy").await.unwrap();
}
