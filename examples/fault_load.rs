//! Fault-injection benchmark: point reads (and one writer) through an in-process proxy while
//! servers of a local cluster are killed and started again, in fixed-length phases.
//!
//! One local cluster (a primary and two streaming replicas) holds the pgbench tables
//! (`pgbench -i -s <scale>`, as `app`). An in-process proxy with fast health checks
//! (`health_check_interval_ms = 200`, `health_check_timeout_ms = 1000`,
//! `connect_timeout_ms = 2000`) fronts it. For the whole run:
//!
//! * `--readers` tokio-postgres sessions loop `SELECT abalance FROM pgbench_accounts WHERE
//!   aid = $1` (random aid; `--protocol extended` prepares it once per connection, `simple`
//!   sends literal SQL). Every failed statement is counted with its SQLSTATE and whether any row
//!   had arrived before the error; a session whose connection broke reconnects after a short
//!   pause and keeps going.
//! * one writer session loops `UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid =
//!   $1`; its errors are counted apart (expected while the primary is down).
//! * in each phase, a real `pgbench -n -S -c 8 -j 2 -T <phase>` through the proxy (pgbench 15
//!   aborts a client on an error it cannot retry, so its aborted clients are reported).
//! * just before replica1 is killed, `--inflight` sessions (half simple, half extended protocol)
//!   each start one `SELECT pg_sleep(2)`, so some reads are mid-execution on replica1 when it
//!   dies: none has produced a row, so each should be re-run elsewhere rather than fail.
//!
//! Phases, `--phase-seconds` each: baseline; replica1 killed (`pg_ctl stop -m immediate` at the
//! start); replica1 back (started again; the proxy re-admits it after a health check); primary
//! killed (immediate); primary back. Each statement counts in the phase during which it
//! finished. Per phase it prints the statements, failures by SQLSTATE, failures before the
//! first row, slow statements, reads per node (the proxy's counters), reads the proxy re-ran, the
//! writer, pgbench, the proxy's bans, and how late a 10 ms timer fired in this process (to tell
//! a stalled process from stalled servers); then a table, and the target: no failed statement
//! that had not started streaming (point reads and long reads) while a replica dies.
//!
//! ```sh
//! cargo run --release --example fault_load -- --phase-seconds 5
//! ```
//!
//! Everything runs on 127.0.0.1, is bounded in time (`--timeout-seconds`), and the cluster is
//! removed at the end, on error too.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use causeway::config::Config;
use causeway::launcher::{ClusterOptions, LocalCluster, NodeInfo, PG_ENV, StopMode};
use causeway::server::{self, Running, Shared};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};
use tokio_util::sync::CancellationToken;

const USER: &str = "app";
const PASSWORD: &str = "app-secret";
const DATABASE: &str = "app";
const READ: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
const UPDATE: &str = "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = $1";
/// pgbench_accounts rows per unit of scale.
const ROWS_PER_SCALE: i64 = 100_000;
/// Longest time one statement may take before it counts as hung (and its connection is
/// dropped).
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failure before the next statement or connection attempt.
const PAUSE: Duration = Duration::from_millis(100);
/// A statement slower than this counts as slow.
const SLOW: Duration = Duration::from_secs(1);
/// How often the node watcher samples the proxy's view of each node.
const WATCH_EVERY: Duration = Duration::from_millis(20);
/// Period of the runtime-lag probe: how late a timer of this length fires shows stalls of the
/// process itself (CPU starvation, blocking calls on the runtime), as opposed to the servers'.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// Slow statements listed per phase and kind of client.
const SLOW_KEPT: usize = 8;
/// Distinct messages kept per SQLSTATE, and slow statements kept, per phase and kind of client.
const KEEP: usize = 3;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Bounded fault-injection benchmark: reads through the proxy while servers die",
    args_override_self = true
)]
struct Args {
    /// Seconds per phase.
    #[arg(long, default_value_t = 5)]
    phase_seconds: u64,
    /// tokio-postgres sessions looping point reads.
    #[arg(long, default_value_t = 8)]
    readers: usize,
    /// Protocol of the readers' point reads.
    #[arg(long, value_enum, default_value = "extended")]
    protocol: Protocol,
    /// Sessions (half simple, half extended protocol) that start a long read
    /// (`SELECT pg_sleep(..)`) just before replica1 is killed, so some are mid-execution on it.
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    /// How long those reads sleep, in ms; replica1 is killed `inflight_lead_ms` after they start.
    #[arg(long, default_value_t = 2000)]
    inflight_sleep_ms: u64,
    #[arg(long, default_value_t = 300)]
    inflight_lead_ms: u64,
    /// pgbench -c (clients) per phase; 0 = no pgbench.
    #[arg(long, default_value_t = 8)]
    pgbench_clients: usize,
    /// pgbench -j (threads).
    #[arg(long, default_value_t = 2)]
    pgbench_threads: usize,
    /// pgbench -i -s (scale): 100 000 accounts per unit.
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// The pgbench binary.
    #[arg(long, default_value = "pgbench")]
    pgbench: String,
    /// Bound on everything after the cluster is up (pgbench -i, phases, clean-up).
    #[arg(long)]
    timeout_seconds: Option<u64>,
    /// Exit with status 1 when a target does not hold.
    #[arg(long)]
    strict: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    Simple,
    Extended,
}

/// What happens at the start of a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    None,
    KillReplica1,
    StartReplica1,
    KillPrimary,
    StartPrimary,
}

const PHASES: [(&str, Action); 5] = [
    ("baseline", Action::None),
    ("replica1 killed", Action::KillReplica1),
    ("replica1 back", Action::StartReplica1),
    ("primary killed", Action::KillPrimary),
    ("primary back", Action::StartPrimary),
];
/// Phase indexes the summary refers to.
const REPLICA_KILLED: usize = 1;
const REPLICA_BACK: usize = 2;
const PRIMARY_KILLED: usize = 3;
const PRIMARY_BACK: usize = 4;
/// Slot for statements finishing after the last phase (not reported).
const AFTER: usize = PHASES.len();

// ---------------------------------------------------------------------------------------------
// Measurements

/// Which phase is running and when each began, shared by every client.
struct Recorder {
    epoch: Instant,
    phase: AtomicUsize,
    /// Start of each phase, in µs since `epoch`.
    starts_us: Vec<AtomicU64>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            phase: AtomicUsize::new(0),
            starts_us: (0..=AFTER).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn begin(&self, phase: usize) {
        self.starts_us[phase].store(self.now_us(), Ordering::Release);
        self.phase.store(phase, Ordering::Release);
    }

    /// The current phase and the ms since it began.
    fn at(&self) -> (usize, u64) {
        let phase = self.phase.load(Ordering::Acquire);
        let start = self.starts_us[phase].load(Ordering::Acquire);
        (phase, self.now_us().saturating_sub(start) / 1000)
    }

    fn tallies(&self) -> Vec<Tally> {
        (0..=AFTER).map(|_| Tally::default()).collect()
    }
}

/// One kind of client's statements within one phase.
#[derive(Default, Clone)]
struct Tally {
    ok: u64,
    /// Failed statements by SQLSTATE (or kind, without one).
    failed: BTreeMap<String, Failures>,
    failed_before_row: u64,
    /// Statements with no answer within OP_TIMEOUT (also in `failed`).
    hung: u64,
    /// Statements that succeeded without the expected single row (reads) or row count.
    wrong: u64,
    /// Failed connection attempts by SQLSTATE (or kind).
    connect_failed: BTreeMap<String, Failures>,
    reconnects: u64,
    max_us: u64,
    slow: u64,
    /// The first slow statements: (ms into the phase when it ended, how long it took in ms).
    slow_seen: Vec<(u64, u64)>,
    /// ms into the phase of the first success and of the last failure.
    first_ok_ms: Option<u64>,
    last_fail_ms: Option<u64>,
}

impl Tally {
    fn merge(&mut self, o: &Tally) {
        self.ok += o.ok;
        merge_map(&mut self.failed, &o.failed);
        merge_map(&mut self.connect_failed, &o.connect_failed);
        self.failed_before_row += o.failed_before_row;
        self.hung += o.hung;
        self.wrong += o.wrong;
        self.reconnects += o.reconnects;
        self.max_us = self.max_us.max(o.max_us);
        self.slow += o.slow;
        self.slow_seen.extend(&o.slow_seen);
        self.slow_seen.sort_unstable();
        self.slow_seen.truncate(SLOW_KEPT);
        self.first_ok_ms = min_opt(self.first_ok_ms, o.first_ok_ms);
        self.last_fail_ms = self.last_fail_ms.max(o.last_fail_ms);
    }

    fn failures(&self) -> u64 {
        self.failed.values().map(|f| f.count).sum()
    }

    fn ok(&mut self, at_ms: u64, took: Duration) {
        self.ok += 1;
        self.first_ok_ms = min_opt(self.first_ok_ms, Some(at_ms));
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.max_us = self.max_us.max(us);
        if took > SLOW {
            self.slow += 1;
            if self.slow_seen.len() < SLOW_KEPT {
                self.slow_seen.push((at_ms, us / 1000));
            }
        }
    }

    fn fail(&mut self, at_ms: u64, key: String, msg: String, before_row: bool) {
        self.failed.entry(key).or_default().add(msg, 1);
        self.failed_before_row += u64::from(before_row);
        self.last_fail_ms = self.last_fail_ms.max(Some(at_ms));
    }

    fn connect_fail(&mut self, at_ms: u64, key: String, msg: String) {
        self.connect_failed.entry(key).or_default().add(msg, 1);
        self.last_fail_ms = self.last_fail_ms.max(Some(at_ms));
    }
}

/// Failures of one SQLSTATE: how many, and the first few distinct messages with their counts.
#[derive(Default, Clone)]
struct Failures {
    count: u64,
    messages: Vec<(String, u64)>,
    /// Failures whose message was not kept.
    other: u64,
}

impl Failures {
    fn add(&mut self, msg: String, n: u64) {
        self.count += n;
        if let Some(m) = self.messages.iter_mut().find(|(m, _)| *m == msg) {
            m.1 += n;
        } else if self.messages.len() < KEEP {
            self.messages.push((msg, n));
        } else {
            self.other += n;
        }
    }
}

fn merge_map(into: &mut BTreeMap<String, Failures>, from: &BTreeMap<String, Failures>) {
    for (k, f) in from {
        let e = into.entry(k.clone()).or_default();
        for (msg, n) in &f.messages {
            e.add(msg.clone(), *n);
        }
        e.count += f.other;
        e.other += f.other;
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// SQLSTATE of an error, or its kind when it has none; and a one-line message.
fn classify(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(db) => (
            db.code().code().to_string(),
            format!("{}: {}", db.severity(), db.message()),
        ),
        None => {
            let text = e.to_string();
            let kind = if text.starts_with("connection closed") {
                "no SQLSTATE: closed"
            } else if text.starts_with("error communicating") {
                "no SQLSTATE: io"
            } else if text.starts_with("error connecting") {
                "no SQLSTATE: connect"
            } else if text.starts_with("timeout") {
                "no SQLSTATE: timeout"
            } else {
                "no SQLSTATE: other"
            };
            (kind.to_string(), text)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// A client of the proxy with its statement prepared (extended protocol) or not (simple).
struct Conn {
    client: Client,
    stmt: Option<Statement>,
}

async fn open(conninfo: &str, prepare: Option<&str>) -> Result<Conn, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let stmt = match prepare {
        Some(sql) => Some(client.prepare(sql).await?),
        None => None,
    };
    Ok(Conn { client, stmt })
}

/// Runs one point read; Ok(rows) or the error with the rows that had arrived before it.
async fn point_read(c: &Conn, aid: i32) -> Result<usize, (tokio_postgres::Error, usize)> {
    let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid}");
    fetch(c, &sql, &[aid]).await
}

/// Runs the prepared statement with `params`, or `sql` in the simple protocol; Ok(rows) or
/// the error with the rows that had arrived before it.
async fn fetch(
    c: &Conn,
    sql: &str,
    params: &[i32],
) -> Result<usize, (tokio_postgres::Error, usize)> {
    let mut rows = 0;
    match &c.stmt {
        Some(stmt) => {
            let stream = c
                .client
                .query_raw(stmt, params.iter())
                .await
                .map_err(|e| (e, 0))?;
            let mut stream = std::pin::pin!(stream);
            while let Some(r) = stream.next().await {
                r.map_err(|e| (e, rows))?;
                rows += 1;
            }
        }
        None => {
            let stream = c.client.simple_query_raw(sql).await.map_err(|e| (e, 0))?;
            let mut stream = std::pin::pin!(stream);
            while let Some(m) = stream.next().await {
                if let SimpleQueryMessage::Row(_) = m.map_err(|e| (e, rows))? {
                    rows += 1;
                }
            }
        }
    }
    Ok(rows)
}

async fn write_one(c: &Conn, aid: i32) -> Result<usize, (tokio_postgres::Error, usize)> {
    let Some(stmt) = &c.stmt else { return Ok(0) };
    let n = c.client.execute(stmt, &[&aid]).await.map_err(|e| (e, 0))?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// One long read started just before the replica kill; its tally goes to that phase.
async fn long_read(c: Conn, sql: String, rec: Arc<Recorder>) -> Tally {
    let mut t = Tally::default();
    let t0 = Instant::now();
    let r = tokio::time::timeout(OP_TIMEOUT, fetch(&c, &sql, &[])).await;
    let (_, at) = rec.at();
    match r {
        Ok(Ok(rows)) => {
            t.ok(at, t0.elapsed());
            t.wrong += u64::from(rows != 1);
        }
        Ok(Err((e, rows))) => {
            let (key, msg) = classify(&e);
            t.fail(at, key, msg, rows == 0);
        }
        Err(_) => {
            t.hung += 1;
            t.fail(
                at,
                "hung".into(),
                format!("no answer within {OP_TIMEOUT:?}"),
                true,
            );
        }
    }
    t
}

#[derive(Clone, Copy)]
enum Role {
    Reader(Protocol),
    Writer,
}

/// Loops statements until `stop`; returns a tally per phase.
async fn client_loop(
    role: Role,
    conninfo: String,
    rec: Arc<Recorder>,
    stop: CancellationToken,
    max_aid: i32,
    seed: u64,
    first: Conn,
) -> Vec<Tally> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut tallies = rec.tallies();
    let prepare = match role {
        Role::Reader(Protocol::Simple) => None,
        Role::Reader(Protocol::Extended) => Some(READ),
        Role::Writer => Some(UPDATE),
    };
    let mut conn = Some(first);
    let pause = async |stop: &CancellationToken| {
        tokio::select! {
            _ = tokio::time::sleep(PAUSE) => {}
            _ = stop.cancelled() => {}
        }
    };
    while !stop.is_cancelled() {
        let c = match conn.take() {
            Some(c) => c,
            None => {
                let r = tokio::select! {
                    r = tokio::time::timeout(OP_TIMEOUT, open(&conninfo, prepare)) => r,
                    _ = stop.cancelled() => break,
                };
                let (phase, at) = rec.at();
                match r {
                    Ok(Ok(c)) => {
                        tallies[phase].reconnects += 1;
                        c
                    }
                    Ok(Err(e)) => {
                        let (key, msg) = classify(&e);
                        tallies[phase].connect_fail(at, key, msg);
                        pause(&stop).await;
                        continue;
                    }
                    Err(_) => {
                        let msg = format!("no answer within {OP_TIMEOUT:?}");
                        tallies[phase].connect_fail(at, "hung".into(), msg);
                        continue;
                    }
                }
            }
        };
        let aid = rng.random_range(1..=max_aid);
        let t0 = Instant::now();
        let op = async {
            match role {
                Role::Reader(_) => point_read(&c, aid).await,
                Role::Writer => write_one(&c, aid).await,
            }
        };
        let r = tokio::select! {
            r = tokio::time::timeout(OP_TIMEOUT, op) => r,
            _ = stop.cancelled() => break,
        };
        let took = t0.elapsed();
        let (phase, at) = rec.at();
        let t = &mut tallies[phase];
        match r {
            Ok(Ok(rows)) => {
                t.ok(at, took);
                t.wrong += u64::from(rows != 1);
                conn = Some(c);
            }
            Ok(Err((e, rows))) => {
                let (key, msg) = classify(&e);
                t.fail(at, key, msg, rows == 0);
                if !c.client.is_closed() {
                    conn = Some(c);
                }
                pause(&stop).await;
            }
            Err(_) => {
                t.hung += 1;
                let msg = format!("no answer within {OP_TIMEOUT:?}");
                t.fail(at, "hung".into(), msg, true);
            }
        }
    }
    tallies
}

// ---------------------------------------------------------------------------------------------
// pgbench

#[derive(Default)]
struct PgbenchRun {
    tps: Option<f64>,
    transactions: Option<u64>,
    failed_transactions: Option<u64>,
    aborted: u64,
    status: String,
    first_error: Option<String>,
}

fn pgbench_command(args: &Args) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&args.pgbench);
    for var in PG_ENV {
        cmd.env_remove(var);
    }
    cmd.env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "5");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn first_number<T: std::str::FromStr>(text: &str) -> Option<T> {
    let s = text.trim_start();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    s[..end].parse().ok()
}

fn parse_pgbench(status: std::process::ExitStatus, stdout: &str, stderr: &str) -> PgbenchRun {
    let mut run = PgbenchRun {
        status: status.to_string(),
        ..Default::default()
    };
    for line in stdout.lines() {
        if let Some(v) = line.strip_prefix("number of transactions actually processed:") {
            run.transactions = first_number(v);
        } else if let Some(v) = line.strip_prefix("number of failed transactions:") {
            run.failed_transactions = first_number(v);
        } else if let Some(v) = line.strip_prefix("tps =") {
            run.tps = first_number(v);
        }
    }
    for line in stderr.lines() {
        if line.contains("client ") && line.contains(" aborted") {
            run.aborted += 1;
        }
        if run.first_error.is_none() && (line.contains("error") || line.contains("fatal")) {
            run.first_error = Some(line.trim().to_string());
        }
    }
    run
}

/// `pgbench -n -S` through the proxy for `secs`.
async fn pgbench_select(args: Args, port: u16, secs: u64) -> PgbenchRun {
    let mut cmd = pgbench_command(&args);
    cmd.args(["-n", "-S", "-h", "127.0.0.1", "-p", &port.to_string()]);
    cmd.args(["-c", &args.pgbench_clients.to_string()]);
    cmd.args(["-j", &args.pgbench_threads.to_string()]);
    cmd.args(["-T", &secs.to_string(), "-U", USER, DATABASE]);
    let bound = Duration::from_secs(secs + 60);
    match tokio::time::timeout(bound, cmd.output()).await {
        Err(_) => PgbenchRun {
            status: format!("killed: still running after {bound:?}"),
            ..Default::default()
        },
        Ok(Err(e)) => PgbenchRun {
            status: format!("cannot run {}: {e}", args.pgbench),
            ..Default::default()
        },
        Ok(Ok(out)) => parse_pgbench(
            out.status,
            &String::from_utf8_lossy(&out.stdout),
            &String::from_utf8_lossy(&out.stderr),
        ),
    }
}

/// `pgbench -i -s <scale>` as the app user, directly on the primary.
async fn pgbench_init(args: &Args, primary: &NodeInfo) -> Result<(), String> {
    let mut cmd = pgbench_command(args);
    cmd.args(["-i", "-q", "-s", &args.scale.to_string()]);
    cmd.args(["-h", &primary.host, "-p", &primary.port.to_string()]);
    cmd.args(["-U", USER, DATABASE]);
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .map_err(|_| "pgbench -i still running after 600 s".to_string())?
        .map_err(|e| format!("cannot run {}: {e}", args.pgbench))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "pgbench -i failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy's view

/// A change in whether the proxy sends work to a node.
struct NodeEvent {
    phase: usize,
    at_ms: u64,
    node: String,
    usable: bool,
    reason: Option<String>,
}

/// Samples every node's usability until `stop`.
async fn watch_nodes(
    shared: Arc<Shared>,
    rec: Arc<Recorder>,
    stop: CancellationToken,
) -> Vec<NodeEvent> {
    let mut last: BTreeMap<String, bool> = shared
        .cluster
        .nodes()
        .iter()
        .map(|n| (n.name.clone(), n.is_usable()))
        .collect();
    let mut events = Vec::new();
    let mut tick = tokio::time::interval(WATCH_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return events,
        }
        for n in shared.cluster.nodes() {
            let usable = n.is_usable();
            if last.insert(n.name.clone(), usable) != Some(usable) {
                let (phase, at_ms) = rec.at();
                events.push(NodeEvent {
                    phase,
                    at_ms,
                    node: n.name.clone(),
                    usable,
                    reason: n.ban_reason(),
                });
            }
        }
    }
}

/// Worst lateness of a PROBE_EVERY timer per phase, in ms, until `stop`.
async fn probe_lag(rec: Arc<Recorder>, stop: CancellationToken) -> Vec<u64> {
    let mut worst = vec![0; AFTER + 1];
    loop {
        let t0 = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = stop.cancelled() => return worst,
        }
        let late = t0.elapsed().saturating_sub(PROBE_EVERY);
        let (phase, _) = rec.at();
        let ms = u64::try_from(late.as_millis()).unwrap_or(u64::MAX);
        worst[phase] = worst[phase].max(ms);
    }
}

/// (name, reads, writes) per node, from the proxy's counters.
fn node_counters(running: &Running) -> Vec<(String, u64, u64)> {
    running
        .shared
        .cluster
        .nodes()
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                n.reads.load(Ordering::Relaxed),
                n.writes.load(Ordering::Relaxed),
            )
        })
        .collect()
}

fn proxy_config(cluster: &LocalCluster) -> Result<Config, String> {
    let text = causeway::demo::config_for(cluster, "127.0.0.1:0");
    let mut table: toml::Table = text.parse().map_err(|e| format!("demo config: {e}"))?;
    let server = table
        .entry("server")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(server) = server.as_table_mut() else {
        return Err("demo config: [server] is not a table".into());
    };
    for (key, ms) in [
        ("health_check_interval_ms", 200),
        ("health_check_timeout_ms", 1000),
        ("connect_timeout_ms", 2000),
    ] {
        server.insert(key.into(), toml::Value::Integer(ms));
    }
    let text = toml::to_string(&table).map_err(|e| format!("proxy configuration: {e}"))?;
    Config::from_toml(&text).map_err(|e| format!("proxy configuration: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Phases

/// What one phase measured.
struct PhaseResult {
    name: &'static str,
    seconds: f64,
    action: Option<(String, u64)>,
    readers: Tally,
    writer: Tally,
    /// Long reads in flight when the phase's action ran (replica kill only), per protocol.
    inflight: Vec<(Protocol, Tally)>,
    /// (node, reads, writes) during the phase.
    nodes: Vec<(String, u64, u64)>,
    /// Nodes banned at the end of the phase, with the reason.
    banned_at_end: Vec<(String, String)>,
    /// Reads the proxy re-ran elsewhere after a backend failed.
    retried_reads: u64,
    /// Worst lateness of a 10 ms timer in this process (proxy and clients share it).
    runtime_lag_ms: u64,
    pgbench: Option<PgbenchRun>,
}

fn do_action(cluster: &LocalCluster, action: Action) -> Option<(String, Result<(), String>)> {
    let replica1 = &cluster.replicas[0];
    let primary = &cluster.primary;
    let (what, r) = match action {
        Action::None => return None,
        Action::KillReplica1 => (
            "pg_ctl stop -m immediate replica1",
            cluster.stop_node(replica1, StopMode::Immediate),
        ),
        Action::StartReplica1 => ("pg_ctl start replica1", cluster.start_node(replica1)),
        Action::KillPrimary => (
            "pg_ctl stop -m immediate primary",
            cluster.stop_node(primary, StopMode::Immediate),
        ),
        Action::StartPrimary => ("pg_ctl start primary", cluster.start_node(primary)),
    };
    Some((what.to_string(), r.map_err(|e| e.to_string())))
}

/// Everything measured by a run.
struct Outcome {
    phases: Vec<PhaseResult>,
    events: Vec<NodeEvent>,
}

async fn run_all(cluster: &LocalCluster, args: &Args) -> Result<Outcome, String> {
    let t = Instant::now();
    pgbench_init(args, &cluster.primary).await?;
    tokio::task::block_in_place(|| cluster.wait_replicas_caught_up(Duration::from_secs(120)))
        .map_err(|e| format!("replicas did not catch up: {e}"))?;
    println!(
        "pgbench -i -s {} on the primary, replicas caught up: {:.1} s",
        args.scale,
        t.elapsed().as_secs_f64()
    );
    let cfg = proxy_config(cluster)?;
    let running = server::start(Arc::new(cfg))
        .await
        .map_err(|e| format!("cannot start the proxy: {e}"))?;
    let port = running.addr.port();
    println!(
        "proxy: {} (health_check_interval_ms 200, health_check_timeout_ms 1000, \
         connect_timeout_ms 2000, everything else as config_for)",
        running.addr
    );
    let conninfo = format!(
        "host=127.0.0.1 port={port} user={USER} password={PASSWORD} dbname={DATABASE} \
         connect_timeout=5"
    );
    let max_aid = i32::try_from(i64::from(args.scale) * ROWS_PER_SCALE)
        .map_err(|_| "scale too large".to_string())?;
    let read_prepare = (args.protocol == Protocol::Extended).then_some(READ);
    let rec = Arc::new(Recorder::new());
    let stop = CancellationToken::new();
    // Connect everyone first, so the baseline starts with the whole load running.
    let mut clients = Vec::new();
    for i in 0..args.readers {
        let c = open(&conninfo, read_prepare)
            .await
            .map_err(|e| format!("reader {i} cannot connect: {}", classify(&e).1))?;
        clients.push((Role::Reader(args.protocol), c));
    }
    let w = open(&conninfo, Some(UPDATE))
        .await
        .map_err(|e| format!("writer cannot connect: {}", classify(&e).1))?;
    clients.push((Role::Writer, w));
    let sleep_sql = format!(
        "SELECT pg_sleep({:.3})",
        args.inflight_sleep_ms as f64 / 1000.0
    );
    let mut sleepers = Vec::new();
    for i in 0..args.inflight {
        let protocol = if i % 2 == 0 {
            Protocol::Simple
        } else {
            Protocol::Extended
        };
        let prepare = (protocol == Protocol::Extended).then_some(sleep_sql.as_str());
        let c = open(&conninfo, prepare)
            .await
            .map_err(|e| format!("long reader {i} cannot connect: {}", classify(&e).1))?;
        sleepers.push((protocol, c));
    }
    let watcher = tokio::spawn(watch_nodes(
        Arc::clone(&running.shared),
        Arc::clone(&rec),
        stop.clone(),
    ));
    let lag = tokio::spawn(probe_lag(Arc::clone(&rec), stop.clone()));
    rec.begin(0);
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, (role, c))| {
            let is_writer = matches!(role, Role::Writer);
            let task = tokio::spawn(client_loop(
                role,
                conninfo.clone(),
                Arc::clone(&rec),
                stop.clone(),
                max_aid,
                0x5eed_0000 + i as u64,
                c,
            ));
            (is_writer, task)
        })
        .collect();

    let mut phases = Vec::new();
    let mut before = node_counters(&running);
    let retried = || running.shared.stats.retried_reads.load(Ordering::Relaxed);
    let mut retried_before = retried();
    let mut failure = None;
    for (i, &(name, action)) in PHASES.iter().enumerate() {
        eprintln!(
            "[{}] phase {}/{}: {name}",
            support::clock(),
            i + 1,
            PHASES.len()
        );
        let start = Instant::now();
        rec.begin(i);
        let pgbench = (args.pgbench_clients > 0)
            .then(|| tokio::spawn(pgbench_select(args.clone(), port, args.phase_seconds)));
        let mut long_reads = Vec::new();
        if action == Action::KillReplica1 && !sleepers.is_empty() {
            for (protocol, c) in sleepers.drain(..) {
                let rec = Arc::clone(&rec);
                let h = tokio::spawn(long_read(c, sleep_sql.clone(), rec));
                long_reads.push((protocol, h));
            }
            tokio::time::sleep(Duration::from_millis(args.inflight_lead_ms)).await;
        }
        let action = tokio::task::block_in_place(|| do_action(cluster, action));
        let action = match action {
            None => None,
            Some((what, Ok(()))) => Some((what, elapsed_ms(start))),
            Some((what, Err(e))) => {
                failure = Some(format!("{what} failed: {e}"));
                Some((what, elapsed_ms(start)))
            }
        };
        tokio::time::sleep_until((start + Duration::from_secs(args.phase_seconds)).into()).await;
        let pgbench = match pgbench {
            Some(h) => Some(h.await.unwrap_or_else(|e| PgbenchRun {
                status: format!("pgbench task failed: {e}"),
                ..Default::default()
            })),
            None => None,
        };
        let mut inflight: Vec<(Protocol, Tally)> = Vec::new();
        for (protocol, h) in long_reads {
            let t = h.await.unwrap_or_default();
            match inflight.iter_mut().find(|(p, _)| *p == protocol) {
                Some((_, into)) => into.merge(&t),
                None => inflight.push((protocol, t)),
            }
        }
        let after = node_counters(&running);
        let nodes = after
            .iter()
            .map(|(n, r, w)| {
                let (r0, w0) = before
                    .iter()
                    .find(|(b, _, _)| b == n)
                    .map_or((0, 0), |(_, r0, w0)| (*r0, *w0));
                (n.clone(), r - r0, w - w0)
            })
            .collect();
        before = after;
        let retried_reads = retried() - retried_before;
        retried_before += retried_reads;
        let banned_at_end = running
            .shared
            .cluster
            .nodes()
            .iter()
            .filter(|n| !n.is_usable())
            .map(|n| (n.name.clone(), n.ban_reason().unwrap_or_default()))
            .collect();
        phases.push(PhaseResult {
            name,
            seconds: start.elapsed().as_secs_f64(),
            action,
            readers: Tally::default(),
            writer: Tally::default(),
            inflight,
            nodes,
            banned_at_end,
            retried_reads,
            runtime_lag_ms: 0,
            pgbench,
        });
        if failure.is_some() {
            break;
        }
    }
    rec.begin(AFTER);
    stop.cancel();
    for (is_writer, task) in tasks {
        let tallies = tokio::time::timeout(OP_TIMEOUT + Duration::from_secs(5), task)
            .await
            .map_err(|_| "a client did not stop".to_string())?
            .map_err(|e| format!("a client task failed: {e}"))?;
        for (p, t) in phases.iter_mut().zip(&tallies) {
            if is_writer {
                p.writer.merge(t);
            } else {
                p.readers.merge(t);
            }
        }
    }
    let events = watcher.await.unwrap_or_default();
    let lag = lag.await.unwrap_or_default();
    for (p, ms) in phases.iter_mut().zip(lag) {
        p.runtime_lag_ms = ms;
    }
    if tokio::time::timeout(Duration::from_secs(10), running.stop())
        .await
        .is_err()
    {
        eprintln!("the proxy did not stop within 10 s");
    }
    match failure {
        Some(e) => {
            print_phases(&phases, &events, args);
            Err(e)
        }
        None => Ok(Outcome { phases, events }),
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Report

fn failures_line(map: &BTreeMap<String, Failures>) -> String {
    let mut s = String::new();
    for (k, f) in map {
        let _ = write!(s, "\n      {k} ×{}:", f.count);
        for (msg, n) in &f.messages {
            let _ = write!(s, "\n        ×{n} {msg}");
        }
        if f.other > 0 {
            let _ = write!(s, "\n        ×{} other messages", f.other);
        }
    }
    s
}

fn ms_opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| format!("{v} ms"))
}

fn print_tally(label: &str, t: &Tally) {
    println!(
        "  {label:<8}: ok {:>7}, failed {:>4} (before first row {}), hung {}, wrong result {}, \
         reconnects {}, slow (> {SLOW:?}) {}, max {:.1} ms; first ok at {}, last failure at {}",
        t.ok,
        t.failures(),
        t.failed_before_row,
        t.hung,
        t.wrong,
        t.reconnects,
        t.slow,
        t.max_us as f64 / 1000.0,
        ms_opt(t.first_ok_ms),
        ms_opt(t.last_fail_ms)
    );
    if !t.failed.is_empty() {
        println!("    failed by SQLSTATE:{}", failures_line(&t.failed));
    }
    if !t.slow_seen.is_empty() {
        let v: Vec<String> = t
            .slow_seen
            .iter()
            .map(|(at, took)| format!("{took} ms ending at {at} ms"))
            .collect();
        println!("    slow statements: {}", v.join(", "));
    }
    if !t.connect_failed.is_empty() {
        println!(
            "    failed connection attempts:{}",
            failures_line(&t.connect_failed)
        );
    }
}

fn print_phases(phases: &[PhaseResult], events: &[NodeEvent], args: &Args) {
    for (i, p) in phases.iter().enumerate() {
        println!();
        println!(
            "== phase {}/{}: {} ({:.1} s){}",
            i + 1,
            PHASES.len(),
            p.name,
            p.seconds,
            p.action
                .as_ref()
                .map(|(what, ms)| format!("; {what} returned after {ms} ms"))
                .unwrap_or_default()
        );
        print_tally("readers", &p.readers);
        print_tally("writer", &p.writer);
        if !p.inflight.is_empty() {
            println!(
                "  long reads in flight: {} sessions each run `SELECT pg_sleep({:.1})` once, \
                 started {} ms before the action (one re-run elsewhere ends about {} ms after \
                 they start)",
                args.inflight,
                args.inflight_sleep_ms as f64 / 1000.0,
                args.inflight_lead_ms,
                args.inflight_sleep_ms + args.inflight_lead_ms
            );
        }
        for (protocol, t) in &p.inflight {
            let label = match protocol {
                Protocol::Simple => "long/smp",
                Protocol::Extended => "long/ext",
            };
            print_tally(label, t);
        }
        let nodes: Vec<String> = p
            .nodes
            .iter()
            .map(|(n, r, w)| {
                if *w > 0 {
                    format!("{n} {r} (+{w} writes)")
                } else {
                    format!("{n} {r}")
                }
            })
            .collect();
        println!(
            "  reads per node (proxy counters, pgbench included): {}; reads re-run by the proxy \
             after a backend failed: {}",
            nodes.join(", "),
            p.retried_reads
        );
        println!(
            "  runtime lag (worst lateness of a {PROBE_EVERY:?} timer in this process): {} ms",
            p.runtime_lag_ms
        );
        for e in events.iter().filter(|e| e.phase == i) {
            println!(
                "  proxy: {} {} at {} ms{}",
                e.node,
                if e.usable { "usable again" } else { "banned" },
                e.at_ms,
                e.reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
        if !p.banned_at_end.is_empty() {
            let b: Vec<String> = p
                .banned_at_end
                .iter()
                .map(|(n, r)| format!("{n} ({r})"))
                .collect();
            println!("  banned at the end of the phase: {}", b.join(", "));
        }
        if let Some(pg) = &p.pgbench {
            println!(
                "  pgbench -n -S -c {} -j {} -T {}: tps {}, transactions {}, failed {}, \
                 clients aborted {}, {}{}",
                args.pgbench_clients,
                args.pgbench_threads,
                args.phase_seconds,
                pg.tps.map_or("-".into(), |v| format!("{v:.1}")),
                pg.transactions.map_or("-".into(), |v| v.to_string()),
                pg.failed_transactions.map_or("-".into(), |v| v.to_string()),
                pg.aborted,
                pg.status,
                pg.first_error
                    .as_ref()
                    .map(|e| format!("\n    first error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
}

fn print_table(phases: &[PhaseResult]) {
    println!();
    let names: Vec<&str> = phases
        .first()
        .map(|p| p.nodes.iter().map(|(n, _, _)| n.as_str()).collect())
        .unwrap_or_default();
    let mut head = format!(
        "{:<16} {:>5} {:>8} {:>6} {:>7} {:>6}",
        "phase", "secs", "reads ok", "failed", "<1strow", "max ms"
    );
    for n in &names {
        let _ = write!(head, " {n:>9}");
    }
    let _ = write!(
        head,
        " {:>9} {:>7} {:>8} {:>7}",
        "writes ok", "w.fail", "pgb tps", "aborted"
    );
    println!("{head}");
    for p in phases {
        let mut line = format!(
            "{:<16} {:>5.1} {:>8} {:>6} {:>7} {:>6.0}",
            p.name,
            p.seconds,
            p.readers.ok,
            p.readers.failures(),
            p.readers.failed_before_row,
            p.readers.max_us as f64 / 1000.0
        );
        for (_, r, _) in &p.nodes {
            let _ = write!(line, " {r:>9}");
        }
        let (tps, aborted) = match &p.pgbench {
            Some(pg) => (
                pg.tps.map_or("-".into(), |v| format!("{v:.0}")),
                pg.aborted.to_string(),
            ),
            None => ("-".into(), "-".into()),
        };
        let _ = write!(
            line,
            " {:>9} {:>7} {tps:>8} {aborted:>7}",
            p.writer.ok,
            p.writer.failures()
        );
        println!("{line}");
    }
    println!(
        "(reads per node: the proxy's counters, pgbench's reads included; <1strow: failed \
         before any row arrived)"
    );
}

/// Prints the targets; returns whether they hold.
fn print_summary(out: &Outcome) -> bool {
    let p = &out.phases;
    let kill = &p[REPLICA_KILLED];
    let mut long = Tally::default();
    for (_, t) in &kill.inflight {
        long.merge(t);
    }
    let n = kill.readers.failed_before_row + long.failed_before_row;
    let aborted = |i: usize| p[i].pgbench.as_ref().map_or(0, |pg| pg.aborted);
    let verdict = |ok: bool| if ok { "HOLDS" } else { "FAILS" };
    println!();
    println!(
        "replica kill: {n} failed statements that had not started streaming (target 0) → {}",
        verdict(n == 0)
    );
    println!(
        "  point readers {} failed ({} before the first row); long reads in flight {} ok, {} \
         failed ({} before the first row); pgbench clients aborted {}",
        kill.readers.failures(),
        kill.readers.failed_before_row,
        long.ok,
        long.failures(),
        long.failed_before_row,
        aborted(REPLICA_KILLED)
    );
    let back = &p[REPLICA_BACK];
    let started_ms = back.action.as_ref().map_or(0, |(_, ms)| *ms);
    let readmitted = out
        .events
        .iter()
        .find(|e| e.phase == REPLICA_BACK && e.node == "replica1" && e.usable);
    println!(
        "  replica1 back: reader failures {}, pgbench clients aborted {}; re-admitted {}",
        back.readers.failures(),
        aborted(REPLICA_BACK),
        match readmitted {
            Some(e) => format!(
                "{} ms after pg_ctl start returned ({} ms into the phase)",
                e.at_ms as i64 - started_ms as i64,
                e.at_ms
            ),
            None => "never within the phase".into(),
        }
    );
    let pk = &p[PRIMARY_KILLED];
    println!(
        "primary kill: reads ok {}, reads failed {} (before first row {}); pgbench clients \
         aborted {}; writer failed {} (expected)",
        pk.readers.ok,
        pk.readers.failures(),
        pk.readers.failed_before_row,
        aborted(PRIMARY_KILLED),
        pk.writer.failures()
    );
    let pb = &p[PRIMARY_BACK];
    let started_ms = pb.action.as_ref().map_or(0, |(_, ms)| *ms);
    let writes_back = pb.writer.ok > 0;
    println!(
        "primary back: writer succeeds again → {} (first write ok {} into the phase, {} after \
         pg_ctl start returned; {} ok, {} failed); reads failed {}",
        verdict(writes_back),
        ms_opt(pb.writer.first_ok_ms),
        pb.writer.first_ok_ms.map_or("-".into(), |v| format!(
            "{} ms",
            v as i64 - started_ms as i64
        )),
        pb.writer.ok,
        pb.writer.failures(),
        pb.readers.failures()
    );
    n == 0 && writes_back
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.phase_seconds == 0 || args.readers == 0 || args.scale == 0 {
        eprintln!("phase-seconds, readers and scale must be positive");
        return ExitCode::from(2);
    }
    if args.pgbench_clients > 0 && args.pgbench_threads == 0 {
        eprintln!("pgbench-threads must be positive");
        return ExitCode::from(2);
    }
    let limit = Duration::from_secs(
        args.timeout_seconds
            .unwrap_or(PHASES.len() as u64 * (args.phase_seconds + 60) + 600),
    );
    support::init_logging();
    eprintln!(
        "[{}] starting a primary and two streaming replicas...",
        support::clock()
    );
    let cluster = match support::start_cluster(ClusterOptions {
        replicas: 2,
        ..Default::default()
    }) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!(
        "cluster: primary 127.0.0.1:{}, replicas {}; {} cores",
        cluster.primary.port,
        cluster
            .replicas
            .iter()
            .map(|r| format!("{} 127.0.0.1:{}", r.name, r.port))
            .collect::<Vec<_>>()
            .join(", "),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "load: {} readers ({:?} protocol) `{READ}`, 1 writer `{UPDATE}`, pgbench -n -S -c {} \
         -j {} per phase; phases of {} s; global timeout {} s",
        args.readers,
        args.protocol,
        args.pgbench_clients,
        args.pgbench_threads,
        args.phase_seconds,
        limit.as_secs()
    );
    let runtime = match support::runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(limit, run_all(&cluster, &args)) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    eprintln!(
        "[{}] stopping and removing the cluster...",
        support::clock()
    );
    cluster.stop();
    let verdict = outcome.map(|timed| {
        let out = timed
            .map_err(|_| format!("global timeout: still running after {} s", limit.as_secs()))??;
        print_phases(&out.phases, &out.events, &args);
        print_table(&out.phases);
        Ok(print_summary(&out))
    });
    support::exit_code(verdict, "fault benchmark", args.strict)
}
