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
    let start = config
        .find("\n[[replicas]]\nname = \"replica2\"")
        .expect("replica2 entry");
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
