//! Applying a new configuration to a running proxy (SIGHUP, `POST /reload`) without dropping
//! clients: pool sizes, the replica list and weights, routing, consistency, limits and
//! timeouts take effect at once. Keys bound to sockets, identities or structures built at
//! start (listen addresses, TLS, the primary, users and authentication, pool mode, queue
//! policy, caches) keep their running value, and the report names each such change as
//! needing a restart. An invalid file is rejected before anything changes.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::cluster::{Role, spawn_monitor};
use crate::config::{Config, ReplicaConfig};
use crate::server::Shared;

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// Changed keys now in force.
    pub applied: Vec<String>,
    /// Changed keys that keep their running value until a restart.
    pub needs_restart: Vec<String>,
    /// Replicas added and retired.
    pub replicas_added: Vec<String>,
    pub replicas_retired: Vec<String>,
}

/// Loads `path` and applies it; on a load or validation error nothing changes.
pub fn reload_file(shared: &Arc<Shared>, path: &Path) -> Result<ReloadReport, String> {
    let new = Config::load(path).map_err(|e| e.to_string())?;
    apply(shared, new)
}

/// Scalar leaves of a configuration as (dotted key, value), for comparing two of them.
fn leaves(cfg: &Config) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    let name = v.get("name").and_then(|n| n.as_str());
                    let key = format!(
                        "{prefix}[{}]",
                        name.map_or_else(|| i.to_string(), str::to_string)
                    );
                    walk(&key, v, out);
                }
                if items.is_empty() {
                    out.push((prefix.to_string(), "[]".into()));
                }
            }
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    walk("", &serde_json::to_value(cfg).unwrap_or_default(), &mut out);
    out
}

/// Whether a replica in the new configuration is the running one, kept with its node, pools
/// and slots: the same name at the same host and port, as [`Cluster::set_replicas`] matches.
///
/// [`Cluster::set_replicas`]: crate::cluster::Cluster::set_replicas
fn stays(old: &ReplicaConfig, new: &ReplicaConfig) -> bool {
    old.name == new.name && old.host == new.host && old.port == new.port
}

/// Keys whose new value cannot take effect without a restart.
fn restart_only(key: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "server.listen",
        "server.admin_listen",
        "server.monitor_",
        "server.health_check_",
        "server.connect_timeout_ms",
        "server.worker_threads",
        "tls.",
        "primary.",
        "users",
        "auth.",
        "logging.",
        "pool.mode",
        "pool.min_idle",
        "pool.acquire_timeout_ms",
        "pool.idle_timeout_ms",
        "pool.max_lifetime_ms",
        "pool.reset_timeout_ms",
        "pool.max_waiters",
        "priority.",
        "routing.classify_cache_size",
        "routing.function_refresh_ms",
        "routing.read_only_functions",
        "routing.write_functions",
        "consistency.lsn_poll_ms",
        "consistency.key_ttl_ms",
        "consistency.max_keys",
    ];
    PREFIXES.iter().any(|p| key.starts_with(p))
        || (key.starts_with("replicas[") && key.ends_with(".max_active"))
}

/// Applies `new`: the parts that can change live, with the rest kept from the running
/// configuration. That combination is checked as a whole first (a token removed while the
/// admin endpoint still listens on a public address, say); if it does not hold, nothing
/// changes.
pub fn apply(shared: &Arc<Shared>, new: Config) -> Result<ReloadReport, String> {
    let old = shared.cfg.load_full();
    let before = leaves(&old);
    let after = leaves(&new);
    let mut report = ReloadReport::default();
    // A replica's own keys count when it stays; added and removed ones are listed apart. A
    // replica stays when its name and address do (as the cluster matches them): one given a
    // new address is rebuilt, so it is listed as added and retired, its keys with it.
    let one_sided = |key: &str| {
        key.strip_prefix("replicas[")
            .and_then(|rest| rest.split_once(']'))
            .is_some_and(|(name, _)| {
                let was = old.replicas.iter().find(|r| r.name == name);
                let is = new.replicas.iter().find(|r| r.name == name);
                !matches!((was, is), (Some(o), Some(n)) if stays(o, n))
            })
    };
    for (k, v) in &after {
        let was = before.iter().find(|(ok, _)| ok == k).map(|(_, v)| v);
        if was != Some(v) && !one_sided(k) {
            if restart_only(k) {
                report.needs_restart.push(k.clone());
            } else {
                report.applied.push(k.clone());
            }
        }
    }
    for (k, _) in &before {
        if !after.iter().any(|(nk, _)| nk == k) && restart_only(k) && !one_sided(k) {
            report.needs_restart.push(k.clone());
        }
    }
    // The effective configuration: restart-only sections stay as they run.
    let mut effective = new;
    effective.server.listen = old.server.listen.clone();
    effective.server.listen_unix = old.server.listen_unix.clone();
    effective.server.admin_listen = old.server.admin_listen.clone();
    effective.server.monitor_user = old.server.monitor_user.clone();
    effective.server.monitor_database = old.server.monitor_database.clone();
    effective.server.health_check_interval_ms = old.server.health_check_interval_ms;
    effective.server.health_check_timeout_ms = old.server.health_check_timeout_ms;
    // Pools keep the timeout they were made with.
    effective.server.connect_timeout_ms = old.server.connect_timeout_ms;
    // The runtime is built once, before the configuration is first read.
    effective.server.worker_threads = old.server.worker_threads;
    effective.tls = old.tls.clone();
    effective.primary = old.primary.clone();
    effective.users = old.users.clone();
    effective.auth = old.auth.clone();
    effective.logging = old.logging.clone();
    effective.priority = old.priority.clone();
    effective.pool.mode = old.pool.mode;
    // Pools may shrink live; the running min_idle then applies up to their new size.
    effective.pool.min_idle = old
        .pool
        .min_idle
        .min(effective.pool.primary_max)
        .min(effective.pool.replica_max);
    effective.pool.acquire_timeout_ms = old.pool.acquire_timeout_ms;
    effective.pool.idle_timeout_ms = old.pool.idle_timeout_ms;
    effective.pool.max_lifetime_ms = old.pool.max_lifetime_ms;
    effective.pool.reset_timeout_ms = old.pool.reset_timeout_ms;
    effective.pool.max_waiters = old.pool.max_waiters;
    effective.routing.classify_cache_size = old.routing.classify_cache_size;
    effective.routing.function_refresh_ms = old.routing.function_refresh_ms;
    effective.routing.read_only_functions = old.routing.read_only_functions.clone();
    effective.routing.write_functions = old.routing.write_functions.clone();
    effective.consistency.lsn_poll_ms = old.consistency.lsn_poll_ms;
    effective.consistency.key_ttl_ms = old.consistency.key_ttl_ms;
    effective.consistency.max_keys = old.consistency.max_keys;
    // Only a replica that stays keeps its running slots; one rebuilt starts with its own.
    for r in &mut effective.replicas {
        if let Some(o) = old.replicas.iter().find(|o| stays(o, r)) {
            r.max_active = o.max_active;
        }
    }
    effective.validate().map_err(|e| {
        format!("{e} (with the settings that change only on restart kept as they run)")
    })?;
    let effective = Arc::new(effective);

    let (added, retired) = shared.cluster.set_replicas(&effective);
    for node in &added {
        spawn_monitor(
            Arc::clone(node),
            &shared.cluster,
            &effective,
            &shared.shutdown,
        );
        report.replicas_added.push(node.name.clone());
    }
    for node in &retired {
        shared.pools.retire_node(node.id);
        report.replicas_retired.push(node.name.clone());
    }
    for pool in shared.pools.all() {
        let size = match pool.node.role {
            Role::Primary => effective.pool.primary_max,
            Role::Replica => effective.pool.replica_max,
        };
        pool.resize(size);
    }
    shared.cluster.follow_promotion.store(
        effective.routing.follow_promotion,
        std::sync::atomic::Ordering::Release,
    );
    shared.cfg.store(effective);
    tracing::info!(
        applied = ?report.applied,
        needs_restart = ?report.needs_restart,
        added = ?report.replicas_added,
        retired = ?report.replicas_retired,
        "configuration reloaded"
    );
    if !report.needs_restart.is_empty() {
        tracing::warn!(keys = ?report.needs_restart, "these changes keep their running value until a restart");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_keys() {
        for k in [
            "server.listen",
            "server.listen_unix",
            "tls.cert_file",
            "primary.port",
            "users[app].password",
            "pool.mode",
            "replicas[r1].max_active",
            "server.worker_threads",
            // Each one the README lists.
            "server.admin_listen",
            "server.monitor_user",
            "server.monitor_database",
            "server.health_check_interval_ms",
            "server.health_check_timeout_ms",
            "server.connect_timeout_ms",
            "primary.max_active",
            "auth.method",
            "logging.level",
            "priority.aging_ms",
            "pool.min_idle",
            "pool.max_waiters",
            "pool.acquire_timeout_ms",
            "pool.idle_timeout_ms",
            "pool.max_lifetime_ms",
            "pool.reset_timeout_ms",
            "routing.classify_cache_size",
            "routing.read_only_functions",
            "routing.write_functions",
            "routing.function_refresh_ms",
            "consistency.lsn_poll_ms",
            "consistency.key_ttl_ms",
            "consistency.max_keys",
        ] {
            assert!(restart_only(k), "{k}");
        }
        for k in [
            "pool.primary_max",
            "replicas[r1].weight",
            "routing.replica_strategy",
            "consistency.mode",
            "server.query_timeout_ms",
            "server.shutdown_timeout_ms",
            "pool.idle_in_transaction_timeout_ms",
            "routing.follow_promotion",
        ] {
            assert!(!restart_only(k), "{k}");
        }
    }
}
