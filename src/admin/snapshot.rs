//! One consistent read of every counter, shared by `GET /stats` (as JSON), `GET /metrics` and
//! the admin console, so the three always agree. Field names are a stable interface: new
//! fields may appear, existing ones keep their name and meaning (see `version`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::cluster::{Role, lsn};
use crate::pool::queue::{Class, ClassStats};
use crate::server::Shared;
use crate::stats::LatencySnapshot;

/// Version of this schema; bumped only if a field changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything `GET /stats` returns.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub version: u32,
    pub uptime_seconds: f64,
    pub clients: ClientCounts,
    pub backends: Vec<Backend>,
    pub routing: Routing,
    pub latency: Latencies,
    pub queues: Vec<QueueClass>,
    /// Waits for execution slots, per server with `max_active` and class.
    pub slot_queues: Vec<SlotQueueClass>,
    pub classifier: Classifier,
    pub consistency: Consistency,
}

/// Connected clients by state.
#[derive(Debug, Clone, Serialize)]
pub struct ClientCounts {
    /// Logged in right now.
    pub connected: usize,
    /// Holding a backend connection.
    pub active: usize,
    /// Waiting for a backend connection.
    pub waiting: usize,
    /// Holding nothing.
    pub idle: usize,
    /// Connections accepted that have not logged in yet (they count against
    /// `server.max_client_connections` too).
    pub logging_in: u64,
    /// Connections accepted since start.
    pub accepted_total: u64,
    /// Logins refused since start, by reason: password, unknown_user, tls_required,
    /// admin_console, timeout, protocol.
    pub logins_failed: BTreeMap<&'static str, u64>,
}

/// One PostgreSQL server.
#[derive(Debug, Clone, Serialize)]
pub struct Backend {
    pub name: String,
    /// `primary` or `replica`.
    pub role: &'static str,
    pub address: String,
    /// Routable: reachable, not banned and not drained.
    pub healthy: bool,
    pub banned: bool,
    pub ban_reason: Option<String>,
    /// Drained by an operator: no new reads.
    pub drained: bool,
    /// Replay position (replicas) or current WAL position (primary), as PostgreSQL prints it.
    pub lsn: Option<String>,
    /// Replicas: WAL bytes still to replay, and ms since the last replayed transaction while
    /// there is WAL to replay (0 when caught up). `null` for the primary or when unknown.
    pub lag_bytes: Option<u64>,
    pub lag_ms: Option<u64>,
    /// Routing decisions that chose this server (one per transaction or autocommit request).
    pub transactions: u64,
    /// Requests run here, and their split by classification; transaction control (BEGIN,
    /// COMMIT, SAVEPOINT …) is in neither `reads` nor `writes`.
    pub queries: u64,
    pub reads: u64,
    pub writes: u64,
    /// Requests that failed because this server did.
    pub errors: u64,
    /// Backend connections leased to clients right now, over all pools.
    pub connections_in_use: usize,
    pub pools: Vec<PoolUse>,
    /// Execution slots, when the server bounds `max_active`.
    pub slots: Option<SlotUse>,
    pub latency: LatencySummary,
}

/// A server's execution slots: statements running there at once.
#[derive(Debug, Clone, Serialize)]
pub struct SlotUse {
    pub max_active: usize,
    pub in_use: usize,
    pub waiting: usize,
}

/// One pool: connections to one server for one (user, database).
#[derive(Debug, Clone, Serialize)]
pub struct PoolUse {
    pub user: String,
    pub database: String,
    pub size: usize,
    pub open: usize,
    pub in_use: usize,
    pub idle: usize,
    pub waiting: usize,
}

/// Routing decisions and request counts over the whole proxy.
#[derive(Debug, Clone, Serialize)]
pub struct Routing {
    /// Routing decisions by reason: classified_read, classified_write, transaction,
    /// read_only_transaction, hint, session_pin, serializable, no_replica, read_only_retry (a
    /// replica answered 25006 and the request moved to the primary), recovery_conflict (a
    /// replica cancelled a read for a conflict with recovery and the primary ran it again),
    /// read_your_writes, sticky_window.
    pub by_reason: BTreeMap<&'static str, u64>,
    /// Reads that waited for a replica to replay their token, and of those, how many then
    /// ran on a replica.
    pub causal_waits: u64,
    pub causal_wait_hits: u64,
    /// Reads re-run elsewhere because their server failed before answering.
    pub retried_reads: u64,
    /// Sessions pinned to one backend by session state.
    pub pins: u64,
    /// Requests classified as reads and as writes, over all servers.
    pub reads: u64,
    pub writes: u64,
    /// reads / writes; `null` before the first write.
    pub read_write_ratio: Option<f64>,
}

/// Percentiles of request latency, in milliseconds (upper bounds within 25%).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Latency per priority class and per server.
#[derive(Debug, Clone, Serialize)]
pub struct Latencies {
    pub by_class: BTreeMap<&'static str, LatencySummary>,
    pub by_backend: BTreeMap<String, LatencySummary>,
}

/// A pool's waiters of one priority class.
#[derive(Debug, Clone, Serialize)]
pub struct QueueClass {
    pub backend: String,
    pub user: String,
    pub database: String,
    pub class: &'static str,
    #[serde(flatten)]
    pub waits: Waits,
}

/// A server's waiters for an execution slot, of one priority class.
#[derive(Debug, Clone, Serialize)]
pub struct SlotQueueClass {
    pub backend: String,
    pub class: &'static str,
    #[serde(flatten)]
    pub waits: Waits,
}

/// The waits of one class in one queue.
#[derive(Debug, Clone, Serialize)]
pub struct Waits {
    /// Waiting right now.
    pub waiting: usize,
    /// Granted, at once or after queueing; of those, how many queued.
    pub acquired: u64,
    pub queued: u64,
    /// Longest wait, granted or timed out.
    pub max_wait_ms: f64,
    /// Percentiles of granted waits (log2 buckets, at most `max_wait_ms`).
    pub wait_p50_ms: Option<f64>,
    pub wait_p99_ms: Option<f64>,
    /// Refused because the queue was full; waits that timed out.
    pub refusals: u64,
    pub timeouts: u64,
}

impl Waits {
    fn of(c: &ClassStats) -> Self {
        Self {
            waiting: c.waiting,
            acquired: c.acquired,
            queued: c.queued,
            max_wait_ms: ms(c.max_wait_us),
            wait_p50_ms: c.wait_percentile_us(0.5).map(ms),
            wait_p99_ms: c.wait_percentile_us(0.99).map(ms),
            refusals: c.refusals,
            timeouts: c.timeouts,
        }
    }
}

/// The statement classification cache.
#[derive(Debug, Clone, Serialize)]
pub struct Classifier {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_entries: usize,
}

/// Read-your-writes.
#[derive(Debug, Clone, Serialize)]
pub struct Consistency {
    pub mode: String,
    pub scope: String,
    /// Commit tokens recorded after writes.
    pub tokens: u64,
    /// Total time reads spent waiting for replicas to catch up, in ms.
    pub causal_wait_ms_total: f64,
    /// Consistency keys remembered right now.
    pub keys: usize,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl LatencySummary {
    /// Summary of a histogram.
    pub fn of(h: &LatencySnapshot) -> Self {
        let count = h.count();
        let p = |q| h.percentile_us(q).map(ms);
        Self {
            count,
            mean_ms: (count > 0).then(|| h.sum_us() as f64 / count as f64 / 1000.0),
            p50_ms: p(0.5),
            p90_ms: p(0.9),
            p99_ms: p(0.99),
        }
    }
}

/// Latency histograms read once, for the summaries and the Prometheus buckets.
pub struct LatencyData {
    /// (backend, class, histogram) for every pair with at least one request.
    pub series: Vec<(String, Class, LatencySnapshot)>,
}

impl LatencyData {
    /// Reads every node's histograms.
    pub fn collect(shared: &Shared) -> Self {
        let mut series = Vec::new();
        for node in &shared.cluster.nodes() {
            for class in Class::ALL {
                let h = node.latency[class as usize].snapshot();
                if h.count() > 0 {
                    series.push((node.name.clone(), class, h));
                }
            }
        }
        Self { series }
    }
}

fn serialized_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

impl Snapshot {
    /// Reads every counter now.
    pub fn collect(shared: &Shared) -> Self {
        Self::collect_with(shared, &LatencyData::collect(shared))
    }

    /// Reads every counter now, with latency histograms already read.
    pub fn collect_with(shared: &Shared, latency: &LatencyData) -> Self {
        let cluster = &shared.cluster;
        let stats = &shared.stats;
        let pools = shared.pools.all();
        let mut backends = Vec::new();
        let mut queues = Vec::new();
        let mut slot_queues = Vec::new();
        for node in &cluster.nodes() {
            let banned = !node.is_usable();
            let drained = node.drained.load(Ordering::Relaxed);
            let raw_lsn = node.lsn.load(Ordering::Acquire);
            let (lag_bytes, lag_ms) = match node.role {
                Role::Replica if raw_lsn != 0 => {
                    let p = cluster.progress(node);
                    (Some(p.lag_bytes()), Some(cluster.lag_ms(&p)))
                }
                _ => (None, None),
            };
            let mut node_pools = Vec::new();
            for pool in pools.iter().filter(|p| p.node.id == node.id) {
                let q = pool.queue().stats();
                node_pools.push(PoolUse {
                    user: pool.user().to_string(),
                    database: pool.database().to_string(),
                    size: pool.max(),
                    open: pool.open.load(Ordering::Relaxed),
                    in_use: q.in_use,
                    idle: pool.idle_count(),
                    waiting: q.classes.iter().map(|c| c.waiting).sum(),
                });
                for class in Class::ALL {
                    queues.push(QueueClass {
                        backend: node.name.clone(),
                        user: pool.user().to_string(),
                        database: pool.database().to_string(),
                        class: class.as_str(),
                        waits: Waits::of(q.class(class)),
                    });
                }
            }
            let slots = node.slots.as_ref().map(|slots| {
                let q = slots.stats();
                for class in Class::ALL {
                    slot_queues.push(SlotQueueClass {
                        backend: node.name.clone(),
                        class: class.as_str(),
                        waits: Waits::of(q.class(class)),
                    });
                }
                SlotUse {
                    max_active: q.permits,
                    in_use: q.in_use,
                    waiting: q.classes.iter().map(|c| c.waiting).sum(),
                }
            });
            let mut node_latency = LatencySnapshot::default();
            for (_, _, h) in latency.series.iter().filter(|(n, _, _)| *n == node.name) {
                node_latency.merge(h);
            }
            backends.push(Backend {
                name: node.name.clone(),
                role: match node.role {
                    Role::Primary => "primary",
                    Role::Replica => "replica",
                },
                address: node.addr(),
                healthy: !banned && !drained,
                banned,
                ban_reason: node.ban_reason(),
                drained,
                lsn: (raw_lsn != 0).then(|| lsn::format(raw_lsn)),
                lag_bytes,
                lag_ms,
                transactions: node.transactions.load(Ordering::Relaxed),
                queries: node.queries.load(Ordering::Relaxed),
                reads: node.reads.load(Ordering::Relaxed),
                writes: node.writes.load(Ordering::Relaxed),
                errors: node.errors.load(Ordering::Relaxed),
                connections_in_use: node.in_use.load(Ordering::Relaxed),
                pools: node_pools,
                slots,
                latency: LatencySummary::of(&node_latency),
            });
        }

        let reads: u64 = backends.iter().map(|b| b.reads).sum();
        let writes: u64 = backends.iter().map(|b| b.writes).sum();
        let mut by_class = BTreeMap::new();
        for class in Class::ALL {
            let mut h = LatencySnapshot::default();
            for (_, _, s) in latency.series.iter().filter(|(_, c, _)| *c == class) {
                h.merge(s);
            }
            by_class.insert(class.as_str(), LatencySummary::of(&h));
        }
        let by_backend = backends
            .iter()
            .map(|b| (b.name.clone(), b.latency.clone()))
            .collect();

        let (idle, waiting, active) = shared.clients.counts();
        let classifiers = shared.catalogs.all();
        let cfg = &shared.cfg.load().consistency;
        Snapshot {
            version: SCHEMA_VERSION,
            uptime_seconds: shared.started.elapsed().as_secs_f64(),
            clients: ClientCounts {
                connected: idle + waiting + active,
                active,
                waiting,
                idle,
                logging_in: stats
                    .clients_open
                    .load(Ordering::Relaxed)
                    .saturating_sub((idle + waiting + active) as u64),
                accepted_total: stats.clients_total.load(Ordering::Relaxed),
                logins_failed: stats.logins_failed().into_iter().collect(),
            },
            backends,
            routing: Routing {
                by_reason: stats.routes().into_iter().collect(),
                causal_waits: stats.causal_waits.load(Ordering::Relaxed),
                causal_wait_hits: stats.causal_wait_hits.load(Ordering::Relaxed),
                retried_reads: stats.retried_reads.load(Ordering::Relaxed),
                pins: stats.pins.load(Ordering::Relaxed),
                reads,
                writes,
                read_write_ratio: (writes > 0).then(|| reads as f64 / writes as f64),
            },
            latency: Latencies {
                by_class,
                by_backend,
            },
            queues,
            slot_queues,
            classifier: Classifier {
                cache_hits: classifiers.iter().map(|(_, c)| c.hits()).sum(),
                cache_misses: classifiers.iter().map(|(_, c)| c.misses()).sum(),
                cache_entries: classifiers.iter().map(|(_, c)| c.cached()).sum(),
            },
            consistency: Consistency {
                mode: serialized_name(&cfg.mode),
                scope: serialized_name(&cfg.scope),
                tokens: stats.tokens.load(Ordering::Relaxed),
                causal_wait_ms_total: ms(stats.causal_wait_us.load(Ordering::Relaxed)),
                keys: shared.keys.len(),
            },
        }
    }
}
