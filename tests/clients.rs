//! Real clients through the proxy: psql (simple protocol, COPY, scripts), pgbench (every query
//! mode, under concurrency) and psycopg 3 (extended protocol, pipelines, cancel, LISTEN).

mod common;

use std::process::{Command, Output};

use common::process::{self, output, pg_tool, text};
use common::{Env, PASSWORD};

/// A client command bounded in time, logging in as the test user.
fn bounded(secs: u64, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = process::bounded(secs, program);
    cmd.env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "5");
    cmd
}

/// Panics with both streams unless the client exited with 0.
fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Per-node routing counter increments since `before`.
fn delta(env: &Env, before: &[u64]) -> Vec<u64> {
    env.routed()
        .iter()
        .zip(before)
        .map(|(a, b)| a - b)
        .collect()
}

// --- psql ----------------------------------------------------------------------------------

fn psql(env: &Env, on_error_stop: bool) -> Command {
    let mut cmd = bounded(20, pg_tool("psql"));
    cmd.args(["-X", "-q", "-h", "127.0.0.1", "-U", "app", "-d", "app"])
        .arg("-p")
        .arg(env.port().to_string());
    if on_error_stop {
        cmd.args(["-v", "ON_ERROR_STOP=1"]);
    }
    cmd
}

/// The `key=value` lines a psql script printed with `\echo`.
fn echoed(stdout: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("psql did not print {key}=...:\n{stdout}"))
        .to_string()
}

fn port_of(stdout: &str, key: &str) -> u16 {
    let v = echoed(stdout, key);
    v.parse()
        .unwrap_or_else(|e| panic!("{key}={v} is not a port: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_scripts_copy_transactions_and_errors() {
    let env = common::start().await;
    let primary = env.node_port(0);
    env.owner()
        .await
        .batch_execute("CREATE TABLE films (id int PRIMARY KEY, title text)")
        .await
        .unwrap();
    env.caught_up().await;

    let dir = tempfile::tempdir().unwrap();
    let copy_in = dir.path().join("in.tsv");
    let copy_out = dir.path().join("out.tsv");
    let rows: String = (1000..1200).map(|i| format!("{i}\tcopied {i}\n")).collect();
    std::fs::write(&copy_in, rows).unwrap();

    // Writes: every statement here must reach the primary.
    let writes = format!(
        r#"
INSERT INTO films VALUES (1, 'one'), (2, 'two');
\copy films FROM '{copy_in}'
INSERT INTO films VALUES (3, 'three') \; INSERT INTO films VALUES (4, 'four') \; SELECT 1 AS one \gset
\echo multi=:one
BEGIN;
INSERT INTO films VALUES (99, 'rolled back');
SELECT inet_server_port() AS tx_port \gset
ROLLBACK;
\echo tx_port=:tx_port
INSERT INTO films VALUES (5, 'five') RETURNING inet_server_port() AS write_port \gset
\echo write_port=:write_port
SELECT inet_server_port() AS read_port \gset
\echo read_port=:read_port
"#,
        copy_in = copy_in.display()
    );
    let script = dir.path().join("writes.sql");
    std::fs::write(&script, writes).unwrap();
    let mut cmd = psql(&env, true);
    cmd.arg("-f").arg(&script);
    let out = output(cmd).await;
    assert_success("psql writes", &out);
    let stdout = text(&out.stdout);
    assert_eq!(echoed(&stdout, "multi"), "1", "{stdout}");
    assert_eq!(
        port_of(&stdout, "tx_port"),
        primary,
        "a read after a write in the same transaction runs on the primary"
    );
    assert_eq!(
        port_of(&stdout, "write_port"),
        primary,
        "INSERT ... RETURNING"
    );
    // The plain read comes right after this session's writes: read-your-writes sends it to a
    // replica only if one has replayed them within the causal wait, else to the primary.
    let _ = port_of(&stdout, "read_port");

    env.caught_up().await;
    // Reads (-c and -f mixed): a multi-statement -c string is one simple Query message.
    let reads = format!(
        r#"
SELECT count(*) AS n, sum(id) AS s FROM films \gset
\echo count=:n sum=:s
\copy (SELECT id, title FROM films ORDER BY id) TO '{copy_out}'
SELECT inet_server_port() AS read_port \gset
\echo read_port=:read_port
"#,
        copy_out = copy_out.display()
    );
    let script = dir.path().join("reads.sql");
    std::fs::write(&script, reads).unwrap();
    let mut cmd = psql(&env, true);
    cmd.args(["-At", "-c", "SELECT 'first'; SELECT 'second'"])
        .arg("-f")
        .arg(&script);
    let out = output(cmd).await;
    assert_success("psql reads", &out);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("first\nsecond\n"),
        "multi-statement -c:\n{stdout}"
    );
    let expected_sum: i64 = (1..=5).sum::<i64>() + (1000..1200).sum::<i64>();
    assert_eq!(
        echoed(&stdout, "count"),
        format!("205 sum={expected_sum}"),
        "rows after INSERT, \\copy and ROLLBACK"
    );
    assert_ne!(port_of(&stdout, "read_port"), primary);
    let copied = std::fs::read_to_string(&copy_out).unwrap();
    assert_eq!(copied.lines().count(), 205, "\\copy out");
    assert_eq!(copied.lines().next(), Some("1\tone"));
    assert_eq!(copied.lines().last(), Some("1199\tcopied 1199"));

    // Without ON_ERROR_STOP psql carries on after an error; the session must too, both
    // outside and inside a transaction.
    let recovery = r#"
SELECT 1/0;
SELECT 'after error' AS msg \gset
\echo recovered=:msg
BEGIN;
SELECT 1/0;
SELECT 'in aborted transaction';
ROLLBACK;
SELECT count(*) AS n FROM films \gset
\echo after_rollback=:n
"#;
    let script = dir.path().join("recovery.sql");
    std::fs::write(&script, recovery).unwrap();
    let mut cmd = psql(&env, false);
    cmd.arg("-f").arg(&script);
    let out = output(cmd).await;
    assert_success("psql error recovery", &out);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(echoed(&stdout, "recovered"), "after error", "{stderr}");
    assert_eq!(echoed(&stdout, "after_rollback"), "205", "{stderr}");
    assert_eq!(
        stderr.matches("division by zero").count(),
        2,
        "both errors reach psql:\n{stderr}"
    );
    assert!(
        stderr.contains("current transaction is aborted"),
        "statement in the failed transaction:\n{stderr}"
    );
}

// --- pgbench -------------------------------------------------------------------------------

/// The number after `prefix` on the line of pgbench's report that starts with it.
fn pgbench_stat(report: &str, prefix: &str) -> Option<u64> {
    report
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.split('/').next())
        .and_then(|n| n.parse().ok())
}

/// Runs pgbench through the proxy; returns transactions processed and the routing deltas.
async fn pgbench(env: &Env, args: &[&str]) -> (u64, Vec<u64>) {
    let before = env.routed();
    let mut cmd = bounded(30, pg_tool("pgbench"));
    cmd.args([
        "-n",
        "-c",
        "4",
        "-j",
        "2",
        "-T",
        "3",
        "-h",
        "127.0.0.1",
        "-U",
        "app",
    ])
    .arg("-p")
    .arg(env.port().to_string())
    .args(args)
    .arg("app");
    let out = output(cmd).await;
    let what = format!("pgbench {}", args.join(" "));
    assert_success(&what, &out);
    let report = text(&out.stdout);
    println!("{what}:\n{report}");
    assert_eq!(
        pgbench_stat(&report, "number of failed transactions:"),
        Some(0),
        "{what}:\n{report}\n{}",
        text(&out.stderr)
    );
    let txns = pgbench_stat(&report, "number of transactions actually processed:")
        .unwrap_or_else(|| panic!("{what}: no transaction count:\n{report}"));
    assert!(txns > 0, "{what}: no transaction completed:\n{report}");
    let routed = delta(env, &before);
    println!("{what}: statements routed to [primary, replica1, replica2]: {routed:?}");
    (txns, routed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_every_query_mode() {
    let env = common::start().await;
    let mut init = bounded(30, pg_tool("pgbench"));
    init.args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-U", "app"])
        .arg("-p")
        .arg(env.node_port(0).to_string())
        .arg("app");
    assert_success("pgbench -i on the primary", &output(init).await);
    env.caught_up().await;

    for mode in ["simple", "extended"] {
        let (txns, routed) = pgbench(&env, &["-M", mode]).await;
        // Every TPC-B transaction is BEGIN ... END with writes: at least one decision each.
        assert!(
            routed[0] >= txns,
            "TPC-B -M {mode}: {txns} transactions but {routed:?} routed"
        );
        let (_, routed) = pgbench(&env, &["-M", mode, "-S"]).await;
        assert_mostly_replicas(&format!("-S -M {mode}"), &routed);
    }
    let (_, routed) = pgbench(&env, &["-M", "prepared", "-S"]).await;
    assert_mostly_replicas("-S -M prepared", &routed);
}

fn assert_mostly_replicas(what: &str, routed: &[u64]) {
    let replicas: u64 = routed[1..].iter().sum();
    let total = replicas + routed[0];
    // Select-only: the primary may see session set-up, never the workload itself.
    assert!(
        total > 0 && replicas * 10 >= total * 9,
        "{what}: replicas served too little: {routed:?}"
    );
}

// --- psycopg -------------------------------------------------------------------------------
