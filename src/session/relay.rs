//! Backend -> client: frames are relayed as raw bytes; only the few the session must inspect
//! are decoded (ReadyForQuery, ErrorResponse, the Copy responses).

use std::sync::atomic::Ordering;

use super::{Effect, Expect, Session, SyncEnds, shape};
use crate::classify::SessionCommand;
use crate::config::PoolMode;
use crate::error::{BackendError, SessionError, sqlstate};
use crate::protocol::{self, TxStatus, tag};

impl Session {
    /// Handles every complete frame the backend has sent.
    pub(super) async fn on_backend_input(&mut self) -> Result<(), SessionError> {
        loop {
            self.emit_synthetic();
            let Some(lease) = self.lease.as_mut() else {
                return Ok(());
            };
            let mut frame = match lease.conn().transport.try_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    let err = std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
                    return self.backend_failed(Some(err)).await;
                }
            };
            if self.rerun.is_some() {
                // Swallow the failed attempt's output up to ReadyForQuery, then run it again.
                if frame.tag == tag::BE_READY_FOR_QUERY {
                    self.replies.clear();
                    if let Some(l) = self.lease.as_mut()
                        && let Ok(s) = protocol::parse_ready_for_query(frame.body())
                    {
                        l.conn().status = s;
                        l.conn().unsynced = false;
                    }
                    let req = self.rerun.take();
                    self.release_lease(false);
                    if let Some(req) = req {
                        self.requeue_front(req);
                    }
                    return Ok(());
                }
                continue;
            }
            if frame.tag == tag::BE_PARAMETER_STATUS {
                self.note_parameter(&frame);
            }
            tracing::trace!(tag = %(frame.tag as char), replies = ?self.replies.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>(), "backend frame");
            let forward = match frame.tag {
                tag::BE_READY_FOR_QUERY => {
                    let status = protocol::parse_ready_for_query(frame.body())
                        .map_err(|e| self.desync(e.to_string()))?;
                    let (forward, effect) = match self.replies.pop_front() {
                        Some(Expect::Query {
                            forward, effect, ..
                        }) => (forward, effect),
                        Some(Expect::Sync { effect }) => (true, effect),
                        Some(Expect::Settings { .. }) => {
                            if self.error_since_ready {
                                self.settings_failed();
                            }
                            (false, None)
                        }
                        Some(Expect::Token {
                            keys,
                            covers,
                            lsn,
                            after_chain,
                        }) => {
                            self.token_answered(status, lsn, keys, covers, after_chain);
                            if let Some(ready) = self.ready_after_token.take() {
                                self.announce_before(&ready);
                            }
                            (false, None)
                        }
                        Some(Expect::Abort) => (false, None),
                        _ => (true, None),
                    };
                    if let Some(l) = self.lease.as_mut() {
                        l.conn().status = status;
                        l.conn().unsynced = false;
                    }
                    self.settle_effects(status, effect);
                    self.copy_in = false;
                    // The server has had a Sync: nothing of a COPY waits for one.
                    self.copy_sync_owed = false;
                    if let Some(f) = self.in_flight.as_mut() {
                        f.server_replied = true;
                    }
                    if forward {
                        self.status = status;
                        if let Some(t) = self.timings.pop_front() {
                            t.node.latency[t.class as usize].record(t.started.elapsed());
                        }
                        for held in self.held.drain(..) {
                            self.client.queue(&held);
                        }
                        // A write is acknowledged only once its token is recorded: another
                        // session reading under the same key must find the token in place.
                        let token_next = matches!(self.replies.front(), Some(Expect::Token { .. }))
                            || self.seal_at_ready(status);
                        if token_next {
                            self.ready_after_token = Some(frame);
                        } else {
                            self.client.queue(&frame);
                        }
                    }
                    self.emit_synthetic();
                    if self.replies.is_empty() {
                        // The statement is over: its execution slot goes to the next waiter.
                        self.slot = None;
                        self.busy_since = None;
                        self.cancel_sent = None;
                    }
                    self.maybe_release();
                    continue;
                }
                tag::BE_ERROR_RESPONSE => {
                    self.copy_in = false;
                    self.error_since_ready = true;
                    let fields = protocol::parse_error_fields(frame.body()).ok();
                    let fatal = fields
                        .as_ref()
                        .is_some_and(|f| f.severity == "FATAL" || f.severity == "PANIC");
                    if fatal {
                        self.backend_closed_alone = fields
                            .as_ref()
                            .is_some_and(|f| closes_this_connection_alone(&f.code));
                        // The server is closing this connection (shutdown, crash, terminate):
                        // a read that has not answered yet is re-run elsewhere instead.
                        if self.in_flight.as_ref().is_some_and(|f| f.retryable) {
                            let err = std::io::Error::other("server sent FATAL");
                            return self.backend_failed(Some(err)).await;
                        }
                        self.backend_fatal_forwarded = true;
                    }
                    if let Some(req) = fields.as_ref().and_then(|f| self.rerun_after_error(f)) {
                        self.rerun = Some(req);
                        continue;
                    }
                    let refused = matches!(self.replies.front(), Some(Expect::Refused(_)));
                    if refused && let Some(Expect::Refused(mine)) = self.replies.pop_front() {
                        frame = mine;
                    }
                    frame = self.name_query_timeout(frame);
                    frame = self.name_client_statement(frame);
                    self.on_error_reply(refused)
                }
                // The token query's own acknowledgements.
                tag::BE_PARSE_COMPLETE | tag::BE_BIND_COMPLETE | tag::BE_CLOSE_COMPLETE
                    if matches!(self.replies.front(), Some(Expect::Token { .. })) =>
                {
                    false
                }
                tag::BE_PARSE_COMPLETE => match self.replies.pop_front() {
                    Some(Expect::Parse { forward, .. }) => forward,
                    Some(Expect::ParseUnnamed { .. }) => true,
                    _ => return Err(self.desync("unexpected ParseComplete".into())),
                },
                tag::BE_BIND_COMPLETE => {
                    self.pop_expected(|e| matches!(e, Expect::Bind));
                    true
                }
                tag::BE_CLOSE_COMPLETE => match self.replies.pop_front() {
                    Some(Expect::Close { forward }) => forward,
                    _ => return Err(self.desync("unexpected CloseComplete".into())),
                },
                tag::BE_ROW_DESCRIPTION | tag::BE_NO_DATA => {
                    if matches!(self.replies.front(), Some(Expect::Describe { .. }))
                        && let Some(Expect::Describe {
                            statement: Some((name, key)),
                        }) = self.replies.pop_front()
                    {
                        let described = shape::of(&frame);
                        if let Some(l) = self.lease.as_mut() {
                            l.conn().statements.set_shape(&key, described.clone());
                        }
                        if let Some(s) = self.statements.get_mut(&name) {
                            s.shape = Some(described);
                        }
                    }
                    self.forwarding_query()
                }
                tag::BE_COMMAND_COMPLETE
                | tag::BE_EMPTY_QUERY_RESPONSE
                | tag::BE_PORTAL_SUSPENDED => {
                    if !self.tx_effects.is_empty()
                        && frame.tag == tag::BE_COMMAND_COMPLETE
                        && protocol::parse_command_complete(frame.body())
                            .is_ok_and(|t| t == "COMMIT")
                    {
                        self.tx_committed = true;
                    }
                    self.pop_expected(|e| matches!(e, Expect::Execute));
                    self.forwarding_query()
                }
                tag::BE_COPY_IN_RESPONSE => {
                    self.copy_in = true;
                    // In an extended batch the Sync already sent is ignored during COPY; the
                    // client sends another after CopyDone. A batch ended with Flush has none:
                    // the server holds the COPY's result until the client's Sync or Flush.
                    if matches!(self.replies.front(), Some(Expect::Execute)) {
                        if let Some(pos) = self
                            .replies
                            .iter()
                            .position(|e| matches!(e, Expect::Sync { .. }))
                        {
                            self.replies.remove(pos);
                        }
                        self.copy_sync_owed = true;
                    }
                    true
                }
                tag::BE_NOTICE_RESPONSE | tag::BE_PARAMETER_STATUS
                    if self.in_flight.as_ref().is_some_and(|f| f.retryable) =>
                {
                    // A dying server says goodbye with a WARNING; holding such messages back
                    // keeps a read re-runnable until its first real reply.
                    self.held.push(frame);
                    continue;
                }
                // Notifications belong to the client whatever is in flight.
                tag::BE_NOTIFICATION_RESPONSE => true,
                // Startup values put back after a RESET: the client's driver keeps the reported
                // ones (application_name…) as its own.
                tag::BE_PARAMETER_STATUS
                    if matches!(
                        self.replies.front(),
                        Some(Expect::Settings { shown: false })
                    ) =>
                {
                    true
                }
                tag::BE_DATA_ROW if matches!(self.replies.front(), Some(Expect::Token { .. })) => {
                    self.token_row(&frame);
                    false
                }
                _ => self.forwarding_query(),
            };
            if forward {
                let preamble = matches!(
                    frame.tag,
                    tag::BE_PARSE_COMPLETE
                        | tag::BE_BIND_COMPLETE
                        | tag::BE_ROW_DESCRIPTION
                        | tag::BE_NO_DATA
                        | tag::BE_PARAMETER_DESCRIPTION
                );
                // Only when the server will go on by itself: after a Flush the client waits
                // for exactly these messages before it sends more.
                let more_coming = self
                    .in_flight
                    .as_ref()
                    .is_some_and(|f| f.retryable && f.request.ends_with_ready());
                if preamble && more_coming {
                    // A server killed mid-statement flushes these before it goes: until a
                    // row or a result arrives the read can still run elsewhere.
                    self.held.push(frame);
                    continue;
                }
                for held in self.held.drain(..) {
                    self.client.queue(&held);
                }
                self.client.queue(&frame);
                if let Some(f) = self.in_flight.as_mut() {
                    f.server_replied = true;
                }
            }
        }
        Ok(())
    }

    /// Follows what the server reports of `standard_conforming_strings` on the client's backend.
    /// However it went off (a SET the proxy pinned for already, `set_config` in a transaction,
    /// a function), the proxy's reading of the session's statements may now differ from the
    /// server's: the session keeps this backend, which closes with it, so nothing a misread
    /// statement left there reaches another client.
    fn note_parameter(&mut self, frame: &protocol::Frame) {
        let Ok((name, value)) = protocol::parse_parameter_status(frame.body()) else {
            return;
        };
        if name != "standard_conforming_strings" {
            return;
        }
        self.strings_off = !crate::classify::values::spells_true(value);
        if self.strings_off {
            self.pin_here(Some(crate::classify::PinReason::NonStandardStrings));
        }
    }

    /// Records session changes once the server confirmed them: at once outside a transaction,
    /// at COMMIT inside one; a failed statement or a rolled-back transaction changes nothing.
    fn settle_effects(&mut self, status: TxStatus, effect: Option<Box<Effect>>) {
        let failed = std::mem::take(&mut self.error_since_ready);
        if status == TxStatus::Idle {
            let uncertain = std::mem::take(&mut self.tx_uncertain);
            if !self.tx_effects.is_empty() {
                let effects = std::mem::take(&mut self.tx_effects);
                if std::mem::take(&mut self.tx_committed) {
                    for e in effects {
                        self.record_effect(e);
                    }
                }
                if uncertain && let Some(l) = self.lease.as_mut() {
                    // Reset before anyone uses it again, this client included.
                    l.conn().set_applied(crate::pool::Applied::UNKNOWN);
                }
            }
        }
        let Some(e) = effect else {
            return;
        };
        if failed {
            return;
        }
        match status {
            TxStatus::Idle => self.record_effect(*e),
            TxStatus::InTransaction => self.tx_effects.push(*e),
            TxStatus::Failed => {}
        }
    }

    /// Applies a confirmed session change to the client's state and to what its backend holds.
    fn record_effect(&mut self, e: Effect) {
        self.settings.apply(&e.cmd, &e.sql);
        let applied = self.settings.applied();
        let discard = matches!(e.cmd, SessionCommand::DiscardAll);
        if discard {
            // DISCARD ALL ran on the pinned backend: nothing session-bound is left on it.
            self.statements.clear();
            self.unnamed = None;
            self.pinned = false;
        }
        if let Some(l) = self.lease.as_mut() {
            let conn = l.conn();
            conn.set_applied(applied);
            if discard || matches!(e.cmd, SessionCommand::Deallocate { .. }) {
                conn.statements.clear();
            }
        }
    }

    /// Moves replies the proxy produces itself to the client once they reach the front.
    pub(super) fn emit_synthetic(&mut self) {
        loop {
            let reply = match self.replies.front() {
                Some(Expect::Synthetic(f)) => f.clone(),
                Some(Expect::ParseHeld { .. }) => protocol::parse_complete(),
                Some(Expect::CloseHeld { .. }) => protocol::close_complete(),
                _ => return,
            };
            // Behind replies held back while a read may still run elsewhere, in their order.
            if self.held.is_empty() {
                self.client.queue(&reply);
            } else {
                self.held.push(reply);
            }
            self.replies.pop_front();
        }
    }

    /// Pops the front entry if it matches (Describe/Execute replies inside a simple Query do not
    /// have their own entry).
    fn pop_expected(&mut self, is: impl Fn(&Expect) -> bool) {
        if self.replies.front().is_some_and(is) {
            self.replies.pop_front();
        }
    }

    /// Whether output belongs to the client (not to a query the proxy injected).
    fn forwarding_query(&self) -> bool {
        !matches!(
            self.replies.front(),
            Some(
                Expect::Query { forward: false, .. }
                    | Expect::Settings { .. }
                    | Expect::Token { .. }
                    | Expect::Abort
            )
        )
    }

    /// Returns the backend if the client is between transactions and nothing is in flight.
    pub(super) fn release_if_idle(&mut self) {
        self.maybe_release();
    }

    /// Returns the backend to its pool once the client is between transactions.
    fn maybe_release(&mut self) {
        if self.replies.is_empty()
            && !self.copy_in
            && self.status == TxStatus::Idle
            && !self.pinned
            && self.cfg.pool.mode == PoolMode::Transaction
        {
            if self.seal_before_release() {
                return;
            }
            self.release_lease(false);
        }
    }

    fn desync(&mut self, what: String) -> SessionError {
        if let Some(l) = self.lease.as_mut() {
            l.conn().broken = true;
        }
        let node = self
            .lease
            .as_ref()
            .map(|l| l.node().name.clone())
            .unwrap_or_default();
        SessionError::Backend(BackendError::Desync { node, what })
    }

    /// The backend connection failed. A read that had not reached the client is re-run
    /// elsewhere; otherwise the client is told, and a transaction in progress ends the session.
    pub(super) async fn backend_failed(
        &mut self,
        err: Option<std::io::Error>,
    ) -> Result<(), SessionError> {
        let Some(mut lease) = self.lease.take() else {
            return Ok(());
        };
        lease.conn().broken = true;
        let unsynced = lease.conn().unsynced;
        let fatal_forwarded = std::mem::take(&mut self.backend_fatal_forwarded);
        let closed_alone = std::mem::take(&mut self.backend_closed_alone);
        if let Some(ready) = self.ready_after_token.take() {
            // The write completed but its token is lost: acknowledge it.
            self.client.queue(&ready);
        }
        let mut token_owed = false;
        let mut keys = Vec::new();
        for e in &mut self.replies {
            if let Expect::Token { keys: k, .. } = e {
                token_owed = true;
                keys.append(k);
            }
        }
        if token_owed || self.unsealed.pending() {
            // Whether the writes not yet covered by a token committed is unknown: keep the
            // reads that must see them on the primary for the sticky window instead.
            keys.append(&mut self.unsealed.keys);
            self.unsealed.seal(self.unsealed.sent);
            self.token_lost(&keys, std::time::Instant::now());
        }
        let node = std::sync::Arc::clone(lease.node());
        node.errors.fetch_add(1, Ordering::Relaxed);
        let reason = err.map_or_else(
            || "server closed the connection".to_string(),
            |e| e.to_string(),
        );
        drop(lease);
        if node.role == crate::cluster::Role::Replica && !closed_alone {
            node.ban(format!("connection lost: {reason}"));
        }
        self.cancel.clear();
        let in_flight = self.in_flight.take();
        tracing::debug!(
            node = %node.name,
            in_flight = in_flight.is_some(),
            retryable = in_flight.as_ref().is_some_and(|f| f.retryable),
            attempt = in_flight.as_ref().map(|f| f.request.attempt),
            status = ?self.status,
            "backend failed"
        );
        if let Some(f) = in_flight
            && f.retryable
            && self.status == TxStatus::Idle
        {
            self.client.truncate_write(f.client_mark);
            self.held.clear();
            self.replies.clear();
            self.copy_in = false;
            self.rerun = None;
            self.shared
                .stats
                .retried_reads
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                session.id = self.info.id,
                client.addr = %self.info.addr,
                node = %node.name,
                %reason,
                "read re-run after backend failure"
            );
            self.forget_created(&f.created);
            let mut req = f.request;
            req.attempt += 1;
            self.requeue_front(req);
            return Ok(());
        }
        let msg = format!("connection to server {} lost: {reason}", node.name);
        let in_transaction = self.status != TxStatus::Idle || self.pinned;
        let pending_ready = self
            .replies
            .iter()
            .filter(|e| matches!(e, Expect::Sync { .. } | Expect::Query { forward: true, .. }))
            .count();
        // Extended messages after the last Sync (a batch ended by Flush): the client waits for
        // their replies, not for a ReadyForQuery.
        let unsynced_tail = match self.replies.back() {
            Some(
                Expect::Sync { .. }
                | Expect::Query { .. }
                | Expect::Settings { .. }
                | Expect::Token { .. },
            ) => false,
            Some(_) => true,
            None => unsynced,
        };
        self.replies.clear();
        self.copy_in = false;
        // The Sync a COPY owed the server is now the one the client's skip ends at.
        self.copy_sync_owed = false;
        self.rerun = None;
        if in_transaction {
            // The transaction is gone; carrying on would let a later COMMIT look successful.
            return Err(SessionError::Backend(BackendError::Lost {
                node: node.name.clone(),
                source: std::io::Error::other(reason).into(),
            }));
        }
        if pending_ready > 0 {
            // The server's own FATAL already told the client why; do not add a second error.
            if !fatal_forwarded {
                self.client.queue(&protocol::error_response(
                    "ERROR",
                    sqlstate::CONNECTION_FAILURE,
                    &msg,
                ));
            }
            for _ in 0..pending_ready {
                self.client
                    .queue(&protocol::ready_for_query(TxStatus::Idle));
            }
        }
        if unsynced_tail {
            // As after a server's own error: the client is told, and what it sends up to its
            // Sync is skipped.
            if pending_ready > 0 || !fatal_forwarded {
                self.client.queue(&protocol::error_response(
                    "ERROR",
                    sqlstate::CONNECTION_FAILURE,
                    &msg,
                ));
            }
            self.skip_to_sync(SyncEnds::Here);
        }
        Ok(())
    }
}

/// Whether a FATAL with this SQLSTATE ends one connection while its server goes on serving:
/// a standby ending a session that held back replay (40001, 40P01 for a deadlock with it, 57P04
/// for a database being dropped), or a session timeout (25P03 idle in transaction, 25P04
/// transaction, 57P05 idle session). Shutdown, crash and `pg_terminate_backend` (57P01 for
/// both shutdown and terminate) say nothing of the kind, so they still ban a replica until its
/// next health check.
fn closes_this_connection_alone(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "57P04" | "25P03" | "25P04" | "57P05"
    )
}
