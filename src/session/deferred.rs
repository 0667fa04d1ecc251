//! Transactions opened by a lone `BEGIN`: acknowledged at once, held with the `SET
//! TRANSACTION`s after it, and sent with the first statement, which chooses the server together
//! with the modes named.

use std::sync::Arc;

use super::dispatch::priority_of;
use super::{Effect, Expect, Request, Session};
use crate::classify::{Classification, Hints, TxEffect, TxModes};
use crate::error::SessionError;
use crate::protocol::{self, TxStatus};

impl Session {
    /// A lone `BEGIN` (with its modes, if any) is answered at once and sent later with the
    /// first statement of the transaction, so the modes named until then and that statement
    /// choose the server together (`BEGIN; SET TRANSACTION READ ONLY` can still go to a
    /// replica, a `BEGIN READ ONLY` whose first statement takes a lock goes to the primary),
    /// and an empty transaction costs no backend.
    pub(super) fn defer_begin(&mut self, req: &Request, class: &Classification) -> bool {
        let TxEffect::Begin {
            read_only,
            serializable,
        } = class.tx
        else {
            return false;
        };
        if !lone(req, class) || self.deferred_tx.is_some() {
            return false;
        }
        self.deferred_tx = Some(DeferredTx {
            requests: vec![req.clone()],
            read_only,
            serializable,
        });
        self.status = TxStatus::InTransaction;
        self.client.queue(&protocol::command_complete("BEGIN"));
        self.client.queue(&protocol::ready_for_query(self.status));
        true
    }

    /// A lone `SET TRANSACTION …` after a deferred BEGIN joins it: its modes count when the
    /// transaction is routed. Only the `SET TRANSACTION` form, whose values the grammar checks,
    /// so the server cannot refuse it once the transaction reaches the server its modes choose.
    pub(super) fn defer_modes(&mut self, req: &Request, class: &Classification) -> bool {
        let (Some(tx), TxEffect::SetModes(modes)) = (self.deferred_tx.as_mut(), class.tx) else {
            return false;
        };
        if !modes.checked || !lone(req, class) {
            return false;
        }
        tx.apply(modes);
        tx.requests.push(req.clone());
        self.client.queue(&protocol::command_complete("SET"));
        self.client.queue(&protocol::ready_for_query(self.status));
        true
    }

    /// The first request after a deferred BEGIN: route the whole transaction by it and by the
    /// modes named so far.
    pub(super) async fn dispatch_after_begin(
        &mut self,
        mut tx: DeferredTx,
        req: Request,
        class: Arc<Classification>,
        effect: Option<Effect>,
    ) -> Result<(), SessionError> {
        let ends = match class.tx {
            TxEffect::Commit => Some("COMMIT"),
            TxEffect::Rollback => Some("ROLLBACK"),
            _ => None,
        };
        // COMMIT AND CHAIN opens the next transaction like the deferred BEGIN's: sent on.
        if let Some(done) = ends
            && req.is_simple_query()
            && class.statements == 1
            && !class.chain
        {
            self.status = TxStatus::Idle;
            self.client.queue(&protocol::command_complete(done));
            self.client.queue(&protocol::ready_for_query(self.status));
            return Ok(());
        }
        let mut routing = Classification::clone(&class);
        let class_for_token = class;
        if let TxEffect::SetModes(modes) = routing.tx {
            tx.apply(modes);
        }
        // A standby refuses SERIALIZABLE, and READ WRITE, so only READ ONLY without it may go
        // to a replica.
        routing.tx = TxEffect::Begin {
            read_only: tx.read_only && !tx.serializable,
            serializable: tx.serializable,
        };
        routing.proxy = None;
        let started = tokio::time::Instant::now();
        let prio = priority_of(&routing, &req, false);
        if let Err(e) = self
            .acquire_for(&routing, None, prio, started.into_std())
            .await
        {
            if e.is_client_gone() {
                return Err(e);
            }
            self.status = TxStatus::Failed;
            self.fail_request(&req, &e);
            return Ok(());
        }
        // A refused replay fails the transaction before it reached the server.
        self.status = TxStatus::Failed;
        if !self.confirm_role_replay(&req).await? {
            self.release_lease(false);
            return Ok(());
        }
        self.status = TxStatus::InTransaction;
        // The transaction's first statement may pin (a temporary table, a search_path listing
        // pg_temp) as it would outside a deferred BEGIN.
        self.note_pin(routing.pin);
        if let Some(lease) = self.lease.as_mut() {
            let conn = lease.conn();
            for r in &tx.requests {
                for f in r.frames.iter() {
                    conn.transport.queue(f);
                }
                self.replies.push_back(Expect::Query {
                    forward: false,
                    effect: None,
                    in_batch: false,
                });
            }
            conn.statements.unnamed = None;
        }
        self.in_flight = None;
        let exec_class = priority_of(&class_for_token, &req, self.read_write_tx());
        if !self.take_slot(exec_class, &req).await? {
            return Ok(());
        }
        self.track_writes(&class_for_token, &req);
        self.count_request(&req, &class_for_token, exec_class, started);
        self.send(&req, effect).await
    }
}

/// A transaction the client opened with a lone `BEGIN`, acknowledged but not yet sent: it goes
/// out with its first statement, to the server that statement and the modes named choose.
pub(super) struct DeferredTx {
    /// The `BEGIN`, then the `SET TRANSACTION`s after it, as the client sent them.
    requests: Vec<Request>,
    /// READ ONLY, as last named.
    read_only: bool,
    /// SERIALIZABLE, as last named.
    serializable: bool,
}

impl DeferredTx {
    fn apply(&mut self, modes: TxModes) {
        if let Some(read_only) = modes.read_only {
            self.read_only = read_only;
        }
        if let Some(serializable) = modes.serializable {
            self.serializable = serializable;
        }
    }
}

/// One statement alone in a simple Query, with no hints: what may be answered and held back.
fn lone(req: &Request, class: &Classification) -> bool {
    req.is_simple_query()
        && class.statements == 1
        && class.pin.is_none()
        && class.hints == Hints::default()
}
