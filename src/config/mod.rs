//! Typed configuration: `proxy.toml` plus `CAUSEWAY__SECTION__KEY` environment overrides,
//! validated before use (at start-up, and again on every reload, which swaps it in whole).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod overlay;
mod sections;
mod source;

pub use overlay::Overlay;
pub use sections::*;

/// A configuration that could not be loaded or failed validation; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file does not exist.
    #[error("configuration file {} does not exist", .0.display())]
    Missing(std::path::PathBuf),
    /// The configuration file exists but cannot be read.
    #[error("cannot read configuration file {}: {source}", path.display())]
    Unreadable {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML, or the environment could not be applied to it.
    #[error("{0}")]
    Load(String),
    /// A key is unknown, missing or has a value of the wrong type.
    #[error("`{key}`{}: {message}", from.as_ref().map(|v| format!(" (from {v})")).unwrap_or_default())]
    Schema {
        key: String,
        message: String,
        /// The environment variable the value came from, if not the file.
        from: Option<String>,
    },
    /// A value is present but impossible.
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
    /// Keys the command sets itself (the demo's servers), which the user may not.
    #[error("{} cannot be set: {reason}", keys.join(", "))]
    Reserved {
        /// Each key as given, with the variable it came from when not the file.
        keys: Vec<String>,
        reason: String,
    },
}

/// The text of the configuration file at `path`.
fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ConfigError::Missing(path.to_path_buf())
        } else {
            ConfigError::Unreadable {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// The environment's `CAUSEWAY__…` variables, as (name, value).
fn env_vars() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Ok(name) = name.into_string() else {
            continue;
        };
        if !name.to_ascii_lowercase().starts_with(source::ENV_PREFIX) {
            continue;
        }
        let value = value
            .into_string()
            .map_err(|_| ConfigError::Load(format!("{name} is not valid UTF-8")))?;
        vars.push((name, value));
    }
    Ok(vars)
}

/// Most runtime threads `server.worker_threads` may ask for: far more than any machine has
/// cores for, and well inside what the operating system gives a process (each thread reserves
/// its own stack), so an impossible value is refused here rather than by a failing start.
pub const MAX_WORKER_THREADS: usize = 1024;

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

impl Config {
    /// Loads `path` (TOML) and applies `CAUSEWAY__…` environment overrides, then validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let cfg = Self::build(&read_text(path)?, env_vars()?)?;
        cfg.check_paths()?;
        Ok(cfg)
    }

    /// Parses TOML text (no environment), then validates; used by tests and the demo.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::build(text, [])
    }

    /// Parses `text`, lets `vars` (`CAUSEWAY__SECTION__KEY`, value) override it, and
    /// validates. File values must have their key's type; variables must parse as it.
    fn build(
        text: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Load(e.to_string()))?;
        Self::from_table(table, vars)
    }

    /// [`Self::build`] from TOML already parsed.
    fn from_table(
        table: toml::Table,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut tree = source::Node::from_file(table);
        tree.override_from(vars).map_err(ConfigError::Load)?;
        let cfg: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::Schema {
                key,
                message: source::plain(&inner.message),
                from: inner.var,
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values the schema cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_addr("server.listen", &self.server.listen)?;
        let unix = &self.server.listen_unix;
        if !unix.is_empty() && !unix.starts_with('/') {
            return Err(invalid(
                "server.listen_unix",
                format!("{unix:?} is not an absolute directory path"),
            ));
        }
        if !self.server.admin_listen.is_empty() {
            let admin = parse_addr("server.admin_listen", &self.server.admin_listen)?;
            let listen = parse_addr("server.listen", &self.server.listen)?;
            let overlap = admin.ip() == listen.ip()
                || admin.ip().is_unspecified()
                || listen.ip().is_unspecified();
            if admin.port() != 0 && admin.port() == listen.port() && overlap {
                return Err(invalid(
                    "server.admin_listen",
                    format!("{admin} is server.listen's address too"),
                ));
            }
            if !admin.ip().is_loopback() && self.admin.token.is_empty() {
                return Err(invalid(
                    "server.admin_listen",
                    format!("{admin} is not a loopback address: set admin.token"),
                ));
            }
        }
        log_filter(&self.logging.level).map_err(|e| invalid("logging.level", e))?;
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
        if self.server.max_prepared_bytes < 1024 {
            return Err(invalid(
                "server.max_prepared_bytes",
                "must be at least 1024",
            ));
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
            // PostgreSQL never accepts an empty password. The proxy would, at its own login,
            // and a server that trusts the proxy's address would then let anyone in as `name`.
            if u.password.is_empty() {
                return Err(invalid(
                    format!("users[{i}].password"),
                    format!(
                        "user {:?} has an empty password, which PostgreSQL never accepts",
                        u.name
                    ),
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
            if same_server(&r.host, r.port, &self.primary.host, self.primary.port) {
                return Err(invalid(
                    key,
                    format!(
                        "replica has the same address as the primary ({}:{})",
                        self.primary.host, self.primary.port
                    ),
                ));
            }
            if self.replicas[..i].iter().any(|o| o.name == r.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("duplicate replica {:?}", r.name),
                ));
            }
            if let Some(o) = self.replicas[..i]
                .iter()
                .find(|o| same_server(&o.host, o.port, &r.host, r.port))
            {
                return Err(invalid(
                    key,
                    format!("two replicas share one address ({:?} is there too)", o.name),
                ));
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
        if self.server.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "server.worker_threads",
                format!("must be at most {MAX_WORKER_THREADS} (0 picks one per core)"),
            ));
        }
        if self.server.max_client_connections == 0 {
            return Err(invalid(
                "server.max_client_connections",
                "must be at least 1",
            ));
        }
        for (i, u) in self.users.iter().enumerate() {
            if u.max_connections == Some(0) {
                return Err(invalid(
                    format!("users[{i}].max_connections"),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
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
            ("server.login_timeout_ms", self.server.login_timeout_ms),
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
        let t = &self.priority.acquire_timeout_ms;
        for (class, v) in [
            ("commit", t.commit),
            ("write", t.write),
            ("point_read", t.point_read),
            ("read", t.read),
            ("analytic", t.analytic),
        ] {
            if v == Some(0) {
                return Err(invalid(
                    format!("priority.acquire_timeout_ms.{class}"),
                    "must be greater than 0 (leave it out to use pool.acquire_timeout_ms)",
                ));
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

    /// Checks that the files and directories the settings name are there: the socket
    /// directory, and the TLS files the configured modes read, which must also hold a
    /// certificate and its key (or CA certificates). Done when a file is loaded, so
    /// that `causeway check` reports what would stop start-up on this machine.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        let unix = &self.server.listen_unix;
        if !unix.is_empty() {
            match std::fs::metadata(unix) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(invalid(
                        "server.listen_unix",
                        format!("{unix} is not a directory"),
                    ));
                }
                Err(e) => return Err(invalid("server.listen_unix", format!("{unix}: {e}"))),
            }
        }
        let t = &self.tls;
        let mut files = Vec::new();
        if t.client_mode != ClientTls::Disable {
            files.extend([
                ("tls.cert_file", &t.cert_file),
                ("tls.key_file", &t.key_file),
            ]);
        }
        if t.backend_mode == BackendTls::VerifyFull {
            files.push(("tls.backend_ca_file", &t.backend_ca_file));
        }
        for (key, path) in files {
            if let Err(e) = std::fs::File::open(path) {
                return Err(invalid(key, format!("cannot read {path}: {e}")));
            }
        }
        // Loaded as start-up loads them: a file that is there but holds no certificate, or a
        // key that does not belong to the certificate, stops start-up too.
        crate::tls::Tls::from_config(self).map_err(|e| invalid(e.key, e.message))?;
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

/// Parses a tracing filter: comma-separated directives, each a plain level (`info`) or
/// `target=level` (span filters in brackets as tracing writes them). A bare word that is not a
/// level is refused: tracing would take it for a target name and turn off every other line, so
/// a typo such as `warning` would silence the proxy.
pub fn log_filter(text: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    use tracing_subscriber::filter::LevelFilter;
    let mut directives = text.split(',').map(str::trim).filter(|d| !d.is_empty());
    if directives.clone().next().is_none() {
        return Err("is empty: write a level such as \"info\"".into());
    }
    if let Some(word) =
        directives.find(|d| !d.contains(['=', '[']) && d.parse::<LevelFilter>().is_err())
    {
        return Err(format!(
            "{word:?} is not a level (off, error, warn, info, debug, trace); \
             to set one target's level write target=level, e.g. \"causeway=debug,info\""
        ));
    }
    tracing_subscriber::EnvFilter::try_new(text).map_err(|e| {
        format!("{text:?} is not a log filter (e.g. \"info\" or \"causeway=debug,info\"): {e}")
    })
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
        return Err(invalid(format!("{key}.port"), PORT_RANGE));
    }
    Ok(())
}

/// How a port out of range is described, whether it is 0 or does not fit in 16 bits.
pub(crate) const PORT_RANGE: &str = "expected a whole number from 1 to 65535";

/// What a `host` is compared as when looking for one server configured twice.
#[derive(Debug, PartialEq, Eq)]
enum HostKey {
    /// `localhost`, `127.0.0.1` and `::1`: this machine's loopback, however it is spelled.
    Loopback,
    Ip(std::net::IpAddr),
    /// A DNS name, compared as written (case aside): it is not resolved.
    Name(String),
    /// A Unix-socket directory.
    Socket(String),
}

/// Names are not looked up: a name may resolve differently, or not at all, where and when
/// `causeway check` runs, so two names are the same server only if they are the same name.
/// Only the loopback spellings, whose meaning does not depend on DNS, are treated as one.
fn host_key(host: &str) -> HostKey {
    use std::net::IpAddr;
    if host.starts_with('/') {
        let dir = host.trim_end_matches('/');
        return HostKey::Socket(if dir.is_empty() { "/" } else { dir }.to_string());
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let loopback = match ip {
            IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
            IpAddr::V6(v6) => v6 == std::net::Ipv6Addr::LOCALHOST,
        };
        return if loopback {
            HostKey::Loopback
        } else {
            HostKey::Ip(ip)
        };
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" {
        HostKey::Loopback
    } else {
        HostKey::Name(name)
    }
}

/// Whether two `host`/`port` pairs name one server, as far as can be told without DNS.
fn same_server(a_host: &str, a_port: u16, b_host: &str, b_port: u16) -> bool {
    a_port == b_port && host_key(a_host) == host_key(b_host)
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
        let e = err_of(&format!("{BASE}\n[server]\nmax_client_connections = 0\n"));
        assert!(e.contains("server.max_client_connections"), "{e}");
        let e = err_of(&BASE.replace(
            "password = \"pw\"",
            "password = \"pw\"\nmax_connections = 0",
        ));
        assert!(e.contains("users[0].max_connections"), "{e}");
        let e = err_of(&BASE.replace("password = \"pw\"", "password = \"\""));
        assert!(e.contains("users[0].password"), "{e}");
        for class in ["commit", "write", "point_read", "read", "analytic"] {
            let e = err_of(&format!(
                "{BASE}\n[priority.acquire_timeout_ms]\n{class} = 0\n"
            ));
            assert!(
                e.contains(&format!("priority.acquire_timeout_ms.{class}")),
                "{e}"
            );
        }
        let e = err_of(&format!("{BASE}\n[server]\nlisten = \"nowhere\"\n"));
        assert!(e.contains("server.listen"), "{e}");
        let e = err_of(&format!(
            "{BASE}\n[server]\nlisten_unix = \"run/causeway\"\n"
        ));
        assert!(e.contains("server.listen_unix"), "{e}");
    }

    #[test]
    fn file_values_keep_their_toml_type() {
        for (section, line, key, says) in [
            (
                "pool",
                "primary_max = 2.9",
                "pool.primary_max",
                "floating point `2.9`",
            ),
            (
                "pool",
                "replica_max = 0.4",
                "pool.replica_max",
                "floating point `0.4`",
            ),
            (
                "pool",
                "acquire_timeout_ms = 1e3",
                "pool.acquire_timeout_ms",
                "floating point",
            ),
            (
                "pool",
                "primary_max = \"50\"",
                "pool.primary_max",
                "string \"50\"",
            ),
            ("pool", "mode = 5", "pool.mode", "integer `5`"),
            (
                "routing",
                "follow_promotion = \"yes\"",
                "routing.follow_promotion",
                "string",
            ),
            (
                "routing",
                "follow_promotion = 1",
                "routing.follow_promotion",
                "integer `1`",
            ),
            (
                "priority",
                "enabled = 0.5",
                "priority.enabled",
                "floating point",
            ),
            ("logging", "level = 5", "logging.level", "integer `5`"),
            (
                "server",
                "monitor_user = 1",
                "server.monitor_user",
                "integer `1`",
            ),
        ] {
            let e = err_of(&format!("{BASE}\n[{section}]\n{line}\n"));
            assert!(e.contains(&format!("`{key}`")), "{line}: {e}");
            assert!(e.contains(says), "{line}: {e}");
        }
        let e = err_of(&format!(
            "{BASE}\n[[replicas]]\nname = \"r2\"\nhost = \"h\"\nport = \"5434\"\n"
        ));
        assert!(e.contains("`replicas[1].port`"), "{e}");
        // An integer is a number: it may stand for a float.
        let cfg = Config::from_toml(&format!("{BASE}\n[priority]\nbackground_share = 1\n"));
        assert_eq!(cfg.unwrap().priority.background_share, 1.0);
    }

    #[test]
    fn log_levels_are_levels_or_directives() {
        for good in [
            "info",
            "WARN",
            "causeway=debug,info",
            "causeway::route=trace, warn",
            "off",
            "[session]=debug",
        ] {
            assert!(log_filter(good).is_ok(), "{good}");
        }
        for bad in [
            "warning",
            "debg",
            "info,causeway",
            "",
            " , ",
            "=[",
            "causeway=loud",
        ] {
            assert!(log_filter(bad).is_err(), "{bad:?}");
            let e = err_of(&format!("{BASE}\n[logging]\nlevel = {bad:?}\n"));
            assert!(e.contains("logging.level"), "{e}");
        }
    }

    fn with_env(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::build(BASE, vars)
    }

    #[test]
    fn environment_values_parse_as_their_key_type() {
        let cfg = with_env(&[
            ("CAUSEWAY__POOL__PRIMARY_MAX", "7"),
            ("causeway__routing__follow_promotion", "TRUE"),
            ("CAUSEWAY__PRIORITY__BACKGROUND_SHARE", "0.25"),
            ("CAUSEWAY__POOL__MODE", "session"),
            ("CAUSEWAY__SERVER__MONITOR_USER", "app"),
            ("CAUSEWAY__ADMIN__TOKEN", "0123"),
            ("CAUSEWAY__PRIORITY__ACQUIRE_TIMEOUT_MS__COMMIT", "50"),
            ("CAUSEWAY__PRIMARY__PORT", "6000"),
            ("CAUSEWAY_LOG", "debug"),
        ])
        .unwrap();
        assert_eq!(cfg.pool.primary_max, 7);
        assert!(cfg.routing.follow_promotion);
        assert_eq!(cfg.priority.background_share, 0.25);
        assert_eq!(cfg.pool.mode, PoolMode::Session);
        assert_eq!(cfg.server.monitor_user.as_deref(), Some("app"));
        assert_eq!(cfg.admin.token, "0123");
        assert_eq!(cfg.priority.acquire_timeout_ms.commit, Some(50));
        assert_eq!(cfg.primary.port, 6000);
        for (var, value) in [
            ("CAUSEWAY__POOL__PRIMARY_MAX", "2.9"),
            ("CAUSEWAY__POOL__PRIMARY_MAX", "1e3"),
            ("CAUSEWAY__POOL__PRIMARY_MAX", "-1"),
            ("CAUSEWAY__POOL__PRIMARY_MAX", "lots"),
            ("CAUSEWAY__ROUTING__FOLLOW_PROMOTION", "yes"),
            ("CAUSEWAY__ROUTING__FOLLOW_PROMOTION", "1"),
            ("CAUSEWAY__PRIORITY__BACKGROUND_SHARE", "half"),
            ("CAUSEWAY__PRIORITY__BACKGROUND_SHARE", "NaN"),
            ("CAUSEWAY__PRIMARY__PORT", "70000"),
            ("CAUSEWAY__POOL__MODE", "statement"),
        ] {
            let e = with_env(&[(var, value)]).unwrap_err().to_string();
            assert!(e.contains(var), "{var}={value}: {e}");
            let key = var[10..].to_ascii_lowercase().replace("__", ".");
            assert!(e.contains(&format!("`{key}`")), "{var}={value}: {e}");
        }
        let e = with_env(&[("CAUSEWAY__POOL__PRIMARY_MAXX", "3")]).unwrap_err();
        assert!(e.to_string().contains("primary_maxx"), "{e}");
        let e = with_env(&[("CAUSEWAY__USERS__NAME", "x")]).unwrap_err();
        assert!(e.to_string().contains("CAUSEWAY__USERS__NAME"), "{e}");
    }

    #[test]
    fn the_admin_endpoint_needs_an_address_of_its_own() {
        for (listen, admin) in [
            ("127.0.0.1:6432", "127.0.0.1:6432"),
            ("0.0.0.0:6432", "127.0.0.1:6432"),
            ("127.0.0.1:6432", "0.0.0.0:6432"),
        ] {
            let e = err_of(&format!(
                "{BASE}\n[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n"
            ));
            assert!(e.contains("server.admin_listen"), "{e}");
        }
        for (listen, admin) in [
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("127.0.0.1:6432", "127.0.0.2:6432"),
            ("127.0.0.1:6432", "127.0.0.1:9930"),
        ] {
            let text =
                format!("{BASE}\n[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n");
            assert!(Config::from_toml(&text).is_ok(), "{listen} {admin}");
        }
    }

    #[test]
    fn files_and_directories_named_must_be_there() {
        let dir = tempfile::tempdir().unwrap();
        let here = dir.path().display();
        let file = dir.path().join("cert.pem");
        std::fs::write(&file, "x").unwrap();
        let file = file.display();
        let missing = dir.path().join("missing.pem");
        let missing = missing.display();
        let check = |extra: &str| {
            Config::from_toml(&format!("{BASE}\n{extra}\n"))
                .unwrap()
                .check_paths()
        };
        for (extra, key) in [
            (
                format!("[server]\nlisten_unix = \"{here}/nope\""),
                "server.listen_unix",
            ),
            (
                format!("[server]\nlisten_unix = \"{file}\""),
                "server.listen_unix",
            ),
            (
                format!(
                    "[tls]\nclient_mode = \"allow\"\ncert_file = \"{missing}\"\nkey_file = \"{file}\""
                ),
                "tls.cert_file",
            ),
            (
                format!(
                    "[tls]\nclient_mode = \"require\"\ncert_file = \"{file}\"\nkey_file = \"{missing}\""
                ),
                "tls.key_file",
            ),
            (
                format!("[tls]\nbackend_mode = \"verify-full\"\nbackend_ca_file = \"{missing}\""),
                "tls.backend_ca_file",
            ),
        ] {
            let e = check(&extra).unwrap_err().to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = dir.path().join("good.pem");
        std::fs::write(&pem, format!("{}{}", cert.pem(), key.serialize_pem())).unwrap();
        let pem = pem.display();
        for extra in [
            format!("[server]\nlisten_unix = \"{here}\""),
            format!("[tls]\nclient_mode = \"allow\"\ncert_file = \"{pem}\"\nkey_file = \"{pem}\""),
            // Files a mode does not use are not read.
            format!("[tls]\ncert_file = \"{missing}\"\nbackend_ca_file = \"{missing}\""),
        ] {
            assert!(check(&extra).is_ok(), "{extra}");
        }
    }

    /// Files that are there but unusable are refused as start-up would refuse them, naming
    /// the key and the file.
    #[test]
    fn tls_files_are_loaded_as_start_up_loads_them() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let pair = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            (
                write(&format!("{name}.crt"), &cert.pem()),
                write(&format!("{name}.key"), &key.serialize_pem()),
            )
        };
        let (cert, key) = pair("one");
        let (_, other_key) = pair("two");
        let garbage = write("garbage.pem", "garbage\n");
        let check = |extra: String| {
            Config::from_toml(&format!("{BASE}\n{extra}\n"))
                .unwrap()
                .check_paths()
        };
        let client = |c: &str, k: &str| {
            format!("[tls]\nclient_mode = \"allow\"\ncert_file = \"{c}\"\nkey_file = \"{k}\"")
        };
        for (extra, key_named, file) in [
            (client(&garbage, &key), "tls.cert_file", &garbage),
            (client(&cert, &garbage), "tls.key_file", &garbage),
            (client(&cert, &other_key), "tls.key_file", &other_key),
            (
                format!("[tls]\nbackend_mode = \"verify-full\"\nbackend_ca_file = \"{garbage}\""),
                "tls.backend_ca_file",
                &garbage,
            ),
        ] {
            let e = check(extra.clone()).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key_named}`")), "{extra}: {e}");
            assert!(e.contains(file.as_str()), "{extra}: {e}");
        }
        assert!(check(client(&cert, &key)).is_ok());
        let ca = format!("[tls]\nbackend_mode = \"verify-full\"\nbackend_ca_file = \"{cert}\"");
        assert!(check(ca).is_ok());
    }

    #[test]
    fn worker_threads_have_an_upper_bound() {
        let at = |n: usize| Config::from_toml(&format!("{BASE}\n[server]\nworker_threads = {n}\n"));
        assert!(at(0).is_ok());
        assert!(at(MAX_WORKER_THREADS).is_ok());
        for n in [MAX_WORKER_THREADS + 1, 100_000] {
            let e = at(n).unwrap_err().to_string();
            assert!(e.contains("server.worker_threads"), "{e}");
            assert!(e.contains(&MAX_WORKER_THREADS.to_string()), "{e}");
        }
    }

    #[test]
    fn ports_out_of_range_read_the_same_whatever_the_value() {
        let zero = err_of(&BASE.replace("port = 5432", "port = 0"));
        let big = err_of(&BASE.replace("port = 5432", "port = 70000"));
        let env = with_env(&[("CAUSEWAY__PRIMARY__PORT", "70000")])
            .unwrap_err()
            .to_string();
        for e in [&zero, &big, &env] {
            assert!(e.contains("primary.port"), "{e}");
            assert!(e.contains("from 1 to 65535"), "{e}");
        }
    }

    #[test]
    fn one_server_spelled_two_ways_is_one_address() {
        for same in [
            ("127.0.0.1", "localhost"),
            ("localhost", "::1"),
            ("127.0.0.1", "[::1]"),
            ("LocalHost.", "127.0.0.1"),
            ("::ffff:10.0.0.5", "10.0.0.5"),
            ("2001:db8::1", "2001:DB8:0:0:0:0:0:1"),
            ("DB.internal", "db.internal"),
            ("/var/run/postgresql/", "/var/run/postgresql"),
        ] {
            assert!(same_server(same.0, 5432, same.1, 5432), "{same:?}");
            assert!(!same_server(same.0, 5432, same.1, 5433), "{same:?}");
        }
        for other in [
            ("127.0.0.1", "127.0.0.2"),
            ("10.0.0.5", "db.internal"),
            ("db1.internal", "db2.internal"),
            ("/tmp", "/var/run/postgresql"),
            ("localhost", "/tmp"),
        ] {
            assert!(!same_server(other.0, 5432, other.1, 5432), "{other:?}");
        }
        let replica_on_primary = BASE.replace(
            "host = \"127.0.0.1\"\nport = 5433",
            "host = \"localhost\"\nport = 5432",
        );
        let e = err_of(&replica_on_primary);
        assert!(e.contains("replicas[0]") && e.contains("primary"), "{e}");
        let twice = format!("{BASE}\n[[replicas]]\nname = \"r2\"\nhost = \"::1\"\nport = 5433\n");
        let e = err_of(&twice);
        assert!(e.contains("replicas[1]") && e.contains("replica1"), "{e}");
        let elsewhere =
            format!("{BASE}\n[[replicas]]\nname = \"r2\"\nhost = \"127.0.0.2\"\nport = 5433\n");
        assert!(Config::from_toml(&elsewhere).is_ok());
    }

    #[test]
    fn a_missing_file_is_called_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        let e = Config::load(&path).unwrap_err();
        assert!(matches!(e, ConfigError::Missing(_)), "{e:?}");
        assert!(e.to_string().contains("does not exist"), "{e}");
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
