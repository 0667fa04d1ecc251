"""psycopg 3 through the Causeway proxy.

Usage: psycopg_suite.py CONNINFO PRIMARY_PORT

Expects table py_items (id int PRIMARY KEY, name text), empty, already replayed on every
replica. Prints `ok <case>` or `FAIL <case>: <error>` per case, then `N passed, M failed`;
exits 1 if any case failed.
"""

import os
import sys
import threading
import time
import traceback

import psycopg
from psycopg import errors

CONNINFO = sys.argv[1]
PRIMARY_PORT = int(sys.argv[2])
# A case that hangs (a lost reply, a cancel that never lands) is reported and the run goes
# on; the caller's own timeout is the backstop.
CASE_TIMEOUT_S = 10


def connect(**kwargs):
    return psycopg.connect(CONNINFO, connect_timeout=5, **kwargs)


def check(cond, message):
    if not cond:
        raise AssertionError(message)


def case_connect():
    with connect() as conn:
        check(conn.info.status == psycopg.pq.ConnStatus.OK, f"status {conn.info.status}")
        check(conn.info.server_version >= 100000, f"version {conn.info.server_version}")


def case_simple_query():
    with connect(autocommit=True) as conn:
        # No parameters: psycopg sends a simple-protocol Query, so this also covers a
        # multi-statement string; the cursor sees each statement's result set in turn.
        cur = conn.execute("SELECT 1; SELECT 'two'")
        check(cur.fetchone() == (1,), "first result")
        check(cur.nextset(), "a second result set")
        check(cur.fetchone() == ("two",), "second result")


def case_parameterized_query():
    with connect(autocommit=True) as conn:
        row = conn.execute("SELECT %s::int + %s::int, %s::text", (40, 2, "x")).fetchone()
        check(row == (42, "x"), f"got {row}")
        row = conn.execute("SELECT %(a)s::text || %(b)s::text", {"a": "p", "b": "q"}).fetchone()
        check(row == ("pq",), f"got {row}")


def case_prepared_reused():
    # Outside a transaction the executions spread over replicas, so the named statement
    # must exist on whichever backend each Bind lands on.
    with connect(autocommit=True) as conn:
        for i in range(10):
            row = conn.execute("SELECT %s::int * 2", (i,), prepare=True).fetchone()
            check(row == (i * 2,), f"prepare=True run {i}: {row}")
        # Default threshold: psycopg switches to a server-side statement on the 6th run.
        for i in range(10):
            row = conn.execute("SELECT %s::int * 3", (i,)).fetchone()
            check(row == (i * 3,), f"auto-prepared run {i}: {row}")
    with connect() as conn:
        for i in range(10):
            row = conn.execute(
                "SELECT %s::int + 1, inet_server_port()", (i,), prepare=True
            ).fetchone()
            check(row == (i + 1, PRIMARY_PORT), f"in a transaction, run {i}: {row}")


def count_on_primary(conn, lo, hi):
    # A default (non-autocommit) transaction is read-write, so it runs on the primary and
    # sees rows a replica may not have replayed yet.
    with conn.transaction():
        return conn.execute(
            "SELECT count(*) FROM py_items WHERE id BETWEEN %s AND %s", (lo, hi)
        ).fetchone()[0]


def case_transaction_commit_rollback():
    with connect() as conn:
        with conn.transaction():
            conn.execute("INSERT INTO py_items VALUES (1, 'kept'), (2, 'kept')")
        with conn.transaction() as tx:
            conn.execute("INSERT INTO py_items VALUES (3, 'dropped')")
            raise psycopg.Rollback(tx)
        try:
            with conn.transaction():
                conn.execute("INSERT INTO py_items VALUES (4, 'dropped too')")
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        n = count_on_primary(conn, 1, 4)
        check(n == 2, f"expected 2 committed rows, found {n}")


def case_error_in_transaction_then_recovery():
    with connect() as conn:
        try:
            with conn.transaction():
                conn.execute("INSERT INTO py_items VALUES (10, 'rolled back')")
                conn.execute("SELECT 1/0")
            raise AssertionError("division by zero did not raise")
        except errors.DivisionByZero:
            pass
        check(conn.execute("SELECT 7").fetchone() == (7,), "connection unusable after rollback")
        conn.commit()
        # Without a context manager: the aborted transaction refuses statements until
        # rolled back, then the same connection works again.
        conn.execute("INSERT INTO py_items VALUES (11, 'rolled back')")
        try:
            conn.execute("INSERT INTO py_items VALUES (11, 'duplicate')")
            raise AssertionError("duplicate key did not raise")
        except errors.UniqueViolation:
            pass
        try:
            conn.execute("SELECT 1")
            raise AssertionError("statement in an aborted transaction did not raise")
        except errors.InFailedSqlTransaction:
            pass
        conn.rollback()
        check(conn.execute("SELECT 8").fetchone() == (8,), "connection unusable after rollback")
        conn.rollback()
        n = count_on_primary(conn, 10, 11)
        check(n == 0, f"rolled-back rows are visible: {n}")


def case_copy_in_out():
    with connect() as conn:
        cur = conn.cursor()
        with cur.copy("COPY py_items (id, name) FROM STDIN") as copy:
            for i in range(100, 600):
                copy.write_row((i, f"copied {i}"))
        check(cur.rowcount == 500, f"COPY FROM reported {cur.rowcount} rows")
        conn.commit()
        rows = []
        with conn.transaction():
            with cur.copy(
                "COPY (SELECT id, name FROM py_items WHERE id BETWEEN 100 AND 599 ORDER BY id)"
                " TO STDOUT"
            ) as copy:
                copy.set_types(["int4", "text"])
                rows = list(copy.rows())
        check(len(rows) == 500, f"COPY TO returned {len(rows)} rows")
        check(rows[0] == (100, "copied 100") and rows[-1] == (599, "copied 599"), "row contents")
    # COPY TO outside a transaction is a read a replica can serve.
    with connect(autocommit=True) as conn:
        with conn.cursor().copy("COPY (SELECT g FROM generate_series(1, 1000) g) TO STDOUT") as copy:
            data = b"".join(bytes(block) for block in copy)
        lines = data.count(b"\n")
        check(lines == 1000, f"COPY TO of a series: {lines} lines")


def case_listen_notify():
    with connect(autocommit=True) as listener, connect(autocommit=True) as sender:
        listener.execute("LISTEN causeway_ch")
        sender.execute("NOTIFY causeway_ch, 'hello'")
        got = list(listener.notifies(timeout=5, stop_after=1))
        check(len(got) == 1, "no notification within 5 s")
        check(got[0].channel == "causeway_ch" and got[0].payload == "hello", f"got {got[0]}")
        sender.execute("SELECT pg_notify('causeway_ch', 'second')")
        got = list(listener.notifies(timeout=5, stop_after=1))
        check([n.payload for n in got] == ["second"], f"got {got}")


def case_cancel():
    with connect(autocommit=True) as conn:
        started = threading.Event()
        finished = threading.Event()

        def canceller():
            started.wait()
            # A cancel that arrives before the query reaches a backend cancels nothing, and
            # there is no signal for "running"; so keep cancelling until the query ends.
            while not finished.wait(0.2):
                conn.cancel()

        t = threading.Thread(target=canceller, daemon=True)
        t.start()
        t0 = time.monotonic()
        try:
            started.set()
            conn.execute("SELECT pg_sleep(10)")
            raise AssertionError("pg_sleep(10) completed without being cancelled")
        except errors.QueryCanceled:
            pass
        finally:
            finished.set()
            t.join()
        elapsed = time.monotonic() - t0
        check(elapsed < 5, f"cancel took {elapsed:.1f} s")
        check(conn.execute("SELECT 9").fetchone() == (9,), "connection unusable after cancel")


def case_pipeline():
    # Autocommit: up to the pipeline's Sync every statement belongs to one implicit
    # transaction, so the SELECT must see the INSERTs just before it.
    with connect(autocommit=True) as conn:
        with conn.pipeline():
            for i in range(700, 705):
                conn.execute("INSERT INTO py_items VALUES (%s, 'piped')", (i,))
            counted = conn.execute("SELECT count(*) FROM py_items WHERE id BETWEEN 700 AND 704")
            echoed = conn.execute("SELECT %s::int, inet_server_port()", (5,))
        n = counted.fetchone()[0]
        check(n == 5, f"pipelined SELECT saw {n} of 5 pipelined INSERTs")
        check(echoed.fetchone()[0] == 5, "pipelined parameterized SELECT")
    # In a transaction, with an explicit sync in the middle.
    with connect() as conn:
        with conn.pipeline() as p:
            conn.execute("INSERT INTO py_items VALUES (710, 'piped tx')")
            p.sync()
            conn.execute("INSERT INTO py_items VALUES (711, 'piped tx')")
            cur = conn.execute("SELECT count(*), max(inet_server_port()) FROM py_items WHERE id IN (710, 711)")
        row = cur.fetchone()
        check(row == (2, PRIMARY_PORT), f"pipelined transaction: {row}")
        conn.commit()
    # Reads only, outside a transaction: a replica may serve the whole batch.
    with connect(autocommit=True) as conn:
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 10", (i,)) for i in range(5)]
        got = [c.fetchone()[0] for c in curs]
        check(got == [0, 10, 20, 30, 40], f"pipelined reads: {got}")


def case_read_on_replica():
    # autocommit=True: by default psycopg opens a transaction before the first statement,
    # and that transaction is read-write, so the proxy keeps it on the primary. Only a
    # statement outside any transaction can be sent to a replica.
    with connect(autocommit=True) as conn:
        for sql, params in (("SELECT inet_server_port()", None),
                            ("SELECT inet_server_port() + %s", (0,))):
            port = conn.execute(sql, params).fetchone()[0]
            check(port != PRIMARY_PORT, f"{sql!r} ran on the primary ({port})")
    with connect() as conn:
        port = conn.execute("SELECT inet_server_port()").fetchone()[0]
        check(port == PRIMARY_PORT, f"a default transaction ran on {port}, not the primary")
        # An explicitly read-only transaction may go to a replica, so only check it works.
        conn.rollback()
        conn.read_only = True
        check(conn.execute("SELECT 1").fetchone() == (1,), "read-only transaction")


CASES = [
    ("connect", case_connect),
    ("simple query", case_simple_query),
    ("parameterized query", case_parameterized_query),
    ("prepared statement reused", case_prepared_reused),
    ("transaction commit and rollback", case_transaction_commit_rollback),
    ("error in transaction then recovery", case_error_in_transaction_then_recovery),
    ("copy in and out", case_copy_in_out),
    ("listen/notify", case_listen_notify),
    ("cancel", case_cancel),
    ("pipeline", case_pipeline),
    ("read on a replica", case_read_on_replica),
]


def run(fn):
    """Runs fn in a daemon thread; returns None on success, else an error message."""
    result = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - every failure is reported, not raised
            frames = [f for f in traceback.extract_tb(e.__traceback__) if f.name != "check"]
            where = f" (line {frames[-1].lineno})" if frames else ""
            result["error"] = f"{type(e).__name__}: {e}".strip() + where

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(CASE_TIMEOUT_S)
    if t.is_alive():
        return f"timed out after {CASE_TIMEOUT_S} s"
    return result.get("error")


def main():
    passed = failed = 0
    for name, fn in CASES:
        error = run(fn)
        if error is None:
            passed += 1
            print(f"ok {name}", flush=True)
        else:
            failed += 1
            print(f"FAIL {name}: {' '.join(error.split())}", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    # os._exit: a timed-out case leaves a thread blocked on a socket.
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    main()
