//! One classifier per database, with that database's function volatility from `pg_proc`,
//! loaded before the first client query and refreshed in the background.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::classify::{Classifier, FunctionCatalog};
use crate::config::Config;

/// Classifiers by database name.
pub struct Catalogs {
    map: DashMap<String, Arc<Classifier>>,
    cfg: Arc<Config>,
    tls: Arc<crate::tls::Tls>,
    stop: CancellationToken,
}

impl Catalogs {
    /// An empty registry; refresh tasks stop with `stop`.
    pub fn new(cfg: Arc<Config>, tls: Arc<crate::tls::Tls>, stop: CancellationToken) -> Self {
        Self {
            map: DashMap::new(),
            cfg,
            tls,
            stop,
        }
    }

    /// Every classifier, by database name.
    pub fn all(&self) -> Vec<(String, Arc<Classifier>)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .map(|e| (e.key().clone(), Arc::clone(e.value())))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The classifier for `database`, loading its function catalog first if this is the first
    /// client of that database. Until a load succeeds, unknown functions count as writes.
    pub async fn classifier(&self, database: &str, user: &str) -> Arc<Classifier> {
        if let Some(c) = self.map.get(database) {
            return Arc::clone(c.value());
        }
        let r = &self.cfg.routing;
        let classifier = Arc::new(Classifier::new(
            r.classify_cache_size,
            FunctionCatalog::builtin_only(&r.read_only_functions, &r.write_functions),
        ));
        let classifier = match self.map.entry(database.to_string()) {
            dashmap::Entry::Occupied(o) => return Arc::clone(o.get()),
            dashmap::Entry::Vacant(v) => Arc::clone(v.insert(classifier).value()),
        };
        let cfg = Arc::clone(&self.cfg);
        let db = database.to_string();
        let user = user.to_string();
        let tls = Arc::clone(&self.tls);
        if let Err(e) = load(&cfg, &tls, &db, &user, &classifier).await {
            tracing::warn!(database = %db, error = %e, "cannot load function catalog; unknown functions route to the primary");
        }
        let stop = self.stop.clone();
        let refreshed = Arc::clone(&classifier);
        tokio::spawn(async move {
            let every = Duration::from_millis(cfg.routing.function_refresh_ms);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {
                        if let Err(e) = load(&cfg, &tls, &db, &user, &refreshed).await {
                            tracing::debug!(database = %db, error = %e, "function catalog refresh failed");
                        }
                    }
                }
            }
        });
        classifier
    }
}

async fn load(
    cfg: &Config,
    tls: &crate::tls::Tls,
    database: &str,
    user: &str,
    classifier: &Classifier,
) -> Result<(), String> {
    let Some(login) = cfg.user(user) else {
        return Err(format!("user {user:?} is not configured"));
    };
    let timeout = cfg.connect_timeout();
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.primary.host)
        .port(cfg.primary.port)
        .user(&login.name)
        .password(&login.password)
        .dbname(database)
        .application_name("causeway-catalog")
        .connect_timeout(timeout);
    let work = async {
        let client = crate::tls::pg_connect(&pg, tls).await?;
        client
            .query("SELECT proname::text, provolatile::text FROM pg_proc", &[])
            .await
    };
    let rows = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let facts = rows.iter().filter_map(|row| {
        let name: String = row.try_get(0).ok()?;
        let vol: String = row.try_get(1).ok()?;
        Some((name, vol.chars().next()?))
    });
    let r = &cfg.routing;
    let catalog = FunctionCatalog::from_pg_proc(facts, &r.read_only_functions, &r.write_functions);
    classifier.set_catalog(catalog);
    Ok(())
}
