//! Cancel keys: the proxy hands each client its own key and forwards a CancelRequest to the
//! backend that is running that client's query right now.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use dashmap::DashMap;
use rand::Rng;
use tokio::io::AsyncWriteExt;

use crate::protocol;

/// The backend a client's query runs on, as the server knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    /// Host and port of its server (formatted only when a cancel is sent).
    pub endpoint: Arc<(String, u16)>,
    pub pid: i32,
    pub secret: i32,
    /// A cancel was sent (or is on its way) for this backend: it may still land after the
    /// query it was meant for, so the connection must not serve anyone else.
    pub cancelled: bool,
}

impl CancelTarget {
    /// `host:port` of the server, or its socket file.
    pub fn addr(&self) -> String {
        crate::tls::server_addr(&self.endpoint.0, self.endpoint.1)
    }
}

/// What a session shares with the cancel path: the backend its query runs on (updated
/// whenever it takes or gives one back), and a way to stop a query still waiting for a
/// connection or an execution slot.
#[derive(Debug, Default)]
pub struct CancelCell {
    state: Mutex<CancelState>,
    /// Wakes a wait when a cancel arrives.
    cancelled: Notify,
}

#[derive(Debug, Default)]
struct CancelState {
    target: Option<CancelTarget>,
    /// The session is waiting for a connection or an execution slot for a query the client
    /// sent: nothing of that query runs on any backend yet.
    waiting: bool,
    /// A cancel arrived during that wait.
    wait_cancelled: bool,
}

/// A session's [`CancelCell`].
pub type CancelSlot = Arc<CancelCell>;

impl CancelCell {
    /// No code panics while holding the lock, so a poisoned one still holds consistent state.
    fn lock(&self) -> std::sync::MutexGuard<'_, CancelState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The backend the client's queries now run on.
    pub fn set(&self, t: CancelTarget) {
        self.lock().target = Some(t);
    }

    /// The backend, marked as cancelled (see [`CancelTarget::cancelled`]), to send a cancel
    /// to; `None` when the client holds no backend.
    pub fn take_for_cancel(&self) -> Option<CancelTarget> {
        self.lock().marked()
    }

    /// Empties the cell as its backend goes back; true when a cancel was sent for it.
    pub fn clear(&self) -> bool {
        self.lock().target.take().is_some_and(|t| t.cancelled)
    }

    /// Runs `wait` (for a connection or an execution slot) unless the client cancels its query
    /// first: `None` then, as a server would answer a cancel with 57014. A cancel that arrives
    /// as the wait ends still wins, and what the wait obtained is dropped (given back), so a
    /// cancel is never lost between the wait and the backend.
    pub async fn unless_cancelled<F: Future>(&self, wait: F) -> Option<F::Output> {
        let notified = self.cancelled.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut s = self.lock();
            s.waiting = true;
            s.wait_cancelled = false;
        }
        let out = tokio::select! {
            biased;
            () = &mut notified => None,
            r = wait => Some(r),
        };
        let mut s = self.lock();
        s.waiting = false;
        if std::mem::take(&mut s.wait_cancelled) {
            return None;
        }
        out
    }

    /// A cancel for this client: to its wait for a connection or slot, where nothing runs on
    /// the backend it may hold, or else to that backend.
    fn cancel(&self) -> Option<CancelTarget> {
        let mut s = self.lock();
        if s.waiting {
            s.wait_cancelled = true;
            self.cancelled.notify_waiters();
            return None;
        }
        s.marked()
    }
}

impl CancelState {
    fn marked(&mut self) -> Option<CancelTarget> {
        let t = self.target.as_mut()?;
        t.cancelled = true;
        Some(t.clone())
    }
}

/// Client key -> that client's current backend.
#[derive(Default)]
pub struct CancelRegistry {
    map: DashMap<(i32, i32), CancelSlot>,
}

/// Removes the client's key when its session ends.
pub struct CancelKey<'a> {
    registry: &'a CancelRegistry,
    /// The (pid, secret) pair sent to the client in BackendKeyData.
    pub key: (i32, i32),
    pub slot: CancelSlot,
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        self.registry.map.remove(&self.key);
    }
}

impl CancelRegistry {
    /// Issues a fresh, unused key for a new client.
    pub fn register(&self) -> CancelKey<'_> {
        let mut rng = rand::rng();
        loop {
            let key = (rng.random_range(1..i32::MAX), rng.random());
            let slot: CancelSlot = Arc::new(CancelCell::default());
            if let dashmap::Entry::Vacant(v) = self.map.entry(key) {
                v.insert(Arc::clone(&slot));
                return CancelKey {
                    registry: self,
                    key,
                    slot,
                };
            }
        }
    }

    /// Forwards a cancel for the client holding `key`; unknown keys are ignored, as PostgreSQL does.
    pub async fn cancel(&self, key: (i32, i32)) {
        let target = self.map.get(&key).and_then(|slot| slot.cancel());
        if let Some(t) = target {
            send_cancel(t).await;
        }
    }
}

impl CancelRegistry {
    #[cfg(test)]
    fn contains(&self, key: &(i32, i32)) -> bool {
        self.map.contains_key(key)
    }
}

/// Sends a CancelRequest for `t`'s backend; failures are logged, as there is no one to tell.
pub async fn send_cancel(t: CancelTarget) {
    let addr = t.addr();
    let connect = crate::tls::connect_plain(&t.endpoint.0, t.endpoint.1);
    match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
        Ok(Ok(mut s)) => {
            let _ = s
                .write_all(&protocol::encode_cancel_request(t.pid, t.secret))
                .await;
            let _ = s.shutdown().await;
        }
        Ok(Err(e)) => tracing::warn!(%addr, error = %e, "cannot send cancel request"),
        Err(_) => tracing::warn!(%addr, "cannot send cancel request: connect timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> CancelTarget {
        CancelTarget {
            endpoint: Arc::new(("127.0.0.1".into(), 5432)),
            pid: 7,
            secret: 9,
            cancelled: false,
        }
    }

    #[tokio::test]
    async fn a_cancel_stops_a_wait_and_spares_the_backend_held() {
        let cell = Arc::new(CancelCell::default());
        cell.set(target());
        let wait = {
            let cell = Arc::clone(&cell);
            tokio::spawn(async move { cell.unless_cancelled(std::future::pending::<()>()).await })
        };
        while !cell.lock().waiting {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            cell.cancel(),
            None,
            "nothing runs on the backend during the wait"
        );
        assert_eq!(wait.await.unwrap(), None);
        assert!(!cell.clear(), "the backend held is not marked cancelled");
        // Outside a wait, the cancel goes to the backend.
        cell.set(target());
        assert!(cell.cancel().is_some_and(|t| t.cancelled));
    }

    #[tokio::test]
    async fn a_cancel_as_the_wait_ends_still_wins() {
        let cell = CancelCell::default();
        let out = cell
            .unless_cancelled(async {
                assert_eq!(cell.cancel(), None);
                42
            })
            .await;
        assert_eq!(out, None);
    }

    #[test]
    fn keys_are_unique_and_removed_on_drop() {
        let r = CancelRegistry::default();
        let a = r.register();
        let b = r.register();
        assert_ne!(a.key, b.key);
        let k = a.key;
        drop(a);
        assert!(!r.contains(&k));
        assert!(r.contains(&b.key));
    }
}
