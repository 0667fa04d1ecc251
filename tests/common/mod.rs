//! Test harness: a real primary with two streaming replicas (the launcher) and the proxy
//! in-process on port 0 in front of them.
#![allow(dead_code)]

pub mod http;
pub mod process;
pub mod raw;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use causeway::config::Config;
use causeway::launcher::{ClusterOptions, LocalCluster};
use causeway::server::{self, Running};

pub const PASSWORD: &str = "app-secret";

/// A cluster and a proxy; dropping it stops both.
pub struct Env {
    pub cluster: LocalCluster,
    pub proxy: Running,
    pub config: String,
}

/// Starts a cluster with default options and a proxy with the default test configuration.
pub async fn start() -> Env {
    start_with(ClusterOptions::default(), |_| {}).await
}

/// Starts a cluster with `opts` and a proxy whose TOML configuration `tweak` may edit.
pub async fn start_with(opts: ClusterOptions, tweak: impl FnOnce(&mut String)) -> Env {
    if let Ok(filter) = std::env::var("CAUSEWAY_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(opts))
        .await
        .expect("launcher task")
        .expect("start cluster");
    let mut config = causeway::demo::config_for(&cluster, "127.0.0.1:0");
    config = config.replace(
        "\nlisten = \"127.0.0.1:0\"",
        "\nlisten = \"127.0.0.1:0\"\nhealth_check_interval_ms = 200\nhealth_check_timeout_ms = 1000",
    );
    tweak(&mut config);
    let proxy = proxy_for(&config).await;
    Env {
        cluster,
        proxy,
        config,
    }
}

/// Starts another proxy with the given configuration text.
pub async fn proxy_for(config: &str) -> Running {
    let cfg = Config::from_toml(config).unwrap_or_else(|e| panic!("config: {e}\n{config}"));
    server::start(Arc::new(cfg)).await.expect("start proxy")
}

impl Env {
    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.proxy.addr.port()
    }

    /// A libpq-style connection string for the proxy.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=app password={PASSWORD} dbname=app",
            self.port()
        )
    }

    /// A tokio-postgres client through the proxy.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.conninfo()).await
    }

    /// A client straight to the primary as the application user (owner of database app).
    pub async fn owner(&self) -> tokio_postgres::Client {
        connect(&format!(
            "host=127.0.0.1 port={} user=app password={PASSWORD} dbname=app",
            self.cluster.primary.port
        ))
        .await
    }

    /// A client through another proxy in front of the same cluster.
    pub async fn client_via(&self, proxy: &Running) -> tokio_postgres::Client {
        connect(&format!(
            "host=127.0.0.1 port={} user=app password={PASSWORD} dbname=app",
            proxy.addr.port()
        ))
        .await
    }

    /// A client straight to the primary as superuser (for setup and checks).
    pub async fn primary_admin(&self) -> tokio_postgres::Client {
        connect(&self.cluster.superuser_conninfo(&self.cluster.primary)).await
    }

    /// Routing decisions per node so far (transactions and autocommit requests):
    /// [primary, replica1, replica2].
    pub fn routed(&self) -> Vec<u64> {
        self.proxy
            .shared
            .cluster
            .nodes()
            .iter()
            .map(|n| n.transactions.load(Ordering::SeqCst))
            .collect()
    }

    /// Advisory locks held on each node (primary first), all of them or those on `objid`,
    /// counted as the superuser, so every backend's show.
    pub async fn advisory_locks(&self, objid: Option<i64>) -> Vec<i64> {
        let mut held = Vec::new();
        let nodes = std::iter::once(&self.cluster.primary).chain(&self.cluster.replicas);
        for node in nodes {
            let c = connect(&self.cluster.superuser_conninfo(node)).await;
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                     AND ($1::bigint IS NULL OR objid = $1)",
                    &[&objid],
                )
                .await
                .unwrap()
                .get(0);
            held.push(n);
        }
        held
    }

    /// Port of node `i` (0 = primary).
    pub fn node_port(&self, i: usize) -> u16 {
        if i == 0 {
            self.cluster.primary.port
        } else {
            self.cluster.replicas[i - 1].port
        }
    }

    /// Waits until every replica has replayed everything the primary wrote.
    pub async fn caught_up(&self) {
        let c = &self.cluster;
        // LocalCluster is not Sync-shareable across spawn_blocking; poll from here instead.
        let admin = self.primary_admin().await;
        let lsn: String = admin
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        for r in &c.replicas {
            let rc = connect(&c.superuser_conninfo(r)).await;
            for _ in 0..500 {
                let ok: bool = rc
                    .query_one(
                        "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                        &[&lsn],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if ok {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Connects with tokio-postgres and drives the connection in the background.
pub async fn connect(conninfo: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {conninfo}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The first column of the first row a simple query returned, as text.
pub fn first_text(messages: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// Waits for `cond` up to `secs` seconds.
pub async fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..secs * 50 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Starts another proxy in front of the same cluster that trusts its clients (for raw tests).
pub async fn trust_proxy(env: &Env) -> Running {
    proxy_for(
        &env.config
            .replace("method = \"scram-sha-256\"", "method = \"trust\""),
    )
    .await
}

/// Connects and expects a failure; returns the error.
pub async fn connect_err(conninfo: &str) -> tokio_postgres::Error {
    match tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await {
        Ok(_) => panic!("connection unexpectedly succeeded: {conninfo}"),
        Err(e) => e,
    }
}
