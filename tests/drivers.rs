//! Driver compatibility: real client drivers through the proxy in transaction-pooling mode.
//!
//! Each test starts its own cluster and runs one driver's program from tests/drivers/ (or, for
//! tokio-postgres, the cases below) over the same cases: connect (SCRAM), simple and
//! parameterized queries, a prepared statement reused past the driver's server-side threshold,
//! commit and rollback, an error inside a transaction then ROLLBACK, COPY in and out,
//! LISTEN/NOTIFY, cancelling `pg_sleep(10)` through the proxy's cancel path, and an autocommit
//! read landing on a replica. A program prints `ok|FAIL|skip <driver> <case>` per case.
//!
//! A missing driver runtime fails its test with a pointer to scripts/test, which installs them:
//! a green run always means every driver was exercised.

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use causeway::config::AuthMethod;
use common::process::{self, output, python_with, runs, text};
use common::{Env, PASSWORD, connect};
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

/// Cases every driver reports (as ok, FAIL or skip).
const CASES: &[&str] = &[
    "connect",
    "simple_query",
    "parameterized_query",
    "prepared_reuse",
    "transaction",
    "error_recovery",
    "copy",
    "listen_notify",
    "cancel",
    "replica_read",
];

/// The table every driver program expects, empty and replayed on the replicas.
const SETUP: &str = "CREATE TABLE drv_items (id int PRIMARY KEY, name text)";

/// Longest run of one driver program; cluster start-up comes on top, under 60 s in all.
const PROGRAM_TIMEOUT_S: u64 = 40;

/// Longest run of one in-process tokio-postgres case.
const CASE_TIMEOUT: Duration = Duration::from_secs(8);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Starts a cluster and proxy with `drv_items` created on the primary and replayed everywhere.
async fn setup() -> Env {
    let env = common::start().await;
    // Every driver's `connect` case logs in through this: SCRAM is what it exercises.
    assert_eq!(
        env.proxy.shared.cfg.load().auth.method,
        AuthMethod::ScramSha256,
        "the test proxy must ask clients for SCRAM-SHA-256"
    );
    let owner = connect(&format!(
        "host=127.0.0.1 port={} user=app password={PASSWORD} dbname=app",
        env.node_port(0)
    ))
    .await;
    owner.batch_execute(SETUP).await.expect("create drv_items");
    env.caught_up().await;
    env
}

/// `postgres://` URL of the proxy, for asyncpg, node-pg and pgx.
fn url(env: &Env) -> String {
    format!("postgres://app:{PASSWORD}@127.0.0.1:{}/app", env.port())
}

// --- running a driver program ----------------------------------------------------------------

/// A driver program bounded in time, run from the project root.
fn bounded(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = process::bounded(PROGRAM_TIMEOUT_S, program);
    cmd.current_dir(root());
    cmd
}

/// Per-case counts parsed from a driver's `ok|FAIL|skip <driver> <case>` lines.
#[derive(Debug, Default)]
struct Tally {
    passed: Vec<String>,
    failed: Vec<String>,
    skipped: Vec<String>,
}

impl Tally {
    fn parse(driver: &str, stdout: &str) -> Tally {
        let mut t = Tally::default();
        for line in stdout.lines() {
            let mut words = line.splitn(3, ' ');
            let (Some(verdict), Some(d), Some(rest)) = (words.next(), words.next(), words.next())
            else {
                continue;
            };
            if d != driver {
                continue;
            }
            let case = rest.split(':').next().unwrap_or(rest).trim().to_string();
            match verdict {
                "ok" => t.passed.push(case),
                "FAIL" => t.failed.push(case),
                "skip" => t.skipped.push(case),
                _ => {}
            }
        }
        t
    }

    /// Expected cases the driver never reported (it crashed or was killed first).
    fn missing(&self) -> Vec<&'static str> {
        CASES
            .iter()
            .copied()
            .filter(|c| {
                ![&self.passed, &self.failed, &self.skipped]
                    .iter()
                    .any(|v| v.iter().any(|x| x == c))
            })
            .collect()
    }

    fn summary(&self) -> String {
        let mut s = format!("{} passed, {} failed", self.passed.len(), self.failed.len());
        if !self.skipped.is_empty() {
            s.push_str(&format!(", {} skipped", self.skipped.len()));
        }
        s
    }
}

/// Prints a driver's report and summary; panics unless it exited 0 with every case reported
/// and none failed.
fn assert_driver(driver: &str, success: bool, status: &str, stdout: &str, stderr: &str) {
    println!("{stdout}");
    if !stderr.trim().is_empty() {
        eprintln!("--- {driver} stderr\n{stderr}");
    }
    let tally = Tally::parse(driver, stdout);
    let missing = tally.missing();
    println!("{driver}: {}", tally.summary());
    assert!(
        success && tally.failed.is_empty() && missing.is_empty(),
        "{driver}: {} ({status}); failed: {:?}; never reported: {missing:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        tally.summary(),
        tally.failed,
    );
}

/// Runs a driver program and asserts on its report.
async fn run_driver(driver: &str, cmd: Command) {
    let t0 = Instant::now();
    let out = output(cmd).await;
    println!("{driver}: program ran {:.1} s", t0.elapsed().as_secs_f64());
    assert_driver(
        driver,
        out.status.success(),
        &out.status.to_string(),
        &text(&out.stdout),
        &text(&out.stderr),
    );
}

// --- runtimes ----------------------------------------------------------------------------------

/// `node`, with tests/drivers/node/node_modules installed.
fn node() -> PathBuf {
    assert!(
        runs("node", &["--version"]),
        "`node` is not runnable: install Node.js, then run scripts/test"
    );
    let modules = root().join("tests/drivers/node/node_modules");
    for package in ["pg", "pg-copy-streams"] {
        assert!(
            modules.join(package).join("package.json").exists(),
            "{} has no {package}: run scripts/test (it runs `npm ci` in tests/drivers/node)",
            modules.display()
        );
    }
    PathBuf::from("node")
}

/// The pgjdbc jar (Debian package libpostgresql-jdbc-java).
const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// Compiles PgjdbcDriver.java into a fresh directory under target/drivers/java (so concurrent
/// runs never load each other's half-written classes); it is removed when dropped.
async fn compile_pgjdbc_driver() -> tempfile::TempDir {
    assert!(
        runs("javac", &["-version"]) && runs("java", &["-version"]),
        "`javac`/`java` are not runnable: run scripts/test (it installs default-jdk-headless)"
    );
    assert!(
        Path::new(PGJDBC_JAR).exists(),
        "{PGJDBC_JAR} is missing: run scripts/test (it installs libpostgresql-jdbc-java)"
    );
    let parent = root().join("target/drivers/java");
    std::fs::create_dir_all(&parent).expect("create target/drivers/java");
    let out_dir = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&parent)
        .expect("class output directory");
    let mut cmd = Command::new("javac");
    cmd.arg("-Xlint:all")
        .arg("-Werror")
        .arg("-d")
        .arg(out_dir.path())
        .arg("-cp")
        .arg(PGJDBC_JAR)
        .arg(root().join("tests/drivers/java/PgjdbcDriver.java"))
        .stdin(Stdio::null());
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "javac PgjdbcDriver.java failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out_dir
}

/// Where Debian's Go packages (golang-github-jackc-pgx-v4-dev) keep their sources.
const GO_PATH: &str = "/usr/share/gocode";

/// Builds pgx_driver.go against Debian's pgx v4 (GOPATH mode: no module download) into a fresh
/// directory under target/drivers/go, removed when dropped; the build cache beside it is kept.
async fn build_pgx_driver() -> tempfile::TempDir {
    assert!(
        runs("go", &["version"]),
        "`go` is not runnable: run scripts/test (it installs golang-go)"
    );
    let pgx = Path::new(GO_PATH).join("src/github.com/jackc/pgx/v4");
    assert!(
        pgx.exists(),
        "{} is missing: run scripts/test (it installs golang-github-jackc-pgx-v4-dev)",
        pgx.display()
    );
    let parent = root().join("target/drivers/go");
    std::fs::create_dir_all(&parent).expect("create target/drivers/go");
    let out_dir = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&parent)
        .expect("binary output directory");
    let mut cmd = Command::new("go");
    cmd.arg("build")
        .arg("-o")
        .arg(out_dir.path().join("pgx_driver"))
        .arg(root().join("tests/drivers/go/pgx_driver.go"))
        .env("GO111MODULE", "off")
        .env("GOPATH", GO_PATH)
        .env("GOCACHE", parent.join("cache"))
        .env("GOFLAGS", "")
        .stdin(Stdio::null());
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "go build pgx_driver.go failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out_dir
}

// --- one test per driver -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg() {
    let python = python_with("psycopg");
    let env = setup().await;
    let mut cmd = bounded(python);
    cmd.arg(root().join("tests/drivers/python/psycopg_driver.py"))
        .arg(env.conninfo())
        .arg(env.node_port(0).to_string());
    run_driver("psycopg", cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg() {
    let python = python_with("asyncpg");
    let env = setup().await;
    let mut cmd = bounded(python);
    cmd.arg(root().join("tests/drivers/python/asyncpg_driver.py"))
        .arg(url(&env))
        .arg(env.node_port(0).to_string());
    run_driver("asyncpg", cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pg() {
    let node = node();
    let env = setup().await;
    let mut cmd = bounded(node);
    cmd.arg(root().join("tests/drivers/node/pg_driver.js"))
        .arg(url(&env))
        .arg(env.node_port(0).to_string());
    run_driver("node-pg", cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc() {
    let classes = compile_pgjdbc_driver().await;
    let env = setup().await;
    let mut cmd = bounded("java");
    cmd.arg("-cp")
        .arg(format!("{}:{PGJDBC_JAR}", classes.path().display()))
        .arg("PgjdbcDriver")
        .arg(format!("jdbc:postgresql://127.0.0.1:{}/app", env.port()))
        .arg(env.node_port(0).to_string());
    run_driver("pgjdbc", cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgx() {
    let build = build_pgx_driver().await;
    let env = setup().await;
    let mut cmd = bounded(build.path().join("pgx_driver"));
    cmd.arg(url(&env)).arg(env.node_port(0).to_string());
    run_driver("pgx", cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres() {
    let env = setup().await;
    let ctx = Ctx {
        conninfo: env.conninfo(),
        primary_port: i32::from(env.node_port(0)),
    };
    type Case<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
    let cases: Vec<(&str, Case<'_>)> = vec![
        ("connect", Box::pin(tp::connect(&ctx))),
        ("simple_query", Box::pin(tp::simple_query(&ctx))),
        (
            "parameterized_query",
            Box::pin(tp::parameterized_query(&ctx)),
        ),
        ("prepared_reuse", Box::pin(tp::prepared_reuse(&ctx))),
        ("transaction", Box::pin(tp::transaction(&ctx))),
        ("error_recovery", Box::pin(tp::error_recovery(&ctx))),
        ("copy", Box::pin(tp::copy(&ctx))),
        ("listen_notify", Box::pin(tp::listen_notify(&ctx))),
        ("cancel", Box::pin(tp::cancel(&ctx))),
        ("replica_read", Box::pin(tp::replica_read(&ctx))),
    ];
    let mut report = String::new();
    for (name, case) in cases {
        let line = match tokio::time::timeout(CASE_TIMEOUT, case).await {
            Ok(Ok(())) => format!("ok tokio-postgres {name}"),
            Ok(Err(e)) => format!("FAIL tokio-postgres {name}: {e}"),
            Err(_) => format!("FAIL tokio-postgres {name}: timed out after {CASE_TIMEOUT:?}"),
        };
        report.push_str(&line);
        report.push('\n');
    }
    assert_driver("tokio-postgres", true, "in-process", &report, "");
}

// --- tokio-postgres cases ----------------------------------------------------------------------

/// What the in-process tokio-postgres cases need.
struct Ctx {
    conninfo: String,
    primary_port: i32,
}

mod tp {
    use super::*;

    type R = Result<(), String>;

    /// An error as `[SQLSTATE xxxxx] message` when the server sent one.
    pub fn pg(e: tokio_postgres::Error) -> String {
        match e.as_db_error() {
            Some(db) => format!("[SQLSTATE {}] {}", db.code().code(), db.message()),
            None => e.to_string(),
        }
    }

    fn check(cond: bool, message: impl FnOnce() -> String) -> R {
        if cond { Ok(()) } else { Err(message()) }
    }

    /// Expects `res` to be an error with SQLSTATE `code`.
    fn expect_code<T>(res: Result<T, tokio_postgres::Error>, code: &SqlState, what: &str) -> R {
        match res {
            Ok(_) => Err(format!("{what}: did not fail")),
            Err(e) if e.code() == Some(code) => Ok(()),
            Err(e) => Err(format!("{what}: expected {}, got {}", code.code(), pg(e))),
        }
    }

    async fn client(conninfo: &str) -> Result<tokio_postgres::Client, String> {
        let (client, conn) = tokio_postgres::connect(conninfo, NoTls).await.map_err(pg)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// A read-write transaction runs on the primary, so it sees rows a replica may not have
    /// replayed yet.
    async fn count_on_primary(
        c: &mut tokio_postgres::Client,
        lo: i32,
        hi: i32,
    ) -> Result<i64, String> {
        let tx = c.transaction().await.map_err(pg)?;
        let n: i64 = tx
            .query_one(
                "SELECT count(*) FROM drv_items WHERE id BETWEEN $1 AND $2",
                &[&lo, &hi],
            )
            .await
            .map_err(pg)?
            .get(0);
        tx.commit().await.map_err(pg)?;
        Ok(n)
    }

    pub async fn connect(ctx: &Ctx) -> R {
        let c = client(&ctx.conninfo).await?;
        let user: String = c
            .query_one("SELECT current_user::text", &[])
            .await
            .map_err(pg)?
            .get(0);
        check(user == "app", || format!("current_user {user}"))?;
        let bad = ctx.conninfo.replace(PASSWORD, "wrong");
        let res = tokio_postgres::connect(&bad, NoTls).await;
        expect_code(res, &SqlState::INVALID_PASSWORD, "wrong password")
    }

    pub async fn simple_query(ctx: &Ctx) -> R {
        let c = client(&ctx.conninfo).await?;
        let msgs = c.simple_query("SELECT 1; SELECT 'two'").await.map_err(pg)?;
        let values: Vec<Option<String>> = msgs
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
                _ => None,
            })
            .collect();
        check(
            values == [Some("1".to_string()), Some("two".to_string())],
            || format!("rows {values:?}"),
        )
    }

    pub async fn parameterized_query(ctx: &Ctx) -> R {
        let c = client(&ctx.conninfo).await?;
        let row = c
            .query_one("SELECT $1::int + $2::int, $3::text", &[&40i32, &2i32, &"x"])
            .await
            .map_err(pg)?;
        let (sum, t): (i32, String) = (row.get(0), row.get(1));
        check(sum == 42 && t == "x", || format!("got {sum} {t}"))
    }

    pub async fn prepared_reuse(ctx: &Ctx) -> R {
        let mut c = client(&ctx.conninfo).await?;
        // prepare() creates a named statement; each run only Binds it. Outside a transaction
        // the runs may land on different replicas.
        let st = c.prepare("SELECT $1::int * 2").await.map_err(pg)?;
        for i in 0..10i32 {
            let v: i32 = c.query_one(&st, &[&i]).await.map_err(pg)?.get(0);
            check(v == i * 2, || format!("run {i}: {v}"))?;
        }
        let tx = c.transaction().await.map_err(pg)?;
        let st = tx
            .prepare("SELECT $1::int + 1, inet_server_port()")
            .await
            .map_err(pg)?;
        for i in 0..10i32 {
            let row = tx.query_one(&st, &[&i]).await.map_err(pg)?;
            let (v, port): (i32, i32) = (row.get(0), row.get(1));
            check(v == i + 1 && port == ctx.primary_port, || {
                format!("in a transaction, run {i}: {v} on {port}")
            })?;
        }
        tx.commit().await.map_err(pg)
    }

    pub async fn transaction(ctx: &Ctx) -> R {
        let mut c = client(&ctx.conninfo).await?;
        let tx = c.transaction().await.map_err(pg)?;
        tx.execute("INSERT INTO drv_items VALUES ($1, 'kept')", &[&1i32])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        let n = count_on_primary(&mut c, 1, 1).await?;
        check(n == 1, || "committed row not visible".into())?;
        let tx = c.transaction().await.map_err(pg)?;
        tx.execute("INSERT INTO drv_items VALUES ($1, 'dropped')", &[&2i32])
            .await
            .map_err(pg)?;
        tx.rollback().await.map_err(pg)?;
        let n = count_on_primary(&mut c, 2, 2).await?;
        check(n == 0, || "rolled-back row visible".into())
    }

    pub async fn error_recovery(ctx: &Ctx) -> R {
        let mut c = client(&ctx.conninfo).await?;
        let tx = c.transaction().await.map_err(pg)?;
        tx.execute(
            "INSERT INTO drv_items VALUES ($1, 'rolled back')",
            &[&10i32],
        )
        .await
        .map_err(pg)?;
        expect_code(
            tx.query_one("SELECT 1/0", &[]).await,
            &SqlState::DIVISION_BY_ZERO,
            "division by zero",
        )?;
        expect_code(
            tx.query_one("SELECT 1", &[]).await,
            &SqlState::IN_FAILED_SQL_TRANSACTION,
            "statement in an aborted transaction",
        )?;
        tx.rollback().await.map_err(pg)?;
        let v: i32 = c.query_one("SELECT 7", &[]).await.map_err(pg)?.get(0);
        check(v == 7, || "connection unusable after ROLLBACK".into())?;
        let n = count_on_primary(&mut c, 10, 10).await?;
        check(n == 0, || "rolled-back row visible".into())
    }

    pub async fn copy(ctx: &Ctx) -> R {
        let mut c = client(&ctx.conninfo).await?;
        let sink = c
            .copy_in("COPY drv_items (id, name) FROM STDIN")
            .await
            .map_err(pg)?;
        futures_util::pin_mut!(sink);
        let data: String = (100..600).map(|i| format!("{i}\tcopied {i}\n")).collect();
        sink.send(Bytes::from(data)).await.map_err(pg)?;
        let n = sink.finish().await.map_err(pg)?;
        check(n == 500, || format!("copy_in reported {n} rows"))?;
        // In a read-write transaction, so the primary answers: a replica may lag.
        let tx = c.transaction().await.map_err(pg)?;
        let stream = tx
            .copy_out(
                "COPY (SELECT id, name FROM drv_items WHERE id BETWEEN 100 AND 599 ORDER BY id) \
                 TO STDOUT",
            )
            .await
            .map_err(pg)?;
        let chunks: Vec<Bytes> = stream.try_collect().await.map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        let out = String::from_utf8_lossy(&chunks.concat()).into_owned();
        let lines: Vec<&str> = out.lines().collect();
        check(lines.len() == 500, || {
            format!("copy_out returned {} lines", lines.len())
        })?;
        check(
            lines[0] == "100\tcopied 100" && lines[499] == "599\tcopied 599",
            || "row contents".into(),
        )
    }

    pub async fn listen_notify(ctx: &Ctx) -> R {
        // Notifications arrive on the Connection, so drive it by hand to see them.
        let (listener, mut conn) = tokio_postgres::connect(&ctx.conninfo, NoTls)
            .await
            .map_err(pg)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(m)) = messages.next().await {
                if let AsyncMessage::Notification(n) = m {
                    let _ = tx.send(n);
                }
            }
        });
        let sender = client(&ctx.conninfo).await?;
        listener
            .batch_execute("LISTEN drv_channel")
            .await
            .map_err(pg)?;
        sender
            .batch_execute("NOTIFY drv_channel, 'hello'")
            .await
            .map_err(pg)?;
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(n)) => check(
                n.channel() == "drv_channel" && n.payload() == "hello",
                || format!("got {} {}", n.channel(), n.payload()),
            ),
            _ => Err("no notification within 5 s".into()),
        }
    }

    pub async fn cancel(ctx: &Ctx) -> R {
        let c = Arc::new(client(&ctx.conninfo).await?);
        // cancel_query connects to the host and port the client used (the proxy) and sends a
        // CancelRequest with the BackendKeyData the proxy gave. A cancel that arrives before
        // the query reaches a backend cancels nothing, and nothing says "running", so keep
        // cancelling until the query ends.
        let token = c.cancel_token();
        let t0 = Instant::now();
        let running = {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.simple_query("SELECT pg_sleep(10)").await })
        };
        while !running.is_finished() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if !running.is_finished() {
                token.cancel_query(NoTls).await.map_err(pg)?;
            }
        }
        let res = running.await.map_err(|e| e.to_string())?;
        let elapsed = t0.elapsed();
        expect_code(res, &SqlState::QUERY_CANCELED, "pg_sleep(10)")?;
        check(elapsed < Duration::from_secs(5), || {
            format!("cancel took {elapsed:?}")
        })?;
        let v: i32 = c.query_one("SELECT 9", &[]).await.map_err(pg)?.get(0);
        check(v == 9, || "connection unusable after cancel".into())
    }

    pub async fn replica_read(ctx: &Ctx) -> R {
        let mut c = client(&ctx.conninfo).await?;
        // tokio-postgres opens no transaction unless asked, so this read may go to a replica.
        let port: i32 = c
            .query_one("SELECT inet_server_port()", &[])
            .await
            .map_err(pg)?
            .get(0);
        check(port != ctx.primary_port, || {
            format!("autocommit read ran on the primary ({port})")
        })?;
        // A transaction that is not declared read-only may write at any point, so the proxy
        // runs all of it on the primary.
        let tx = c.transaction().await.map_err(pg)?;
        let port: i32 = tx
            .query_one("SELECT inet_server_port()", &[])
            .await
            .map_err(pg)?
            .get(0);
        tx.commit().await.map_err(pg)?;
        check(port == ctx.primary_port, || {
            format!("a read-write transaction ran on {port}")
        })
    }
}
