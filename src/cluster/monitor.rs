//! Monitor: one task per node keeps a connection open and reads, every `lsn_poll_ms`, the
//! node's role (`pg_is_in_recovery()`) and WAL position (replayed on a replica, current on the
//! primary, whose changes also go into the cluster's history for replica lag). Unreachable
//! nodes and replicas that stopped being replicas are banned; sessions waiting for a replica
//! to catch up are woken when a replay position advances.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use tokio_postgres::types::PgLsn;

use tokio_util::sync::CancellationToken;

use super::{Cluster, Node, Role};
use crate::config::{Config, ConsistencyMode};

/// Starts one monitor task per node; they stop when `stop` is cancelled.
pub fn spawn_monitors(cluster: &Arc<Cluster>, cfg: &Arc<Config>, stop: &CancellationToken) {
    for node in cluster.nodes() {
        spawn_monitor(node, cluster, cfg, stop);
    }
}

/// Starts the monitor of one node; it stops with `stop`, or once the node is retired.
pub fn spawn_monitor(
    node: Arc<Node>,
    cluster: &Arc<Cluster>,
    cfg: &Arc<Config>,
    stop: &CancellationToken,
) {
    let cluster = Arc::clone(cluster);
    let cfg = Arc::clone(cfg);
    let stop = stop.clone();
    tokio::spawn(async move {
        let name = node.name.clone();
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = monitor_node(node, cluster, cfg) => {}
        }
        tracing::debug!(node = %name, "health monitor stopped");
    });
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

async fn monitor_node(node: Arc<Node>, cluster: Arc<Cluster>, cfg: Arc<Config>) {
    // LSN modes need fresh replay positions; otherwise the health cadence is enough.
    let every_ms = match cfg.consistency.mode {
        ConsistencyMode::None | ConsistencyMode::Sticky => cfg.server.health_check_interval_ms,
        _ => cfg
            .consistency
            .lsn_poll_ms
            .min(cfg.server.health_check_interval_ms),
    };
    let interval = Duration::from_millis(every_ms);
    let timeout = Duration::from_millis(cfg.server.health_check_timeout_ms);
    let mut probe: Option<Probe> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_check = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = node.poll_now.notified() => {
                // On demand, but no more often than MIN_POLL_GAP: many waiting reads share a poll.
                tokio::time::sleep_until(last_check + MIN_POLL_GAP).await;
            }
        }
        last_check = tokio::time::Instant::now();
        if node.retired.load(Ordering::Acquire) {
            return;
        }
        let health = check(&node, &cluster, &cfg, &mut probe, timeout).await;
        let primary = node.role == Role::Primary;
        match health {
            Health::Ok => {
                if primary {
                    cluster.primary_answered();
                } else {
                    node.promoted_seen_ms.store(0, Ordering::Release);
                }
                if node.is_diverged() {
                    node.ban(super::DIVERGED);
                } else {
                    node.unban();
                }
            }
            Health::Unreachable(reason) => {
                probe = None;
                if primary {
                    cluster.primary_failed();
                }
                node.ban(format!("health check failed: {reason}"));
            }
            Health::WrongRole(reason) if primary => {
                cluster.primary_failed();
                node.ban(reason);
            }
            Health::WrongRole(reason) => {
                let now = cluster.now_ms();
                let _ = node.promoted_seen_ms.compare_exchange(
                    0,
                    now,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                if cluster.follow(&node) {
                    tracing::warn!(
                        replica = %node.name,
                        addr = %node.addr(),
                        "primary down and replica promoted: routing writes to it as the primary"
                    );
                    return;
                }
                let seen = node.promoted_seen_ms.load(Ordering::Acquire);
                if cluster.follow_promotion.load(Ordering::Acquire)
                    && cluster.primary_answered_since(seen)
                {
                    node.ban(
                        "replica promoted while the primary kept answering: not followed as the \
                         primary (that would split the writes between two servers)",
                    );
                } else {
                    node.ban(reason);
                }
            }
        }
    }
}

/// Shortest time between two readings of a node asked for on demand.
const MIN_POLL_GAP: Duration = Duration::from_millis(1);

/// One reading: role, and the WAL position (current on the primary, replayed on a replica).
const PROBE: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
     (extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000000)::int8";

/// [`PROBE`] on the primary, with its insert position too: the commit of a write acknowledged
/// before the poll was sent is at or before it, even under asynchronous commit (derived tokens).
const PROBE_PRIMARY: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
     (extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000000)::int8, \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn() END";

/// A monitoring connection with [`PROBE`] prepared on it, so each reading is one round trip
/// (Bind/Execute/Sync) rather than a parse, an execute and a close.
struct Probe {
    client: tokio_postgres::Client,
    statement: tokio_postgres::Statement,
    /// The statement reads the insert position ([`PROBE_PRIMARY`]).
    insert: bool,
    /// `wal_writer_delay` in ms, if it could be read.
    wal_writer_delay_ms: Option<u64>,
}

impl Probe {
    async fn open(
        node: &Node,
        cluster: &Cluster,
        cfg: &Config,
        timeout: Duration,
    ) -> Result<Self, tokio_postgres::Error> {
        let client = connect(node, cfg, &cluster.tls, timeout).await?;
        let insert = node.role == Role::Primary;
        let statement = client
            .prepare(if insert { PROBE_PRIMARY } else { PROBE })
            .await?;
        let mut wal_writer_delay_ms = None;
        // Fixed when the cluster was created; commit tokens use them (`lsn::record_end`). Not
        // knowing them only leaves tokens as the server gave them, so a failure here is no
        // reason to call the node unreachable.
        if let Ok(row) = client.query_one(STARTED, &[]).await
            && let Ok(Some(started)) = row.try_get::<_, Option<i64>>(0)
        {
            node.started_at_us.store(started, Ordering::Release);
            let diverged = node.diverged_start_us.load(Ordering::Acquire);
            if diverged != 0 && diverged != started {
                node.diverged_start_us.store(0, Ordering::Release);
                tracing::info!(node = %node.name, "restarted since it diverged: checked again");
            }
        }
        if let Ok(wal) = client.query_one(WAL_GEOMETRY, &[]).await {
            let size = |i| {
                wal.try_get::<_, i64>(i)
                    .ok()
                    .and_then(|v| u64::try_from(v).ok())
            };
            if let (Some(page), Some(segment)) = (size(0), size(1)) {
                cluster.set_wal_geometry(super::lsn::WalGeometry { page, segment });
            }
            wal_writer_delay_ms = size(2);
        }
        Ok(Self {
            client,
            statement,
            insert,
            wal_writer_delay_ms,
        })
    }

    /// How long after a commit a poll must be sent for its position to cover it, in µs: 0 for
    /// the insert position; for the write position, three WAL writer delays, the longest an
    /// asynchronous commit waits to be written (PostgreSQL's documented bound), taken at the
    /// setting's maximum (10 s) when it could not be read, plus a margin.
    fn settle_us(&self) -> u64 {
        if self.insert {
            return 0;
        }
        (3 * self.wal_writer_delay_ms.unwrap_or(10_000) + 100) * 1000
    }

    /// The insert position may not be read (`REVOKE EXECUTE ON FUNCTION
    /// pg_current_wal_insert_lsn() FROM PUBLIC`): read the write position instead, with the
    /// delay that makes it cover a commit.
    async fn without_insert(&mut self) -> Result<(), tokio_postgres::Error> {
        self.statement = self.client.prepare(PROBE).await?;
        self.insert = false;
        tracing::warn!(
            "the monitor may not call pg_current_wal_insert_lsn(): writes without a token wait \
             three wal_writer_delay for a reading of the write position"
        );
        Ok(())
    }
}

/// When the server started, in µs since the epoch: a diverged replica is readmitted only
/// once it has restarted.
const STARTED: &str = "SELECT (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::int8";

/// The WAL page and segment sizes, in bytes, and `wal_writer_delay` in ms.
const WAL_GEOMETRY: &str = "SELECT current_setting('wal_block_size')::int8, \
     pg_size_bytes(current_setting('wal_segment_size')), \
     (SELECT setting::int8 FROM pg_catalog.pg_settings WHERE name = 'wal_writer_delay')";

async fn check(
    node: &Node,
    cluster: &Cluster,
    cfg: &Config,
    probe: &mut Option<Probe>,
    timeout: Duration,
) -> Health {
    if probe.as_ref().is_none_or(|p| p.client.is_closed()) {
        let open = Probe::open(node, cluster, cfg, timeout);
        match tokio::time::timeout(timeout, open).await {
            Ok(Ok(p)) => *probe = Some(p),
            Ok(Err(e)) => return Health::Unreachable(e.to_string()),
            Err(_) => return Health::Unreachable("connect timed out".into()),
        }
    }
    let Some(p) = probe.as_mut() else {
        return Health::Unreachable("no connection".into());
    };
    let mut sent = Instant::now();
    let mut answer = tokio::time::timeout(timeout, p.client.query_one(&p.statement, &[])).await;
    let refused = |a: &Result<Result<_, tokio_postgres::Error>, _>| matches!(a, Ok(Err(e)) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    if p.insert && refused(&answer) {
        if let Err(e) = p.without_insert().await {
            return Health::Unreachable(e.to_string());
        }
        sent = Instant::now();
        answer = tokio::time::timeout(timeout, p.client.query_one(&p.statement, &[])).await;
    }
    let row = match answer {
        Ok(Ok(row)) => row,
        Ok(Err(e)) => return Health::Unreachable(e.to_string()),
        Err(_) => return Health::Unreachable("health query timed out".into()),
    };
    let in_recovery = match row.try_get::<_, bool>(0) {
        Ok(v) => v,
        Err(e) => return Health::Unreachable(e.to_string()),
    };
    let lsn = row
        .try_get::<_, Option<PgLsn>>(1)
        .ok()
        .flatten()
        .map_or(0, u64::from);
    let replayed_at = row.try_get::<_, Option<i64>>(2).ok().flatten().unwrap_or(0);
    let read_at_ms = cluster.now_ms();
    if node.role == Role::Primary {
        // Before the position is published: any primary position a reader sees is placed.
        cluster.record_primary(read_at_ms, lsn);
        let fence = if p.insert {
            row.try_get::<_, Option<PgLsn>>(3)
                .ok()
                .flatten()
                .map_or(0, u64::from)
        } else {
            lsn
        };
        if !in_recovery {
            cluster.record_fence(sent, fence, p.settle_us());
        }
    }
    if node.role == Role::Replica && in_recovery {
        node.recovery_lsn.store(lsn, Ordering::Release);
    }
    let before = node.lsn.swap(lsn, Ordering::AcqRel);
    let replayed_before = node.replayed_at_us.swap(replayed_at, Ordering::AcqRel);
    node.lsn_read_at_ms.store(read_at_ms, Ordering::Release);
    if node.role == Role::Replica && lsn > before {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        if let Some(delay_ms) = apply_delay_ms(replayed_before, replayed_at, now_us) {
            node.apply_delay_ms.store(delay_ms, Ordering::Release);
        }
        cluster.lsn_advanced.notify_waiters();
    }
    judge(node.role, in_recovery)
}

/// How late a replica applied a commit, in ms: the age of its last replayed commit, measured
/// only when that commit is new since the previous reading (`before`). Replay through a long
/// transaction's WAL moves the position but replays no commit, and the old commit's age says
/// nothing of how late the replica applies WAL: the last measure stands.
fn apply_delay_ms(before: i64, replayed_at: i64, now_us: i64) -> Option<u64> {
    if replayed_at == 0 || replayed_at == before {
        return None;
    }
    Some(u64::try_from((now_us - replayed_at).max(0) / 1000).unwrap_or(0))
}

/// Opens a monitoring connection as the configured monitor user.
pub(crate) async fn connect(
    node: &Node,
    cfg: &Config,
    tls: &crate::tls::Tls,
    timeout: Duration,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(node.host())
        .port(node.port())
        .dbname(&cfg.server.monitor_database)
        .application_name("causeway-monitor")
        .connect_timeout(timeout);
    if let Some(user) = cfg.monitor_user() {
        pg.user(&user.name).password(&user.password);
    }
    crate::tls::pg_connect(&pg, tls).await
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

    #[test]
    fn apply_delay_is_measured_on_a_newly_replayed_commit_only() {
        // A commit made at 1.000 s, seen replayed at 1.250 s.
        assert_eq!(apply_delay_ms(0, 1_000_000, 1_250_000), Some(250));
        assert_eq!(apply_delay_ms(900_000, 1_000_000, 1_250_000), Some(250));
        // The position moved through a long transaction's WAL, the last commit is the same.
        assert_eq!(apply_delay_ms(1_000_000, 1_000_000, 9_000_000), None);
        // No commit replayed yet.
        assert_eq!(apply_delay_ms(0, 0, 9_000_000), None);
    }
}
