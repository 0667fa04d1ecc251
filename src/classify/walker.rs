//! Walks a raw parse tree (protobuf form) of a query and records the facts that make it a write.
//!
//! Mirrors PostgreSQL's `raw_expression_tree_walker`, so every function call is seen wherever it
//! sits (select list, WHERE, FROM, VALUES, ORDER BY, window clauses, CTEs, sub-links...).
//! Node types the walker does not know are treated as writes ("unsupported_node"): a gap in the
//! walker may cost a replica read, never send a write to a replica.

use pg_query::NodeEnum as N;
use pg_query::protobuf as pb;

use super::PinReason;
use super::functions::{FunctionCatalog, Verdict};
use super::objects::RelationUse;

/// Accumulated facts; first write reason and first pin win.
pub(crate) struct Walker<'c> {
    catalog: &'c FunctionCatalog,
    /// Why the walked tree must run on the primary, if it must.
    pub(crate) write: Option<&'static str>,
    /// Session state the walked tree leaves behind.
    pub(crate) pin: Option<PinReason>,
    /// Some fact came from a literal's value (see [`super::Classification::by_value`]).
    pub(crate) by_value: bool,
    /// Some relation read cannot be read during recovery, not even by EXPLAIN.
    pub(crate) unlogged: bool,
}

impl<'c> Walker<'c> {
    /// Starts with no facts.
    pub(crate) fn new(catalog: &'c FunctionCatalog) -> Self {
        Self {
            catalog,
            write: None,
            pin: None,
            by_value: false,
            unlogged: false,
        }
    }

    /// Records a write reason unless an earlier one exists.
    pub(crate) fn mark(&mut self, reason: &'static str) {
        self.write = Some(match self.write {
            Some(first) => super::keep_reason(first, reason),
            None => reason,
        });
    }

    /// Records a pin unless an earlier one exists.
    pub(crate) fn pin(&mut self, pin: PinReason) {
        self.pin.get_or_insert(pin);
    }

    /// Visits an optional node.
    pub(crate) fn node(&mut self, n: &pb::Node) {
        if let Some(e) = &n.node {
            self.visit(e);
        }
    }

    fn opt(&mut self, n: &Option<Box<pb::Node>>) {
        if let Some(n) = n {
            self.node(n);
        }
    }

    fn list(&mut self, l: &[pb::Node]) {
        for n in l {
            self.node(n);
        }
    }

    /// Visits one node and everything below it.
    pub(crate) fn visit(&mut self, e: &N) {
        match e {
            // Leaves: no sub-expressions that could call a function.
            N::String(_)
            | N::Integer(_)
            | N::Float(_)
            | N::Boolean(_)
            | N::BitString(_)
            | N::AConst(_)
            | N::ParamRef(_)
            | N::AStar(_)
            | N::Alias(_)
            | N::SqlvalueFunction(_)
            | N::SetToDefault(_)
            | N::CurrentOfExpr(_)
            | N::JsonFormat(_)
            | N::JsonReturning(_)
            | N::MergeSupportFunc(_)
            | N::ReturningOption(_) => {}
            // `x.f` may be the call `f(x)`; only names the catalog knows as writers count.
            N::ColumnRef(c) => {
                if c.fields.len() >= 2 {
                    self.attribute(c.fields.last());
                }
            }
            N::RangeVar(r) => self.relation(r),
            N::List(l) => self.list(&l.items),
            N::SelectStmt(s) => self.select(s),
            N::InsertStmt(s) => {
                self.mark("writable_cte");
                self.target(&s.relation);
                self.list(&s.cols);
                self.opt(&s.select_stmt);
                if let Some(oc) = &s.on_conflict_clause {
                    self.on_conflict(oc);
                }
                self.returning(&s.returning_clause);
                self.with(&s.with_clause);
            }
            N::UpdateStmt(s) => {
                self.mark("writable_cte");
                self.target(&s.relation);
                self.list(&s.target_list);
                self.opt(&s.where_clause);
                self.list(&s.from_clause);
                self.returning(&s.returning_clause);
                self.with(&s.with_clause);
            }
            N::DeleteStmt(s) => {
                self.mark("writable_cte");
                self.target(&s.relation);
                self.list(&s.using_clause);
                self.opt(&s.where_clause);
                self.returning(&s.returning_clause);
                self.with(&s.with_clause);
            }
            N::MergeStmt(s) => {
                self.mark("writable_cte");
                self.target(&s.relation);
                self.opt(&s.source_relation);
                self.opt(&s.join_condition);
                self.list(&s.merge_when_clauses);
                self.returning(&s.returning_clause);
                self.with(&s.with_clause);
            }
            N::MergeWhenClause(m) => {
                self.opt(&m.condition);
                self.list(&m.target_list);
                self.list(&m.values);
            }
            N::ReturningClause(r) => {
                self.list(&r.options);
                self.list(&r.exprs);
            }
            N::FuncCall(f) => self.func_call(f),
            N::AExpr(x) => {
                self.operator(x);
                self.opt(&x.lexpr);
                self.opt(&x.rexpr);
            }
            N::BoolExpr(x) => self.list(&x.args),
            N::GroupingFunc(x) => self.list(&x.args),
            N::SubLink(x) => {
                self.operator_name(&x.oper_name);
                self.opt(&x.testexpr);
                self.opt(&x.subselect);
            }
            N::CaseExpr(x) => {
                // `CASE x WHEN v` compares with `=`.
                if x.arg.is_some()
                    && let Some(v) = self.catalog.operator("=")
                {
                    self.apply(v);
                }
                self.opt(&x.arg);
                self.list(&x.args);
                self.opt(&x.defresult);
            }
            N::CaseWhen(x) => {
                self.opt(&x.expr);
                self.opt(&x.result);
            }
            N::RowExpr(x) => self.list(&x.args),
            N::CoalesceExpr(x) => self.list(&x.args),
            N::MinMaxExpr(x) => self.list(&x.args),
            N::NullTest(x) => self.opt(&x.arg),
            N::BooleanTest(x) => self.opt(&x.arg),
            N::XmlExpr(x) => {
                self.list(&x.named_args);
                self.list(&x.args);
            }
            N::XmlSerialize(x) => {
                self.opt(&x.expr);
                self.type_name(&x.type_name);
            }
            N::NamedArgExpr(x) => self.opt(&x.arg),
            N::AIndices(x) => {
                self.opt(&x.lidx);
                self.opt(&x.uidx);
            }
            N::AIndirection(x) => {
                self.opt(&x.arg);
                for i in &x.indirection {
                    self.attribute(Some(i));
                }
                self.list(&x.indirection);
            }
            N::AArrayExpr(x) => self.list(&x.elements),
            N::ResTarget(x) => {
                self.list(&x.indirection);
                self.opt(&x.val);
            }
            N::MultiAssignRef(x) => self.opt(&x.source),
            N::TypeCast(x) => {
                self.opt(&x.arg);
                self.type_name(&x.type_name);
            }
            N::TypeName(t) => self.type_name_ref(t),
            N::CollateClause(x) => self.opt(&x.arg),
            N::SortBy(x) => {
                self.operator_name(&x.use_op);
                self.opt(&x.node);
            }
            N::WindowDef(w) => self.window(w),
            N::JoinExpr(j) => {
                self.opt(&j.larg);
                self.opt(&j.rarg);
                self.opt(&j.quals);
            }
            N::RangeSubselect(r) => self.opt(&r.subquery),
            N::RangeFunction(r) => {
                self.list(&r.functions);
                self.list(&r.coldeflist);
            }
            N::RangeTableSample(r) => {
                self.opt(&r.relation);
                self.list(&r.args);
                self.opt(&r.repeatable);
            }
            N::RangeTableFunc(r) => {
                self.opt(&r.docexpr);
                self.opt(&r.rowexpr);
                self.list(&r.namespaces);
                self.list(&r.columns);
            }
            N::RangeTableFuncCol(c) => {
                self.opt(&c.colexpr);
                self.opt(&c.coldefexpr);
            }
            N::ColumnDef(c) => {
                self.type_name(&c.type_name);
                self.opt(&c.raw_default);
            }
            N::IndexElem(i) => self.opt(&i.expr),
            N::GroupingSet(g) => self.list(&g.content),
            N::LockingClause(_) => self.mark("for_update"),
            N::WithClause(w) => self.list(&w.ctes),
            N::CommonTableExpr(c) => self.opt(&c.ctequery),
            N::OnConflictClause(oc) => self.on_conflict(oc),
            N::InferClause(i) => {
                self.list(&i.index_elems);
                self.opt(&i.where_clause);
            }
            N::IntoClause(i) => self.select_into(i),
            N::DefElem(d) => self.opt(&d.arg),
            _ => self.json(e),
        }
    }

    /// SQL/JSON expression nodes (split out to keep `visit` readable).
    fn json(&mut self, e: &N) {
        match e {
            N::JsonValueExpr(x) => self.json_value(x),
            N::JsonParseExpr(x) => self.json_value_opt(&x.expr),
            N::JsonScalarExpr(x) => self.opt(&x.expr),
            N::JsonSerializeExpr(x) => self.json_value_opt(&x.expr),
            N::JsonConstructorExpr(x) => {
                self.list(&x.args);
                self.opt(&x.func);
                self.opt(&x.coercion);
            }
            N::JsonIsPredicate(x) => self.opt(&x.expr),
            N::JsonArgument(x) => self.json_value_opt(&x.val),
            N::JsonFuncExpr(x) => {
                self.json_value_opt(&x.context_item);
                self.opt(&x.pathspec);
                self.list(&x.passing);
                self.json_behavior(&x.on_empty);
                self.json_behavior(&x.on_error);
            }
            N::JsonBehavior(x) => self.opt(&x.expr),
            N::JsonTable(x) => {
                self.json_value_opt(&x.context_item);
                if let Some(p) = &x.pathspec {
                    self.opt(&p.string);
                }
                self.list(&x.passing);
                self.list(&x.columns);
                self.json_behavior(&x.on_error);
            }
            N::JsonTableColumn(x) => {
                self.type_name(&x.type_name);
                self.json_behavior(&x.on_empty);
                self.json_behavior(&x.on_error);
                self.list(&x.columns);
            }
            N::JsonTablePathSpec(x) => self.opt(&x.string),
            N::JsonKeyValue(x) => {
                self.opt(&x.key);
                self.json_value_opt(&x.value);
            }
            N::JsonObjectConstructor(x) => self.list(&x.exprs),
            N::JsonArrayConstructor(x) => self.list(&x.exprs),
            N::JsonArrayQueryConstructor(x) => self.opt(&x.query),
            N::JsonAggConstructor(x) => self.json_agg(x),
            N::JsonObjectAgg(x) => {
                if let Some(c) = &x.constructor {
                    self.json_agg(c);
                }
                if let Some(kv) = &x.arg {
                    self.opt(&kv.key);
                    self.json_value_opt(&kv.value);
                }
            }
            N::JsonArrayAgg(x) => {
                if let Some(c) = &x.constructor {
                    self.json_agg(c);
                }
                self.json_value_opt(&x.arg);
            }
            N::JsonOutput(_) => {}
            // Anything else (utility statements, analyzed-tree nodes) is unexpected inside a
            // raw query tree: stay on the safe side.
            _ => self.mark("unsupported_node"),
        }
    }

    /// SELECT, VALUES and set operations; locking clauses and INTO are recorded before the
    /// children so the reason names the statement shape rather than a nested function.
    pub(crate) fn select(&mut self, s: &pb::SelectStmt) {
        if !s.locking_clause.is_empty() {
            self.mark("for_update");
        }
        if let Some(into) = &s.into_clause {
            self.mark("select_into");
            self.select_into(into);
        }
        self.list(&s.distinct_clause);
        self.list(&s.target_list);
        self.list(&s.from_clause);
        self.opt(&s.where_clause);
        self.list(&s.group_clause);
        self.opt(&s.having_clause);
        self.list(&s.window_clause);
        self.list(&s.values_lists);
        self.list(&s.sort_clause);
        self.opt(&s.limit_offset);
        self.opt(&s.limit_count);
        self.with(&s.with_clause);
        if let Some(l) = &s.larg {
            self.select(l);
        }
        if let Some(r) = &s.rarg {
            self.select(r);
        }
    }

    fn select_into(&mut self, i: &pb::IntoClause) {
        if i.rel.as_ref().is_some_and(super::statement::is_temp) {
            self.pin(PinReason::TempTable);
        }
    }

    fn with(&mut self, w: &Option<pb::WithClause>) {
        if let Some(w) = w {
            self.list(&w.ctes);
        }
    }

    fn returning(&mut self, r: &Option<pb::ReturningClause>) {
        if let Some(r) = r {
            self.list(&r.options);
            self.list(&r.exprs);
        }
    }

    fn on_conflict(&mut self, oc: &pb::OnConflictClause) {
        if let Some(i) = &oc.infer {
            self.list(&i.index_elems);
            self.opt(&i.where_clause);
        }
        self.list(&oc.target_list);
        self.opt(&oc.where_clause);
    }

    fn window(&mut self, w: &pb::WindowDef) {
        self.list(&w.partition_clause);
        self.list(&w.order_clause);
        self.opt(&w.start_offset);
        self.opt(&w.end_offset);
    }

    fn type_name(&mut self, t: &Option<pb::TypeName>) {
        if let Some(t) = t {
            self.type_name_ref(t);
        }
    }

    fn type_name_ref(&mut self, t: &pb::TypeName) {
        self.list(&t.typmods);
        self.list(&t.array_bounds);
    }

    fn json_value(&mut self, x: &pb::JsonValueExpr) {
        self.opt(&x.raw_expr);
        self.opt(&x.formatted_expr);
    }

    fn json_value_opt(&mut self, x: &Option<Box<pb::JsonValueExpr>>) {
        if let Some(x) = x {
            self.json_value(x);
        }
    }

    fn json_behavior(&mut self, x: &Option<Box<pb::JsonBehavior>>) {
        if let Some(x) = x {
            self.opt(&x.expr);
        }
    }

    fn json_agg(&mut self, c: &pb::JsonAggConstructor) {
        self.opt(&c.agg_filter);
        self.list(&c.agg_order);
        if let Some(w) = &c.over {
            self.window(w);
        }
    }

    fn func_call(&mut self, f: &pb::FuncCall) {
        let name = f.funcname.last().and_then(string);
        // `schema.name` or `database.schema.name`.
        let schema = match f.funcname.len() {
            0 | 1 => None,
            n => f.funcname.get(n - 2).and_then(string),
        };
        match name {
            Some(name) => self.call(schema, name, &f.args),
            None => self.mark("unknown_function"),
        }
        self.list(&f.args);
        self.list(&f.agg_order);
        self.opt(&f.agg_filter);
        if let Some(w) = &f.over {
            self.window(w);
        }
    }

    /// Records a verdict that needs the primary.
    fn apply(&mut self, verdict: Verdict) {
        if let Verdict::Write { reason, pin } = verdict {
            self.mark(reason);
            if let Some(p) = pin {
                self.pin(p);
            }
        }
    }

    /// A field name after a dot: the call `name(x)` if the catalog knows it as a writer.
    fn attribute(&mut self, field: Option<&pb::Node>) {
        if let Some(name) = field.and_then(string)
            && let Some(v) = self.catalog.attribute_call(name)
        {
            self.apply(v);
        }
    }

    /// The operator of an expression; BETWEEN runs `>=` and `<=`.
    fn operator(&mut self, x: &pb::AExpr) {
        use pb::AExprKind as K;
        match K::try_from(x.kind) {
            Ok(
                K::AexprBetween | K::AexprNotBetween | K::AexprBetweenSym | K::AexprNotBetweenSym,
            ) => {
                for op in [">=", "<="] {
                    if let Some(v) = self.catalog.operator(op) {
                        self.apply(v);
                    }
                }
            }
            _ => self.operator_name(&x.name),
        }
    }

    /// An operator named in the tree (`OPERATOR(schema.op)` names it with its schema).
    fn operator_name(&mut self, name: &[pb::Node]) {
        if let Some(op) = name.last().and_then(string)
            && let Some(v) = self.catalog.operator(op)
        {
            self.apply(v);
        }
    }

    /// The table a data-modifying statement changes: already a write, but planning it (plain
    /// EXPLAIN) opens it, which a standby refuses for an unlogged one.
    fn target(&mut self, r: &Option<pb::RangeVar>) {
        if let Some(r) = r {
            self.relation(r);
        }
    }

    /// A relation read: unlogged ones and views calling writers need the primary.
    fn relation(&mut self, r: &pb::RangeVar) {
        if let Some(u) = self.catalog.relation(&r.relname) {
            self.mark(u.reason());
            self.unlogged |= u == RelationUse::Unlogged;
            if let RelationUse::Pins(pin) = u {
                self.pin(pin);
            }
        }
    }

    /// Applies the catalog verdict for one call of `name`, qualified with `schema` or not.
    fn call(&mut self, schema: Option<&str>, name: &str, args: &[pb::Node]) {
        if let Verdict::Write { reason, pin } = self.catalog.verdict_in(schema, name) {
            self.mark(reason);
            if let Some(p) = pin {
                self.pin(p);
            }
            if name.eq_ignore_ascii_case("set_config") {
                self.by_value = true;
            }
            if name.eq_ignore_ascii_case("set_config") && !is_literal_true(args.get(2)) {
                // is_local = false keeps the setting for the whole session; a parameter or any
                // other expression might be false too, so only a literal true avoids the pin.
                self.pin(PinReason::SessionSet);
            }
        }
    }
}

/// The text of a `String` node.
fn string(n: &pb::Node) -> Option<&str> {
    match &n.node {
        Some(N::String(s)) => Some(s.sval.as_str()),
        _ => None,
    }
}

/// True for the literal `true` (or a string literal PostgreSQL reads as true), possibly cast.
fn is_literal_true(n: Option<&pb::Node>) -> bool {
    match n.and_then(|n| n.node.as_ref()) {
        Some(N::AConst(c)) => match &c.val {
            Some(pb::a_const::Val::Boolval(b)) => b.boolval,
            Some(pb::a_const::Val::Sval(s)) => {
                matches!(
                    s.sval.to_ascii_lowercase().as_str(),
                    "t" | "true" | "on" | "yes" | "y" | "1"
                )
            }
            _ => false,
        },
        Some(N::TypeCast(tc)) => is_literal_true(tc.arg.as_deref()),
        _ => false,
    }
}
