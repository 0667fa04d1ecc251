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
