//! Memory per idle client: how much the proxy's resident memory grows per connected client that
//! has logged in, run one query and gone idle, and whether those idle clients hold backend
//! connections (in transaction mode they must not).
//!
//! A local cluster (a primary and `--replicas` streaming replicas) is started, then the release
//! `causeway` binary as a separate process with a generated configuration (transaction mode,
//! `[auth] method = "trust"` by default so 5,000 logins stay quick), so that its RSS can be read
//! from `/proc/<pid>/status`. A few warm-up clients log in, query and leave (so pools, caches and
//! buffers exist), the proxy's RSS is read, then `--clients` clients connect over loopback (at
//! most `--concurrency` logins at once), each runs one query and stays connected, idle. After
//! `--settle` seconds the proxy's RSS is read again and the backend connections are counted in
//! `pg_stat_activity` on every server. Prints RSS before and after, the growth per idle client
//! in KiB against the 64 KiB target, and the backend connections per server.
//!
//! ```sh
//! scripts/idle-clients                       # builds, raises the fd limit, runs 5,000 clients
//! cargo run --release --example idle_clients -- --clients 5000 --causeway target/release/causeway
//! ```
//!
//! Needs an open-file limit above the client count (`ulimit -n`; scripts/idle-clients raises
//! it). Everything runs on 127.0.0.1, is bounded in time (`--timeout`), and is removed at the end.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway::launcher::{ClusterOptions, LocalCluster, NodeInfo};
use clap::{Parser, ValueEnum};
use tokio::sync::Semaphore;
use tokio_postgres::{Client, NoTls};

const USER: &str = "app";
const PASSWORD: &str = "app-secret";
const DATABASE: &str = "app";
/// The target of the performance issue.
const TARGET_KIB: f64 = 64.0;
/// Clients that log in, query and leave before the baseline is read.
const WARMUP_CLIENTS: usize = 32;
/// Connections per server the proxy may hold besides its pool (health and LSN monitors).
const MONITOR_CONNECTIONS: usize = 2;
/// File descriptors this process needs beyond one per client.
const FD_HEADROOM: u64 = 256;

#[derive(Parser, Debug)]
#[command(about = "Proxy RSS per idle client, and backend connections held by idle clients")]
struct Args {
    /// Clients to connect and leave idle.
    #[arg(long, default_value_t = 5000)]
    clients: usize,
    /// Logins in flight at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// How clients authenticate to the proxy (the proxy logs in to PostgreSQL with SCRAM).
    #[arg(long, value_enum, default_value = "trust")]
    auth: Auth,
    /// What each client runs once before going idle: a simple-protocol `SELECT 1`, or a
    /// prepared (named) statement, which the proxy must remember for the client.
    #[arg(long, value_enum, default_value = "simple")]
    query: QueryKind,
    /// Streaming replicas behind the proxy.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// `[pool] primary_max` and `replica_max` of the proxy.
    #[arg(long, default_value_t = 20)]
    pool_size: usize,
    /// Seconds to wait after the last login before reading RSS and pg_stat_activity.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// The proxy binary; default: `causeway` next to this example's directory
    /// (target/release/causeway for target/release/examples/idle_clients).
    #[arg(long)]
    causeway: Option<PathBuf>,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Auth {
    Trust,
    Scram,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum QueryKind {
    Simple,
    Prepared,
}

// ---------------------------------------------------------------------------------------------
// The proxy process

/// The proxy child process; killed (SIGTERM, then SIGKILL) when dropped.
struct Proxy {
    child: Child,
    log: PathBuf,
}

impl Proxy {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM, up to 10 s for the graceful shutdown, then SIGKILL.
    fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding a free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("reading the free port: {e}"))
}

fn proxy_config(cluster: &LocalCluster, args: &Args, port: u16) -> String {
    let auth = match args.auth {
        Auth::Trust => "trust",
        Auth::Scram => "scram-sha-256",
    };
    let mut toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
admin_listen = ""
max_client_connections = 10000

[auth]
method = "{auth}"

[[users]]
name = "{USER}"
password = "{PASSWORD}"

[primary]
host = "{}"
port = {}
"#,
        cluster.primary.host, cluster.primary.port
    );
    for r in &cluster.replicas {
        toml.push_str(&format!(
            "\n[[replicas]]\nname = \"{}\"\nhost = \"{}\"\nport = {}\n",
            r.name, r.host, r.port
        ));
    }
    toml.push_str(&format!(
        "\n[pool]\nmode = \"transaction\"\nprimary_max = {0}\nreplica_max = {0}\n\n\
         [logging]\nlevel = \"warn\"\n",
        args.pool_size
    ));
    toml
}

fn start_proxy(bin: &Path, dir: &Path, config: &str) -> Result<Proxy, String> {
    let cfg_path = dir.join("proxy.toml");
    fs::write(&cfg_path, config).map_err(|e| format!("writing {}: {e}", cfg_path.display()))?;
    let log = dir.join("causeway.log");
    let out = fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("duplicating the log file: {e}"))?;
    let child = Command::new(bin)
        .arg("--config")
        .arg(&cfg_path)
        .env("CAUSEWAY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    Ok(Proxy { child, log })
}

/// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM, RssAnon...).
fn status_kib(pid: u32, field: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {field} in {path}"))
}

#[derive(Clone, Copy)]
struct Memory {
    rss: u64,
    anon: u64,
}

fn memory(pid: u32) -> Result<Memory, String> {
    Ok(Memory {
        rss: status_kib(pid, "VmRSS")?,
        anon: status_kib(pid, "RssAnon")?,
    })
}

/// The soft open-files limit of this process (the proxy inherits it).
fn open_files_limit() -> Option<u64> {
    let text = fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        Some(u64::MAX)
    } else {
        soft.parse().ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("SQLSTATE {} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// Logs in, runs the one query, and returns the (now idle) client.
async fn login_and_query(conninfo: &str, kind: QueryKind) -> Result<Client, String> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_postgres::connect(conninfo, NoTls),
    )
    .await
    .map_err(|_| "no answer to the login within 30 s".to_string())?
    .map_err(|e| format!("login: {}", describe(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let query = async {
        match kind {
            QueryKind::Simple => client.simple_query("SELECT 1").await.map(drop),
            QueryKind::Prepared => {
                let st = client.prepare("SELECT $1::int4 + 1").await?;
                client.query_one(&st, &[&41i32]).await.map(drop)
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), query)
        .await
        .map_err(|_| "no answer to the query within 30 s".to_string())?
        .map_err(|e| format!("query: {}", describe(&e)))?;
    Ok(client)
}

/// Opens `n` clients, at most `concurrency` logins at once; all must succeed.
async fn open_clients(
    conninfo: &str,
    n: usize,
    concurrency: usize,
    kind: QueryKind,
) -> Result<Vec<Client>, String> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let gate = Arc::clone(&gate);
        let conninfo = conninfo.to_string();
        tasks.spawn(async move {
            let _slot = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            login_and_query(&conninfo, kind).await
        });
    }
    let mut clients = Vec::with_capacity(n);
    let mut first_error = None;
    let mut errors = 0usize;
    while let Some(r) = tasks.join_next().await {
        match r.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(c) => clients.push(c),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        None => Ok(clients),
        Some(e) => Err(format!("{errors} of {n} clients failed; first: {e}")),
    }
}

/// Backend connections on `node` opened by the proxy's user (pool and health monitor), by
/// application_name and state, e.g. "causeway idle 20, causeway-monitor idle 1".
fn backends(cluster: &LocalCluster, node: &NodeInfo) -> Result<(u64, String), String> {
    let sql = format!(
        "SELECT coalesce(sum(n), 0) || '|' || coalesce(string_agg(what || ' ' || n, ', ' \
         ORDER BY what), '') FROM (SELECT coalesce(nullif(application_name, ''), '?') || ' ' \
         || coalesce(state, '?') AS what, count(*) AS n FROM pg_stat_activity \
         WHERE usename = '{USER}' AND backend_type = 'client backend' GROUP BY 1) s"
    );
    let out = cluster
        .psql(node, &sql)
        .map_err(|e| format!("pg_stat_activity on {}: {e}", node.name))?;
    let (total, detail) = out.split_once('|').unwrap_or(("0", ""));
    Ok((total.trim().parse().unwrap_or(0), detail.to_string()))
}

// ---------------------------------------------------------------------------------------------
// The run

async fn wait_ready(proxy: &mut Proxy, conninfo: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if !proxy.alive() {
            return Err(format!("the proxy exited:\n{}", proxy.log_tail()));
        }
        match login_and_query(conninfo, QueryKind::Simple).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("the proxy did not accept a login within 30 s: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn kib(v: u64) -> String {
    format!("{v} KiB ({:.1} MiB)", v as f64 / 1024.0)
}

async fn run(cluster: &LocalCluster, args: &Args, bin: &Path) -> Result<bool, String> {
    let dir = tempfile::Builder::new()
        .prefix("causeway-idle-")
        .tempdir_in(causeway::launcher::base_dir())
        .map_err(|e| format!("creating a temp dir: {e}"))?;
    let port = free_port()?;
    let mut proxy = start_proxy(bin, dir.path(), &proxy_config(cluster, args, port))?;
    let pid = proxy.pid();
    let conninfo = format!(
        "host=127.0.0.1 port={port} user={USER} password={PASSWORD} dbname={DATABASE} \
         application_name=idle_clients"
    );
    wait_ready(&mut proxy, &conninfo).await?;

    // Warm-up: pools, caches and per-thread allocator arenas exist before the baseline.
    let warm = open_clients(&conninfo, WARMUP_CLIENTS, WARMUP_CLIENTS, args.query).await?;
    drop(warm);
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let before = memory(pid)?;
    let mut before_backends = vec![backends(cluster, &cluster.primary)?.0];
    for r in &cluster.replicas {
        before_backends.push(backends(cluster, r)?.0);
    }

    eprintln!(
        "[idle_clients] proxy pid {pid} on 127.0.0.1:{port}; opening {} clients ({} at once)...",
        args.clients, args.concurrency
    );
    let t0 = Instant::now();
    let clients = open_clients(&conninfo, args.clients, args.concurrency, args.query).await;
    let login_secs = t0.elapsed().as_secs_f64();
    let clients = match clients {
        Ok(c) => c,
        Err(e) => {
            return Err(format!(
                "{e}\nproxy {} (log tail):\n{}",
                if proxy.alive() { "alive" } else { "exited" },
                proxy.log_tail()
            ));
        }
    };
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    if !proxy.alive() {
        return Err(format!("the proxy exited:\n{}", proxy.log_tail()));
    }
    let after = memory(pid)?;
    let hwm = status_kib(pid, "VmHWM")?;
    let threads = status_kib(pid, "Threads").unwrap_or(0);
    let mut servers = vec![(
        cluster.primary.name.clone(),
        backends(cluster, &cluster.primary)?,
    )];
    for r in &cluster.replicas {
        servers.push((r.name.clone(), backends(cluster, r)?));
    }
    let open = clients.iter().filter(|c| !c.is_closed()).count();

    // Every idle client must still be usable; ask a sample of them (after the measurements,
    // since their queries take backend connections for a moment).
    let mut usable = 0usize;
    let sample: Vec<&Client> = clients.iter().step_by((args.clients / 50).max(1)).collect();
    for c in &sample {
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(10), c.simple_query("SELECT 1")).await
        {
            usable += 1;
        }
    }

    let n = args.clients as f64;
    let per_rss = (after.rss as f64 - before.rss as f64) / n;
    let per_anon = (after.anon as f64 - before.anon as f64) / n;
    println!();
    println!(
        "== {} idle clients through causeway (separate process, transaction mode, auth {}, \
         query {}, pools {} per node, {} replica(s))",
        args.clients,
        match args.auth {
            Auth::Trust => "trust",
            Auth::Scram => "scram-sha-256",
        },
        match args.query {
            QueryKind::Simple => "simple `SELECT 1`",
            QueryKind::Prepared => "prepared `SELECT $1::int4 + 1`",
        },
        args.pool_size,
        cluster.replicas.len()
    );
    println!(
        "  logins          : {} in {login_secs:.1} s ({:.0}/s, {} at once); {open} still open, \
         {usable}/{} sampled answer a query afterwards",
        args.clients,
        n / login_secs,
        args.concurrency,
        sample.len()
    );
    println!(
        "  proxy RSS before: {} (anon {}), after {WARMUP_CLIENTS} warm-up clients came and went",
        kib(before.rss),
        kib(before.anon)
    );
    println!(
        "  proxy RSS after : {} (anon {}), with {} idle clients; peak (VmHWM) {}; {threads} threads",
        kib(after.rss),
        kib(after.anon),
        args.clients,
        kib(hwm)
    );
    println!("  per idle client : {per_rss:.1} KiB RSS ({per_anon:.1} KiB anonymous)");
    println!(
        "  backend connections of user {USER} (pg_stat_activity), before the clients → with {} \
         idle clients:",
        args.clients
    );
    for ((name, (total, detail)), before) in servers.iter().zip(&before_backends) {
        println!("    {name:<10} {before:>5} → {total:>5}   ({detail})");
    }
    let backends_total: u64 = servers.iter().map(|(_, (t, _))| t).sum();
    let backends_max = (args.pool_size + MONITOR_CONNECTIONS) * servers.len();
    let ok_mem = per_rss <= TARGET_KIB;
    let ok_backends = backends_total as usize <= backends_max;
    let ok_clients = open == args.clients && usable == sample.len();
    let verdict = |ok: bool| if ok { "HOLDS" } else { "FAILS" };
    println!();
    println!(
        "  target RSS per idle client ≤ {TARGET_KIB} KiB: {per_rss:.1} KiB → {}",
        verdict(ok_mem)
    );
    println!(
        "  target idle clients hold no backend connection: {backends_total} backend connection(s) \
         for {} clients (pool + monitor at most {backends_max}) → {}",
        args.clients,
        verdict(ok_backends)
    );
    println!(
        "  every client still connected and usable: {} → {}",
        if ok_clients { "yes" } else { "no" },
        verdict(ok_clients)
    );

    eprintln!("[idle_clients] closing clients and stopping the proxy...");
    drop(sample);
    drop(clients);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.stop();
    Ok(ok_mem && ok_backends && ok_clients)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.clients == 0 || args.pool_size == 0 || args.clients > 10_000 {
        eprintln!(
            "--clients must be 1..=10000 (the proxy's max_client_connections), --pool-size positive"
        );
        return ExitCode::from(2);
    }
    let bin = match args.causeway.clone().or_else(|| {
        let exe = std::env::current_exe().ok()?;
        Some(exe.parent()?.parent()?.join("causeway"))
    }) {
        Some(b) if b.is_file() => b,
        other => {
            eprintln!(
                "no causeway binary at {:?}; build it (cargo build --release --bin causeway) or \
                 pass --causeway",
                other
            );
            return ExitCode::from(2);
        }
    };
    let need = args.clients as u64 + FD_HEADROOM;
    match open_files_limit() {
        Some(limit) if limit >= need => {}
        limit => {
            eprintln!(
                "open-file limit {} is below {need} ({} clients + headroom); raise it with \
                 `ulimit -n {need}` (scripts/idle-clients does)",
                limit.map_or("unknown".to_string(), |l| l.to_string()),
                args.clients
            );
            return ExitCode::from(2);
        }
    }
    eprintln!(
        "[idle_clients] starting a primary and {} streaming replica(s)...",
        args.replicas
    );
    let cluster = match support::start_cluster(ClusterOptions {
        replicas: args.replicas,
        ..Default::default()
    }) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match support::runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let limit = Duration::from_secs(args.timeout);
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(limit, run(&cluster, &args, &bin)) => {
                Some(r.unwrap_or_else(|_| Err(format!("gave up after {} s (--timeout)", args.timeout))))
            }
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    // Dropping `run` early (timeout, ^C) dropped the Proxy too, which stopped the process.
    runtime.shutdown_timeout(Duration::from_secs(2));
    eprintln!("[idle_clients] stopping the cluster...");
    cluster.stop();
    support::exit_code(outcome, "idle_clients", true)
}
