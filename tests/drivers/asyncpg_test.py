"""asyncpg through pgnear: the driver compatibility scenario (see tests/drivers.rs).

Environment: PGNEAR_URL (through pgnear, TLS verify-full, SCRAM), DIRECT_URL (the primary,
no pgnear), PGNEAR_REGION (the region of that pgnear). Exits non-zero with a message on failure.

asyncpg speaks the extended protocol with named statements for every query that returns rows
and caches them (statement_cache_size, 100 by default); only `execute` without arguments is a
simple query, which is how it sends pgnear's in-band SET commands.
"""

import asyncio
import io
import os
import sys
import traceback
from pathlib import Path

import asyncpg

PGNEAR_URL = os.environ["PGNEAR_URL"]
DIRECT_URL = os.environ["DIRECT_URL"]
REGION = os.environ["PGNEAR_REGION"]
TYPES_SQL = (Path(__file__).parent / "types.sql").read_text()
T = "drv_asyncpg"


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def on_replica(conn):
    return await conn.fetchval("SELECT pg_is_in_recovery()")


async def step_tls_and_scram(conn):
    ssl = conn._transport.get_extra_info("ssl_object")
    check(ssl is not None, "the connection uses TLS")
    check(ssl.version() in ("TLSv1.2", "TLSv1.3"), f"TLS version {ssl.version()}")
    params = conn._params
    bad = PGNEAR_URL.replace(":" + params.password + "@", ":wrong@", 1)
    try:
        await (await asyncpg.connect(bad)).close()
        raise AssertionError("a wrong password was accepted")
    except asyncpg.InvalidPasswordError as e:
        check("password authentication failed" in str(e), f"wrong password: {e}")
    return ssl.version()


async def step_routing(conn):
    check(await on_replica(conn) is True, "a read runs on the replica")
    await conn.execute(f"DROP TABLE IF EXISTS {T}")
    await conn.execute(f"CREATE TABLE {T} (id int PRIMARY KEY, name text)")
    v = await conn.fetchval(f"INSERT INTO {T} VALUES (0, 'zero') RETURNING pg_is_in_recovery()")
    check(v is False, "a write runs on the primary")
    # `execute` without arguments is a simple query: pgnear answers its in-band commands.
    await conn.execute("SET pgnear.route = 'primary'")
    check(await on_replica(conn) is False, "SET pgnear.route = 'primary' pins to the primary")
    await conn.execute("SET pgnear.route = 'auto'")
    check(await on_replica(conn) is True, "SET pgnear.route = 'auto' releases the pin")
    # SHOW pgnear.* returns rows, which asyncpg fetches only through the extended protocol:
    # the causal token comes as ParameterStatus after each committed write instead.
    tokens = []
    for i in range(5):
        await conn.execute(f"UPDATE {T} SET name = $1 WHERE id = 0", f"v{i}")
        tokens.append(getattr(conn.get_settings(), "pgnear.write_lsn"))
    lsns = [tuple(int(p, 16) for p in t.split("/")) for t in tokens]
    check(lsns == sorted(lsns) and lsns[0] < lsns[-1], f"pgnear.write_lsn advances: {tokens}")
    await conn.execute(f"SET pgnear.min_lsn = '{tokens[-1]}'")
    check(await on_replica(conn) is True, "reads after SET pgnear.min_lsn run on the replica")


async def step_prepared(conn):
    stmt = await conn.prepare("SELECT pg_is_in_recovery(), $1::int * 2")
    ins = await conn.prepare(
        f"INSERT INTO {T} VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET name = excluded.name"
    )
    for i in range(1, 31):
        await ins.fetch(1000 + i, f"p{i}")
        row = await stmt.fetchrow(i)
        check(tuple(row) == (True, 2 * i), f"prepared read {i}: {row}")
        # The statement cache: the same text, the same named statement, every time.
        row = await conn.fetchrow(f"SELECT name, pg_is_in_recovery() FROM {T} WHERE id = $1", 1000 + i)
        check(tuple(row) == (f"p{i}", True), f"cached statement {i} reads its write: {row}")
    names = await conn.fetch(
        "SELECT name FROM pg_prepared_statements WHERE name LIKE '__asyncpg_stmt_%'"
    )
    check(len(names) >= 2, f"asyncpg's named statements exist on the replica: {names}")
    # executemany: one statement, many Bind/Execute in one pipeline, on the primary.
    await conn.executemany(f"INSERT INTO {T} VALUES ($1, $2)", [(1100 + i, f"m{i}") for i in range(50)])
    n = await conn.fetchval(f"SELECT count(*) FROM {T} WHERE id >= 1100 AND id < 1150")
    check(n == 50, f"executemany rows read back: {n}")


async def step_transaction(conn):
    async with conn.transaction():
        check(await on_replica(conn) is False, "a read in a read-write transaction runs on the primary")
        await conn.execute(f"INSERT INTO {T} VALUES (2000, 'tx')")
        check(await conn.fetchval(f"SELECT count(*) FROM {T} WHERE id = 2000") == 1, "own write in tx")
    row = await conn.fetchrow(f"SELECT name, pg_is_in_recovery() FROM {T} WHERE id = 2000")
    check(tuple(row) == ("tx", True), f"the committed row, read back from the replica: {row}")
    tr = conn.transaction()
    await tr.start()
    await conn.execute(f"INSERT INTO {T} VALUES (2001, 'rolled back')")
    await tr.rollback()
    check(await conn.fetchval(f"SELECT count(*) FROM {T} WHERE id = 2001") == 0, "rollback")
    try:
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {T} VALUES (2000, 'duplicate')")
        raise AssertionError("a duplicate key was accepted")
    except asyncpg.UniqueViolationError:
        pass
    # A read-only transaction runs on the replica; a cursor there fetches in portions
    # (Execute with a row limit, PortalSuspended).
    async with conn.transaction(readonly=True):
        check(await on_replica(conn) is True, "a read-only transaction runs on the replica")
        got = [r[0] async for r in conn.cursor("SELECT g FROM generate_series(1, 100) g", prefetch=7)]
        check(got == list(range(1, 101)), "a cursor's portions")
    # A savepoint inside a transaction.
    async with conn.transaction():
        await conn.execute(f"INSERT INTO {T} VALUES (2002, 'outer')")
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {T} VALUES (2002, 'inner duplicate')")
        except asyncpg.UniqueViolationError:
            pass
    check(await conn.fetchval(f"SELECT name FROM {T} WHERE id = 2002") == "outer", "savepoint")


async def step_read_your_writes(conn):
    for i in range(100):
        await conn.execute(f"INSERT INTO {T} VALUES ($1, $2)", 3000 + i, f"ryw{i}")
        v = await conn.fetchval(f"SELECT name FROM {T} WHERE id = $1", 3000 + i)
        check(v == f"ryw{i}", f"read-your-writes {i}: {v!r}")


async def step_listen_notify(conn):
    listener = await asyncpg.connect(PGNEAR_URL)
    try:
        got = asyncio.Queue()
        await listener.add_listener("drv_asyncpg", lambda c, pid, ch, payload: got.put_nowait(payload))
        check(await on_replica(listener) is False, "LISTEN pins the session to the primary")
        await conn.execute("NOTIFY drv_asyncpg, 'one'")
        await conn.execute("SELECT pg_notify('drv_asyncpg', $1)", "two")
        payloads = [await asyncio.wait_for(got.get(), 30) for _ in range(2)]
        check(payloads == ["one", "two"], f"notifications received: {payloads}")
        await listener.execute("UNLISTEN *")
        check(await on_replica(listener) is True, "UNLISTEN * releases the pin")
    finally:
        await listener.close()


async def step_copy(conn):
    await conn.execute(f"DROP TABLE IF EXISTS {T}_copy")
    await conn.execute(f"CREATE TABLE {T}_copy (id int, name text, data bytea)")
    records = [(i, f"row {i}\ttab", bytes([i % 256, 0])) for i in range(1000)]
    status = await conn.copy_records_to_table(f"{T}_copy", records=records)
    check(status == "COPY 1000", f"copy_records_to_table: {status}")
    row = await conn.fetchrow(f"SELECT count(*), pg_is_in_recovery() FROM {T}_copy")
    check(tuple(row) == (1000, True), f"the copied rows, read back on the replica: {row}")
    buf = io.BytesIO()
    status = await conn.copy_from_query(
        f"SELECT id, name FROM {T}_copy WHERE id < $1 ORDER BY id", 3, output=buf, format="csv"
    )
    check(status == "COPY 3", f"copy_from_query: {status}")
    check(buf.getvalue() == b"0,row 0\ttab\n1,row 1\ttab\n2,row 2\ttab\n", f"CSV: {buf.getvalue()!r}")
    buf = io.BytesIO()
    status = await conn.copy_from_table(f"{T}_copy", output=buf, format="binary")
    check(status == "COPY 1000" and buf.getvalue().startswith(b"PGCOPY\n\xff"), "binary COPY TO")


async def step_cancel(conn):
    # asyncpg cancels a statement whose timeout passes: a CancelRequest through pgnear, then
    # it waits for the statement's answer (57014) before the connection is used again.
    try:
        await conn.fetch("SELECT pg_sleep(60)", timeout=0.5)
        raise AssertionError("pg_sleep(60) finished: it was not cancelled")
    except asyncio.TimeoutError:
        pass
    # A write that would be visible had the cancel not stopped it.
    try:
        await conn.execute(f"INSERT INTO {T} SELECT 4000, 'slept' FROM pg_sleep(60)", timeout=0.5)
        raise AssertionError("the sleeping insert finished: it was not cancelled")
    except asyncio.TimeoutError:
        pass
    n = await conn.fetchval(f"SELECT count(*) FROM {T} WHERE id = 4000")
    check(n == 0, "the cancelled insert did not happen")
    check(await on_replica(conn) is True, "the session works after the cancels")
    # statement_timeout's 57014 reaches the client as QueryCanceledError.
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL statement_timeout = '100ms'")
            await conn.execute("SELECT pg_sleep(60)")
        raise AssertionError("statement_timeout did not cancel")
    except asyncpg.QueryCanceledError as e:
        check(e.sqlstate == "57014", f"SQLSTATE {e.sqlstate}")


async def fetch_all(conn):
    rows = await conn.fetch(TYPES_SQL)
    return [tuple(r) for r in rows]


async def fetch_text(conn):
    # Text format for some types: the server's own text, passed through as str.
    for t in ("numeric", "timestamptz", "interval", "json", "jsonb", "bytea", "float8"):
        await conn.set_type_codec(t, schema="pg_catalog", encoder=str, decoder=str, format="text")
    return await fetch_all(conn)


async def step_types(conn):
    direct = await asyncpg.connect(DIRECT_URL)
    try:
        check(await on_replica(direct) is False, "the direct URL is the primary")
        a, b = await fetch_all(conn), await fetch_all(direct)
        check(len(a) == 20, "20 rows")
        for x, y in zip(a, b):
            check(repr(x) == repr(y), f"binary row through pgnear {x} == direct {y}")
        # Parameters in binary.
        import datetime
        import decimal

        q = "SELECT $1::bytea, $2::numeric, $3::int8[], $4::timestamptz, $5::text"
        params = (
            b"\x00\xff",
            decimal.Decimal("-1.50"),
            [1, None, 3],
            datetime.datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.timezone.utc),
            None,
        )
        x, y = await conn.fetchrow(q, *params), await direct.fetchrow(q, *params)
        check(tuple(x) == tuple(y) == params, f"parameters round trip: {x} == {y}")
        text_conn = await asyncpg.connect(PGNEAR_URL)
        try:
            a, b = await fetch_text(text_conn), await fetch_text(direct)
            for x, y in zip(a, b):
                check(repr(x) == repr(y), f"text row through pgnear {x} == direct {y}")
        finally:
            await text_conn.close()
    finally:
        await direct.close()


async def main():
    print(f"driver: asyncpg {asyncpg.__version__}", flush=True)
    steps = [
        ("SCRAM + TLS", step_tls_and_scram),
        ("routing and in-band commands", step_routing),
        ("prepared statements", step_prepared),
        ("transactions", step_transaction),
        ("read-your-writes", step_read_your_writes),
        ("LISTEN/NOTIFY", step_listen_notify),
        ("COPY", step_copy),
        ("cancel", step_cancel),
        ("text and binary results", step_types),
    ]
    failed = []
    conn = await asyncpg.connect(PGNEAR_URL)
    for name, step in steps:
        try:
            extra = await step(conn)
        except Exception as e:
            traceback.print_exc()
            print(f"FAIL: asyncpg: {name}: {type(e).__name__}: {e}", flush=True)
            failed.append(name)
            conn.terminate()
            conn = await asyncpg.connect(PGNEAR_URL)
            continue
        print(f"ok: {name}" + (f" ({extra})" if extra else ""), flush=True)
    await conn.close()
    if failed:
        sys.exit(f"asyncpg: {len(failed)} step(s) failed: {', '.join(failed)}")
    print("asyncpg: all steps passed", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
