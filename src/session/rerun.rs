//! Requests run again after an error the client never saw: a read a replica refused goes to
//! the primary, a statement whose shared plan went stale after DDL is prepared afresh, a
//! `DROP DATABASE` that met the proxy's own idle connections runs once they are closed.

use super::{Expect, Request, Session};
use crate::error::sqlstate;
use crate::protocol;
use crate::route::Reason;

impl Session {
    /// Closes the pooled idle connections to the databases `req` needs no other session
    /// connected to (`DROP DATABASE x`, `CREATE DATABASE y TEMPLATE x`, `ALTER DATABASE x
    /// RENAME`) once no client of the proxy is connected to them, as a server would then have
    /// no session there. While one is, nothing is closed, so the statement fails as it would
    /// on the server. Returns how many were closed.
    pub(super) fn free_databases_for(&self, req: &Request) -> usize {
        let mut texts = req.sql_texts();
        let (Some(sql), None) = (texts.next(), texts.next()) else {
            return 0;
        };
        let own = self.login.split_once('\0').map_or("", |(_, db)| db);
        let mut closed = 0;
        for db in crate::classify::exclusive_databases(sql) {
            // The server refuses to drop the session's own database whatever the pools hold.
            if db == own {
                continue;
            }
            if self.shared.clients.list().iter().any(|c| c.database == db) {
                continue;
            }
            let n = self.shared.pools.close_idle_of(&db);
            if n > 0 {
                tracing::debug!(database = %db, closed = n, "idle pooled connections closed for a statement that needs the database to itself");
            }
            closed += n;
        }
        closed
    }

    /// Forgets the statement names a request about to run again created on its first run.
    pub(super) fn forget_created(&mut self, names: &[String]) {
        for n in names {
            self.statements.remove(n);
        }
    }

    /// Errors a request recovers from by running again, before the client saw anything: a
    /// replica refusing a write (25006) or an unlogged relation (0A000), or cancelling a read
    /// for a conflict with recovery (40001, 40P01), sends it to the primary; a
    /// shared prepared statement whose plan went stale after DDL is prepared afresh on a new
    /// connection.
    pub(super) fn rerun_after_error(&mut self, fields: &protocol::ErrorFields) -> Option<Request> {
        if matches!(self.replies.front(), Some(Expect::Settings { .. })) {
            // The proxy's own statements failed, not the request.
            return None;
        }
        let f = self.in_flight.as_ref()?;
        let from_replica = self
            .lease
            .as_ref()
            .is_some_and(|l| l.node().role == crate::cluster::Role::Replica);
        let mut req =
            // Only a request that ends with a Sync or Query can be re-run: the failed attempt's
            // output is skipped up to its ReadyForQuery, which a batch ended by Flush never gets.
            if let Some(reason) = replica_refusal(fields)
                && from_replica
                && f.retryable
                && f.request.ends_with_ready()
                // A read the replica could have served falls back to the primary only where
                // reads may; one it refused as a write belongs there anyway.
                && (reason != Reason::RecoveryConflict
                    || self.cfg.routing.fallback == crate::config::Fallback::Primary)
            {
                let mut req = f.request.clone();
                req.force_primary = Some(reason);
                req
            } else if fields.code == sqlstate::OBJECT_IN_USE
                && !from_replica
                && f.rerunnable
                && f.request.ends_with_ready()
                && self.free_databases_for(&f.request) > 0
            {
                // Idle connections went back to the pool between the ones closed before the
                // statement and its run: closed now, the statement runs again, once.
                f.request.clone()
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

/// Why a replica's error sends a read (outside a transaction, nothing shown yet) to the
/// primary, if it does.
///
/// A standby cancels a query whose snapshot or locks stand in the way of replaying the
/// primary's WAL (vacuum cleanup, an `ACCESS EXCLUSIVE` lock, a buffer pin) once
/// `max_standby_streaming_delay` is up, with 40001, or 40P01 for a deadlock with the startup
/// process. A standby has no other source of either for a read outside a transaction: it
/// refuses serializable isolation, and a read takes no lock another session's read could
/// deadlock with. The primary has no such conflicts and has all the data the replica had.
fn replica_refusal(fields: &protocol::ErrorFields) -> Option<Reason> {
    if fields.code == sqlstate::READ_ONLY_TRANSACTION || refused_in_recovery(fields) {
        Some(Reason::ReadOnlyRetry)
    } else if fields.code == sqlstate::SERIALIZATION_FAILURE
        || fields.code == sqlstate::DEADLOCK_DETECTED
    {
        Some(Reason::RecoveryConflict)
    } else {
        None
    }
}

/// A standby's refusal of a relation it cannot read while in recovery (an unlogged one); the
/// primary reads it. The message is matched as the server sends it in English.
fn refused_in_recovery(fields: &protocol::ErrorFields) -> bool {
    fields.code == sqlstate::FEATURE_NOT_SUPPORTED
        && fields.message == "cannot access temporary or unlogged relations during recovery"
}
