//! Priority queuing: commits overtake analytic work waiting for the same backend or execution
//! slot, FIFO when priority is off, and overload refuses the lowest class first.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Env;

async fn env_with(pool_lines: &str) -> Env {
    env_with_primary(pool_lines, "").await
}

/// Like `env_with`, with `primary_lines` added to the `[primary]` section.
async fn env_with_primary(pool_lines: &str, primary_lines: &str) -> Env {
    let lines = pool_lines.to_string();
    let primary = primary_lines.to_string();
    let env = common::start_with(Default::default(), move |cfg| {
        *cfg = cfg.replace("[primary]\n", &format!("{lines}\n\n[primary]\n{primary}\n"));
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

/// `cfg` with `max_active = n` on the primary; replicas keep theirs unlimited.
fn primary_max_active(cfg: &str, n: usize) -> String {
    let mut out = String::new();
    let mut in_primary = false;
    for line in cfg.lines() {
        if line.starts_with('[') {
            in_primary = line == "[primary]";
        }
        if in_primary && line.starts_with("port = ") {
            out.push_str(&format!("max_active = {n}\n"));
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `v` of row `id`, read on the primary.
async fn value(env: &Env, id: i32) -> i32 {
    env.owner()
        .await
        .query_one("SELECT v FROM items WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
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
    let proxy = common::proxy_for(&primary_max_active(&env.config, 1)).await;
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

/// A statement refused an execution slot inside a transaction aborts the transaction, as a
/// server's error would: what follows is refused with 25P02 and COMMIT rolls back, so the
/// statements before it are never committed without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_refused_a_slot_aborts_its_transaction() {
    let env = env_with("[pool]\nprimary_max = 4\nacquire_timeout_ms = 400").await;
    let proxy = common::proxy_for(&primary_max_active(&env.config, 1)).await;
    let a = env.client_via(&proxy).await;
    let busy = env.client_via(&proxy).await;
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("UPDATE items SET v = -1 WHERE id = 1")
        .await
        .unwrap();
    let sleeper = tokio::spawn(async move {
        busy.batch_execute("/* causeway:primary */ SELECT pg_sleep(1.5)")
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = a
        .batch_execute("UPDATE items SET v = -1 WHERE id = 2")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err}");
    sleeper.await.unwrap().unwrap();
    let err = a.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"), "{err}");
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(value(&env, 1).await, 1, "the transaction was rolled back");
    // The session goes on normally.
    a.batch_execute("UPDATE items SET v = -2 WHERE id = 2")
        .await
        .unwrap();
    assert_eq!(value(&env, 2).await, -2);
}

/// A COMMIT does not wait for an execution slot: the statements holding the slots may be
/// waiting for the locks it releases, and the proxy's wait is one the server cannot see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_never_waits_for_a_slot() {
    let env = env_with("[pool]\nprimary_max = 4\nacquire_timeout_ms = 5000").await;
    let proxy = common::proxy_for(&primary_max_active(&env.config, 2)).await;
    let a = env.client_via(&proxy).await;
    a.batch_execute("BEGIN; UPDATE items SET v = v + 1 WHERE id = 3")
        .await
        .unwrap();
    let mut blocked = Vec::new();
    for _ in 0..2 {
        let c = env.client_via(&proxy).await;
        blocked.push(tokio::spawn(async move {
            c.batch_execute("UPDATE items SET v = v + 10 WHERE id = 3")
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    tokio::time::timeout(Duration::from_secs(3), a.batch_execute("COMMIT"))
        .await
        .expect("COMMIT waited behind statements waiting for its locks")
        .unwrap();
    for h in blocked {
        h.await.unwrap().unwrap();
    }
    assert_eq!(value(&env, 3).await, 24);
}

/// When the first statement after a deferred BEGIN cannot get a connection, the transaction
/// has failed before reaching a server: later statements are refused with 25P02 until the
/// client ends it, instead of running (and committing) on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_never_got_a_connection_stays_failed() {
    let env = env_with("[pool]\nprimary_max = 1\nacquire_timeout_ms = 300").await;
    let holder = env.client().await;
    holder
        .batch_execute("BEGIN; UPDATE items SET v = v WHERE id = 10")
        .await
        .unwrap();
    let a = env.client().await;
    a.batch_execute("BEGIN").await.unwrap();
    let err = a
        .batch_execute("UPDATE items SET v = -1 WHERE id = 4")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
    let err = a
        .batch_execute("UPDATE items SET v = -1 WHERE id = 5")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"), "{err}");
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(value(&env, 5).await, 5, "nothing ran after the failure");
    a.batch_execute("UPDATE items SET v = -1 WHERE id = 5")
        .await
        .unwrap();
    assert_eq!(value(&env, 5).await, -1);
}

/// Only the statements of a read-write transaction are class `write`: in a read-only one, on
/// a replica, a report is still `analytic` (its execution-slot priority and latency class).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_of_a_read_only_transaction_keep_their_read_class() {
    use causeway::pool::queue::Class;
    let env = env_with("[pool]\nprimary_max = 4").await;
    let counts = |class: Class| -> u64 {
        env.proxy.shared.cluster.nodes()[1..]
            .iter()
            .map(|n| n.latency[class as usize].snapshot().count())
            .sum()
    };
    let (write, analytic) = (counts(Class::Write), counts(Class::Analytic));
    let c = env.client().await;
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    c.batch_execute("SELECT count(*) FROM items").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(counts(Class::Write) - write, 0, "nothing of it is a write");
    assert!(
        counts(Class::Analytic) > analytic,
        "the report stays analytic"
    );
}

/// The primary's pool for the test login, once a request made it.
async fn primary_pool(env: &Env) -> Arc<causeway::pool::Pool> {
    for _ in 0..250 {
        let pools = env.proxy.shared.pools.all();
        if let Some(p) = pools
            .into_iter()
            .find(|p| p.node.role == causeway::cluster::Role::Primary)
        {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no primary pool");
}

/// The primary's execution slots.
fn primary_slots(env: &Env) -> Arc<causeway::pool::queue::PermitQueue> {
    env.proxy
        .shared
        .cluster
        .primary()
        .slots
        .clone()
        .expect("max_active is set on the primary")
}

fn waiting(q: &causeway::pool::queue::PermitQueue) -> usize {
    q.stats().total().waiting
}

/// Runs `sql` on a fresh client in the background and returns the backend's pid.
async fn spawn_pid(
    env: &Env,
    sql: &'static str,
) -> tokio::task::JoinHandle<Result<String, tokio_postgres::Error>> {
    let c = env.client().await;
    tokio::spawn(async move {
        let msgs = c.simple_query(sql).await?;
        Ok(common::first_text(&msgs).unwrap_or_default())
    })
}

/// A client that sends `sql` and vanishes without a word, as a killed process does, when the
/// returned handle is aborted: its socket closes.
async fn doomed(conninfo: &str, sql: &'static str) -> tokio::task::JoinHandle<()> {
    let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = client.simple_query(sql).await;
    });
    tokio::spawn(async move {
        let _ = conn.await;
    })
}

async fn marks(env: &Env) -> Vec<String> {
    env.owner()
        .await
        .query("SELECT t FROM marks ORDER BY t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Clients that vanish while queued for a connection leave the queue at once: they hold no
/// waiting place, nothing runs for them once connections free up, and the connections that
/// would have served them stay in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_gone_while_queued_for_a_connection_leave_the_queue() {
    let env = env_with("[pool]\nprimary_max = 2\nmax_waiters = 3").await;
    env.owner()
        .await
        .batch_execute("CREATE TABLE marks (t text)")
        .await
        .unwrap();
    let mut sleepers = Vec::new();
    for _ in 0..2 {
        sleepers.push(
            spawn_pid(
                &env,
                "/* causeway:primary */ SELECT pg_backend_pid(), pg_sleep(4)",
            )
            .await,
        );
    }
    let pool = primary_pool(&env).await;
    assert!(common::eventually(5, || pool.queue().stats().in_use == 2).await);
    let mut gone = Vec::new();
    for _ in 0..3 {
        gone.push(
            doomed(
                &env.conninfo(),
                "insert into marks(t) values ('dead-client')",
            )
            .await,
        );
    }
    assert!(common::eventually(5, || waiting(pool.queue()) == 3).await);
    for g in gone {
        g.abort();
    }
    assert!(
        common::eventually(1, || waiting(pool.queue()) == 0).await,
        "vanished clients still hold {} waiting places",
        waiting(pool.queue())
    );
    // The places they left are free: a live client queues instead of being refused.
    let alive = env.client().await;
    let msgs = alive
        .simple_query("insert into marks(t) values ('alive') returning pg_backend_pid()")
        .await
        .expect("queued, not refused");
    let alive_pid = common::first_text(&msgs).unwrap();
    let mut pids = Vec::new();
    for s in sleepers {
        pids.push(s.await.unwrap().unwrap());
    }
    assert_eq!(marks(&env).await, vec!["alive"]);
    assert!(
        pids.contains(&alive_pid),
        "ran on {alive_pid}, not on one of the pool's first connections {pids:?}: one was thrown away"
    );
}

/// The same for clients waiting for an execution slot: they leave that queue at once, nothing
/// runs for them, and the server connections they held go back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_gone_while_waiting_for_an_execution_slot_leave_the_queue() {
    let env = env_with_primary("[pool]\nmax_waiters = 3", "max_active = 1").await;
    env.owner()
        .await
        .batch_execute("CREATE TABLE marks (t text)")
        .await
        .unwrap();
    let slots = primary_slots(&env);
    let sleeper = spawn_pid(&env, "/* causeway:primary */ SELECT pg_sleep(4)").await;
    let pool = primary_pool(&env).await;
    assert!(common::eventually(5, || slots.stats().in_use == 1).await);
    // They set `application_name`, as psql does, so the server connection each is given has
    // their settings queued ahead of their statement.
    let conninfo = format!("{} application_name=doomed", env.conninfo());
    let mut gone = Vec::new();
    for _ in 0..3 {
        gone.push(doomed(&conninfo, "insert into marks(t) values ('dead-client')").await);
    }
    assert!(common::eventually(5, || waiting(&slots) == 3).await);
    let open = pool.open.load(std::sync::atomic::Ordering::SeqCst);
    for g in gone {
        g.abort();
    }
    assert!(
        common::eventually(1, || waiting(&slots) == 0).await,
        "vanished clients still hold {} waiting places",
        waiting(&slots)
    );
    // Given a connection one of them left, with the same settings, it still gets them.
    let alive = common::connect(&format!("{} application_name=doomed", env.conninfo())).await;
    alive
        .batch_execute(
            "insert into marks(t) values ('alive ' || current_setting('application_name'))",
        )
        .await
        .expect("queued, not refused");
    sleeper.await.unwrap().unwrap();
    assert_eq!(marks(&env).await, vec!["alive doomed"]);
    assert_eq!(
        pool.open.load(std::sync::atomic::Ordering::SeqCst),
        open,
        "server connections were thrown away"
    );
}

/// The value of one Prometheus sample, by its exact series text.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// The `SHOW causeway.pools` row of `pool` and `class`.
async fn pools_row(c: &tokio_postgres::Client, pool: &str, class: &str) -> Vec<String> {
    let rows = c.simple_query("SHOW causeway.pools").await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r)
                if r.get(0) == Some(pool) && r.get(1) == Some(class) =>
            {
                Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("").to_string())
                        .collect(),
                )
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no row for {pool} {class}"))
}

/// Waits for execution slots show as waits for connections do, in `SHOW causeway.pools`,
/// `/stats` and `/metrics`: waiting now, refusals, timeouts and the longest wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_slot_waits_show_in_the_stats() {
    let env = env_with_primary(
        "[pool]\nmax_waiters = 3\nacquire_timeout_ms = 1000",
        "max_active = 2",
    )
    .await;
    let slots = primary_slots(&env);
    let mut sleepers = Vec::new();
    for _ in 0..2 {
        sleepers.push(spawn_pid(&env, "/* causeway:primary */ SELECT pg_sleep(4)").await);
    }
    assert!(common::eventually(5, || slots.stats().in_use == 2).await);
    let watcher = env.client().await;
    let mut updates = Vec::new();
    for _ in 0..6 {
        let c = env.client().await;
        updates.push(tokio::spawn(async move {
            c.batch_execute("UPDATE items SET v = v + 1 WHERE id = 5")
                .await
                .unwrap_err()
        }));
    }
    assert!(
        common::eventually(5, || {
            let total = slots.stats().total();
            (total.waiting, total.refusals) == (3, 3)
        })
        .await
    );
    let row = pools_row(&watcher, "primary execution slots", "commit").await;
    assert_eq!((row[5].as_str(), row[9].as_str()), ("3", "3"), "{row:?}");
    let mut messages = Vec::new();
    for u in updates {
        let e = u.await.unwrap();
        assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}");
        messages.push(e.as_db_error().unwrap().message().to_string());
    }
    for m in &messages {
        assert!(
            m.contains("execution slot on server primary") && !m.contains("pool"),
            "{m}"
        );
    }
    assert_eq!(
        messages.iter().filter(|m| m.contains("timed out")).count(),
        3,
        "{messages:?}"
    );

    // psql
    let row = pools_row(&watcher, "primary execution slots", "commit").await;
    let (max_wait, timeouts) = (row[6].parse::<f64>().unwrap(), &row[10]);
    assert_eq!((row[5].as_str(), row[9].as_str()), ("0", "3"), "{row:?}");
    assert_eq!(timeouts, "3", "{row:?}");
    assert!(
        max_wait >= 1000.0,
        "timed-out waits count in max wait: {row:?}"
    );
    let pool_row = pools_row(&watcher, "primary/app/app", "commit").await;
    assert_eq!((pool_row[9].as_str(), pool_row[10].as_str()), ("0", "0"));

    // /stats
    let admin = env.proxy.admin_addr.expect("admin endpoint");
    let stats = common::http::get(admin, "/stats").await.json();
    let q = stats["slot_queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["backend"] == "primary" && q["class"] == "commit")
        .unwrap_or_else(|| panic!("no slot queue in {stats}"))
        .clone();
    assert_eq!(
        (&q["waiting"], &q["refusals"], &q["timeouts"]),
        (&0.into(), &3.into(), &3.into()),
        "{q}"
    );
    assert!(q["max_wait_ms"].as_f64().unwrap() >= 1000.0, "{q}");
    let primary = stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "primary")
        .unwrap();
    assert_eq!(primary["slots"]["max_active"], 2, "{primary}");
    assert_eq!(primary["slots"]["in_use"], 2, "{primary}");

    // The admin console lists the slots among the pools, with no user or database.
    let console = common::connect(&format!(
        "host=127.0.0.1 port={} user=app password={} dbname=causeway",
        env.port(),
        common::PASSWORD
    ))
    .await;
    let slot_row = console
        .simple_query("SHOW POOLS")
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r)
                if r.get("backend") == Some("primary")
                    && r.get("user").is_none()
                    && r.get("class") == Some("commit") =>
            {
                Some(["size", "refusals", "timeouts"].map(|c| r.get(c).unwrap().to_string()))
            }
            _ => None,
        })
        .expect("a SHOW POOLS row for the primary's execution slots");
    assert_eq!(slot_row, ["2", "3", "3"]);

    // /metrics
    let metrics = common::http::get(admin, "/metrics").await.body;
    let series = |name: &str| format!("{name}{{backend=\"primary\",class=\"commit\"}}");
    assert_eq!(
        sample(&metrics, &series("causeway_slot_refusals_total")),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, &series("causeway_slot_timeouts_total")),
        Some(3.0)
    );
    assert_eq!(
        sample(&metrics, &series("causeway_slot_waiting")),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, "causeway_slots{backend=\"primary\"}"),
        Some(2.0)
    );
    for s in sleepers {
        s.await.unwrap().unwrap();
    }
}

/// What a queued client sends while it waits is kept and runs after, in order: more queries,
/// and a Terminate, after which the queries sent before it still run, as on a server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_sent_while_queued_runs_after_in_order() {
    use common::raw;
    use tokio::io::AsyncWriteExt;

    let env = env_with("[pool]\nprimary_max = 1").await;
    env.owner()
        .await
        .batch_execute("CREATE TABLE marks (t text)")
        .await
        .unwrap();
    let proxy = common::trust_proxy(&env).await;
    let holder = env.client_via(&proxy).await;
    holder
        .batch_execute("BEGIN; INSERT INTO marks VALUES ('holder')")
        .await
        .unwrap();
    let mut pipelining = raw::login(proxy.addr).await;
    pipelining
        .write_all(&raw::query(
            "insert into marks values ('first') returning 1",
        ))
        .await
        .unwrap();
    let mut leaving = raw::login(proxy.addr).await;
    leaving
        .write_all(&raw::query("insert into marks values ('before terminate')"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    pipelining
        .write_all(&raw::query(
            "insert into marks values ('second') returning 2",
        ))
        .await
        .unwrap();
    leaving.write_all(&raw::msg(b'X', &[])).await.unwrap();
    drop(leaving);
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let first = raw::read_until(&mut pipelining, |t| t == b'Z').await;
    let second = raw::read_until(&mut pipelining, |t| t == b'Z').await;
    let row = |msgs: &[(u8, Vec<u8>)]| {
        msgs.iter()
            .find(|(t, _)| *t == b'D')
            .map(|(_, body)| body[6..].to_vec())
    };
    assert_eq!(row(&first), Some(b"1".to_vec()), "{first:?}");
    assert_eq!(row(&second), Some(b"2".to_vec()), "{second:?}");
    let mut expected = vec!["before terminate", "first", "holder", "second"];
    for _ in 0..50 {
        if marks(&env).await.len() == expected.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    expected.sort();
    assert_eq!(marks(&env).await, expected);
}
