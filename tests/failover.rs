//! The primary fails: clients get a prompt error, reads keep flowing from replicas, writes
//! work again once it is back; with `routing.follow_promotion`, a replica promoted in its place
//! takes the writes.

mod common;

use std::time::{Duration, Instant};

use causeway::launcher::{ClusterOptions, StopMode};

fn port_of(rows: &[tokio_postgres::SimpleQueryMessage]) -> u16 {
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_down_fails_writes_promptly_and_reads_go_on() {
    let env = common::start_with(ClusterOptions::default(), |c| {
        *c = c.replacen(
            "\nlisten = \"127.0.0.1:0\"",
            "\nlisten = \"127.0.0.1:0\"\nconnect_timeout_ms = 1500",
            1,
        );
    })
    .await;
    env.owner()
        .await
        .batch_execute("CREATE TABLE f_t (v int)")
        .await
        .unwrap();
    env.caught_up().await;
    let c = env.client().await;
    c.simple_query("INSERT INTO f_t VALUES (1)").await.unwrap();
    let reader = env.client().await;

    let primary = env.cluster.primary.clone();
    tokio::task::block_in_place(|| env.cluster.stop_node(&primary, StopMode::Immediate)).unwrap();

    // Writes: an error with a connection-class or shutdown SQLSTATE, promptly.
    for _ in 0..3 {
        let t = Instant::now();
        let err = c
            .simple_query("INSERT INTO f_t VALUES (2)")
            .await
            .expect_err("a write with the primary down");
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "took {:?}",
            t.elapsed()
        );
        let code = err.code().map(|c| c.code().to_string());
        assert!(
            matches!(code.as_deref(), Some("08006" | "08001" | "57P01" | "57P03")) || c.is_closed(),
            "{err:?}"
        );
        if c.is_closed() {
            break;
        }
    }
    // Reads: still answered, by replicas.
    for _ in 0..10 {
        let rows = reader
            .simple_query("SELECT inet_server_port()")
            .await
            .unwrap();
        assert_ne!(port_of(&rows), env.node_port(0));
    }

    // Back: writes work again without restarting the proxy.
    tokio::task::block_in_place(|| env.cluster.start_node(&primary)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let writer = env.client().await;
    loop {
        match writer.simple_query("INSERT INTO f_t VALUES (3)").await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("writes never came back: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_follows_a_promoted_replica() {
    let env = common::start_with(ClusterOptions::default(), |c| {
        c.push_str("\n[routing]\nfollow_promotion = true\n");
    })
    .await;
    env.owner()
        .await
        .batch_execute("CREATE TABLE p_t (v int)")
        .await
        .unwrap();
    env.caught_up().await;
    let primary = env.cluster.primary.clone();
    let r1 = env.cluster.replicas[0].clone();
    tokio::task::block_in_place(|| env.cluster.stop_node(&primary, StopMode::Immediate)).unwrap();
    tokio::task::block_in_place(|| env.cluster.psql(&r1, "SELECT pg_promote()")).unwrap();

    // Writes land on the promoted replica once the proxy has followed it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let c = env.client().await;
    loop {
        match c
            .simple_query("INSERT INTO p_t VALUES (1) RETURNING inet_server_port()")
            .await
        {
            Ok(rows) => {
                assert_eq!(port_of(&rows), env.node_port(1), "write went elsewhere");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("writes never followed the promotion: {e:?}"),
        }
    }
    let shared = &env.proxy.shared;
    assert_eq!(
        shared.cluster.primary().addr(),
        format!("127.0.0.1:{}", env.node_port(1))
    );
    // The promoted server left the read set; reads go to the other replica (or the primary).
    let names: Vec<String> = shared
        .cluster
        .replicas()
        .iter()
        .map(|n| n.name.clone())
        .collect();
    assert_eq!(names, ["replica2"]);
}

/// Polls `f` until it holds, for at most `secs`.
async fn eventually(secs: u64, what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A replica promoted while the primary kept answering (a mistaken promotion, a failover tool
/// on the wrong side of a partition) is never followed, even when the primary then restarts:
/// writes stay on the primary, which has every write acknowledged before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promoted_under_a_live_primary_is_not_followed() {
    let env = common::start_with(ClusterOptions::default(), |c| {
        c.push_str("\n[routing]\nfollow_promotion = true\n");
    })
    .await;
    env.owner()
        .await
        .batch_execute("CREATE TABLE sb_t (v int)")
        .await
        .unwrap();
    env.caught_up().await;
    let primary = env.cluster.primary.clone();
    let r1 = env.cluster.replicas[0].clone();
    tokio::task::block_in_place(|| env.cluster.psql(&r1, "SELECT pg_promote()")).unwrap();
    let cluster = &env.proxy.shared.cluster;
    eventually(
        20,
        "the promoted replica is refused as a split brain",
        async || {
            let r = cluster
                .replicas()
                .iter()
                .find(|n| n.name == "replica1")
                .cloned();
            r.and_then(|n| n.ban_reason())
                .is_some_and(|why| why.contains("primary kept answering"))
        },
    )
    .await;
    let c = env.client().await;
    c.simple_query("INSERT INTO sb_t VALUES (1)").await.unwrap();
    // A quick restart of the primary: it is down for a moment, the promoted replica is there.
    tokio::task::block_in_place(|| {
        env.cluster.stop_node(&primary, StopMode::Fast)?;
        std::thread::sleep(Duration::from_millis(2500));
        env.cluster.start_node(&primary)
    })
    .unwrap();
    let writer = env.client().await;
    let port = std::cell::Cell::new(0);
    eventually(20, "writes are back", async || {
        match writer
            .simple_query("INSERT INTO sb_t VALUES (2) RETURNING inet_server_port()")
            .await
        {
            Ok(rows) => {
                port.set(port_of(&rows));
                true
            }
            Err(_) => false,
        }
    })
    .await;
    assert_eq!(
        port.get(),
        env.node_port(0),
        "a write went to the promoted replica"
    );
    assert_eq!(
        cluster.primary().addr(),
        format!("127.0.0.1:{}", env.node_port(0))
    );
    let rows = writer
        .simple_query("/* causeway:primary */ SELECT count(*) FROM sb_t")
        .await
        .unwrap();
    assert_eq!(
        port_of(&rows),
        2,
        "the write acknowledged before the restart is there"
    );
}

/// After a followed promotion, a replica that had replayed further than the promoted one on
/// the old primary's timeline is kept out: its positions are not the new primary's, and a
/// read-your-writes check against them would pass on data that lacks the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_left_ahead_on_the_old_timeline_is_kept_out() {
    let env = common::start_with(ClusterOptions::default(), |c| {
        c.push_str("\n[routing]\nfollow_promotion = true\n");
    })
    .await;
    let owner = env.owner().await;
    owner
        .batch_execute("CREATE TABLE tl_t (v int)")
        .await
        .unwrap();
    env.caught_up().await;
    let primary = env.cluster.primary.clone();
    let r1 = env.cluster.replicas[0].clone();
    let r2 = env.cluster.replicas[1].clone();
    tokio::task::block_in_place(|| env.cluster.stop_node(&r1, StopMode::Fast)).unwrap();
    // WAL only replica2 gets: several MB, so the promoted replica1 starts its timeline well
    // behind where replica2 stands.
    owner
        .batch_execute("INSERT INTO tl_t SELECT g FROM generate_series(1, 100000) g")
        .await
        .unwrap();
    let lsn: String = owner
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    drop(owner);
    let r2_info = r2.clone();
    eventually(20, "replica2 replays the rows", async || {
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
        tokio::task::block_in_place(|| env.cluster.psql(&r2_info, &sql))
            .is_ok_and(|out| out.trim() == "t")
    })
    .await;
    tokio::task::block_in_place(|| {
        env.cluster.stop_node(&primary, StopMode::Immediate)?;
        env.cluster.start_node(&r1)
    })
    .unwrap();
    // The proxy sees replica1 back in recovery before it is promoted.
    let cluster = &env.proxy.shared.cluster;
    eventually(20, "replica1 is usable again", async || {
        cluster
            .replicas()
            .iter()
            .any(|n| n.name == "replica1" && n.is_usable())
    })
    .await;
    tokio::task::block_in_place(|| env.cluster.psql(&r1, "SELECT pg_promote()")).unwrap();
    eventually(20, "the proxy follows replica1", async || {
        cluster.primary().addr() == format!("127.0.0.1:{}", env.node_port(1))
    })
    .await;
    let replica2 = cluster
        .replicas()
        .iter()
        .find(|n| n.name == "replica2")
        .cloned()
        .expect("replica2 still listed");
    assert!(replica2.is_diverged(), "replica2 not found diverged");
    assert!(!replica2.is_usable());
    // A session's own write is read back: not from replica2, whose position only looks ahead.
    let c = env.client().await;
    for i in 0..5 {
        c.simple_query(&format!("INSERT INTO tl_t VALUES ({})", -1 - i))
            .await
            .unwrap();
        let rows = c
            .simple_query(&format!(
                "SELECT inet_server_port() FROM tl_t WHERE v = {}",
                -1 - i
            ))
            .await
            .unwrap();
        assert_eq!(port_of(&rows), env.node_port(1), "read-back {i}");
    }
}

/// While the primary is down, replica lag stops growing: replicas that were within
/// `max_replica_lag_ms` when it went down keep serving reads, even though the last position
/// the proxy read on the primary is one they never received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_do_not_age_out_while_the_primary_is_down() {
    let env = common::start_with(ClusterOptions::default(), |c| {
        c.push_str("\n[routing]\nmax_replica_lag_ms = 1000\n");
    })
    .await;
    let owner = env.owner().await;
    owner
        .batch_execute("CREATE TABLE ag_t (v int)")
        .await
        .unwrap();
    env.caught_up().await;
    for r in &env.cluster.replicas {
        tokio::task::block_in_place(|| env.cluster.psql(r, "SELECT pg_wal_replay_pause()"))
            .unwrap();
    }
    owner
        .batch_execute("INSERT INTO ag_t VALUES (1)")
        .await
        .unwrap();
    drop(owner);
    // The monitor reads the primary's new position, which no replica has replayed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let primary = env.cluster.primary.clone();
    tokio::task::block_in_place(|| env.cluster.stop_node(&primary, StopMode::Immediate)).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reader = env.client().await;
    for _ in 0..5 {
        let rows = reader
            .simple_query("SELECT inet_server_port()")
            .await
            .expect("a read while the primary is down");
        assert_ne!(port_of(&rows), env.node_port(0));
    }
}
