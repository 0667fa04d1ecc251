//! A configuration laid over one the proxy generates (the demo's): the user's file and the
//! `CAUSEWAY__…` variables on top, under the same strict schema as `proxy.toml`. Keys the
//! generated configuration must keep are refused by name, never dropped.

use std::path::Path;

use super::{Config, ConfigError, source};

/// What the user gives on top of a generated configuration: a file's tables, when a file is
/// named, and the `CAUSEWAY__SECTION__KEY` variables.
#[derive(Debug, Default)]
pub struct Overlay {
    table: toml::Table,
    vars: Vec<(String, String)>,
}

impl Overlay {
    /// Reads `path` (when given) and the environment's `CAUSEWAY__…` variables.
    pub fn read(path: Option<&Path>) -> Result<Overlay, ConfigError> {
        let text = match path {
            Some(p) => super::read_text(p)?,
            None => String::new(),
        };
        Overlay::new(&text, super::env_vars()?)
    }

    /// An overlay of TOML `text` and `vars` (`CAUSEWAY__SECTION__KEY`, value).
    pub fn new(text: &str, vars: Vec<(String, String)>) -> Result<Overlay, ConfigError> {
        let table = toml::from_str(text).map_err(|e| ConfigError::Load(e.to_string()))?;
        Ok(Overlay { table, vars })
    }

    /// Whether the file or a variable sets `key` (dotted: `server.admin_listen`), or a key
    /// inside it.
    pub fn sets(&self, key: &str) -> bool {
        !self.setters(key).is_empty()
    }

    /// Refuses every key of `owned` (dotted) that the overlay sets, naming each and the
    /// variable it came from; `reason` says why they are not the user's to set.
    pub fn refuse(&self, owned: &[&str], reason: &str) -> Result<(), ConfigError> {
        let keys: Vec<String> = owned.iter().flat_map(|key| self.setters(key)).collect();
        if keys.is_empty() {
            return Ok(());
        }
        Err(ConfigError::Reserved {
            keys,
            reason: reason.to_string(),
        })
    }

    /// The configuration `base` (TOML) becomes with the overlay on top: tables merge key by
    /// key, any other value (an array of tables too) replaces the base's, and the variables
    /// come last. Then the schema and every check [`Config::load`] makes.
    pub fn over(&self, base: &str) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(base).map_err(|e| ConfigError::Load(e.to_string()))?;
        merge(&mut table, &self.table);
        let cfg = Config::from_table(table, self.vars.clone())?;
        cfg.check_paths()?;
        Ok(cfg)
    }

    /// How the overlay sets `key`: `` `key` `` for the file, with the variable's name for
    /// one from the environment.
    fn setters(&self, key: &str) -> Vec<String> {
        let path: Vec<&str> = key.split('.').collect();
        let mut found = Vec::new();
        if file_sets(&self.table, &path) {
            found.push(format!("`{key}`"));
        }
        for (var, _) in &self.vars {
            let lower = var.to_ascii_lowercase();
            let Some(rest) = lower.strip_prefix(source::ENV_PREFIX) else {
                continue;
            };
            let set: Vec<&str> = rest.split("__").collect();
            if set.starts_with(&path) || path.starts_with(&set) {
                found.push(format!("`{}` (from {var})", set.join(".")));
            }
        }
        found
    }
}

fn file_sets(table: &toml::Table, path: &[&str]) -> bool {
    let Some((head, rest)) = path.split_first() else {
        return true;
    };
    match table.get(*head) {
        None => false,
        Some(toml::Value::Table(inner)) => file_sets(inner, rest),
        Some(_) => true,
    }
}

fn merge(base: &mut toml::Table, top: &toml::Table) {
    for (key, value) in top {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:6432"
admin_listen = "127.0.0.1:9930"

[[users]]
name = "app"
password = "app-secret"

[primary]
host = "127.0.0.1"
port = 5432
"#;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_file_and_then_the_environment_go_over_the_base() {
        let o = Overlay::new(
            "[pool]\nprimary_max = 3\nreplica_max = 5\n[server]\nadmin_listen = \"127.0.0.1:0\"",
            vars(&[("CAUSEWAY__POOL__REPLICA_MAX", "4"), ("HOME", "/root")]),
        )
        .unwrap();
        let cfg = o.over(BASE).unwrap();
        assert_eq!(cfg.pool.primary_max, 3);
        assert_eq!(cfg.pool.replica_max, 4);
        // A table merges key by key: the base's listen stays.
        assert_eq!(cfg.server.listen, "127.0.0.1:6432");
        assert_eq!(cfg.server.admin_listen, "127.0.0.1:0");
        assert_eq!(cfg.primary.port, 5432);
        assert!(o.sets("server.admin_listen"));
        assert!(o.sets("pool"));
        assert!(!o.sets("server.listen"));
    }

    #[test]
    fn an_unknown_key_or_a_wrong_type_is_refused_by_name() {
        let e = Overlay::new("[pool]\nprimary_mx = 3", Vec::new())
            .unwrap()
            .over(BASE)
            .unwrap_err();
        assert!(e.to_string().contains("primary_mx"), "{e}");
        let e = Overlay::new("[pool]\nprimary_max = \"3\"", Vec::new())
            .unwrap()
            .over(BASE)
            .unwrap_err();
        assert!(e.to_string().contains("pool.primary_max"), "{e}");
    }

    #[test]
    fn reserved_keys_are_named_with_their_source() {
        let o = Overlay::new(
            "[primary]\nport = 5999\n[[replicas]]\nname = \"r\"\nhost = \"h\"\nport = 1\n[pool]\nprimary_max = 3",
            vars(&[("CAUSEWAY__SERVER__LISTEN", "127.0.0.1:1")]),
        )
        .unwrap();
        let e = o
            .refuse(&["primary", "replicas", "users", "server.listen"], "why")
            .unwrap_err();
        let text = e.to_string();
        for part in [
            "`primary`",
            "`replicas`",
            "`server.listen` (from CAUSEWAY__SERVER__LISTEN)",
            "why",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        assert!(!text.contains("users"), "{text}");
        assert!(o.refuse(&["users", "tls"], "why").is_ok());
    }
}
