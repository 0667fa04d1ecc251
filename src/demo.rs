//! `causeway demo`: a throwaway primary with two streaming replicas, started from the machine's
//! PostgreSQL binaries, with the proxy in front; Ctrl-C, SIGTERM or SIGHUP stops and removes
//! everything, even while the cluster is still starting. The user's settings (a file given with
//! `-c`, `CAUSEWAY__…` variables) go over the demo's own configuration.

use std::path::Path;
use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::config::{Config, ConfigError, Overlay};
use crate::launcher::{ClusterOptions, LocalCluster};
use crate::server::Running;

/// The demo's admin endpoint, as the README gives it.
const ADMIN: &str = "127.0.0.1:9930";

/// The demo's client endpoint when `--port` is not given and no setting names one.
const LISTEN: &str = "127.0.0.1:6432";

/// Keys the demo sets itself, whatever the user's settings say.
const OWNED: &[&str] = &["primary", "replicas", "users"];

/// Why [`OWNED`] keys are refused.
const OWNED_REASON: &str = "the demo starts its own primary and replicas, whose one login is `app`";

/// What the demo runs with: the user's settings over its own, and the client port given with
/// `--port`.
pub struct Settings {
    overlay: Overlay,
    port: Option<u16>,
}

impl Settings {
    /// Reads the file at `path` (when given) and the `CAUSEWAY__…` variables, refuses the keys
    /// the demo sets itself (and `server.listen` when `port` is given), and checks the rest
    /// against a stand-in cluster, so a mistake stops the demo before any server starts. The
    /// configuration checked is returned too: its logging and worker threads apply from the
    /// start.
    pub fn load(path: Option<&Path>, port: Option<u16>) -> Result<(Settings, Config), ConfigError> {
        let overlay = Overlay::read(path)?;
        overlay.refuse(OWNED, OWNED_REASON)?;
        if port.is_some() {
            overlay.refuse(
                &["server.listen"],
                "`--port` names the demo's client endpoint",
            )?;
        }
        let settings = Settings { overlay, port };
        let stand_in = addresses(
            ("127.0.0.1", 1),
            &[("replica1", "127.0.0.1", 2), ("replica2", "127.0.0.1", 3)],
        );
        let checked = settings.config(&stand_in, ADMIN)?;
        Ok((settings, checked))
    }

    /// The proxy's configuration for servers at `addresses` (see [`addresses`]).
    fn config(&self, addresses: &str, admin: &str) -> Result<Config, ConfigError> {
        let listen = match self.port {
            Some(port) => format!("127.0.0.1:{port}"),
            None => LISTEN.to_string(),
        };
        self.overlay
            .over(&format!("{}{addresses}", general(&listen, admin)))
    }
}

/// The proxy configuration for a local cluster (the same one the tests use). The admin
/// endpoint listens on 127.0.0.1:9930, or on a free port when `listen` asks for one (`:0`).
pub fn config_for(cluster: &LocalCluster, listen: &str) -> String {
    let admin = if listen.ends_with(":0") {
        "127.0.0.1:0"
    } else {
        ADMIN
    };
    config_with_admin(cluster, listen, admin)
}

fn config_with_admin(cluster: &LocalCluster, listen: &str, admin: &str) -> String {
    format!("{}{}", general(listen, admin), cluster_addresses(cluster))
}

/// Everything but the servers' addresses.
fn general(listen: &str, admin: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "{admin}"

[admin]
users = ["app"]

[auth]
method = "scram-sha-256"

[[users]]
name = "app"
password = "app-secret"
"#
    )
}

fn cluster_addresses(cluster: &LocalCluster) -> String {
    let replicas: Vec<(&str, &str, u16)> = cluster
        .replicas
        .iter()
        .map(|r| (r.name.as_str(), r.host.as_str(), r.port))
        .collect();
    addresses((&cluster.primary.host, cluster.primary.port), &replicas)
}

/// The `[primary]` and `[[replicas]]` tables for a primary at (host, port) and replicas at
/// (name, host, port).
fn addresses(primary: (&str, u16), replicas: &[(&str, &str, u16)]) -> String {
    let mut text = format!(
        "\n[primary]\nhost = \"{}\"\nport = {}\n",
        primary.0, primary.1
    );
    for (name, host, port) in replicas {
        text.push_str(&format!(
            "\n[[replicas]]\nname = \"{name}\"\nhost = \"{host}\"\nport = {port}\nweight = 1\n"
        ));
    }
    text
}

/// Runs the demo until SIGINT (Ctrl-C), SIGTERM or SIGHUP (a closed terminal), then stops the
/// proxy and removes the cluster. The signals are caught from the start: one that arrives while
/// the cluster is starting lets the start finish, or fail and clean up after itself, and then
/// removes whatever it made.
pub async fn run(settings: Settings) -> Result<(), String> {
    let mut stop = StopSignals::new().map_err(|e| format!("cannot catch signals: {e}"))?;
    eprintln!("starting a PostgreSQL primary and two streaming replicas...");
    let mut starting =
        tokio::task::spawn_blocking(|| LocalCluster::start(ClusterOptions::default()));
    let started = tokio::select! {
        biased;
        signal = stop.recv() => {
            say(&format!("{signal}: stopping; the servers being started are removed once they are up"));
            if let Ok(Ok(cluster)) = starting.await {
                remove(cluster).await?;
            }
            return Ok(());
        }
        started = &mut starting => started,
    };
    let cluster = started
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot start the demo cluster: {e}"))?;
    let running = match serve(&cluster, &settings).await {
        Ok(running) => running,
        Err(e) => {
            remove(cluster).await?;
            return Err(e);
        }
    };
    show(&cluster, &running);
    let signal = stop.recv().await;
    say(&format!("{signal}: stopping..."));
    running.stop().await;
    remove(cluster).await
}

/// The proxy in front of `cluster`, with the user's settings.
async fn serve(cluster: &LocalCluster, settings: &Settings) -> Result<Running, String> {
    let named = settings.overlay.sets("server.admin_listen");
    let started = match start_proxy(cluster, settings, ADMIN).await? {
        // Another program on 9930 (another demo, say) leaves the dashboard a free port
        // instead, unless the user named the admin endpoint. Decided by the bind itself, so a
        // program taking the port at the same moment cannot fail the start.
        Err(e) if !named && admin_in_use(&e) => {
            eprintln!("{ADMIN} is in use; the admin endpoint takes a free port");
            start_proxy(cluster, settings, "127.0.0.1:0").await?
        }
        started => started,
    };
    started.map_err(|e| format!("cannot start the proxy: {e}"))
}

/// Starts the proxy with its admin endpoint on `admin`: an invalid configuration is the
/// outer error, a failed start the inner one.
async fn start_proxy(
    cluster: &LocalCluster,
    settings: &Settings,
    admin: &str,
) -> Result<std::io::Result<Running>, String> {
    let cfg = settings
        .config(&cluster_addresses(cluster), admin)
        .map_err(|e| format!("invalid configuration: {e}"))?;
    Ok(crate::server::start(Arc::new(cfg)).await)
}

/// Whether the proxy failed to start because its admin endpoint's address was taken.
fn admin_in_use(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::AddrInUse
        && e.get_ref()
            .is_some_and(|inner| inner.is::<crate::server::AdminEndpointError>())
}

/// Prints where everything listens and how to connect.
fn show(cluster: &LocalCluster, running: &Running) {
    println!("primary   127.0.0.1:{}", cluster.primary.port);
    for r in &cluster.replicas {
        println!("{:<9} 127.0.0.1:{}", r.name, r.port);
    }
    println!("causeway  {}", running.addr);
    if let Some(admin) = running.admin_addr {
        println!("admin     http://{admin}/  (dashboard; /stats, /metrics)");
    }
    println!();
    println!(
        "connect:  PGPASSWORD=app-secret psql -h 127.0.0.1 -p {} -U app app",
        running.addr.port()
    );
    println!(
        "try:      SELECT inet_server_port();  -- a replica's port; writes run on the primary"
    );
    println!(
        "console:  PGPASSWORD=app-secret psql -h 127.0.0.1 -p {} -U app causeway -c 'SHOW REPLICAS'",
        running.addr.port()
    );
    println!("Ctrl-C stops the proxy and removes the cluster.");
}

/// A line on stderr, if it is still there: after SIGHUP the terminal may be gone, and
/// `eprintln!` would panic instead of letting the cluster be removed.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Stops every server of `cluster` and removes its files.
async fn remove(cluster: LocalCluster) -> Result<(), String> {
    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .map_err(|e| e.to_string())
}

/// The signals that end the demo, caught from creation on.
struct StopSignals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The name of the next signal.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}
