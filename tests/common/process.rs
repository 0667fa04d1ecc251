//! Running client programs (psql, pgbench, drivers) from tests: bounded in time, isolated
//! from the caller's libpq environment, off the async runtime.

use std::process::{Command, Output, Stdio};

/// `program` wrapped in `timeout(1)`, so a client that hangs on the proxy fails its test within
/// `secs` instead of stalling the suite; libpq variables of the caller are removed.
pub fn bounded(secs: u64, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg("--kill-after=5")
        .arg(secs.to_string())
        .arg(program)
        .stdin(Stdio::null());
    for var in causeway::launcher::PG_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `cmd` to completion off the async runtime.
pub async fn output(mut cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("client task")
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

/// Program output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
