//! Per-backend, per-(user, database) connection pools with RAII leases.

mod backend;
mod lease;
pub mod queue;
pub mod statements;

pub use backend::{Applied, BackendConn, Login, STATEMENT_CACHE_CAPACITY};
pub use lease::Lease;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, Node, Role};
use crate::config::Config;
use crate::error::{BackendError, PoolError};
use queue::{AcquireError, Class, PermitQueue, QueueConfig};

/// Idle time after which a pooled connection is probed before reuse.
const PROBE_AFTER_IDLE: Duration = Duration::from_millis(200);

/// Largest message accepted from a server.
const BACKEND_MAX_MESSAGE: usize = (1 << 30) + 64;

/// Limits a pool applies, copied from configuration.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Size when the pool is created; a reload resizes its queue (see [`Pool::resize`]).
    pub max: usize,
    pub min_idle: usize,
    /// Longest wait for a connection, per priority class.
    pub acquire_timeouts: [Duration; 5],
    pub priority: bool,
    pub aging: Duration,
    pub max_waiters: usize,
    /// Thousandths of connection time kept for read and analytic work under contention.
    pub background_share: u16,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    pub reset_timeout: Duration,
    pub max_message: usize,
    /// TLS towards the server.
    pub tls: Arc<crate::tls::Tls>,
}

/// Connections to one node for one (user, database).
pub struct Pool {
    /// `node/user/database`, used in messages and stats.
    pub name: String,
    pub node: Arc<Node>,
    login: Login,
    settings: PoolSettings,
    /// Boxed, so handing a connection between the idle list, a lease and a session moves a
    /// pointer rather than the whole connection state.
    #[expect(
        clippy::vec_box,
        reason = "the boxes leave the list: each checkout moves a pointer, not the connection"
    )]
    idle: Mutex<Vec<Box<BackendConn>>>,
    permits: Arc<PermitQueue>,
    /// Connections open (idle and leased).
    pub open: AtomicUsize,
    /// Acquisitions that timed out.
    pub timeouts: AtomicU64,
    server_params: Mutex<Option<Vec<(String, String)>>>,
    /// When the server last refused this login for reasons of the login alone (µs on the
    /// cluster's clock, see [`Cluster::us_at`]); 0 when it has not, or is expected to accept it
    /// again.
    refused_at_us: AtomicU64,
    /// What it said then.
    refusal: Mutex<String>,
    /// Emptied for a statement that needs the database to itself (`DROP DATABASE`): not
    /// refilled to `min_idle` until a client takes a connection again.
    emptied: AtomicBool,
}

impl Pool {
    fn new(node: Arc<Node>, login: Login, settings: PoolSettings) -> Self {
        Self {
            name: format!("{}/{}/{}", node.name, login.user, login.database),
            permits: Arc::new(PermitQueue::new(QueueConfig {
                permits: settings.max,
                priority: settings.priority,
                aging: settings.aging,
                max_waiters: settings.max_waiters,
                background_share: settings.background_share,
            })),
            node,
            login,
            settings,
            idle: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            timeouts: AtomicU64::new(0),
            server_params: Mutex::new(None),
            refused_at_us: AtomicU64::new(0),
            refusal: Mutex::new(String::new()),
            emptied: AtomicBool::new(false),
        }
    }

    /// Remembers that the server refused this login for reasons of the login alone (see
    /// [`BackendError::is_login_refusal`]), so reads stop trying it until it can know better.
    pub fn note_refusal(&self, cluster: &Cluster, why: &BackendError) {
        if let Ok(mut r) = self.refusal.lock() {
            *r = why.to_string();
        }
        self.refused_at_us
            .store(cluster.us_at(Instant::now()), Ordering::Release);
    }

    /// Why this replica is still expected to refuse this login: it has not yet replayed the
    /// position the primary had after the refusal, which is past the creation of any
    /// database, role or grant the primary knew of then. `None` once it has (the next
    /// attempt then tells), or when it never refused.
    pub fn refused(&self, cluster: &Cluster) -> Option<String> {
        let at = self.refused_at_us.load(Ordering::Acquire);
        if at == 0 {
            return None;
        }
        let replayed = self.node.lsn.load(Ordering::Acquire);
        if cluster
            .derived_token_us(at)
            .is_some_and(|past| replayed >= past)
        {
            let _ = self
                .refused_at_us
                .compare_exchange(at, 0, Ordering::AcqRel, Ordering::Relaxed);
            return None;
        }
        Some(self.refusal.lock().map(|r| r.clone()).unwrap_or_default())
    }

    /// Takes a connection, waiting in priority order at most the class's acquire timeout.
    pub async fn acquire(self: &Arc<Self>, class: Class) -> Result<Lease, PoolError> {
        let timeout = self.settings.acquire_timeouts[class as usize];
        let permit = match self.permits.acquire(class, timeout).await {
            Ok(p) => p,
            Err(AcquireError::Timeout) => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(PoolError::Timeout {
                    pool: self.name.clone(),
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            Err(AcquireError::Refused) => {
                return Err(PoolError::Refused {
                    pool: self.name.clone(),
                });
            }
            Err(AcquireError::Closed) => {
                return Err(PoolError::Closed {
                    pool: self.name.clone(),
                });
            }
        };
        self.emptied.store(false, Ordering::Relaxed);
        let conn = match self.take_idle() {
            Some(c) => c,
            None => self.connect().await?,
        };
        self.node.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            conn: Some(conn),
            pool: Arc::clone(self),
            permit: Some(permit),
            session_ended: false,
        })
    }

    async fn connect(&self) -> Result<Box<BackendConn>, PoolError> {
        let conn = BackendConn::connect(
            &self.node,
            &self.login,
            self.settings.connect_timeout,
            self.settings.max_message,
            &self.settings.tls,
        )
        .await?;
        self.open.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = self.server_params.lock()
            && p.is_none()
        {
            *p = Some(conn.params.clone());
        }
        Ok(Box::new(conn))
    }

    /// The newest usable idle connection; expired or dead ones are closed on the way.
    fn take_idle(&self) -> Option<Box<BackendConn>> {
        let now = Instant::now();
        loop {
            let conn = self.idle.lock().ok()?.pop()?;
            // A connection used moments ago is trusted without a probe (a system call); one
            // that sat idle is checked for a close or message the server sent meanwhile.
            let rested = reached(now, conn.last_used, PROBE_AFTER_IDLE);
            if self.expired(&conn, now) || (rested && conn.is_stale()) {
                self.open.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            return Some(conn);
        }
    }

    fn expired(&self, conn: &BackendConn, now: Instant) -> bool {
        conn.generation != self.node.generation.load(Ordering::Acquire)
            || reached(now, conn.created, self.settings.max_lifetime)
            || reached(now, conn.last_used, self.settings.idle_timeout)
    }

    /// Keeps a connection for reuse; false when it was closed instead.
    fn put_idle(&self, mut conn: Box<BackendConn>) -> bool {
        conn.last_used = Instant::now();
        // Past the size (the pool shrank on reload): close instead of keeping it.
        let oversize = self.open.load(Ordering::Relaxed) > self.permits.permits();
        if oversize || self.expired(&conn, conn.last_used) {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        match self.idle.lock() {
            Ok(mut idle) => {
                idle.push(conn);
                true
            }
            Err(_) => {
                self.open.fetch_sub(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Idle connections right now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    /// The login's user name.
    pub fn user(&self) -> &str {
        &self.login.user
    }

    /// The login's database.
    pub fn database(&self) -> &str {
        &self.login.database
    }

    /// Configured maximum size (changed by a reload).
    pub fn max(&self) -> usize {
        self.permits.permits()
    }

    /// Changes the pool's size: growing admits waiters at once, shrinking takes effect as
    /// leased connections come back (the extra ones are then closed).
    pub fn resize(&self, max: usize) {
        if max != self.permits.permits() {
            self.permits.set_permits(max);
        }
    }

    /// The waiter queue, for stats.
    pub fn queue(&self) -> &PermitQueue {
        &self.permits
    }

    /// ParameterStatus values of the server, learned from the first connection (opening one if
    /// needed), to greet clients the way the server would.
    pub async fn server_params(self: &Arc<Self>) -> Result<Vec<(String, String)>, PoolError> {
        if let Some(p) = self.server_params.lock().ok().and_then(|p| p.clone()) {
            return Ok(p);
        }
        let lease = self.acquire(Class::Read).await?;
        Ok(lease.conn_ref().params.clone())
    }

    /// Closes idle connections past their idle timeout or lifetime; opens up to `min_idle`.
    async fn maintain(self: &Arc<Self>) {
        let now = Instant::now();
        let expired: Vec<Box<BackendConn>> = match self.idle.lock() {
            Ok(mut idle) => {
                let (old, keep): (Vec<_>, Vec<_>) =
                    idle.drain(..).partition(|c| self.expired(c, now));
                *idle = keep;
                old
            }
            Err(_) => Vec::new(),
        };
        self.open.fetch_sub(expired.len(), Ordering::Relaxed);
        drop(expired);
        if self.emptied.load(Ordering::Relaxed) {
            return;
        }
        // A pool shrunk by a reload below the min_idle it started with keeps its new size.
        let target = self.settings.min_idle.min(self.permits.permits());
        while self.open.load(Ordering::Relaxed) < target && self.node.is_usable() {
            let Some(permit) = self.permits.try_acquire() else {
                break;
            };
            let kept = match self.connect().await {
                Ok(conn) => self.put_idle(conn),
                Err(_) => false,
            };
            drop(permit);
            if !kept {
                break;
            }
        }
    }
}

/// Whether `since + span` is past at `now` (a span too long for the clock never is). Two
/// comparisons, where `duration_since` would compute a whole difference.
fn reached(now: Instant, since: Instant, span: Duration) -> bool {
    since.checked_add(span).is_some_and(|at| now >= at)
}

/// A login as the pools know it: user and database joined by NUL, which neither can contain
/// (both arrive as C strings). Made once per client, so finding its pool allocates nothing.
pub fn login_key(user: &str, database: &str) -> Arc<str> {
    format!("{user}\0{database}").into()
}

/// All pools, created on first use for each (node, user, database). Looked up on every request,
/// so keys are hashed with foldhash (seeded per map) rather than SipHash: only clients that
/// logged in as a configured user ever add one.
pub struct Pools {
    map: DashMap<(usize, Arc<str>), Arc<Pool>, foldhash::fast::RandomState>,
    cfg: Arc<arc_swap::ArcSwap<Config>>,
    tls: Arc<crate::tls::Tls>,
}

impl Pools {
    /// An empty registry.
    pub fn new(cfg: Arc<arc_swap::ArcSwap<Config>>, tls: Arc<crate::tls::Tls>) -> Self {
        Self {
            map: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            cfg,
            tls,
        }
    }

    /// The pool for `node` and this login (see [`login_key`]), created if needed.
    /// `None` for a node that was retired: a pool made for it now would outlive it.
    pub fn get(&self, node: &Arc<Node>, login: &Arc<str>) -> Option<Arc<Pool>> {
        if node.retired.load(Ordering::Acquire) {
            return None;
        }
        let key = (node.id, Arc::clone(login));
        if let Some(p) = self.map.get(&key) {
            return Some(Arc::clone(p.value()));
        }
        let (user, database) = login.split_once('\0')?;
        let cfg = self.cfg.load();
        let password = cfg.user(user)?.password.clone();
        let p = &cfg.pool;
        let settings = PoolSettings {
            max: match node.role {
                Role::Primary => p.primary_max,
                Role::Replica => p.replica_max,
            },
            min_idle: p.min_idle,
            acquire_timeouts: cfg.class_timeouts(),
            priority: cfg.priority.enabled,
            aging: Duration::from_millis(cfg.priority.aging_ms),
            max_waiters: p.max_waiters,
            background_share: cfg.priority.background_share_permille(),
            connect_timeout: cfg.connect_timeout(),
            idle_timeout: Duration::from_millis(p.idle_timeout_ms),
            max_lifetime: Duration::from_millis(p.max_lifetime_ms),
            reset_timeout: Duration::from_millis(p.reset_timeout_ms),
            // Servers may legitimately send rows up to PostgreSQL's 1 GiB field limit.
            max_message: cfg.server.max_message_bytes.max(BACKEND_MAX_MESSAGE),
            tls: Arc::clone(&self.tls),
        };
        let creds = Login {
            user: user.to_string(),
            password,
            database: database.to_string(),
        };
        let pool = Arc::clone(
            self.map
                .entry(key)
                .or_insert_with(|| Arc::new(Pool::new(Arc::clone(node), creds, settings)))
                .value(),
        );
        if node.retired.load(Ordering::Acquire) {
            // Retired while the pool was being made (the flag is set before its pools are
            // closed): close this one too.
            self.retire_node(node.id);
            return None;
        }
        Some(pool)
    }

    /// Closes and forgets the pools of a node that left the configuration: waiters are told,
    /// idle connections closed; leased ones end with their clients' transactions.
    pub fn retire_node(&self, node_id: usize) {
        let gone: Vec<Arc<Pool>> = self
            .map
            .iter()
            .filter(|e| e.key().0 == node_id)
            .map(|e| Arc::clone(e.value()))
            .collect();
        self.map.retain(|k, _| k.0 != node_id);
        for pool in gone {
            pool.permits.close();
            if let Ok(mut idle) = pool.idle.lock() {
                let n = idle.len();
                idle.clear();
                pool.open.fetch_sub(n, Ordering::Relaxed);
            }
        }
    }

    /// Closes the idle connections to `database` on every server, for a statement that needs
    /// no other session connected to it (`DROP DATABASE`, say): to the server they are
    /// sessions like any other. Leased connections, which clients are using, are left alone.
    /// Returns how many were closed.
    pub fn close_idle_of(&self, database: &str) -> usize {
        let pools: Vec<Arc<Pool>> = self
            .map
            .iter()
            .filter(|e| e.value().database() == database)
            .map(|e| Arc::clone(e.value()))
            .collect();
        let mut closed = 0;
        for pool in pools {
            pool.emptied.store(true, Ordering::Relaxed);
            let idle = match pool.idle.lock() {
                Ok(mut idle) => std::mem::take(&mut *idle),
                Err(_) => continue,
            };
            pool.open.fetch_sub(idle.len(), Ordering::Relaxed);
            closed += idle.len();
            // Dropped here: each server sees its socket close and ends that session.
            drop(idle);
        }
        closed
    }

    /// Every pool, for stats.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.map.iter().map(|e| Arc::clone(e.value())).collect()
    }

    /// Runs pool maintenance every second until `stop` is cancelled.
    pub fn spawn_maintenance(self: &Arc<Self>, stop: CancellationToken) {
        let pools = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        for pool in pools.all() {
                            if pool.node.retired.load(Ordering::Acquire) {
                                // A promoted replica followed as the primary leaves its
                                // replica pools behind: they go here.
                                pools.retire_node(pool.node.id);
                                continue;
                            }
                            pool.maintain().await;
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_is_reached_at_its_end_and_one_past_the_clock_never() {
        let t0 = Instant::now();
        let span = Duration::from_millis(200);
        assert!(!reached(t0, t0, span));
        assert!(!reached(t0 + span - Duration::from_nanos(1), t0, span));
        assert!(reached(t0 + span, t0, span));
        assert!(reached(t0 + span * 2, t0, span));
        assert!(!reached(t0 + span, t0, Duration::MAX));
    }
}
