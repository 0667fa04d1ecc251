//! Routing policy under failure: the read-only retry, the no-replica fallback, a promoted
//! replica, pool expiry.

mod common;

use std::time::Duration;

use causeway::route::Reason;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_refusing_a_write_is_retried_on_the_primary() {
    // An operator wrongly lists a writing function as read-only: the replica refuses it with
    // 25006 and the proxy re-runs it on the primary before the client saw anything.
    let env = common::start_with(Default::default(), |cfg| {
        cfg.push_str("\n[routing]\nread_only_functions = [\"bump\"]\n");
    })
    .await;
    let owner = env.owner().await;
    owner
        .batch_execute(
            "CREATE TABLE hits (n int);
             CREATE FUNCTION bump() RETURNS int LANGUAGE sql VOLATILE
               AS 'INSERT INTO hits VALUES (1) RETURNING inet_server_port()';",
        )
        .await
        .unwrap();
    env.caught_up().await;
    let c = env.client().await;
    for round in 0..2 {
        // Each call writes, so the session's next read waits for the replicas to replay it
        // (read-your-writes) and would otherwise go straight to the primary: let them catch
        // up, so every call is sent to a replica first.
        env.caught_up().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let simple = c.simple_query("SELECT bump()").await.unwrap();
        assert!(
            simple
                .iter()
                .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        );
        env.caught_up().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let port: i32 = c.query_one("SELECT bump()", &[]).await.unwrap().get(0);
        assert_eq!(port as u16, env.node_port(0), "round {round}");
    }
    let n: i64 = owner
        .query_one("SELECT count(*) FROM hits", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4, "each call ran exactly once");
    assert!(env.proxy.shared.stats.routed(Reason::ReadOnlyRetry) >= 4);

    // An extended batch ended by Flush has no ReadyForQuery to re-run after: the client gets
    // the replica's 25006 and its Sync is answered, never a hang.
    use common::raw;
    use tokio::io::AsyncWriteExt;
    let proxy = common::trust_proxy(&env).await;
    let mut s = raw::login(proxy.addr).await;
    let mut batch = raw::parse("", "SELECT bump()");
    batch.extend(raw::bind(""));
    batch.extend(raw::execute());
    batch.extend(raw::msg(b'H', &[]));
    s.write_all(&batch).await.unwrap();
    let first = raw::read_until(&mut s, |t| t == b'C' || t == b'E').await;
    s.write_all(&raw::sync()).await.unwrap();
    let ready = raw::read_until(&mut s, |t| t == b'Z').await;
    assert!(!first.is_empty() && !ready.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usable_replica_falls_back_to_primary_or_errors() {
    let env = common::start().await;
    for r in env.cluster.replicas.clone() {
        tokio::task::block_in_place(|| {
            env.cluster
                .stop_node(&r, causeway::launcher::StopMode::Fast)
        })
        .unwrap();
    }
    let c = env.client().await;
    let port: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, env.node_port(0));
    assert!(env.proxy.shared.stats.routed(Reason::NoReplica) >= 1);

    let strict = env
        .config
        .replace("[primary]", "[routing]\nfallback = \"error\"\n\n[primary]");
    let proxy = common::proxy_for(&strict).await;
    let c = env.client_via(&proxy).await;
    let err = c.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("57P03"), "{err}");
    // Writes are unaffected.
    c.batch_execute("CREATE TABLE still_writable (a int)")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_replica_is_banned_by_the_health_check() {
    let env = common::start().await;
    let r2 = env.cluster.replicas[1].clone();
    tokio::task::block_in_place(|| env.cluster.psql(&r2, "SELECT pg_promote()")).unwrap();
    let node = &env.proxy.shared.cluster.nodes()[2];
    assert!(
        common::eventually(10, || !node.is_usable()).await,
        "promoted replica still used"
    );
    assert!(
        node.ban_reason()
            .unwrap_or_default()
            .contains("pg_is_in_recovery")
    );
    let c = env.client().await;
    for _ in 0..10 {
        let port: i32 = c
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(port as u16, env.node_port(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_expire() {
    let env = common::start_with(Default::default(), |cfg| {
        *cfg = cfg.replace("[primary]", "[pool]\nidle_timeout_ms = 300\n\n[primary]");
    })
    .await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE e (a int)").await.unwrap();
    let pools = env.proxy.shared.pools.all();
    let open = || {
        pools
            .iter()
            .map(|p| p.open.load(std::sync::atomic::Ordering::SeqCst))
            .sum::<usize>()
    };
    assert!(open() >= 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        common::eventually(5, || open() == 0).await,
        "idle connections were not closed"
    );
    // A new statement opens a fresh connection as needed.
    c.batch_execute("INSERT INTO e VALUES (1)").await.unwrap();
}
