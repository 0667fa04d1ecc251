//! The timeouts a session watches: a client idle inside a transaction, and a request its
//! server is slow to answer (cancel it, then give the server up).

use std::time::Duration;

use tokio::time::Instant;

use super::Session;
use crate::error::{SessionError, sqlstate};
use crate::protocol::{self, Frame, TxStatus};

/// Timeouts a session watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// The client sat inside a transaction too long.
    IdleInTransaction,
    /// A request ran past `query_timeout_ms`: cancel it.
    Cancel,
    /// The cancel got no reaction either: drop the server.
    Abandon,
}

/// How long a server gets to react to a timeout's cancel before it is given up on.
fn cancel_grace(query_timeout_ms: u64) -> Duration {
    Duration::from_millis(query_timeout_ms.clamp(1_000, 5_000))
}

impl Session {
    /// The server's answer to a query timeout's cancel, told as the proxy's limit: the server
    /// can only call it a "user request", which would send the client looking for who
    /// cancelled. SQLSTATE 57014 and every other field stay as the server sent them.
    pub(super) fn name_query_timeout(&self, frame: Frame) -> Frame {
        if self.cancel_sent.is_none() {
            return frame;
        }
        match protocol::parse_error_fields(frame.body()) {
            Ok(f) if f.code == sqlstate::QUERY_CANCELED => {
                let limit = self.cfg.server.query_timeout_ms;
                let message =
                    format!("canceling statement due to server.query_timeout_ms ({limit} ms)");
                protocol::with_message(&frame, &message).unwrap_or(frame)
            }
            _ => frame,
        }
    }

    /// Stamps input handled inside a transaction, for the idle-in-transaction timeout; outside
    /// one nothing reads it, so autocommit traffic costs no clock read here.
    pub(super) fn note_activity(&mut self) {
        if self.status != TxStatus::Idle {
            self.last_activity = Instant::now();
        }
    }

    /// The next timeout to watch: a client idle inside a transaction, or a request its server
    /// is slow to answer.
    pub(super) fn next_timer(&self) -> Option<(Instant, Timer)> {
        let cfg = &self.cfg;
        if self.copy_in {
            return None;
        }
        if let Some(since) = self.busy_since {
            let limit = cfg.server.query_timeout_ms;
            if limit == 0 {
                return None;
            }
            return Some(match self.cancel_sent {
                None => (since + Duration::from_millis(limit), Timer::Cancel),
                Some(at) => (at + cancel_grace(limit), Timer::Abandon),
            });
        }
        let idle_limit = cfg.pool.idle_in_transaction_timeout_ms;
        if idle_limit > 0
            && self.status != TxStatus::Idle
            && self.lease.is_some()
            && self.replies.is_empty()
            && self.queue.is_empty()
        {
            return Some((
                self.last_activity + Duration::from_millis(idle_limit),
                Timer::IdleInTransaction,
            ));
        }
        None
    }

    /// Starts the query timeout afresh once the client has finished a COPY upload: the limit
    /// is for the server's work, and the upload ran at the client's pace with no timer.
    pub(super) fn restart_query_clock(&mut self) {
        if self.busy_since.is_some() {
            self.busy_since = Some(Instant::now());
            self.cancel_sent = None;
        }
    }

    pub(super) async fn on_timer(&mut self, kind: Timer) -> Result<(), SessionError> {
        match kind {
            Timer::IdleInTransaction => Err(SessionError::IdleInTransactionTimeout),
            Timer::Cancel => {
                // Ask the server to cancel, as a client would; a live server answers 57014.
                let target = self.cancel.take_for_cancel();
                if let Some(t) = target {
                    tracing::info!(
                        session.id = self.info.id,
                        client.addr = %self.info.addr,
                        server = %t.addr(),
                        "query timeout: cancelling the request"
                    );
                    tokio::spawn(crate::cancel::send_cancel(t));
                }
                self.cancel_sent = Some(Instant::now());
                Ok(())
            }
            Timer::Abandon => {
                // The server did not react to the cancel either: treat it as gone.
                self.busy_since = None;
                self.cancel_sent = None;
                let err = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer within server.query_timeout_ms, even to a cancel",
                );
                self.backend_failed(Some(err)).await
            }
        }
    }
}
