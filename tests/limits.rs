//! Limits and timeouts: client connection caps, the idle-in-transaction timeout, the query
//! timeout against a slow and a frozen (SIGSTOPped) server, and graceful shutdown.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use causeway::launcher::ClusterOptions;

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map_or_else(|| format!("no SQLSTATE: {e}"), |c| c.code().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connection_limits_refuse_with_53300() {
    let env = common::start_with(ClusterOptions::default(), |c| {
        *c = c.replacen(
            "\nlisten = \"127.0.0.1:0\"",
            "\nlisten = \"127.0.0.1:0\"\nmax_client_connections = 3",
            1,
        );
        *c = c.replacen(
            "password = \"app-secret\"",
            "password = \"app-secret\"\nmax_connections = 2",
            1,
        );
    })
    .await;
    // Per user: two at once.
    let a = env.client().await;
    let b = env.client().await;
    let err = common::connect_err(&env.conninfo()).await;
    assert_eq!(code(&err), "53300", "{err}");
    assert!(message(&err).contains("max_connections"), "{err:?}");
    drop(b);
    assert!(
        common::eventually(5, || env.proxy.shared.clients.count_user("app") == 1).await,
        "the closed client is still counted"
    );
    let b = env.client().await;
    b.simple_query("SELECT 1").await.unwrap();
    a.simple_query("SELECT 1").await.unwrap();

    // Proxy-wide: three sockets; the fourth is refused before authentication.
    let _held = tokio::net::TcpStream::connect(env.proxy.addr)
        .await
        .unwrap();
    let err = common::connect_err(&env.conninfo()).await;
    assert_eq!(code(&err), "53300", "{err}");
    assert!(message(&err).contains("max_client_connections"), "{err:?}");
}

/// Sockets that never finish logging in are closed at `server.login_timeout_ms` and give
/// their places under `max_client_connections` back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_log_in_are_cut_at_the_login_timeout() {
    use common::raw::{error_code, read_until, startup};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = common::start_with(ClusterOptions::default(), |c| {
        *c = c.replacen(
            "\nlisten = \"127.0.0.1:0\"",
            "\nlisten = \"127.0.0.1:0\"\nmax_client_connections = 2\nlogin_timeout_ms = 500",
            1,
        );
    })
    .await;
    // One sends nothing; one starts up and never answers the password request.
    let mut silent = tokio::net::TcpStream::connect(env.proxy.addr)
        .await
        .unwrap();
    let mut stalled = tokio::net::TcpStream::connect(env.proxy.addr)
        .await
        .unwrap();
    stalled
        .write_all(&startup(&[("user", "app"), ("database", "app")]))
        .await
        .unwrap();
    let t = Instant::now();
    let msgs = read_until(&mut stalled, |t| t == b'E').await;
    let (tag, body) = msgs.last().unwrap();
    assert_eq!(*tag, b'E', "{msgs:?}");
    assert_eq!(error_code(body), "57014");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the silent socket was never closed");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Their places are free again.
    assert!(
        common::eventually(5, || env
            .proxy
            .shared
            .stats
            .clients_open
            .load(Ordering::Relaxed)
            == 0)
        .await
    );
    let c = env.client().await;
    c.simple_query("SELECT 1").await.unwrap();
}

/// A socket that has not logged in shows in the stats, and a shutdown closes it at once (one
/// in the middle of authentication with 57P01), instead of waiting out the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_not_logged_in_do_not_hold_up_shutdown() {
    use common::raw::{error_code, read_until, startup};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut env = common::start().await;
    let proxy = std::mem::replace(&mut env.proxy, common::proxy_for(&env.config).await);
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stalled
        .write_all(&startup(&[("user", "app"), ("database", "app")]))
        .await
        .unwrap();
    // The password request arrives: authentication has begun.
    read_until(&mut stalled, |t| t == b'R').await;
    let logging_in = || {
        causeway::admin::snapshot::Snapshot::collect(&proxy.shared)
            .clients
            .logging_in
    };
    assert!(
        common::eventually(5, || logging_in() == 2).await,
        "{}",
        logging_in()
    );
    let shared = std::sync::Arc::clone(&proxy.shared);
    let t = Instant::now();
    tokio::spawn(proxy.shutdown(Duration::from_secs(20)));
    let msgs = read_until(&mut stalled, |t| t == b'E').await;
    let (tag, body) = msgs.last().unwrap();
    assert_eq!(
        (*tag, error_code(body).as_str()),
        (b'E', "57P01"),
        "{msgs:?}"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the silent socket was kept open");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Cut short, not refused: no failed login is counted.
    let failed = causeway::admin::snapshot::Snapshot::collect(&shared)
        .clients
        .logins_failed;
    assert!(failed.values().all(|n| *n == 0), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_client_is_cut_and_rolled_back() {
    let env = common::start_with(ClusterOptions::default(), |c| {
        c.push_str("\n[pool]\nidle_in_transaction_timeout_ms = 400\n");
    })
    .await;
    env.owner()
        .await
        .batch_execute("CREATE TABLE idle_t (v int)")
        .await
        .unwrap();
    let c = env.client().await;
    c.batch_execute("BEGIN; INSERT INTO idle_t VALUES (1)")
        .await
        .unwrap();
    // Busy but not idle: a statement that runs longer than the timeout is fine.
    c.batch_execute("SELECT pg_sleep(0.6)").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let err = c.batch_execute("COMMIT").await.unwrap_err();
    let db = err.as_db_error().map(|d| d.code().code().to_string());
    assert!(
        db.as_deref() == Some("25P03") || c.is_closed(),
        "expected 25P03 or a closed connection: {err:?}"
    );
    let n: i64 = env
        .owner()
        .await
        .query_one("SELECT count(*) FROM idle_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the abandoned transaction must roll back");
    // Its server connection went back to the pool.
    let in_use = || {
        env.proxy
            .shared
            .pools
            .all()
            .iter()
            .map(|p| p.queue().stats().in_use)
            .sum::<usize>()
    };
    assert!(
        common::eventually(5, || in_use() == 0).await,
        "lease leaked"
    );
    // Other clients never noticed.
    env.client().await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_a_slow_statement() {
    let env = common::start_with(ClusterOptions::default(), |c| {
        *c = c.replacen(
            "\nlisten = \"127.0.0.1:0\"",
            "\nlisten = \"127.0.0.1:0\"\nquery_timeout_ms = 500",
            1,
        );
    })
    .await;
    let c = env.client().await;
    let t = Instant::now();
    let err = c.simple_query("SELECT pg_sleep(10)").await.unwrap_err();
    assert_eq!(code(&err), "57014", "{err}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // The client is told whose limit it was, not the server's "user request".
    let message = err.as_db_error().map(|e| e.message().to_string());
    assert_eq!(
        message.as_deref(),
        Some("canceling statement due to server.query_timeout_ms (500 ms)"),
        "{err}"
    );
    // The session and its next request are fine.
    c.simple_query("SELECT 1").await.unwrap();
}

/// The query timeout measures the server's work, not the client's upload: a COPY whose data
/// takes longer than the limit to arrive is not cancelled when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_does_not_count_a_slow_copy_upload() {
    use futures_util::SinkExt;
    let env = common::start_with(ClusterOptions::default(), |c| {
        *c = c.replacen(
            "\nlisten = \"127.0.0.1:0\"",
            "\nlisten = \"127.0.0.1:0\"\nquery_timeout_ms = 500",
            1,
        );
    })
    .await;
    let owner = env.owner().await;
    // Work the server does after CopyDone, well inside the limit.
    owner
        .batch_execute(
            "CREATE TABLE up (id int);
             CREATE FUNCTION up_slow() RETURNS trigger LANGUAGE plpgsql AS
               $$BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END$$;
             CREATE TRIGGER up_slow AFTER INSERT ON up
               FOR EACH STATEMENT EXECUTE FUNCTION up_slow()",
        )
        .await
        .unwrap();
    let c = env.client().await;
    let sink = c.copy_in("COPY up FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in 0..4 {
        sink.send(bytes::Bytes::from(format!("{chunk}\n")))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(sink.finish().await.unwrap(), 4);
    let n: i64 = owner
        .query_one("SELECT count(*) FROM up", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4);
    // The query timeout still applies to the server's own work.
    let err = c.simple_query("SELECT pg_sleep(10)").await.unwrap_err();
    assert_eq!(code(&err), "57014", "{err}");
}

/// Postmaster and children of a node, for SIGSTOP/SIGCONT.
fn processes_of(data_dir: &std::path::Path) -> Vec<i32> {
    let pid_file = std::fs::read_to_string(data_dir.join("postmaster.pid")).unwrap();
    let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised name: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid: i32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == postmaster {
            pids.push(pid);
        }
    }
    pids
}

fn signal(pids: &[i32], sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids.iter().map(i32::to_string))
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_trips_the_timeouts_instead_of_hanging() {
    let env = common::start_with(ClusterOptions::default(), |c| {
        *c = c.replacen(
            "\nlisten = \"127.0.0.1:0\"",
            "\nlisten = \"127.0.0.1:0\"\nquery_timeout_ms = 700",
            1,
        );
        c.push_str("\n[routing]\nreplica_strategy = \"round_robin\"\n");
    })
    .await;
    let c = env.client().await;
    // Warm a pooled connection on each replica.
    for _ in 0..4 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let pids = processes_of(&env.cluster.replicas[0].data_dir);
    signal(&pids, "STOP");
    let thawed = Arc::new(AtomicBool::new(false));
    let guard = scopeguard(pids.clone(), Arc::clone(&thawed));

    // Reads keep answering: one that lands on the frozen replica is cancelled, then given up
    // on and re-run elsewhere, since nothing of it reached the client.
    let t = Instant::now();
    for _ in 0..6 {
        let rows = c.simple_query("SELECT inet_server_port()").await;
        assert!(rows.is_ok(), "read failed: {rows:?}");
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(
        env.proxy.shared.stats.retried_reads.load(Ordering::Relaxed) > 0,
        "no read met the frozen replica"
    );
    // The health check times out too and bans it.
    let node = &env.proxy.shared.cluster.nodes()[1];
    assert!(
        common::eventually(10, || !node.is_usable()).await,
        "never banned"
    );
    for _ in 0..6 {
        let port: String = match &c.simple_query("SELECT inet_server_port()").await.unwrap()[1] {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_string(),
            other => panic!("{other:?}"),
        };
        assert_ne!(
            port,
            env.node_port(1).to_string(),
            "read sent to the frozen replica"
        );
    }
    drop(guard);
    assert!(
        common::eventually(15, || node.is_usable()).await,
        "never unbanned after SIGCONT"
    );
}

/// Thaws the processes when dropped, so a failing test does not leave a frozen server.
struct Thaw(Vec<i32>, Arc<AtomicBool>);

impl Drop for Thaw {
    fn drop(&mut self) {
        if !self.1.swap(true, Ordering::SeqCst) {
            signal(&self.0, "CONT");
        }
    }
}

fn scopeguard(pids: Vec<i32>, done: Arc<AtomicBool>) -> Thaw {
    Thaw(pids, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_loses_no_committed_transaction() {
    let mut env = common::start().await;
    env.owner()
        .await
        .batch_execute(
            "CREATE TABLE ledger (writer int, seq int, part int, PRIMARY KEY (writer, seq, part))",
        )
        .await
        .unwrap();
    let proxy = std::mem::replace(&mut env.proxy, common::proxy_for(&env.config).await);
    let port = proxy.addr.port();
    let info = format!(
        "host=127.0.0.1 port={port} user=app password={} dbname=app",
        common::PASSWORD
    );
    let mut writers = Vec::new();
    for w in 0..6 {
        let info = info.clone();
        writers.push(tokio::spawn(async move {
            let c = common::connect(&info).await;
            let mut acknowledged = Vec::new();
            for seq in 0i32.. {
                let sql = format!(
                    "BEGIN; INSERT INTO ledger VALUES ({w}, {seq}, 1); \
                     INSERT INTO ledger VALUES ({w}, {seq}, 2); COMMIT"
                );
                match c.batch_execute(&sql).await {
                    Ok(()) => acknowledged.push(seq),
                    Err(e) => return (acknowledged, seq, e),
                }
            }
            unreachable!()
        }));
    }
    // One client holds a transaction open past the grace period: it must be rolled back.
    let holder = common::connect(&info).await;
    holder
        .batch_execute("BEGIN; INSERT INTO ledger VALUES (99, 0, 1)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let t = Instant::now();
    proxy.shutdown(Duration::from_millis(1500)).await;
    let took = t.elapsed();
    assert!(took < Duration::from_secs(6), "shutdown took {took:?}");
    assert!(
        took >= Duration::from_millis(1400),
        "the open transaction got no grace: {took:?}"
    );

    let db = env.owner().await;
    for (w_id, w) in (0i32..).zip(writers) {
        let (acknowledged, failed_seq, err) = w.await.unwrap();
        assert!(acknowledged.len() > 5, "writer made no progress");
        // Refused as the proxy went away, not with a random error.
        let sqlstate = err.code().map(|c| c.code().to_string());
        assert!(
            sqlstate.as_deref() == Some("57P01") || err.is_closed(),
            "unexpected error: {err:?}"
        );
        let stored: Vec<i32> = db
            .query(
                "SELECT DISTINCT seq FROM ledger WHERE writer = $1 ORDER BY seq",
                &[&w_id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for seq in &acknowledged {
            assert!(
                stored.contains(seq),
                "writer {w_id}: acknowledged commit {seq} is missing"
            );
        }
        // Only the one commit in flight when the connection went may be there unacknowledged.
        for seq in &stored {
            assert!(
                acknowledged.contains(seq) || *seq == failed_seq,
                "writer {w_id}: {seq} stored but never attempted"
            );
        }
    }
    // Every acknowledged commit is there, whole; nothing is half there.
    let half: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT writer, seq FROM ledger GROUP BY writer, seq HAVING count(*) <> 2) h",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(half, 0, "a transaction was half applied");
    let held: i64 = db
        .query_one("SELECT count(*) FROM ledger WHERE writer = 99", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        held, 0,
        "the transaction cut at the deadline was not rolled back"
    );
    let err = holder.batch_execute("COMMIT").await.unwrap_err();
    assert!(
        err.code().map(|c| c.code()) == Some("57P01") || err.is_closed(),
        "{err:?}"
    );
}

/// A client's named prepared statements are bounded by `server.max_prepared_bytes`: a Parse
/// past it gets 54000 and nothing else changes; the statements prepared before keep working,
/// and closing some makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_are_bounded_per_client() {
    let env = common::start_with(ClusterOptions::default(), |c| {
        *c = c.replacen(
            "\nlisten = \"127.0.0.1:0\"",
            "\nlisten = \"127.0.0.1:0\"\nmax_prepared_bytes = 4096",
            1,
        );
    })
    .await;
    let client = env.client().await;
    let pad = "x".repeat(200);
    let mut kept = Vec::new();
    let refused = loop {
        let sql = format!("SELECT {} AS n, '{pad}' AS pad", kept.len());
        match client.prepare(&sql).await {
            Ok(s) => kept.push(s),
            Err(e) => break e,
        }
        assert!(kept.len() < 100, "no bound after {} statements", kept.len());
    };
    let db = refused.as_db_error().expect("an error from the proxy");
    assert_eq!(db.code().code(), "54000", "{db:?}");
    assert!(db.message().contains("server.max_prepared_bytes"), "{db:?}");
    assert!(
        kept.len() >= 10,
        "only {} statements fit in 4 KiB",
        kept.len()
    );
    // What was prepared still runs, on any server.
    for (i, s) in kept.iter().enumerate() {
        let row = client.query_one(s, &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i as i32);
    }
    // Statements the proxy answers itself count too.
    let mut own = Vec::new();
    let refused = loop {
        match client.prepare("SHOW causeway.route").await {
            Ok(s) => own.push(s),
            Err(e) => break e,
        }
        assert!(own.len() < 100, "no bound for the proxy's own statements");
    };
    let db = refused.as_db_error().expect("an error from the proxy");
    assert_eq!(db.code().code(), "54000", "{db:?}");
    drop(own);
    // tokio-postgres closes a statement when it is dropped: room again.
    kept.truncate(kept.len() - 3);
    let again = client
        .prepare(&format!("SELECT 1 AS n, '{pad}' AS pad"))
        .await
        .expect("prepare after closing some");
    assert_eq!(
        client
            .query_one(&again, &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}
