//! Read-your-writes against replicas held back on purpose (recovery_min_apply_delay, paused
//! replay): a read after a write sees it in every mode and scope, while reads that need no
//! token keep using replicas.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use causeway::launcher::ClusterOptions;
use causeway::route::Reason;
use common::{Env, raw};
use tokio::io::AsyncWriteExt;
use tokio_postgres::SimpleQueryMessage;

/// A cluster whose replicas apply WAL `delay_ms` late, and a proxy with extra config lines.
async fn delayed(delay_ms: u64, extra: &str) -> Env {
    let mut opts = ClusterOptions::default();
    if delay_ms > 0 {
        opts.replica_conf = vec![("recovery_min_apply_delay".into(), format!("{delay_ms}ms"))];
    }
    with_items(opts, extra).await
}

/// A cluster started with `opts`, a proxy with extra config lines, and the `items` table
/// replayed everywhere.
async fn with_items(opts: ClusterOptions, extra: &str) -> Env {
    let extra = extra.to_string();
    let env = common::start_with(opts, move |cfg| cfg.push_str(&extra)).await;
    let owner = env.owner().await;
    owner
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    env.caught_up().await;
    env
}

fn routed(env: &Env, reason: Reason) -> u64 {
    env.proxy.shared.stats.routed(reason)
}

async fn count_simple(c: &tokio_postgres::Client, id: i32) -> i64 {
    let msgs = c
        .simple_query(&format!("SELECT count(*) FROM items WHERE id = {id}"))
        .await
        .unwrap();
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap()
}

async fn count(c: &tokio_postgres::Client, id: i32) -> (i64, u16) {
    let row = c
        .query_one(
            "SELECT count(*), inet_server_port() FROM items WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get::<_, i32>(1) as u16)
}

/// Has `c` insert row `id` in a write that drops the token statement on its own connection, so
/// that write's token query fails; asserts no token was recorded. The replicas get time first
/// to replay every earlier token, so only the missing one can keep a read off them.
async fn tokenless_write(env: &Env, c: &tokio_postgres::Client, id: i32) {
    tokio::time::sleep(Duration::from_millis(600)).await;
    let tokens = || env.proxy.shared.stats.tokens.load(Ordering::Relaxed);
    let before = tokens();
    c.batch_execute(&format!(
        "DO $$ BEGIN INSERT INTO items VALUES ({id}, 'l'); \
         EXECUTE 'DEALLOCATE causeway_token'; END $$"
    ))
    .await
    .unwrap();
    assert_eq!(tokens(), before, "the token query found no statement");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lsn_mode_reads_see_their_writes_in_every_protocol() {
    let env = delayed(400, "").await;
    let a = env.client().await;
    let insert = a
        .prepare("INSERT INTO items VALUES ($1, 'p')")
        .await
        .unwrap();
    let select = a
        .prepare("SELECT count(*) FROM items WHERE id = $1")
        .await
        .unwrap();
    for id in 0..5 {
        // simple protocol
        a.simple_query(&format!("INSERT INTO items VALUES ({id}, 's')"))
            .await
            .unwrap();
        assert_eq!(
            count_simple(&a, id).await,
            1,
            "simple read after write {id}"
        );
        // extended protocol
        let e = 100 + id;
        a.execute("INSERT INTO items VALUES ($1, 'e')", &[&e])
            .await
            .unwrap();
        assert_eq!(count(&a, e).await.0, 1, "extended read after write {e}");
        // prepared statements
        let p = 200 + id;
        a.execute(&insert, &[&p]).await.unwrap();
        let n: i64 = a.query_one(&select, &[&p]).await.unwrap().get(0);
        assert_eq!(n, 1, "prepared read after write {p}");
        // inside a transaction, then after it
        let t = 300 + id;
        a.batch_execute(&format!(
            "BEGIN; INSERT INTO items VALUES ({t}, 't'); COMMIT"
        ))
        .await
        .unwrap();
        assert_eq!(
            count(&a, t).await.0,
            1,
            "read after a committed transaction {t}"
        );
        // a read-only transaction checks the token when it starts
        a.batch_execute("BEGIN READ ONLY").await.unwrap();
        assert_eq!(count_simple(&a, t).await, 1);
        a.batch_execute("COMMIT").await.unwrap();
    }
    assert!(routed(&env, Reason::ReadYourWrites) >= 10);
    // Another session has no token: its reads stay on the replicas.
    let b = env.client().await;
    let before = env.routed();
    for id in 0..10 {
        let (_, port) = count(&b, id).await;
        assert_ne!(port, env.node_port(0));
    }
    assert_eq!(
        env.routed()[0],
        before[0],
        "a session that never wrote used the primary"
    );
    // Read-only work on the primary creates no token.
    let c = env.client().await;
    c.simple_query("/* causeway:primary */ SELECT 1")
        .await
        .unwrap();
    let (_, port) = count(&c, 1).await;
    assert_ne!(port, env.node_port(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causal_wait_lets_a_caught_up_replica_serve_the_read() {
    let env = delayed(300, "\n[consistency]\ncausal_wait_ms = 3000\n").await;
    let a = env.client().await;
    a.execute("INSERT INTO items VALUES (1, 'x')", &[])
        .await
        .unwrap();
    let started = Instant::now();
    let (n, port) = count(&a, 1).await;
    assert_eq!(n, 1);
    assert_ne!(
        port,
        env.node_port(0),
        "the replica should have caught up within the wait"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "it had to wait for replay"
    );
    let stats = &env.proxy.shared.stats;
    assert!(stats.causal_waits.load(Ordering::SeqCst) >= 1);
    assert!(stats.causal_wait_hits.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_mode_keeps_reads_on_the_primary_for_the_window() {
    let env = delayed(
        400,
        "\n[consistency]\nmode = \"sticky\"\nsticky_window_ms = 800\n",
    )
    .await;
    let a = env.client().await;
    // Preparing a write is not writing: reads stay on replicas.
    let insert = a
        .prepare("INSERT INTO items VALUES ($1, 'x')")
        .await
        .unwrap();
    assert_ne!(count(&a, 1).await.1, env.node_port(0));
    a.execute(&insert, &[&1i32]).await.unwrap();
    let (n, port) = count(&a, 1).await;
    assert_eq!((n, port), (1, env.node_port(0)));
    assert!(routed(&env, Reason::StickyWindow) >= 1);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (n, port) = count(&a, 1).await;
    assert_ne!(port, env.node_port(0), "window over: back to replicas");
    assert_eq!(n, 1, "the 400 ms delay has passed too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_and_presented_tokens_work_across_connections() {
    let env = delayed(400, "").await;
    let a = env.client().await;
    a.batch_execute("SET causeway.consistency_key = 'user:42'")
        .await
        .unwrap();
    a.execute("INSERT INTO items VALUES (1, 'k')", &[])
        .await
        .unwrap();
    let b = env.client().await;
    b.batch_execute("SET causeway.consistency_key = 'user:42'")
        .await
        .unwrap();
    assert_eq!(count(&b, 1).await.0, 1, "same key sees the write");
    // A key in a comment works per statement.
    a.execute(
        "/* causeway:key=user:7 */ INSERT INTO items VALUES (2, 'k')",
        &[],
    )
    .await
    .unwrap();
    let c = env.client().await;
    let row = c
        .query_one(
            "/* causeway:key=user:7 */ SELECT count(*) FROM items WHERE id = 2",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    // Presented tokens: read one session's token, present it in another.
    a.execute("INSERT INTO items VALUES (3, 'p')", &[])
        .await
        .unwrap();
    let shown = a
        .simple_query("SHOW causeway.last_write_lsn")
        .await
        .unwrap();
    let token = common::first_text(&shown).unwrap();
    assert!(token.contains('/'), "{token}");
    let d = env.client().await;
    d.batch_execute(&format!("SET causeway.min_lsn = '{token}'"))
        .await
        .unwrap();
    assert_eq!(count(&d, 3).await.0, 1, "presented token");
    let e = env.client().await;
    let row = e
        .query_one(
            &format!("/* causeway:min_lsn={token} */ SELECT count(*) FROM items WHERE id = 3"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1, "token in a comment");
    // Bad tokens are refused, not ignored.
    let err = e
        .batch_execute("SET causeway.min_lsn = 'soon'")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"));
    let err = e
        .simple_query("/* causeway:min_lsn=zz/top */ SELECT 1")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"));
    // A session with neither key nor token reads from replicas.
    let f = env.client().await;
    let (_, port) = count(&f, 3).await;
    assert_ne!(port, env.node_port(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_reported_as_a_parameter_status() {
    let env = delayed(0, "").await;
    let proxy = common::trust_proxy(&env).await;
    let mut s = raw::login(proxy.addr).await;
    for id in 1..=3 {
        // Reported with the write's own reply, before its ReadyForQuery: read right after
        // the write, it names that write's token, not the one before.
        let msgs = raw::roundtrip(
            &mut s,
            &raw::query(&format!("INSERT INTO items VALUES ({id}, 'r')")),
        )
        .await;
        let status = msgs
            .iter()
            .find(|(t, b)| *t == b'S' && b.starts_with(b"causeway_last_write_lsn\0"))
            .expect("ParameterStatus causeway_last_write_lsn with the write's reply");
        let value = String::from_utf8_lossy(&status.1[24..status.1.len() - 1]).into_owned();
        let shown = raw::roundtrip(&mut s, &raw::query("SHOW causeway.last_write_lsn")).await;
        let row = shown.iter().find(|(t, _)| *t == b'D').expect("a row");
        let token = String::from_utf8_lossy(&row.1[6..]).into_owned();
        assert_eq!(value, token, "write {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replica_is_avoided_and_used_again() {
    let env = delayed(0, "").await;
    let r1 = env.cluster.replicas[0].clone();
    tokio::task::block_in_place(|| env.cluster.psql(&r1, "SELECT pg_wal_replay_pause()")).unwrap();
    let a = env.client().await;
    for id in 0..20 {
        a.execute("INSERT INTO items VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
        let (n, port) = count(&a, id).await;
        assert_eq!(n, 1);
        assert_ne!(
            port,
            env.node_port(1),
            "paused replica served a read after a write"
        );
    }
    tokio::task::block_in_place(|| env.cluster.psql(&r1, "SELECT pg_wal_replay_resume()")).unwrap();
    let mut used = false;
    for _ in 0..100 {
        if count(&a, 0).await.1 == env.node_port(1) {
            used = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(used, "replica1 was not used again after catching up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_past_the_lag_limit_is_not_used() {
    let env = delayed(0, "\n[routing]\nmax_replica_lag_ms = 200\n").await;
    let r1 = env.cluster.replicas[0].clone();
    tokio::task::block_in_place(|| env.cluster.psql(&r1, "SELECT pg_wal_replay_pause()")).unwrap();
    let writer = env.primary_admin().await;
    writer
        .batch_execute("GRANT ALL ON items TO app")
        .await
        .unwrap();
    // Keep WAL flowing so the paused replica falls further behind.
    for i in 0..10 {
        writer
            .execute("INSERT INTO items VALUES ($1, 'w')", &[&(1000 + i)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reader = env.client().await;
    for _ in 0..20 {
        let (_, port) = count(&reader, 1).await;
        assert_ne!(
            port,
            env.node_port(1),
            "a replica past the lag limit served a read"
        );
    }
}

/// A long transaction writes WAL for seconds without a commit: the replicas replay it as it
/// comes, so they are not lagging however old their last replayed commit is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_replaying_a_long_transaction_keep_serving_reads() {
    let env = delayed(0, "\n[routing]\nmax_replica_lag_ms = 1000\n").await;
    let owner = env.owner().await;
    owner
        .batch_execute("CREATE TABLE bulk (id int, pad text)")
        .await
        .unwrap();
    env.caught_up().await;
    let reader = env.client().await;
    reader.simple_query("SELECT 1").await.unwrap();

    // About 4.5 s of steady WAL, no commit until the end.
    let bulk = tokio::spawn(async move {
        owner
            .batch_execute(
                "DO $$ BEGIN FOR i IN 1..100 LOOP \
                 INSERT INTO bulk SELECT g, repeat('x', 200) FROM generate_series(1, 1000) g; \
                 PERFORM pg_sleep(0.04); END LOOP; END $$",
            )
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(1800)).await;

    // The replicas really are current: what the primary had written 400 ms ago is replayed.
    let primary = env.primary_admin().await;
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    for r in &env.cluster.replicas {
        let rc = common::connect(&env.cluster.superuser_conninfo(r)).await;
        let ok: bool = rc
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&lsn],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ok, "{} is really behind: test inconclusive", r.name);
    }

    // By now the last replayed commit is over 2 s old, past the 1 s limit.
    let before = env.routed();
    let mut reported = Vec::new();
    for _ in 0..20 {
        reader.simple_query("SELECT 1").await.unwrap();
        let stats = causeway::admin::snapshot::Snapshot::collect(&env.proxy.shared);
        reported.extend(stats.backends.iter().filter_map(|b| b.lag_ms));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = env.routed();
    assert!(
        !bulk.is_finished(),
        "the transaction ended before the reads: inconclusive"
    );
    bulk.await.unwrap();
    let on_primary = after[0] - before[0];
    eprintln!("routed before {before:?}, after {after:?}; replica lag seen: {reported:?}");
    assert!(
        on_primary <= 1,
        "{on_primary} of 20 plain reads went to the primary while the replicas were current \
         (routed before {before:?}, after {after:?})"
    );
    let worst = reported.iter().max().copied().unwrap_or(0);
    assert!(
        worst < 1000,
        "replica lag reported as {worst} ms: {reported:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_scope_and_none_mode() {
    let env = delayed(400, "\n[consistency]\nscope = \"global\"\n").await;
    let a = env.client().await;
    let b = env.client().await;
    a.execute("INSERT INTO items VALUES (1, 'g')", &[])
        .await
        .unwrap();
    assert_eq!(
        count(&b, 1).await.0,
        1,
        "global scope: another session sees the write"
    );

    let loose = env
        .config
        .replace("scope = \"global\"", "scope = \"session\"\nmode = \"none\"");
    let proxy = common::proxy_for(&loose).await;
    let c = env.client_via(&proxy).await;
    // Replay paused on both replicas, so the outcome does not depend on timing.
    for r in env.cluster.replicas.clone() {
        tokio::task::block_in_place(|| env.cluster.psql(&r, "SELECT pg_wal_replay_pause()"))
            .unwrap();
    }
    c.execute("INSERT INTO items VALUES (2, 'n')", &[])
        .await
        .unwrap();
    let (n, port) = count(&c, 2).await;
    assert_ne!(
        port,
        env.node_port(0),
        "mode none reads from a replica at once"
    );
    assert_eq!(
        n, 0,
        "and has not seen the write: what the feature prevents"
    );
    // Through the lsn-mode proxy, at the same moment, a session's own write is always seen.
    a.execute("INSERT INTO items VALUES (3, 'l')", &[])
        .await
        .unwrap();
    assert_eq!(count(&a, 3).await, (1, env.node_port(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_acknowledged_only_after_its_key_token_is_recorded() {
    // At natural lag a reader under the same key races the writer's acknowledgement: it must
    // never start before the writer's token is in place.
    let env = delayed(0, "").await;
    let a = env.client().await;
    let b = env.client().await;
    for c in [&a, &b] {
        c.batch_execute("SET causeway.consistency_key = 'race'")
            .await
            .unwrap();
    }
    let mut stale = 0;
    for id in 0..400 {
        a.execute("INSERT INTO items VALUES ($1, 'r')", &[&id])
            .await
            .unwrap();
        if count(&b, id).await.0 != 1 {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "reads under the writer's key missed its write");
}

/// The token query is prepared once per server connection. When a client drops it (DISCARD ALL,
/// or a DEALLOCATE the proxy cannot see), the next write prepares it again, and a write whose
/// token query failed keeps the session's reads on the primary: never a stale read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_statement_is_prepared_once_and_recovers_when_dropped() {
    let env = delayed(400, "\n[pool]\nprimary_max = 1\n").await;
    let a = env.client().await;
    let tokens = || env.proxy.shared.stats.tokens.load(Ordering::Relaxed);
    let prepared = async |c: &tokio_postgres::Client| -> i64 {
        c.query_one(
            "/* causeway:primary */ SELECT count(*) FROM pg_prepared_statements \
             WHERE name = 'causeway_token'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    let before = tokens();
    for id in 0..3 {
        a.execute("INSERT INTO items VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
        assert_eq!(count(&a, id).await.0, 1, "read after write {id}");
    }
    assert_eq!(tokens() - before, 3, "one token per write");
    assert_eq!(
        prepared(&a).await,
        1,
        "prepared once on the one primary connection"
    );

    // DISCARD ALL drops it with everything else; the proxy sees that and prepares it again.
    a.batch_execute("/* causeway:primary */ DISCARD ALL")
        .await
        .unwrap();
    let before = tokens();
    a.execute("INSERT INTO items VALUES (10, 'd')", &[])
        .await
        .unwrap();
    assert_eq!(tokens() - before, 1, "token after DISCARD ALL");
    assert_eq!(count(&a, 10).await.0, 1);

    // Dropped where the proxy cannot see it, by the very write whose token it should give:
    // that token query fails, the write's reads stay on the primary, and the next write
    // prepares it again.
    tokenless_write(&env, &a, 11).await;
    let before = tokens();
    let (n, port) = count(&a, 11).await;
    assert_eq!(
        (n, port),
        (1, env.node_port(0)),
        "read after a tokenless write"
    );
    a.execute("INSERT INTO items VALUES (12, 'l')", &[])
        .await
        .unwrap();
    assert_eq!(tokens() - before, 1, "the token query was prepared again");
    assert_eq!(count(&a, 12).await.0, 1);
    assert_eq!(prepared(&a).await, 1);

    // DEALLOCATE ALL is not transactional: on a pinned session it drops the token statement
    // even in a transaction that rolls back, and the next write prepares it again.
    a.batch_execute("PREPARE mine AS SELECT 1").await.unwrap();
    for sql in ["BEGIN", "DEALLOCATE ALL", "ROLLBACK"] {
        a.batch_execute(sql).await.unwrap();
    }
    let before = tokens();
    a.execute("INSERT INTO items VALUES (13, 'r')", &[])
        .await
        .unwrap();
    assert_eq!(
        tokens() - before,
        1,
        "token after a rolled-back DEALLOCATE ALL"
    );
    assert_eq!(prepared(&a).await, 1);
}

/// With asynchronous commit a COMMIT returns before its WAL is written, so the server's write
/// position can still be behind it: the token must be the insert position, or a replica that
/// has everything written so far would serve a read that misses the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_covers_an_asynchronous_commit() {
    let opts = ClusterOptions {
        // The WAL writer waits long enough that nothing but a full page writes the commit out.
        primary_conf: vec![("wal_writer_delay".into(), "10s".into())],
        ..ClusterOptions::default()
    };
    let env = with_items(opts, "").await;
    let a = env.client().await;
    a.batch_execute("SET synchronous_commit = off")
        .await
        .unwrap();
    for id in 0..20 {
        a.execute("INSERT INTO items VALUES ($1, 'async')", &[&id])
            .await
            .unwrap();
        assert_eq!(
            count(&a, id).await.0,
            1,
            "read after asynchronous commit {id}"
        );
    }
}

/// A write whose token is lost keeps the reads of every session under its key on the primary
/// too, not only its own session's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_token_keeps_the_keys_readers_on_the_primary() {
    let env = delayed(400, "\n[pool]\nprimary_max = 1\n").await;
    let writer = env.client().await;
    let reader = env.client().await;
    for c in [&writer, &reader] {
        c.batch_execute("SET causeway.consistency_key = 'user:7'")
            .await
            .unwrap();
    }
    // A first write prepares the token statement on the one primary connection.
    writer
        .execute("INSERT INTO items VALUES (30, 'k')", &[])
        .await
        .unwrap();
    tokenless_write(&env, &writer, 31).await;
    // The DO block pinned the writer to the one primary connection: it leaves, and the
    // connection closes with it.
    drop(writer);
    let (n, port) = count(&reader, 31).await;
    assert_eq!(
        (n, port),
        (1, env.node_port(0)),
        "another session under the key read after the tokenless write"
    );
}

/// A write whose WAL ends exactly on a page boundary: `pg_current_wal_insert_lsn()` then points
/// past the next page's header, which a replica's replay position never shows until more WAL
/// follows. The token is the boundary, so the read after it is served by a replica at once
/// instead of waiting out `causal_wait_ms` for the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_ending_on_a_wal_page_boundary_is_read_from_a_replica() {
    let env = with_items(
        ClusterOptions::default(),
        "\n[consistency]\ncausal_wait_ms = 3000\n",
    )
    .await;
    let geometry = env.proxy.shared.cluster.wal_geometry();
    assert_eq!((geometry.page, geometry.segment), (8192, 16 << 20));
    let c = env.client().await;
    let admin = env.primary_admin().await;
    let insert_at = || async {
        admin
            .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // A non-transactional logical message is one WAL record of 55 bytes plus its text (record
    // header 24, long data header 5, message header 24, prefix "p\0"): sized to fill the rest of
    // the page exactly. Anything else writing WAL in between spoils an attempt; try again.
    let mut hit = false;
    for _ in 0..20 {
        let room = 8192 - insert_at().await % 8192;
        if room < 400 {
            admin
                .batch_execute("SELECT pg_logical_emit_message(false, 'p', repeat('y', 400))")
                .await
                .unwrap();
            continue;
        }
        let n = room - 55;
        c.simple_query(&format!(
            "SELECT pg_logical_emit_message(false, 'p', repeat('x', {n}))::text"
        ))
        .await
        .unwrap();
        if insert_at().await % 8192 == 24 {
            hit = true;
            break;
        }
    }
    assert!(hit, "no write ended on a page boundary in 20 tries");
    let started = Instant::now();
    let rows = c
        .simple_query("SELECT current_setting('port')")
        .await
        .unwrap();
    let port = common::first_text(&rows).unwrap();
    assert_ne!(
        port,
        env.node_port(0).to_string(),
        "the read waited {:?} and went to the primary",
        started.elapsed()
    );
}

/// Reads row `id` through `c` after the monitor has had time to see the replicas replay the
/// write's WAL up to (not including) its commit: a token taken before the commit would now
/// let a replica serve the read, and it would miss the row.
async fn read_back(c: &tokio_postgres::Client, id: i32) -> (i64, u16) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let msgs = c
        .simple_query(&format!(
            "SELECT count(*), inet_server_port() FROM items WHERE id = {id}"
        ))
        .await
        .unwrap();
    let row = msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((r.get(0).unwrap(), r.get(1).unwrap())),
            _ => None,
        })
        .unwrap();
    (row.0.parse().unwrap(), row.1.parse().unwrap())
}

/// The same through a raw connection: the count of row `id`.
async fn raw_read_back(s: &mut tokio::net::TcpStream, id: i32) -> String {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sql = format!("SELECT count(*) FROM items WHERE id = {id}");
    let replies = raw::roundtrip(s, &raw::query(&sql)).await;
    let row = replies.iter().find(|(t, _)| *t == b'D').expect("a row");
    // DataRow: i16 column count, i32 length, the text.
    String::from_utf8_lossy(&row.1[6..]).into_owned()
}

/// Whatever shape the work that wrote takes (the write and BEGIN or COMMIT in one string or
/// one extended batch, a portal executed by a later request, pipelined requests, a key hint
/// inside a transaction, a write a replica refused and the primary ran, COPY after a write),
/// the token the read waits for is taken after the commit. The replicas apply commits 1 s
/// late, so a token taken any earlier would let a replica serve the read without the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_follows_the_commit_however_the_write_is_sent() {
    let env = delayed(1500, "\n[routing]\nread_only_functions = [\"bump\"]\n").await;
    env.owner()
        .await
        .batch_execute(
            "CREATE FUNCTION bump(i int) RETURNS int LANGUAGE sql VOLATILE
               AS 'INSERT INTO items VALUES (i, ''bump'') RETURNING i'",
        )
        .await
        .unwrap();
    env.caught_up().await;
    let raw_proxy = common::trust_proxy(&env).await;
    let mut stale = Vec::new();

    // BEGIN and the write in one string; COMMIT on its own.
    let a = env.client().await;
    a.batch_execute("BEGIN; INSERT INTO items VALUES (1, 'begin+write')")
        .await
        .unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    if read_back(&a, 1).await.0 != 1 {
        stale.push("BEGIN; INSERT, then COMMIT");
    }

    // Each case starts with the replicas caught up, so only its own commit is pending.
    env.caught_up().await;
    // The same through the extended protocol, as pgjdbc sends it with autocommit off.
    let mut s = raw::login(raw_proxy.addr).await;
    let mut batch = Vec::new();
    for sql in ["BEGIN", "INSERT INTO items VALUES (2, 'extended')"] {
        batch.extend(raw::parse("", sql));
        batch.extend(raw::bind(""));
        batch.extend(raw::execute());
    }
    batch.extend(raw::sync());
    raw::roundtrip(&mut s, &batch).await;
    let mut commit = raw::parse("", "COMMIT");
    commit.extend(raw::bind(""));
    commit.extend(raw::execute());
    commit.extend(raw::sync());
    raw::roundtrip(&mut s, &commit).await;
    if raw_read_back(&mut s, 2).await != "1" {
        stale.push("extended BEGIN + INSERT batch, then COMMIT");
    }

    env.caught_up().await;
    // A lone BEGIN (deferred by the proxy), then the write and COMMIT in one string.
    let a = env.client().await;
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("INSERT INTO items VALUES (3, 'write+commit'); COMMIT")
        .await
        .unwrap();
    if read_back(&a, 3).await.0 != 1 {
        stale.push("BEGIN, then INSERT; COMMIT");
    }

    env.caught_up().await;
    // The write and a COMMIT (of nothing) in one string outside a transaction.
    let a = env.client().await;
    a.batch_execute("INSERT INTO items VALUES (4, 'autocommit'); COMMIT")
        .await
        .unwrap();
    if read_back(&a, 4).await.0 != 1 {
        stale.push("INSERT; COMMIT outside a transaction");
    }

    env.caught_up().await;
    // A key hint on a write inside a transaction: another session under the key sees it.
    let a = env.client().await;
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("/* causeway:key=user:9 */ INSERT INTO items VALUES (5, 'keyed')")
        .await
        .unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    let b = env.client().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = b
        .simple_query("/* causeway:key=user:9 */ SELECT count(*) FROM items WHERE id = 5")
        .await
        .unwrap();
    if common::first_text(&seen).as_deref() != Some("1") {
        stale.push("key hint on a write inside a transaction, read by another session");
    }

    env.caught_up().await;
    // A write a replica refused (a function wrongly listed as read-only) runs on the primary.
    let a = env.client().await;
    let ran: i32 = a.query_one("SELECT bump(6)", &[]).await.unwrap().get(0);
    assert_eq!(ran, 6);
    if read_back(&a, 6).await.0 != 1 {
        stale.push("a write re-run on the primary after a replica refused it");
    }

    env.caught_up().await;
    // A portal bound by one request and executed by the next.
    let mut s = raw::login(raw_proxy.addr).await;
    raw::roundtrip(&mut s, &raw::query("BEGIN")).await;
    let mut bind = raw::parse("", "INSERT INTO items VALUES (7, 'portal')");
    bind.extend(raw::bind(""));
    bind.extend(raw::msg(b'H', &[]));
    s.write_all(&bind).await.unwrap();
    raw::read_until(&mut s, |t| t == b'2' || t == b'E').await;
    let mut exec = raw::execute();
    exec.extend(raw::sync());
    raw::roundtrip(&mut s, &exec).await;
    raw::roundtrip(&mut s, &raw::query("COMMIT")).await;
    if raw_read_back(&mut s, 7).await != "1" {
        stale.push("Execute of a portal bound by an earlier request");
    }

    env.caught_up().await;
    // COMMIT and an autocommit write pipelined: the write gets a token of its own.
    let a = env.client().await;
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("INSERT INTO items VALUES (8, 'before')")
        .await
        .unwrap();
    let (committed, wrote) = tokio::join!(
        a.batch_execute("COMMIT"),
        a.batch_execute("SELECT pg_sleep(1.2); INSERT INTO items VALUES (9, 'pipelined')")
    );
    committed.unwrap();
    wrote.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    if read_back(&a, 9).await.0 != 1 {
        stale.push("COMMIT and an autocommit INSERT pipelined");
    }

    env.caught_up().await;
    // COMMIT, a write and a command the proxy answers itself, pipelined in one packet: the
    // write takes its token before the backend goes back to the pool.
    env.caught_up().await;
    let mut s = raw::login(raw_proxy.addr).await;
    raw::roundtrip(&mut s, &raw::query("BEGIN")).await;
    raw::roundtrip(&mut s, &raw::query("SELECT 1")).await;
    let mut pipeline = raw::query("COMMIT");
    pipeline.extend(raw::query("INSERT INTO items VALUES (11, 'pipelined')"));
    pipeline.extend(raw::query("SHOW causeway.last_write_lsn"));
    s.write_all(&pipeline).await.unwrap();
    for _ in 0..3 {
        raw::read_until(&mut s, |t| t == b'Z').await;
    }
    if raw_read_back(&mut s, 11).await != "1" {
        stale.push("COMMIT, a write and SHOW causeway.last_write_lsn pipelined");
    }

    // COMMIT AND CHAIN commits the write while a new transaction opens: another session
    // under the key sees it.
    env.caught_up().await;
    let a = env.client().await;
    let b = env.client().await;
    for c in [&a, &b] {
        c.batch_execute("SET causeway.consistency_key = 'chain'")
            .await
            .unwrap();
    }
    a.batch_execute("BEGIN; INSERT INTO items VALUES (12, 'chain')")
        .await
        .unwrap();
    a.batch_execute("COMMIT AND CHAIN").await.unwrap();
    let seen = read_back(&b, 12).await.0;
    a.batch_execute("COMMIT").await.unwrap();
    if seen != 1 {
        stale.push("COMMIT AND CHAIN, read under the key by another session");
    }

    // A write and a COPY in one string: the token waits for the COPY to end.
    let mut s = raw::login(raw_proxy.addr).await;
    s.write_all(&raw::query(
        "DELETE FROM items WHERE id < 0; COPY items FROM STDIN",
    ))
    .await
    .unwrap();
    let started = raw::read_until(&mut s, |t| t == b'G' || t == b'E' || t == b'Z').await;
    assert_eq!(started.last().map(|m| m.0), Some(b'G'), "{started:?}");
    let mut data = raw::msg(b'd', b"10\tcopied\n");
    data.extend(raw::msg(b'c', &[]));
    let done = raw::roundtrip(&mut s, &data).await;
    if done.iter().any(|(t, _)| *t == b'E') {
        stale.push("a write and COPY FROM STDIN in one string (the COPY failed)");
    } else if raw_read_back(&mut s, 10).await != "1" {
        stale.push("a write and COPY FROM STDIN in one string");
    }

    assert!(stale.is_empty(), "stale reads after: {stale:#?}");
}

/// Sticky mode follows writes under a key hint by their tokens: another session reading under
/// the same key sees the write at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_mode_follows_a_key_hint_on_a_write() {
    let env = delayed(1000, "\n[consistency]\nmode = \"sticky\"\n").await;
    let a = env.client().await;
    a.batch_execute("/* causeway:key=user:7 */ INSERT INTO items VALUES (1, 'k')")
        .await
        .unwrap();
    let b = env.client().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = b
        .simple_query("/* causeway:key=user:7 */ SELECT count(*) FROM items WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(common::first_text(&seen).as_deref(), Some("1"));
}

/// Holds every replica's replay where it is.
fn pause_replicas(env: &Env) {
    for r in env.cluster.replicas.clone() {
        tokio::task::block_in_place(|| env.cluster.psql(&r, "SELECT pg_wal_replay_pause()"))
            .unwrap();
    }
}

fn parsed(text: &str) -> causeway::config::Config {
    causeway::config::Config::from_toml(text).unwrap_or_else(|e| panic!("config: {e}\n{text}"))
}

/// A write whose token query fails (the client removed the token statement) gets a derived
/// token from the monitor's next poll of the primary: its reads never see a replica that has
/// not replayed it, long after the sticky window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_token_is_lost_is_followed_past_the_sticky_window() {
    let env = delayed(0, "\n[consistency]\nsticky_window_ms = 200\n").await;
    let a = env.client().await;
    a.batch_execute("INSERT INTO items VALUES (40, 'warm')")
        .await
        .unwrap();
    env.caught_up().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    pause_replicas(&env);
    let tokens = env.proxy.shared.stats.tokens.load(Ordering::Relaxed);
    a.batch_execute("INSERT INTO items VALUES (41, 'l'); DEALLOCATE causeway_token")
        .await
        .unwrap();
    assert_eq!(
        env.proxy.shared.stats.tokens.load(Ordering::Relaxed),
        tokens,
        "the token query found no statement"
    );
    for ms in [0, 400, 800] {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        assert_eq!(count(&a, 41).await.0, 1, "read {ms} ms after the write");
    }
}

/// With `pg_current_wal_insert_lsn()` revoked, the token query fails on every write and the
/// monitor reads the write position instead: reads still see every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_followed_when_the_insert_position_is_revoked() {
    let env = delayed(0, "\n[consistency]\nsticky_window_ms = 200\n").await;
    let admin = env.primary_admin().await;
    admin
        .batch_execute("REVOKE EXECUTE ON FUNCTION pg_current_wal_insert_lsn() FROM PUBLIC")
        .await
        .unwrap();
    env.caught_up().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    pause_replicas(&env);
    let a = env.client().await;
    a.execute("INSERT INTO items VALUES (42, 'r')", &[])
        .await
        .unwrap();
    for ms in [0, 400, 800, 1000] {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        assert_eq!(count(&a, 42).await.0, 1, "read {ms} ms after the write");
    }
}

/// Sticky mode past its window: a replica serves the session only once it has replayed the
/// primary's position sampled after the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_mode_is_sound_after_the_window() {
    let env = delayed(
        0,
        "\n[consistency]\nmode = \"sticky\"\nsticky_window_ms = 200\n",
    )
    .await;
    pause_replicas(&env);
    let a = env.client().await;
    a.execute("INSERT INTO items VALUES (43, 's')", &[])
        .await
        .unwrap();
    for ms in [0, 500, 500] {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        assert_eq!(count(&a, 43).await.0, 1, "read after {ms} ms more");
    }
}

/// A reload that changes `consistency.mode` keeps the writes made before it covered: sticky
/// mode's writes by their derived tokens in `lsn` mode, `lsn` mode's tokens in sticky mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mode_switch_by_reload_keeps_earlier_writes_covered() {
    let env = delayed(0, "\n[consistency]\nsticky_window_ms = 100\n").await;
    pause_replicas(&env);
    let a = env.client().await;
    a.execute("INSERT INTO items VALUES (44, 'lsn')", &[])
        .await
        .unwrap();
    // The config ends with the [consistency] section.
    let sticky = format!("{}\nmode = \"sticky\"\n", env.config.trim_end());
    causeway::reload::apply(&env.proxy.shared, parsed(&sticky)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        count(&a, 44).await.0,
        1,
        "lsn-mode write read in sticky mode"
    );
    a.execute("INSERT INTO items VALUES (45, 'sticky')", &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    causeway::reload::apply(&env.proxy.shared, parsed(&env.config)).unwrap();
    assert_eq!(
        count(&a, 45).await.0,
        1,
        "sticky-mode write read in lsn mode"
    );
    let b = env.client().await;
    assert_eq!(
        count(&b, 45).await.0,
        0,
        "other sessions still read replicas"
    );
}

/// A key evicted at `max_keys`, a key past `key_ttl_ms` and a key the proxy never saw (it
/// restarted) leave a floor their readers wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_keys_leave_a_floor() {
    let env = delayed(0, "\n[consistency]\nmax_keys = 2\nkey_ttl_ms = 100\n").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    pause_replicas(&env);
    let w = env.client().await;
    for (id, key) in [(46, "k1"), (47, "k2"), (48, "k3")] {
        w.batch_execute(&format!(
            "/* causeway:key={key} */ INSERT INTO items VALUES ({id}, 'k')"
        ))
        .await
        .unwrap();
    }
    let r = env.client().await;
    r.batch_execute("SET causeway.consistency_key = 'k1'")
        .await
        .unwrap();
    assert_eq!(count(&r, 46).await.0, 1, "evicted key");
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.batch_execute("SET causeway.consistency_key = 'k3'")
        .await
        .unwrap();
    assert_eq!(count(&r, 48).await.0, 1, "expired key");
    // Another proxy process in front of the same cluster: it never saw the keys.
    let restarted = common::proxy_for(&env.config).await;
    let n = env.client_via(&restarted).await;
    n.batch_execute("SET causeway.consistency_key = 'k2'")
        .await
        .unwrap();
    assert_eq!(count(&n, 47).await.0, 1, "key written before a restart");
}

/// A cancel sent while a read waits for a replica to catch up (`causal_wait_ms`) ends the
/// wait with 57014; the read does not run afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_the_causal_wait_is_honoured() {
    let env = delayed(0, "\n[consistency]\ncausal_wait_ms = 5000\n").await;
    pause_replicas(&env);
    let a = env.client().await;
    a.execute("INSERT INTO items VALUES (49, 'c')", &[])
        .await
        .unwrap();
    let token = a.cancel_token();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let started = Instant::now();
    let err = a
        .simple_query("SELECT count(*) FROM items")
        .await
        .expect_err("the read was cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_millis(3000));
    assert_eq!(count(&a, 49).await.0, 1, "the session goes on");
}

/// `SHOW causeway.last_write_lsn` right after a write whose token is derived (every write, in
/// sticky mode) names a position at or past that write, never the one before it, so another
/// connection presenting it reads the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_shown_right_after_a_tokenless_write_covers_it() {
    let env = delayed(0, "\n[consistency]\nmode = \"sticky\"\n").await;
    pause_replicas(&env);
    let owner = env.owner().await;
    let a = env.client().await;
    let b = env.client().await;
    for id in [46, 47] {
        let before: String = owner
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        a.batch_execute(&format!("INSERT INTO items VALUES ({id}, 'shown')"))
            .await
            .unwrap();
        let shown = common::first_text(
            &a.simple_query("SHOW causeway.last_write_lsn")
                .await
                .unwrap(),
        )
        .unwrap();
        let lsn = |t: &str| causeway::cluster::lsn::parse(t).unwrap();
        assert!(
            lsn(&shown) > lsn(&before),
            "write {id}: shown {shown}, the primary was at {before} before it"
        );
        b.batch_execute(&format!("SET causeway.min_lsn = '{shown}'"))
            .await
            .unwrap();
        assert_eq!(count_simple(&b, id).await, 1, "read with the token shown");
    }
}

/// In sticky mode a write pipelined behind a COMMIT is covered from its own commit, not from
/// the COMMIT's: its derived token is taken after it ran. The replicas apply commits 1 s late,
/// the write takes 3 s, and the read comes right after it, once the window from the COMMIT
/// closed: a token taken at the COMMIT would let a replica that replayed that far serve the
/// row as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_mode_covers_a_write_pipelined_behind_a_commit() {
    let env = delayed(1000, "\n[consistency]\nmode = \"sticky\"\n").await;
    env.owner()
        .await
        .batch_execute("INSERT INTO items VALUES (60, 'old')")
        .await
        .unwrap();
    env.caught_up().await;
    let raw_proxy = common::trust_proxy(&env).await;
    let mut s = raw::login(raw_proxy.addr).await;
    raw::roundtrip(&mut s, &raw::query("BEGIN")).await;
    let mut pipeline = raw::query("INSERT INTO items VALUES (61, 'first')");
    pipeline.extend(raw::query("COMMIT"));
    pipeline.extend(raw::query(
        "UPDATE items SET v = 'new' FROM pg_sleep(3) WHERE id = 60",
    ));
    s.write_all(&pipeline).await.unwrap();
    for _ in 0..3 {
        raw::read_until_ready(&mut s).await;
    }
    let replies = raw::roundtrip(&mut s, &raw::query("SELECT v FROM items WHERE id = 60")).await;
    let row = replies.iter().find(|(t, _)| *t == b'D').expect("a row");
    assert_eq!(String::from_utf8_lossy(&row.1[6..]), "new");
}
