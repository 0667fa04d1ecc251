//! Health monitor: one named task per node keeps a connection open and asks
//! `pg_is_in_recovery()` on a fixed interval; replicas that stop being replicas are banned.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Cluster, Node, Role};
use crate::config::Config;

/// Starts one monitor task per node; they stop when `stop` is cancelled.
pub fn spawn_monitors(cluster: &Arc<Cluster>, cfg: &Arc<Config>, stop: &CancellationToken) {
    for node in &cluster.nodes {
        let node = Arc::clone(node);
        let cfg = Arc::clone(cfg);
        let stop = stop.clone();
        tokio::spawn(async move {
            let name = node.name.clone();
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = monitor_node(node, cfg) => {}
            }
            tracing::debug!(node = %name, "health monitor stopped");
        });
    }
}

/// What one health check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Health {
    Ok,
    Unreachable(String),
    WrongRole(&'static str),
}

/// Decides health from the role a node should have and what it reported.
pub(crate) fn judge(role: Role, in_recovery: bool) -> Health {
    match (role, in_recovery) {
        (Role::Replica, true) | (Role::Primary, false) => Health::Ok,
        (Role::Replica, false) => Health::WrongRole("replica reports pg_is_in_recovery() = false"),
        (Role::Primary, true) => Health::WrongRole("primary reports pg_is_in_recovery() = true"),
    }
}

async fn monitor_node(node: Arc<Node>, cfg: Arc<Config>) {
    let interval = Duration::from_millis(cfg.server.health_check_interval_ms);
    let timeout = Duration::from_millis(cfg.server.health_check_timeout_ms);
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        let health = check(&node, &cfg, &mut client, timeout).await;
        match health {
            Health::Ok => node.unban(),
            Health::Unreachable(reason) => {
                client = None;
                node.ban(format!("health check failed: {reason}"));
            }
            Health::WrongRole(reason) => node.ban(reason),
        }
        tokio::time::sleep(interval).await;
    }
}

async fn check(
    node: &Node,
    cfg: &Config,
    client: &mut Option<tokio_postgres::Client>,
    timeout: Duration,
) -> Health {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        match tokio::time::timeout(timeout, connect(node, cfg, timeout)).await {
            Ok(Ok(c)) => *client = Some(c),
            Ok(Err(e)) => return Health::Unreachable(e.to_string()),
            Err(_) => return Health::Unreachable("connect timed out".into()),
        }
    }
    let Some(c) = client.as_ref() else {
        return Health::Unreachable("no connection".into());
    };
    match tokio::time::timeout(timeout, c.query_one("SELECT pg_is_in_recovery()", &[])).await {
        Ok(Ok(row)) => match row.try_get::<_, bool>(0) {
            Ok(in_recovery) => judge(node.role, in_recovery),
            Err(e) => Health::Unreachable(e.to_string()),
        },
        Ok(Err(e)) => Health::Unreachable(e.to_string()),
        Err(_) => Health::Unreachable("health query timed out".into()),
    }
}

/// Opens a monitoring connection as the configured monitor user.
pub(crate) async fn connect(
    node: &Node,
    cfg: &Config,
    timeout: Duration,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&node.host)
        .port(node.port)
        .dbname(&cfg.server.monitor_database)
        .application_name("causeway-monitor")
        .connect_timeout(timeout);
    if let Some(user) = cfg.monitor_user() {
        pg.user(&user.name).password(&user.password);
    }
    let (client, conn) = pg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_mismatch_is_unhealthy() {
        assert_eq!(judge(Role::Replica, true), Health::Ok);
        assert_eq!(judge(Role::Primary, false), Health::Ok);
        assert!(matches!(judge(Role::Replica, false), Health::WrongRole(_)));
        assert!(matches!(judge(Role::Primary, true), Health::WrongRole(_)));
    }
}
