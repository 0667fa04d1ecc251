//! Read-your-writes load test: a bounded run against a local primary with two streaming
//! replicas and an in-process proxy, once per consistency mode.
//!
//! Writing sessions loop: write a row, read it back at once, then read older rows (ids picked
//! from rows this tool saw committed at least `--older-age-ms` ago, by any session).
//! Reader-only sessions never write and only read older rows. Every read also selects
//! `inet_server_port()`, so the tool knows whether the primary or a replica answered.
//!
//! ```sh
//! cargo run --release --example ryw_load -- --delay-ms 200 --modes lsn,sticky,none
//! cargo run --release --example ryw_load -- --delay-ms 0 --protocol prepared --duration 5
//! ```
//!
//! Modes: `lsn`, `sticky`, `none`, `lsn+sticky` are the proxy's `consistency.mode`. `keyed` is
//! `lsn` where each writer sets `causeway.consistency_key = 'user:N'` and reads its row back on
//! a second connection that names the same key. `presented` is `lsn` where the writer asks
//! `SHOW causeway.last_write_lsn` and the read-back runs on a second connection after
//! `SET causeway.min_lsn = '<token>'`.
//!
//! Protocols: `simple` (literal SQL in Query messages), `extended` (unnamed statements,
//! Parse/Bind/Execute/Sync in one round trip), `prepared` (named statements prepared once per
//! connection, then Bind/Execute), `transaction` (each write in BEGIN … COMMIT, each read in
//! START TRANSACTION READ ONLY … COMMIT, statements inside as `extended`).

#[path = "support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use causeway::config::Config;
use causeway::launcher::{ClusterOptions, LocalCluster, NodeInfo};
use causeway::server::{self, Running};
use clap::{Parser, ValueEnum};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};

const PASSWORD: &str = "app-secret";
/// Longest time one statement (or one transaction) may take before it counts as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(15);
/// Errors printed per mode (all are counted).
const ERRORS_SHOWN: usize = 5;

const INSERT: &str = "INSERT INTO ryw (writer, payload) VALUES ($1, $2) RETURNING id";
const READ_BACK: &str = "SELECT (SELECT count(*) FROM ryw WHERE id = $1), inet_server_port()";
const READ_OLDER: &str = "SELECT (SELECT count(*) FROM ryw WHERE id = ANY($1)), inet_server_port()";

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Bounded read-your-writes load test against a local cluster and proxy",
    args_override_self = true
)]
struct Args {
    /// recovery_min_apply_delay of the replicas, in ms; 0 = their natural lag.
    #[arg(long, default_value_t = 200)]
    delay_ms: u64,
    /// Modes to run, in order, each against a fresh proxy (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "lsn,sticky,none"
    )]
    modes: Vec<Mode>,
    /// Seconds of load per mode.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Writing sessions.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Sessions that never write.
    #[arg(long, default_value_t = 8)]
    readers: usize,
    #[arg(long, value_enum, default_value = "extended")]
    protocol: Protocol,
    /// Rows named by one read of older rows.
    #[arg(long, default_value_t = 10)]
    older_rows: usize,
    /// Reads of older rows per write in a writing session.
    #[arg(long, default_value_t = 1)]
    older_reads: usize,
    /// How long ago a row must have been committed to count as an older row.
    #[arg(long, default_value_t = 2000)]
    older_age_ms: u64,
    /// Rows written (straight to the primary) before each mode, so older rows exist from the
    /// start.
    #[arg(long, default_value_t = 1000)]
    seed_rows: i64,
    /// Pause after each iteration of every session (0 = closed loop, as fast as answered).
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
    /// Pause between a write's acknowledgement and its read-back, in µs (0 = read at once, as
    /// the requirement says; a small pause shows whether stale read-backs are a race with the
    /// proxy recording the write's token).
    #[arg(long, default_value_t = 0)]
    readback_pause_us: u64,
    /// With `--protocol prepared`: prepare all three statements (the INSERT too) as soon as a
    /// connection opens, as drivers and ORMs that prepare at connection setup do, instead of on
    /// first use.
    #[arg(long)]
    prepare_at_connect: bool,
    /// Extra proxy configuration lines, appended after `[consistency] mode = …` (so bare keys
    /// land in [consistency]), e.g. `--proxy-toml 'causal_wait_ms = 50'`. Repeatable.
    #[arg(long)]
    proxy_toml: Vec<String>,
    /// Exit with status 1 when an acceptance target does not hold.
    #[arg(long)]
    strict: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Lsn,
    Sticky,
    None,
    #[value(name = "lsn+sticky")]
    LsnSticky,
    Keyed,
    Presented,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Lsn => "lsn",
            Mode::Sticky => "sticky",
            Mode::None => "none",
            Mode::LsnSticky => "lsn+sticky",
            Mode::Keyed => "keyed",
            Mode::Presented => "presented",
        }
    }

    /// `consistency.mode` of the proxy.
    fn proxy_mode(self) -> &'static str {
        match self {
            Mode::Sticky => "sticky",
            Mode::None => "none",
            Mode::LsnSticky => "lsn+sticky",
            Mode::Lsn | Mode::Keyed | Mode::Presented => "lsn",
        }
    }

    /// Whether the read-back runs on a second connection.
    fn second_connection(self) -> bool {
        matches!(self, Mode::Keyed | Mode::Presented)
    }

    /// Whether the feature promises that a read-back sees the row.
    fn promises_ryw(self) -> bool {
        self != Mode::None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    Simple,
    Extended,
    Prepared,
    Transaction,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
            Protocol::Prepared => "prepared",
            Protocol::Transaction => "transaction",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// One kind of operation: how many, how many stale, where they ran, how long they took.
#[derive(Default)]
struct Tally {
    count: u64,
    stale: u64,
    on_replica: u64,
    errors: u64,
    latency_us: Vec<u32>,
}

impl Tally {
    fn record(&mut self, took: Duration, stale: bool, on_replica: bool) {
        self.count += 1;
        self.stale += u64::from(stale);
        self.on_replica += u64::from(on_replica);
        self.latency_us
            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
    }

    fn merge(&mut self, other: Tally) {
        self.count += other.count;
        self.stale += other.stale;
        self.on_replica += other.on_replica;
        self.errors += other.errors;
        self.latency_us.extend(other.latency_us);
    }

    fn finish(&mut self) {
        self.latency_us.sort_unstable();
    }

    /// Percentile in ms of the sorted latencies (nearest rank).
    fn pct_ms(&self, p: f64) -> f64 {
        if self.latency_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.latency_us.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.latency_us.len()) - 1;
        f64::from(self.latency_us[i]) / 1000.0
    }

    fn replica_share(&self) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        self.on_replica as f64 * 100.0 / self.count as f64
    }
}

/// What one session measured.
#[derive(Default)]
struct Outcome {
    writes: Tally,
    read_backs: Tally,
    older_by_writers: Tally,
    older_by_readers: Tally,
    /// presented mode: SHOW causeway.last_write_lsn + SET causeway.min_lsn.
    handoffs: Tally,
    /// Older-row reads skipped because no row was old enough yet.
    skipped_older: u64,
    errors: Vec<String>,
    error_count: u64,
}

impl Outcome {
    fn merge(&mut self, o: Outcome) {
        self.writes.merge(o.writes);
        self.read_backs.merge(o.read_backs);
        self.older_by_writers.merge(o.older_by_writers);
        self.older_by_readers.merge(o.older_by_readers);
        self.handoffs.merge(o.handoffs);
        self.skipped_older += o.skipped_older;
        self.error_count += o.error_count;
        for e in o.errors {
            if self.errors.len() < ERRORS_SHOWN {
                self.errors.push(e);
            }
        }
    }

    fn error(&mut self, what: &str, e: String) {
        self.error_count += 1;
        if self.errors.len() < ERRORS_SHOWN {
            self.errors.push(format!("{what}: {e}"));
        }
    }
}

/// Rows known to be committed, in commit-acknowledgement order, shared by every session.
struct Committed {
    rows: Mutex<Vec<(Instant, i64)>>,
    age: Duration,
}

impl Committed {
    fn push(&self, id: i64) {
        let mut rows = self.rows.lock().unwrap();
        // Taken under the lock, so the times stay sorted.
        let now = Instant::now();
        rows.push((now, id));
    }

    fn push_all(&self, ids: &[i64]) {
        let mut rows = self.rows.lock().unwrap();
        let now = Instant::now();
        rows.extend(ids.iter().map(|id| (now, *id)));
    }

    /// Up to `n` distinct ids of rows committed at least `age` ago, sorted.
    fn pick(&self, n: usize, rng: &mut SmallRng) -> Vec<i64> {
        let rows = self.rows.lock().unwrap();
        let Some(cutoff) = Instant::now().checked_sub(self.age) else {
            return Vec::new();
        };
        let old = rows.partition_point(|(t, _)| *t <= cutoff);
        if old == 0 {
            return Vec::new();
        }
        let mut ids: Vec<i64> = (0..n).map(|_| rows[rng.random_range(0..old)].1).collect();
        drop(rows);
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

// ---------------------------------------------------------------------------------------------
// One client connection and the statements the load runs

type OpResult<T> = Result<T, String>;

fn describe(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

async fn connect(conninfo: &str) -> OpResult<Client> {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .map_err(describe)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn timed<T>(fut: impl std::future::Future<Output = OpResult<T>>) -> OpResult<T> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
    }
}

/// Named statements, each prepared on first use (as a driver's statement cache would), so a
/// session that never writes never prepares the INSERT either.
#[derive(Default)]
struct Prepared {
    insert: Option<Statement>,
    read_back: Option<Statement>,
    read_older: Option<Statement>,
}

/// The statement in `slot`, preparing it first if needed.
async fn prepared(
    client: &Client,
    slot: &mut Option<Statement>,
    sql: &str,
    types: &[Type],
) -> Result<Statement, tokio_postgres::Error> {
    if let Some(s) = slot {
        return Ok(s.clone());
    }
    let s = client.prepare_typed(sql, types).await?;
    *slot = Some(s.clone());
    Ok(s)
}

enum Read<'a> {
    Back(i64),
    Older(&'a [i64]),
}

struct Conn {
    client: Client,
    protocol: Protocol,
    prepared: Prepared,
}

impl Conn {
    async fn open(
        conninfo: &str,
        protocol: Protocol,
        key: Option<&str>,
        eager: bool,
    ) -> OpResult<Conn> {
        let client = connect(conninfo).await?;
        if let Some(key) = key {
            client
                .batch_execute(&format!("SET causeway.consistency_key = '{key}'"))
                .await
                .map_err(describe)?;
        }
        let mut p = Prepared::default();
        if eager && protocol == Protocol::Prepared {
            let c = &client;
            prepared(c, &mut p.insert, INSERT, &[Type::INT4, Type::TEXT])
                .await
                .map_err(describe)?;
            prepared(c, &mut p.read_back, READ_BACK, &[Type::INT8])
                .await
                .map_err(describe)?;
            prepared(c, &mut p.read_older, READ_OLDER, &[Type::INT8_ARRAY])
                .await
                .map_err(describe)?;
        }
        Ok(Conn {
            client,
            protocol,
            prepared: p,
        })
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Writes one row; returns its id once the write is acknowledged (committed).
    async fn insert(&mut self, writer: i32, payload: &str) -> OpResult<i64> {
        let params: [(&(dyn ToSql + Sync), Type); 2] =
            [(&writer, Type::INT4), (&payload, Type::TEXT)];
        let rows = match self.protocol {
            Protocol::Simple => {
                let sql = format!(
                    "INSERT INTO ryw (writer, payload) VALUES ({writer}, '{}') RETURNING id",
                    payload.replace('\'', "''")
                );
                let msgs = self.client.simple_query(&sql).await.map_err(describe)?;
                return first_row(&msgs)?
                    .first()
                    .copied()
                    .ok_or_else(|| "INSERT returned no id".to_string());
            }
            Protocol::Extended => self.client.query_typed(INSERT, &params).await,
            Protocol::Prepared => {
                let slot = &mut self.prepared.insert;
                match prepared(&self.client, slot, INSERT, &[Type::INT4, Type::TEXT]).await {
                    Ok(s) => self.client.query(&s, &[&writer, &payload]).await,
                    Err(e) => Err(e),
                }
            }
            Protocol::Transaction => {
                let tx = self.client.transaction().await.map_err(describe)?;
                let rows = tx.query_typed(INSERT, &params).await.map_err(describe)?;
                tx.commit().await.map_err(describe)?;
                Ok(rows)
            }
        }
        .map_err(describe)?;
        rows.first()
            .map(|r| r.get::<_, i64>(0))
            .ok_or_else(|| "INSERT returned no row".to_string())
    }

    /// Runs a read; returns (rows found, port of the server that answered).
    async fn read(&mut self, read: Read<'_>) -> OpResult<(i64, u16)> {
        let (sql, simple) = match read {
            Read::Back(id) => (
                READ_BACK,
                format!("SELECT (SELECT count(*) FROM ryw WHERE id = {id}), inet_server_port()"),
            ),
            Read::Older(ids) => {
                let list: Vec<String> = ids.iter().map(i64::to_string).collect();
                (
                    READ_OLDER,
                    format!(
                        "SELECT (SELECT count(*) FROM ryw WHERE id IN ({})), inet_server_port()",
                        list.join(", ")
                    ),
                )
            }
        };
        let id_param;
        let ids_param;
        let param: (&(dyn ToSql + Sync), Type) = match read {
            Read::Back(id) => {
                id_param = id;
                (&id_param, Type::INT8)
            }
            Read::Older(ids) => {
                ids_param = ids.to_vec();
                (&ids_param, Type::INT8_ARRAY)
            }
        };
        let rows = match self.protocol {
            Protocol::Simple => {
                let msgs = self.client.simple_query(&simple).await.map_err(describe)?;
                let row = first_row(&msgs)?;
                let found = row.first().copied().ok_or("no count")?;
                let port = row.get(1).copied().ok_or("no port")?;
                return Ok((found, u16::try_from(port).map_err(|e| e.to_string())?));
            }
            Protocol::Extended => self.client.query_typed(sql, &[param]).await,
            Protocol::Prepared => {
                let p = &mut self.prepared;
                let (slot, ty) = match read {
                    Read::Back(_) => (&mut p.read_back, Type::INT8),
                    Read::Older(_) => (&mut p.read_older, Type::INT8_ARRAY),
                };
                match prepared(&self.client, slot, sql, &[ty]).await {
                    Ok(s) => self.client.query(&s, &[param.0]).await,
                    Err(e) => Err(e),
                }
            }
            Protocol::Transaction => {
                let tx = self
                    .client
                    .build_transaction()
                    .read_only(true)
                    .start()
                    .await
                    .map_err(describe)?;
                let rows = tx.query_typed(sql, &[param]).await.map_err(describe)?;
                tx.commit().await.map_err(describe)?;
                Ok(rows)
            }
        }
        .map_err(describe)?;
        let row = rows.first().ok_or("read returned no row")?;
        let found: i64 = row.try_get(0).map_err(describe)?;
        let port: i32 = row.try_get(1).map_err(describe)?;
        Ok((found, u16::try_from(port).map_err(|e| e.to_string())?))
    }

    /// `SHOW causeway.last_write_lsn`.
    async fn last_write_lsn(&self) -> OpResult<String> {
        let msgs = self
            .client
            .simple_query("SHOW causeway.last_write_lsn")
            .await
            .map_err(describe)?;
        msgs.iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .ok_or_else(|| "SHOW causeway.last_write_lsn returned no row".to_string())
    }

    async fn present(&self, token: &str) -> OpResult<()> {
        self.client
            .batch_execute(&format!("SET causeway.min_lsn = '{token}'"))
            .await
            .map_err(describe)
    }
}

/// The integer columns of the first row of a simple-query answer.
fn first_row(msgs: &[SimpleQueryMessage]) -> OpResult<Vec<i64>> {
    let row = msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .ok_or("no row")?;
    (0..row.len())
        .map(|i| {
            row.get(i)
                .ok_or_else(|| format!("column {i} is NULL"))?
                .parse::<i64>()
                .map_err(|e| e.to_string())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// Everything a session needs to know about the run.
struct RunCtx {
    conninfo: String,
    mode: Mode,
    protocol: Protocol,
    primary_port: u16,
    deadline: Instant,
    committed: Committed,
    older_rows: usize,
    older_reads: usize,
    think: Duration,
    readback_pause: Duration,
    eager: bool,
}

impl RunCtx {
    async fn reopen(&self, conn: &mut Conn, key: Option<&str>, out: &mut Outcome) -> bool {
        if !conn.is_closed() {
            return true;
        }
        match timed(Conn::open(&self.conninfo, self.protocol, key, self.eager)).await {
            Ok(c) => {
                *conn = c;
                true
            }
            Err(e) => {
                out.error("reconnect", e);
                tokio::time::sleep(Duration::from_millis(200)).await;
                false
            }
        }
    }

    async fn read_older(
        &self,
        conn: &mut Conn,
        rng: &mut SmallRng,
        tally: &mut Tally,
    ) -> OpResult<bool> {
        let ids = self.committed.pick(self.older_rows, rng);
        if ids.is_empty() {
            return Ok(false);
        }
        let started = Instant::now();
        let (found, port) = timed(conn.read(Read::Older(&ids))).await?;
        tally.record(
            started.elapsed(),
            found != ids.len() as i64,
            port != self.primary_port,
        );
        Ok(true)
    }
}

struct WriterConns {
    main: Conn,
    /// keyed / presented: where the read-back runs.
    second: Option<Conn>,
    key: Option<String>,
}

async fn writer_session(ctx: Arc<RunCtx>, n: i32, mut c: WriterConns) -> Outcome {
    let mut out = Outcome::default();
    let mut rng = SmallRng::from_os_rng();
    let mut seq: u64 = 0;
    while Instant::now() < ctx.deadline {
        let key = c.key.clone();
        if !ctx.reopen(&mut c.main, key.as_deref(), &mut out).await {
            continue;
        }
        if let Some(second) = c.second.as_mut()
            && !ctx.reopen(second, key.as_deref(), &mut out).await
        {
            continue;
        }
        seq += 1;
        let payload = format!("writer {n} row {seq}");
        let started = Instant::now();
        let id = match timed(c.main.insert(n, &payload)).await {
            Ok(id) => id,
            Err(e) => {
                out.writes.errors += 1;
                out.error("write", e);
                continue;
            }
        };
        out.writes.record(started.elapsed(), false, false);
        ctx.committed.push(id);

        let reader = match c.second.as_mut() {
            Some(second) => {
                if ctx.mode == Mode::Presented {
                    let started = Instant::now();
                    let handed = async {
                        let token = c.main.last_write_lsn().await?;
                        second.present(&token).await
                    };
                    match timed(handed).await {
                        Ok(()) => out.handoffs.record(started.elapsed(), false, false),
                        Err(e) => {
                            out.handoffs.errors += 1;
                            out.error("token handoff", e);
                        }
                    }
                }
                second
            }
            None => &mut c.main,
        };
        if !ctx.readback_pause.is_zero() {
            tokio::time::sleep(ctx.readback_pause).await;
        }
        let started = Instant::now();
        match timed(reader.read(Read::Back(id))).await {
            Ok((found, port)) => {
                out.read_backs
                    .record(started.elapsed(), found == 0, port != ctx.primary_port)
            }
            Err(e) => {
                out.read_backs.errors += 1;
                out.error("read-back", e);
            }
        }

        for _ in 0..ctx.older_reads {
            match ctx
                .read_older(&mut c.main, &mut rng, &mut out.older_by_writers)
                .await
            {
                Ok(true) => {}
                Ok(false) => out.skipped_older += 1,
                Err(e) => {
                    out.older_by_writers.errors += 1;
                    out.error("older-row read (writer)", e);
                }
            }
        }
        if !ctx.think.is_zero() {
            tokio::time::sleep(ctx.think).await;
        }
    }
    out
}

async fn reader_session(ctx: Arc<RunCtx>, mut conn: Conn) -> Outcome {
    let mut out = Outcome::default();
    let mut rng = SmallRng::from_os_rng();
    while Instant::now() < ctx.deadline {
        if !ctx.reopen(&mut conn, None, &mut out).await {
            continue;
        }
        match ctx
            .read_older(&mut conn, &mut rng, &mut out.older_by_readers)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                out.skipped_older += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => {
                out.older_by_readers.errors += 1;
                out.error("older-row read (reader)", e);
            }
        }
        if !ctx.think.is_zero() {
            tokio::time::sleep(ctx.think).await;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Replication lag, sampled on the primary while the load runs

#[derive(Default)]
struct LagSamples {
    /// pg_stat_replication.replay_lag in µs (rows where it is not NULL).
    replay_lag_us: Vec<u32>,
    /// Bytes between the primary's current WAL position and each replica's replay position.
    max_bytes: i64,
}

async fn sample_lag(conninfo: String, until: Instant) -> LagSamples {
    let mut s = LagSamples::default();
    let Ok(client) = connect(&conninfo).await else {
        return s;
    };
    let sql = "SELECT (extract(epoch FROM replay_lag) * 1000000)::bigint, \
               pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint \
               FROM pg_stat_replication";
    while Instant::now() < until {
        if let Ok(rows) = client.query(sql, &[]).await {
            for r in rows {
                if let Ok(Some(us)) = r.try_get::<_, Option<i64>>(0) {
                    s.replay_lag_us
                        .push(u32::try_from(us.max(0)).unwrap_or(u32::MAX));
                }
                if let Ok(Some(b)) = r.try_get::<_, Option<i64>>(1) {
                    s.max_bytes = s.max_bytes.max(b);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    s.replay_lag_us.sort_unstable();
    s
}

// ---------------------------------------------------------------------------------------------
// One mode

struct ProxyCounters {
    routes: Vec<(&'static str, u64)>,
    node_queries: Vec<u64>,
    causal_waits: u64,
    causal_wait_us: u64,
    causal_wait_hits: u64,
    tokens: u64,
    retried_reads: u64,
    pins: u64,
}

impl ProxyCounters {
    fn read(p: &Running) -> Self {
        let s = &p.shared.stats;
        ProxyCounters {
            routes: s.routes(),
            node_queries: p
                .shared
                .cluster
                .nodes()
                .iter()
                .map(|n| n.queries.load(Ordering::Relaxed))
                .collect(),
            causal_waits: s.causal_waits.load(Ordering::Relaxed),
            causal_wait_us: s.causal_wait_us.load(Ordering::Relaxed),
            causal_wait_hits: s.causal_wait_hits.load(Ordering::Relaxed),
            tokens: s.tokens.load(Ordering::Relaxed),
            retried_reads: s.retried_reads.load(Ordering::Relaxed),
            pins: s.pins.load(Ordering::Relaxed),
        }
    }

    fn since(&self, before: &ProxyCounters) -> ProxyCounters {
        ProxyCounters {
            routes: self
                .routes
                .iter()
                .zip(&before.routes)
                .map(|((name, a), (_, b))| (*name, a - b))
                .collect(),
            node_queries: self
                .node_queries
                .iter()
                .zip(&before.node_queries)
                .map(|(a, b)| a - b)
                .collect(),
            causal_waits: self.causal_waits - before.causal_waits,
            causal_wait_us: self.causal_wait_us - before.causal_wait_us,
            causal_wait_hits: self.causal_wait_hits - before.causal_wait_hits,
            tokens: self.tokens - before.tokens,
            retried_reads: self.retried_reads - before.retried_reads,
            pins: self.pins - before.pins,
        }
    }
}

struct ModeResult {
    mode: Mode,
    out: Outcome,
    elapsed: Duration,
    proxy: ProxyCounters,
    lag: LagSamples,
}

fn conninfo(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=app password={PASSWORD} dbname=app")
}

/// Waits until every replica has replayed the primary's current WAL position.
async fn caught_up(cluster: &LocalCluster, timeout: Duration) -> OpResult<()> {
    let admin = connect(&cluster.superuser_conninfo(&cluster.primary)).await?;
    let lsn: String = admin
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(describe)?
        .get(0);
    let until = Instant::now() + timeout;
    for r in &cluster.replicas {
        let rc = connect(&cluster.superuser_conninfo(r)).await?;
        loop {
            let ok: bool = rc
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&lsn],
                )
                .await
                .map_err(describe)?
                .get(0);
            if ok {
                break;
            }
            if Instant::now() > until {
                return Err(format!(
                    "{} did not replay up to {lsn} in {timeout:?}",
                    r.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Empties the table, writes the seed rows and waits until they are old and replicated.
async fn prepare_table(
    cluster: &LocalCluster,
    primary: &Client,
    args: &Args,
    committed: &Committed,
) -> OpResult<()> {
    primary
        .batch_execute("TRUNCATE ryw")
        .await
        .map_err(describe)?;
    let rows = primary
        .query(
            "INSERT INTO ryw (writer, payload) SELECT -1, 'seed ' || g \
             FROM generate_series(1, $1::bigint) g RETURNING id",
            &[&args.seed_rows],
        )
        .await
        .map_err(describe)?;
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    committed.push_all(&ids);
    primary
        .batch_execute("ANALYZE ryw")
        .await
        .map_err(describe)?;
    let old_enough = Instant::now() + committed.age;
    caught_up(cluster, Duration::from_secs(60)).await?;
    tokio::time::sleep_until(old_enough.into()).await;
    Ok(())
}

async fn run_mode(
    cluster: &LocalCluster,
    primary: &Client,
    args: &Args,
    mode: Mode,
) -> OpResult<ModeResult> {
    let mut text = causeway::demo::config_for(cluster, "127.0.0.1:0");
    let _ = write!(text, "\n[consistency]\nmode = \"{}\"\n", mode.proxy_mode());
    for line in &args.proxy_toml {
        text.push_str(line);
        text.push('\n');
    }
    let cfg = Config::from_toml(&text).map_err(|e| format!("proxy config: {e}\n{text}"))?;
    let proxy = server::start(Arc::new(cfg))
        .await
        .map_err(|e| format!("starting the proxy: {e}"))?;
    let result = run_load(cluster, primary, args, mode, &proxy).await;
    proxy.stop().await;
    result
}

async fn run_load(
    cluster: &LocalCluster,
    primary: &Client,
    args: &Args,
    mode: Mode,
    proxy: &Running,
) -> OpResult<ModeResult> {
    let committed = Committed {
        rows: Mutex::new(Vec::new()),
        age: Duration::from_millis(args.older_age_ms),
    };
    prepare_table(cluster, primary, args, &committed).await?;

    let proxy_conninfo = conninfo(proxy.addr.port());
    let mut writers = Vec::with_capacity(args.writers);
    for i in 0..args.writers {
        let key = (mode == Mode::Keyed).then(|| format!("user:{i}"));
        let main = Conn::open(
            &proxy_conninfo,
            args.protocol,
            key.as_deref(),
            args.prepare_at_connect,
        )
        .await?;
        let second = if mode.second_connection() {
            Some(
                Conn::open(
                    &proxy_conninfo,
                    args.protocol,
                    key.as_deref(),
                    args.prepare_at_connect,
                )
                .await?,
            )
        } else {
            None
        };
        writers.push(WriterConns { main, second, key });
    }
    let mut readers = Vec::with_capacity(args.readers);
    for _ in 0..args.readers {
        readers.push(
            Conn::open(
                &proxy_conninfo,
                args.protocol,
                None,
                args.prepare_at_connect,
            )
            .await?,
        );
    }

    let before = ProxyCounters::read(proxy);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let ctx = Arc::new(RunCtx {
        conninfo: proxy_conninfo,
        mode,
        protocol: args.protocol,
        primary_port: cluster.primary.port,
        deadline,
        committed,
        older_rows: args.older_rows,
        older_reads: args.older_reads,
        think: Duration::from_millis(args.think_ms),
        readback_pause: Duration::from_micros(args.readback_pause_us),
        eager: args.prepare_at_connect,
    });
    let lag = tokio::spawn(sample_lag(
        cluster.superuser_conninfo(&cluster.primary),
        deadline,
    ));
    let mut tasks = Vec::new();
    for (i, conns) in writers.into_iter().enumerate() {
        let n = i32::try_from(i).unwrap_or(i32::MAX);
        tasks.push(tokio::spawn(writer_session(Arc::clone(&ctx), n, conns)));
    }
    for conn in readers {
        tasks.push(tokio::spawn(reader_session(Arc::clone(&ctx), conn)));
    }
    let mut out = Outcome::default();
    // Each session stops at the deadline after its current iteration; every statement has its
    // own timeout, so this bound only guards against a task that never yields.
    let hard_stop = deadline + OP_TIMEOUT * 4 + Duration::from_secs(5);
    for t in tasks {
        let abort = t.abort_handle();
        match tokio::time::timeout_at(hard_stop.into(), t).await {
            Ok(Ok(o)) => out.merge(o),
            Ok(Err(e)) => out.error("session task", e.to_string()),
            Err(_) => {
                abort.abort();
                out.error(
                    "session task",
                    "still running at the hard stop; aborted".into(),
                );
            }
        }
    }
    let elapsed = started.elapsed();
    let counters = ProxyCounters::read(proxy).since(&before);
    let lag = lag.await.unwrap_or_default();
    for t in [
        &mut out.writes,
        &mut out.read_backs,
        &mut out.older_by_writers,
        &mut out.older_by_readers,
        &mut out.handoffs,
    ] {
        t.finish();
    }
    Ok(ModeResult {
        mode,
        out,
        elapsed,
        proxy: counters,
        lag,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.2}")
    }
}

fn fmt_pct(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.1}%")
    }
}

fn print_result(args: &Args, nodes: &[&NodeInfo], r: &ModeResult) {
    let secs = r.elapsed.as_secs_f64();
    let delay = if args.delay_ms > 0 {
        format!("{} ms (recovery_min_apply_delay)", args.delay_ms)
    } else {
        "0 (natural lag)".to_string()
    };
    println!();
    println!(
        "=== mode {} (proxy consistency.mode = {}) | protocol {} | replica delay {} | {} s ===",
        r.mode.name(),
        r.mode.proxy_mode(),
        args.protocol.name(),
        delay,
        args.duration
    );
    println!(
        "sessions: {} writing{}, {} reader-only; older-row reads name {} ids committed >= {} ms ago",
        args.writers,
        if r.mode.second_connection() {
            " (each with a second connection for the read-back)"
        } else {
            ""
        },
        args.readers,
        args.older_rows,
        args.older_age_ms
    );
    let o = &r.out;
    println!(
        "{:<26} {:>8} {:>7} {:>8} {:>12} {:>9} {:>9} {:>7}",
        "", "count", "per s", "stale", "on replicas", "p50 ms", "p99 ms", "errors"
    );
    let line = |name: &str, t: &Tally, reads: bool| {
        println!(
            "{:<26} {:>8} {:>7.0} {:>8} {:>12} {:>9} {:>9} {:>7}",
            name,
            t.count,
            t.count as f64 / secs,
            if reads {
                t.stale.to_string()
            } else {
                "".into()
            },
            if reads {
                fmt_pct(t.replica_share())
            } else {
                "".into()
            },
            fmt_ms(t.pct_ms(50.0)),
            fmt_ms(t.pct_ms(99.0)),
            t.errors
        );
    };
    line("writes", &o.writes, false);
    if r.mode == Mode::Presented {
        line("token handoffs (SHOW+SET)", &o.handoffs, false);
    }
    line("read-backs", &o.read_backs, true);
    line("older rows, writers", &o.older_by_writers, true);
    line("older rows, reader-only", &o.older_by_readers, true);
    if o.skipped_older > 0 {
        println!(
            "older-row reads skipped (no row old enough yet): {}",
            o.skipped_older
        );
    }
    if o.error_count > 0 {
        println!("errors: {} in all; first ones:", o.error_count);
        for e in &o.errors {
            println!("  {e}");
        }
    }
    let p = &r.proxy;
    let routes: Vec<String> = p
        .routes
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name}={n}"))
        .collect();
    println!("proxy routed:  {}", routes.join(" "));
    let per_node: Vec<String> = nodes
        .iter()
        .zip(&p.node_queries)
        .map(|(node, n)| format!("{}={n}", node.name))
        .collect();
    println!("proxy per node: {}", per_node.join(" "));
    let avg_wait = if p.causal_waits > 0 {
        format!(
            "{:.2} ms avg",
            p.causal_wait_us as f64 / p.causal_waits as f64 / 1000.0
        )
    } else {
        "-".into()
    };
    println!(
        "proxy causal waits: {} ({avg_wait}), then on a replica: {}; tokens: {}; retried reads: {}; pins: {}",
        p.causal_waits, p.causal_wait_hits, p.tokens, p.retried_reads, p.pins
    );
    let lag = &r.lag;
    let lag_pct = |q: f64| {
        if lag.replay_lag_us.is_empty() {
            return "-".to_string();
        }
        let i = ((q / 100.0 * lag.replay_lag_us.len() as f64).ceil() as usize)
            .clamp(1, lag.replay_lag_us.len())
            - 1;
        format!("{:.1}", f64::from(lag.replay_lag_us[i]) / 1000.0)
    };
    println!(
        "replication (pg_stat_replication every 250 ms): replay_lag p50 {} ms, max {} ms; max replay gap {} bytes",
        lag_pct(50.0),
        lag_pct(100.0),
        lag.max_bytes
    );
}

/// One acceptance target's verdict (or, when `target` is false, a check the product does not
/// list as a target but the feature promises).
struct Verdict {
    what: String,
    holds: bool,
    detail: String,
    target: bool,
}

fn judge(args: &Args, results: &[ModeResult]) -> Vec<Verdict> {
    let mut v = Vec::new();
    for r in results {
        let o = &r.out;
        let stale = o.read_backs.stale + o.older_by_writers.stale + o.older_by_readers.stale;
        let errors = o.error_count;
        if r.mode.promises_ryw() {
            v.push(Verdict {
                what: if args.delay_ms > 0 {
                    format!(
                        "{}: zero stale reads at {} ms delay",
                        r.mode.name(),
                        args.delay_ms
                    )
                } else {
                    format!("{}: zero stale reads at natural lag", r.mode.name())
                },
                target: args.delay_ms > 0,
                holds: stale == 0 && errors == 0 && o.read_backs.count > 0,
                detail: format!(
                    "{stale} stale of {} reads ({} read-backs), {errors} errors",
                    o.read_backs.count + o.older_by_writers.count + o.older_by_readers.count,
                    o.read_backs.count
                ),
            });
        }
        let share = o.older_by_readers.replica_share();
        v.push(Verdict {
            what: format!("{}: reader-only sessions >= 95% on replicas", r.mode.name()),
            holds: share >= 95.0,
            target: true,
            detail: format!(
                "{} of {} reads ({})",
                o.older_by_readers.on_replica,
                o.older_by_readers.count,
                fmt_pct(share)
            ),
        });
        if r.mode == Mode::Lsn && args.delay_ms == 0 {
            let share = o.older_by_writers.replica_share();
            v.push(Verdict {
                what: "lsn at natural lag: writers' older-row reads >= 80% on replicas".into(),
                holds: share >= 80.0,
                target: true,
                detail: format!(
                    "{} of {} reads ({})",
                    o.older_by_writers.on_replica,
                    o.older_by_writers.count,
                    fmt_pct(share)
                ),
            });
        }
    }
    v
}

fn print_summary(args: &Args, results: &[ModeResult]) -> bool {
    println!();
    println!(
        "=== summary: protocol {}, replica delay {} ms, {} s per mode ===",
        args.protocol.name(),
        args.delay_ms,
        args.duration
    );
    println!(
        "{:<11} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "mode",
        "writes/s",
        "stale",
        "rb stale",
        "rb repl",
        "rb p99",
        "old-w repl",
        "old-r repl",
        "old-r p99",
        "errors"
    );
    for r in results {
        let o = &r.out;
        let secs = r.elapsed.as_secs_f64();
        println!(
            "{:<11} {:>9.0} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
            r.mode.name(),
            o.writes.count as f64 / secs,
            o.read_backs.stale + o.older_by_writers.stale + o.older_by_readers.stale,
            o.read_backs.stale,
            fmt_pct(o.read_backs.replica_share()),
            fmt_ms(o.read_backs.pct_ms(99.0)),
            fmt_pct(o.older_by_writers.replica_share()),
            fmt_pct(o.older_by_readers.replica_share()),
            fmt_ms(o.older_by_readers.pct_ms(99.0)),
            o.error_count
        );
    }
    println!(
        "(rb = read-backs, old-w / old-r = older-row reads by writing / reader-only sessions, p99 in ms)"
    );
    let verdicts = judge(args, results);
    let mut all = true;
    for v in &verdicts {
        if v.target {
            all &= v.holds;
        }
        println!(
            "{} {:<4} {}: {}",
            if v.target { "target" } else { "check " },
            if v.holds { "OK" } else { "MISS" },
            v.what,
            v.detail
        );
    }
    all
}

// ---------------------------------------------------------------------------------------------

async fn run_all(cluster: &LocalCluster, args: &Args) -> OpResult<Vec<ModeResult>> {
    let primary = connect(&conninfo(cluster.primary.port)).await?;
    primary
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS ryw (id bigserial PRIMARY KEY, writer int, \
             written_at timestamptz DEFAULT clock_timestamp(), payload text)",
        )
        .await
        .map_err(describe)?;
    let nodes: Vec<&NodeInfo> = std::iter::once(&cluster.primary)
        .chain(&cluster.replicas)
        .collect();
    let mut results = Vec::new();
    for &mode in &args.modes {
        eprintln!(
            "[{}] running mode {} for {} s...",
            chrono_now(),
            mode.name(),
            args.duration
        );
        let r = run_mode(cluster, &primary, args, mode).await?;
        print_result(args, &nodes, &r);
        results.push(r);
    }
    Ok(results)
}

/// Seconds since the Unix epoch, for progress lines (no date crate needed).
fn chrono_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.modes.is_empty() || args.duration == 0 || args.writers + args.readers == 0 {
        eprintln!("nothing to run: give at least one mode, a duration and some sessions");
        return ExitCode::from(2);
    }
    support::init_logging();
    let mut opts = ClusterOptions::default();
    if args.delay_ms > 0 {
        opts.replica_conf = vec![(
            "recovery_min_apply_delay".into(),
            format!("{}ms", args.delay_ms),
        )];
    }
    eprintln!(
        "[{}] starting a primary and two streaming replicas...",
        chrono_now()
    );
    let cluster = match support::start_cluster(opts) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!(
        "cluster: primary 127.0.0.1:{}, {}; replica delay {}",
        cluster.primary.port,
        cluster
            .replicas
            .iter()
            .map(|r| format!("{} 127.0.0.1:{}", r.name, r.port))
            .collect::<Vec<_>>()
            .join(", "),
        if args.delay_ms > 0 {
            format!("{} ms", args.delay_ms)
        } else {
            "none (natural lag)".into()
        }
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
    // Sessions and monitors still hold connections; drop them before the servers go.
    runtime.shutdown_timeout(Duration::from_secs(2));
    eprintln!("[{}] stopping the cluster...", chrono_now());
    cluster.stop();
    let verdict = outcome.map(|r| r.map(|results| print_summary(&args, &results)));
    support::exit_code(verdict, "load test", args.strict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut t = Tally::default();
        for us in (1..=100).rev() {
            t.record(Duration::from_micros(us * 1000), false, us % 2 == 0);
        }
        t.finish();
        assert_eq!(t.pct_ms(50.0), 50.0);
        assert_eq!(t.pct_ms(99.0), 99.0);
        assert_eq!(t.pct_ms(100.0), 100.0);
        assert_eq!(t.replica_share(), 50.0);
        assert!(Tally::default().pct_ms(50.0).is_nan());
    }

    #[test]
    fn only_rows_old_enough_are_picked() {
        let c = Committed {
            rows: Mutex::new(Vec::new()),
            age: Duration::from_millis(50),
        };
        let mut rng = SmallRng::seed_from_u64(1);
        c.push_all(&[1, 2, 3]);
        assert!(c.pick(10, &mut rng).is_empty(), "too young");
        std::thread::sleep(Duration::from_millis(60));
        c.push(4);
        let ids = c.pick(10, &mut rng);
        assert!(
            !ids.is_empty() && ids.iter().all(|id| (1..=3).contains(id)),
            "{ids:?}"
        );
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
    }
}
