//! Start-up shared by the example tools: logging, the throwaway cluster and the runtime, each
//! reporting its own failure so `main` can return the exit code.
#![allow(dead_code)]

use std::process::ExitCode;

use causeway::launcher::{ClusterOptions, LocalCluster};

/// Time of day (UTC) for progress lines.
pub fn clock() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

/// Logs to stderr when `CAUSEWAY_LOG` names a filter (e.g. `causeway=debug`).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("CAUSEWAY_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Starts a local primary and replicas, or says why not.
pub fn start_cluster(opts: ClusterOptions) -> Result<LocalCluster, ExitCode> {
    LocalCluster::start(opts).map_err(|e| {
        eprintln!("cannot start the cluster: {e}");
        ExitCode::FAILURE
    })
}

/// A multi-threaded runtime, or says why not.
pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// The exit status of a run: 130 when interrupted, failure when it failed, else its verdict
/// (whether the targets held), which only fails the run when `strict`.
pub fn exit_code(outcome: Option<Result<bool, String>>, what: &str, strict: bool) -> ExitCode {
    match outcome {
        None => {
            eprintln!("interrupted");
            ExitCode::from(130)
        }
        Some(Err(e)) => {
            eprintln!("{what} failed: {e}");
            ExitCode::FAILURE
        }
        Some(Ok(held)) if strict && !held => ExitCode::FAILURE,
        Some(Ok(_)) => ExitCode::SUCCESS,
    }
}
