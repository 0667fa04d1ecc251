//! Priority-queuing benchmark: short write transactions beside heavy analytic reads on a
//! deliberately small primary pool, with priority on and with FIFO, interleaved, in one run.
//!
//! One local cluster (a primary and one streaming replica) holds `bench_accounts` (`--rows`
//! rows, a million by default, so the heavy read is a report of tens of milliseconds). For
//! each round, and in each round for each mode (priority on, then FIFO), a fresh in-process
//! proxy is started with `[pool] primary_max = 4` and `[priority] enabled = …`, nothing else
//! tuned. Against it run, each on its own connection:
//!
//! * `--writers` sessions looping `BEGIN; UPDATE bench_accounts SET v = v + 1 WHERE id = $1;
//!   COMMIT` (a random id each time). The whole transaction's latency is measured; the proxy
//!   defers the lone BEGIN, so the UPDATE's wait for a pool connection is where queueing shows.
//! * `--readers` sessions looping the heavy read
//!   `/* causeway:primary */ SELECT count(*), sum(v) FROM bench_accounts` (pinned to the primary
//!   by the hint; a whole-table aggregate, so the proxy classes it `analytic`).
//!
//! Measurements count operations that finish inside the window (`--duration` seconds after
//! `--warmup` seconds of load). Per run it prints transaction latency p50/p99,
//! transactions/s, heavy reads/s, errors and the primary pool's queue stats per class over the
//! window; then medians across rounds, the ratios p99(priority)/p99(fifo) and
//! heavy/s(priority)/heavy/s(fifo), and whether the targets hold (≤ 0.2, ≥ 0.5, and no request
//! left waiting past its timeout without a clear error).
//!
//! ```sh
//! cargo run --release --example priority_bench -- --duration 10 --rounds 2
//! ```
//!
//! Everything runs on 127.0.0.1, is bounded in time, and is removed at the end.

#[path = "support/mod.rs"]
mod support;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway::config::Config;
use causeway::launcher::{ClusterOptions, LocalCluster};
use causeway::pool::queue::{Class, QueueStats};
use causeway::server::{self, Running};
use clap::{Parser, ValueEnum};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};

const USER: &str = "app";
const PASSWORD: &str = "app-secret";
const DATABASE: &str = "app";
const TABLE: &str = "bench_accounts";
const UPDATE: &str = "UPDATE bench_accounts SET v = v + 1 WHERE id = $1";
const HEAVY: &str = "/* causeway:primary */ SELECT count(*), sum(v) FROM bench_accounts";
/// Targets of the requirement.
const P99_RATIO_MAX: f64 = 0.2;
const HEAVY_RATIO_MIN: f64 = 0.5;
/// Scheduling slack allowed on top of the acquire timeout when checking the proxy's longest
/// granted wait.
const WAIT_SLACK_MS: u64 = 250;
/// How long the client waits for an answer beyond the proxy's acquire timeout before it calls
/// the request hung (waiting past its timeout without an error).
const HUNG_GRACE: Duration = Duration::from_secs(15);

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Bounded benchmark of priority queuing vs FIFO on a small primary pool",
    args_override_self = true
)]
struct Args {
    /// Seconds measured per run (one mode in one round).
    #[arg(long, default_value_t = 15)]
    duration: u64,
    /// Seconds of load before the window opens in each run (not measured).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Rounds; each runs priority on, then FIFO.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Sessions running short write transactions.
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// Sessions running the heavy read on the primary.
    #[arg(long, default_value_t = 32)]
    readers: usize,
    /// `[pool] primary_max` of the proxy.
    #[arg(long, default_value_t = 4)]
    primary_max: usize,
    /// `[primary] max_active` of the proxy (execution slots; off unless given). Applies to both
    /// modes: with priority off the slots are granted first come, first served.
    #[arg(long)]
    max_active: Option<usize>,
    /// Rows in bench_accounts (the heavy read scans them all).
    #[arg(long, default_value_t = 1_000_000)]
    rows: i32,
    /// `[pool] acquire_timeout_ms` of the proxy.
    #[arg(long, default_value_t = 30_000)]
    acquire_timeout_ms: u64,
    /// `[pool] max_waiters` of the proxy.
    #[arg(long, default_value_t = 1000)]
    max_waiters: usize,
    /// Modes in the order run within each round.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "priority,fifo"
    )]
    modes: Vec<Mode>,
    /// Extra proxy configuration lines, appended right after `[priority] enabled = …` (so bare
    /// keys land in [priority]), e.g. `--proxy-toml 'aging_ms = 2000'`, for exploring; the
    /// benchmark itself tunes nothing. Repeatable; applies to both modes.
    #[arg(long)]
    proxy_toml: Vec<String>,
    /// Extra postgresql.conf settings for the benchmark's servers, `key=value`, e.g.
    /// `--server-conf max_parallel_workers_per_gather=0`. Repeatable; applies to both modes.
    #[arg(long, value_parser = parse_setting)]
    server_conf: Vec<(String, String)>,
    /// How the proxy reaches the servers: `tcp` (127.0.0.1) or `unix` (their socket directory,
    /// as a proxy on the database's machine would). Both modes use the same.
    #[arg(long, value_enum, default_value = "tcp")]
    server_link: Link,
    /// Where the proxy runs: `shared` (the benchmark clients' runtime, two worker threads) or
    /// `own` (a current-thread runtime on a thread of its own, as the `causeway` process runs
    /// by default on a machine of two cores).
    #[arg(long, value_enum, default_value = "shared")]
    proxy_runtime: ProxyRuntime,
    /// Exit with status 1 when a target does not hold.
    #[arg(long)]
    strict: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Link {
    Tcp,
    Unix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProxyRuntime {
    Own,
    Shared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Priority,
    Fifo,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Priority => "priority",
            Mode::Fifo => "fifo",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// One kind of operation as seen by the clients.
#[derive(Default)]
struct Tally {
    /// Finished inside the window.
    done: u64,
    latency_us: Vec<u64>,
    /// Longest successful operation, window or not.
    max_us: u64,
    /// Successful operations that took longer than the proxy's acquire timeout (wait plus
    /// execution, so informative only: the proxy's own max wait is what the target checks).
    over_timeout: u64,
    errors: u64,
    /// Errors that carry no SQLSTATE (not a clear server or proxy error).
    unclear: u64,
    /// First error messages (SQLSTATE and text).
    first_errors: Vec<String>,
    /// Requests with no answer (neither rows nor an error) within acquire timeout + grace.
    hung: u64,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.done += o.done;
        self.latency_us.extend(o.latency_us);
        self.max_us = self.max_us.max(o.max_us);
        self.over_timeout += o.over_timeout;
        self.errors += o.errors;
        self.unclear += o.unclear;
        self.hung += o.hung;
        for e in o.first_errors {
            if self.first_errors.len() < 3 {
                self.first_errors.push(e);
            }
        }
    }

    fn error(&mut self, e: String) {
        self.errors += 1;
        self.unclear += u64::from(!e.contains("SQLSTATE"));
        if self.first_errors.len() < 3 {
            self.first_errors.push(e);
        }
    }

    /// Nearest-rank percentile in ms; NaN when empty. Call after sorting.
    fn pct_ms(&self, p: f64) -> f64 {
        if self.latency_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.latency_us.len() as f64).ceil() as usize;
        self.latency_us[rank.clamp(1, self.latency_us.len()) - 1] as f64 / 1000.0
    }
}

/// Where the measurement window lies and what counts.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
    acquire_timeout: Duration,
    op_timeout: Duration,
}

impl Window {
    fn record(&self, t: &mut Tally, t0: Instant, t1: Instant) {
        let took = t1 - t0;
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        t.max_us = t.max_us.max(us);
        t.over_timeout += u64::from(took > self.acquire_timeout);
        if t1 >= self.start && t1 <= self.end {
            t.done += 1;
            t.latency_us.push(us);
        }
    }
}

/// What one run (one mode in one round) measured.
struct RunResult {
    mode: Mode,
    round: usize,
    tx: Tally,
    heavy: Tally,
    seconds: f64,
    /// Primary pool queue stats over the window (end minus start), and the whole run's.
    queue_window: Option<QueueStats>,
    queue_run: Option<QueueStats>,
    /// Proxy-side numbers of other pools that saw traffic, for completeness.
    other_pools: Vec<String>,
}

impl RunResult {
    fn tx_p50(&self) -> f64 {
        self.tx.pct_ms(50.0)
    }
    fn tx_p99(&self) -> f64 {
        self.tx.pct_ms(99.0)
    }
    fn tx_rate(&self) -> f64 {
        self.tx.done as f64 / self.seconds
    }
    fn heavy_rate(&self) -> f64 {
        self.heavy.done as f64 / self.seconds
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

async fn connect(conninfo: &str) -> Result<Client, String> {
    let fut = tokio_postgres::connect(conninfo, NoTls);
    let (client, conn) = tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .map_err(|_| "no answer to the connection attempt within 20 s".to_string())?
        .map_err(|e| describe(&e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A writer's connection with its UPDATE prepared (as a driver's statement cache would).
struct WriterConn {
    client: Client,
    update: Statement,
}

async fn open_writer(conninfo: &str) -> Result<WriterConn, String> {
    let client = connect(conninfo).await?;
    let update = tokio::time::timeout(Duration::from_secs(20), client.prepare(UPDATE))
        .await
        .map_err(|_| "no answer to PREPARE within 20 s".to_string())?
        .map_err(|e| describe(&e))?;
    Ok(WriterConn { client, update })
}

async fn write_tx(c: &WriterConn, id: i32) -> Result<(), tokio_postgres::Error> {
    c.client.batch_execute("BEGIN").await?;
    c.client.execute(&c.update, &[&id]).await?;
    c.client.batch_execute("COMMIT").await
}

async fn writer(mut conn: WriterConn, conninfo: String, w: Window, rows: i32, seed: u64) -> Tally {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut t = Tally::default();
    while Instant::now() < w.end {
        let id = rng.random_range(1..=rows);
        let t0 = Instant::now();
        let r = tokio::time::timeout(w.op_timeout, write_tx(&conn, id)).await;
        let t1 = Instant::now();
        let broken = match r {
            Ok(Ok(())) => {
                w.record(&mut t, t0, t1);
                false
            }
            Ok(Err(e)) => {
                t.error(format!("write tx: {}", describe(&e)));
                let rollback = conn.client.batch_execute("ROLLBACK");
                let rolled = tokio::time::timeout(Duration::from_secs(10), rollback).await;
                conn.client.is_closed() || !matches!(rolled, Ok(Ok(())))
            }
            Err(_) => {
                t.hung += 1;
                t.error(format!(
                    "write tx: no answer within {:?} (hung)",
                    w.op_timeout
                ));
                true
            }
        };
        if broken {
            match open_writer(&conninfo).await {
                Ok(c) => conn = c,
                Err(e) => {
                    t.error(format!("reconnect: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    t
}

async fn heavy_read(client: &Client) -> Result<(), String> {
    let msgs = client.simple_query(HEAVY).await.map_err(|e| describe(&e))?;
    let rows = msgs
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
        .count();
    if rows == 1 {
        Ok(())
    } else {
        Err(format!("heavy read returned {rows} rows, expected 1"))
    }
}

async fn reader(mut client: Client, conninfo: String, w: Window) -> Tally {
    let mut t = Tally::default();
    while Instant::now() < w.end {
        let t0 = Instant::now();
        let r = tokio::time::timeout(w.op_timeout, heavy_read(&client)).await;
        let t1 = Instant::now();
        let broken = match r {
            Ok(Ok(())) => {
                w.record(&mut t, t0, t1);
                false
            }
            Ok(Err(e)) => {
                t.error(format!("heavy read: {e}"));
                client.is_closed()
            }
            Err(_) => {
                t.hung += 1;
                t.error(format!(
                    "heavy read: no answer within {:?} (hung)",
                    w.op_timeout
                ));
                true
            }
        };
        if broken {
            match connect(&conninfo).await {
                Ok(c) => client = c,
                Err(e) => {
                    t.error(format!("reconnect: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    t
}

// ---------------------------------------------------------------------------------------------
// Proxy

fn proxy_config(cluster: &LocalCluster, args: &Args, mode: Mode) -> Result<Config, String> {
    let mut text = causeway::demo::config_for(cluster, "127.0.0.1:0");
    if args.server_link == Link::Unix {
        let dir = cluster.socket_dir().display().to_string();
        text = text.replace("host = \"127.0.0.1\"", &format!("host = \"{dir}\""));
    }
    if let Some(n) = args.max_active {
        text = text.replacen("[primary]\n", &format!("[primary]\nmax_active = {n}\n"), 1);
    }
    // config_for ends inside the last [[replicas]] entry; new table headers close it.
    text.push_str(&format!(
        "\n[pool]\nprimary_max = {}\nacquire_timeout_ms = {}\nmax_waiters = {}\n\n\
         [priority]\nenabled = {}\n",
        args.primary_max,
        args.acquire_timeout_ms,
        args.max_waiters,
        mode == Mode::Priority
    ));
    for line in &args.proxy_toml {
        text.push_str(line);
        text.push('\n');
    }
    Config::from_toml(&text).map_err(|e| format!("proxy configuration: {e}"))
}

/// Stats of the primary pool (and a line for every other pool that saw traffic).
fn pool_stats(running: &Running) -> (Option<QueueStats>, Vec<String>) {
    let mut primary = None;
    let mut others = Vec::new();
    for p in running.shared.pools.all() {
        let s = p.queue().stats();
        if p.name.starts_with("primary/") {
            primary = Some(s);
        } else {
            let t = s.total();
            if t.acquired + t.refusals + t.timeouts > 0 {
                others.push(format!(
                    "{}: {} acquired, {} refused, {} timed out",
                    p.name, t.acquired, t.refusals, t.timeouts
                ));
            }
        }
    }
    (primary, others)
}

/// Counters of `end` minus those of `start` (max_wait_us and waiting are kept from `end`).
fn diff_stats(end: &QueueStats, start: Option<&QueueStats>) -> QueueStats {
    let mut out = end.clone();
    let Some(start) = start else { return out };
    for (o, s) in out.classes.iter_mut().zip(&start.classes) {
        o.acquired -= s.acquired.min(o.acquired);
        o.queued -= s.queued.min(o.queued);
        o.refusals -= s.refusals.min(o.refusals);
        o.evictions -= s.evictions.min(o.evictions);
        o.timeouts -= s.timeouts.min(o.timeouts);
        o.cancellations -= s.cancellations.min(o.cancellations);
        let mut h = causeway::pool::queue::WaitHistogram::default();
        for (i, (e, b)) in o
            .wait_us
            .buckets()
            .iter()
            .zip(s.wait_us.buckets())
            .enumerate()
        {
            // Re-record each remaining wait at its bucket's lower bound: same bucket.
            let lower = if i == 0 { 0 } else { 1u64 << (i - 1) };
            for _ in 0..e.saturating_sub(*b) {
                h.record(lower);
            }
        }
        o.wait_us = h;
    }
    out
}

/// The thread running the proxy's own runtime, if it has one.
struct ProxyThread(
    Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
);

impl ProxyThread {
    /// Lets the thread's runtime wind down (after `Running::stop`) and waits for it.
    async fn finish(self) {
        if let Some((done, thread)) = self.0 {
            let _ = done.send(());
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Starts the proxy: on a current-thread runtime of its own thread, as `causeway` runs on a
/// machine of two cores (`server.worker_threads = 0`), or on the benchmark's runtime, where
/// its hand-offs queue behind the client tasks.
async fn start_proxy(cfg: Config, where_: ProxyRuntime) -> Result<(Running, ProxyThread), String> {
    let cfg = Arc::new(cfg);
    let failed = |e: std::io::Error| format!("cannot start the proxy: {e}");
    if where_ == ProxyRuntime::Shared {
        let running = server::start(cfg).await.map_err(failed)?;
        return Ok((running, ProxyThread(None)));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(failed)?;
    let handle = rt.handle().clone();
    let (done, stop) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("proxy".into())
        .spawn(move || {
            rt.block_on(async {
                let _ = stop.await;
            });
            rt.shutdown_timeout(Duration::from_secs(2));
        })
        .map_err(failed)?;
    let thread = ProxyThread(Some((done, thread)));
    match handle.spawn(server::start(cfg)).await {
        Ok(Ok(running)) => Ok((running, thread)),
        Ok(Err(e)) => {
            thread.finish().await;
            Err(failed(e))
        }
        Err(e) => {
            thread.finish().await;
            Err(format!("cannot start the proxy: {e}"))
        }
    }
}

async fn run_once(
    cluster: &LocalCluster,
    args: &Args,
    mode: Mode,
    round: usize,
) -> Result<RunResult, String> {
    let cfg = proxy_config(cluster, args, mode)?;
    let (running, proxy_thread) = start_proxy(cfg, args.proxy_runtime).await?;
    let conninfo = format!(
        "host=127.0.0.1 port={} user={USER} password={PASSWORD} dbname={DATABASE} \
         application_name=priority_bench",
        running.addr.port()
    );

    // Connect everyone first, so logins do not fall inside the measured window.
    let mut writer_conns = Vec::with_capacity(args.writers);
    let mut reader_conns = Vec::with_capacity(args.readers);
    {
        let mut opening = tokio::task::JoinSet::new();
        for i in 0..args.writers + args.readers {
            let ci = conninfo.clone();
            let is_writer = i < args.writers;
            opening.spawn(async move {
                if is_writer {
                    open_writer(&ci).await.map(|c| (Some(c), None))
                } else {
                    connect(&ci).await.map(|c| (None, Some(c)))
                }
            });
        }
        while let Some(r) = opening.join_next().await {
            match r.map_err(|e| e.to_string())? {
                Ok((Some(w), _)) => writer_conns.push(w),
                Ok((_, Some(c))) => reader_conns.push(c),
                Ok((None, None)) => {}
                Err(e) => {
                    running.stop().await;
                    proxy_thread.finish().await;
                    return Err(format!("connecting through the proxy: {e}"));
                }
            }
        }
    }

    let acquire_timeout = Duration::from_millis(args.acquire_timeout_ms);
    let start = Instant::now() + Duration::from_secs(args.warmup);
    let w = Window {
        start,
        end: start + Duration::from_secs(args.duration),
        acquire_timeout,
        op_timeout: acquire_timeout + HUNG_GRACE,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in writer_conns.into_iter().enumerate() {
        let seed = (round as u64) << 32 | i as u64;
        tasks.spawn(writer(c, conninfo.clone(), w, args.rows, seed).map_kind(true));
    }
    for c in reader_conns {
        tasks.spawn(reader(c, conninfo.clone(), w).map_kind(false));
    }

    tokio::time::sleep_until(w.start.into()).await;
    let (at_start, _) = pool_stats(&running);
    tokio::time::sleep_until(w.end.into()).await;
    let (at_end, _) = pool_stats(&running);
    let queue_window = at_end.as_ref().map(|e| diff_stats(e, at_start.as_ref()));

    let mut tx = Tally::default();
    let mut heavy = Tally::default();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((true, t)) => tx.merge(t),
            Ok((false, t)) => heavy.merge(t),
            Err(e) => tx.error(format!("client task failed: {e}")),
        }
    }
    tx.latency_us.sort_unstable();
    heavy.latency_us.sort_unstable();
    let (queue_run, other_pools) = pool_stats(&running);
    if tokio::time::timeout(Duration::from_secs(10), running.stop())
        .await
        .is_err()
    {
        eprintln!("warning: the proxy did not stop within 10 s");
    }
    proxy_thread.finish().await;
    Ok(RunResult {
        mode,
        round,
        tx,
        heavy,
        seconds: args.duration as f64,
        queue_window,
        queue_run,
        other_pools,
    })
}

/// Tags a client task's tally with its kind (true = writer).
trait MapKind: std::future::Future<Output = Tally> + Sized {
    fn map_kind(self, writer: bool) -> impl std::future::Future<Output = (bool, Tally)> {
        async move { (writer, self.await) }
    }
}

impl<F: std::future::Future<Output = Tally>> MapKind for F {}

// ---------------------------------------------------------------------------------------------
// Setup and reporting

async fn setup_table(conninfo: &str, rows: i32) -> Result<f64, String> {
    let c = connect(conninfo).await?;
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {TABLE};
         CREATE TABLE {TABLE} (id int PRIMARY KEY, v bigint NOT NULL);
         INSERT INTO {TABLE} SELECT g, 0 FROM generate_series(1, {rows}) g;"
    ))
    .await
    .map_err(|e| format!("creating {TABLE}: {}", describe(&e)))?;
    c.batch_execute(&format!("VACUUM ANALYZE {TABLE}"))
        .await
        .map_err(|e| format!("VACUUM ANALYZE: {}", describe(&e)))?;
    // Time the heavy read alone, on the primary directly, for context.
    let mut took = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        c.simple_query(HEAVY)
            .await
            .map_err(|e| format!("heavy read: {}", describe(&e)))?;
        took.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    took.sort_by(f64::total_cmp);
    Ok(took[took.len() / 2])
}

/// Dead rows from the previous run would slow the next one's scans: vacuum between runs.
async fn vacuum(conninfo: &str) -> Result<(), String> {
    let c = connect(conninfo).await?;
    c.batch_execute(&format!("VACUUM {TABLE}"))
        .await
        .map_err(|e| format!("VACUUM: {}", describe(&e)))
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

fn pct_us(h: &causeway::pool::queue::WaitHistogram, q: f64) -> String {
    match h.percentile(q) {
        Some(us) => format!("≤{}", ms(us)),
        None => "-".into(),
    }
}

fn print_run(r: &RunResult, args: &Args) {
    println!();
    println!(
        "== round {}/{} · {} · {} writers + {} heavy readers · primary_max {} · {} s measured",
        r.round,
        args.rounds,
        if r.mode == Mode::Priority {
            "priority on"
        } else {
            "FIFO (priority off)"
        },
        args.writers,
        args.readers,
        args.primary_max,
        args.duration
    );
    println!(
        "  write tx    : {:>7} done {:>8.1}/s   latency p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8} ms",
        r.tx.done,
        r.tx_rate(),
        r.tx_p50(),
        r.tx_p99(),
        ms(r.tx.max_us)
    );
    println!(
        "  heavy reads : {:>7} done {:>8.1}/s   latency p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8} ms",
        r.heavy.done,
        r.heavy_rate(),
        r.heavy.pct_ms(50.0),
        r.heavy.pct_ms(99.0),
        ms(r.heavy.max_us)
    );
    let errors = r.tx.errors + r.heavy.errors;
    let first =
        r.tx.first_errors
            .first()
            .or(r.heavy.first_errors.first())
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default();
    println!(
        "  errors      : {errors} (write tx {}, heavy {}){first}; hung {}; ok but slower than acquire timeout {}",
        r.tx.errors,
        r.heavy.errors,
        r.tx.hung + r.heavy.hung,
        r.tx.over_timeout + r.heavy.over_timeout
    );
    match &r.queue_window {
        None => println!("  queue       : no primary pool found"),
        Some(q) => {
            println!(
                "  queue primary/{USER}/{DATABASE}, over the window (wait in ms, log2 buckets):"
            );
            println!(
                "    {:<10} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8}",
                "class",
                "acquired",
                "queued",
                "wait p50",
                "wait p99",
                "max(run)",
                "refused",
                "timeouts"
            );
            let run = r.queue_run.as_ref();
            for class in Class::ALL {
                let c = q.class(class);
                let max_run = run.map(|s| s.class(class).max_wait_us).unwrap_or(0);
                if c.acquired + c.refusals + c.timeouts == 0 && max_run == 0 {
                    continue;
                }
                println!(
                    "    {:<10} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8}",
                    class.as_str(),
                    c.acquired,
                    c.queued,
                    pct_us(&c.wait_us, 0.50),
                    pct_us(&c.wait_us, 0.99),
                    ms(max_run),
                    c.refusals,
                    c.timeouts
                );
            }
        }
    }
    for line in &r.other_pools {
        println!("  other pool  : {line}");
    }
}

/// One number of a run, for the summary table.
type Metric = fn(&RunResult) -> f64;

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Prints the summary; returns whether every target holds.
fn print_summary(results: &[RunResult], args: &Args) -> bool {
    let of = |mode: Mode, f: &dyn Fn(&RunResult) -> f64| {
        median(results.iter().filter(|r| r.mode == mode).map(f).collect())
    };
    println!();
    println!(
        "== summary: medians over {} round(s) of {} s, {} writers + {} heavy readers, primary_max {}",
        args.rounds, args.duration, args.writers, args.readers, args.primary_max
    );
    println!(
        "  {:<30} {:>12} {:>12} {:>8}",
        "", "priority", "fifo", "ratio"
    );
    let rows: [(&str, Metric); 5] = [
        ("commit tx latency p50 (ms)", |r| r.tx_p50()),
        ("commit tx latency p99 (ms)", |r| r.tx_p99()),
        ("commit tx/s", |r| r.tx_rate()),
        ("heavy reads/s", |r| r.heavy_rate()),
        ("heavy read latency p50 (ms)", |r| r.heavy.pct_ms(50.0)),
    ];
    let mut ratios = Vec::new();
    for (name, f) in rows {
        let p = of(Mode::Priority, &f);
        let q = of(Mode::Fifo, &f);
        ratios.push(p / q);
        println!("  {name:<30} {p:>12.1} {q:>12.1} {:>8.3}", p / q);
    }
    let p99_ratio = ratios[1];
    let heavy_ratio = ratios[3];
    // Paired per-round ratios, to show the spread.
    let per_round = |f: &dyn Fn(&RunResult) -> f64| {
        (1..=args.rounds)
            .filter_map(|round| {
                let get = |m| results.iter().find(|r| r.round == round && r.mode == m);
                Some(format!(
                    "{:.3}",
                    f(get(Mode::Priority)?) / f(get(Mode::Fifo)?)
                ))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "  per round: p99 ratio [{}], heavy/s ratio [{}]",
        per_round(&|r| r.tx_p99()),
        per_round(&|r| r.heavy_rate())
    );
    let errors: u64 = results.iter().map(|r| r.tx.errors + r.heavy.errors).sum();
    let hung: u64 = results.iter().map(|r| r.tx.hung + r.heavy.hung).sum();
    let slow: u64 = results
        .iter()
        .map(|r| r.tx.over_timeout + r.heavy.over_timeout)
        .sum();
    let unclear: u64 = results.iter().map(|r| r.tx.unclear + r.heavy.unclear).sum();
    // Longest wait the proxy granted, any class, any run: past the timeout it should have
    // answered 53300 instead.
    let max_wait_us = results
        .iter()
        .filter_map(|r| r.queue_run.as_ref())
        .flat_map(|q| q.classes.iter().map(|c| c.max_wait_us))
        .max()
        .unwrap_or(0);
    let limit_us = (args.acquire_timeout_ms + WAIT_SLACK_MS) * 1000;
    let proxy_timeouts: u64 = results
        .iter()
        .filter_map(|r| r.queue_run.as_ref())
        .map(|q| q.total().timeouts + q.total().refusals)
        .sum();
    println!(
        "  errors {errors} (proxy queue timeouts + refusals {proxy_timeouts}, without SQLSTATE \
         {unclear}), hung requests {hung}; longest granted pool wait {} ms (acquire timeout {} ms); \
         requests slower in all than the acquire timeout {slow}",
        ms(max_wait_us),
        args.acquire_timeout_ms
    );
    let ok1 = p99_ratio <= P99_RATIO_MAX;
    let ok2 = heavy_ratio >= HEAVY_RATIO_MIN;
    let ok3 = hung == 0 && unclear == 0 && max_wait_us <= limit_us;
    let verdict = |ok: bool| if ok { "HOLDS" } else { "FAILS" };
    println!();
    println!(
        "  target p99(priority)/p99(fifo) ≤ {P99_RATIO_MAX}: {p99_ratio:.3} → {}",
        verdict(ok1)
    );
    println!(
        "  target heavy/s(priority)/heavy/s(fifo) ≥ {HEAVY_RATIO_MIN}: {heavy_ratio:.3} → {}",
        verdict(ok2)
    );
    println!(
        "  target no request waits past its timeout without a clear error: {} → {}",
        if ok3 {
            "none hung, no wait granted past the timeout, every error has a SQLSTATE".to_string()
        } else {
            format!(
                "{hung} hung, longest granted wait {} ms, {unclear} error(s) without SQLSTATE",
                ms(max_wait_us)
            )
        },
        verdict(ok3)
    );
    ok1 && ok2 && ok3
}

async fn run_all(cluster: &LocalCluster, args: &Args) -> Result<Vec<RunResult>, String> {
    let direct = format!(
        "host={} port={} user={USER} password={PASSWORD} dbname={DATABASE}",
        cluster.primary.host, cluster.primary.port
    );
    let solo = setup_table(&direct, args.rows).await?;
    println!(
        "table {TABLE}: {} rows; heavy read alone, directly on the primary: {solo:.1} ms",
        args.rows
    );
    println!("heavy read: {HEAVY}");
    println!(
        "write tx  : BEGIN; {UPDATE}; COMMIT   ($1 random in 1..={})",
        args.rows
    );
    println!(
        "proxy     : servers over {}, [pool] primary_max = {}, acquire_timeout_ms = {}, \
         max_waiters = {}; {}[priority] enabled = true|false{}",
        match args.server_link {
            Link::Tcp => "TCP",
            Link::Unix => "their Unix sockets",
        },
        args.primary_max,
        args.acquire_timeout_ms,
        args.max_waiters,
        match args.max_active {
            Some(n) => format!("[primary] max_active = {n}; "),
            None => String::new(),
        },
        if args.proxy_toml.is_empty() {
            ", everything else default".to_string()
        } else {
            format!(", plus {:?}", args.proxy_toml)
        }
    );
    let mut results = Vec::new();
    for round in 1..=args.rounds {
        for &mode in &args.modes {
            vacuum(&direct).await?;
            eprintln!(
                "[{}] round {round}/{}: {} ...",
                support::clock(),
                args.rounds,
                mode.name()
            );
            let r = run_once(cluster, args, mode, round).await?;
            print_run(&r, args);
            results.push(r);
        }
    }
    Ok(results)
}

/// `key=value` of `--server-conf`.
fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.duration == 0
        || args.rounds == 0
        || args.writers == 0
        || args.readers == 0
        || args.primary_max == 0
        || args.rows < 1
    {
        eprintln!("duration, rounds, writers, readers, primary-max and rows must be positive");
        return ExitCode::from(2);
    }
    if !(args.modes.contains(&Mode::Priority) && args.modes.contains(&Mode::Fifo)) {
        eprintln!("--modes must name both priority and fifo");
        return ExitCode::from(2);
    }
    support::init_logging();
    eprintln!(
        "[{}] starting a primary and one streaming replica...",
        support::clock()
    );
    let cluster = match support::start_cluster(ClusterOptions {
        replicas: 1,
        primary_conf: args.server_conf.clone(),
        ..Default::default()
    }) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!(
        "cluster: primary 127.0.0.1:{}, {} streaming replica(s); {} cores{}",
        cluster.primary.port,
        cluster.replicas.len(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.server_conf
            .iter()
            .map(|(k, v)| format!("; {k} = {v}"))
            .collect::<String>()
    );
    let runtime = match support::runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run_all(&cluster, &args) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    eprintln!("[{}] stopping the cluster...", support::clock());
    cluster.stop();
    let verdict = outcome.map(|r| r.map(|results| print_summary(&results, &args)));
    support::exit_code(verdict, "benchmark", args.strict)
}
