//! Rules that depend on where an object is made and on a setting's value: objects made in the
//! temporary schema, a `search_path` listing `pg_temp`, `standard_conforming_strings` off, the
//! settings whose literal decides the class (never shared by shape), and the writability
//! questions only the primary answers.

use super::*;

#[test]
#[rustfmt::skip]
fn objects_made_in_the_temporary_schema_pin() {
    let rows: &[Row] = &[
        ("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE OR REPLACE PROCEDURE pg_temp.p() LANGUAGE sql AS 'SELECT 1'", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE TYPE pg_temp.c AS (a int)", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE TYPE pg_temp.e AS ENUM ('a', 'b')", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE TYPE pg_temp.r AS RANGE (subtype = int4)", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE DOMAIN pg_temp.d AS int CHECK (VALUE > 0)", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE AGGREGATE pg_temp.agg(int) (sfunc = int4pl, stype = int)", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE OPERATOR pg_temp.### (leftarg = int, rightarg = int, function = int4pl)", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE TABLE pg_temp_3.t (a int)", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE VIEW PG_TEMP.v AS SELECT 1", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE SEQUENCE pg_temp.s", W, Tx::None, Some(P::TempTable), "ddl"),
        ("SELECT 1 AS a INTO pg_temp_5.x", W, Tx::None, Some(P::TempTable), "select_into"),
        ("CREATE TABLE app.pg_temp.t (a int)", W, Tx::None, Some(P::TempTable), "ddl"),
        // Elsewhere, or unqualified under the default search_path: ordinary DDL.
        ("CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", W, Tx::None, None, "ddl"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", W, Tx::None, None, "ddl"),
        ("CREATE TYPE c AS (a int)", W, Tx::None, None, "ddl"),
        ("CREATE DOMAIN public.d AS int", W, Tx::None, None, "ddl"),
        ("CREATE TABLE temp_stuff.t (a int)", W, Tx::None, None, "ddl"),
    ];
    check_rows(rows, &catalog());
}

#[test]
#[rustfmt::skip]
fn a_search_path_listing_pg_temp_pins_where_it_is_set() {
    let rows: &[Row] = &[
        ("SET search_path = pg_temp, public", R, Tx::None, Some(P::TempTable), "set"),
        ("SET search_path TO public, pg_temp", R, Tx::None, Some(P::TempTable), "set"),
        ("SET search_path = \"$user\", PG_TEMP", R, Tx::None, Some(P::TempTable), "set"),
        ("SET SESSION search_path = 'pg_temp_4'", R, Tx::None, Some(P::TempTable), "set"),
        ("SET LOCAL search_path = pg_temp, public", R, Tx::None, Some(P::TempTable), "set_local"),
        ("SELECT set_config('search_path', 'pg_temp,public', true)", W, Tx::None, Some(P::TempTable), "write_function"),
        ("SELECT pg_catalog.set_config('search_path', 'pg_temp'::text, true)", W, Tx::None, Some(P::TempTable), "write_function"),
        // A value the proxy cannot read could list it.
        ("SELECT set_config('search_path', $1, true)", W, Tx::None, Some(P::TempTable), "write_function"),
        ("SELECT set_config('search_path', 'public', true)", W, Tx::None, None, "write_function"),
        ("SET LOCAL search_path = public", R, Tx::None, None, "set_local"),
        ("SET search_path = pg_temp; SELECT 1", R, Tx::None, Some(P::TempTable), "set"),
    ];
    check_rows(rows, &catalog());
    // Pinned by its value, it is not replayed on other backends; other paths still are.
    let cat = catalog();
    assert_eq!(run("SET search_path = pg_temp, public", &cat).session, None);
    assert!(run("SET search_path = public", &cat).session.is_some());
}

#[test]
#[rustfmt::skip]
fn standard_conforming_strings_off_pins_however_spelled() {
    let rows: &[Row] = &[
        ("SET standard_conforming_strings = off", R, Tx::None, Some(P::NonStandardStrings), "set"),
        ("SET standard_conforming_strings TO false", R, Tx::None, Some(P::NonStandardStrings), "set"),
        ("SET standard_conforming_strings = 0", R, Tx::None, Some(P::NonStandardStrings), "set"),
        ("SET SESSION standard_conforming_strings = 'no'", R, Tx::None, Some(P::NonStandardStrings), "set"),
        ("set STANDARD_CONFORMING_STRINGS = OFF", R, Tx::None, Some(P::NonStandardStrings), "set"),
        ("SET LOCAL standard_conforming_strings = off", R, Tx::None, Some(P::NonStandardStrings), "set_local"),
        ("SELECT set_config('standard_conforming_strings', 'off', true)", W, Tx::None, Some(P::NonStandardStrings), "write_function"),
        ("SELECT 1; SET standard_conforming_strings = off", R, Tx::None, Some(P::NonStandardStrings), "select"),
        // On, or back to the default: an ordinary setting, replayed like any other.
        ("SET standard_conforming_strings = on", R, Tx::None, Some(P::SessionSet), "set"),
        ("SET standard_conforming_strings TO DEFAULT", R, Tx::None, Some(P::SessionSet), "set"),
        ("SET LOCAL standard_conforming_strings = 'true'", R, Tx::None, None, "set_local"),
        ("SELECT set_config('standard_conforming_strings', 'on', true)", W, Tx::None, None, "write_function"),
        // These change warnings and refusals, never where a statement ends.
        ("SET escape_string_warning = off", R, Tx::None, Some(P::SessionSet), "set"),
        ("SET LOCAL backslash_quote = on", R, Tx::None, None, "set_local"),
    ];
    check_rows(rows, &catalog());
}

#[test]
fn setting_values_read_as_postgresql_reads_them() {
    use values::{pin_for_setting, spells_true};
    for v in ["on", "ON", "true", "t", "tr", "Yes", "y", "1", " on "] {
        assert!(spells_true(v), "{v}");
    }
    for v in [
        "off", "of", "false", "f", "no", "n", "0", "", "o", "onn", "2",
    ] {
        assert!(!spells_true(v), "{v}");
    }
    // As startup parameters carry them (no SET parsing).
    assert_eq!(
        pin_for_setting("search_path", "pg_temp,public"),
        Some(P::TempTable)
    );
    assert_eq!(pin_for_setting("Search_Path", "\"$user\", public"), None);
    assert_eq!(
        pin_for_setting("standard_conforming_strings", "off"),
        Some(P::NonStandardStrings)
    );
    assert_eq!(pin_for_setting("standard_conforming_strings", "on"), None);
    assert_eq!(pin_for_setting("work_mem", "pg_temp"), None);
}

#[test]
fn classes_read_from_a_literal_are_never_shared_by_shape() {
    // Each pair has one shape; the second must not take the first one's class.
    let pairs = [
        (
            "SET transaction_read_only =   'on'",
            "SET transaction_read_only =   'off'",
        ),
        (
            "SET transaction_read_only = 1",
            "SET transaction_read_only = 0",
        ),
        (
            "SET transaction_isolation =   'read committed'",
            "SET transaction_isolation =   'serializable'",
        ),
        (
            "SET LOCAL standard_conforming_strings = 'on'",
            "SET LOCAL standard_conforming_strings = 'off'",
        ),
        (
            "SET LOCAL search_path = 'public'",
            "SET LOCAL search_path = 'pg_temp'",
        ),
        (
            "SELECT set_config('search_path', 'public', true)",
            "SELECT set_config('search_path', 'pg_temp', true)",
        ),
    ];
    let cat = catalog();
    for (first, second) in pairs {
        assert_eq!(literals::shape_of(first), literals::shape_of(second));
        for (a, b) in [(first, second), (second, first)] {
            let cl = Classifier::new(100, catalog());
            cl.classify(a);
            let got = cl.classify(b);
            let want = run(b, &cat);
            assert_eq!(
                (got.access, got.tx, got.pin),
                (want.access, want.tx, want.pin),
                "{b:?} after {a:?}"
            );
            assert!(want.by_value, "{b:?}");
        }
    }
}

#[test]
fn writability_questions_go_to_the_primary() {
    let cat = catalog();
    for sql in [
        "SHOW transaction_read_only",
        "show TRANSACTION_READ_ONLY",
        "SHOW default_transaction_read_only",
        "SHOW in_hot_standby",
    ] {
        let c = run(sql, &cat);
        assert_eq!(
            (c.access, c.hints.route, c.pin),
            (R, Some(RouteHint::Primary), None),
            "{sql}"
        );
    }
    for sql in [
        "SHOW search_path",
        "SHOW transaction isolation level",
        "SHOW ALL",
    ] {
        assert_eq!(run(sql, &cat).hints.route, None, "{sql}");
    }
    // The client's own hint stands.
    let c = run("/* causeway:replica */ SHOW transaction_read_only", &cat);
    assert_eq!(c.hints.route, Some(RouteHint::Replica));
}
