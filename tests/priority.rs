//! Priority queuing: commits overtake analytic work waiting for the same backend or execution
//! slot, FIFO when priority is off, and overload refuses the lowest class first.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Env;

async fn env_with(pool_lines: &str) -> Env {
    let lines = pool_lines.to_string();
    let env = common::start_with(Default::default(), move |cfg| {
        *cfg = cfg.replace("[primary]", &format!("{lines}\n\n[primary]"));
    })
    .await;
    env.owner()
        .await
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v int);
             INSERT INTO items SELECT g, g FROM generate_series(1, 1000) g;",
        )
        .await
        .unwrap();
    env.caught_up().await;
    env
}

/// When a statement ran, by the server's clock: the last column of its first row (each
/// statement these tests order returns `clock_timestamp()` last). The server's clock, not the
/// moment a client task got to record its answer, which a loaded machine can reorder.
fn ran_at(msgs: &[tokio_postgres::SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(r.len() - 1).map(str::to_string),
            _ => None,
        })
        .expect("a row with the time it ran")
}

/// Names in the order their statements ran on the server.
fn in_order(recorded: &Mutex<Vec<(String, &'static str)>>) -> Vec<&'static str> {
    let mut v = recorded.lock().unwrap().clone();
    v.sort();
    v.into_iter().map(|(_, name)| name).collect()
}

/// Runs `sql` on a fresh client in the background, recording `name` with the time it ran.
async fn spawn_recorded(
    env: &Env,
    order: &Arc<Mutex<Vec<(String, &'static str)>>>,
    name: &'static str,
    sql: &'static str,
) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
    let c = env.client().await;
    let order = Arc::clone(order);
    tokio::spawn(async move {
        let msgs = c.simple_query(sql).await?;
        order.lock().unwrap().push((ran_at(&msgs), name));
        Ok(())
    })
}

async fn commit_overtakes_analytic(priority: bool) -> Vec<&'static str> {
    let env = env_with(&format!(
        "[pool]\nprimary_max = 1\n\n[priority]\nenabled = {priority}\naging_ms = 10000"
    ))
    .await;
    let holder = env.client().await;
    holder
        .batch_execute("BEGIN; UPDATE items SET v = v + 1 WHERE id = 1")
        .await
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let analytic = spawn_recorded(
        &env,
        &order,
        "analytic",
        "/* causeway:primary */ SELECT count(*), clock_timestamp()::text FROM items",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let commit = spawn_recorded(
        &env,
        &order,
        "commit",
        "UPDATE items SET v = 0 WHERE id = 2 RETURNING clock_timestamp()::text",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    analytic.await.unwrap().unwrap();
    commit.await.unwrap().unwrap();
    in_order(&order)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_overtakes_an_earlier_analytic_waiter() {
    assert_eq!(
        commit_overtakes_analytic(true).await,
        vec!["commit", "analytic"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_when_priority_is_off() {
    assert_eq!(
        commit_overtakes_analytic(false).await,
        vec!["analytic", "commit"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_refuses_the_lowest_class_at_once() {
    let env = env_with("[pool]\nprimary_max = 1\nmax_waiters = 1").await;
    let holder = env.client().await;
    holder
        .batch_execute("BEGIN; UPDATE items SET v = v + 1 WHERE id = 1")
        .await
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let write = spawn_recorded(
        &env,
        &order,
        "write",
        "UPDATE items SET v = 0 WHERE id = 2 RETURNING clock_timestamp()::text",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The one waiting place is taken by a higher class: an analytic request is refused at once.
    let c = env.client().await;
    let started = std::time::Instant::now();
    let err = c
        .batch_execute("/* causeway:primary */ SELECT count(*) FROM items")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused, not timed out"
    );
    let msg = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(msg.contains("primary/app/app"), "{msg}");
    holder.batch_execute("COMMIT").await.unwrap();
    write.await.unwrap().unwrap();
    let stats = env.proxy.shared.pools.all();
    let refusals: u64 = stats
        .iter()
        .map(|p| p.queue().stats().total().refusals)
        .sum();
    assert_eq!(refusals, 1);
    // Operators see the same in psql.
    let rows = c.simple_query("SHOW causeway.pools").await.unwrap();
    let analytic = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r)
                if r.get(0) == Some("primary/app/app") && r.get(1) == Some("analytic") =>
            {
                r.get(9).map(str::to_string)
            }
            _ => None,
        })
        .expect("a row for the primary pool's analytic class");
    assert_eq!(analytic, "1", "refusals");
    let stats = c.simple_query("SHOW causeway.stats").await.unwrap();
    assert!(
        stats.iter().any(|m| matches!(m,
        tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("routed.classified_write")))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_slots_serve_commits_first() {
    let env = env_with("[pool]\nprimary_max = 5").await;
    let cfg = env.config.replace("port = ", "max_active = 1\nport = ");
    // Only the [primary] gets the bound: replicas keep theirs unlimited.
    let cfg = {
        let mut out = String::new();
        let mut in_primary = false;
        for line in cfg.lines() {
            if line.starts_with('[') {
                in_primary = line == "[primary]";
            }
            if line == "max_active = 1" && !in_primary {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    };
    let proxy = common::proxy_for(&cfg).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(env.client_via(&proxy).await);
    }
    let mut clients = clients.into_iter();
    let mut run = |name: &'static str, sql: &'static str| {
        let order = Arc::clone(&order);
        let c = clients.next().unwrap();
        tokio::spawn(async move {
            let msgs = c.simple_query(sql).await?;
            order.lock().unwrap().push((ran_at(&msgs), name));
            Ok::<_, tokio_postgres::Error>(())
        })
    };
    // The slot stays taken long enough for both others to queue even on a loaded machine.
    let busy = run(
        "busy",
        "/* causeway:primary */ SELECT pg_sleep(1.5), clock_timestamp()::text",
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let analytic = run(
        "analytic",
        "/* causeway:primary */ SELECT count(*), clock_timestamp()::text FROM items",
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let commit = run(
        "commit",
        "UPDATE items SET v = 0 WHERE id = 3 RETURNING clock_timestamp()::text",
    );
    for h in [busy, analytic, commit] {
        h.await.unwrap().unwrap();
    }
    assert_eq!(in_order(&order), vec!["busy", "commit", "analytic"]);
}
