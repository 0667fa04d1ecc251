//! Transaction control and session pins: BEGIN and its modes, SET TRANSACTION, savepoints,
//! two-phase commit, the statements that pin a session, and where a string leaves its
//! transaction.

use super::*;

/// The effect of a `SET TRANSACTION`-like statement naming these modes.
fn modes(read_only: Option<bool>, serializable: Option<bool>, checked: bool) -> TxEffect {
    Tx::SetModes(TxModes {
        read_only,
        serializable,
        checked,
    })
}

#[test]
#[rustfmt::skip]
fn transactions_and_pins() {
    let rows: &[Row] = &[
        ("BEGIN", R, Tx::Begin { read_only: false, serializable: false }, None, "begin"),
        ("begin work", R, Tx::Begin { read_only: false, serializable: false }, None, "begin"),
        ("BEGIN READ ONLY", R, Tx::Begin { read_only: true, serializable: false }, None, "begin"),
        ("BEGIN TRANSACTION READ WRITE", R, Tx::Begin { read_only: false, serializable: false }, None, "begin"),
        ("START TRANSACTION READ ONLY", R, Tx::Begin { read_only: true, serializable: false }, None, "begin"),
        // A hot standby refuses SERIALIZABLE: read-only or not, the primary runs it.
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE", R, Tx::Begin { read_only: false, serializable: true }, None, "begin"),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", R, Tx::Begin { read_only: false, serializable: true }, None, "begin"),
        ("begin read only isolation level serializable", R, Tx::Begin { read_only: false, serializable: true }, None, "begin"),
        ("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", R, Tx::Begin { read_only: true, serializable: false }, None, "begin"),
        ("BEGIN ISOLATION LEVEL REPEATABLE READ", R, Tx::Begin { read_only: false, serializable: false }, None, "begin"),
        ("COMMIT", R, Tx::Commit, None, "commit"),
        ("END", R, Tx::Commit, None, "commit"),
        ("COMMIT AND CHAIN", R, Tx::Commit, None, "commit"),
        ("ROLLBACK", R, Tx::Rollback, None, "rollback"),
        ("ABORT", R, Tx::Rollback, None, "rollback"),
        ("ROLLBACK TO SAVEPOINT a", R, Tx::None, None, "savepoint"),
        ("ROLLBACK TO a", R, Tx::None, None, "savepoint"),
        ("SAVEPOINT a", R, Tx::None, None, "savepoint"),
        ("RELEASE SAVEPOINT a", R, Tx::None, None, "savepoint"),
        ("RELEASE a", R, Tx::None, None, "savepoint"),
        ("PREPARE TRANSACTION 'x'", W, Tx::Commit, None, "prepared_xact"),
        ("COMMIT PREPARED 'x'", W, Tx::None, None, "prepared_xact"),
        ("ROLLBACK PREPARED 'x'", W, Tx::None, None, "prepared_xact"),
        ("SET TRANSACTION READ ONLY", R, modes(Some(true), None, true), None, "set_transaction"),
        ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", R, modes(Some(true), Some(false), true), None, "set_transaction"),
        ("SET TRANSACTION READ WRITE", R, modes(Some(false), None, true), None, "set_transaction"),
        ("SET transaction_read_only = on", R, modes(Some(true), None, false), None, "set_transaction"),
        ("SET transaction_read_only TO off", R, modes(Some(false), None, false), None, "set_transaction"),
        ("SET transaction_read_only TO DEFAULT", R, modes(None, None, false), None, "set_transaction"),
        ("SET transaction_isolation = 'repeatable read'", R, modes(None, Some(false), false), None, "set_transaction"),
        ("SET transaction_deferrable = on", R, modes(None, None, false), None, "set_transaction"),
        ("RESET transaction_isolation", R, modes(None, None, false), None, "set_transaction"),
        // A standby refuses serializable isolation, even where the primary only warns.
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", W, modes(None, Some(true), true), None, "serializable"),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", W, modes(Some(true), Some(true), true), None, "serializable"),
        ("SET TRANSACTION READ ONLY, ISOLATION LEVEL SERIALIZABLE, DEFERRABLE", W, modes(Some(true), Some(true), true), None, "serializable"),
        ("SET transaction_isolation = 'SERIALIZABLE'", W, modes(None, Some(true), false), None, "serializable"),
        ("set Transaction_Isolation to serializable", W, modes(None, Some(true), false), None, "serializable"),
        ("SET default_transaction_isolation = 'serializable'", R, Tx::None, Some(P::SessionSet), "set"),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", R, Tx::None, Some(P::SessionCharacteristics), "set_session_characteristics"),
        ("SET search_path = public", R, Tx::None, Some(P::SessionSet), "set"),
        ("SET SESSION search_path TO x, y", R, Tx::None, Some(P::SessionSet), "set"),
        ("set application_name = 'app'", R, Tx::None, Some(P::SessionSet), "set"),
        ("SET TIME ZONE 'UTC'", R, Tx::None, Some(P::SessionSet), "set"),
        ("SET statement_timeout TO DEFAULT", R, Tx::None, Some(P::SessionSet), "set"),
        ("SET ROLE bob", R, Tx::None, Some(P::SessionSet), "set"),
        ("RESET search_path", R, Tx::None, Some(P::SessionSet), "set"),
        ("RESET ALL", R, Tx::None, Some(P::SessionSet), "set"),
        ("SET LOCAL search_path = x", R, Tx::None, None, "set_local"),
        ("SET LOCAL statement_timeout = 5000", R, Tx::None, None, "set_local"),
        ("DISCARD ALL", R, Tx::None, Some(P::SessionSet), "discard"),
        ("DISCARD TEMP", R, Tx::None, Some(P::SessionSet), "discard"),
        ("DISCARD PLANS", R, Tx::None, Some(P::SessionSet), "discard"),
        ("CREATE TEMP TABLE tt (id int)", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE TEMPORARY TABLE tt (id int) ON COMMIT DROP", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE TEMP VIEW v AS SELECT 1", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE TEMP SEQUENCE s", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE TEMP TABLE tt AS SELECT 1", W, Tx::None, Some(P::TempTable), "ddl"),
        ("CREATE TABLE pt (id int)", W, Tx::None, None, "ddl"),
        ("CREATE TABLE pg_temp.tt (id int)", W, Tx::None, Some(P::TempTable), "ddl"),
        ("SELECT 1 AS a INTO pg_temp.tt", W, Tx::None, Some(P::TempTable), "select_into"),
        ("LISTEN ch", W, Tx::None, Some(P::Listen), "listen"),
        ("PREPARE p AS SELECT 1", W, Tx::None, Some(P::SqlPrepare), "prepare"),
        ("PREPARE p (int) AS INSERT INTO t VALUES ($1)", W, Tx::None, Some(P::SqlPrepare), "prepare"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t", W, Tx::None, Some(P::HoldCursor), "declare_hold"),
        ("LOAD 'auto_explain'", W, Tx::None, Some(P::Load), "load"),
        // multi-statement strings
        ("BEGIN; SELECT 1; COMMIT", W, Tx::Begin { read_only: false, serializable: false }, None, "begin_read_write"),
        ("SELECT 1; BEGIN", W, Tx::Begin { read_only: false, serializable: false }, None, "begin_read_write"),
        ("BEGIN READ ONLY; SELECT 1; COMMIT", R, Tx::Begin { read_only: true, serializable: false }, None, "begin"),
        ("SELECT 1; COMMIT", R, Tx::Commit, None, "select"),
        ("SET x.y = 1; SELECT 1", R, Tx::None, Some(P::SessionSet), "set"),
        ("SELECT 1; CLOSE ALL; RESET ALL", R, Tx::None, Some(P::SessionSet), "select"),
        ("SELECT 1; SET causeway.route = 'primary'", R, Tx::None, None, "select"),
        ("BEGIN; INSERT INTO t VALUES (1); COMMIT", W, Tx::Begin { read_only: false, serializable: false }, None, "insert"),
        ("SET LOCAL a.b = 1; SELECT pg_advisory_lock(1); LISTEN x", W, Tx::None, Some(P::AdvisoryLock), "advisory_lock"),
    ];
    check_rows(rows, &catalog());
}

#[test]
fn the_last_transaction_boundary_and_copy_are_kept_across_statements() {
    let cat = catalog();
    let cases = [
        ("INSERT INTO t VALUES (1)", TxEffect::None, false),
        (
            "BEGIN",
            TxEffect::Begin {
                read_only: false,
                serializable: false,
            },
            false,
        ),
        (
            "BEGIN; INSERT INTO t VALUES (1)",
            TxEffect::Begin {
                read_only: false,
                serializable: false,
            },
            false,
        ),
        ("INSERT INTO t VALUES (1); COMMIT", TxEffect::Commit, false),
        (
            "BEGIN; INSERT INTO t VALUES (1); COMMIT",
            TxEffect::Commit,
            false,
        ),
        (
            "COMMIT; BEGIN READ ONLY",
            TxEffect::Begin {
                read_only: true,
                serializable: false,
            },
            false,
        ),
        (
            "BEGIN; SET TRANSACTION READ ONLY",
            TxEffect::Begin {
                read_only: false,
                serializable: false,
            },
            false,
        ),
        ("ROLLBACK; SELECT 1", TxEffect::Rollback, false),
        ("DELETE FROM t; COPY t FROM STDIN", TxEffect::None, true),
        ("COPY t FROM STDIN", TxEffect::None, true),
        ("COPY t TO STDOUT", TxEffect::None, false),
    ];
    for (sql, last_tx, copy_from) in cases {
        let c = run(sql, &cat);
        assert_eq!((c.last_tx, c.copy_from), (last_tx, copy_from), "{sql}");
    }
}

/// A lock among a statement's writes names the reason, wherever it comes: a replica would take
/// it for itself, so a read-only transaction running there refuses it.
#[test]
#[rustfmt::skip]
fn a_lock_names_the_reason_wherever_it_comes() {
    let rows: &[Row] = &[
        ("SELECT my_volatile_fn(), pg_advisory_xact_lock(1)", W, Tx::None, None, "advisory_lock"),
        ("SELECT my_volatile_fn(); LOCK t IN ACCESS SHARE MODE", W, Tx::None, None, "lock"),
        ("SELECT nextval('s'), pg_try_advisory_xact_lock(2), my_volatile_fn()", W, Tx::None, None, "advisory_lock"),
        ("SELECT pg_advisory_xact_lock(1), my_volatile_fn()", W, Tx::None, None, "advisory_lock"),
        ("SELECT my_volatile_fn(), nextval('s')", W, Tx::None, None, "volatile_function"),
    ];
    check_rows(rows, &catalog());
}
