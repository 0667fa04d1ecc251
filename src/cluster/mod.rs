//! Topology and per-node health: written by the monitor (and by the data path on a failed
//! connect), read lock-free by the router.

pub mod lsn;
mod monitor;

pub use monitor::{spawn_monitor, spawn_monitors};

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::config::Config;
use crate::pool::queue::{PermitQueue, QueueConfig};

/// Whether a node takes writes or serves reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

/// One PostgreSQL server and its live status.
#[derive(Debug)]
pub struct Node {
    /// Index in `Cluster::nodes`: 0 is the primary.
    pub id: usize,
    pub name: String,
    pub role: Role,
    /// Host and port; the primary's moves when routing follows a promoted replica.
    endpoint: ArcSwap<(String, u16)>,
    /// Share of reads under weighted routing; changes on reload.
    pub weight: AtomicU32,
    /// Removed from the configuration by a reload, or promoted to primary: no new work, its
    /// monitor stops.
    pub retired: AtomicBool,
    /// Bumped when the endpoint moves: connections opened before are not reused.
    pub generation: AtomicU64,
    /// Asks the monitor to read this node's position now rather than at its next tick (a read
    /// is waiting for it to replay a write).
    pub poll_now: Notify,
    usable: AtomicBool,
    ban_reason: Mutex<Option<String>>,
    /// Backend connections currently leased to clients (for least-connections choice).
    pub in_use: AtomicUsize,
    /// Routing decisions that chose this node: one per transaction or autocommit request.
    pub transactions: AtomicU64,
    /// Requests (a simple Query, or an extended-protocol batch) sent here, split into reads
    /// and writes by classification.
    pub queries: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    /// Request latency seen by clients (from the proxy taking the request to the server's
    /// ReadyForQuery), per priority class.
    pub latency: [crate::stats::LatencyHistogram; 5],
    /// Requests that failed here because the server did.
    pub errors: AtomicU64,
    /// Replicas: `pg_last_wal_replay_lsn()`; primary: `pg_current_wal_lsn()`. 0 = unknown.
    pub lsn: AtomicU64,
    /// Replicas: `pg_last_xact_replay_timestamp()` in µs since the epoch; 0 = none yet.
    pub replayed_at_us: AtomicI64,
    /// When the monitor last read `lsn`, in ms since the cluster started; 0 = never.
    pub lsn_read_at_ms: AtomicU64,
    /// Replicas: how old the last transaction was when the replica was seen replaying it, in
    /// ms (roughly the delay between a commit and its replay here).
    pub apply_delay_ms: AtomicU64,
    /// Node drained by an operator: no new reads.
    pub drained: AtomicBool,
    /// Execution slots (`max_active`): statements running here at once, in priority order.
    pub slots: Option<Arc<PermitQueue>>,
    /// Replicas: when the monitor first saw this one out of recovery (promoted), on the
    /// [`Cluster::now_ms`] clock; 0 while it is in recovery.
    pub promoted_seen_ms: AtomicU64,
    /// Replicas: the last position the monitor saw replayed while the node was in recovery.
    pub recovery_lsn: AtomicU64,
    /// The server's `pg_postmaster_start_time()` in µs since the epoch, as the monitor last
    /// read it; 0 = unknown.
    pub started_at_us: AtomicI64,
    /// Replicas left on the old primary's timeline past the position a followed promotion
    /// took over from: their data is not the new primary's, so they stay out until the server
    /// restarts (rewound or rebuilt). The start time they had when found so; 0 = not diverged.
    pub diverged_start_us: AtomicI64,
}

impl Node {
    fn new(id: usize, name: &str, role: Role, host: &str, port: u16, weight: u32) -> Self {
        Self {
            id,
            name: name.to_string(),
            role,
            endpoint: ArcSwap::from_pointee((host.to_string(), port)),
            weight: AtomicU32::new(weight),
            retired: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            poll_now: Notify::new(),
            usable: AtomicBool::new(true),
            ban_reason: Mutex::new(None),
            in_use: AtomicUsize::new(0),
            transactions: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            latency: Default::default(),
            errors: AtomicU64::new(0),
            lsn: AtomicU64::new(0),
            replayed_at_us: AtomicI64::new(0),
            lsn_read_at_ms: AtomicU64::new(0),
            apply_delay_ms: AtomicU64::new(0),
            drained: AtomicBool::new(false),
            slots: None,
            promoted_seen_ms: AtomicU64::new(0),
            recovery_lsn: AtomicU64::new(0),
            started_at_us: AtomicI64::new(0),
            diverged_start_us: AtomicI64::new(0),
        }
    }

    fn with_slots(mut self, max_active: usize, cfg: &Config) -> Self {
        if max_active > 0 {
            self.slots = Some(Arc::new(PermitQueue::new(QueueConfig {
                permits: max_active,
                priority: cfg.priority.enabled,
                aging: std::time::Duration::from_millis(cfg.priority.aging_ms),
                max_waiters: cfg.pool.max_waiters,
                background_share: cfg.priority.background_share_permille(),
            })));
        }
        self
    }

    /// Host and port, shared: taking it costs no allocation.
    pub fn endpoint(&self) -> Arc<(String, u16)> {
        self.endpoint.load_full()
    }

    /// `host:port`, or the socket file of a Unix-socket directory, for messages and stats.
    pub fn addr(&self) -> String {
        let e = self.endpoint.load();
        crate::tls::server_addr(&e.0, e.1)
    }

    /// Host name or address.
    pub fn host(&self) -> String {
        self.endpoint.load().0.clone()
    }

    /// Port.
    pub fn port(&self) -> u16 {
        self.endpoint.load().1
    }

    /// Whether new work may be sent here.
    pub fn is_usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// Stops new work going here until the monitor sees the node healthy again.
    pub fn ban(&self, reason: impl Into<String>) {
        let reason = reason.into();
        if self.usable.swap(false, Ordering::AcqRel) {
            tracing::warn!(node = %self.name, %reason, "node banned");
        }
        if let Ok(mut slot) = self.ban_reason.lock() {
            *slot = Some(reason);
        }
    }

    /// Lifts a ban; only the monitor calls this, after a successful check.
    pub fn unban(&self) {
        if let Ok(mut slot) = self.ban_reason.lock() {
            *slot = None;
        }
        if !self.usable.swap(true, Ordering::AcqRel) {
            tracing::info!(node = %self.name, "node usable again");
        }
    }

    /// Why the node is banned, if it is.
    pub fn ban_reason(&self) -> Option<String> {
        self.ban_reason.lock().ok().and_then(|s| s.clone())
    }

    /// Whether the node was left on an old timeline by a followed promotion and has not been
    /// restarted since.
    pub fn is_diverged(&self) -> bool {
        self.diverged_start_us.load(Ordering::Acquire) != 0
    }
}

/// Why a replica found diverged by a followed promotion stays out.
pub const DIVERGED: &str = "replayed past the position the promoted replica took over from, on \
     the old primary's timeline: rewind or rebuild it, and restart it";

/// Readings of the primary's WAL position kept for replica lag: 8192 of 16 bytes, 128 KiB. The
/// monitor adds one per poll that finds the position moved, so under steady writes at the
/// default 10 ms poll they span about 80 s, well past any sensible `max_replica_lag_ms` (30 s
/// by default); a quieter primary moves less often and they span longer. A replica behind all
/// of them is at least that far behind (see `lsn::Behind::BeforeSpan`).
const PRIMARY_HISTORY: usize = 8192;

/// Entries kept for derived tokens: 1024 of 24 bytes. A write older than all of them gets the
/// oldest kept, a later position than needed but never an earlier one.
const PRIMARY_FENCES: usize = 1024;

/// The primary and its replicas.
#[derive(Debug)]
pub struct Cluster {
    primary: Arc<Node>,
    /// The replicas in configuration order; replaced as a whole when a reload changes the
    /// list (readers keep the list they loaded).
    replicas: ArcSwap<Vec<Arc<Node>>>,
    /// Next node id: ids are never reused, so a retired replica's stats stay its own.
    next_id: AtomicUsize,
    /// `routing.follow_promotion`, kept current by reloads.
    pub follow_promotion: AtomicBool,
    /// Round-robin cursor.
    pub rr: AtomicUsize,
    /// Woken whenever a replica's replay position advances (sessions waiting to read).
    pub lsn_advanced: Notify,
    /// The highest commit token seen through this proxy (global consistency scope).
    pub global_token: AtomicU64,
    /// `wal_block_size` and `wal_segment_size`, as the monitor read them; 0 until then.
    wal_page: AtomicU64,
    wal_segment: AtomicU64,
    /// When a write through this proxy was last acknowledged without a token whose derived
    /// token is not yet in `global_token`, in µs on the [`Cluster::us_at`] clock; 0 = none.
    pub global_unconfirmed: AtomicU64,
    /// The primary's position by the time each poll was sent: derived tokens.
    fences: Mutex<lsn::Fences>,
    /// When the last poll recorded in `fences` was sent (µs): a write acknowledged later has
    /// no derived token yet, known without the lock.
    fence_sent_us: AtomicU64,
    /// How long after a write a poll must be sent for its reading to cover the write, in µs:
    /// 0 when the monitor reads the insert position, three WAL writer delays when it can only
    /// read the write position (an asynchronous commit is written by then).
    fence_settle_us: AtomicU64,
    /// The primary's WAL position each time the monitor saw it change, on the `now_ms` clock:
    /// replica lag in time is read from it.
    primary_history: Mutex<lsn::History>,
    /// When the primary last answered its health check as a primary, on the `now_ms` clock.
    primary_ok_at_ms: AtomicU64,
    /// When the primary's health check first failed after it last answered; 0 = it is up.
    /// Replica lag stops growing then: with the primary gone there is nothing newer to read.
    primary_down_at_ms: AtomicU64,
    started: Instant,
    /// TLS towards the servers, for the monitor's connections.
    pub tls: Arc<crate::tls::Tls>,
}

impl Cluster {
    /// Builds the topology from configuration; every node starts usable.
    pub fn from_config(cfg: &Config, tls: Arc<crate::tls::Tls>) -> Self {
        let primary = Arc::new(
            Node::new(
                0,
                "primary",
                Role::Primary,
                &cfg.primary.host,
                cfg.primary.port,
                1,
            )
            .with_slots(cfg.primary.max_active, cfg),
        );
        let replicas = cfg
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| Arc::new(replica_node(i + 1, r, cfg)))
            .collect();
        Self {
            primary,
            replicas: ArcSwap::from_pointee(replicas),
            next_id: AtomicUsize::new(cfg.replicas.len() + 1),
            follow_promotion: AtomicBool::new(cfg.routing.follow_promotion),
            rr: AtomicUsize::new(0),
            lsn_advanced: Notify::new(),
            global_token: AtomicU64::new(0),
            wal_page: AtomicU64::new(0),
            wal_segment: AtomicU64::new(0),
            global_unconfirmed: AtomicU64::new(0),
            fences: Mutex::new(lsn::Fences::new(PRIMARY_FENCES)),
            fence_sent_us: AtomicU64::new(0),
            fence_settle_us: AtomicU64::new(0),
            primary_history: Mutex::new(lsn::History::new(PRIMARY_HISTORY)),
            primary_ok_at_ms: AtomicU64::new(0),
            primary_down_at_ms: AtomicU64::new(0),
            started: Instant::now(),
            tls,
        }
    }

    /// The WAL page and segment sizes, once the monitor has read them.
    pub fn wal_geometry(&self) -> lsn::WalGeometry {
        lsn::WalGeometry {
            page: self.wal_page.load(Ordering::Relaxed),
            segment: self.wal_segment.load(Ordering::Relaxed),
        }
    }

    /// Records the WAL page and segment sizes a server reported (the same on every node of a
    /// physical replication cluster).
    pub fn set_wal_geometry(&self, wal: lsn::WalGeometry) {
        self.wal_page.store(wal.page, Ordering::Relaxed);
        self.wal_segment.store(wal.segment, Ordering::Relaxed);
    }

    /// Milliseconds since the cluster view was created (the clock of `lsn_read_at_ms`).
    pub fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `at` on the clock of [`Cluster::now_ms`].
    pub fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The primary's WAL position and a replica's progress against it.
    pub fn progress(&self, replica: &Node) -> lsn::Progress {
        let at = replica.replayed_at_us.load(Ordering::Acquire);
        lsn::Progress {
            primary: self.primary().lsn.load(Ordering::Acquire),
            replayed: replica.lsn.load(Ordering::Acquire),
            replayed_at_us: (at != 0).then_some(at),
        }
    }

    /// When the cluster view was created: a write acknowledged before may be unknown to it.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// `at` in µs since the cluster view was created (the clock of derived tokens); at least 1.
    pub fn us_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Records that a poll of the primary sent at `sent` (an instant taken before it was sent)
    /// found the position `lsn`: the insert position, or with `settle_us` > 0 the write
    /// position, which covers a commit only that long after it.
    pub fn record_fence(&self, sent: Instant, lsn: lsn::Lsn, settle_us: u64) {
        let sent_us = self.us_at(sent);
        self.fence_settle_us.store(settle_us, Ordering::Release);
        self.fences
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(sent_us, lsn);
        self.fence_sent_us.fetch_max(sent_us, Ordering::AcqRel);
    }

    /// The derived token of a write acknowledged at `acked` without a token of its own: the
    /// primary's position read by the first poll sent after it, which ran after the commit.
    /// None until such a poll has answered (only the primary surely has the write meanwhile).
    pub fn derived_token(&self, acked: Instant) -> Option<lsn::Lsn> {
        self.derived_token_us(self.us_at(acked))
    }

    /// [`Cluster::derived_token`] of a write acknowledged at `acked_us` ([`Cluster::us_at`]).
    pub fn derived_token_us(&self, acked_us: u64) -> Option<lsn::Lsn> {
        let after = acked_us.saturating_add(self.fence_settle_us.load(Ordering::Acquire));
        if self.fence_sent_us.load(Ordering::Acquire) <= after {
            return None;
        }
        let found = self
            .fences
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .first_after(after)?;
        Some(lsn::record_end(found, self.wal_geometry()))
    }

    /// Records a reading of the primary's WAL position, taken at `at_ms` (`now_ms` clock).
    pub fn record_primary(&self, at_ms: u64, lsn: lsn::Lsn) {
        self.history().record(at_ms, lsn);
    }

    /// A replica's lag in time, in ms: how long ago the primary was at the position the replica
    /// has replayed (see [`lsn::Progress::lag_ms`]). A short lock and a binary search, only for
    /// a replica with WAL left to replay.
    /// While the primary is down the lag is taken as it was when it went down: the replicas
    /// have nothing newer to replay, and reads keep running on them.
    pub fn lag_ms(&self, p: &lsn::Progress) -> u64 {
        if p.lag_bytes() == 0 {
            return 0;
        }
        let behind = self.history().behind(p.replayed);
        let mut now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let mut now_ms = self.now_ms();
        let down = self.primary_down_at_ms.load(Ordering::Acquire);
        if down != 0 && down < now_ms {
            let outage_us = i64::try_from((now_ms - down) * 1000).unwrap_or(i64::MAX);
            now_us = now_us.saturating_sub(outage_us);
            now_ms = down;
        }
        p.lag_ms(behind, now_ms, now_us)
    }

    /// The primary answered its health check as a primary.
    pub fn primary_answered(&self) {
        self.primary_ok_at_ms
            .store(self.now_ms(), Ordering::Release);
        self.primary_down_at_ms.store(0, Ordering::Release);
    }

    /// The primary's health check failed (it did not answer, or not as a primary).
    pub fn primary_failed(&self) {
        let now = self.now_ms();
        let _ =
            self.primary_down_at_ms
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether the primary answered as a primary after `at_ms` (`now_ms` clock).
    pub fn primary_answered_since(&self, at_ms: u64) -> bool {
        self.primary_ok_at_ms.load(Ordering::Acquire) >= at_ms
    }

    /// The history, whether or not a holder panicked: every update leaves it consistent.
    fn history(&self) -> std::sync::MutexGuard<'_, lsn::History> {
        self.primary_history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The primary.
    pub fn primary(&self) -> &Arc<Node> {
        &self.primary
    }

    /// The replicas, in configuration order, as of now.
    pub fn replicas(&self) -> arc_swap::Guard<Arc<Vec<Arc<Node>>>> {
        self.replicas.load()
    }

    /// The replicas as an owned list, for holding across waits.
    pub fn replicas_owned(&self) -> Arc<Vec<Arc<Node>>> {
        self.replicas.load_full()
    }

    /// The primary, then the replicas.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        let mut v = vec![Arc::clone(&self.primary)];
        v.extend(self.replicas.load().iter().cloned());
        v
    }

    /// A current node by its id.
    pub fn node(&self, id: usize) -> Option<Arc<Node>> {
        if id == 0 {
            return Some(Arc::clone(&self.primary));
        }
        self.replicas.load().iter().find(|n| n.id == id).cloned()
    }

    /// Makes a promoted replica the primary, if the primary is down and following promotions
    /// is on: the primary's endpoint moves to the replica's (connections to the old one are
    /// not reused) and the replica leaves the read set. True if it did.
    ///
    /// A replica the primary kept answering after it was seen promoted is never followed: it
    /// was not promoted because the primary failed, and following it would split the writes
    /// between two servers. Replicas that had replayed past the promoted one's last position
    /// hold WAL of the old timeline the new primary never had: they are kept out as
    /// [`DIVERGED`].
    pub fn follow(&self, promoted: &Arc<Node>) -> bool {
        let seen = promoted.promoted_seen_ms.load(Ordering::Acquire);
        if !self.follow_promotion.load(Ordering::Acquire)
            || self.primary.is_usable()
            || promoted.role != Role::Replica
            || seen == 0
            || self.primary_answered_since(seen)
        {
            return false;
        }
        let next: Vec<Arc<Node>> = self
            .replicas
            .load()
            .iter()
            .filter(|n| !Arc::ptr_eq(n, promoted))
            .cloned()
            .collect();
        let took_over_at = promoted.recovery_lsn.load(Ordering::Acquire);
        for n in &next {
            if n.lsn.load(Ordering::Acquire) > took_over_at {
                let started = n.started_at_us.load(Ordering::Acquire).max(1);
                n.diverged_start_us.store(started, Ordering::Release);
                n.ban(DIVERGED);
            }
        }
        promoted.retired.store(true, Ordering::Release);
        self.replicas.store(Arc::new(next));
        self.primary
            .endpoint
            .store(Arc::new((promoted.host(), promoted.port())));
        self.primary.generation.fetch_add(1, Ordering::AcqRel);
        // The new primary's WAL continues from its own replay position: no reading of the old
        // one places a replica on it.
        self.history().clear();
        self.fences
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        self.primary.lsn.store(0, Ordering::Release);
        self.primary.unban();
        true
    }

    /// Applies a new replica list: replicas are matched by name and address; a matched one
    /// keeps its state and takes the new weight, a new one is added (its monitor is for the
    /// caller to start), a missing one is retired. Returns (added, retired).
    pub fn set_replicas(&self, cfg: &Config) -> (Vec<Arc<Node>>, Vec<Arc<Node>>) {
        let old = self.replicas.load_full();
        let mut next = Vec::with_capacity(cfg.replicas.len());
        let mut added = Vec::new();
        for r in &cfg.replicas {
            let same = old
                .iter()
                .find(|n| n.name == r.name && n.host() == r.host && n.port() == r.port);
            match same {
                Some(n) => {
                    n.weight.store(r.weight, Ordering::Relaxed);
                    next.push(Arc::clone(n));
                }
                None => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let n = Arc::new(replica_node(id, r, cfg));
                    added.push(Arc::clone(&n));
                    next.push(n);
                }
            }
        }
        let retired: Vec<Arc<Node>> = old
            .iter()
            .filter(|o| !next.iter().any(|n| Arc::ptr_eq(n, o)))
            .cloned()
            .collect();
        for n in &retired {
            n.retired.store(true, Ordering::Release);
        }
        self.replicas.store(Arc::new(next));
        (added, retired)
    }
}

fn replica_node(id: usize, r: &crate::config::ReplicaConfig, cfg: &Config) -> Node {
    Node::new(id, &r.name, Role::Replica, &r.host, r.port, r.weight).with_slots(r.max_active, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ban_and_unban_track_reason() {
        let n = Node::new(1, "r", Role::Replica, "127.0.0.1", 1, 1);
        assert!(n.is_usable());
        n.ban("down");
        assert!(!n.is_usable());
        assert_eq!(n.ban_reason().as_deref(), Some("down"));
        n.unban();
        assert!(n.is_usable());
        assert_eq!(n.ban_reason(), None);
    }
}
