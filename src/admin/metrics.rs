//! `GET /metrics`: the admin snapshot in the Prometheus/OpenMetrics text format, encoded by
//! `prometheus-client` from the same [`Snapshot`] as `/stats`, at scrape time.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::snapshot::{LatencyData, Snapshot};
use crate::server::Shared;

/// Histogram bounds in µs: powers of two from 64 µs to about 67 s, which coincide with the
/// latency histogram's own bucket bounds, so the cumulative counts are exact.
const BOUNDS_US: std::ops::RangeInclusive<u32> = 6..=26;

type Labels = Vec<(&'static str, String)>;

/// Encodes the proxy's counters on every scrape.
pub struct ProxyCollector {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ProxyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyCollector")
    }
}

/// A registry holding the proxy's collector.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(ProxyCollector { shared }));
    r
}

/// The text exposition of `registry`.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// One metric family being written.
struct Family<'a, 'b> {
    enc: &'a mut DescriptorEncoder<'b>,
}

impl Family<'_, '_> {
    fn counter(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels, u64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in series {
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels, f64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in series {
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A counter without labels.
    fn counter1(&mut self, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
        let m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(v).encode(m)
    }

    /// A gauge without labels.
    fn gauge1(&mut self, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
        let m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(v).encode(m)
    }
}

impl Collector for ProxyCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let latency = LatencyData::collect(&self.shared);
        let s = Snapshot::collect_with(&self.shared, &latency);
        let mut f = Family { enc: &mut enc };
        let backend = |name: &str| vec![("backend", name.to_string())];

        f.gauge1(
            "causeway_uptime_seconds",
            "Seconds since the proxy started.",
            s.uptime_seconds,
        )?;
        f.gauge(
            "causeway_clients",
            "Connected clients by state.",
            [
                ("active", s.clients.active),
                ("waiting", s.clients.waiting),
                ("idle", s.clients.idle),
                ("logging_in", s.clients.logging_in as usize),
            ]
            .map(|(state, n)| (vec![("state", state.to_string())], n as f64)),
        )?;
        f.counter1(
            "causeway_client_connections",
            "Client connections accepted.",
            s.clients.accepted_total,
        )?;
        f.counter(
            "causeway_logins_failed",
            "Client logins refused, by reason.",
            s.clients
                .logins_failed
                .iter()
                .map(|(reason, n)| (vec![("reason", reason.to_string())], *n)),
        )?;

        f.counter(
            "causeway_queries",
            "Requests run, by server and classification (transaction: BEGIN, COMMIT, \
             SAVEPOINT and the like).",
            s.backends.iter().flat_map(|b| {
                let control = b.queries.saturating_sub(b.reads + b.writes);
                [
                    ("read", b.reads),
                    ("write", b.writes),
                    ("transaction", control),
                ]
                .map(|(route, n)| {
                    (
                        vec![("backend", b.name.clone()), ("route", route.to_string())],
                        n,
                    )
                })
            }),
        )?;
        f.counter(
            "causeway_transactions",
            "Routing decisions per server (a transaction or an autocommit request).",
            s.backends
                .iter()
                .map(|b| (backend(&b.name), b.transactions)),
        )?;
        f.counter(
            "causeway_backend_errors",
            "Requests that failed because their server did.",
            s.backends.iter().map(|b| (backend(&b.name), b.errors)),
        )?;
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        f.gauge(
            "causeway_backend_healthy",
            "1 if the server takes new work (reachable, not banned, not drained).",
            s.backends.iter().map(|b| {
                (
                    vec![("backend", b.name.clone()), ("role", b.role.to_string())],
                    flag(b.healthy),
                )
            }),
        )?;
        f.gauge(
            "causeway_backend_banned",
            "1 while the server is banned after a failure.",
            s.backends
                .iter()
                .map(|b| (backend(&b.name), flag(b.banned))),
        )?;
        f.gauge(
            "causeway_backend_drained",
            "1 while an operator has drained the replica.",
            s.backends
                .iter()
                .map(|b| (backend(&b.name), flag(b.drained))),
        )?;
        f.gauge(
            "causeway_replica_lag_bytes",
            "WAL bytes the replica has still to replay.",
            s.backends
                .iter()
                .filter_map(|b| Some((backend(&b.name), b.lag_bytes? as f64))),
        )?;
        f.gauge(
            "causeway_replica_lag_seconds",
            "Seconds since the replica's last replayed transaction, while it has WAL to replay.",
            s.backends
                .iter()
                .filter_map(|b| Some((backend(&b.name), b.lag_ms? as f64 / 1000.0))),
        )?;

        let pool_labels = |b: &str, user: &str, db: &str| {
            vec![
                ("backend", b.to_string()),
                ("user", user.to_string()),
                ("database", db.to_string()),
            ]
        };
        f.gauge(
            "causeway_pool_size",
            "Configured pool size.",
            s.backends.iter().flat_map(|b| {
                b.pools
                    .iter()
                    .map(|p| (pool_labels(&b.name, &p.user, &p.database), p.size as f64))
            }),
        )?;
        f.gauge(
            "causeway_pool_connections",
            "Open backend connections by state.",
            s.backends.iter().flat_map(|b| {
                b.pools.iter().flat_map(|p| {
                    [("in_use", p.in_use), ("idle", p.idle)].map(|(state, n)| {
                        let mut l = pool_labels(&b.name, &p.user, &p.database);
                        l.push(("state", state.to_string()));
                        (l, n as f64)
                    })
                })
            }),
        )?;
        let queue_labels = |q: &super::snapshot::QueueClass| {
            let mut l = pool_labels(&q.backend, &q.user, &q.database);
            l.push(("class", q.class.to_string()));
            l
        };
        f.gauge(
            "causeway_pool_waiting",
            "Requests waiting for a connection, by priority class.",
            s.queues
                .iter()
                .map(|q| (queue_labels(q), q.waits.waiting as f64)),
        )?;
        f.counter(
            "causeway_pool_refusals",
            "Requests refused because the pool's queue was full.",
            s.queues.iter().map(|q| (queue_labels(q), q.waits.refusals)),
        )?;
        f.counter(
            "causeway_pool_timeouts",
            "Requests that waited past their acquire timeout.",
            s.queues.iter().map(|q| (queue_labels(q), q.waits.timeouts)),
        )?;

        let with_slots = || {
            s.backends
                .iter()
                .filter_map(|b| Some((b, b.slots.as_ref()?)))
        };
        f.gauge(
            "causeway_slots",
            "Execution slots (max_active) of a server.",
            with_slots().map(|(b, sl)| (backend(&b.name), sl.max_active as f64)),
        )?;
        f.gauge(
            "causeway_slots_in_use",
            "Statements holding an execution slot of a server.",
            with_slots().map(|(b, sl)| (backend(&b.name), sl.in_use as f64)),
        )?;
        let slot_labels = |q: &super::snapshot::SlotQueueClass| {
            let mut l = backend(&q.backend);
            l.push(("class", q.class.to_string()));
            l
        };
        f.gauge(
            "causeway_slot_waiting",
            "Requests waiting for an execution slot, by priority class.",
            s.slot_queues
                .iter()
                .map(|q| (slot_labels(q), q.waits.waiting as f64)),
        )?;
        f.counter(
            "causeway_slot_refusals",
            "Requests refused because the server's execution-slot queue was full.",
            s.slot_queues
                .iter()
                .map(|q| (slot_labels(q), q.waits.refusals)),
        )?;
        f.counter(
            "causeway_slot_timeouts",
            "Requests that waited for an execution slot past their acquire timeout.",
            s.slot_queues
                .iter()
                .map(|q| (slot_labels(q), q.waits.timeouts)),
        )?;

        f.counter(
            "causeway_routing_decisions",
            "Routing decisions by reason.",
            s.routing
                .by_reason
                .iter()
                .map(|(reason, n)| (vec![("reason", reason.to_string())], *n)),
        )?;
        f.counter1(
            "causeway_causal_waits",
            "Reads that waited for a replica to replay their write.",
            s.routing.causal_waits,
        )?;
        f.counter1(
            "causeway_retried_reads",
            "Reads re-run elsewhere after their server failed before answering.",
            s.routing.retried_reads,
        )?;
        f.counter1(
            "causeway_commit_tokens",
            "Commit positions recorded after writes.",
            s.consistency.tokens,
        )?;
        f.counter1(
            "causeway_classifier_cache_hits",
            "Statements classified from the cache.",
            s.classifier.cache_hits,
        )?;
        f.counter1(
            "causeway_classifier_cache_misses",
            "Statements parsed to be classified.",
            s.classifier.cache_misses,
        )?;

        let mut m = enc.encode_descriptor(
            "causeway_request_duration_seconds",
            "Request latency through the proxy, by server and priority class.",
            None,
            MetricType::Histogram,
        )?;
        for (name, class, h) in &latency.series {
            let labels = vec![
                ("backend", name.clone()),
                ("class", class.as_str().to_string()),
            ];
            let mut buckets = Vec::new();
            let mut below = 0;
            for k in BOUNDS_US {
                let bound = 1u64 << k;
                let cumulative = h.count_below(bound);
                buckets.push((bound as f64 / 1e6, cumulative - below));
                below = cumulative;
            }
            buckets.push((f64::INFINITY, h.count() - below));
            m.encode_family(&labels)?.encode_histogram::<Labels>(
                h.sum_us() as f64 / 1e6,
                h.count(),
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}
