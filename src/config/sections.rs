//! The sections of `proxy.toml`, one type each, with their defaults.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Whether clients may or must use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTls {
    /// SSLRequest is answered "N".
    Disable,
    /// TLS when the client asks for it.
    Allow,
    /// Plaintext clients are refused (cancel requests excepted).
    Require,
}

/// Whether and how the proxy uses TLS towards PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTls {
    Disable,
    /// TLS if the server offers it, without checking its certificate.
    Prefer,
    /// TLS or no connection, without checking the certificate.
    Require,
    /// TLS with the certificate checked against `backend_ca_file` and the host name.
    VerifyFull,
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain and private key the proxy shows clients.
    pub cert_file: String,
    pub key_file: String,
    pub client_mode: ClientTls,
    pub backend_mode: BackendTls,
    /// PEM CA certificates that sign the servers' certificates (verify-full).
    pub backend_ca_file: String,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: String::new(),
            key_file: String::new(),
            client_mode: ClientTls::Disable,
            backend_mode: BackendTls::Disable,
            backend_ca_file: String::new(),
        }
    }
}

/// `[admin]`: who may use the admin endpoint and the admin console.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token for the HTTP endpoint; required when `server.admin_listen` is not a
    /// loopback address. Empty = none.
    pub token: String,
    /// `[[users]]` names allowed on the admin console (virtual database `causeway`).
    pub users: Vec<String>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field(
                "token",
                &if self.token.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("users", &self.users)
            .finish()
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[logging]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `causeway=debug`, ...); `CAUSEWAY_LOG` overrides it.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// `[server]`: listening sockets and server-wide limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    /// Directory for a Unix-domain socket clients on this machine can use
    /// (`<dir>/.s.PGSQL.<port of listen>`, as PostgreSQL names it); "" = none.
    pub listen_unix: String,
    pub admin_listen: String,
    pub max_message_bytes: usize,
    /// Most bytes of named prepared statements (names, texts, parameter types) one client may
    /// hold at once; a Parse past it gets 54000.
    pub max_prepared_bytes: usize,
    pub connect_timeout_ms: u64,
    /// A client must finish its startup and authentication within this long, or it is
    /// disconnected (PostgreSQL's authentication_timeout).
    pub login_timeout_ms: u64,
    pub health_check_interval_ms: u64,
    pub health_check_timeout_ms: u64,
    /// User the health monitor logs in as; defaults to the first `[[users]]` entry.
    pub monitor_user: Option<String>,
    pub monitor_database: String,
    /// Clients connected at once; past it new ones are refused with 53300. 0 = no limit.
    pub max_client_connections: usize,
    /// A request whose server has not finished answering after this long is cancelled; if the
    /// server still does not answer (it hangs), the connection is dropped and the client gets
    /// an error (a read that sent nothing yet is re-run elsewhere). 0 = no limit.
    pub query_timeout_ms: u64,
    /// On SIGTERM/SIGINT, running transactions get this long to finish before their clients
    /// are disconnected with 57P01.
    pub shutdown_timeout_ms: u64,
    /// Runtime threads; 0 = one per CPU core, or one in all on a machine of two cores or fewer.
    /// One thread runs tokio's current-thread scheduler.
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:6432".into(),
            listen_unix: String::new(),
            admin_listen: "127.0.0.1:9930".into(),
            max_message_bytes: 64 * 1024 * 1024,
            max_prepared_bytes: 64 * 1024 * 1024,
            connect_timeout_ms: 5_000,
            login_timeout_ms: 60_000,
            health_check_interval_ms: 1_000,
            health_check_timeout_ms: 2_000,
            monitor_user: None,
            monitor_database: "postgres".into(),
            max_client_connections: 10_000,
            query_timeout_ms: 0,
            shutdown_timeout_ms: 30_000,
            worker_threads: 0,
        }
    }
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub method: AuthMethod,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            method: AuthMethod::ScramSha256,
        }
    }
}

/// `[[users]]`: a login accepted from clients and used towards PostgreSQL.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub password: String,
    /// Clients this user may have connected at once; past it new ones get 53300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// `[primary]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub host: String,
    pub port: u16,
    /// Statements running at once on this server, across all pools; 0 = no limit.
    #[serde(default)]
    pub max_active: usize,
}

/// `[[replicas]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    pub name: String,
    pub host: String,
    pub port: u16,
    #[serde(default = "one")]
    pub weight: u32,
    /// Statements running at once on this server, across all pools; 0 = no limit.
    #[serde(default)]
    pub max_active: usize,
}

fn one() -> u32 {
    1
}

/// Transaction pooling shares backends between clients; session pooling does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Transaction,
    Session,
}

/// `[pool]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub mode: PoolMode,
    pub primary_max: usize,
    pub replica_max: usize,
    pub min_idle: usize,
    pub acquire_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_lifetime_ms: u64,
    /// Time allowed to roll back and return a connection left in a transaction.
    pub reset_timeout_ms: u64,
    /// Requests allowed to wait per queue; past it the lowest classes are refused (53300).
    /// 0 = unbounded.
    pub max_waiters: usize,
    /// A client idle inside a transaction this long is disconnected (25P03) and its
    /// transaction rolled back, so it cannot hold a server connection forever. 0 = no limit.
    pub idle_in_transaction_timeout_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            mode: PoolMode::Transaction,
            primary_max: 20,
            replica_max: 20,
            min_idle: 0,
            acquire_timeout_ms: 5_000,
            idle_timeout_ms: 600_000,
            max_lifetime_ms: 3_600_000,
            reset_timeout_ms: 5_000,
            max_waiters: 1_000,
            idle_in_transaction_timeout_ms: 0,
        }
    }
}

/// How a replica is picked among the usable ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaStrategy {
    LeastConnections,
    RoundRobin,
    WeightedRandom,
}

/// What a read does when no replica is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    Primary,
    Error,
}

/// `[routing]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub replica_strategy: ReplicaStrategy,
    pub fallback: Fallback,
    pub read_only_functions: Vec<String>,
    pub write_functions: Vec<String>,
    pub classify_cache_size: usize,
    pub function_refresh_ms: u64,
    /// Replicas further behind than this are not used for reads; 0 = no limit.
    pub max_replica_lag_ms: u64,
    /// Replicas with more WAL than this still to replay are not used for reads; 0 = no limit.
    pub max_replica_lag_bytes: u64,
    /// When the primary is down and a replica reports it is no longer in recovery (it was
    /// promoted), make it the primary.
    pub follow_promotion: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            replica_strategy: ReplicaStrategy::LeastConnections,
            fallback: Fallback::Primary,
            read_only_functions: Vec::new(),
            write_functions: Vec::new(),
            classify_cache_size: 10_000,
            function_refresh_ms: 60_000,
            max_replica_lag_ms: 30_000,
            max_replica_lag_bytes: 0,
            follow_promotion: false,
        }
    }
}

/// How reads after writes are kept fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum ConsistencyMode {
    /// Reads use a replica only once it has replayed the session's last write (LSN tokens).
    #[serde(rename = "lsn")]
    Lsn,
    /// After a write, reads go to the primary for `sticky_window_ms`.
    #[serde(rename = "sticky")]
    Sticky,
    /// LSN tokens, and the sticky window whenever LSN information is missing or stale.
    #[serde(rename = "lsn+sticky")]
    LsnSticky,
    /// No read-your-writes guarantee.
    #[serde(rename = "none")]
    None,
}

/// Whose writes a read must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsistencyScope {
    /// The session's own writes (plus any consistency key or token it names).
    Session,
    /// Every write through this proxy.
    Global,
}

/// `[consistency]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsistencyConfig {
    pub mode: ConsistencyMode,
    pub scope: ConsistencyScope,
    /// How often replicas' replay positions and the primary's WAL position are read.
    pub lsn_poll_ms: u64,
    /// Longest wait for a replica to catch up with a token before reading from the primary.
    pub causal_wait_ms: u64,
    pub sticky_window_ms: u64,
    /// Keyed tokens (`causeway.consistency_key`) expire after this long without writes.
    pub key_ttl_ms: u64,
    pub max_keys: usize,
}

impl Default for ConsistencyConfig {
    fn default() -> Self {
        Self {
            mode: ConsistencyMode::Lsn,
            scope: ConsistencyScope::Session,
            lsn_poll_ms: 10,
            causal_wait_ms: 20,
            sticky_window_ms: 2_000,
            key_ttl_ms: 60_000,
            max_keys: 100_000,
        }
    }
}

/// `[priority]`: how waiters for a backend are ordered.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriorityConfig {
    /// Priority queues (commit, write, point_read, read, analytic); false = plain FIFO.
    pub enabled: bool,
    /// A waiter moves up one class after waiting this long, so no class starves; read and
    /// analytic waiters no further than `read` while `background_share` serves them.
    pub aging_ms: u64,
    /// Share of a saturated pool's connection time that read and analytic work keeps while
    /// more urgent work also waits (0 to 1; 0 leaves it only aging).
    pub background_share: f64,
    /// Per-class overrides of `pool.acquire_timeout_ms`.
    pub acquire_timeout_ms: ClassTimeouts,
}

impl PriorityConfig {
    /// `background_share` in thousandths, as the queues take it.
    pub fn background_share_permille(&self) -> u16 {
        (self.background_share.clamp(0.0, 1.0) * 1000.0).round() as u16
    }
}

impl Default for PriorityConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            aging_ms: 500,
            background_share: 0.5,
            acquire_timeout_ms: ClassTimeouts::default(),
        }
    }
}

/// `[priority.acquire_timeout_ms]`: optional per-class waits, in ms.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassTimeouts {
    pub commit: Option<u64>,
    pub write: Option<u64>,
    pub point_read: Option<u64>,
    pub read: Option<u64>,
    pub analytic: Option<u64>,
}
