//! One classifier per database, with what that database's catalogs say about its functions,
//! aggregates, operators, views and unlogged relations, loaded before the first client query
//! and refreshed in the background.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use tokio_postgres::Row;

use crate::classify::{CatalogFacts, Classifier, FunctionCatalog, Origin, ProcFact, RelationFact};
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
        // One connection, the queries pipelined: one round trip's wait per refresh.
        let (procs, operators, relations, reads) = tokio::try_join!(
            client.query(PROCS, &[]),
            client.query(OPERATORS, &[]),
            client.query(RELATIONS, &[]),
            client.query(READS, &[]),
        )?;
        Ok::<_, tokio_postgres::Error>(facts(procs, operators, relations, reads))
    };
    let facts = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let r = &cfg.routing;
    let catalog = FunctionCatalog::from_facts(&facts, &r.read_only_functions, &r.write_functions);
    classifier.set_catalog(catalog);
    Ok(())
}

/// Every function with its volatility (an aggregate's includes its support functions'), where
/// it comes from, and whether `x.name` can call it: one argument (the others defaulted) of a
/// composite or polymorphic type.
const PROCS: &str = "
SELECT p.oid, n.nspname::text, p.proname::text,
       greatest(p.provolatile::text, ag.vol) AS vol,
       CASE WHEN n.nspname IN ('pg_catalog', 'information_schema') THEN 's'
            WHEN EXISTS (SELECT 1 FROM pg_depend d
                         WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                           AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e')
            THEN 'e' ELSE 'u' END AS origin,
       coalesce(p.pronargs >= 1 AND p.pronargs - p.pronargdefaults <= 1
                AND (t.typtype = 'c'
                     OR (t.typtype = 'p' AND t.typname IN ('record', 'anyelement', 'any',
                         'anycompatible', 'anynonarray', 'anycompatiblenonarray'))),
                false) AS attr
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
LEFT JOIN pg_type t ON t.oid = p.proargtypes[0]
LEFT JOIN (SELECT a.aggfnoid AS oid, max(f.provolatile::text) AS vol
           FROM pg_aggregate a
           JOIN pg_proc f ON f.oid IN (a.aggtransfn, a.aggfinalfn, a.aggcombinefn, a.aggserialfn,
                                       a.aggdeserialfn, a.aggmtransfn, a.aggminvtransfn,
                                       a.aggmfinalfn)
           GROUP BY a.aggfnoid) ag ON ag.oid = p.oid";

/// Operators outside pg_catalog, with the function each runs.
const OPERATORS: &str = "
SELECT o.oprname::text, o.oprcode::oid FROM pg_operator o
WHERE o.oprnamespace <> 'pg_catalog'::regnamespace AND o.oprcode <> 0";

/// User relations that may need the primary: unlogged ones, views (with their definition), and
/// parents of others.
const RELATIONS: &str = "
SELECT c.oid, c.relname::text, c.relpersistence = 'u',
       CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END
FROM pg_class c
WHERE c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
  AND (c.relpersistence = 'u' OR c.relkind IN ('v', 'p') OR c.relhassubclass)";

/// Which relations reading another reads: a user view those its definition names, a parent
/// its partitions and children.
const READS: &str = "
SELECT DISTINCT r.ev_class, d.refobjid
FROM pg_rewrite r
JOIN pg_class c ON c.oid = r.ev_class AND c.relkind = 'v'
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
WHERE c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
UNION ALL
SELECT inhparent, inhrelid FROM pg_inherits";

/// The rows of the queries above as facts; a row that does not decode is skipped.
fn facts(
    procs: Vec<Row>,
    operators: Vec<Row>,
    relations: Vec<Row>,
    reads: Vec<Row>,
) -> CatalogFacts {
    let procs = procs
        .iter()
        .filter_map(|row| {
            let vol: String = row.try_get(3).ok()?;
            let origin: String = row.try_get(4).ok()?;
            Some(ProcFact {
                oid: row.try_get(0).ok()?,
                schema: row.try_get(1).ok()?,
                name: row.try_get(2).ok()?,
                volatility: vol.chars().next()?,
                origin: match origin.as_str() {
                    "s" => Origin::System,
                    "e" => Origin::Extension,
                    _ => Origin::User,
                },
                attribute_call: row.try_get(5).ok()?,
            })
        })
        .collect();
    let operators = operators
        .iter()
        .filter_map(|row| Some((row.try_get(0).ok()?, row.try_get(1).ok()?)))
        .collect();
    let relations = relations
        .iter()
        .filter_map(|row| {
            Some(RelationFact {
                oid: row.try_get(0).ok()?,
                name: row.try_get(1).ok()?,
                unlogged: row.try_get(2).ok()?,
                definition: row.try_get(3).ok()?,
            })
        })
        .collect();
    let reads = reads
        .iter()
        .filter_map(|row| Some((row.try_get(0).ok()?, row.try_get(1).ok()?)))
        .collect();
    CatalogFacts {
        procs,
        operators,
        relations,
        reads,
    }
}
