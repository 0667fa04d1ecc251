//! Sending a request: classify it, route it, take a backend, and translate the client's
//! statement names into the names this backend knows.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::local::SessionAction;
use super::{Effect, Expect, InFlight, Request, Session, translate};
use crate::classify::{Access, Classification, Hints, ProxyCommand, SessionCommand, TxEffect};
use crate::cluster::lsn;
use crate::config::PoolMode;
use crate::error::{SessionError, sqlstate};
use crate::pool::Applied;
use crate::pool::queue::Class;
use crate::priority;
use crate::protocol::{self, TxStatus, tag};

/// Requests timed at once per session; a client pipelining more is timed for the first ones.
const MAX_TIMINGS: usize = 64;

/// Run on the server to abort its transaction when the proxy fails one of its statements.
const ABORT_STATEMENT: &str = "DO $causeway$ BEGIN RAISE EXCEPTION \
    'causeway: a statement of this transaction failed in the proxy; transaction aborted' \
    USING ERRCODE = 'P0001'; END $causeway$";

impl Session {
    /// Sends one request on the current backend, taking one first if the client has none.
    pub(super) async fn dispatch(&mut self, req: Request) -> Result<(), SessionError> {
        let started = tokio::time::Instant::now();
        if req.is_simple_query() {
            // As on a server, a simple Query ends the unnamed statement before anything else,
            // whether it then runs, fails or is answered here.
            self.unnamed = None;
        }
        if std::mem::take(&mut self.announce_token) {
            // Reported inside a reply stream, where every driver expects ParameterStatus.
            self.client.queue(&protocol::parameter_status(
                "causeway_last_write_lsn",
                &crate::cluster::lsn::format(self.tokens.own),
            ));
        }
        if self.lease.is_none() && self.deferred_tx.is_none() && req.is_housekeeping() {
            self.answer_housekeeping(&req);
            return Ok(());
        }
        let mut class = self.classify(&req);
        if let Some(cmd) = &class.proxy {
            if let Some(refused) = self.prepare_locally(&req) {
                self.abort_server_transaction().await?;
                self.fail_request_with(&req, &refused);
                return Ok(());
            }
            if !req.executes() {
                // Prepared or described only: nothing is set until an Execute runs it.
                let outcome = self.describe_proxy_command(cmd);
                self.answer_locally(&req, outcome);
                return Ok(());
            }
            if matches!(cmd, ProxyCommand::Show { name } if name == "last_write_lsn")
                && let Err(e) = self.settle_own_token().await
            {
                if e.is_client_gone() {
                    return Err(e);
                }
                self.fail_request(&req, &e);
                return Ok(());
            }
            let outcome = self.proxy_command(cmd);
            self.answer_locally(&req, outcome);
            return Ok(());
        }
        if self.lease.is_none() && self.status == TxStatus::Failed {
            // The transaction failed in the proxy before it reached a server.
            self.answer_aborted(&req, &class);
            return Ok(());
        }
        let mut effect = None;
        if class.session.is_some() && !req.executes() {
            // Only prepared (Parse, Describe): nothing changes until an Execute runs it.
            Arc::make_mut(&mut class).pin = None;
        } else if let Some(cmd) = class.session.clone() {
            match self.session_command(&req, &cmd) {
                (SessionAction::Answered, outcome) => {
                    if let Some(outcome) = outcome {
                        self.answer_locally(&req, outcome);
                    }
                    return Ok(());
                }
                (SessionAction::Forward(e), _) => {
                    effect = e;
                    // The proxy carries this state itself: no need to pin the session.
                    Arc::make_mut(&mut class).pin = None;
                }
            }
        }
        if self.lease.is_none()
            && (self.defer_begin(&req, &class) || self.defer_modes(&req, &class))
        {
            return Ok(());
        }
        if let Some(tx) = self.deferred_tx.take() {
            return self.dispatch_after_begin(tx, req, class, effect).await;
        }
        if self.status != TxStatus::Idle && (class.reason == "savepoint" || class.chain) {
            // Session changes in this transaction may be partly undone (ROLLBACK TO) or
            // committed early (AND CHAIN): what the backend keeps is no longer known.
            self.tx_uncertain = true;
        }
        if self.must_leave_lingering_replica(&class, &req) {
            // An extended batch ended with Flush holds a replica: close its implicit
            // transaction with a Sync of our own, then route this request afresh.
            if let Some(lease) = self.lease.as_mut() {
                lease.conn().transport.queue(&protocol::encode_sync());
                self.replies.push_back(Expect::Query {
                    forward: false,
                    effect: None,
                    in_batch: false,
                });
                if let Err(e) = lease.conn().transport.flush().await {
                    self.requeue_front(req);
                    return self.backend_failed(Some(e)).await;
                }
            }
            self.requeue_front(req);
            return Ok(());
        }
        if let Some(what) = self.needs_primary_on_replica(&class, &req) {
            self.abort_server_transaction().await?;
            self.fail_request(&req, &SessionError::NeedsPrimary(what));
            return Ok(());
        }
        let fresh = self.lease.is_none();
        if fresh
            && class.access == Access::Write
            && class.statements == 1
            && class.tx == TxEffect::None
            && self.status == TxStatus::Idle
        {
            // DROP DATABASE and the like: the pool's idle connections would make it fail.
            self.free_databases_for(&req);
        }
        let prio = priority_of(&class, &req, false);
        if fresh
            && let Err(e) = self
                .acquire_for(&class, req.force_primary, prio, started.into_std())
                .await
        {
            if e.is_client_gone() {
                return Err(e);
            }
            self.fail_request(&req, &e);
            return Ok(());
        }
        if fresh && !self.confirm_role_replay(&req).await? {
            return Ok(());
        }
        self.note_pin(class.pin);
        // Only replicas' failures are worth a second try: the primary is where a retry would
        // land anyway, and a query an operator terminated there should stay terminated.
        let on_replica = self
            .lease
            .as_ref()
            .is_some_and(|l| l.node().role == crate::cluster::Role::Replica);
        let rerunnable = fresh
            && req.attempt == 0
            && class.tx == TxEffect::None
            && self.status == TxStatus::Idle;
        let retryable = rerunnable
            && on_replica
            && req.force_primary.is_none()
            && class.access == Access::Read
            && class.pin.is_none()
            && !req.is_function_call();
        if !self.verify_shapes(&req).await? {
            return Ok(());
        }
        let in_tx = self.status != TxStatus::Idle;
        // Outside a transaction the statement's class is the one it queued with.
        let exec_class = if in_tx {
            priority_of(&class, &req, self.read_write_tx())
        } else {
            prio
        };
        // Ending a transaction never waits for a slot: the statements filling the slots may
        // be waiting for the very locks this COMMIT or ROLLBACK releases.
        let ends_tx = in_tx && matches!(class.tx, TxEffect::Commit | TxEffect::Rollback);
        if !ends_tx && !self.take_slot(exec_class, &req).await? {
            return Ok(());
        }
        self.track_writes(&class, &req);
        self.in_flight = rerunnable.then(|| InFlight {
            request: req.clone(),
            client_mark: self.client.pending_write(),
            retryable,
            rerunnable,
            server_replied: false,
            created: Vec::new(),
        });
        self.count_request(&req, &class, exec_class, started);
        self.send(&req, effect).await
    }

    /// A statement about to run leaves state on its connection that the proxy cannot carry to
    /// another (a temporary table, a session lock, LISTEN, an SQL-level PREPARE): in
    /// transaction pooling the session keeps that connection from now on; in either mode the
    /// connection goes with the client when it leaves, so no later client finds that state.
    pub(super) fn note_pin(&mut self, pin: Option<crate::classify::PinReason>) {
        match self.cfg.pool.mode {
            PoolMode::Transaction => self.pin_here(pin),
            // The client has the connection to itself already: nothing to count.
            PoolMode::Session => self.pinned |= pin.is_some(),
        }
    }

    /// `SHOW causeway.last_write_lsn` names a token at or past the session's last write, never
    /// an older one another connection would read stale with: the derived token of a write
    /// whose own token is missing (or of every write, in sticky mode) is waited for, the
    /// primary polled at once, as long as a statement may wait for a connection.
    async fn settle_own_token(&mut self) -> Result<(), SessionError> {
        let Some(acked) = self.tokens.unresolved else {
            return Ok(());
        };
        if self.resolve_own() {
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        shared.cluster.primary().poll_now.notify_one();
        // One wait, watched as a whole: a cancel can never fall between two checks.
        let known = async move {
            while shared.cluster.derived_token(acked).is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        let limit = std::time::Duration::from_millis(self.cfg.pool.acquire_timeout_ms);
        let wait = std::pin::pin!(tokio::time::timeout(limit, known));
        match self.wait_watching(wait).await? {
            Ok(()) if self.resolve_own() => Ok(()),
            _ => Err(SessionError::TokenPending),
        }
    }

    /// What in this request means something only on the primary although the session's
    /// transaction runs on a replica, which would accept it and keep it to itself: a lock
    /// (`LOCK`, advisory locks), which there excludes nobody writing on the primary, or session
    /// state, which would pin the session to the replica. Refused, as a server refuses a write
    /// in a read-only transaction, instead of run where it means nothing. Writes proper are
    /// left to the replica, which refuses them itself (and runs volatile functions that only
    /// read). Only what runs counts: a Parse alone changes nothing.
    fn needs_primary_on_replica(
        &self,
        class: &Classification,
        req: &Request,
    ) -> Option<&'static str> {
        let lease = self.lease.as_ref()?;
        let held = self.status == TxStatus::InTransaction
            && lease.node().role == crate::cluster::Role::Replica;
        let needs = class.pin.is_some() || crate::classify::takes_lock(class.reason);
        (held && needs && req.executes()).then_some(class.reason)
    }

    /// Whether the backend is held only by an unsynced extended batch on a replica while this
    /// request must run on the primary.
    fn must_leave_lingering_replica(&self, class: &Classification, req: &Request) -> bool {
        let Some(lease) = self.lease.as_ref() else {
            return false;
        };
        let needs_primary = class.access == Access::Write
            || class.tx.begins_on_primary()
            || class.pin.is_some()
            || class.hints.route == Some(crate::classify::RouteHint::Primary)
            || self.route_mode == crate::classify::RouteMode::Primary
            || req.force_primary.is_some();
        self.replies.is_empty()
            && !self.holds_backend()
            && lease.node().role == crate::cluster::Role::Replica
            && needs_primary
    }

    /// Whether the open transaction can write: not on a replica, where every transaction is
    /// read-only and its statements keep their own read classes.
    pub(super) fn read_write_tx(&self) -> bool {
        self.status != TxStatus::Idle
            && self
                .lease
                .as_ref()
                .is_none_or(|l| l.node().role != crate::cluster::Role::Replica)
    }

    /// A statement the proxy fails itself inside a transaction aborts it, as the server's own
    /// error would: otherwise the client's next statements would run, and its COMMIT commit
    /// the transaction without the failed one. A statement that raises an error runs on the
    /// server in its place (nothing of it is shown), so what follows gets 25P02, ROLLBACK TO
    /// SAVEPOINT recovers, and COMMIT rolls back.
    pub(super) async fn abort_server_transaction(&mut self) -> Result<(), SessionError> {
        if self.status == TxStatus::Idle {
            return Ok(());
        }
        self.status = TxStatus::Failed;
        self.in_flight = None;
        let Some(lease) = self.lease.as_mut() else {
            return Ok(());
        };
        let conn = lease.conn();
        conn.transport
            .queue(&protocol::encode_query(ABORT_STATEMENT));
        self.replies.push_back(Expect::Abort);
        if let Err(e) = conn.transport.flush().await {
            return self.backend_failed(Some(e)).await;
        }
        Ok(())
    }

    /// Answers a request of a transaction that failed in the proxy before any server saw it:
    /// as a server answers in a failed transaction, COMMIT and ROLLBACK end it (rolled back)
    /// and everything else is refused with 25P02.
    fn answer_aborted(&mut self, req: &Request, class: &Classification) {
        let ends = class.statements == 1
            && !class.chain
            && matches!(class.tx, TxEffect::Commit | TxEffect::Rollback);
        let outcome = if ends {
            self.status = TxStatus::Idle;
            Ok(("ROLLBACK", None))
        } else {
            Err((
                sqlstate::IN_FAILED_SQL_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block"
                    .to_string(),
            ))
        };
        self.answer_locally(req, outcome);
    }

    /// Counts a request against the node it is about to run on, and starts its latency clock
    /// if its ReadyForQuery will close it.
    pub(super) fn count_request(
        &mut self,
        req: &Request,
        class: &Classification,
        exec_class: Class,
        started: tokio::time::Instant,
    ) {
        let Some(lease) = self.lease.as_ref() else {
            return;
        };
        let node = lease.node();
        if self.busy_since.is_none() {
            self.busy_since = Some(tokio::time::Instant::now());
        }
        node.queries.fetch_add(1, Ordering::Relaxed);
        self.info.requests.fetch_add(1, Ordering::Relaxed);
        // BEGIN, COMMIT, SAVEPOINT and the like are neither: counted as reads, they made a
        // primary that serves only writes look as if reads fell back to it.
        let control = class.statements == 1
            && class.access == Access::Read
            && (class.tx != TxEffect::None || class.reason == "savepoint");
        if !control {
            let kind = if class.access == Access::Write {
                &node.writes
            } else {
                &node.reads
            };
            kind.fetch_add(1, Ordering::Relaxed);
        }
        if req.ends_with_ready() && self.timings.len() < MAX_TIMINGS {
            self.timings.push_back(super::Timing {
                started,
                node: Arc::clone(node),
                class: exec_class,
            });
        }
    }

    /// The combined classification of every statement the request runs; for a single statement
    /// the cached one itself, so the common request copies nothing.
    fn classify(&self, req: &Request) -> Arc<Classification> {
        if req.is_function_call() {
            return Arc::new(Classification {
                access: Access::Write,
                tx: TxEffect::None,
                last_tx: TxEffect::None,
                copy_from: false,
                by_value: false,
                chain: false,
                pin: Some(crate::classify::PinReason::FunctionCall),
                hints: Hints::default(),
                proxy: None,
                session: None,
                statements: 1,
                parse_error: false,
                reason: "function_call",
                text: crate::classify::TextTraits::default(),
            });
        }
        // One part per statement text and named statement executed: nearly always one or two.
        let mut parts: smallvec::SmallVec<[Arc<Classification>; 2]> = req
            .sql_texts()
            .map(|sql| self.classifier.classify(sql))
            .collect();
        // The unnamed statement is this request's own once it parses one (its text is among
        // the texts above); before that it is the one an earlier request left.
        let mut unnamed_parsed = false;
        for f in req.frames.iter() {
            let named = match f.tag {
                tag::FE_PARSE => {
                    // The name comes first: the unnamed statement's is empty.
                    unnamed_parsed |= f.body().first() == Some(&0);
                    None
                }
                tag::FE_BIND => protocol::parse_bind(f.body()).ok().map(|b| b.statement),
                tag::FE_DESCRIBE => protocol::parse_describe(f.body())
                    .ok()
                    .filter(|d| d.kind == b'S')
                    .map(|d| d.name),
                _ => None,
            };
            let key = match named {
                Some("") if !unnamed_parsed => self.unnamed.as_ref(),
                Some(name) if !name.is_empty() => self.statements.get(name).map(|s| &s.key),
                _ => None,
            };
            if let Some((sql, _)) = key.and_then(translate::split_key) {
                parts.push(self.classifier.classify(sql));
            }
        }
        match parts.as_slice() {
            [one] => Arc::clone(one),
            _ => Arc::new(combine(&parts)),
        }
    }

    /// Writes the request to the backend, renaming statements and recording expected replies.
    pub(super) async fn send(
        &mut self,
        req: &Request,
        effect: Option<Effect>,
    ) -> Result<(), SessionError> {
        let Some(lease) = self.lease.as_mut() else {
            return Ok(());
        };
        let conn = lease.conn();
        let mut names = translate::Names {
            statements: &mut self.statements,
            prepared_limit: self.cfg.server.max_prepared_bytes,
            unnamed: &mut self.unnamed,
            created: Vec::new(),
        };
        for frame in req.frames.iter() {
            translate::translate(frame, conn, &mut self.replies, &mut names)?;
        }
        if let Some(f) = self.in_flight.as_mut() {
            f.created = names.created;
        }
        for frame in &req.trailing {
            conn.transport.queue(frame);
        }
        let mut restore = None;
        if let Some(e) = effect {
            if matches!(e.cmd, SessionCommand::Deallocate { .. }) {
                // Prepared statements are not transactional: a DEALLOCATE takes effect even in
                // a transaction that later rolls back, so forget them now (the proxy's names
                // are never reused, so forgetting one that survives costs only a re-Parse).
                conn.statements.clear();
            } else {
                // From here until the proxy confirms the change, the backend's settings are
                // its own: statements prepared meanwhile are not shared.
                conn.set_applied(Applied::UNKNOWN);
            }
            if let Some(Expect::Sync { effect } | Expect::Query { effect, .. }) =
                self.replies.back_mut()
            {
                // A RESET there goes to the server's defaults; the client's startup values are
                // put back right behind it.
                restore = self.settings.restore_sql(&e.cmd);
                *effect = Some(Box::new(e));
            }
        }
        if let Some(after_chain) = self.pending_token.take() {
            self.queue_token_query(after_chain);
        }
        if let Some(sql) = restore {
            self.queue_settings(&sql, false);
        }
        let Some(lease) = self.lease.as_mut() else {
            return Ok(());
        };
        let conn = lease.conn();
        if let Err(e) = conn.transport.flush().await {
            return self.backend_failed(Some(e)).await;
        }
        self.emit_synthetic();
        Ok(())
    }
}

/// The request's priority class. Its text is read again only for a `LIMIT`'s count.
pub(super) fn priority_of(class: &Classification, req: &Request, in_transaction: bool) -> Class {
    let sql = if class.text.limit {
        req.sql_texts().next()
    } else {
        None
    };
    priority::class_of(class, sql, in_transaction)
}

/// Folds the classifications of a request's statements into one.
/// Folds a later statement's hints into a batch's: any statement asking for the primary sends
/// the batch there, a key or token any of them names still counts (the first key; the highest
/// token), the first statement's priority stands.
fn merge_hints(into: &mut Hints, later: &Hints) {
    use crate::classify::RouteHint;
    if later.route == Some(RouteHint::Primary) || into.route.is_none() {
        into.route = later.route.or(into.route);
    }
    if into.key.is_none() {
        into.key.clone_from(&later.key);
    }
    let lsn = |h: &Option<String>| h.as_deref().and_then(|t| lsn::parse(t).ok());
    if lsn(&later.min_lsn) > lsn(&into.min_lsn) {
        into.min_lsn.clone_from(&later.min_lsn);
    }
}

pub(super) fn combine(parts: &[Arc<Classification>]) -> Classification {
    let mut out = Classification {
        access: Access::Read,
        tx: TxEffect::None,
        last_tx: TxEffect::None,
        copy_from: false,
        by_value: false,
        chain: false,
        pin: None,
        hints: Hints::default(),
        proxy: None,
        session: None,
        statements: 0,
        parse_error: false,
        reason: "empty",
        text: crate::classify::TextTraits::default(),
    };
    for (i, c) in parts.iter().enumerate() {
        if i == 0 {
            out.reason = c.reason;
            out.text = c.text;
            out.hints = c.hints.clone();
            out.proxy = c.proxy.clone();
            out.session = c.session.clone();
        } else {
            out.proxy = (out.proxy.is_some() || c.proxy.is_some())
                .then_some(crate::classify::ProxyCommand::Misplaced);
            out.session = None;
            merge_hints(&mut out.hints, &c.hints);
        }
        if c.access == Access::Write && out.access == Access::Read {
            out.access = Access::Write;
            out.reason = c.reason;
        } else if c.access == Access::Write {
            out.reason = crate::classify::keep_reason(out.reason, c.reason);
        }
        if out.tx == TxEffect::None {
            out.tx = c.tx;
        }
        if c.last_tx != TxEffect::None {
            out.last_tx = c.last_tx;
        }
        out.copy_from |= c.copy_from;
        out.by_value |= c.by_value;
        out.chain |= c.chain;
        out.pin = out.pin.or(c.pin);
        out.statements += c.statements;
        out.parse_error |= c.parse_error;
    }
    if parts.len() > 1 && parts.iter().any(|c| c.tx.begins_on_primary()) {
        out.access = Access::Write;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{FunctionCatalog, RouteHint, classify};

    fn part(sql: &str) -> Arc<Classification> {
        Arc::new(classify(sql, &FunctionCatalog::builtin_only(&[], &[])))
    }

    #[test]
    fn a_batch_keeps_the_hints_of_its_later_statements() {
        let batch = combine(&[
            part("SELECT 1"),
            part("/* causeway:key=cart-7 */ INSERT INTO t VALUES (1)"),
            part("/* causeway:min_lsn=0/5000 */ SELECT 2"),
            part("/* causeway:min_lsn=0/4000 */ SELECT 3"),
        ]);
        assert_eq!(batch.hints.key.as_deref(), Some("cart-7"));
        assert_eq!(batch.hints.min_lsn.as_deref(), Some("0/5000"));
        assert_eq!(batch.access, Access::Write);

        let first_key = combine(&[
            part("/* causeway:key=a */ SELECT 1"),
            part("/* causeway:key=b */ SELECT 2"),
        ]);
        assert_eq!(first_key.hints.key.as_deref(), Some("a"));

        // Any statement asking for the primary sends the batch there.
        let primary = combine(&[
            part("/* causeway:replica */ SELECT 1"),
            part("/* causeway:primary */ SELECT 2"),
        ]);
        assert_eq!(primary.hints.route, Some(RouteHint::Primary));
        let replica = combine(&[part("/* causeway:replica */ SELECT 1"), part("SELECT 2")]);
        assert_eq!(replica.hints.route, Some(RouteHint::Replica));
    }
}
