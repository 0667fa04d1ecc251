//! Per-statement rules on the full parse tree, and how several statements combine.

use pg_query::NodeEnum as N;
use pg_query::protobuf as pb;

use super::functions::FunctionCatalog;
use super::objects::RelationUse;
use super::values;
use super::walker::Walker;
use super::{Access, PinReason, ProxyCommand, RouteMode, SessionCommand, TxEffect, TxModes};

/// `CURSOR_OPT_HOLD` from PostgreSQL's parsenodes.h.
const CURSOR_OPT_HOLD: i32 = 0x20;

/// The reason of a COPY FROM, after which the server reads the client's data.
pub(crate) const COPY_FROM: &str = "copy_from";

/// What one statement means for routing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) access: Access,
    pub(crate) tx: TxEffect,
    pub(crate) pin: Option<PinReason>,
    pub(crate) proxy: Option<ProxyCommand>,
    pub(crate) session: Option<SessionCommand>,
    pub(crate) reason: &'static str,
    /// Some fact came from a literal's value.
    pub(crate) by_value: bool,
    /// COMMIT AND CHAIN or ROLLBACK AND CHAIN: the block ends and a new one opens at once.
    pub(crate) chain: bool,
    /// A read only the primary answers truly (whether the server accepts writes).
    pub(crate) primary: bool,
}

impl Outcome {
    /// A read with no side facts.
    pub(crate) fn read(reason: &'static str) -> Self {
        Self {
            access: Access::Read,
            tx: TxEffect::None,
            pin: None,
            proxy: None,
            session: None,
            reason,
            by_value: false,
            chain: false,
            primary: false,
        }
    }

    /// A write with no side facts.
    pub(crate) fn write(reason: &'static str) -> Self {
        Self {
            access: Access::Write,
            ..Self::read(reason)
        }
    }

    /// Turns a read into a write; an existing write keeps its first reason.
    pub(crate) fn mark_write(&mut self, reason: &'static str) {
        if self.access == Access::Read {
            self.access = Access::Write;
            self.reason = reason;
        } else {
            self.reason = super::keep_reason(self.reason, reason);
        }
    }

    fn with_session(mut self, cmd: SessionCommand) -> Self {
        self.session = Some(cmd);
        self
    }

    fn with_pin(mut self, pin: PinReason) -> Self {
        self.pin = Some(pin);
        self
    }

    fn with_tx(mut self, tx: TxEffect) -> Self {
        self.tx = tx;
        self
    }

    /// Turns walker facts into an outcome: `default` is the reason when nothing forces a write.
    fn from_walker(w: Walker<'_>, default: &'static str) -> Self {
        let mut o = match w.write {
            Some(reason) => Self::write(reason),
            None => Self::read(default),
        };
        o.pin = w.pin;
        o.by_value = w.by_value;
        o
    }
}

/// Classifies one top-level statement of a parse tree.
pub(crate) fn classify_stmt(stmt: &N, catalog: &FunctionCatalog) -> Outcome {
    match stmt {
        N::SelectStmt(s) => {
            let mut w = Walker::new(catalog);
            w.select(s);
            let mut o = Outcome::from_walker(w, "select");
            if o.pin.is_none() {
                o.pin = values::set_config_pin(s);
            }
            o
        }
        N::InsertStmt(_) => dml(stmt, catalog, "insert"),
        N::UpdateStmt(_) => dml(stmt, catalog, "update"),
        N::DeleteStmt(_) => dml(stmt, catalog, "delete"),
        N::MergeStmt(_) => dml(stmt, catalog, "merge"),
        N::ExplainStmt(e) => explain(e, catalog),
        N::CopyStmt(c) => copy(c, catalog),
        N::DeclareCursorStmt(d) => {
            if d.options & CURSOR_OPT_HOLD != 0 {
                return Outcome::write("declare_hold").with_pin(PinReason::HoldCursor);
            }
            inner_query(&d.query, catalog, "declare_cursor")
        }
        // FETCH/MOVE/CLOSE follow the cursor's transaction (or its pinned session).
        N::FetchStmt(_) | N::ClosePortalStmt(_) => Outcome::read("cursor"),
        N::PrepareStmt(_) => Outcome::write("prepare").with_pin(PinReason::SqlPrepare),
        // The prepared text is unknown here, so executing it may write.
        N::ExecuteStmt(_) => Outcome::write("execute"),
        N::DeallocateStmt(d) => {
            let name = (!d.isall && !d.name.is_empty()).then(|| d.name.clone());
            Outcome::write("deallocate").with_session(SessionCommand::Deallocate { name })
        }
        N::TransactionStmt(t) => transaction(t),
        N::VariableSetStmt(v) => variable_set(v),
        N::VariableShowStmt(v) => match causeway_name(&v.name) {
            Some(name) => Outcome {
                proxy: Some(ProxyCommand::Show { name }),
                ..Outcome::read("proxy_command")
            },
            None => Outcome {
                primary: values::show_answered_by_primary(&v.name),
                ..Outcome::read("show")
            },
        },
        N::DiscardStmt(d) => {
            let o = Outcome::read("discard").with_pin(PinReason::SessionSet);
            if d.target == pb::DiscardMode::DiscardAll as i32 {
                o.with_session(SessionCommand::DiscardAll)
            } else {
                o
            }
        }
        N::LoadStmt(_) => Outcome::write("load").with_pin(PinReason::Load),
        N::ListenStmt(_) => Outcome::write("listen").with_pin(PinReason::Listen),
        N::UnlistenStmt(_) => Outcome::write("unlisten"),
        N::NotifyStmt(_) => Outcome::write("notify"),
        N::LockStmt(_) => Outcome::write("lock"),
        N::CallStmt(_) => Outcome::write("call"),
        // A DO block may change anything a function can (settings, role, temp tables, locks)
        // where the classifier cannot see: the session keeps its backend.
        N::DoStmt(_) => Outcome::write("do").with_pin(PinReason::SessionSet),
        N::TruncateStmt(_) => Outcome::write("truncate"),
        N::VacuumStmt(_)
        | N::ClusterStmt(_)
        | N::ReindexStmt(_)
        | N::RefreshMatViewStmt(_)
        | N::CheckPointStmt(_) => Outcome::write("maintenance"),
        N::CreateStmt(c) => ddl_maybe_temp(c.relation.as_ref()),
        N::ViewStmt(v) => ddl_maybe_temp(v.view.as_ref()),
        N::CreateSeqStmt(s) => ddl_maybe_temp(s.sequence.as_ref()),
        N::CreateTableAsStmt(c) => ddl_maybe_temp(c.into.as_ref().and_then(|i| i.rel.as_ref())),
        N::CreateForeignTableStmt(f) => {
            ddl_maybe_temp(f.base_stmt.as_ref().and_then(|b| b.relation.as_ref()))
        }
        N::CompositeTypeStmt(c) => ddl_maybe_temp(c.typevar.as_ref()),
        // Functions, types, domains, operators, aggregates… can be made in `pg_temp` too, and
        // live with the session's backend exactly like a temporary table.
        N::CreateFunctionStmt(f) => ddl_named(&f.funcname),
        N::DefineStmt(d) => ddl_named(&d.defnames),
        N::CreateEnumStmt(e) => ddl_named(&e.type_name),
        N::CreateRangeStmt(r) => ddl_named(&r.type_name),
        N::CreateDomainStmt(d) => ddl_named(&d.domainname),
        N::CreateStatsStmt(st) => ddl_named(&st.defnames),
        N::CreateConversionStmt(c) => ddl_named(&c.conversion_name),
        N::CreateOpClassStmt(c) => ddl_named(&c.opclassname),
        N::CreateOpFamilyStmt(f) => ddl_named(&f.opfamilyname),
        // Everything else is DDL, DCL or administration: primary only.
        _ => Outcome::write("ddl"),
    }
}

/// INSERT/UPDATE/DELETE/MERGE: always writes; walked for pins (e.g. advisory locks).
fn dml(stmt: &N, catalog: &FunctionCatalog, reason: &'static str) -> Outcome {
    let mut w = Walker::new(catalog);
    w.mark(reason);
    w.visit(stmt);
    Outcome::from_walker(w, reason)
}

/// Classifies a statement nested in EXPLAIN ANALYZE / COPY / DECLARE.
fn inner_query(
    q: &Option<Box<pb::Node>>,
    catalog: &FunctionCatalog,
    read: &'static str,
) -> Outcome {
    match q.as_ref().and_then(|n| n.node.as_ref()) {
        Some(inner) => {
            let o = classify_stmt(inner, catalog);
            match o.access {
                Access::Read => Outcome { reason: read, ..o },
                Access::Write => o,
            }
        }
        None => Outcome::write("utility"),
    }
}

/// Plain EXPLAIN only plans, so it is a read whatever it explains; EXPLAIN ANALYZE executes.
fn explain(e: &pb::ExplainStmt, catalog: &FunctionCatalog) -> Outcome {
    let analyze = e.options.iter().any(|o| match &o.node {
        Some(N::DefElem(d)) => d.defname.eq_ignore_ascii_case("analyze") && !def_is_false(d),
        _ => false,
    });
    // `ANALYZE 0` and `ANALYZE 1` differ only in a literal.
    let by_value = !e.options.is_empty();
    if !analyze {
        // Planning alone opens the relations, and a standby refuses unlogged ones.
        if catalog.has_relations()
            && let Some(q) = e.query.as_ref()
        {
            let mut w = Walker::new(catalog);
            w.node(q);
            if w.unlogged {
                return Outcome {
                    by_value,
                    ..Outcome::write(RelationUse::Unlogged.reason())
                };
            }
        }
        return Outcome {
            by_value,
            ..Outcome::read("explain")
        };
    }
    let o = inner_query(&e.query, catalog, "explain_analyze");
    Outcome {
        tx: TxEffect::None,
        proxy: None,
        by_value: by_value || o.by_value,
        ..o
    }
}

/// COPY FROM loads data; COPY TO a server file or program has host side effects; COPY TO STDOUT
/// is as read-only as its query.
fn copy(c: &pb::CopyStmt, catalog: &FunctionCatalog) -> Outcome {
    if c.is_from {
        return Outcome::write(COPY_FROM);
    }
    if c.is_program || !c.filename.is_empty() {
        return Outcome::write("copy_to_file");
    }
    if c.query.is_some() {
        return inner_query(&c.query, catalog, "copy_to");
    }
    if let Some(u) = c
        .relation
        .as_ref()
        .and_then(|r| catalog.relation(&r.relname))
    {
        return Outcome::write(u.reason());
    }
    Outcome::read("copy_to")
}

fn transaction(t: &pb::TransactionStmt) -> Outcome {
    use pb::TransactionStmtKind as K;
    match K::try_from(t.kind) {
        Ok(K::TransStmtBegin | K::TransStmtStart) => {
            // A hot standby refuses SERIALIZABLE, read-only or not: such transactions run on
            // the primary.
            let serializable = transaction_isolation(&t.options) == Some(true);
            let read_only = transaction_read_only(&t.options).unwrap_or(false) && !serializable;
            Outcome::read("begin").with_tx(TxEffect::Begin {
                read_only,
                serializable,
            })
        }
        Ok(K::TransStmtCommit) => Outcome {
            chain: t.chain,
            ..Outcome::read("commit").with_tx(TxEffect::Commit)
        },
        Ok(K::TransStmtRollback) => Outcome {
            chain: t.chain,
            ..Outcome::read("rollback").with_tx(TxEffect::Rollback)
        },
        Ok(K::TransStmtSavepoint | K::TransStmtRelease | K::TransStmtRollbackTo) => {
            Outcome::read("savepoint")
        }
        // PREPARE TRANSACTION ends the session's transaction block like COMMIT does.
        Ok(K::TransStmtPrepare) => Outcome::write("prepared_xact").with_tx(TxEffect::Commit),
        _ => Outcome::write("prepared_xact"),
    }
}

/// Whether the last `transaction_isolation` option is SERIALIZABLE (`None`: no level named).
fn transaction_isolation(options: &[pb::Node]) -> Option<bool> {
    let level = options.iter().rev().find_map(|o| match &o.node {
        Some(N::DefElem(d)) if d.defname == "transaction_isolation" => {
            match d.arg.as_ref().and_then(|a| a.node.as_ref()) {
                Some(N::AConst(c)) => match &c.val {
                    Some(pb::a_const::Val::Sval(s)) => Some(s.sval.to_ascii_lowercase()),
                    _ => None,
                },
                Some(N::String(s)) => Some(s.sval.to_ascii_lowercase()),
                _ => None,
            }
        }
        _ => None,
    });
    level.map(|l| l == "serializable")
}

/// Value of the last `transaction_read_only` option, if any.
fn transaction_read_only(options: &[pb::Node]) -> Option<bool> {
    options.iter().rev().find_map(|o| match &o.node {
        Some(N::DefElem(d)) if d.defname == "transaction_read_only" => Some(!def_is_false(d)),
        _ => None,
    })
}

fn variable_set(v: &pb::VariableSetStmt) -> Outcome {
    use pb::VariableSetKind as K;
    let kind = K::try_from(v.kind).unwrap_or(K::Undefined);
    if let Some(o) = set_transaction(v, kind) {
        return o;
    }
    if v.name.eq_ignore_ascii_case("session characteristics") {
        return Outcome::read("set_session_characteristics")
            .with_pin(PinReason::SessionCharacteristics);
    }
    if let Some(name) = causeway_name(&v.name) {
        if kind == K::VarReset {
            return Outcome {
                proxy: Some(ProxyCommand::Reset { name }),
                ..Outcome::read("proxy_command")
            };
        }
        let value = match kind {
            K::VarSetValue => Some(join_values(&v.args)),
            _ => None,
        };
        let cmd = if name == "route" {
            match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None => Some(ProxyCommand::SetRoute(RouteMode::Auto)),
                Some("primary") => Some(ProxyCommand::SetRoute(RouteMode::Primary)),
                Some("replica") => Some(ProxyCommand::SetRoute(RouteMode::Replica)),
                Some("auto") => Some(ProxyCommand::SetRoute(RouteMode::Auto)),
                // Invalid mode: hand it over as a plain variable so the proxy can reject it.
                Some(_) => None,
            }
        } else {
            None
        };
        let proxy = cmd.unwrap_or(ProxyCommand::SetVar { name, value });
        return Outcome {
            proxy: Some(proxy),
            ..Outcome::read("proxy_command")
        };
    }
    // search_path and standard_conforming_strings pin by value (see `values`), even LOCAL: the
    // rest of the transaction already runs under them. Such a SET is not replayed elsewhere.
    let by_value = values::read_by_value(&v.name);
    let value_pin = match kind {
        K::VarSetValue => values::pin_for_setting(&v.name, &join_values(&v.args)),
        _ => None,
    };
    if v.is_local {
        let o = Outcome {
            by_value,
            ..Outcome::read("set_local")
        };
        return match value_pin {
            Some(pin) => o.with_pin(pin),
            None => o,
        };
    }
    if let Some(pin) = value_pin {
        return Outcome {
            by_value,
            ..Outcome::read("set").with_pin(pin)
        };
    }
    let pinned = Outcome {
        by_value,
        ..Outcome::read("set").with_pin(PinReason::SessionSet)
    };
    let name = v.name.to_ascii_lowercase();
    // Only a superuser may switch session authorization; keep such sessions on one backend.
    if name == "session_authorization" {
        return pinned;
    }
    let cmd = match kind {
        K::VarSetValue => SessionCommand::Set {
            name,
            value: Some(join_values(&v.args)),
        },
        K::VarSetCurrent => SessionCommand::Set { name, value: None },
        K::VarSetDefault | K::VarReset => SessionCommand::Reset { name },
        K::VarResetAll => SessionCommand::ResetAll,
        _ => return pinned,
    };
    pinned.with_session(cmd)
}

/// `SET TRANSACTION …` and the settings it stands for (`transaction_isolation`,
/// `transaction_read_only`, `transaction_deferrable`): they shape only the transaction they run
/// in, so the session keeps nothing. A standby refuses serializable isolation, even outside a
/// transaction block where the primary only warns: asking for it is for the primary.
fn set_transaction(v: &pb::VariableSetStmt, kind: pb::VariableSetKind) -> Option<Outcome> {
    let value = || (kind == pb::VariableSetKind::VarSetValue).then(|| join_values(&v.args));
    let modes = match v.name.to_ascii_lowercase().as_str() {
        "transaction" => TxModes {
            serializable: transaction_isolation(&v.args),
            read_only: transaction_read_only(&v.args),
            checked: true,
        },
        "transaction_isolation" => TxModes {
            serializable: value().map(|i| i.eq_ignore_ascii_case("serializable")),
            ..TxModes::default()
        },
        "transaction_read_only" => TxModes {
            read_only: value().map(|v| !is_false_word(&v)),
            ..TxModes::default()
        },
        "transaction_deferrable" => TxModes::default(),
        _ => return None,
    };
    // What these mean comes from their value (`= 'on'`, `= 'serializable'`), which a shape
    // masks: cached by exact text only.
    let outcome = if modes.serializable == Some(true) {
        Outcome::write("serializable")
    } else {
        Outcome::read("set_transaction")
    };
    Some(Outcome {
        by_value: true,
        ..outcome.with_tx(TxEffect::SetModes(modes))
    })
}

/// `causeway.<name>` => lower-cased `<name>`.
fn causeway_name(name: &str) -> Option<String> {
    let head = name.get(..9)?;
    head.eq_ignore_ascii_case("causeway.")
        .then(|| name[9..].to_ascii_lowercase())
}

/// Renders SET values as text (`'a'` => a, 42 => 42); several values are comma-joined.
fn join_values(args: &[pb::Node]) -> String {
    let mut out = String::new();
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        if let Some(N::AConst(c)) = &a.node {
            match &c.val {
                Some(pb::a_const::Val::Sval(s)) => out.push_str(&s.sval),
                Some(pb::a_const::Val::Ival(n)) => out.push_str(&n.ival.to_string()),
                Some(pb::a_const::Val::Fval(f)) => out.push_str(&f.fval),
                Some(pb::a_const::Val::Boolval(b)) => {
                    out.push_str(if b.boolval { "on" } else { "off" })
                }
                Some(pb::a_const::Val::Bsval(b)) => out.push_str(&b.bsval),
                None => {}
            }
        }
    }
    out
}

/// True when a DefElem's argument spells false (`false`, `off`, `0`...); no argument means true.
fn def_is_false(d: &pb::DefElem) -> bool {
    match d.arg.as_ref().and_then(|a| a.node.as_ref()) {
        None => false,
        Some(N::AConst(c)) => match &c.val {
            Some(pb::a_const::Val::Boolval(b)) => !b.boolval,
            Some(pb::a_const::Val::Ival(i)) => i.ival == 0,
            Some(pb::a_const::Val::Sval(s)) => is_false_word(&s.sval),
            _ => false,
        },
        Some(N::Integer(i)) => i.ival == 0,
        Some(N::Boolean(b)) => !b.boolval,
        Some(N::String(s)) => is_false_word(&s.sval),
        _ => false,
    }
}

/// A word PostgreSQL reads as boolean false.
fn is_false_word(w: &str) -> bool {
    matches!(
        w.to_ascii_lowercase().as_str(),
        "false" | "off" | "no" | "f" | "n" | "0"
    )
}

/// CREATE TABLE/VIEW/SEQUENCE/TABLE AS: DDL, pinned when the relation is temporary.
fn ddl_maybe_temp(rel: Option<&pb::RangeVar>) -> Outcome {
    let o = Outcome::write("ddl");
    match rel {
        Some(r) if is_temp(r) => o.with_pin(PinReason::TempTable),
        _ => o,
    }
}

/// CREATE of a function, type, operator…: DDL, pinned when made in the temporary schema.
fn ddl_named(names: &[pb::Node]) -> Outcome {
    let o = Outcome::write("ddl");
    // `schema.name` or `catalog.schema.name`: the schema is the part before the name.
    let schema = names.len().checked_sub(2).and_then(|i| names.get(i));
    match schema.and_then(values::string_of) {
        Some(s) if is_temp_schema(s) => o.with_pin(PinReason::TempTable),
        _ => o,
    }
}

/// TEMP/TEMPORARY relations, or relations created explicitly in the session's temporary schema.
pub(crate) fn is_temp(r: &pb::RangeVar) -> bool {
    r.relpersistence == "t" || is_temp_schema(&r.schemaname)
}

/// `pg_temp`, or the `pg_temp_N` name of a session's temporary schema (names starting with
/// `pg_` are the system's, so the prefix is enough).
fn is_temp_schema(name: &str) -> bool {
    name.get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("pg_temp"))
}

/// Folds per-statement outcomes of a multi-statement string (see [`super::Classification`]).
pub(crate) fn combine(outcomes: &[Outcome]) -> Outcome {
    let mut combined = Outcome::read(outcomes.first().map_or("empty", |o| o.reason));
    let mut write_reason = None;
    for o in outcomes {
        if combined.tx == TxEffect::None {
            combined.tx = o.tx;
        }
        if combined.pin.is_none() {
            combined.pin = o.pin;
        }
        if o.access == Access::Write {
            write_reason = Some(match write_reason {
                Some(first) => super::keep_reason(first, o.reason),
                None => o.reason,
            });
        }
        combined.by_value |= o.by_value;
        combined.chain |= o.chain;
        combined.primary |= o.primary;
    }
    // A read-write transaction opened by the string itself belongs on the primary.
    let opens_rw = outcomes.len() > 1 && outcomes.iter().any(|o| o.tx.begins_on_primary());
    if opens_rw && write_reason.is_none() {
        write_reason = Some("begin_read_write");
    }
    if let Some(reason) = write_reason {
        combined.access = Access::Write;
        combined.reason = reason;
    }
    if let [single] = outcomes {
        combined.proxy = single.proxy.clone();
        combined.session = single.session.clone();
    } else if outcomes.iter().any(|o| o.proxy.is_some()) {
        combined.proxy = Some(ProxyCommand::Misplaced);
    } else {
        combined.session = resets(outcomes);
    }
    combined
}

/// The resets of a multi-statement string whose other statements leave no session state
/// (asyncpg's `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`). Without
/// transaction control such a string runs as one implicit transaction: either all of it takes
/// effect or none, so the proxy knows the settings it leaves.
fn resets(outcomes: &[Outcome]) -> Option<SessionCommand> {
    let mut names = Vec::new();
    for o in outcomes {
        match &o.session {
            Some(SessionCommand::Reset { name }) => names.push(Some(name.clone())),
            Some(SessionCommand::ResetAll) => names.push(None),
            Some(_) => return None,
            None if o.pin.is_some() || o.tx != TxEffect::None || o.chain => return None,
            // SAVEPOINT, RELEASE and ROLLBACK TO work on a transaction block.
            None if o.reason == "savepoint" => return None,
            None => {}
        }
    }
    (!names.is_empty()).then_some(SessionCommand::Resets(names))
}
