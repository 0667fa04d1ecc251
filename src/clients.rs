//! Connected clients, for `SHOW CLIENTS` and the client counts in the admin stats. Each
//! session holds its entry and moves it between states; dropping the handle removes it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use futures_util::task::AtomicWaker;

/// What a client is doing right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Holds no backend connection.
    Idle = 0,
    /// Waiting for a backend connection.
    Waiting = 1,
    /// Holds a backend connection (running a request, or inside a transaction).
    Active = 2,
}

impl ClientState {
    /// Stable name for stats.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }
}

/// Where a client connected from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    Tcp(SocketAddr),
    /// The Unix-domain socket in `server.listen_unix`.
    Local,
}

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientAddr::Tcp(a) => a.fmt(f),
            // As PostgreSQL's own logs name such a client.
            ClientAddr::Local => f.write_str("[local]"),
        }
    }
}

/// One connected client.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub addr: ClientAddr,
    pub user: String,
    pub database: String,
    /// Milliseconds since the Unix epoch when the client logged in.
    pub connected_at_ms: u64,
    state: AtomicU8,
    /// Node id of the backend held while active.
    node: AtomicUsize,
    /// Requests the client sent to a backend.
    pub requests: AtomicU64,
    /// How far the proxy's shutdown has come for this client: a [`Stop`] level.
    stop: AtomicU8,
    /// The session waiting for `stop` to change.
    stop_waker: AtomicWaker,
}

/// Shutdown as a session sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Stop {
    /// Serving.
    None = 0,
    /// Finish the transaction in progress, then close.
    Drain = 1,
    /// Close now.
    Close = 2,
}

impl ClientInfo {
    /// Current state.
    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// Node id of the backend it holds, while active.
    pub fn node(&self) -> Option<usize> {
        let n = self.node.load(Ordering::Relaxed);
        (self.state() == ClientState::Active && n != usize::MAX).then_some(n)
    }

    /// Waiting for a backend.
    pub fn set_waiting(&self) {
        self.state
            .store(ClientState::Waiting as u8, Ordering::Relaxed);
    }

    /// Holding a backend on node `node`.
    pub fn set_active(&self, node: usize) {
        self.node.store(node, Ordering::Relaxed);
        self.state
            .store(ClientState::Active as u8, Ordering::Relaxed);
    }

    /// Raises this client's shutdown level (never lowers it) and wakes its session.
    pub fn signal(&self, level: Stop) {
        self.stop.fetch_max(level as u8, Ordering::AcqRel);
        self.stop_waker.wake();
    }

    /// Ready with the shutdown level once it reaches `at_least`. A few atomic operations per
    /// poll, so the session loop can check it on every turn.
    pub fn poll_stop(&self, cx: &mut Context<'_>, at_least: Stop) -> Poll<Stop> {
        let level = || match self.stop.load(Ordering::Acquire) {
            0 => Stop::None,
            1 => Stop::Drain,
            _ => Stop::Close,
        };
        if level() >= at_least {
            return Poll::Ready(level());
        }
        self.stop_waker.register(cx.waker());
        // A signal between the first load and the registration would otherwise be missed.
        match level() {
            l if l >= at_least => Poll::Ready(l),
            _ => Poll::Pending,
        }
    }

    /// Holding nothing.
    pub fn set_idle(&self) {
        self.state.store(ClientState::Idle as u8, Ordering::Relaxed);
    }
}

/// Every connected client, by id.
#[derive(Default)]
pub struct Clients {
    map: DashMap<u64, Arc<ClientInfo>>,
}

/// A client's registration; removes it when dropped.
pub struct ClientHandle<'a> {
    clients: &'a Clients,
    pub info: Arc<ClientInfo>,
}

impl Drop for ClientHandle<'_> {
    fn drop(&mut self) {
        self.clients.map.remove(&self.info.id);
    }
}

impl Clients {
    /// Registers a logged-in client.
    pub fn register(
        &self,
        id: u64,
        addr: ClientAddr,
        user: &str,
        database: &str,
    ) -> ClientHandle<'_> {
        let connected_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let info = Arc::new(ClientInfo {
            id,
            addr,
            user: user.to_string(),
            database: database.to_string(),
            connected_at_ms,
            state: AtomicU8::new(ClientState::Idle as u8),
            node: AtomicUsize::new(usize::MAX),
            requests: AtomicU64::new(0),
            stop: AtomicU8::new(Stop::None as u8),
            stop_waker: AtomicWaker::new(),
        });
        self.map.insert(id, Arc::clone(&info));
        ClientHandle {
            clients: self,
            info,
        }
    }

    /// Tells every registered session how far shutdown has come.
    pub fn signal_all(&self, level: Stop) {
        for e in self.map.iter() {
            e.value().signal(level);
        }
    }

    /// Every client, ordered by id.
    pub fn list(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<_> = self.map.iter().map(|e| Arc::clone(e.value())).collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Clients logged in as `user`.
    pub fn count_user(&self, user: &str) -> usize {
        self.map.iter().filter(|e| e.value().user == user).count()
    }

    /// Clients per state: (idle, waiting, active).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for e in &self.map {
            match e.value().state() {
                ClientState::Idle => c.0 += 1,
                ClientState::Waiting => c.1 += 1,
                ClientState::Active => c.2 += 1,
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_tracks_state_and_leaves_on_drop() {
        let clients = Clients::default();
        let addr = ClientAddr::Tcp("127.0.0.1:5000".parse().unwrap());
        assert_eq!(addr.to_string(), "127.0.0.1:5000");
        assert_eq!(ClientAddr::Local.to_string(), "[local]");
        let a = clients.register(1, addr, "app", "app");
        let b = clients.register(2, addr, "app", "other");
        a.info.set_waiting();
        b.info.set_active(2);
        assert_eq!(clients.counts(), (0, 1, 1));
        assert_eq!(b.info.node(), Some(2));
        assert_eq!(a.info.node(), None);
        b.info.set_idle();
        assert_eq!(b.info.node(), None);
        drop(a);
        let left = clients.list();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].database, "other");
        assert_eq!(clients.counts(), (1, 0, 0));
    }
}
