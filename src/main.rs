//! The `causeway` command: run the proxy, check a configuration, or start the demo cluster.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use causeway::config::{Config, LogFormat, LoggingConfig};

#[derive(Parser)]
#[command(
    name = "causeway",
    version,
    about = "Read-replica-aware PostgreSQL proxy"
)]
struct Cli {
    /// Configuration file (TOML) [default: proxy.toml; the demo reads one only when given];
    /// `CAUSEWAY__SECTION__KEY` variables override it.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and print the effective settings.
    Check,
    /// Start a throwaway primary with two streaming replicas and the proxy in front of them.
    Demo {
        /// Client-facing port of the proxy [default: 6432, or the configuration's
        /// `server.listen`].
        #[arg(long)]
        port: Option<u16>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("proxy.toml"));
    match cli.command {
        Some(Command::Check) => match Config::load(&path) {
            Ok(cfg) => {
                print!("{}", cfg.effective_toml());
                eprintln!("configuration OK: {}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&path, &e),
        },
        Some(Command::Demo { port }) => {
            // Without `-c` the demo runs as shipped (plus any variables): a proxy.toml in the
            // current directory describes other servers, not the demo's.
            let (settings, cfg) = match causeway::demo::Settings::load(cli.config.as_deref(), port)
            {
                Ok(s) => s,
                Err(e) => return demo_config_error(cli.config.as_deref(), &e),
            };
            init_tracing(&cfg.logging);
            run_async(cfg.server.worker_threads, causeway::demo::run(settings))
        }
        None => {
            let cfg = match Config::load(&path) {
                Ok(c) => Arc::new(c),
                Err(e) => return config_error(&path, &e),
            };
            init_tracing(&cfg.logging);
            run_async(cfg.server.worker_threads, async move {
                causeway::server::run(cfg, path)
                    .await
                    .map_err(|e| format!("cannot start: {e}"))
            })
        }
    }
}

fn config_error(path: &std::path::Path, e: &causeway::config::ConfigError) -> ExitCode {
    use causeway::config::ConfigError;
    match e {
        ConfigError::Missing(_) | ConfigError::Unreadable { .. } => eprintln!("causeway: {e}"),
        _ => eprintln!("causeway: invalid configuration {}: {e}", path.display()),
    }
    ExitCode::from(2)
}

/// [`config_error`] for the demo, which may have no file: the variables alone can be wrong.
fn demo_config_error(
    path: Option<&std::path::Path>,
    e: &causeway::config::ConfigError,
) -> ExitCode {
    match path {
        Some(path) => config_error(path, e),
        None => {
            eprintln!("causeway: invalid demo configuration: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs `fut` on a runtime with `workers` threads; 0 picks [`auto_workers`]. One thread is
/// tokio's current-thread scheduler, the way PgBouncer runs: every socket, task and timer on the
/// same thread, so handing a reply from a backend to its client never wakes another thread.
fn run_async(
    workers: usize,
    fut: impl std::future::Future<Output = Result<(), String>>,
) -> ExitCode {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads = if workers == 0 {
        auto_workers(cores)
    } else {
        workers
    };
    let runtime = match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("causeway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("causeway: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Threads for `worker_threads = 0`: one per core, but a single thread on a machine of two cores
/// or fewer. There the proxy shares the cores with its clients and servers, and one thread relays
/// as many transactions per second for about a tenth less CPU each (no cross-thread wake-ups).
fn auto_workers(cores: usize) -> usize {
    if cores <= 2 { 1 } else { cores }
}

/// Logs to stderr in the configured format, in colour only on a terminal; `CAUSEWAY_LOG` (a
/// tracing filter such as `causeway=debug`) overrides `logging.level`. At debug and trace each
/// line a session logs carries its span (client address, session id, user and database); the
/// lines it logs at info and above name the session and client address themselves.
fn init_tracing(logging: &LoggingConfig) {
    let from_env = std::env::var("CAUSEWAY_LOG").ok().and_then(|text| {
        causeway::config::log_filter(&text)
            .map_err(|e| eprintln!("causeway: CAUSEWAY_LOG ignored: {e}"))
            .ok()
    });
    let filter = from_env
        .or_else(|| causeway::config::log_filter(&logging.level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: in files, journald or a log shipper the escape
    // codes are noise that breaks searching.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match logging.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
