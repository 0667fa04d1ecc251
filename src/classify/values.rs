//! Settings whose value changes what the proxy may assume about a session, however they are set
//! (SET, SET LOCAL, `set_config` at top level, a startup parameter):
//! - a `search_path` that lists `pg_temp`: an unqualified CREATE then makes a temporary object
//!   whenever the schemas before it do not exist (only the server knows which do), so the
//!   session keeps one backend from that point;
//! - `standard_conforming_strings` off: the server then reads a backslash in `'…'` as an escape
//!   and splits the text where the proxy's parser (which assumes on) does not, so nothing the
//!   proxy reads in the session's statements can be trusted; the session keeps one backend.
//!
//! `escape_string_warning` only adds warnings and `backslash_quote` only refuses `\'`: neither
//! changes where a statement ends, so neither matters here.

use pg_query::NodeEnum as N;
use pg_query::protobuf as pb;

use super::PinReason;

/// The pin a session needs once `name` is set to `value`, if any.
pub fn pin_for_setting(name: &str, value: &str) -> Option<PinReason> {
    if name.eq_ignore_ascii_case("search_path") {
        lists_temp_schema(value).then_some(PinReason::TempTable)
    } else if name.eq_ignore_ascii_case("standard_conforming_strings") {
        (!spells_true(value)).then_some(PinReason::NonStandardStrings)
    } else {
        None
    }
}

/// The pin a session needs once `name` is set to a value the proxy cannot read (a parameter or
/// an expression): the one any value could need.
pub(crate) fn pin_for_unknown_value(name: &str) -> Option<PinReason> {
    if name.eq_ignore_ascii_case("search_path") {
        Some(PinReason::TempTable)
    } else if name.eq_ignore_ascii_case("standard_conforming_strings") {
        Some(PinReason::NonStandardStrings)
    } else {
        None
    }
}

/// Settings whose value the classification reads, so statements setting them are cached by
/// their exact text only.
pub(crate) fn read_by_value(name: &str) -> bool {
    pin_for_unknown_value(name).is_some()
}

/// Whether a `search_path` value names the session's temporary schema (`pg_temp`, or its
/// `pg_temp_N` name) anywhere. Schema names starting with `pg_` are reserved for the system, so
/// the prefix cannot be a user's schema; quoting and case are ignored, which can only pin more.
fn lists_temp_schema(value: &str) -> bool {
    value
        .as_bytes()
        .windows(7)
        .any(|w| w.eq_ignore_ascii_case(b"pg_temp"))
}

/// A boolean setting's value PostgreSQL reads as true (`parse_bool`: on, true, yes, 1 and the
/// unambiguous prefixes of true and yes). Anything else counts as false here, which can only
/// pin more: an invalid value is refused by the server anyway.
pub fn spells_true(value: &str) -> bool {
    let v = value.trim();
    ["on", "1"].iter().any(|w| v.eq_ignore_ascii_case(w))
        || (!v.is_empty()
            && ["true", "yes"]
                .iter()
                .any(|w| w.len() >= v.len() && w[..v.len()].eq_ignore_ascii_case(v)))
}

/// `SHOW` of settings a driver reads to learn whether the server accepts writes (pgJDBC's
/// `targetServerType`, libpq's `target_session_attrs` before PostgreSQL 14): the proxy accepts
/// writes, so outside a transaction the primary answers them, not a standby.
pub(crate) fn show_answered_by_primary(name: &str) -> bool {
    [
        "transaction_read_only",
        "default_transaction_read_only",
        "in_hot_standby",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
}

/// A `set_config` among a SELECT's output columns that sets a setting `values` pins for, even
/// transaction-local (`is_local` true): the rest of the transaction runs under it. A name the
/// proxy cannot read (a parameter) is not followed.
pub(crate) fn set_config_pin(s: &pb::SelectStmt) -> Option<PinReason> {
    s.target_list.iter().find_map(|t| {
        let Some(N::ResTarget(t)) = &t.node else {
            return None;
        };
        let Some(N::FuncCall(f)) = t.val.as_ref().and_then(|v| v.node.as_ref()) else {
            return None;
        };
        let called = match f.funcname.as_slice() {
            [name] => string_of(name),
            [schema, name] if string_of(schema) == Some("pg_catalog") => string_of(name),
            _ => None,
        };
        if called != Some("set_config") {
            return None;
        }
        let name = literal_text(f.args.first()?)?;
        match f.args.get(1).and_then(literal_text) {
            Some(value) => pin_for_setting(name, value),
            None => pin_for_unknown_value(name),
        }
    })
}

/// The text of a String node (a name part).
pub(crate) fn string_of(n: &pb::Node) -> Option<&str> {
    match &n.node {
        Some(N::String(s)) => Some(&s.sval),
        _ => None,
    }
}

/// The text of a string literal, possibly cast (`'x'::text`).
fn literal_text(n: &pb::Node) -> Option<&str> {
    match &n.node {
        Some(N::AConst(c)) => match &c.val {
            Some(pb::a_const::Val::Sval(s)) => Some(&s.sval),
            _ => None,
        },
        Some(N::TypeCast(c)) => c.arg.as_deref().and_then(literal_text),
        _ => None,
    }
}
