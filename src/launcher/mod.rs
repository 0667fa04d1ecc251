//! Throw-away local PostgreSQL clusters for tests: one primary plus N streaming
//! hot-standby replicas, all on 127.0.0.1, in a temp dir removed on drop.
//!
//! Servers run as the `postgres` OS user when the current user is root
//! (initdb/postgres refuse root), otherwise as the current user. The first start
//! keeps an initdb'd template data directory that later starts copy instead of
//! running initdb again. Clusters and templates live in [`base_dir`]: RAM
//! (/dev/shm) when there is room, since creating PostgreSQL's ~1000 files per
//! node on disk dominated start-up time.

use std::fs;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod support;
#[cfg(test)]
mod tests;

use support::*;
pub use support::{base_dir, cleanup_stale};

const HOST: &str = "127.0.0.1";
const SUPERUSER: &str = "postgres";
const PORT_MIN: u16 = 15000;
const PORT_MAX: u16 = 32000;
const TIMEOUT: Duration = Duration::from_secs(60);
/// Bump when the template recipe (initdb args, files added to it) changes.
const TEMPLATE_RECIPE: &str = "v1 -U postgres -A trust -E UTF8 --locale=C include=causeway.conf";
/// Environment variables that would make libpq tools connect somewhere else, or as someone else.
pub const PG_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGSSLMODE",
    "PGTARGETSESSIONATTRS",
    "PGREQUIREAUTH",
    "PGDATA",
];

/// How pg_hba.conf authenticates a user over TCP.
#[derive(Clone, Copy, Debug)]
pub enum HbaAuth {
    Trust,
    Md5,
    Scram,
}

impl HbaAuth {
    fn method(self) -> &'static str {
        match self {
            HbaAuth::Trust => "trust",
            HbaAuth::Md5 => "md5",
            HbaAuth::Scram => "scram-sha-256",
        }
    }
}

/// A login role created on the primary.
#[derive(Clone, Debug)]
pub struct UserSpec {
    pub name: String,
    pub password: String,
    pub auth: HbaAuth,
}

/// What to start; see [`Default`] for the defaults.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub replicas: usize,
    pub users: Vec<UserSpec>,
    /// Created on the primary, owned by the first user.
    pub database: String,
    /// Extra postgresql.conf settings (replicas inherit them, as a base backup would).
    pub primary_conf: Vec<(String, String)>,
    /// Extra settings for every replica, applied after `primary_conf`.
    pub replica_conf: Vec<(String, String)>,
    /// Default: $CAUSEWAY_PG_BIN, /usr/lib/postgresql/<highest>/bin, `pg_config --bindir`.
    pub bin_dir: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            replicas: 2,
            users: vec![UserSpec {
                name: "app".into(),
                password: "app-secret".into(),
                auth: HbaAuth::Scram,
            }],
            database: "app".into(),
            primary_conf: Vec::new(),
            replica_conf: Vec::new(),
            bin_dir: None,
        }
    }
}

/// One running server.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// "primary", "replica1", "replica2", ... (also its cluster_name / application_name).
    pub name: String,
    pub host: String,
    pub port: u16,
    pub data_dir: PathBuf,
}

#[derive(Clone, Copy, Debug)]
pub enum StopMode {
    Fast,
    Immediate,
}

#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("PostgreSQL binaries not found: {0}")]
    BinariesNotFound(String),
    #[error("cannot determine the OS user to run PostgreSQL as: {0}")]
    User(String),
    #[error("invalid cluster options: {0}")]
    InvalidOptions(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{output}{log_tail}")]
    Command {
        command: String,
        status: String,
        output: String,
        log_tail: String,
    },
    #[error("timed out after {waited:?} waiting for {what}{log_tail}")]
    Timeout {
        what: String,
        waited: Duration,
        log_tail: String,
    },
    #[error("no free TCP port found on 127.0.0.1 in {PORT_MIN}..{PORT_MAX}")]
    NoFreePort,
}

type Result<T> = std::result::Result<T, LauncherError>;

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LauncherError {
    let context = context.into();
    move |source| LauncherError::Io { context, source }
}

/// A primary with streaming replicas; everything is stopped and removed on drop.
pub struct LocalCluster {
    pub primary: NodeInfo,
    pub replicas: Vec<NodeInfo>,
    inner: Inner,
}

/// Owns the temp dir; its Drop also cleans up after a failed `start`.
struct Inner {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// (uid, gid) to run server tools as; None = current user.
    run_as: Option<(u32, u32)>,
    database: String,
    primary_conf: Vec<(String, String)>,
    replica_conf: Vec<(String, String)>,
    stopped: AtomicBool,
}

impl LocalCluster {
    /// Starts a primary and `opts.replicas` streaming replicas; returns once all
    /// accept connections and every replica streams from the primary.
    pub fn start(opts: ClusterOptions) -> Result<LocalCluster> {
        validate(&opts)?;
        let bin = resolve_bin_dir(opts.bin_dir.clone())?;
        let run_as = run_as_ids()?;
        let dir = tempfile::Builder::new()
            .prefix("causeway-pg-")
            .tempdir_in(base_dir())
            .map_err(io_err("creating the cluster temp dir"))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(io_err("chowning the cluster temp dir"))?;
        }
        // Lets cleanup_stale() tell a live cluster from a crashed run's leftovers.
        fs::write(dir.path().join("owner.pid"), std::process::id().to_string())
            .map_err(io_err("writing owner.pid"))?;
        let inner = Inner {
            dir,
            bin,
            run_as,
            database: opts.database.clone(),
            primary_conf: opts.primary_conf.clone(),
            replica_conf: opts.replica_conf.clone(),
            stopped: AtomicBool::new(false),
        };
        let mut rng = Rng::new();
        let mut primary = NodeInfo {
            name: "primary".into(),
            host: HOST.into(),
            port: pick_port(&mut rng, &[])?,
            data_dir: inner.dir.path().join("primary"),
        };
        inner.init_primary_dir(&primary.data_dir)?;
        inner.write_owned(
            &primary.data_dir.join("pg_hba.conf"),
            &hba_conf(&opts.users),
        )?;
        inner.start_server(&mut primary, false, Some(&mut rng))?;
        inner.create_objects(&primary, &opts)?;
        let replicas = inner.create_replicas(&primary, opts.replicas)?;
        inner.wait_streaming(&primary, &replicas)?;
        Ok(LocalCluster {
            primary,
            replicas,
            inner,
        })
    }

    /// `pg_ctl stop -m fast|immediate`, waiting until the server is gone.
    pub fn stop_node(&self, node: &NodeInfo, mode: StopMode) -> Result<()> {
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let mut cmd = self.inner.pg_tool("pg_ctl");
        cmd.arg("stop").arg("-D").arg(&node.data_dir);
        cmd.args(["-m", mode, "-w", "-t", "60"]);
        run(&mut cmd, Some(&log_path(node))).map(drop)
    }

    /// `pg_ctl start` on the node's existing port, waiting until it accepts connections.
    pub fn start_node(&self, node: &NodeInfo) -> Result<()> {
        let replica = self.replicas.iter().any(|r| r.data_dir == node.data_dir);
        self.inner.start_server(&mut node.clone(), replica, None)
    }

    /// The directory holding every server's Unix-domain socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &std::path::Path {
        self.inner.dir.path()
    }

    /// libpq conninfo for the superuser (trusted on 127.0.0.1).
    pub fn superuser_conninfo(&self, node: &NodeInfo) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname={}",
            node.host,
            node.port,
            conninfo_value(&self.inner.database)
        )
    }

    /// Runs `sql` as superuser in the cluster's database with `psql -AtqX
    /// ON_ERROR_STOP`; returns stdout without its trailing newline.
    pub fn psql(&self, node: &NodeInfo, sql: &str) -> Result<String> {
        self.inner.psql_db(node, &self.inner.database, sql)
    }

    /// Waits until every replica has replayed the primary's current WAL position.
    pub fn wait_replicas_caught_up(&self, timeout: Duration) -> Result<()> {
        let target = self.psql(&self.primary, "SELECT pg_current_wal_lsn()")?;
        let sql = format!("SELECT coalesce(pg_last_wal_replay_lsn() >= '{target}'::pg_lsn, false)");
        for replica in &self.replicas {
            let what = format!("{} to replay up to {target}", replica.name);
            poll(&what, timeout, Some(&log_path(replica)), || {
                Ok(self.psql(replica, &sql)? == "t")
            })?;
        }
        Ok(())
    }

    /// Stops every server (immediate) and removes the temp dir; same as drop.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.inner.shutdown();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    /// A command for a server tool (initdb, pg_ctl, pg_basebackup), run as the
    /// server's OS user, from a directory that user can enter.
    fn pg_tool(&self, name: &str) -> Command {
        tool_command(&self.bin, name, self.run_as, self.dir.path())
    }

    fn write_owned(&self, path: &Path, contents: &str) -> Result<()> {
        write_owned(path, contents, self.run_as)
    }

    /// Copies the shared template (creating it if needed) to `dest`.
    fn init_primary_dir(&self, dest: &Path) -> Result<()> {
        match ensure_template(&self.bin, self.run_as)? {
            Some(template) => {
                let mut cmd = Command::new("cp");
                cmd.arg("-a").arg(&template).arg(dest);
                run(&mut cmd, None).map(drop)
            }
            // Template lock held too long by someone else: initdb privately.
            None => initdb(&self.bin, self.run_as, self.dir.path(), dest),
        }
    }

    fn write_conf(&self, node: &NodeInfo, replica: bool) -> Result<()> {
        let sockets = self.dir.path().display().to_string();
        let mut settings: Vec<(String, String)> = [
            ("port", node.port.to_string()),
            ("listen_addresses", HOST.into()),
            ("unix_socket_directories", sockets),
            ("cluster_name", node.name.clone()),
            ("wal_level", "replica".into()),
            ("max_wal_senders", "10".into()),
            ("max_replication_slots", "10".into()),
            ("wal_keep_size", "256MB".into()),
            ("hot_standby", "on".into()),
            ("fsync", "off".into()),
            ("shared_buffers", "16MB".into()),
            ("max_connections", "200".into()),
            ("password_encryption", "scram-sha-256".into()),
            ("logging_collector", "off".into()),
            ("wal_receiver_status_interval", "1s".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        settings.extend(self.primary_conf.iter().cloned());
        if replica {
            settings.push(("hot_standby_feedback".into(), "on".into()));
            settings.extend(self.replica_conf.iter().cloned());
        }
        let mut text = String::from("# written by causeway's launcher\n");
        for (key, value) in &settings {
            let value = value.trim();
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or(value);
            text.push_str(&format!("{key} = '{}'\n", value.replace('\'', "''")));
        }
        self.write_owned(&node.data_dir.join("causeway.conf"), &text)
    }

    /// Writes the node's settings and starts it. On "could not bind", retries on
    /// a new port when `rng` is given, otherwise on the same port after a pause.
    fn start_server(
        &self,
        node: &mut NodeInfo,
        replica: bool,
        mut rng: Option<&mut Rng>,
    ) -> Result<()> {
        let log = log_path(node);
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.write_conf(node, replica)?;
            let log_start = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            let mut cmd = self.pg_tool("pg_ctl");
            cmd.arg("start")
                .arg("-D")
                .arg(&node.data_dir)
                .arg("-l")
                .arg(&log);
            cmd.args(["-w", "-t", "60", "-s"]);
            let err = match run(&mut cmd, Some(&log)) {
                Ok(_) => return Ok(()),
                Err(err) => err,
            };
            let new_log = read_from(&log, log_start);
            if attempt >= 10
                || !(new_log.contains("could not bind")
                    || new_log.contains("could not create any TCP/IP sockets"))
            {
                return Err(err);
            }
            match rng.as_deref_mut() {
                Some(rng) => node.port = pick_port(rng, &[node.port])?,
                None => thread::sleep(Duration::from_millis(300)),
            }
        }
    }

    fn psql_db(&self, node: &NodeInfo, dbname: &str, sql: &str) -> Result<String> {
        let mut cmd = Command::new("psql");
        for var in PG_ENV {
            cmd.env_remove(var);
        }
        cmd.env("PGCONNECT_TIMEOUT", "10");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &node.host,
        ]);
        cmd.args([
            "-p",
            &node.port.to_string(),
            "-U",
            SUPERUSER,
            "-d",
            dbname,
            "-f",
            "-",
        ]);
        let out = run_with_stdin(&mut cmd, sql, Some(&log_path(node)))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        Ok(stdout.strip_suffix('\n').unwrap_or(&stdout).to_string())
    }

    /// Creates the users and the database on the primary.
    fn create_objects(&self, primary: &NodeInfo, opts: &ClusterOptions) -> Result<()> {
        let mut sql = String::new();
        for user in &opts.users {
            let enc = match user.auth {
                HbaAuth::Md5 => "md5",
                _ => "scram-sha-256",
            };
            let verb = if user.name == SUPERUSER {
                "ALTER ROLE"
            } else {
                "CREATE ROLE"
            };
            sql.push_str(&format!(
                "SET password_encryption = '{enc}';\n{verb} {} LOGIN PASSWORD {};\n",
                quote_ident(&user.name),
                quote_literal(&user.password)
            ));
        }
        let owner = opts.users.first().map_or(SUPERUSER, |u| u.name.as_str());
        if opts.database == "postgres" {
            sql.push_str(&format!(
                "ALTER DATABASE postgres OWNER TO {};\n",
                quote_ident(owner)
            ));
        } else {
            let db = quote_ident(&opts.database);
            sql.push_str(&format!(
                "CREATE DATABASE {db} OWNER {};\n",
                quote_ident(owner)
            ));
        }
        self.psql_db(primary, "postgres", &sql).map(drop)
    }

    /// pg_basebackup + start every replica, in parallel.
    fn create_replicas(&self, primary: &NodeInfo, count: usize) -> Result<Vec<NodeInfo>> {
        let mut rng = Rng::new();
        let mut used = vec![primary.port];
        let mut nodes = Vec::with_capacity(count);
        for i in 1..=count {
            let port = pick_port(&mut rng, &used)?;
            used.push(port);
            nodes.push(NodeInfo {
                name: format!("replica{i}"),
                host: HOST.into(),
                port,
                data_dir: self.dir.path().join(format!("replica{i}")),
            });
        }
        let results: Vec<Result<NodeInfo>> = thread::scope(|s| {
            let handles: Vec<_> = nodes
                .into_iter()
                .map(|node| s.spawn(move || self.create_replica(primary, node)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(LauncherError::InvalidOptions(
                            "replica thread panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    fn create_replica(&self, primary: &NodeInfo, mut node: NodeInfo) -> Result<NodeInfo> {
        let mut cmd = self.pg_tool("pg_basebackup");
        cmd.args(["-h", HOST, "-p", &primary.port.to_string(), "-U", SUPERUSER]);
        cmd.arg("-D").arg(&node.data_dir);
        cmd.args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-w"]);
        run(&mut cmd, Some(&log_path(primary)))?;
        // The primary's log came along with the base backup.
        match fs::remove_file(log_path(&node)) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(io_err("removing the copied server.log")(e));
            }
            _ => {}
        }
        let mut rng = Rng::new();
        self.start_server(&mut node, true, Some(&mut rng))?;
        Ok(node)
    }

    /// Waits until pg_stat_replication on the primary shows every replica
    /// streaming and each replica reports pg_is_in_recovery().
    fn wait_streaming(&self, primary: &NodeInfo, replicas: &[NodeInfo]) -> Result<()> {
        if replicas.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = replicas.iter().map(|r| quote_literal(&r.name)).collect();
        let sql = format!(
            "SELECT count(DISTINCT application_name) FROM pg_stat_replication \
             WHERE state = 'streaming' AND application_name IN ({})",
            names.join(", ")
        );
        let want = replicas.len().to_string();
        poll(
            "replicas to stream from the primary",
            TIMEOUT,
            Some(&log_path(primary)),
            || Ok(self.psql_db(primary, "postgres", &sql)? == want),
        )?;
        for replica in replicas {
            let what = format!("{} to be in recovery", replica.name);
            poll(&what, TIMEOUT, Some(&log_path(replica)), || {
                Ok(self.psql_db(replica, "postgres", "SELECT pg_is_in_recovery()")? == "t")
            })?;
        }
        Ok(())
    }

    /// Immediate-stops every server found in the temp dir (errors ignored), once.
    fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(entries) = fs::read_dir(self.dir.path()) else {
            return;
        };
        let children: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("postmaster.pid").exists())
            .filter_map(|data_dir| {
                let mut cmd = self.pg_tool("pg_ctl");
                cmd.arg("stop").arg("-D").arg(&data_dir).args([
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                ]);
                cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()
            })
            .collect();
        for mut child in children {
            let _ = child.wait();
        }
    }
}
