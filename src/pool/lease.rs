//! A connection checked out of a pool, and what becomes of it when it comes back.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::queue::Permit;
use super::{Applied, BackendConn, Pool};
use crate::cluster::Node;
use crate::protocol::TxStatus;

/// A checked-out connection. Dropping it returns the connection clean (rolling back an open
/// transaction under a timeout) or discards it.
pub struct Lease {
    pub(super) conn: Option<Box<BackendConn>>,
    pub(super) pool: Arc<Pool>,
    pub(super) permit: Option<Permit>,
    /// A client's whole session ran on this connection (session pooling), see
    /// [`Lease::end_session`].
    pub(super) session_ended: bool,
}

impl Lease {
    /// The connection.
    pub fn conn(&mut self) -> &mut BackendConn {
        // Invariant: `conn` is only taken in `drop`.
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("lease used after drop"))
    }

    pub(super) fn conn_ref(&self) -> &BackendConn {
        self.conn
            .as_ref()
            .unwrap_or_else(|| unreachable!("lease used after drop"))
    }

    /// The node this connection belongs to.
    pub fn node(&self) -> &Arc<Node> {
        &self.pool.node
    }

    /// The pool it came from.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The client whose whole session ran here has left (session pooling): before anyone else
    /// gets the connection, `DISCARD ALL` takes away what its session left that a new server
    /// connection would not have, including what the proxy does not follow (sequences'
    /// `currval`/`lastval`, cached plans, settings changed where it could not see). The proxy's
    /// own prepared statements go with it, so the connection forgets them too.
    pub fn end_session(&mut self) {
        self.session_ended = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.node.in_use.fetch_sub(1, Ordering::Relaxed);
        let Some(conn) = self.conn.take() else {
            return;
        };
        let pool = Arc::clone(&self.pool);
        // Unsynced, the server sits in an implicit transaction whose locks and writes the next
        // client's statement would commit: nothing cheap undoes that, so the connection goes.
        let discard = conn.broken || conn.unsynced;
        if discard && !conn.running {
            // The server ends the session as soon as it reads the closed socket.
            pool.open.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let session_ended = self.session_ended;
        if !discard && conn.status == TxStatus::Idle && !session_ended {
            pool.put_idle(conn);
            return;
        }
        // Left inside a transaction (client vanished), at the end of a session, or with a
        // statement still running: the connection keeps its place in the pool (its permit, its
        // count) until it is clean or really gone, so the pool never has more backends than its
        // size.
        let permit = self.permit.take();
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            pool.open.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        handle.spawn(async move {
            let mut conn = conn;
            if discard {
                pool.stop_and_close(conn).await;
                drop(permit);
                return;
            }
            let cleaned =
                tokio::time::timeout(pool.settings.reset_timeout, clean(&mut conn, session_ended));
            match cleaned.await {
                Ok(Ok(())) if conn.status == TxStatus::Idle => {
                    pool.put_idle(conn);
                }
                _ => {
                    pool.open.fetch_sub(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
}

/// Rolls back what a client left open and, when its session ended here, makes the
/// connection what a new one would be (see [`Lease::end_session`]).
async fn clean(
    conn: &mut BackendConn,
    session_ended: bool,
) -> Result<(), crate::error::BackendError> {
    if conn.status != TxStatus::Idle {
        conn.simple_query("ROLLBACK").await?;
    }
    if session_ended && conn.status == TxStatus::Idle {
        // Sent on its own: DISCARD ALL refuses to run inside a transaction block, and a
        // string of several statements is one.
        conn.simple_query("DISCARD ALL").await?;
        conn.statements.clear();
        conn.set_applied(Applied::default());
    }
    Ok(())
}

impl Pool {
    /// Closes a connection that may still be running a statement: the statement is cancelled
    /// with the backend's own key, the proxy's side of the socket is shut, and what the server
    /// still sends is read and dropped until it closes, within `pool.reset_timeout_ms`. The
    /// server's end of the session rolls back whatever transaction was open, releasing its
    /// locks. The pool counts the connection until then.
    async fn stop_and_close(&self, mut conn: Box<BackendConn>) {
        let target = crate::cancel::CancelTarget {
            endpoint: self.node.endpoint(),
            pid: conn.pid,
            secret: conn.secret,
            cancelled: true,
        };
        // A request queued but never sent stays unsent: the cancel is for what already runs.
        conn.transport.truncate_write(0);
        let closed = async {
            crate::cancel::send_cancel(target).await;
            // End of input rather than Terminate: a server skipping to the next Sync after
            // the cancel's error ignores Terminate, but not the end of its input.
            conn.transport.shutdown().await;
            conn.transport.drain().await;
        };
        if tokio::time::timeout(self.settings.reset_timeout, closed)
            .await
            .is_err()
        {
            tracing::debug!(pool = %self.name, pid = conn.pid, "abandoned backend did not close in time; dropping it");
        }
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}
