//! Typed configuration: `proxy.toml` plus `CAUSEWAY__SECTION__KEY` environment overrides,
//! validated before use (at start-up, and again on every reload, which swaps it in whole).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod sections;

pub use sections::*;

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
        let unix = &self.server.listen_unix;
        if !unix.is_empty() && !unix.starts_with('/') {
            return Err(invalid(
                "server.listen_unix",
                format!("{unix:?} is not an absolute directory path"),
            ));
        }
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
        let e = err_of(&format!("{BASE}\n[server]\nmax_client_connections = 0\n"));
        assert!(e.contains("server.max_client_connections"), "{e}");
        let e = err_of(&BASE.replace(
            "password = \"pw\"",
            "password = \"pw\"\nmax_connections = 0",
        ));
        assert!(e.contains("users[0].max_connections"), "{e}");
        let e = err_of(&format!("{BASE}\n[server]\nlisten = \"nowhere\"\n"));
        assert!(e.contains("server.listen"), "{e}");
        let e = err_of(&format!(
            "{BASE}\n[server]\nlisten_unix = \"run/causeway\"\n"
        ));
        assert!(e.contains("server.listen_unix"), "{e}");
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
