//! Running client programs (psql, pgbench, drivers) from tests: bounded in time, isolated
//! from the caller's libpq environment, off the async runtime.

use std::path::{Path, PathBuf};
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

/// A PostgreSQL client tool from the same installation the cluster runs on, else from PATH.
pub fn pg_tool(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("CAUSEWAY_PG_BIN") {
        let path = Path::new(&dir).join(name);
        if path.exists() {
            return path;
        }
    }
    PathBuf::from(name)
}

/// Whether `program args` runs and exits with 0.
pub fn runs(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Python with `module`: $CAUSEWAY_TEST_PYTHON (scripts/test sets it), else the venv
/// scripts/test creates, else python3. Panics rather than skip when the module is missing.
pub fn python_with(module: &str) -> PathBuf {
    let candidate = match std::env::var_os("CAUSEWAY_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python");
            if venv.exists() {
                venv
            } else {
                PathBuf::from("python3")
            }
        }
    };
    assert!(
        runs(&candidate, &["-c", &format!("import {module}")]),
        "{} cannot `import {module}`: run scripts/test (it installs the drivers into \
         target/pyenv and sets CAUSEWAY_TEST_PYTHON)",
        candidate.display()
    );
    candidate
}
