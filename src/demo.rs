//! `causeway demo`: a throwaway primary with two streaming replicas, started from the machine's
//! PostgreSQL binaries, with the proxy in front; Ctrl-C stops and removes everything.

use std::sync::Arc;

use crate::config::Config;
use crate::launcher::{ClusterOptions, LocalCluster};

/// The demo's admin endpoint, as the README gives it.
const ADMIN: &str = "127.0.0.1:9930";

/// The proxy configuration for a local cluster (the same one the tests use). The admin
/// endpoint listens on 127.0.0.1:9930, or on a free port when `listen` asks for one (`:0`).
pub fn config_for(cluster: &LocalCluster, listen: &str) -> String {
    let admin = if listen.ends_with(":0") {
        "127.0.0.1:0"
    } else {
        ADMIN
    };
    config_with_admin(cluster, listen, admin)
}

fn config_with_admin(cluster: &LocalCluster, listen: &str, admin: &str) -> String {
    let mut text = format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "{admin}"

[admin]
users = ["app"]

[auth]
method = "scram-sha-256"

[[users]]
name = "app"
password = "app-secret"

[primary]
host = "{}"
port = {}
"#,
        cluster.primary.host, cluster.primary.port
    );
    for r in &cluster.replicas {
        text.push_str(&format!(
            "\n[[replicas]]\nname = \"{}\"\nhost = \"{}\"\nport = {}\nweight = 1\n",
            r.name, r.host, r.port
        ));
    }
    text
}

/// Runs the demo until Ctrl-C.
pub async fn run(port: u16) -> Result<(), String> {
    eprintln!("starting a PostgreSQL primary and two streaming replicas...");
    let cluster = tokio::task::spawn_blocking(|| LocalCluster::start(ClusterOptions::default()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot start the demo cluster: {e}"))?;
    // Another program on 9930 (another demo, say) leaves the dashboard a free port instead.
    let admin = match std::net::TcpListener::bind(ADMIN) {
        Ok(_) => ADMIN,
        Err(_) => {
            eprintln!("{ADMIN} is in use; the admin endpoint takes a free port");
            "127.0.0.1:0"
        }
    };
    let listen = format!("127.0.0.1:{port}");
    let cfg = Config::from_toml(&config_with_admin(&cluster, &listen, admin))
        .map_err(|e| e.to_string())?;
    let running = crate::server::start(Arc::new(cfg))
        .await
        .map_err(|e| format!("cannot start the proxy: {e}"))?;
    println!("primary   127.0.0.1:{}", cluster.primary.port);
    for r in &cluster.replicas {
        println!("{:<9} 127.0.0.1:{}", r.name, r.port);
    }
    println!("causeway  {}", running.addr);
    if let Some(admin) = running.admin_addr {
        println!("admin     http://{admin}/  (dashboard; /stats, /metrics)");
    }
    println!();
    println!(
        "connect:  PGPASSWORD=app-secret psql -h 127.0.0.1 -p {} -U app app",
        running.addr.port()
    );
    println!(
        "try:      SELECT inet_server_port();  -- a replica's port; writes run on the primary"
    );
    println!(
        "console:  PGPASSWORD=app-secret psql -h 127.0.0.1 -p {} -U app causeway -c 'SHOW REPLICAS'",
        running.addr.port()
    );
    println!("Ctrl-C stops the proxy and removes the cluster.");
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("stopping...");
    running.stop().await;
    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
