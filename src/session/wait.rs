//! Waiting for a server connection or an execution slot while the client may go away, cancel,
//! or send more.

use std::sync::Arc;

use super::{Expect, MAX_QUEUED_BYTES, Session};
use crate::error::SessionError;
use crate::pool::Applied;
use crate::protocol::tag;

impl Session {
    /// Runs `wait` (for a connection or an execution slot) while watching the client. A cancel
    /// ends it with [`SessionError::QueryCanceled`]; a client that goes away ends it at once
    /// with an error for which `is_client_gone` holds, and dropping the wait takes the request
    /// out of its queue. What the client sends meanwhile is kept unframed, up to the bound on
    /// queued input, for the session's loop to read once the wait is over.
    pub(super) async fn wait_watching<F: Future>(
        &mut self,
        wait: F,
    ) -> Result<F::Output, SessionError> {
        let cancel = Arc::clone(&self.cancel);
        let wait = cancel.unless_cancelled(wait);
        tokio::pin!(wait);
        // After Terminate nothing more is read and what came before it runs, as on a server,
        // even once the client has closed its end.
        let mut watch = !self.terminating;
        loop {
            let room = watch && self.client.buffered_input() + self.queued_bytes < MAX_QUEUED_BYTES;
            tokio::select! {
                biased;
                out = &mut wait => return out.ok_or(SessionError::QueryCanceled),
                r = self.client.fill(), if room => match r {
                    Ok(0) if self.client.buffered_holds(tag::FE_TERMINATE) => watch = false,
                    Ok(0) => {
                        return Err(SessionError::ClientIo(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "client left while its request waited",
                        )));
                    }
                    Ok(_) => self.unread_input = true,
                    Err(e) => return Err(SessionError::ClientIo(e)),
                },
            }
        }
    }

    /// The client left while its request waited for an execution slot. What the proxy queued
    /// on the backend ahead of that request (a settings replay, a deferred BEGIN) was never
    /// sent, so it is dropped and the connection can go back to its pool instead of being
    /// closed. Its settings are then unknown, so the next client's replay resets them.
    pub(super) fn drop_unsent(&mut self) {
        let Some(lease) = self.lease.as_mut() else {
            return;
        };
        let conn = lease.conn();
        // Before its request goes out, the replies owed are those of the proxy's own queries
        // queued with it, not yet flushed (the shape check answers any it flushes). Anything
        // else means something was sent, and the connection is busy.
        let unsent = !self.replies.is_empty()
            && conn.transport.pending_write() > 0
            && self.replies.iter().all(|e| {
                matches!(
                    e,
                    Expect::Query { forward: false, .. } | Expect::Settings { .. }
                )
            });
        if !unsent {
            return;
        }
        conn.transport.truncate_write(0);
        conn.set_applied(Applied::UNKNOWN);
        self.replies.clear();
    }
}
