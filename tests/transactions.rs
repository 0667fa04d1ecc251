//! Transactions and the server that runs them: a `BEGIN` held back until its first statement,
//! with the modes named after it (`SET TRANSACTION`), chooses the server with that statement;
//! inside a read-only transaction a replica runs, what would mean something only on the
//! primary (locks, session state) is refused instead of kept on the replica.

mod common;

use common::{Env, first_text};
use tokio_postgres::error::SqlState;

/// `SELECT inet_server_port()` as a lone simple query: the server that ran it.
async fn port(c: &tokio_postgres::Client) -> u16 {
    let msgs = c.simple_query("SELECT inet_server_port()").await.unwrap();
    first_text(&msgs).unwrap().parse().unwrap()
}

async fn with_marks() -> Env {
    let env = common::start().await;
    env.owner()
        .await
        .batch_execute(
            "CREATE TABLE marks (t text);
             CREATE FUNCTION report() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';",
        )
        .await
        .unwrap();
    env.caught_up().await;
    env
}

async fn marks(env: &Env) -> i64 {
    env.owner()
        .await
        .query_one("SELECT count(*) FROM marks", &[])
        .await
        .unwrap()
        .get(0)
}

/// Each statement sent alone, as psql and most drivers send them.
async fn run(c: &tokio_postgres::Client, statements: &[&str]) {
    for s in statements {
        c.batch_execute(s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
}

/// Waits until the replicas have replayed the session's writes, so its reads may use them again.
async fn replicas_caught_up(env: &Env, c: &tokio_postgres::Client) {
    env.caught_up().await;
    for _ in 0..100 {
        if port(c).await != env.node_port(0) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("reads never left the primary after the replicas caught up");
}

fn code(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.as_db_error().map(|d| d.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_named_after_a_deferred_begin_choose_the_server_with_its_first_statement() {
    let env = with_marks().await;
    let primary = env.node_port(0);
    let c = env.client().await;

    // A serializable transaction made read-only afterwards: still the primary's (a standby
    // refuses SERIALIZABLE), and still a transaction, so its write is refused and nothing is
    // committed behind the client's back.
    run(
        &c,
        &[
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "SET TRANSACTION READ ONLY",
        ],
    )
    .await;
    assert_eq!(port(&c).await, primary);
    let e = c
        .batch_execute("INSERT INTO marks VALUES ('serializable read only')")
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(&SqlState::READ_ONLY_SQL_TRANSACTION), "{e}");
    run(&c, &["ROLLBACK"]).await;
    assert_eq!(marks(&env).await, 0);

    // Read only, then read write again before the first statement, as a server allows.
    run(
        &c,
        &[
            "BEGIN",
            "SET TRANSACTION READ ONLY",
            "SET TRANSACTION READ WRITE",
            "INSERT INTO marks VALUES ('read write again')",
            "COMMIT",
        ],
    )
    .await;
    assert_eq!(marks(&env).await, 1);

    // BEGIN READ ONLY then SERIALIZABLE: the primary runs it whole.
    run(
        &c,
        &[
            "BEGIN READ ONLY",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        ],
    )
    .await;
    assert_eq!(port(&c).await, primary);
    let level = c.simple_query("SHOW transaction_isolation").await.unwrap();
    assert_eq!(first_text(&level).as_deref(), Some("serializable"));
    run(&c, &["COMMIT"]).await;

    // A plain read-only transaction still runs on a replica, all of it on the same one.
    run(&c, &["BEGIN READ ONLY"]).await;
    let first = port(&c).await;
    assert_ne!(first, primary);
    assert_eq!(port(&c).await, first);
    run(&c, &["COMMIT"]).await;
    run(&c, &["BEGIN", "SET TRANSACTION READ ONLY"]).await;
    assert_ne!(port(&c).await, primary);
    run(&c, &["COMMIT"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_transaction_that_starts_with_a_lock_runs_on_the_primary() {
    let env = with_marks().await;
    let c = env.client().await;
    run(
        &c,
        &["BEGIN READ ONLY", "SELECT pg_advisory_xact_lock(4242)"],
    )
    .await;
    assert_eq!(port(&c).await, env.node_port(0));
    // The lock is the primary's: it excludes other sessions there.
    let other = env.client().await;
    let msgs = other
        .simple_query("/* causeway:primary */ SELECT pg_try_advisory_lock(4242)")
        .await
        .unwrap();
    assert_eq!(first_text(&msgs).as_deref(), Some("f"));
    run(&c, &["COMMIT"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_and_session_state_are_refused_inside_a_read_only_transaction_on_a_replica() {
    let env = with_marks().await;
    let primary = env.node_port(0);
    let c = env.client().await;
    for statement in [
        "SELECT pg_advisory_lock(777)",
        "SELECT pg_advisory_xact_lock(778)",
        "LOCK TABLE marks IN ROW EXCLUSIVE MODE",
        "SELECT set_config('search_path', 'pg_catalog', false)",
        // A lock behind a call a replica runs happily (a VOLATILE function that only reads).
        "SELECT report(), pg_advisory_xact_lock(779)",
        "SELECT report(); LOCK TABLE marks IN ACCESS SHARE MODE",
    ] {
        run(&c, &["BEGIN READ ONLY"]).await;
        assert_ne!(port(&c).await, primary, "the transaction runs on a replica");
        let e = c.batch_execute(statement).await.unwrap_err();
        assert_eq!(
            code(&e),
            Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
            "{statement}: {e}"
        );
        // The transaction is aborted, as by a server's own refusal.
        let e = c.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(
            code(&e),
            Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
            "{statement}"
        );
        run(&c, &["ROLLBACK"]).await;
        // Nothing pinned the session to the replica: a write after it runs on the primary.
        run(&c, &["INSERT INTO marks VALUES ('after')"]).await;
        replicas_caught_up(&env, &c).await;
    }
    assert_eq!(marks(&env).await, 6);
    // No lock was left behind on any server connection.
    let held = env
        .owner()
        .await
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(held, 0);
}
