"""psycopg 3 through the Causeway proxy (transaction pooling).

Usage: psycopg_driver.py CONNINFO PRIMARY_PORT

Expects table drv_items (id int PRIMARY KEY, name text), empty and replayed on every replica.
Prints `ok psycopg <case>` or `FAIL psycopg <case>: <error>` per case; exits 1 if any failed.
"""

import os
import sys
import threading
import time
import traceback

import psycopg
from psycopg import errors

DRIVER = "psycopg"
CONNINFO = sys.argv[1]
PRIMARY_PORT = int(sys.argv[2])
# A hung case (a lost reply, a cancel that never lands) is reported and the run goes on.
CASE_TIMEOUT_S = 8


def connect(**kwargs):
    return psycopg.connect(CONNINFO, connect_timeout=5, **kwargs)


def check(cond, message):
    if not cond:
        raise AssertionError(message)


def count_on_primary(conn, lo, hi):
    # A read-write transaction runs on the primary, so it sees rows a replica may not have
    # replayed yet.
    with conn.transaction():
        return conn.execute(
            "SELECT count(*) FROM drv_items WHERE id BETWEEN %s AND %s", (lo, hi)
        ).fetchone()[0]


def case_connect():
    # require_auth (libpq >= 16): libpq refuses any method other than SCRAM-SHA-256.
    extra = {"require_auth": "scram-sha-256"} if psycopg.pq.version() >= 160000 else {}
    with connect(**extra) as conn:
        check(conn.info.status == psycopg.pq.ConnStatus.OK, f"status {conn.info.status}")
        check(conn.info.server_version >= 150000, f"server_version {conn.info.server_version}")
    # libpq >= 18 can ask for protocol 3.2; the proxy, as a PostgreSQL 15 server does, offers
    # 3.0 with NegotiateProtocolVersion, and libpq goes on with that.
    if psycopg.pq.version() >= 180000:
        for version in ("3.2", "latest"):
            with connect(max_protocol_version=version) as conn:
                got = conn.info.pgconn.protocol_version
                check(got == 3, f"max_protocol_version={version}: protocol {got}")
                check(conn.execute("SELECT 1").fetchone() == (1,), "query after negotiation")
    bad = CONNINFO.replace("password=app-secret", "password=wrong")
    check(bad != CONNINFO, "conninfo has no password=app-secret to corrupt")
    try:
        psycopg.connect(bad, connect_timeout=5).close()
        raise AssertionError("a wrong password was accepted")
    except psycopg.OperationalError as e:
        check("password authentication failed" in str(e), f"wrong password: {e}")


def case_simple_query():
    with connect(autocommit=True) as conn:
        # No parameters: a simple-protocol Query, so several statements in one string work.
        cur = conn.execute("SELECT 1; SELECT 'two'")
        check(cur.fetchone() == (1,), "first result")
        check(cur.nextset(), "no second result set")
        check(cur.fetchone() == ("two",), "second result")


def case_parameterized_query():
    with connect(autocommit=True) as conn:
        row = conn.execute("SELECT %s::int + %s::int, %s::text", (40, 2, "x")).fetchone()
        check(row == (42, "x"), f"got {row}")
        row = conn.execute("SELECT %(a)s::text || %(b)s::text", {"a": "p", "b": "q"}).fetchone()
        check(row == ("pq",), f"got {row}")


def case_prepared_reuse():
    # prepare_threshold=5: from the 6th execution psycopg Binds a server-side named statement
    # instead of sending Parse each time. Autocommit, so runs may land on different replicas.
    with connect(autocommit=True, prepare_threshold=5) as conn:
        for i in range(10):
            row = conn.execute("SELECT %s::int * 2", (i,)).fetchone()
            check(row == (i * 2,), f"run {i}: {row}")
        # The same inside one transaction (one backend, the primary).
        with conn.transaction():
            for i in range(10):
                row = conn.execute("SELECT %s::int * 3, inet_server_port()", (i,)).fetchone()
                check(row == (i * 3, PRIMARY_PORT), f"in a transaction, run {i}: {row}")


def case_transaction():
    with connect() as conn:
        with conn.transaction():
            conn.execute("INSERT INTO drv_items VALUES (%s, 'kept')", (1,))
        check(count_on_primary(conn, 1, 1) == 1, "committed row not visible")
        with conn.transaction() as tx:
            conn.execute("INSERT INTO drv_items VALUES (%s, 'dropped')", (2,))
            raise psycopg.Rollback(tx)
        check(count_on_primary(conn, 2, 2) == 0, "rolled-back row visible")


def case_error_recovery():
    with connect() as conn:
        conn.execute("INSERT INTO drv_items VALUES (10, 'rolled back')")
        try:
            conn.execute("SELECT 1/0")
            raise AssertionError("division by zero did not raise")
        except errors.DivisionByZero:
            pass
        try:
            conn.execute("SELECT 1")
            raise AssertionError("a statement in an aborted transaction did not raise")
        except errors.InFailedSqlTransaction:
            pass
        conn.rollback()
        check(conn.execute("SELECT 7").fetchone() == (7,), "connection unusable after ROLLBACK")
        conn.rollback()
        check(count_on_primary(conn, 10, 10) == 0, "rolled-back row visible")


def case_copy():
    with connect() as conn:
        cur = conn.cursor()
        with cur.copy("COPY drv_items (id, name) FROM STDIN") as copy:
            for i in range(100, 600):
                copy.write_row((i, f"copied {i}"))
        check(cur.rowcount == 500, f"COPY FROM reported {cur.rowcount} rows")
        conn.commit()
        with conn.transaction():
            with cur.copy(
                "COPY (SELECT id, name FROM drv_items WHERE id BETWEEN 100 AND 599 ORDER BY id)"
                " TO STDOUT"
            ) as copy:
                copy.set_types(["int4", "text"])
                rows = list(copy.rows())
        check(len(rows) == 500, f"COPY TO returned {len(rows)} rows")
        check(rows[0] == (100, "copied 100") and rows[-1] == (599, "copied 599"), "row contents")
    # COPY TO outside a transaction is a read: a replica may serve it.
    with connect(autocommit=True) as conn:
        with conn.cursor().copy("COPY (SELECT g FROM generate_series(1, 1000) g) TO STDOUT") as c:
            data = b"".join(bytes(block) for block in c)
        lines = data.count(b"\n")
        check(lines == 1000, f"COPY TO of a series: {lines} lines")


def case_listen_notify():
    with connect(autocommit=True) as listener, connect(autocommit=True) as sender:
        listener.execute("LISTEN drv_channel")
        sender.execute("NOTIFY drv_channel, 'hello'")
        got = list(listener.notifies(timeout=5, stop_after=1))
        check(len(got) == 1, "no notification within 5 s")
        check((got[0].channel, got[0].payload) == ("drv_channel", "hello"), f"got {got[0]}")


def case_cancel():
    with connect(autocommit=True) as conn:
        finished = threading.Event()

        def canceller():
            # A cancel that arrives before the query reaches a backend cancels nothing, and
            # nothing says "running", so keep cancelling until the query ends.
            while not finished.wait(0.3):
                conn.cancel()

        t = threading.Thread(target=canceller, daemon=True)
        t0 = time.monotonic()
        t.start()
        try:
            conn.execute("SELECT pg_sleep(10)")
            raise AssertionError("pg_sleep(10) completed without being cancelled")
        except errors.QueryCanceled as e:
            check(e.sqlstate == "57014", f"sqlstate {e.sqlstate}")
        finally:
            finished.set()
            t.join()
        elapsed = time.monotonic() - t0
        check(elapsed < 5, f"cancel took {elapsed:.1f} s")
        check(conn.execute("SELECT 9").fetchone() == (9,), "connection unusable after cancel")


def case_pipeline():
    # Autocommit: up to the pipeline's Sync the statements form one implicit transaction,
    # so the SELECT sees the INSERTs before it.
    with connect(autocommit=True) as conn:
        with conn.pipeline():
            for i in range(700, 705):
                conn.execute("INSERT INTO drv_items VALUES (%s, 'piped')", (i,))
            counted = conn.execute("SELECT count(*) FROM drv_items WHERE id BETWEEN 700 AND 704")
            echoed = conn.execute("SELECT %s::int", (5,))
        n = counted.fetchone()[0]
        check(n == 5, f"pipelined SELECT saw {n} of 5 pipelined INSERTs")
        check(echoed.fetchone() == (5,), "pipelined parameterized SELECT")
    # Reads only: a replica may serve the batch.
    with connect(autocommit=True) as conn:
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 10", (i,)) for i in range(5)]
        got = [c.fetchone()[0] for c in curs]
        check(got == [0, 10, 20, 30, 40], f"pipelined reads: {got}")


def case_replica_read():
    # autocommit=True matters: by default psycopg sends BEGIN before the first statement, and
    # such a transaction may write at any point, so the proxy must run all of it on the
    # primary. Only a statement outside any transaction can go to a replica.
    with connect(autocommit=True) as conn:
        port = conn.execute("SELECT inet_server_port()").fetchone()[0]
        check(port != PRIMARY_PORT, f"autocommit read ran on the primary ({port})")
    with connect() as conn:
        port = conn.execute("SELECT inet_server_port()").fetchone()[0]
        check(port == PRIMARY_PORT, f"a read-write transaction ran on {port}, not the primary")


CASES = [
    ("connect", case_connect),
    ("simple_query", case_simple_query),
    ("parameterized_query", case_parameterized_query),
    ("prepared_reuse", case_prepared_reuse),
    ("transaction", case_transaction),
    ("error_recovery", case_error_recovery),
    ("copy", case_copy),
    ("listen_notify", case_listen_notify),
    ("cancel", case_cancel),
    ("pipeline", case_pipeline),
    ("replica_read", case_replica_read),
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
            state = getattr(e, "sqlstate", None)
            code = f" [SQLSTATE {state}]" if state else ""
            result["error"] = f"{type(e).__name__}{code}: {e}".strip() + where

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(CASE_TIMEOUT_S)
    if t.is_alive():
        return f"timed out after {CASE_TIMEOUT_S} s"
    return result.get("error")


def main():
    failed = 0
    for name, fn in CASES:
        error = run(fn)
        if error is None:
            print(f"ok {DRIVER} {name}", flush=True)
        else:
            failed += 1
            print(f"FAIL {DRIVER} {name}: {' '.join(error.split())}", flush=True)
    # os._exit: a timed-out case leaves a thread blocked on a socket.
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    main()
