//! Statement classification for read/write splitting: decides whether a SQL string may run on a
//! streaming replica, plus the side facts the router needs (transaction effect, session pins,
//! proxy-handled commands, comment hints). When unsure, the answer is `Write`.
//!
//! Layout: `hints` (leading-comment directives), `functions` (function catalog), `objects`
//! (aggregates, operators, attribute notation and relations from the catalog), `fast`
//! (summary/token fast path), `statement` + `walker` (full parse-tree rules), `values` (settings
//! whose value changes what the proxy may assume about a session).

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod databases;
mod fast;
mod functions;
mod hints;
pub mod literals;
mod objects;
mod statement;
pub mod traits;
pub mod values;
mod walker;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub use databases::exclusive_databases;
pub use functions::FunctionCatalog;
pub use objects::{CatalogFacts, Origin, ProcFact, RelationFact};
pub use traits::TextTraits;

/// Whether a statement may run on a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Safe on a streaming replica.
    Read,
    /// Must run on the primary.
    Write,
}

/// Effect a statement has on the client's transaction state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxEffect {
    /// No transaction-control effect.
    None,
    /// BEGIN / START TRANSACTION; `read_only` only with an explicit READ ONLY option.
    Begin {
        /// The transaction was opened READ ONLY, and not SERIALIZABLE: a replica can run it.
        read_only: bool,
        /// The transaction was opened SERIALIZABLE, which a standby refuses.
        serializable: bool,
    },
    /// SET TRANSACTION, or `SET transaction_read_only` / `transaction_isolation`: the modes it
    /// names for the transaction it runs in (`None`: left as they were).
    SetModes(TxModes),
    /// COMMIT / END (and PREPARE TRANSACTION, which also ends the block).
    Commit,
    /// ROLLBACK / ABORT (not ROLLBACK TO SAVEPOINT).
    Rollback,
}

/// Transaction modes a `SET TRANSACTION` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TxModes {
    /// READ ONLY (`Some(true)`) or READ WRITE (`Some(false)`).
    pub read_only: Option<bool>,
    /// ISOLATION LEVEL SERIALIZABLE (`Some(true)`) or another level (`Some(false)`).
    pub serializable: Option<bool>,
    /// The `SET TRANSACTION` form, whose values the grammar itself checks: a server cannot
    /// refuse it at the start of a transaction on the right server.
    pub checked: bool,
}

/// Reasons of statements that take a lock (`LOCK`, advisory-lock functions). Among a
/// statement's write reasons these win over the first one, so a request's reason says whether
/// it locks anything: a replica would take such a lock for itself, excluding nobody writing
/// on the primary.
pub fn takes_lock(reason: &str) -> bool {
    matches!(reason, "lock" | "advisory_lock")
}

/// The write reason kept when `later` joins `first`: the first one, unless a lock comes later.
pub(crate) fn keep_reason(first: &'static str, later: &'static str) -> &'static str {
    if takes_lock(later) && !takes_lock(first) {
        later
    } else {
        first
    }
}

impl TxEffect {
    /// BEGIN of a transaction that may write, or is serializable: only the primary runs it.
    pub fn begins_on_primary(self) -> bool {
        matches!(
            self,
            TxEffect::Begin {
                read_only: false,
                ..
            }
        )
    }

    /// BEGIN, COMMIT or ROLLBACK: opens or ends a transaction block.
    pub fn bounds_block(self) -> bool {
        matches!(
            self,
            TxEffect::Begin { .. } | TxEffect::Commit | TxEffect::Rollback
        )
    }
}

/// Session state a statement leaves on its backend connection that cannot follow the client to another connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PinReason {
    /// SET / RESET / DISCARD / set_config(…, false) / setseed.
    SessionSet,
    /// A temporary object (table, view, sequence, function, type…), or a `search_path` that
    /// lists `pg_temp`, under which an unqualified CREATE may make one.
    TempTable,
    /// LISTEN.
    Listen,
    /// A session-level advisory lock.
    AdvisoryLock,
    /// An SQL-level PREPARE.
    SqlPrepare,
    /// DECLARE … WITH HOLD.
    HoldCursor,
    /// LOAD of a shared library.
    Load,
    /// SET SESSION CHARACTERISTICS AS TRANSACTION.
    SessionCharacteristics,
    /// `standard_conforming_strings` off: the server splits string literals where the parser
    /// (which assumes on) does not, so the proxy's reading of the session's statements is not
    /// to be trusted.
    NonStandardStrings,
    /// A FunctionCall (fast-path) message: the function is known only by its OID, so what it
    /// leaves behind (`set_config`, an advisory lock, an open large object) cannot be told.
    FunctionCall,
}

/// Routing directive taken from a leading comment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteHint {
    /// `/* causeway:primary */`.
    Primary,
    /// `/* causeway:replica */`.
    Replica,
}

/// Session routing mode set through `SET causeway.route`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteMode {
    /// Everything to the primary.
    Primary,
    /// Reads to replicas even when the proxy would otherwise hesitate.
    Replica,
    /// Let the classifier decide.
    Auto,
}

/// Statements the proxy answers itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyCommand {
    /// `SET [SESSION|LOCAL] causeway.route = 'primary'|'replica'|'auto'`; DEFAULT => Auto.
    SetRoute(RouteMode),
    /// Any other `SET causeway.<name>` (also `route` with an invalid value); `value` is `None`
    /// for DEFAULT; `name` is lower-cased without the `causeway.` prefix.
    SetVar {
        /// Variable name without the prefix.
        name: String,
        /// New value, `None` to reset.
        value: Option<String>,
    },
    /// `RESET causeway.<name>`: as `SET … TO DEFAULT`, answered with the tag RESET.
    Reset {
        /// Variable name without the prefix.
        name: String,
    },
    /// `SHOW causeway.<name>`.
    Show {
        /// Variable name without the prefix.
        name: String,
    },
    /// One of the above among other statements in one string: the proxy answers these itself,
    /// so the string is refused rather than sent with the setting silently left out.
    Misplaced,
}

/// Session-state statements the proxy tracks itself so they can follow the client to any
/// backend (only when the whole string is that one statement, or only resets settings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionCommand {
    /// `SET [SESSION] name …` (not LOCAL): replayed on whichever backend serves the client.
    Set {
        /// Lower-cased parameter name.
        name: String,
        /// The value as text (several values comma-joined); `None` for `FROM CURRENT`.
        value: Option<String>,
    },
    /// `RESET name` / `SET name TO DEFAULT`.
    Reset {
        /// Lower-cased parameter name.
        name: String,
    },
    /// `RESET ALL`.
    ResetAll,
    /// Several statements in one string whose only session effect is to reset settings, in
    /// order: a name for `RESET name` (or `SET name TO DEFAULT`), `None` for `RESET ALL`.
    Resets(Vec<Option<String>>),
    /// `DEALLOCATE [PREPARE] name | ALL`; `None` for ALL.
    Deallocate {
        /// Statement name, `None` for ALL.
        name: Option<String>,
    },
    /// `DISCARD ALL`.
    DiscardAll,
}

/// Directives from the comments before the first token (see `hints.rs` for the syntax).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// `causeway:primary` / `causeway:replica`.
    pub route: Option<RouteHint>,
    /// `causeway:key=<value>`.
    pub key: Option<String>,
    /// `causeway:min_lsn=<X/Y>` (validated as a pg_lsn).
    pub min_lsn: Option<String>,
    /// `causeway:priority=<word>`.
    pub priority: Option<String>,
}

/// Everything the router needs to know about one query string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classification {
    /// Write if any statement writes, or if a multi-statement string opens a read-write transaction.
    pub access: Access,
    /// First non-None transaction effect among the statements.
    pub tx: TxEffect,
    /// The last statement that opens or ends a transaction block (BEGIN, COMMIT or ROLLBACK),
    /// `None` if there is none: whether the string leaves a transaction open.
    pub last_tx: TxEffect,
    /// Some statement is a COPY FROM, after which the server reads data from the client.
    pub copy_from: bool,
    /// Some fact was read from a literal's value (EXPLAIN's options, `set_config`'s
    /// `is_local`): texts of the same shape may classify differently, so this one is cached
    /// by its exact text only.
    pub by_value: bool,
    /// Some statement is COMMIT AND CHAIN or ROLLBACK AND CHAIN: the block it ends is followed
    /// at once by a new one.
    pub chain: bool,
    /// First session pin among the statements.
    pub pin: Option<PinReason>,
    /// Leading-comment directives.
    pub hints: Hints,
    /// Proxy-handled command, only when the whole string is that single statement.
    pub proxy: Option<ProxyCommand>,
    /// Session-state command the proxy tracks: the whole string is that statement, or its
    /// other statements leave no session state behind (see [`SessionCommand::Resets`]).
    pub session: Option<SessionCommand>,
    /// Number of statements (0 for empty or comment-only strings).
    pub statements: usize,
    /// The parser rejected the string (access is then Write).
    pub parse_error: bool,
    /// Short machine-friendly reason: the first write's reason, else the first statement's.
    pub reason: &'static str,
    /// The words the priority heuristics look at (`priority::class_of`).
    pub text: TextTraits,
}

/// Pure: classify one query string (may hold several statements separated by ';').
pub fn classify(sql: &str, catalog: &FunctionCatalog) -> Classification {
    let (hints, has_code) = hints::parse_hints(sql);
    // Blank or comment-only strings skip the fast path: pg_query's `scan_tokens` builds a slice
    // from a null pointer when the scanner yields no token at all (undefined behaviour).
    let fast = if has_code {
        fast::try_fast(sql, catalog)
    } else {
        None
    };
    match fast {
        Some(o) => finish(o, 1, hints, sql),
        None => classify_full(sql, catalog, hints),
    }
}

/// Full-tree path; also used by the tests to cross-check the fast path.
fn classify_full(sql: &str, catalog: &FunctionCatalog, hints: Hints) -> Classification {
    let parsed = match pg_query::parse(sql, 0) {
        Ok(p) => p,
        Err(_) => {
            return Classification {
                access: Access::Write,
                tx: TxEffect::None,
                last_tx: TxEffect::None,
                copy_from: false,
                by_value: false,
                chain: false,
                pin: None,
                hints,
                proxy: None,
                session: None,
                statements: 0,
                parse_error: true,
                reason: "parse_error",
                text: TextTraits::scan(sql),
            };
        }
    };
    let stmts = &parsed.protobuf.stmts;
    let outcomes: Vec<statement::Outcome> = stmts
        .iter()
        .map(
            |raw| match raw.stmt.as_ref().and_then(|n| n.node.as_ref()) {
                Some(node) => statement::classify_stmt(node, catalog),
                None => statement::Outcome::write("utility"),
            },
        )
        .collect();
    let mut c = finish(statement::combine(&outcomes), stmts.len(), hints, sql);
    c.last_tx = outcomes
        .iter()
        .map(|o| o.tx)
        .rfind(|t| t.bounds_block())
        .unwrap_or(TxEffect::None);
    c.copy_from = outcomes.iter().any(|o| o.reason == statement::COPY_FROM);
    c
}

fn finish(o: statement::Outcome, statements: usize, mut hints: Hints, sql: &str) -> Classification {
    if o.primary && hints.route.is_none() {
        // A question only the primary answers truly (is this server writable?): asked as if
        // the client had hinted it there, so a transaction still keeps its own backend.
        hints.route = Some(RouteHint::Primary);
    }
    Classification {
        access: o.access,
        tx: o.tx,
        last_tx: if o.tx.bounds_block() {
            o.tx
        } else {
            TxEffect::None
        },
        copy_from: o.reason == statement::COPY_FROM,
        by_value: o.by_value,
        chain: o.chain,
        pin: o.pin,
        hints,
        proxy: o.proxy,
        session: o.session,
        statements,
        parse_error: false,
        reason: o.reason,
        text: TextTraits::scan(sql),
    }
}

/// Statements longer than this are classified but not cached: huge literal-laden strings
/// (bulk INSERTs) rarely repeat and would crowd the cache's memory.
const MAX_CACHED_LEN: usize = 16 * 1024;

/// Catalog and cache live together so that replacing the catalog and clearing the cache is one
/// step: a classification computed with the old catalog can never be inserted afterwards.
struct Inner {
    catalog: FunctionCatalog,
    cache: quick_cache::sync::Cache<String, Arc<Classification>>,
    /// By statement shape (literals masked), for statements that differ only in constants.
    shapes: quick_cache::sync::Cache<String, Arc<Classification>>,
}

impl Inner {
    fn new(catalog: FunctionCatalog, capacity: usize) -> Self {
        Self {
            catalog,
            cache: quick_cache::sync::Cache::new(capacity),
            shapes: quick_cache::sync::Cache::new(capacity),
        }
    }
}

/// Whether a classification holds nothing taken from literal values, so every statement of
/// the same shape classifies the same.
fn shareable(c: &Classification) -> bool {
    c.session.is_none() && c.proxy.is_none() && c.pin.is_none() && !c.parse_error && !c.by_value
}

/// Thread-safe cached front over [`classify`], keyed by the exact statement text.
pub struct Classifier {
    inner: RwLock<Inner>,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Classifier {
    /// Creates a classifier whose cache holds at most `capacity` statements.
    pub fn new(capacity: usize, catalog: FunctionCatalog) -> Self {
        Self {
            inner: RwLock::new(Inner::new(catalog, capacity.max(1))),
            capacity: capacity.max(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Classifies `sql`, answering repeated texts from the cache without allocating.
    pub fn classify(&self, sql: &str) -> Arc<Classification> {
        // A poisoned lock only means another thread panicked mid-call; the data is still valid.
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = inner.cache.get(sql) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return hit;
        }
        let shape = if sql.len() <= MAX_CACHED_LEN {
            literals::shape_of(sql)
        } else {
            None
        };
        if let Some(shape) = &shape
            && let Some(hit) = inner.shapes.get(shape.as_str())
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return hit;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let result = Arc::new(classify(sql, &inner.catalog));
        match shape {
            // Texts that differ only in constants rarely repeat exactly: cache the shape only.
            Some(shape) if shareable(&result) => {
                inner.shapes.insert(shape, Arc::clone(&result));
            }
            _ if sql.len() <= MAX_CACHED_LEN => {
                inner.cache.insert(sql.to_owned(), Arc::clone(&result));
            }
            _ => {}
        }
        result
    }

    /// Replaces the function catalog and drops every cached classification.
    pub fn set_catalog(&self, catalog: FunctionCatalog) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        *inner = Inner::new(catalog, self.capacity);
    }

    /// Number of cache hits so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Number of cache misses so far.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Number of cached statements (for stats).
    pub fn cached(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .cache
            .len()
            + self
                .inner
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .shapes
                .len()
    }
}
