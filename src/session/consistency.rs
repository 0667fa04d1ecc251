//! The session's side of read-your-writes: what a read requires, waiting for a replica to
//! catch up, and the commit token taken after each write.

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use super::{Expect, Request, Session};
use crate::classify::{Access, Classification, TxEffect};
use crate::cluster::Node;
use crate::cluster::lsn::{self, Lsn};
use crate::config::{ConsistencyMode, ReplicaStrategy};
use crate::consistency::{Inputs, requirement};
use crate::error::SessionError;
use crate::protocol::{self, Frame, TxStatus, tag};
use crate::route::{self, Decision, Policy, Reason, ReplicaView, SessionView};

/// The query whose answer is the commit token: a WAL position at or past the end of the commit
/// record. The insert position, not the write position (`pg_current_wal_lsn`): with
/// asynchronous commit a COMMIT returns before its record is written, and a token at the write
/// position would let a replica that has replayed everything written so far serve a read that
/// misses the write.
const TOKEN_QUERY: &str = "SELECT pg_catalog.pg_current_wal_insert_lsn()";

/// The name the token query is prepared under on each backend connection.
const TOKEN_STATEMENT: &str = "causeway_token";

/// The token query on a connection where it is prepared: Bind, Execute, Sync. One round trip
/// with no parsing or planning on the server.
static TOKEN_EXECUTE: LazyLock<Vec<u8>> = LazyLock::new(|| {
    // Unnamed portal; no parameters; text results.
    let mut b = protocol::encode_bind("", TOKEN_STATEMENT, &[], &[], &[])
        .bytes
        .to_vec();
    b.extend_from_slice(&protocol::encode_execute("", 0).bytes);
    b.extend_from_slice(&protocol::encode_sync().bytes);
    b
});

/// The token query on a connection where it may not be prepared: Close (harmless when the
/// statement does not exist, and it clears one a client removed behind the proxy's back), Parse,
/// then [`TOKEN_EXECUTE`].
static TOKEN_PREPARE: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut b = Vec::new();
    b.extend_from_slice(&protocol::encode_close(b'S', TOKEN_STATEMENT).bytes);
    b.extend_from_slice(&protocol::encode_parse(TOKEN_STATEMENT, TOKEN_QUERY, &[]).bytes);
    b.extend_from_slice(&TOKEN_EXECUTE);
    b
});

/// The replicas as the router sees them.
type ReplicaViews = smallvec::SmallVec<[ReplicaView; 4]>;

/// Writes sent to the primary and the part of them a commit token covers. Writes are counted
/// in the order they are sent, so a token knows which ones it covers even when requests are
/// pipelined behind it.
#[derive(Debug, Default)]
pub(super) struct Unsealed {
    /// Writes sent so far.
    pub(super) sent: u64,
    /// Of those, how many a token (or, without tokens, the sticky clock) covers.
    sealed: u64,
    /// Key hints of the writes not yet covered.
    pub(super) keys: Vec<String>,
}

impl Unsealed {
    /// Some write is not covered yet.
    pub(super) fn pending(&self) -> bool {
        self.sent > self.sealed
    }

    /// The first `upto` writes are covered.
    pub(super) fn seal(&mut self, upto: u64) {
        self.sealed = self.sealed.max(upto);
        if !self.pending() {
            self.keys.clear();
        }
    }
}

impl Session {
    /// Routes a request outside a transaction; a read whose token no replica has replayed yet
    /// waits up to `consistency.causal_wait_ms`, woken by the monitor, before taking the primary.
    /// `now`: when the request arrived, the one clock reading its routing needs. `replicas`: the
    /// list a `Target::Replica` index will be looked up in.
    pub(super) async fn decide(
        &mut self,
        class: &Classification,
        now: Instant,
        replicas: &[Arc<Node>],
    ) -> Result<Decision, SessionError> {
        let shared = Arc::clone(&self.shared);
        let cluster = &shared.cluster;
        let policy = Policy {
            strategy: self.cfg.routing.replica_strategy,
            fallback: self.cfg.routing.fallback,
        };
        let session = self.read_view(class, now, replicas)?;
        let wait = Duration::from_millis(self.cfg.consistency.causal_wait_ms);
        let mut blocked_since: Option<Instant> = None;
        // Armed only once a read has to wait, so the common read takes no lock for it.
        let mut advanced = None;
        loop {
            let views = self.replica_views(replicas);
            // Only reads advance the rotation, so interleaved writes do not skew it.
            let pick = match policy.strategy {
                _ if class.access == Access::Write => 0,
                ReplicaStrategy::RoundRobin => cluster.rr.fetch_add(1, Ordering::Relaxed) as u64,
                // Random tie-breaks: a fixed rotation can line up with a client's own pattern
                // (prepare + execute) and pin it to one replica.
                _ => rand::random::<u64>(),
            };
            let decision = route::route(class, session, &views, policy, pick)
                .map_err(|_| SessionError::NoReplica)?;
            if decision.reason == Reason::ReadYourWrites {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                let left = wait.saturating_sub(since.elapsed());
                if !left.is_zero() && !replicas_far_behind(replicas, left) {
                    let Some(wake) = advanced.take() else {
                        // Registered, then checked again: an advance in between is not lost.
                        let mut wake = Box::pin(cluster.lsn_advanced.notified());
                        wake.as_mut().enable();
                        advanced = Some(wake);
                        continue;
                    };
                    // Read the replicas' positions now instead of at the next poll tick.
                    for n in replicas.iter().filter(|n| n.is_usable()) {
                        n.poll_now.notify_one();
                    }
                    // Watched like any wait: a cancel ends it (57014), and a client that
                    // leaves is noticed at once.
                    let timed = std::pin::pin!(tokio::time::timeout(left, wake));
                    if self.wait_watching(timed).await?.is_ok() {
                        continue;
                    }
                }
            }
            if let Some(since) = blocked_since {
                let stats = &shared.stats;
                stats.causal_waits.fetch_add(1, Ordering::Relaxed);
                stats
                    .causal_wait_us
                    .fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
                if decision.reason != Reason::ReadYourWrites {
                    stats.causal_wait_hits.fetch_add(1, Ordering::Relaxed);
                }
            }
            return Ok(decision);
        }
    }

    /// The router's view of each replica, lag limits applied. On the stack for up to four
    /// replicas: it is built for every request routed outside a transaction.
    fn replica_views(&self, replicas: &[Arc<Node>]) -> ReplicaViews {
        let cluster = &self.shared.cluster;
        let r = &self.cfg.routing;
        replicas
            .iter()
            .map(|n| {
                let p = cluster.progress(n);
                let lagging = (r.max_replica_lag_ms > 0
                    && p.lag_bytes() > 0
                    && cluster.lag_ms(&p) > r.max_replica_lag_ms)
                    || (r.max_replica_lag_bytes > 0 && p.lag_bytes() > r.max_replica_lag_bytes);
                ReplicaView {
                    usable: n.is_usable() && !n.drained.load(Ordering::Relaxed),
                    in_use: n.in_use.load(Ordering::Relaxed),
                    weight: n.weight.load(Ordering::Relaxed),
                    replayed: p.replayed,
                    lagging,
                }
            })
            .collect()
    }

    /// Folds the derived token of the session's last tokenless write into its own token once
    /// a poll sent after that write has answered. False while it has not.
    pub(super) fn resolve_own(&mut self) -> bool {
        let Some(at) = self.tokens.unresolved else {
            return true;
        };
        match self.shared.cluster.derived_token(at) {
            Some(token) => {
                self.tokens.own = self.tokens.own.max(token);
                self.tokens.unresolved = None;
                self.announce_token = true;
                true
            }
            None => false,
        }
    }

    /// What this session's next read requires.
    fn read_view(
        &mut self,
        class: &Classification,
        now: Instant,
        replicas: &[Arc<Node>],
    ) -> Result<SessionView, SessionError> {
        let tracked = self.cfg.consistency.mode != ConsistencyMode::None;
        let own_resolved = !tracked || self.resolve_own();
        let shared = &self.shared;
        let c = &self.cfg.consistency;
        let hinted = match &class.hints.min_lsn {
            Some(text) => {
                lsn::parse(text).map_err(|e| SessionError::InvalidParameter(e.to_string()))?
            }
            None => 0,
        };
        let cluster = &shared.cluster;
        let key = class.hints.key.as_deref().or(self.tokens.key.as_deref());
        let (mut key_token, mut key_unresolved) = (0, false);
        if let Some(k) = key {
            let t = shared.keys.get(k);
            key_token = t.lsn;
            if let Some(at) = t.unconfirmed {
                match cluster.derived_token(at) {
                    Some(l) => {
                        shared.keys.settle(k, at, l);
                        key_token = key_token.max(l);
                    }
                    None => key_unresolved = true,
                }
            }
        }
        let mut global_unresolved = false;
        if c.scope == crate::config::ConsistencyScope::Global {
            let at = cluster.global_unconfirmed.load(Ordering::Acquire);
            if at != 0 {
                match cluster.derived_token_us(at) {
                    Some(l) => {
                        cluster.global_token.fetch_max(l, Ordering::AcqRel);
                        // A later tokenless write keeps its own mark.
                        let _ = cluster.global_unconfirmed.compare_exchange(
                            at,
                            0,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    }
                    None => global_unresolved = true,
                }
            }
        }
        let req = requirement(Inputs {
            mode: c.mode,
            scope: c.scope,
            session: &self.tokens,
            key_token,
            key_unresolved,
            global_token: cluster.global_token.load(Ordering::Acquire),
            global_unresolved,
            hinted,
            lsn_fresh: self.lsn_fresh(now, replicas),
            sticky_window: Duration::from_millis(c.sticky_window_ms),
            now,
        });
        debug_assert!(own_resolved || req.primary || !tracked);
        Ok(SessionView {
            route_mode: self.route_mode,
            min_lsn: req.min_lsn,
            // A write no token covers yet (it is on its way): only the primary surely has it.
            sticky: req.primary || (self.unsealed.pending() && tracked),
            serializable: self.settings.needs_primary(class.session.as_ref()),
        })
    }

    /// Whether every usable replica's position was read recently.
    fn lsn_fresh(&self, now: Instant, replicas: &[Arc<Node>]) -> bool {
        let limit = (self.cfg.consistency.lsn_poll_ms * 10).max(200);
        let now = self.shared.cluster.ms_at(now);
        replicas
            .iter()
            .filter(|n| n.is_usable())
            .all(|n| now.saturating_sub(n.lsn_read_at_ms.load(Ordering::Acquire)) <= limit)
    }

    /// Notes what a request about to run on the current backend means for read-your-writes,
    /// and appends the token query to it when it ends the work that wrote.
    ///
    /// What counts is what the primary runs: a statement classed as a write, a request re-run
    /// there because a replica refused it as a write, and an Execute of a portal bound by an
    /// earlier request (its statement is not in this one). The token query is only appended
    /// when the request is expected to leave no transaction open; whether it did is the
    /// server's to say (the token's own ReadyForQuery), and writes no valid token covered are
    /// sealed at the next ReadyForQuery outside a transaction ([`Session::seal_at_ready`]).
    pub(super) fn track_writes(&mut self, class: &Classification, req: &Request) {
        if !self.on_primary() || !req.executes() {
            return;
        }
        // A replica refused the request as a write: it may well be one.
        let refused_as_write = req.force_primary == Some(Reason::ReadOnlyRetry);
        if class.access == Access::Write || refused_as_write || req.executes_earlier_portal() {
            self.unsealed.sent += 1;
            if let Some(k) = &class.hints.key
                && !self.unsealed.keys.contains(k)
            {
                self.unsealed.keys.push(k.clone());
            }
            if !self.tracks_tokens() {
                self.tokens.last_write = Some(Instant::now());
            }
        }
        if !self.unsealed.pending() || !self.tracks_tokens() {
            return;
        }
        // The client's view: with requests pipelined it may lag, which only costs a round trip.
        let in_tx = self.status != TxStatus::Idle;
        let leaves_tx_closed = match class.last_tx {
            TxEffect::Commit | TxEffect::Rollback => true,
            TxEffect::Begin { .. } => false,
            _ => !in_tx,
        };
        // After COPY FROM the server reads data, and a batch without Sync is not over: both
        // take their token at their ReadyForQuery.
        if leaves_tx_closed && !class.copy_from && req.ends_with_ready() {
            self.pending_token = Some(class.chain && class.last_tx == TxEffect::Commit);
        }
    }

    /// At a ReadyForQuery for the client: outside a transaction, writes still unsealed get
    /// their token now, before the client sees this ReadyForQuery (true: the caller holds it
    /// back and the token query has been queued). Without tokens (sticky mode) the window
    /// starts here, when the writes are committed.
    pub(super) fn seal_at_ready(&mut self, status: TxStatus) -> bool {
        if status != TxStatus::Idle
            || self
                .replies
                .iter()
                .any(|e| matches!(e, Expect::Token { .. }))
        {
            return false;
        }
        if !self.replies.is_empty() {
            // Pipelined requests follow: the last of them takes the token (or, without
            // tokens, starts the window and marks the time of the derived token), so writes
            // among them are covered from their own commit.
            return false;
        }
        self.seal()
    }

    /// Before the backend goes back to its pool: writes still unsealed (their ReadyForQuery
    /// came while the proxy still owed the client answers of its own) take their token now, on
    /// this connection (true: the token query is queued, keep the backend); without tokens the
    /// sticky window starts here.
    pub(super) fn seal_before_release(&mut self) -> bool {
        self.seal()
    }

    /// Seals the writes sent so far: queues the token query on the primary's backend (true),
    /// or, without tokens, starts the sticky window.
    fn seal(&mut self) -> bool {
        if !self.unsealed.pending() {
            return false;
        }
        if !self.tracks_tokens() {
            // Committed by now: the first poll of the primary sent from here on gives the
            // writes their position (a derived token), which reads honour once the window
            // closes, and in any mode switched to later.
            let now = Instant::now();
            self.tokens.last_write = Some(now);
            self.tokens.unresolved = Some(now);
            self.unsealed.seal(self.unsealed.sent);
            return false;
        }
        if !self.on_primary() {
            // Only the primary knows the position; its next ReadyForQuery takes the token.
            return false;
        }
        self.queue_token_query(false);
        true
    }

    /// The token query's ReadyForQuery. Run outside a transaction, its position is at or past
    /// every commit before it; run inside one (the request left a transaction open after all),
    /// it may precede the commit still to come, so it is dropped and the writes stay unsealed.
    pub(super) fn token_answered(
        &mut self,
        status: TxStatus,
        lsn: Lsn,
        keys: Vec<String>,
        covers: u64,
        after_chain: bool,
    ) {
        let chained = after_chain && status == TxStatus::InTransaction;
        if status != TxStatus::Idle && !chained {
            for k in keys {
                if !self.unsealed.keys.contains(&k) {
                    self.unsealed.keys.push(k);
                }
            }
            return;
        }
        self.unsealed.seal(covers);
        self.record_token(lsn, &keys);
    }

    /// Whether the backend held is the primary's.
    fn on_primary(&self) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|l| l.node().role == crate::cluster::Role::Primary)
    }

    /// Whether commit positions are needed (LSN modes, keyed or global tokens).
    fn tracks_tokens(&self) -> bool {
        let c = &self.cfg.consistency;
        matches!(c.mode, ConsistencyMode::Lsn | ConsistencyMode::LsnSticky)
            || self.tokens.key.is_some()
            || !self.unsealed.keys.is_empty()
            || c.scope == crate::config::ConsistencyScope::Global
    }

    /// Queues the token query behind the request, on the same backend and in the same write.
    /// It is prepared once per connection (named, so the client's unnamed statement survives).
    pub(super) fn queue_token_query(&mut self, after_chain: bool) {
        if let Some(lease) = self.lease.as_mut() {
            let conn = lease.conn();
            if conn.statements.token_prepared {
                conn.transport.queue_bytes(&TOKEN_EXECUTE);
            } else {
                conn.transport.queue_bytes(&TOKEN_PREPARE);
                conn.statements.token_prepared = true;
            }
            self.replies.push_back(Expect::Token {
                keys: std::mem::take(&mut self.unsealed.keys),
                covers: self.unsealed.sent,
                lsn: 0,
                after_chain,
            });
        }
    }

    /// Sends the write's held ReadyForQuery, preceded by its new token as the ParameterStatus
    /// `causeway_last_write_lsn`: a client reading the status once the write's reply is in
    /// finds that write's token, not the one before.
    pub(super) fn announce_before(&mut self, ready: &Frame) {
        if std::mem::take(&mut self.announce_token) {
            self.client.queue(&protocol::parameter_status(
                "causeway_last_write_lsn",
                &lsn::format(self.tokens.own),
            ));
        }
        self.client.queue(ready);
    }

    /// The token query failed on this connection: prepare it afresh next time.
    pub(super) fn token_failed(&mut self) {
        if let Some(lease) = self.lease.as_mut() {
            lease.conn().statements.token_prepared = false;
        }
    }

    /// Reads the token from the token query's DataRow.
    pub(super) fn token_row(&mut self, frame: &Frame) {
        if frame.tag != tag::BE_DATA_ROW {
            return;
        }
        let value = data_row_first_text(frame.body()).and_then(|t| lsn::parse(t).ok());
        if let (Some(Expect::Token { lsn, .. }), Some(v)) = (self.replies.front_mut(), value) {
            *lsn = v;
        }
    }

    /// Records a commit token: the session's, its key's, the proxy's; tells the client.
    /// Without a token (the query failed), the write gets a derived one ([`Session::token_lost`]).
    fn record_token(&mut self, token: Lsn, keys: &[String]) {
        let now = Instant::now();
        if token == 0 {
            self.token_lost(keys, now);
            return;
        }
        let token = crate::cluster::lsn::record_end(token, self.shared.cluster.wal_geometry());
        self.tokens.own = self.tokens.own.max(token);
        self.tokens.last_write = Some(now);
        for k in keys.iter().chain(self.tokens.key.as_ref()) {
            self.shared.keys.record(k, token, now);
        }
        self.shared
            .cluster
            .global_token
            .fetch_max(token, Ordering::AcqRel);
        self.shared.stats.tokens.fetch_add(1, Ordering::Relaxed);
        self.announce_token = true;
    }

    /// A write was acknowledged without its token (the token query failed, or the server went
    /// away right after the commit). It is given a derived token: the primary's position at the
    /// first monitor poll sent from now on, which ran after the commit. Until that poll
    /// answers, the session's reads, the reads under its key and, in global scope, every read
    /// keep to the primary, the one place sure to have the write; then they wait for (or route
    /// by) that position as by a real token. The primary's monitor is asked to poll now.
    pub(super) fn token_lost(&mut self, keys: &[String], now: Instant) {
        let cluster = &self.shared.cluster;
        self.tokens.unresolved = Some(now);
        self.tokens.last_write = Some(now);
        for k in keys.iter().chain(self.tokens.key.as_ref()) {
            self.shared.keys.record_unconfirmed(k, now);
        }
        cluster
            .global_unconfirmed
            .fetch_max(cluster.us_at(now), Ordering::AcqRel);
        cluster.primary().poll_now.notify_one();
    }
}

/// Whether every usable replica applies commits later than the time left to wait (as seen
/// by the monitor when it last advanced), so waiting would only delay a read that ends on
/// the primary anyway.
fn replicas_far_behind(replicas: &[Arc<Node>], left: Duration) -> bool {
    let left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
    let mut usable = replicas.iter().filter(|n| n.is_usable()).peekable();
    usable.peek().is_some() && usable.all(|n| n.apply_delay_ms.load(Ordering::Acquire) > left_ms)
}

/// The first column of a DataRow as text.
fn data_row_first_text(body: &[u8]) -> Option<&str> {
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    std::str::from_utf8(body.get(6..6 + len)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_column_of_a_data_row() {
        let mut body = 1i16.to_be_bytes().to_vec();
        body.extend_from_slice(&9i32.to_be_bytes());
        body.extend_from_slice(b"0/3000060");
        assert_eq!(data_row_first_text(&body), Some("0/3000060"));
        let mut null = 1i16.to_be_bytes().to_vec();
        null.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(data_row_first_text(&null), None);
        assert_eq!(data_row_first_text(&[0, 1, 0]), None);
    }
}
