"""psycopg 3 through pgnear: the driver compatibility scenario (see tests/drivers.rs).

Environment: PGNEAR_URL (through pgnear, TLS verify-full, SCRAM), DIRECT_URL (the primary,
no pgnear), PGNEAR_REGION (the region of that pgnear). Exits non-zero with a message on failure.
"""

import os
import sys
import threading
import traceback
from pathlib import Path

import psycopg
from psycopg import errors, pq, sql

PGNEAR_URL = os.environ["PGNEAR_URL"]
DIRECT_URL = os.environ["DIRECT_URL"]
REGION = os.environ["PGNEAR_REGION"]
TYPES_SQL = (Path(__file__).parent / "types.sql").read_text()
T = "drv_psycopg"


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def on_replica(conn, **kw):
    return conn.execute("SELECT pg_is_in_recovery()", **kw).fetchone()[0]


def step_tls_and_scram(conn):
    check(conn.pgconn.ssl_in_use, "the connection uses TLS")
    # The URL carries the password; a wrong one is refused by pgnear's SCRAM.
    bad = PGNEAR_URL.replace(":" + conn.info.password + "@", ":wrong@", 1)
    try:
        psycopg.connect(bad).close()
        raise AssertionError("a wrong password was accepted")
    except psycopg.OperationalError as e:
        check("password authentication failed" in str(e), f"wrong password: {e}")
    return "sslmode=verify-full"


def step_routing(conn):
    check(on_replica(conn) is True, "a read runs on the replica")
    conn.execute(f"DROP TABLE IF EXISTS {T}")
    conn.execute(f"CREATE TABLE {T} (id int PRIMARY KEY, name text)")
    row = conn.execute(
        f"INSERT INTO {T} VALUES (0, 'zero') RETURNING pg_is_in_recovery()"
    ).fetchone()
    check(row[0] is False, "a write runs on the primary")
    # In-band commands: psycopg sends a query without parameters as a simple query.
    check(conn.execute("SHOW pgnear.region").fetchone()[0] == REGION, "SHOW pgnear.region")
    check(conn.execute("SHOW pgnear.route").fetchone()[0] == "auto", "SHOW pgnear.route")
    conn.execute("SET pgnear.route = 'primary'")
    check(on_replica(conn) is False, "SET pgnear.route = 'primary' pins reads to the primary")
    conn.execute("SET pgnear.route = 'auto'")
    check(on_replica(conn) is True, "SET pgnear.route = 'auto' releases the pin")
    # The causal token, read the way an app reads it after each request. psycopg prepares a
    # query once it has run prepare_threshold (5) times, parameters or not, and pgnear answers
    # its commands in the simple protocol only: prepare=False keeps them there.
    for i in range(12):
        conn.execute(f"UPDATE {T} SET name = %s WHERE id = 0", (f"v{i}",))
        lsn = conn.execute("SHOW pgnear.write_lsn", prepare=False).fetchone()[0]
        check("/" in lsn, f"SHOW pgnear.write_lsn after a write, execution {i + 1}: {lsn!r}")
        # The same token, as ParameterStatus after each committed write.
        reported = conn.info.parameter_status("pgnear.write_lsn")
        check(reported == lsn, f"ParameterStatus pgnear.write_lsn {reported!r} == SHOW {lsn!r}")


def step_prepared(conn):
    check(conn.prepare_threshold == 5, "psycopg's default prepare_threshold")
    for i in range(1, 31):
        # Alternating servers: the statements are prepared on both, under psycopg's names.
        conn.execute(
            f"INSERT INTO {T} VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET name = excluded.name",
            (1000 + i, f"p{i}"),
        )
        row = conn.execute(
            f"SELECT pg_is_in_recovery(), name FROM {T} WHERE id = %s", (1000 + i,)
        ).fetchone()
        check(row == (True, f"p{i}"), f"prepared read {i} sees its write on the replica: {row}")
    for i in range(20):
        row = conn.execute("SELECT %s::int + 1, pg_is_in_recovery()", (i,), prepare=True).fetchone()
        check(row == (i + 1, True), f"explicitly prepared read {i}: {row}")
    n = conn.execute(
        "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '_pg3_%'"
    ).fetchone()[0]
    check(n >= 2, f"psycopg's statements are server-prepared on the replica ({n})")


def step_transaction(conn):
    with conn.transaction():
        check(on_replica(conn) is False, "a read in a read-write transaction runs on the primary")
        conn.execute(f"INSERT INTO {T} VALUES (2000, 'tx')")
        n = conn.execute(f"SELECT count(*) FROM {T} WHERE id = 2000").fetchone()[0]
        check(n == 1, "the transaction reads its own write")
    check(
        conn.execute(f"SELECT name, pg_is_in_recovery() FROM {T} WHERE id = 2000").fetchone()
        == ("tx", True),
        "the committed row is read back from the replica",
    )
    with conn.transaction():
        conn.execute(f"INSERT INTO {T} VALUES (2001, 'rolled back')")
        raise psycopg.Rollback()
    n = conn.execute(f"SELECT count(*) FROM {T} WHERE id = 2001").fetchone()[0]
    check(n == 0, "a rolled-back write is not visible")
    # A transaction that fails: the error, then the session goes on.
    try:
        with conn.transaction():
            conn.execute(f"INSERT INTO {T} VALUES (2000, 'duplicate')")
        raise AssertionError("a duplicate key was accepted")
    except errors.UniqueViolation:
        pass
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        check(on_replica(conn) is True, "a read-only transaction runs on the replica")
    check(conn.info.transaction_status == pq.TransactionStatus.IDLE, "idle after the transactions")


def step_read_your_writes(conn):
    for i in range(100):
        conn.execute(f"INSERT INTO {T} VALUES (%s, %s)", (3000 + i, f"ryw{i}"))
        row = conn.execute(f"SELECT name FROM {T} WHERE id = %s", (3000 + i,)).fetchone()
        check(row == (f"ryw{i}",), f"read-your-writes {i}: {row}")


def step_listen_notify(conn):
    with psycopg.connect(PGNEAR_URL, autocommit=True) as listener:
        listener.execute("LISTEN drv_psycopg")
        check(on_replica(listener) is False, "LISTEN pins the session to the primary")
        conn.execute("NOTIFY drv_psycopg, 'one'")
        conn.execute("SELECT pg_notify('drv_psycopg', 'two')")
        got = [n.payload for n in listener.notifies(timeout=30, stop_after=2)]
        check(got == ["one", "two"], f"notifications received: {got}")
        listener.execute("UNLISTEN *")
        check(on_replica(listener) is True, "UNLISTEN * releases the pin")


def step_copy(conn):
    conn.execute(f"DROP TABLE IF EXISTS {T}_copy")
    conn.execute(f"CREATE TABLE {T}_copy (id int, name text, data bytea)")
    with conn.cursor() as cur:
        with cur.copy(f"COPY {T}_copy (id, name, data) FROM STDIN") as copy:
            for i in range(1000):
                copy.write_row((i, f"row {i}\ttab", bytes([i % 256, 0])))
        check(cur.rowcount == 1000, f"COPY FROM copied {cur.rowcount} rows")
        with cur.copy(f"COPY {T}_copy (id, name, data) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text", "bytea"])
            for i in range(1000, 1500):
                copy.write_row((i, f"binary {i}", b"\x00\x01"))
        row = conn.execute(f"SELECT count(*), pg_is_in_recovery() FROM {T}_copy").fetchone()
        check(row == (1500, True), f"the copied rows, read back on the replica: {row}")
        with cur.copy(f"COPY (SELECT id, name, data FROM {T}_copy ORDER BY id) TO STDOUT") as copy:
            copy.set_types(["int4", "text", "bytea"])
            rows = list(copy.rows())
        check(len(rows) == 1500, f"COPY TO returned {len(rows)} rows")
        check(rows[7] == (7, "row 7\ttab", b"\x07\x00"), f"COPY TO row 7: {rows[7]}")
        with cur.copy(
            f"COPY (SELECT id, name FROM {T}_copy WHERE id >= 1000 ORDER BY id) TO STDOUT (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int4", "text"])
            rows = list(copy.rows())
        check(rows[0] == (1000, "binary 1000") and len(rows) == 500, "COPY TO binary")


def step_cancel(conn):
    done = threading.Event()

    def canceller():
        # A cancel that arrives before the query starts is lost: send it until the query ends.
        while not done.wait(0.3):
            conn.cancel_safe()

    t = threading.Thread(target=canceller)
    t.start()
    try:
        conn.execute("SELECT pg_sleep(60)")
        raise AssertionError("pg_sleep(60) finished: the cancel did not reach it")
    except errors.QueryCanceled as e:
        check(e.sqlstate == "57014", f"cancel SQLSTATE {e.sqlstate}")
    finally:
        done.set()
        t.join()
    check(on_replica(conn) is True, "the session works after the cancel")


def fetch_types(conn, binary):
    with conn.cursor(binary=binary) as cur:
        cur.execute(TYPES_SQL)
        return [d.type_code for d in cur.description], cur.fetchall()


def step_types(conn):
    with psycopg.connect(DIRECT_URL, autocommit=True) as direct:
        check(on_replica(direct) is False, "the direct URL is the primary")
        for binary in (False, True):
            through = fetch_types(conn, binary)
            straight = fetch_types(direct, binary)
            check(through[0] == straight[0], f"column types (binary={binary})")
            check(len(through[1]) == 20, "20 rows")
            for a, b in zip(through[1], straight[1]):
                check(repr(a) == repr(b), f"row through pgnear {a} == direct {b} (binary={binary})")
        check(
            repr(fetch_types(conn, False)) == repr(fetch_types(conn, True)),
            "text and binary results decode to the same values",
        )
        # The same with parameters (extended protocol, binary parameters too).
        q = "SELECT %b::bytea, %s::numeric, %s::int8[], %s::jsonb, %s::timestamptz"
        import datetime
        import decimal

        from psycopg.types.json import Jsonb

        params = (
            b"\x00\xff",
            decimal.Decimal("-1.50"),
            [1, None, 3],
            Jsonb({"a": [1, "x"]}),
            datetime.datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.timezone.utc),
        )
        for binary in (False, True):
            a = conn.cursor(binary=binary).execute(q, params).fetchone()
            b = direct.cursor(binary=binary).execute(q, params).fetchone()
            check(a == b, f"parameters round trip: {a} == {b} (binary={binary})")


def main():
    print(
        f"driver: psycopg {psycopg.__version__} ({pq.__impl__} implementation, "
        f"libpq {pq.version()})",
        flush=True,
    )
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
    conn = psycopg.connect(PGNEAR_URL, autocommit=True)
    for name, step in steps:
        try:
            extra = step(conn)
        except Exception as e:
            traceback.print_exc()
            print(f"FAIL: psycopg: {name}: {type(e).__name__}: {e}", flush=True)
            failed.append(name)
            # The next steps start on a fresh connection.
            conn.close()
            conn = psycopg.connect(PGNEAR_URL, autocommit=True)
            continue
        print(f"ok: {name}" + (f" ({extra})" if extra else ""), flush=True)
    conn.close()
    if failed:
        sys.exit(f"psycopg: {len(failed)} step(s) failed: {', '.join(failed)}")
    print("psycopg: all steps passed", flush=True)


if __name__ == "__main__":
    main()
