//! Fast path for the common single-statement SELECT / VALUES / INSERT / UPDATE / DELETE.
//!
//! `pg_query::parse` serialises the whole tree to protobuf and decodes it (≈5–7 µs for a simple
//! statement); `pg_query::summary` walks the tree in C with PostgreSQL's own
//! `raw_expression_tree_walker` and returns only statement types and called functions (≈1.7 µs),
//! and `scan_tokens` lexes without protobuf (≈0.3 µs). Together they decide everything the full
//! walker would for the shapes accepted here; anything else returns `None` and takes the full path:
//! - `WITH` (possible data-modifying CTEs) and `RETURNING` (summary does not walk PG18 RETURNING);
//! - `SELECT … INTO` (temp-table pin needs the tree) and more than one statement;
//! - `set_config` (its pin depends on the third argument), and dotted function names (a schema,
//!   or a dot inside a quoted name: only the tree tells);
//! - a word the catalog flags: an operator or attribute-notation call that needs the primary,
//!   or a relation whose reading does (the summary lists neither operators nor column
//!   references). With no such objects in the database this costs one check per statement.
//!
//! Locking clauses are found lexically: `FOR` is a reserved word, so `FOR UPDATE`, `FOR SHARE`,
//! `FOR NO KEY UPDATE` and `FOR KEY SHARE` can only be a locking clause in these statements.

use std::borrow::Cow;

use pg_query::protobuf::summary_result::Context;
use pg_query::protobuf::{KeywordKind, ScanToken, Token as T};

use super::functions::{FunctionCatalog, Verdict};
use super::statement::Outcome;

/// Root statement shapes handled here.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Root {
    Select,
    Insert,
    Update,
    Delete,
}

/// Classifies `sql` without building the protobuf tree, or `None` if the full path is needed.
/// Callers must only pass strings with at least one non-comment token (see `classify`).
pub(crate) fn try_fast(sql: &str, catalog: &FunctionCatalog) -> Option<Outcome> {
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let is = |t: i32, k: T| t == k as i32;
    let mut code = tokens
        .iter()
        .filter(|t| !is(t.token, T::SqlComment) && !is(t.token, T::CComment));
    let first = code.next()?.token;
    let (root, reason, stmt_type) = if is(first, T::Select) || is(first, T::Values) {
        (Root::Select, "select", "SelectStmt")
    } else if is(first, T::Insert) {
        (Root::Insert, "insert", "InsertStmt")
    } else if is(first, T::Update) {
        (Root::Update, "update", "UpdateStmt")
    } else if is(first, T::DeleteP) {
        (Root::Delete, "delete", "DeleteStmt")
    } else {
        return None;
    };
    let mut prev = first;
    let mut ended = false;
    let mut locking = false;
    let hidden = catalog.hides_calls() || catalog.has_relations();
    for tok in code {
        let t = tok.token;
        if hidden && names_hidden_call(sql, tok, prev, catalog) {
            return None;
        }
        if ended
            || is(t, T::With)
            || is(t, T::WithLa)
            || is(t, T::Returning)
            || (root == Root::Select && is(t, T::Into))
        {
            return None;
        }
        if is(t, T::Ascii59) {
            ended = true;
        } else if is(prev, T::For)
            && (is(t, T::Update) || is(t, T::Share) || is(t, T::No) || is(t, T::Key))
        {
            locking = true;
        }
        prev = t;
    }

    let summary = pg_query::summary(sql, 0, -1).ok()?;
    // Statement types include nested ones (INSERT … VALUES lists a SelectStmt too): the root
    // must come first and, without WITH, anything nested can only be a SELECT.
    let types = &summary.statement_types;
    if types.first().map(String::as_str) != Some(stmt_type)
        || types.iter().any(|t| t != stmt_type && t != "SelectStmt")
    {
        return None;
    }
    let mut out = if root == Root::Select {
        Outcome::read(reason)
    } else {
        Outcome::write(reason)
    };
    if locking {
        out = Outcome::write("for_update");
    }
    // The protobuf list keeps the C walker's order, so "first pin / first reason" is stable.
    for f in &summary.protobuf.functions {
        if f.context != Context::Call as i32 {
            continue;
        }
        // A dotted name may be a schema or part of a quoted name: the parse tree tells.
        if f.function_name.eq_ignore_ascii_case("set_config") || f.function_name.contains('.') {
            return None;
        }
        let schema = Some(f.schema_name.as_str()).filter(|s| !s.is_empty());
        if let Verdict::Write { reason, pin } = catalog.verdict_in(schema, &f.function_name) {
            out.mark_write(reason);
            if out.pin.is_none() {
                out.pin = pin;
            }
        }
    }
    Some(out)
}

/// Operators a keyword runs without naming them: `IN` and `NOT IN` (`=`, `<>`), `LIKE`,
/// `ILIKE`, `SIMILAR TO`, `BETWEEN`, `IS DISTINCT FROM`, `NULLIF`, `CASE x WHEN`.
fn keyword_operators(word: &str) -> &'static [&'static str] {
    match word {
        "in" => &["=", "<>"],
        "like" => &["~~", "!~~"],
        "ilike" => &["~~*", "!~~*"],
        "similar" => &["~", "!~"],
        "between" => &[">=", "<="],
        "distinct" | "nullif" | "case" => &["="],
        _ => &[],
    }
}

/// Whether `tok` may be an operator, an attribute-notation call (`x.name`) or a relation the
/// catalog flags: the tree must then decide.
fn names_hidden_call(sql: &str, tok: &ScanToken, prev: i32, catalog: &FunctionCatalog) -> bool {
    let Some(text) = usize::try_from(tok.start)
        .ok()
        .zip(usize::try_from(tok.end).ok())
        .and_then(|(s, e)| sql.get(s..e))
    else {
        return true;
    };
    let word = tok.token == T::Ident as i32 || tok.keyword_kind != KeywordKind::NoKeyword as i32;
    if word {
        let name = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            // An escaped quote inside: leave it to the tree.
            Some(quoted) if quoted.contains('"') => return true,
            Some(quoted) => Cow::Borrowed(quoted),
            None if text.bytes().any(|b| b.is_ascii_uppercase()) => {
                Cow::Owned(text.to_ascii_lowercase())
            }
            None => Cow::Borrowed(text),
        };
        return (prev == T::Ascii46 as i32 && catalog.attribute_call(&name).is_some())
            || catalog.relation(&name).is_some()
            || keyword_operators(&name)
                .iter()
                .any(|op| catalog.operator(op).is_some());
    }
    let op = if tok.token == T::NotEquals as i32 {
        "<>"
    } else {
        text
    };
    text.bytes().all(|b| b.is_ascii_punctuation()) && catalog.operator(op).is_some()
}
