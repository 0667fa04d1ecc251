//! Cancel keys: the proxy hands each client its own key and forwards a CancelRequest to the
//! backend that is running that client's query right now.

use std::sync::atomic::{AtomicBool, Ordering};
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
/// whenever it takes or gives one back), and a way to stop a query still waiting for one.
#[derive(Debug, Default)]
pub struct CancelCell {
    target: Mutex<Option<CancelTarget>>,
    /// The session is waiting for a backend for a query the client sent.
    waiting: AtomicBool,
    /// Wakes that wait when a cancel arrives.
    cancelled: Notify,
}

/// A session's [`CancelCell`].
pub type CancelSlot = Arc<CancelCell>;

impl CancelCell {
    /// The backend the client's queries now run on.
    pub fn set(&self, t: CancelTarget) {
        if let Ok(mut slot) = self.target.lock() {
            *slot = Some(t);
        }
    }

    /// The backend, marked as cancelled (see [`CancelTarget::cancelled`]), to send a cancel
    /// to; `None` when the client holds no backend.
    pub fn take_for_cancel(&self) -> Option<CancelTarget> {
        let mut t = self.target.lock().ok()?;
        let t = t.as_mut()?;
        t.cancelled = true;
        Some(t.clone())
    }

    /// Empties the cell as its backend goes back; true when a cancel was sent for it.
    pub fn clear(&self) -> bool {
        match self.target.lock() {
            Ok(mut t) => t.take().is_some_and(|t| t.cancelled),
            Err(_) => false,
        }
    }

    /// Runs `wait` (a wait for a backend) unless the client cancels its query first: `None`
    /// then, as a server would answer a cancel with 57014.
    pub async fn unless_cancelled<F: Future>(&self, wait: F) -> Option<F::Output> {
        let notified = self.cancelled.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.waiting.store(true, Ordering::SeqCst);
        let out = tokio::select! {
            biased;
            () = &mut notified => None,
            r = wait => Some(r),
        };
        self.waiting.store(false, Ordering::SeqCst);
        out
    }

    /// A cancel for this client: to its backend, or to its wait for one.
    fn cancel(&self) -> Option<CancelTarget> {
        let t = self.take_for_cancel();
        if t.is_none() && self.waiting.load(Ordering::SeqCst) {
            self.cancelled.notify_waiters();
        }
        t
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
