//! Failures around the proxy: a replica stops, a client vanishes mid-transaction, a query is
//! cancelled, a backend dies mid-query.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use causeway::launcher::StopMode;
use common::connect;

async fn port_of(c: &tokio_postgres::Client) -> Result<u16, tokio_postgres::Error> {
    let row = c.query_one("SELECT inet_server_port()", &[]).await?;
    Ok(row.get::<_, i32>(0) as u16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_replica_costs_no_client_errors() {
    let env = common::start().await;
    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut readers = Vec::new();
    for _ in 0..4 {
        let c = env.client().await;
        let (errors, done, stop) = (errors.clone(), done.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(4);
            while Instant::now() < end {
                tokio::select! {
                    _ = stop.notified() => break,
                    r = port_of(&c) => match r {
                        Ok(_) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("read failed: {e:?}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replica1 = env.cluster.replicas[0].clone();
    tokio::task::block_in_place(|| env.cluster.stop_node(&replica1, StopMode::Immediate)).unwrap();
    for r in readers {
        r.await.unwrap();
    }
    assert!(done.load(Ordering::Relaxed) > 100);
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "reads failed while a replica stopped"
    );
    // New reads all go to the surviving replica.
    let c = env.client().await;
    for _ in 0..10 {
        assert_eq!(port_of(&c).await.unwrap(), env.node_port(2));
    }
    let node = &env.proxy.shared.cluster.nodes()[1];
    assert!(!node.is_usable());
    assert!(node.ban_reason().is_some());
    // Back again: the monitor lifts the ban and reads reach it.
    tokio::task::block_in_place(|| env.cluster.start_node(&replica1)).unwrap();
    assert!(
        common::eventually(10, || node.is_usable()).await,
        "replica1 never unbanned"
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        seen.insert(port_of(&c).await.unwrap());
    }
    assert!(seen.contains(&env.node_port(1)), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_transaction_leaves_a_clean_backend() {
    let env = common::start_with(Default::default(), |cfg| {
        *cfg = cfg.replace("[primary]", "[pool]\nprimary_max = 1\n\n[primary]");
    })
    .await;
    let admin = env.primary_admin().await;
    admin
        .batch_execute("CREATE TABLE k (id int); GRANT ALL ON k TO app")
        .await
        .unwrap();
    let (client, conn) = tokio_postgres::connect(&env.conninfo(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    client
        .batch_execute("BEGIN; INSERT INTO k VALUES (1)")
        .await
        .unwrap();
    // Vanish without a word: the socket closes mid-transaction.
    driver.abort();
    drop(client);
    let idle_in_tx = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND state LIKE 'idle in transaction%'";
    let mut clean = false;
    for _ in 0..100 {
        let n: i64 = admin.query_one(idle_in_tx, &[]).await.unwrap().get(0);
        if n == 0 {
            clean = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(clean, "a backend stayed idle in transaction");
    // The single primary connection was returned, not leaked: another client can write.
    let c = env.client().await;
    c.execute("INSERT INTO k VALUES (2)", &[]).await.unwrap();
    let rows: Vec<i32> = admin
        .query("SELECT id FROM k ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec![2], "the abandoned insert must be rolled back");
}

/// A client that vanishes while its statement runs: the proxy cancels the statement with the
/// backend's key and closes the connection, so the server rolls back at once and releases the
/// transaction's locks (PostgreSQL notices a closed socket only when it next reads or writes),
/// and the pool counts that connection until the server has really let it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_statement_releases_its_locks_at_once() {
    let env = common::start().await;
    let admin = env.primary_admin().await;
    admin
        .batch_execute("CREATE TABLE held (id int); GRANT ALL ON held TO app")
        .await
        .unwrap();
    let proxy = common::trust_proxy(&env).await;
    let mut s = common::raw::login(proxy.addr).await;
    for sql in ["BEGIN", "LOCK TABLE held IN ACCESS EXCLUSIVE MODE"] {
        let msgs = common::raw::roundtrip(&mut s, &common::raw::query(sql)).await;
        assert!(!msgs.iter().any(|m| m.0 == b'E'), "{sql}: {msgs:?}");
    }
    use tokio::io::AsyncWriteExt;
    s.write_all(&common::raw::query("SELECT pg_sleep(60)"))
        .await
        .unwrap();
    let sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' \
                    AND state = 'active'";
    let mut started = false;
    for _ in 0..100 {
        if admin
            .query_one(sleeping, &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
        {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started, "the statement never started");
    drop(s);
    let gone = Instant::now();
    let locks = "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 WHERE c.relname = 'held'";
    let mut held = 1;
    while held > 0 && gone.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        held = admin.query_one(locks, &[]).await.unwrap().get::<_, i64>(0);
    }
    assert_eq!(
        held,
        0,
        "the lock outlived its client by {:?}",
        gone.elapsed()
    );
    // Nothing is left running, and the pool's count matches the server's backends.
    let backends = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' \
                    AND application_name = 'causeway'";
    let open = || -> i64 {
        [&env.proxy, &proxy]
            .iter()
            .flat_map(|p| p.shared.pools.all())
            .filter(|p| p.node.role == causeway::cluster::Role::Primary)
            .map(|p| p.open.load(Ordering::SeqCst) as i64)
            .sum()
    };
    let mut counted = false;
    for _ in 0..100 {
        let n: i64 = admin.query_one(backends, &[]).await.unwrap().get(0);
        if n == open() {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(counted, "the pool counts {} connections", open());
    assert_eq!(
        admin
            .query_one(sleeping, &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaches_the_running_backend() {
    let env = common::start().await;
    let c = env.client().await;
    for sql in [
        "SELECT pg_sleep(30)",
        "/* causeway:primary */ SELECT pg_sleep(30)",
    ] {
        let token = c.cancel_token();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token.cancel_query(tokio_postgres::NoTls).await
        });
        let started = Instant::now();
        let err = c.simple_query(sql).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{sql}: {err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        canceller.await.unwrap().unwrap();
        assert_eq!(port_of(&c).await.map(|_| ()).ok(), Some(()));
    }
    // Inside a transaction the session continues after the cancel, in the failed state.
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("SELECT 1", &[]).await.unwrap();
    let token = c.cancel_token();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = token.cancel_query(tokio_postgres::NoTls).await;
    });
    assert!(c.simple_query("SELECT pg_sleep(30)").await.is_err());
    c.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_dying_mid_query_is_an_error_not_a_hang() {
    let env = common::start().await;
    let c = env.client().await;
    // Autocommit: the client gets an error and its session carries on.
    let killer = tokio::spawn(terminate_sleeper(
        env.cluster.superuser_conninfo(&env.cluster.primary),
    ));
    let started = Instant::now();
    let err = c
        .simple_query("/* causeway:primary */ SELECT pg_sleep(20)")
        .await
        .unwrap_err();
    killer.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let code = err.code().map(|c| c.code().to_string()).unwrap_or_default();
    assert!(["57P01", "08006"].contains(&code.as_str()), "{err}");
    assert!(
        port_of(&c).await.is_ok(),
        "session should survive an autocommit failure"
    );
    // Inside a transaction the session ends: a later COMMIT must not look successful.
    let c2 = env.client().await;
    c2.batch_execute("BEGIN").await.unwrap();
    let killer = tokio::spawn(terminate_sleeper(
        env.cluster.superuser_conninfo(&env.cluster.primary),
    ));
    assert!(c2.simple_query("SELECT pg_sleep(20)").await.is_err());
    killer.await.unwrap();
    assert!(
        c2.batch_execute("COMMIT").await.is_err(),
        "COMMIT after a lost transaction must fail"
    );
}

async fn terminate_sleeper(conninfo: String) {
    let admin = connect(&conninfo).await;
    for _ in 0..200 {
        let n: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE query LIKE '%pg_sleep(20)%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never saw the sleeping backend");
}

/// Reads running on a replica when it is killed have received a column header or BindComplete
/// but no row: they are re-run elsewhere, in both protocols, and no client sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_running_on_a_killed_replica_are_rerun() {
    let env = common::start().await;
    let mut sleepers = Vec::new();
    for i in 0..8 {
        let c = env.client().await;
        sleepers.push(tokio::spawn(async move {
            // Long enough that the replica is surely dead before any of them could finish,
            // even on a loaded machine where stopping it takes a while.
            let sql = "SELECT pg_sleep(4), inet_server_port()";
            let t = Instant::now();
            let port: String = if i % 2 == 0 {
                match &c.simple_query(sql).await?[1] {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(1).unwrap().to_string(),
                    other => panic!("{other:?}"),
                }
            } else {
                c.query_one(sql, &[]).await?.get::<_, i32>(1).to_string()
            };
            Ok::<_, tokio_postgres::Error>((port, t.elapsed()))
        }));
    }
    // Let every sleeper start, then kill replica1 under the ones it runs.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let replica1 = env.cluster.replicas[0].clone();
    assert!(
        env.proxy.shared.cluster.nodes()[1]
            .in_use
            .load(Ordering::Relaxed)
            > 0,
        "no read was running on replica1"
    );
    tokio::task::block_in_place(|| env.cluster.stop_node(&replica1, StopMode::Immediate)).unwrap();
    for s in sleepers {
        let (port, took) = s
            .await
            .unwrap()
            .expect("a read failed while its replica died");
        assert_ne!(
            port,
            env.node_port(1).to_string(),
            "answered by the dead replica"
        );
        assert!(took < Duration::from_secs(20), "{took:?}");
    }
    assert!(env.proxy.shared.stats.retried_reads.load(Ordering::Relaxed) > 0);
}

/// A Flush-ended write leaves the server inside an implicit transaction until Sync. A client
/// that leaves there must not hand that transaction to the next client, whose statement would
/// commit it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_an_unsynced_batch_leaves_a_clean_backend() {
    use common::raw::{bind, execute, login, msg, parse, query, read_until};
    use tokio::io::AsyncWriteExt;
    let env = common::start_with(Default::default(), |cfg| {
        *cfg = cfg.replace("[primary]", "[pool]\nprimary_max = 1\n\n[primary]");
    })
    .await;
    let admin = env.primary_admin().await;
    admin
        .batch_execute("CREATE TABLE u (id int); GRANT ALL ON u TO app")
        .await
        .unwrap();
    let proxy = common::trust_proxy(&env).await;
    let mut a = login(proxy.addr).await;
    let mut bytes = parse("", "INSERT INTO u VALUES (1)");
    bytes.extend(bind(""));
    bytes.extend(execute());
    bytes.extend(msg(b'H', &[]));
    a.write_all(&bytes).await.unwrap();
    let got = read_until(&mut a, |t| t == b'C' || t == b'E').await;
    assert_eq!(got.last().map(|m| m.0), Some(b'C'), "{got:?}");
    a.write_all(&msg(b'X', &[])).await.unwrap();
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The only primary connection is free again for another client, and clean.
    let mut b = login(proxy.addr).await;
    b.write_all(&query("INSERT INTO u VALUES (2)"))
        .await
        .unwrap();
    let got = read_until(&mut b, |t| t == b'Z').await;
    assert!(got.iter().all(|m| m.0 != b'E'), "{got:?}");
    let rows: Vec<i32> = admin
        .query("SELECT id FROM u ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec![2], "the unsynced insert must not be committed");
}

async fn backend_pid(admin: &tokio_postgres::Client, like: &str) -> i32 {
    for _ in 0..100 {
        let rows = admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
                &[&like],
            )
            .await
            .unwrap();
        if let Some(r) = rows.first() {
            return r.get(0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no backend running {like}");
}

/// A batch ended by Flush whose server is given up on gets an error at once, as a server's own
/// failure would give; what the client sent up to its Sync is skipped and the Sync answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_batch_on_an_abandoned_server_gets_an_error_then_ready() {
    use common::raw::{bind, error_code, execute, login, msg, parse, query, read_until, sync};
    use tokio::io::AsyncWriteExt;
    let env = common::start_with(Default::default(), |c| {
        *c = c.replacen(
            "\nlisten = \"127.0.0.1:0\"",
            "\nlisten = \"127.0.0.1:0\"\nquery_timeout_ms = 300",
            1,
        );
    })
    .await;
    let admin = env.primary_admin().await;
    admin
        .batch_execute("CREATE TABLE f (t text); GRANT ALL ON f TO app")
        .await
        .unwrap();
    let proxy = common::trust_proxy(&env).await;
    let mut s = login(proxy.addr).await;
    let mut bytes = parse("", "INSERT INTO f SELECT pg_sleep(3)::text /*frozen*/");
    bytes.extend(bind(""));
    bytes.extend(execute());
    bytes.extend(msg(b'H', &[]));
    // Sent before the client's Sync, so skipped as a server would after an error.
    bytes.extend(query("INSERT INTO f VALUES ('skipped')"));
    s.write_all(&bytes).await.unwrap();
    let pid = backend_pid(&admin, "%/*frozen*/%").await;
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .unwrap()
    };
    signal("-STOP");
    let got = read_until(&mut s, |t| t == b'E' || t == b'Z').await;
    signal("-CONT");
    let last = got.last().unwrap();
    assert_eq!(last.0, b'E', "{got:?}");
    assert_eq!(error_code(&last.1), "08006");
    s.write_all(&sync()).await.unwrap();
    let got = read_until(&mut s, |t| t == b'Z').await;
    assert_eq!(
        got.iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![b'Z'],
        "{got:?}"
    );
    s.write_all(&query("SELECT count(*) FROM f")).await.unwrap();
    let got = read_until(&mut s, |t| t == b'Z').await;
    let row = got.iter().find(|m| m.0 == b'D').expect("a row");
    assert!(row.1.ends_with(b"0"), "{got:?}");
}

/// An extended-protocol COPY whose server dies after CopyInResponse: the client's data goes
/// nowhere, but it gets an error and a ReadyForQuery for its closing Sync instead of a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_copy_whose_server_dies_gets_an_error_and_ready() {
    use common::raw::{bind, execute, login, msg, parse, read_until, sync};
    use tokio::io::AsyncWriteExt;
    let env = common::start().await;
    let admin = env.primary_admin().await;
    admin
        .batch_execute("CREATE TABLE cp (id int); GRANT ALL ON cp TO app")
        .await
        .unwrap();
    let proxy = common::trust_proxy(&env).await;
    let mut s = login(proxy.addr).await;
    let mut bytes = parse("", "COPY cp FROM STDIN /*dyingcopy*/");
    bytes.extend(bind(""));
    bytes.extend(execute());
    bytes.extend(sync());
    s.write_all(&bytes).await.unwrap();
    let got = read_until(&mut s, |t| t == b'G' || t == b'E').await;
    assert_eq!(got.last().map(|m| m.0), Some(b'G'), "{got:?}");
    let pid = backend_pid(&admin, "%/*dyingcopy*/%").await;
    std::process::Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut bytes = msg(b'd', b"1\n");
    bytes.extend(msg(b'c', &[]));
    bytes.extend(sync());
    let _ = s.write_all(&bytes).await;
    let got = read_until(&mut s, |t| t == b'Z').await;
    let tags: Vec<u8> = got.iter().map(|m| m.0).collect();
    assert!(tags.contains(&b'E'), "{got:?}");
    assert_eq!(tags.last(), Some(&b'Z'), "{got:?}");
}

/// Transaction pooling with one server connection: client A sends cancels with its own key
/// while its short queries run, and client B, which never cancels, shares that connection.
/// A cancel lands on the backend it was meant for or nowhere: B never sees 57014.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_never_lands_on_another_clients_query() {
    use std::sync::atomic::AtomicBool;
    let env = common::start_with(
        causeway::launcher::ClusterOptions {
            replicas: 0,
            ..Default::default()
        },
        |c| c.push_str("\n[pool]\nprimary_max = 1\nreplica_max = 1\n"),
    )
    .await;
    let a = env.client().await;
    let b = env.client().await;
    let a_token = a.cancel_token();
    let stop = Arc::new(AtomicBool::new(false));
    let (b_ok, b_cancelled) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let a_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = a.simple_query("SELECT 1").await;
            }
        })
    };
    let canceller = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = a_token.cancel_query(tokio_postgres::NoTls).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let b_task = {
        let (stop, b_ok, b_cancelled) = (stop.clone(), b_ok.clone(), b_cancelled.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match b.simple_query("SELECT pg_sleep(0.02)").await {
                    Ok(_) => b_ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.code().map(|c| c.code()) == Some("57014") => {
                        b_cancelled.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => panic!("B: {e}"),
                };
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    b_task.await.unwrap();
    a_task.await.unwrap();
    canceller.await.unwrap();
    assert!(b_ok.load(Ordering::Relaxed) > 0);
    assert_eq!(
        b_cancelled.load(Ordering::Relaxed),
        0,
        "client A's cancels cancelled client B's queries"
    );
}

/// A cancel sent while the query still waits for a pool connection stops it there, with the
/// 57014 a server gives: it does not run once a connection frees up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_cancelled_while_queued_for_a_connection_does_not_run() {
    let env = common::start_with(
        causeway::launcher::ClusterOptions {
            replicas: 0,
            ..Default::default()
        },
        |c| c.push_str("\n[pool]\nprimary_max = 1\nreplica_max = 1\n"),
    )
    .await;
    let holder = env.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder.simple_query("SELECT 1").await.unwrap();
    let b = env.client().await;
    let token = b.cancel_token();
    let waiter = tokio::spawn(async move { b.simple_query("SELECT 42").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("the cancelled query is answered at once, not when a connection frees up")
        .unwrap();
    let code = r
        .as_ref()
        .err()
        .and_then(|e| e.code())
        .map(|c| c.code().to_string());
    assert_eq!(code.as_deref(), Some("57014"), "{r:?}");
    holder.batch_execute("COMMIT").await.unwrap();
}

/// A cancel sent while the query waits for an execution slot stops it there with 57014, as
/// one sent while it waits for a connection does. Nothing ran on the server connection the
/// query held, so that connection stays in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_cancelled_while_waiting_for_an_execution_slot_does_not_run() {
    let env = common::start_with(
        causeway::launcher::ClusterOptions {
            replicas: 0,
            ..Default::default()
        },
        |c| *c = c.replace("[primary]\n", "[primary]\nmax_active = 1\n"),
    )
    .await;
    let slots = env
        .proxy
        .shared
        .cluster
        .primary()
        .slots
        .clone()
        .expect("max_active is set");
    let holder = env.client().await;
    let sleeper = tokio::spawn(async move { holder.simple_query("SELECT pg_sleep(3)").await });
    assert!(common::eventually(5, || slots.stats().in_use == 1).await);
    let b = env.client().await;
    let token = b.cancel_token();
    let waiter = tokio::spawn(async move {
        let r = b.simple_query("SELECT 42").await;
        (b, r)
    });
    assert!(common::eventually(5, || slots.waiting() == 1).await);
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (b, r) = tokio::time::timeout(Duration::from_millis(1500), waiter)
        .await
        .expect("the cancelled query is answered at once, not when a slot frees up")
        .unwrap();
    let code = r
        .as_ref()
        .err()
        .and_then(|e| e.code())
        .map(|c| c.code().to_string());
    assert_eq!(code.as_deref(), Some("57014"), "{r:?}");
    assert_eq!(slots.waiting(), 0);
    sleeper.await.unwrap().unwrap();
    let pool = env
        .proxy
        .shared
        .pools
        .all()
        .pop()
        .expect("the primary pool");
    assert_eq!(
        pool.open.load(Ordering::SeqCst),
        2,
        "the idle connection the cancelled query held was thrown away"
    );
    assert_eq!(port_of(&b).await.ok(), Some(env.node_port(0)));
}

/// Signals the primary's postmaster and every process it started (SIGSTOP freezes it: the
/// sockets stay open, nothing answers).
fn signal_primary(env: &common::Env, signal: &str) {
    let pid_file = std::fs::read_to_string(env.cluster.primary.data_dir.join("postmaster.pid"))
        .expect("postmaster.pid");
    let postmaster = pid_file.lines().next().unwrap().trim().to_string();
    let children = std::process::Command::new("pgrep")
        .args(["-P", &postmaster])
        .output()
        .expect("pgrep");
    let mut pids = vec![postmaster];
    pids.extend(
        String::from_utf8_lossy(&children.stdout)
            .split_whitespace()
            .map(str::to_string),
    );
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .args(&pids)
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pids:?}");
}

/// A login with startup settings the proxy has not seen is checked on a server first; a server
/// that stops answering holds it no longer than `connect_timeout_ms`, and the next one is
/// asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_holds_a_login_no_longer_than_a_connect() {
    let env = common::start_with(Default::default(), |cfg| {
        *cfg = cfg.replace(
            "\nhealth_check_timeout_ms = 1000",
            "\nhealth_check_timeout_ms = 1000\nconnect_timeout_ms = 1000",
        );
    })
    .await;
    let warm = env.client().await;
    warm.simple_query("/* causeway:primary */ SELECT 1")
        .await
        .unwrap();
    drop(warm);
    signal_primary(&env, "STOP");
    let started = Instant::now();
    let login = tokio::time::timeout(
        Duration::from_secs(9),
        tokio_postgres::connect(
            &format!("{} options='-c work_mem=4321kB'", env.conninfo()),
            tokio_postgres::NoTls,
        ),
    )
    .await;
    let took = started.elapsed();
    signal_primary(&env, "CONT");
    let (client, conn) = login.expect("login still waiting after 9 s").unwrap();
    tokio::spawn(conn);
    assert!(took < Duration::from_secs(5), "login took {took:?}");
    let rows = client.simple_query("SHOW work_mem").await.unwrap();
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("4321kB"))
    );
}
