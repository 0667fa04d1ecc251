"""asyncpg through the Causeway proxy (transaction pooling).

Usage: asyncpg_driver.py URL PRIMARY_PORT

Expects table drv_items (id int PRIMARY KEY, name text), empty and replayed on every replica.
Prints `ok asyncpg <case>` or `FAIL asyncpg <case>: <error>` per case; exits 1 if any failed.

asyncpg prepares every statement it runs with arguments as a server-side named statement
(`__asyncpg_stmt_N__`) and caches it per connection, so almost every case here also checks that
the proxy carries named statements across the backends a transaction-pooled client lands on.
"""

import asyncio
import contextlib
import io
import os
import sys
import time
import traceback

import asyncpg
from asyncpg import exceptions as pgerr

DRIVER = "asyncpg"
URL = sys.argv[1]
PRIMARY_PORT = int(sys.argv[2])
CASE_TIMEOUT_S = 8


@contextlib.asynccontextmanager
async def connect(url=URL):
    conn = await asyncpg.connect(url, timeout=5)
    try:
        yield conn
    finally:
        try:
            await conn.close(timeout=2)
        except Exception:  # noqa: BLE001 - a broken connection is just dropped
            conn.terminate()


def check(cond, message):
    if not cond:
        raise AssertionError(message)


async def count_on_primary(conn, lo, hi):
    # A read-write transaction runs on the primary, so it sees rows a replica may not have
    # replayed yet.
    async with conn.transaction():
        return await conn.fetchval("SELECT count(*) FROM drv_items WHERE id BETWEEN $1 AND $2", lo, hi)


async def case_connect():
    async with connect() as conn:
        check(conn.get_server_version().major >= 15, f"version {conn.get_server_version()}")
        check(await conn.fetchval("SELECT current_user") == "app", "current_user")
    bad = URL.replace(":app-secret@", ":wrong@")
    check(bad != URL, "URL has no :app-secret@ to corrupt")
    try:
        async with connect(bad):
            pass
        raise AssertionError("a wrong password was accepted")
    except pgerr.InvalidPasswordError as e:
        check(e.sqlstate == "28P01", f"wrong password: SQLSTATE {e.sqlstate}")


async def case_simple_query():
    async with connect() as conn:
        # execute() without arguments sends a simple-protocol Query: several statements work.
        status = await conn.execute("SELECT 1; SELECT 2, 3")
        check(status == "SELECT 1", f"status {status!r}")
        check(await conn.fetchval("SELECT 'two'") == "two", "fetchval without arguments")


async def case_parameterized_query():
    async with connect() as conn:
        row = await conn.fetchrow("SELECT $1::int + $2::int AS s, $3::text AS t", 40, 2, "x")
        check((row["s"], row["t"]) == (42, "x"), f"got {row}")


async def case_prepared_reuse():
    async with connect() as conn:
        # Outside a transaction each execution may land on a different replica, where the
        # proxy must make the named statement exist.
        stmt = await conn.prepare("SELECT $1::int * 2")
        for i in range(10):
            v = await stmt.fetchval(i)
            check(v == i * 2, f"prepared run {i}: {v}")
        # The statement cache: the same text reuses one named statement.
        for i in range(10):
            v = await conn.fetchval("SELECT $1::int * 3", i)
            check(v == i * 3, f"cached run {i}: {v}")
        async with conn.transaction():
            stmt = await conn.prepare("SELECT $1::int + 1, inet_server_port()")
            for i in range(10):
                row = await stmt.fetchrow(i)
                check(tuple(row) == (i + 1, PRIMARY_PORT), f"in a transaction, run {i}: {row}")


async def case_transaction():
    async with connect() as conn:
        async with conn.transaction():
            await conn.execute("INSERT INTO drv_items VALUES ($1, 'kept')", 1)
        check(await count_on_primary(conn, 1, 1) == 1, "committed row not visible")
        tr = conn.transaction()
        await tr.start()
        await conn.execute("INSERT INTO drv_items VALUES ($1, 'dropped')", 2)
        await tr.rollback()
        check(await count_on_primary(conn, 2, 2) == 0, "rolled-back row visible")


async def case_error_recovery():
    async with connect() as conn:
        tr = conn.transaction()
        await tr.start()
        await conn.execute("INSERT INTO drv_items VALUES ($1, 'rolled back')", 10)
        try:
            await conn.fetchval("SELECT 1/0")
            raise AssertionError("division by zero did not raise")
        except pgerr.DivisionByZeroError:
            pass
        try:
            await conn.fetchval("SELECT 1")
            raise AssertionError("a statement in an aborted transaction did not raise")
        except pgerr.InFailedSQLTransactionError:
            pass
        await tr.rollback()
        check(await conn.fetchval("SELECT 7") == 7, "connection unusable after ROLLBACK")
        check(await count_on_primary(conn, 10, 10) == 0, "rolled-back row visible")


async def case_copy():
    problems = []
    async with connect() as conn:
        # copy_records_to_table first prepares `SELECT cols FROM table LIMIT 1` to learn the
        # column types (Parse/Describe/Flush: no Sync), then sends the COPY as a simple Query on
        # the same server connection. Both ways a user would call it: inside a transaction and
        # outside one (where the introspection SELECT alone looks like a read).
        async with conn.transaction():
            status = await conn.copy_records_to_table(
                "drv_items", records=[(i, f"copied {i}") for i in range(100, 350)], columns=["id", "name"]
            )
        check(status == "COPY 250", f"copy_records_to_table in a transaction: {status!r}")
        try:
            status = await conn.copy_records_to_table(
                "drv_items", records=[(i, f"copied {i}") for i in range(350, 600)], columns=["id", "name"]
            )
            if status != "COPY 250":
                problems.append(f"copy_records_to_table outside a transaction: {status!r}")
        except pgerr.PostgresError as e:
            problems.append(
                f"copy_records_to_table outside a transaction: {type(e).__name__} [SQLSTATE {e.sqlstate}]: {e}"
            )
        buf = io.BytesIO()
        # In a read-write transaction, so the primary answers: a replica may lag.
        async with conn.transaction():
            status = await conn.copy_from_query(
                "SELECT id, name FROM drv_items WHERE id BETWEEN 100 AND 349 ORDER BY id",
                output=buf,
                format="csv",
            )
        lines = buf.getvalue().decode().splitlines()
        check(status == "COPY 250", f"copy_from_query: {status!r}")
        check(len(lines) == 250, f"COPY TO returned {len(lines)} lines")
        check(lines[0] == "100,copied 100" and lines[-1] == "349,copied 349", "row contents")
        # Outside a transaction COPY TO is a read a replica may serve.
        buf = io.BytesIO()
        await conn.copy_from_query("SELECT generate_series(1, 1000)", output=buf)
        n = buf.getvalue().count(b"\n")
        check(n == 1000, f"copy_from_query of a series: {n} lines")
    check(not problems, "; ".join(problems))


async def case_listen_notify():
    async with connect() as listener, connect() as sender:
        got = asyncio.get_running_loop().create_future()

        def on_notify(_conn, _pid, channel, payload):
            if not got.done():
                got.set_result((channel, payload))

        await listener.add_listener("drv_channel", on_notify)
        await sender.execute("NOTIFY drv_channel, 'hello'")
        try:
            channel_payload = await asyncio.wait_for(got, 5)
        except asyncio.TimeoutError:
            raise AssertionError("no notification within 5 s") from None
        check(channel_payload == ("drv_channel", "hello"), f"got {channel_payload}")


async def case_cancel():
    async with connect() as conn:
        task = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(10)"))
        await asyncio.sleep(0.5)  # let the query reach a backend
        check(not task.done(), f"pg_sleep(10) ended early: {task}")
        t0 = time.monotonic()
        # Cancelling the task makes asyncpg send a CancelRequest (with the BackendKeyData the
        # proxy gave it) on a new connection to the proxy. asyncpg then consumes the server's
        # 57014 reply itself, and holds the next query until that reply has arrived: so the
        # SELECT below returns within seconds only if the backend's pg_sleep was cancelled.
        task.cancel()
        try:
            await task
            raise AssertionError("pg_sleep(10) completed without being cancelled")
        except asyncio.CancelledError:
            pass
        try:
            v = await asyncio.wait_for(conn.fetchval("SELECT 9"), 5)
        except asyncio.TimeoutError:
            raise AssertionError("the CancelRequest did not stop pg_sleep within 5 s") from None
        elapsed = time.monotonic() - t0
        check(v == 9, f"after cancel: {v}")
        check(elapsed < 5, f"cancel took {elapsed:.1f} s")


async def case_replica_read():
    async with connect() as conn:
        # asyncpg runs statements outside a transaction unless conn.transaction() is used,
        # so this read may go to a replica.
        port = await conn.fetchval("SELECT inet_server_port()")
        check(port != PRIMARY_PORT, f"autocommit read ran on the primary ({port})")
        # A transaction that is not declared read-only may write at any point, so the
        # proxy runs all of it on the primary.
        async with conn.transaction():
            port = await conn.fetchval("SELECT inet_server_port()")
        check(port == PRIMARY_PORT, f"a read-write transaction ran on {port}")
    # A Pool resets each connection it takes back with one string (`SELECT
    # pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`): that keeps neither the
    # connection off the replicas nor the pool's server_settings from the next acquire.
    settings = {"application_name": "drv_pool", "search_path": "pg_catalog,public"}
    pool = await asyncpg.create_pool(URL, min_size=1, max_size=1, timeout=5, server_settings=settings)
    try:
        for i in range(4):
            async with pool.acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT inet_server_port(), current_setting('application_name'), current_setting('search_path')"
                )
            check(row[0] != PRIMARY_PORT, f"read after release {i} ran on the primary")
            check(tuple(row[1:]) == tuple(settings.values()), f"settings after release {i}: {tuple(row[1:])}")
    finally:
        await pool.close()


async def case_schema_change():
    # A migration adds a column under a cached statement. PostgreSQL answers the next execution
    # with 0A000 from RevalidateCachedQuery, which asyncpg takes as its cue to re-prepare and
    # retry; the proxy, re-preparing on another server, must raise the same error to get that.
    async with connect() as conn:
        for i in range(3):
            t = f"drv_shape_{i}"
            await conn.execute(
                f"DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (a int); INSERT INTO {t} VALUES (1)"
            )
            row = await conn.fetchrow(f"SELECT * FROM {t} WHERE a = $1", 1)
            check(tuple(row) == (1,), f"before the change, run {i}: {row}")
            await conn.execute(f"ALTER TABLE {t} ADD COLUMN b int DEFAULT 2")
            row = await conn.fetchrow(f"SELECT * FROM {t} WHERE a = $1", 1)
            check(tuple(row) == (1, 2), f"after the change, run {i}: {row}")
            await conn.execute(f"DROP TABLE {t}")


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
    ("replica_read", case_replica_read),
    ("schema_change", case_schema_change),
]


async def run(fn):
    """Runs one case; returns None on success, else an error message."""
    try:
        await asyncio.wait_for(fn(), CASE_TIMEOUT_S)
        return None
    except asyncio.TimeoutError:
        return f"timed out after {CASE_TIMEOUT_S} s"
    except BaseException as e:  # noqa: BLE001 - every failure is reported, not raised
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.name != "check"]
        where = f" (line {frames[-1].lineno})" if frames else ""
        state = getattr(e, "sqlstate", None)
        code = f" [SQLSTATE {state}]" if state else ""
        return f"{type(e).__name__}{code}: {e}".strip() + where


async def main():
    failed = 0
    for name, fn in CASES:
        error = await run(fn)
        if error is None:
            print(f"ok {DRIVER} {name}", flush=True)
        else:
            failed += 1
            print(f"FAIL {DRIVER} {name}: {' '.join(error.split())}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    code = asyncio.run(main())
    sys.stdout.flush()
    os._exit(code)
