//! Typed configuration: `proxy.toml` plus `CAUSEWAY__SECTION__KEY` environment overrides,
//! validated once at start-up and shared as `Arc<Config>`.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A configuration that could not be loaded or failed validation; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be read or did not match the schema.
    #[error("{0}")]
    Load(String),
    /// A value is present but impossible.
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole proxy configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    pub primary: NodeConfig,
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub consistency: ConsistencyConfig,
    #[serde(default)]
    pub priority: PriorityConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
}

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
    pub admin_listen: String,
    pub max_message_bytes: usize,
    pub connect_timeout_ms: u64,
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
    /// Runtime worker threads; 0 = one per CPU core.
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:6432".into(),
            admin_listen: "127.0.0.1:9930".into(),
            max_message_bytes: 64 * 1024 * 1024,
            connect_timeout_ms: 5_000,
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
    /// A waiter moves up one class after waiting this long, so no class starves.
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
            background_share: 0.55,
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

impl Config {
    /// Loads `path` (TOML) and applies `CAUSEWAY__…` environment overrides, then validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let builder = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(env_source());
        Self::build(builder)
    }

    /// Parses TOML text (no environment), then validates; used by tests and the demo.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let builder = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml));
        Self::build(builder)
    }

    fn build(
        builder: config::ConfigBuilder<config::builder::DefaultState>,
    ) -> Result<Config, ConfigError> {
        let raw = builder
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let cfg: Config = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values the schema cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_addr("server.listen", &self.server.listen)?;
        if !self.server.admin_listen.is_empty() {
            let admin = parse_addr("server.admin_listen", &self.server.admin_listen)?;
            if !admin.ip().is_loopback() && self.admin.token.is_empty() {
                return Err(invalid(
                    "server.admin_listen",
                    format!("{admin} is not a loopback address: set admin.token"),
                ));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.logging.level).is_err() {
            return Err(invalid(
                "logging.level",
                format!(
                    "{:?} is not a log filter (e.g. \"info\" or \"causeway=debug\")",
                    self.logging.level
                ),
            ));
        }
        if self.tls.client_mode != ClientTls::Disable
            && (self.tls.cert_file.is_empty() || self.tls.key_file.is_empty())
        {
            return Err(invalid(
                "tls.client_mode",
                "needs tls.cert_file and tls.key_file",
            ));
        }
        if self.tls.backend_mode == BackendTls::VerifyFull && self.tls.backend_ca_file.is_empty() {
            return Err(invalid(
                "tls.backend_mode",
                "verify-full needs tls.backend_ca_file",
            ));
        }
        for (i, name) in self.admin.users.iter().enumerate() {
            if self.user(name).is_none() {
                return Err(invalid(
                    format!("admin.users[{i}]"),
                    format!("{name:?} is not one of [[users]]"),
                ));
            }
        }
        if self.server.max_message_bytes < 1024 {
            return Err(invalid("server.max_message_bytes", "must be at least 1024"));
        }
        if self.users.is_empty() {
            return Err(invalid("users", "at least one [[users]] entry is required"));
        }
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() {
                return Err(invalid(format!("users[{i}].name"), "must not be empty"));
            }
            if self.users[..i].iter().any(|o| o.name == u.name) {
                return Err(invalid(
                    format!("users[{i}].name"),
                    format!("duplicate user {:?}", u.name),
                ));
            }
        }
        if let Some(name) = &self.server.monitor_user
            && self.user(name).is_none()
        {
            return Err(invalid(
                "server.monitor_user",
                format!("{name:?} is not one of [[users]]"),
            ));
        }
        check_node("primary", &self.primary.host, self.primary.port)?;
        for (i, r) in self.replicas.iter().enumerate() {
            let key = format!("replicas[{i}]");
            check_node(&key, &r.host, r.port)?;
            if r.name.is_empty() || r.name == "primary" {
                return Err(invalid(
                    format!("{key}.name"),
                    "must be set and differ from \"primary\"",
                ));
            }
            if r.host == self.primary.host && r.port == self.primary.port {
                return Err(invalid(key, "replica has the same address as the primary"));
            }
            if self.replicas[..i].iter().any(|o| o.name == r.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("duplicate replica {:?}", r.name),
                ));
            }
            if self.replicas[..i]
                .iter()
                .any(|o| o.host == r.host && o.port == r.port)
            {
                return Err(invalid(key, "two replicas share one address"));
            }
            if r.weight == 0 {
                return Err(invalid(format!("{key}.weight"), "must be at least 1"));
            }
        }
        if !(0.0..=1.0).contains(&self.priority.background_share) {
            return Err(invalid(
                "priority.background_share",
                "must be between 0 and 1",
            ));
        }
        let p = &self.pool;
        for (key, v) in [
            ("pool.primary_max", p.primary_max),
            ("pool.replica_max", p.replica_max),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if p.min_idle > p.primary_max.min(p.replica_max) {
            return Err(invalid(
                "pool.min_idle",
                "must not exceed primary_max or replica_max",
            ));
        }
        for (key, v) in [
            ("pool.acquire_timeout_ms", p.acquire_timeout_ms),
            ("pool.idle_timeout_ms", p.idle_timeout_ms),
            ("pool.max_lifetime_ms", p.max_lifetime_ms),
            ("pool.reset_timeout_ms", p.reset_timeout_ms),
            ("server.connect_timeout_ms", self.server.connect_timeout_ms),
            (
                "server.health_check_interval_ms",
                self.server.health_check_interval_ms,
            ),
            (
                "server.health_check_timeout_ms",
                self.server.health_check_timeout_ms,
            ),
            (
                "routing.function_refresh_ms",
                self.routing.function_refresh_ms,
            ),
            ("consistency.lsn_poll_ms", self.consistency.lsn_poll_ms),
            ("consistency.key_ttl_ms", self.consistency.key_ttl_ms),
            ("priority.aging_ms", self.priority.aging_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.consistency.max_keys == 0 {
            return Err(invalid("consistency.max_keys", "must be at least 1"));
        }
        if self.routing.classify_cache_size == 0 {
            return Err(invalid("routing.classify_cache_size", "must be at least 1"));
        }
        Ok(())
    }

    /// The client-facing listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("server.listen", &self.server.listen)
    }

    /// The effective settings as TOML, passwords hidden; printed by `causeway check`.
    pub fn effective_toml(&self) -> String {
        let mut shown = self.clone();
        for u in &mut shown.users {
            u.password = "<redacted>".into();
        }
        if !shown.admin.token.is_empty() {
            shown.admin.token = "<redacted>".into();
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Looks up a configured user by name.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    /// The user the monitor logs in as.
    pub fn monitor_user(&self) -> Option<&UserConfig> {
        match &self.server.monitor_user {
            Some(name) => self.user(name),
            None => self.users.first(),
        }
    }

    /// `pool.acquire_timeout_ms` as a Duration.
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.pool.acquire_timeout_ms)
    }

    /// Acquire timeout per priority class (commit, write, point_read, read, analytic).
    pub fn class_timeouts(&self) -> [Duration; 5] {
        let t = &self.priority.acquire_timeout_ms;
        let base = self.pool.acquire_timeout_ms;
        [t.commit, t.write, t.point_read, t.read, t.analytic]
            .map(|o| Duration::from_millis(o.unwrap_or(base)))
    }

    /// `server.connect_timeout_ms` as a Duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.server.connect_timeout_ms)
    }
}

fn env_source() -> config::Environment {
    config::Environment::with_prefix("CAUSEWAY")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(false)
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = value
        .parse()
        .map_err(|_| invalid(key, format!("{value:?} is not an IP:port address")))?;
    Ok(addr)
}

fn check_node(key: &str, host: &str, port: u16) -> Result<(), ConfigError> {
    if host.is_empty() {
        return Err(invalid(format!("{key}.host"), "must not be empty"));
    }
    if port == 0 {
        return Err(invalid(
            format!("{key}.port"),
            "must be between 1 and 65535",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[[users]]
name = "app"
password = "pw"
[primary]
host = "127.0.0.1"
port = 5432
[[replicas]]
name = "replica1"
host = "127.0.0.1"
port = 5433
"#;

    fn err_of(text: &str) -> String {
        match Config::from_toml(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_fill_everything_but_nodes_and_users() {
        let cfg = Config::from_toml(BASE).unwrap();
        assert_eq!(cfg.server.listen, "127.0.0.1:6432");
        assert_eq!(cfg.auth.method, AuthMethod::ScramSha256);
        assert_eq!(cfg.pool.mode, PoolMode::Transaction);
        assert_eq!(cfg.pool.primary_max, 20);
        assert_eq!(cfg.replicas[0].weight, 1);
        assert_eq!(
            cfg.routing.replica_strategy,
            ReplicaStrategy::LeastConnections
        );
        assert_eq!(cfg.routing.fallback, Fallback::Primary);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err_of(&format!("{BASE}\n[server]\nlisen = \"x\"\n"));
        assert!(e.contains("lisen"), "{e}");
        let e = err_of(&format!("{BASE}\n[pool]\nprimary_maxx = 3\n"));
        assert!(e.contains("primary_maxx"), "{e}");
        let e = err_of(&format!("{BASE}\nbogus = 1\n"));
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn wrong_types_and_impossible_values_are_named() {
        let e = err_of(&format!("{BASE}\n[pool]\nprimary_max = \"lots\"\n"));
        assert!(e.contains("primary_max"), "{e}");
        let e = err_of(&format!("{BASE}\n[pool]\nmode = \"statement\"\n"));
        assert!(e.contains("statement"), "{e}");
        let e = err_of(&BASE.replace("port = 5433", "port = 5432"));
        assert!(e.contains("replicas[0]"), "{e}");
        let e = err_of(&BASE.replace("port = 5432", "port = 0"));
        assert!(e.contains("primary.port"), "{e}");
        let no_users = BASE.replace("[[users]]\nname = \"app\"\npassword = \"pw\"\n", "");
        let e = err_of(&no_users);
        assert!(e.contains("users"), "{e}");
        let e = err_of(&format!("{BASE}\n[pool]\nprimary_max = 0\n"));
        assert!(e.contains("pool.primary_max"), "{e}");
        let e = err_of(&format!("{BASE}\n[server]\nlisten = \"nowhere\"\n"));
        assert!(e.contains("server.listen"), "{e}");
    }

    #[test]
    fn effective_toml_hides_passwords_and_round_trips() {
        let cfg = Config::from_toml(BASE).unwrap();
        let shown = cfg.effective_toml();
        assert!(!shown.contains("\"pw\""));
        assert!(shown.contains("<redacted>"));
        assert!(Config::from_toml(&shown).is_ok());
    }
}
