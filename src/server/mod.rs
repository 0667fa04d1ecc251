//! Accept loop, graceful stop and reload signals; a client's start-up is in [`startup`].

mod startup;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::AuthSecrets;
use crate::cancel::CancelRegistry;
use crate::catalog::Catalogs;
use crate::clients::ClientAddr;
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::consistency::Keys;
use crate::pool::Pools;
use crate::stats::{LoginFailure, Stats};
use crate::tls::Stream;

/// State shared by every session: a few named `Arc`s, never globals.
pub struct Shared {
    /// The configuration in force; a reload swaps it.
    pub cfg: Arc<ArcSwap<Config>>,
    pub cluster: Arc<Cluster>,
    pub pools: Arc<Pools>,
    pub auth: AuthSecrets,
    pub catalogs: Catalogs,
    pub cancels: CancelRegistry,
    /// TLS towards clients and servers.
    pub tls: Arc<crate::tls::Tls>,
    pub stats: Stats,
    /// Connected clients.
    pub clients: crate::clients::Clients,
    /// When the proxy started.
    pub started: std::time::Instant,
    /// Keyed read-your-writes tokens (`causeway.consistency_key`).
    pub keys: Keys,
    pub shutdown: CancellationToken,
    /// Cancelled when the shutdown grace period is over: every session ends with 57P01.
    pub force_close: CancellationToken,
    /// The configuration file, for reloads.
    pub config_path: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// The last session id handed out (ids start at 1, across both listeners).
    session_ids: AtomicU64,
    /// Startup settings a server accepted, by login and settings fingerprint.
    pub checked_settings: dashmap::DashSet<(Arc<str>, u64)>,
}

/// A running proxy: its address and the handle that stops it.
pub struct Running {
    pub addr: SocketAddr,
    /// The Unix-domain socket clients may use (`server.listen_unix`), if any.
    pub unix_path: Option<PathBuf>,
    /// Where the admin HTTP endpoint listens, if enabled.
    pub admin_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops at once: no new clients, idle clients closed; clients with a running request or
    /// transaction finish it, then are closed.
    pub async fn stop(self) {
        self.shared.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Graceful shutdown: stops accepting and closes idle clients at once (57P01); running
    /// transactions get `grace` to finish, then their clients are closed with 57P01 too (the
    /// server rolls back what they left open), or earlier if `force_close` is cancelled
    /// meanwhile. Returns once every client is gone.
    pub async fn shutdown(self, grace: std::time::Duration) {
        let shared = Arc::clone(&self.shared);
        shared.shutdown.cancel();
        let _ = self.task.await;
        let open = || shared.stats.clients_open.load(Ordering::Acquire);
        let deadline = tokio::time::Instant::now() + grace;
        // Cancelled early when a second stop signal cuts the grace period short.
        let cut_short = || shared.force_close.is_cancelled();
        while open() > 0 && tokio::time::Instant::now() < deadline && !cut_short() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if open() > 0 {
            if !cut_short() {
                tracing::info!(
                    clients = open(),
                    "shutdown grace period over; closing the rest"
                );
            }
            shared.force_close.cancel();
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            while open() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        tracing::info!("shut down");
    }
}

/// [`start`] could not open the admin endpoint: the error inside the `io::Error` it returns,
/// so a caller can tell this failure from one of the client listener.
#[derive(Debug, thiserror::Error)]
#[error("admin endpoint {addr}: {source}")]
pub struct AdminEndpointError {
    /// `server.admin_listen`.
    pub addr: String,
    /// Why binding it failed.
    pub source: std::io::Error,
}

/// Binds the listener, starts the monitors and the accept loop, and returns at once.
pub async fn start(cfg: Arc<Config>) -> std::io::Result<Running> {
    let listen = &cfg.server.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("server.listen {listen}: {e}")))?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let tls = Arc::new(
        crate::tls::Tls::from_config(&cfg)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
    );
    let cluster = Arc::new(Cluster::from_config(&cfg, Arc::clone(&tls)));
    let live = Arc::new(ArcSwap::new(Arc::clone(&cfg)));
    let pools = Arc::new(Pools::new(Arc::clone(&live), Arc::clone(&tls)));
    cluster::spawn_monitors(&cluster, &cfg, &shutdown);
    pools.spawn_maintenance(shutdown.clone());
    let cfg_keys = cfg.consistency.clone();
    let cluster_started = cluster.started();
    let shared = Arc::new(Shared {
        auth: AuthSecrets::new(&cfg),
        catalogs: Catalogs::new(Arc::clone(&cfg), Arc::clone(&tls), shutdown.clone()),
        tls,
        cfg: live,
        cluster,
        pools,
        cancels: CancelRegistry::default(),
        stats: Stats::default(),
        clients: crate::clients::Clients::default(),
        started: std::time::Instant::now(),
        keys: Keys::new(
            std::time::Duration::from_millis(cfg_keys.key_ttl_ms),
            cfg_keys.max_keys,
            cluster_started,
        ),
        shutdown,
        force_close: CancellationToken::new(),
        config_path: std::sync::Mutex::new(None),
        session_ids: AtomicU64::new(0),
        checked_settings: dashmap::DashSet::new(),
    });
    let admin_addr = match crate::admin::start(&shared).await {
        Ok(a) => a,
        Err(e) => {
            shared.shutdown.cancel();
            let addr = shared.cfg.load().server.admin_listen.clone();
            return Err(std::io::Error::new(
                e.kind(),
                AdminEndpointError { addr, source: e },
            ));
        }
    };
    // Bound last of all, so that no failure after it leaves the socket file behind.
    let unix = match cfg.server.listen_unix.as_str() {
        "" => None,
        dir => match bind_unix(Path::new(dir), addr.port()) {
            Ok(bound) => Some(bound),
            Err(e) => {
                shared.shutdown.cancel();
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("server.listen_unix {dir}: {e}"),
                ));
            }
        },
    };
    tracing::info!(%addr, "listening");
    let unix_path = unix.as_ref().map(|(_, path)| path.clone());
    if let Some(path) = &unix_path {
        tracing::info!(path = %path.display(), "listening");
    }
    tokio::spawn(relay_stop(Arc::downgrade(&shared)));
    let accepting = Arc::clone(&shared);
    let task = tokio::spawn(async move {
        let local = async {
            if let Some((listener, path)) = unix {
                accept_unix(listener, &path, &accepting).await;
            }
        };
        tokio::join!(accept_loop(listener, Arc::clone(&accepting)), local);
    });
    Ok(Running {
        addr,
        unix_path,
        admin_addr,
        shared,
        task,
    })
}

/// Passes shutdown on to every session through its own flag, so a session's loop checks a
/// flag of its own instead of polling the shared tokens on every message. Sessions that log in
/// later check the tokens once when they start.
async fn relay_stop(shared: std::sync::Weak<Shared>) {
    let Some((shutdown, force)) = shared
        .upgrade()
        .map(|s| (s.shutdown.clone(), s.force_close.clone()))
    else {
        return;
    };
    shutdown.cancelled().await;
    if let Some(s) = shared.upgrade() {
        s.clients.signal_all(crate::clients::Stop::Drain);
    }
    force.cancelled().await;
    if let Some(s) = shared.upgrade() {
        s.clients.signal_all(crate::clients::Stop::Close);
    }
}

/// Runs the proxy until SIGINT/SIGTERM; SIGHUP reloads `path`. A second SIGINT or SIGTERM
/// during the graceful shutdown closes the remaining clients at once, as PgBouncer's does.
pub async fn run(cfg: Arc<Config>, path: std::path::PathBuf) -> std::io::Result<()> {
    // Handlers first: a signal that arrives while starting must not kill the process.
    let mut signals = Signals::new()?;
    let running = start(cfg).await?;
    running.shared.set_config_path(path);
    signals.wait(&running.shared).await;
    let grace =
        std::time::Duration::from_millis(running.shared.cfg.load().server.shutdown_timeout_ms);
    tracing::info!(grace_ms = grace.as_millis(), "shutting down");
    let force = running.shared.force_close.clone();
    let hurry = tokio::spawn(async move {
        signals.stop().await;
        tracing::info!("second stop signal; closing the remaining clients now");
        force.cancel();
    });
    running.shutdown(grace).await;
    hurry.abort();
    Ok(())
}

/// SIGINT, SIGTERM and SIGHUP, listened for from creation on.
struct Signals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGINT or SIGTERM.
    async fn stop(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }

    /// Waits for SIGINT or SIGTERM, reloading the configuration on every SIGHUP meanwhile.
    async fn wait(&mut self, shared: &Arc<Shared>) {
        loop {
            tokio::select! {
                _ = self.int.recv() => return,
                _ = self.term.recv() => return,
                _ = self.hup.recv() => {
                    if let Err(e) = shared.reload() {
                        tracing::error!(error = %e, "reload rejected; the running configuration stays");
                    }
                }
            }
        }
    }
}

impl Shared {
    /// Remembers the file the configuration came from, for reloads.
    pub fn set_config_path(&self, path: std::path::PathBuf) {
        if let Ok(mut p) = self.config_path.lock() {
            *p = Some(path);
        }
    }

    /// Re-reads the configuration file and applies it; an invalid file changes nothing.
    pub fn reload(self: &Arc<Self>) -> Result<crate::reload::ReloadReport, String> {
        let path = self
            .config_path
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .ok_or("the proxy was not started from a configuration file")?;
        crate::reload::reload_file(self, &path)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                spawn_session(Stream::Plain(socket), ClientAddr::Tcp(peer), &shared);
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Accepts clients on the Unix-domain socket until shutdown, then removes the socket file.
async fn accept_unix(listener: UnixListener, path: &Path, shared: &Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((socket, _)) => spawn_session(Stream::Unix(socket), ClientAddr::Local, shared),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove the socket file");
    }
}

/// Binds `<dir>/.s.PGSQL.<port>`, world-connectable as PostgreSQL's own socket (the directory's
/// permissions and authentication decide who gets in). A socket file nobody answers on is
/// left from a proxy that did not stop cleanly and is replaced; a live one is an error.
fn bind_unix(dir: &Path, port: u16) -> std::io::Result<(UnixListener, PathBuf)> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let path = dir.join(format!(".s.PGSQL.{port}"));
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running server", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
    Ok((listener, path))
}

/// Logs and counts a refused login, as PostgreSQL logs each failed authentication: at warn,
/// so that guessing passwords shows at the default level. The line names the client, user,
/// database and reason; the password never appears in it.
fn login_failed(
    shared: &Shared,
    peer: ClientAddr,
    user: &str,
    database: &str,
    reason: LoginFailure,
    e: &crate::error::SessionError,
) {
    shared.stats.count_login_failure(reason);
    tracing::warn!(
        client.addr = %peer,
        user,
        db = database,
        reason = reason.as_str(),
        error = %e,
        "login failed"
    );
}

/// [`login_failed`] for an authentication exchange that ended in `e`. A client that hung up
/// is not counted: psql does so on purpose when the server first asks for a password.
fn auth_failed(
    shared: &Shared,
    peer: ClientAddr,
    user: &str,
    database: &str,
    e: &crate::error::SessionError,
) {
    use crate::error::SessionError;
    let known = shared.cfg.load().user(user).is_some();
    let reason = match e {
        // A client that hung up, or a login cut short by a shutdown: nothing was refused.
        _ if e.is_client_gone() => return,
        SessionError::Shutdown => return,
        SessionError::AuthFailed(_) | SessionError::AuthRejected(_) if !known => {
            LoginFailure::UnknownUser
        }
        SessionError::AuthFailed(_) => LoginFailure::Password,
        SessionError::LoginTimeout => LoginFailure::Timeout,
        _ => LoginFailure::Protocol,
    };
    login_failed(shared, peer, user, database, reason, e);
}

/// Runs one client's session in a task of its own, inside its logging span. The span is at
/// debug level: entering it on every poll of a busy session is a measurable share of the
/// per-request work, so at the default level it is off and the few lines a session logs at
/// info or above name the client themselves.
fn spawn_session(stream: Stream, peer: ClientAddr, shared: &Arc<Shared>) {
    let id = shared.session_ids.fetch_add(1, Ordering::Relaxed) + 1;
    let span = tracing::debug_span!("session", client.addr = %peer, session.id = id, user = tracing::field::Empty, db = tracing::field::Empty);
    let shared = Arc::clone(shared);
    tokio::spawn(
        async move {
            shared.stats.clients_total.fetch_add(1, Ordering::Relaxed);
            shared.stats.clients_open.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = startup::handle_client(stream, peer, id, &shared).await {
                tracing::debug!(error = %e, "session ended with an error");
            }
            shared.stats.clients_open.fetch_sub(1, Ordering::Relaxed);
        }
        .instrument(span),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    #[tokio::test]
    async fn the_socket_file_is_claimed_only_from_a_dead_server() {
        let dir = tempfile::tempdir().unwrap();
        let (live, path) = bind_unix(dir.path(), 6543).unwrap();
        assert_eq!(path, dir.path().join(".s.PGSQL.6543"));
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o777);
        // Someone answers there: not ours to take.
        let e = bind_unix(dir.path(), 6543).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        // Left behind by a proxy that did not stop cleanly: replaced.
        drop(live);
        assert!(path.exists());
        let (_again, _) = bind_unix(dir.path(), 6543).unwrap();
        // Never deletes something that is not a socket.
        std::fs::write(dir.path().join(".s.PGSQL.6544"), "data").unwrap();
        let e = bind_unix(dir.path(), 6544).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert!(dir.path().join(".s.PGSQL.6544").exists());
    }
}
