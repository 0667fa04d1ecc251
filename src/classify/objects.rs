//! Catalog facts beyond function names: where a statement calls a function without naming it.
//!
//! - an aggregate runs its transition, final, combine and (de)serial functions, whatever
//!   `pg_proc` records for the aggregate itself: the loader folds their volatility into it;
//! - an operator runs the function behind it (`pg_operator.oprcode`);
//! - `x.f` may be the call `f(x)` (attribute notation) when `f` takes one composite or
//!   polymorphic argument;
//! - reading a view runs the functions and operators of its definition (classified here like
//!   any statement: `pg_depend` records no dependency on built-in functions), and reads the
//!   relations it names; reading a parent table reads its partitions and children;
//! - an unlogged relation cannot be read during recovery at all.
//!
//! Everything is reduced at load time to a few name tables, so classification stays a lookup.

use std::collections::HashMap;

use super::functions::{FunctionCatalog, Verdict};
use super::{Access, PinReason};

/// Where a function is defined: decides whether the built-in lists speak for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Origin {
    /// `pg_catalog` or `information_schema`.
    #[default]
    System,
    /// A member of an installed extension.
    Extension,
    /// Written by a user: judged by its own volatility.
    User,
}

/// One function as `pg_proc` (and `pg_aggregate`) describe it.
#[derive(Clone, Debug, Default)]
pub struct ProcFact {
    /// `pg_proc.oid`.
    pub oid: u32,
    /// Schema name.
    pub schema: String,
    /// `proname`.
    pub name: String,
    /// `provolatile`; for an aggregate, the worst of its own and its support functions'.
    pub volatility: char,
    /// Where it is defined.
    pub origin: Origin,
    /// Callable with one composite or polymorphic argument, so `x.name` may call it.
    pub attribute_call: bool,
}

/// A relation outside the system schemas that may need the primary: unlogged, a view, or a
/// table with partitions or children.
#[derive(Clone, Debug, Default)]
pub struct RelationFact {
    /// `pg_class.oid`.
    pub oid: u32,
    /// `relname`.
    pub name: String,
    /// `relpersistence = 'u'`.
    pub unlogged: bool,
    /// A view's definition (`pg_get_viewdef`).
    pub definition: Option<String>,
}

/// Everything the proxy loads from a database's catalogs.
#[derive(Clone, Debug, Default)]
pub struct CatalogFacts {
    /// Every function.
    pub procs: Vec<ProcFact>,
    /// Operators outside `pg_catalog`: (name, oid of the function behind it).
    pub operators: Vec<(String, u32)>,
    /// Relations that may need the primary (see [`RelationFact`]).
    pub relations: Vec<RelationFact>,
    /// Relations reading the first one also reads (a view's relations, a parent's children).
    pub reads: Vec<(u32, u32)>,
}

/// Why reading a relation needs the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RelationUse {
    /// Its definition (or a view it reads) calls a function that must run on the primary.
    CallsWriter,
    /// The same, and that call leaves session state on the connection (a session advisory
    /// lock, `set_config(…, false)`): reading it pins the session like the call itself.
    Pins(PinReason),
    /// It is unlogged or reads one: a standby cannot read it, not even to plan a query.
    Unlogged,
}

impl RelationUse {
    /// The classification reason.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            RelationUse::CallsWriter | RelationUse::Pins(_) => "view_calls_writer",
            RelationUse::Unlogged => "unlogged_relation",
        }
    }
}

impl FunctionCatalog {
    /// Builds the catalog from everything loaded from the database, plus operator overrides.
    pub fn from_facts(
        facts: &CatalogFacts,
        read_only_overrides: &[String],
        write_overrides: &[String],
    ) -> Self {
        let mut cat = Self::builtin_only(read_only_overrides, write_overrides);
        let mut procs = HashMap::new();
        let mut by_oid = HashMap::with_capacity(facts.procs.len());
        for p in &facts.procs {
            Self::add_proc(&mut procs, &p.name, p.volatility);
            let verdict = cat.judge(&p.name, p.volatility, p.origin);
            by_oid.insert(p.oid, verdict);
            let key = p.name.to_lowercase();
            if p.origin == Origin::User && !matches!(p.volatility, 'i' | 's') {
                cat.custom_volatile.insert(key.clone());
            }
            if p.attribute_call && verdict != Verdict::Read {
                cat.attribute_calls.entry(key.clone()).or_insert(verdict);
            }
            if !p.schema.eq_ignore_ascii_case("pg_catalog") {
                cat.qualified
                    .entry(key)
                    .or_default()
                    .push((p.schema.clone(), verdict));
            }
        }
        cat.procs = Some(procs);
        // A function the load did not see (dropped in between) counts as a writer.
        let unknown = Verdict::Write {
            reason: "unknown_function",
            pin: None,
        };
        let of = |oid: &u32| by_oid.get(oid).copied().unwrap_or(unknown);
        for (name, func) in &facts.operators {
            if let v @ Verdict::Write { .. } = of(func) {
                cat.operators.entry(name.clone()).or_insert(v);
            }
        }
        cat.relations = relation_uses(facts, &cat);
        cat
    }
}

/// Names of the relations whose reading needs the primary: the unlogged ones and views calling
/// writers, then whatever reads those, until nothing changes (views of views, parents of
/// parents). A relation changes at most twice (none, writer, unlogged), so the rounds are
/// bounded by twice the number of relations, and in practice by the depth of the nesting.
fn relation_uses(
    facts: &CatalogFacts,
    functions: &FunctionCatalog,
) -> HashMap<String, RelationUse> {
    let mut uses: HashMap<u32, RelationUse> = HashMap::new();
    for r in &facts.relations {
        if r.unlogged {
            uses.insert(r.oid, RelationUse::Unlogged);
        } else if let Some(def) = &r.definition {
            let c = super::classify(def, functions);
            if let Some(pin) = c.pin {
                uses.insert(r.oid, RelationUse::Pins(pin));
            } else if c.access == Access::Write {
                uses.insert(r.oid, RelationUse::CallsWriter);
            }
        }
    }
    loop {
        let mut changed = false;
        for (reader, read) in &facts.reads {
            let Some(&u) = uses.get(read) else { continue };
            let cur = uses.get(reader).copied();
            if cur.is_none_or(|c| c < u) {
                uses.insert(*reader, u);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut names = HashMap::new();
    for r in &facts.relations {
        if let Some(&u) = uses.get(&r.oid) {
            // Names only: a same-named relation in another schema goes to the primary too.
            let e = names.entry(r.name.clone()).or_insert(u);
            *e = (*e).max(u);
        }
    }
    names
}
