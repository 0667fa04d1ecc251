//! Requests run again after an error the client never saw: a read a replica refused goes to
//! the primary, a statement whose shared plan went stale after DDL is prepared afresh.

use super::{Expect, Request, Session};
use crate::error::sqlstate;
use crate::protocol;

impl Session {
    /// Forgets the statement names a request about to run again created on its first run.
    pub(super) fn forget_created(&mut self, names: &[String]) {
        for n in names {
            self.statements.remove(n);
        }
    }

    /// Errors a request recovers from by running again, before the client saw anything: a
    /// replica refusing a write (25006) or an unlogged relation (0A000) goes to the primary; a
    /// shared prepared statement whose plan went stale after DDL is prepared afresh on a new
    /// connection.
    pub(super) fn rerun_after_error(&mut self, body: &[u8]) -> Option<Request> {
        if matches!(self.replies.front(), Some(Expect::Settings { .. })) {
            // The proxy's own statements failed, not the request.
            return None;
        }
        let f = self.in_flight.as_ref()?;
        let fields = protocol::parse_error_fields(body).ok()?;
        let from_replica = self
            .lease
            .as_ref()
            .is_some_and(|l| l.node().role == crate::cluster::Role::Replica);
        let mut req =
            // Only a request that ends with a Sync or Query can be re-run: the failed attempt's
            // output is skipped up to its ReadyForQuery, which a batch ended by Flush never gets.
            if (fields.code == sqlstate::READ_ONLY_TRANSACTION || refused_in_recovery(&fields))
                && from_replica
                && f.retryable
                && f.request.ends_with_ready()
            {
                let mut req = f.request.clone();
                req.force_primary = true;
                req
            } else if fields.code == sqlstate::FEATURE_NOT_SUPPORTED
                && fields
                    .message
                    .contains("cached plan must not change result type")
                && f.rerunnable
            {
                let req = f.request.clone();
                if let Some(l) = self.lease.as_mut() {
                    l.conn().broken = true;
                    if !req.ends_with_ready() {
                        // A batch ended by Flush (asyncpg prepares so) brings no ReadyForQuery:
                        // a Sync of the proxy's own ends the failed attempt's implicit
                        // transaction, and its ReadyForQuery closes the attempt.
                        l.conn().transport.queue(&protocol::encode_sync());
                    }
                }
                req
            } else {
                return None;
            };
        req.attempt += 1;
        let f = self.in_flight.take()?;
        self.forget_created(&f.created);
        self.client.truncate_write(f.client_mark);
        self.held.clear();
        Some(req)
    }
}

/// A standby's refusal of a relation it cannot read while in recovery (an unlogged one); the
/// primary reads it. The message is matched as the server sends it in English.
fn refused_in_recovery(fields: &protocol::ErrorFields) -> bool {
    fields.code == sqlstate::FEATURE_NOT_SUPPORTED
        && fields.message == "cannot access temporary or unlogged relations during recovery"
}
