//! Reloading the configuration of a running proxy: pool sizes, the replica list, weights and
//! routing change without dropping a client mid-transaction; an invalid file changes nothing;
//! restart-only keys are reported and keep their running value.

mod common;

use std::net::SocketAddr;

use common::http;
use serde_json::Value;

fn backends(s: &Value) -> Vec<String> {
    s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

fn reads(s: &Value, name: &str) -> u64 {
    s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .map_or(0, |b| b["reads"].as_u64().unwrap())
}

async fn stats(addr: SocketAddr) -> Value {
    http::get(addr, "/stats").await.json()
}

/// The config text without its second replica.
fn without_replica2(config: &str) -> String {
    without(config, "replica2")
}

/// The config text without the replica `name`.
fn without(config: &str, name: &str) -> String {
    let start = config
        .find(&format!("\n[[replicas]]\nname = \"{name}\""))
        .expect("replica entry");
    let end = config[start + 1..]
        .find("\n[")
        .map_or(config.len(), |i| start + 1 + i);
    format!("{}{}", &config[..start], &config[end..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_pools_replicas_and_routing_without_dropping_clients() {
    let env = common::start().await;
    let admin = env.proxy.admin_addr.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, &env.config).unwrap();
    env.proxy.shared.set_config_path(path.clone());
    env.owner()
        .await
        .batch_execute("CREATE TABLE reload_t (v int)")
        .await
        .unwrap();

    // A client in the middle of a transaction on the primary.
    let c = env.client().await;
    c.batch_execute("BEGIN; INSERT INTO reload_t VALUES (1)")
        .await
        .unwrap();
    let reader = env.client().await;
    reader.simple_query("SELECT 1").await.unwrap();

    let changed = without_replica2(&env.config)
        .replacen(
            "\nlisten = \"127.0.0.1:0\"",
            "\nlisten = \"127.0.0.1:1\"",
            1,
        )
        .replacen("weight = 1", "weight = 3", 1)
        + "\n[pool]\nreplica_max = 3\n\n[routing]\nreplica_strategy = \"round_robin\"\n\n\
           [consistency]\nmode = \"sticky\"\n";
    std::fs::write(&path, &changed).unwrap();
    let r = http::post(admin, "/reload").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let report = r.json();
    let list = |k: &str| -> Vec<String> {
        report[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        list("applied").contains(&"pool.replica_max".to_string()),
        "{report}"
    );
    assert!(
        list("applied").contains(&"routing.replica_strategy".to_string()),
        "{report}"
    );
    assert_eq!(list("replicas_retired"), ["replica2"]);
    assert!(
        list("needs_restart").contains(&"server.listen".to_string()),
        "{report}"
    );

    // The transaction carries on and commits.
    c.batch_execute("INSERT INTO reload_t VALUES (2); COMMIT")
        .await
        .unwrap();
    let n: i64 = env
        .owner()
        .await
        .query_one("SELECT count(*) FROM reload_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);

    // replica2 is gone: no stats entry, no reads; replica1's pool is 3 wide.
    let s = stats(admin).await;
    assert_eq!(backends(&s), ["primary", "replica1"]);
    let before = reads(&s, "replica1");
    for _ in 0..10 {
        reader.simple_query("SELECT 1").await.unwrap();
    }
    let s = stats(admin).await;
    assert_eq!(reads(&s, "replica1"), before + 10);
    let pool = &s["backends"][1]["pools"][0];
    assert_eq!(pool["size"], 3, "{pool}");
    // The listen address kept its running value: the proxy still answers where it was.
    env.client().await.simple_query("SELECT 1").await.unwrap();

    // An invalid file is rejected and nothing changes.
    std::fs::write(&path, format!("{changed}\n[pool]\nreplica_maxx = 1\n")).unwrap();
    let r = http::post(admin, "/reload").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("replica_maxx") || r.body.contains("duplicate"),
        "{}",
        r.body
    );
    let s = stats(admin).await;
    assert_eq!(s["backends"][1]["pools"][0]["size"], 3);

    // replica2 comes back and takes reads again.
    std::fs::write(&path, &env.config).unwrap();
    let r = http::post(admin, "/reload").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["replicas_added"][0], "replica2");
    let mut on_replica2 = false;
    for _ in 0..40 {
        reader.simple_query("SELECT 1").await.unwrap();
        if reads(&stats(admin).await, "replica2") > 0 {
            on_replica2 = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(on_replica2, "the re-added replica never got a read");
    assert_eq!(
        stats(admin).await["backends"][1]["pools"][0]["size"],
        20,
        "replica_max back to its default"
    );
}

fn parsed(text: &str) -> causeway::config::Config {
    causeway::config::Config::from_toml(text).unwrap_or_else(|e| panic!("config: {e}\n{text}"))
}

/// Pools shrunk by a reload below the `min_idle` they run with (restart-only) keep their new
/// size: maintenance does not open and close server connections in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_shrunk_below_the_running_min_idle_stay_calm() {
    let env = common::start_with(Default::default(), |c| {
        c.push_str("\n[pool]\nmin_idle = 2\n")
    })
    .await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE calm (v int)").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let next = env.config.replace(
        "min_idle = 2",
        "min_idle = 1\nprimary_max = 1\nreplica_max = 1",
    );
    let report = causeway::reload::apply(&env.proxy.shared, parsed(&next)).unwrap();
    assert!(report.needs_restart.iter().any(|k| k == "pool.min_idle"));
    // The connection comes back past the new size and is closed: fewer than min_idle open.
    c.batch_execute("INSERT INTO calm VALUES (1)")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let admin = env.primary_admin().await;
    let sessions = || async {
        admin
            .query_one(
                "SELECT sessions FROM pg_stat_database WHERE datname = 'app'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let before = sessions().await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let opened = sessions().await - before;
    assert!(opened < 3, "{opened} server logins in 3 s after the reload");
}

/// The running configuration is checked as a whole: a reload that drops `admin.token` while
/// the admin endpoint still listens on a public address (its address changes only on restart)
/// is refused, and the endpoint keeps asking for the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_cannot_leave_a_public_admin_endpoint_without_its_token() {
    let env = common::start_with(Default::default(), |c| {
        *c = c
            .replace(
                "admin_listen = \"127.0.0.1:0\"",
                "admin_listen = \"0.0.0.0:0\"",
            )
            .replace("[admin]\n", "[admin]\ntoken = \"s3cret\"\n");
    })
    .await;
    let admin = env.proxy.admin_addr.unwrap();
    assert!(!admin.ip().is_loopback(), "{admin}");
    let next = env
        .config
        .replace(
            "admin_listen = \"0.0.0.0:0\"",
            "admin_listen = \"127.0.0.1:0\"",
        )
        .replace("token = \"s3cret\"\n", "");
    let refused = causeway::reload::apply(&env.proxy.shared, parsed(&next)).unwrap_err();
    assert!(refused.contains("admin.token"), "{refused}");
    let r = http::post(admin, "/replicas/replica1/drain").await;
    assert_eq!(r.status, 401, "{} {}", r.status, r.body);
}

/// A replica removed by a reload while a session was routing a read to it gets no new pool:
/// the session routes again over the replicas in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_replica_gets_no_new_pool() {
    let env = common::start().await;
    let shared = std::sync::Arc::clone(&env.proxy.shared);
    let c = env.client().await;
    c.simple_query("SELECT 1").await.unwrap();
    // What a session holds while it routes a read.
    let replica2 = shared
        .cluster
        .replicas_owned()
        .iter()
        .find(|n| n.name == "replica2")
        .cloned()
        .unwrap();
    let report = causeway::reload::apply(&shared, parsed(&without_replica2(&env.config))).unwrap();
    assert_eq!(report.replicas_retired, ["replica2"]);
    let login = causeway::pool::login_key("app", "app");
    assert!(shared.pools.get(&replica2, &login).is_none());
    assert!(shared.pools.all().iter().all(|p| p.node.id != replica2.id));
    for _ in 0..10 {
        let port: i32 = c
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_ne!(port as u16, replica2.port());
    }
}

/// The runtime's threads are set once, at start: a reload reports `server.worker_threads` as
/// needing a restart and keeps the running value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_change_only_on_restart() {
    let env = common::start().await;
    let shared = std::sync::Arc::clone(&env.proxy.shared);
    let next = env
        .config
        .replacen("[server]\n", "[server]\nworker_threads = 3\n", 1);
    let report = causeway::reload::apply(&shared, parsed(&next)).unwrap();
    assert_eq!(
        report.needs_restart,
        ["server.worker_threads"],
        "{report:?}"
    );
    assert!(report.applied.is_empty(), "{report:?}");
    assert_eq!(shared.cfg.load().server.worker_threads, 0);
}

/// A replica added or removed is listed as such; its own keys (`max_active`, which otherwise
/// changes only on restart) are not reported as needing a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_or_removed_replica_needs_no_restart() {
    let env = common::start().await;
    let shared = std::sync::Arc::clone(&env.proxy.shared);
    let report = causeway::reload::apply(&shared, parsed(&without_replica2(&env.config))).unwrap();
    assert_eq!(report.replicas_retired, ["replica2"]);
    assert!(report.needs_restart.is_empty(), "{report:?}");
    assert!(report.applied.is_empty(), "{report:?}");
    let report = causeway::reload::apply(&shared, parsed(&env.config)).unwrap();
    assert_eq!(report.replicas_added, ["replica2"]);
    assert!(report.needs_restart.is_empty(), "{report:?}");
    assert!(report.applied.is_empty(), "{report:?}");
}

/// Reads of `name` per second in `/history`, summed over every sample.
fn history_reads(history: &Value, name: &str) -> u64 {
    history["samples"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["backends"].as_array().unwrap())
        .filter(|b| b["name"] == name)
        .map(|b| b["reads"].as_u64().unwrap())
        .sum()
}

/// `/history` stays true to the counters when a reload removes a replica from the middle of
/// the list: the replica after it does not show the difference between their totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_stays_true_across_a_replica_list_change() {
    let env = common::start().await;
    let admin = env.proxy.admin_addr.unwrap();
    let r = http::post(admin, "/replicas/replica1/drain").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let c = env.client().await;
    for _ in 0..30 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    // A sample with replica2 second in line after the primary, then the reload.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let report =
        causeway::reload::apply(&env.proxy.shared, parsed(&without(&env.config, "replica1")))
            .unwrap();
    assert_eq!(report.replicas_retired, ["replica1"]);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let history = http::get(admin, "/history").await.json();
    let total = reads(&stats(admin).await, "replica2");
    assert!(total >= 30, "{total}");
    assert_eq!(history_reads(&history, "replica2"), total, "{history}");
}

/// A replica whose address changes is a new server to the proxy: it is listed as added (and
/// the old one as retired), and starts with the `max_active` configured for it, as any added
/// replica does, instead of the unbounded one the old address ran with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readdressed_replica_starts_with_its_own_max_active() {
    let env = common::start().await;
    let shared = std::sync::Arc::clone(&env.proxy.shared);
    let r = &env.cluster.replicas[1];
    let was = format!("host = \"{}\"\nport = {}\n", r.host, r.port);
    let spelled = if r.host == "localhost" {
        "127.0.0.1"
    } else {
        "localhost"
    };
    assert!(env.config.contains(&was), "{}", env.config);
    let next = env.config.replace(
        &was,
        &format!("host = \"{spelled}\"\nport = {}\nmax_active = 1\n", r.port),
    );
    let report = causeway::reload::apply(&shared, parsed(&next)).unwrap();
    assert_eq!(report.replicas_added, ["replica2"], "{report:?}");
    assert_eq!(report.replicas_retired, ["replica2"], "{report:?}");
    assert!(report.needs_restart.is_empty(), "{report:?}");
    let admin = env.proxy.admin_addr.unwrap();
    let s = stats(admin).await;
    let replica2 = s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "replica2")
        .cloned()
        .unwrap();
    assert_eq!(replica2["slots"]["max_active"], 1, "{replica2}");
    // A replica that stays keeps its running bound: max_active there needs a restart.
    let again = next.replace("max_active = 1\n", "max_active = 2\n");
    let report = causeway::reload::apply(&shared, parsed(&again)).unwrap();
    assert_eq!(
        report.needs_restart,
        ["replicas[replica2].max_active"],
        "{report:?}"
    );
    assert_eq!(stats(admin).await["backends"][2]["slots"]["max_active"], 1);
}
