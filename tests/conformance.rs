//! Drop-in conformance: protocol paths real drivers take, each checked through pgnear as it
//! behaves against Postgres itself (issue #19). Each test names the failure it guards against.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use pgnear::config::{AuthMethod, Config, PoolMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

/// Trust auth (raw protocol sessions), in the given pool mode.
fn mode(pool: PoolMode) -> impl Fn(&mut Config) {
    move |c: &mut Config| {
        c.auth.method = Some(AuthMethod::Trust);
        c.pool.mode = pool;
    }
}

const MODES: [PoolMode; 2] = [PoolMode::Session, PoolMode::Transaction];

/// A FunctionCall of the function `oid` with int4/bytea arguments in binary, a binary result.
fn function_call(oid: u32, args: &[&[u8]]) -> Vec<u8> {
    let mut body = oid.to_be_bytes().to_vec();
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(&(args.len() as u16).to_be_bytes());
    for a in args {
        body.extend_from_slice(&(a.len() as i32).to_be_bytes());
        body.extend_from_slice(a);
    }
    body.extend_from_slice(&1u16.to_be_bytes());
    frame(b'F', &body)
}

/// ParameterStatus frames among `frames`, as (name, value), but pgnear's own (`pgnear.*`).
fn statuses(frames: &[(u8, Vec<u8>)]) -> Vec<(String, String)> {
    frames
        .iter()
        .filter(|(t, b)| *t == b'S' && !b.starts_with(b"pgnear."))
        .map(|(_, b)| {
            let mut parts = b.split(|c| *c == 0);
            let name = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
            let value = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
            (name, value)
        })
        .collect()
}

async fn simple(s: &mut tokio::net::TcpStream, sql: &str) -> Vec<(u8, Vec<u8>)> {
    s.write_all(&query_msg(sql)).await.unwrap();
    frames_until(s, b'Z').await
}

/// Fast-path function calls (libpq's large-object API) hung forever: pgnear waited for a Sync
/// that never comes. A FunctionCall is answered by FunctionCallResponse and ReadyForQuery, in
/// and outside a transaction, in a replica region, in both pool modes.
#[test]
fn function_calls_are_answered() {
    run(async {
        for pool in MODES {
            let p = proxy(REPLICA, mode(pool)).await;
            let mut s = raw_session(&p).await;
            let oids = simple(
                &mut s,
                "SELECT 'lo_creat'::regproc::oid::int, 'lo_unlink'::regproc::oid::int",
            )
            .await;
            let row = oids
                .iter()
                .find(|(t, _)| *t == b'D')
                .expect("a row")
                .1
                .clone();
            let field = |at: usize| -> (u32, usize) {
                let len = i32::from_be_bytes(row[at..at + 4].try_into().unwrap()) as usize;
                let text = std::str::from_utf8(&row[at + 4..at + 4 + len]).unwrap();
                (text.parse().unwrap(), at + 4 + len)
            };
            let (creat, next) = field(2);
            let (unlink, _) = field(next);

            // Autocommit: the call runs on the primary and writes.
            s.write_all(&function_call(creat, &[&(-1i32).to_be_bytes()]))
                .await
                .unwrap();
            let got = frames_until(&mut s, b'Z').await;
            let tags: Vec<u8> = got.iter().map(|(t, _)| *t).collect();
            assert_eq!(tags, b"VZ", "{pool:?}: {got:?}");
            let result = &got[0].1;
            assert_eq!(i32::from_be_bytes(result[..4].try_into().unwrap()), 4);
            let oid = i32::from_be_bytes(result[4..8].try_into().unwrap());

            // In a transaction, then a read of the session's own write.
            simple(&mut s, "BEGIN").await;
            s.write_all(&function_call(unlink, &[&oid.to_be_bytes()]))
                .await
                .unwrap();
            let got = frames_until(&mut s, b'Z').await;
            assert_eq!(
                got.last().unwrap().1,
                b"T",
                "{pool:?}: still in the transaction"
            );
            assert_eq!(got[0].0, b'V', "{pool:?}: {got:?}");
            simple(&mut s, "COMMIT").await;
            let left = simple(
                &mut s,
                &format!("SELECT count(*) FROM pg_largeobject_metadata WHERE oid = {oid}"),
            )
            .await;
            let row = left.iter().find(|(t, _)| *t == b'D').unwrap();
            assert_eq!(&row.1[6..], b"0", "{pool:?}: the unlink is visible");

            // An error is answered too, and the session goes on.
            s.write_all(&function_call(unlink, &[&oid.to_be_bytes()]))
                .await
                .unwrap();
            let got = frames_until(&mut s, b'Z').await;
            assert_eq!(
                error_codes(&got).first().map(String::as_str),
                Some("42704"),
                "{got:?}"
            );
            let again = simple(&mut s, "SELECT 1").await;
            assert!(again.iter().any(|(t, _)| *t == b'D'));
        }
    });
}

/// psql's `\lo_import` / `\lo_export` (libpq's large objects through pgnear) round-trip a file.
#[test]
fn large_objects_through_libpq() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.bin");
        let output = dir.path().join("out.bin");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&input, &data).unwrap();
        let url = url(&p);
        let script = format!(
            "\\lo_import {}\n\\set oid :LASTOID\n\\lo_export :oid {}\n\\lo_unlink :oid\n",
            input.display(),
            output.display()
        );
        let (ok, out, err) =
            tokio::task::spawn_blocking(move || psql(&url, &["-q"], Some(&script)))
                .await
                .unwrap();
        assert!(ok, "psql failed: {out} {err}");
        assert_eq!(std::fs::read(&output).unwrap(), data);
    });
}

/// COPY FROM STDIN started through the extended protocol (tokio-postgres sends Bind, Execute
/// and Sync before the data) failed with "unexpected message type 0x51 during COPY from
/// stdin". Text and binary, in a replica region, in both pool modes; the rows are read back
/// at once (read-your-writes through the replica).
#[test]
fn copy_in_through_the_extended_protocol() {
    run(async {
        on_primary("CREATE TABLE IF NOT EXISTS copy_ext (id int, t text)").await;
        for pool in MODES {
            let p = proxy(REPLICA, |c| c.pool.mode = pool).await;
            let c = connect(&url(&p)).await;
            c.execute("DELETE FROM copy_ext", &[]).await.unwrap();

            let sink = c.copy_in("COPY copy_ext FROM STDIN").await.unwrap();
            futures_util::pin_mut!(sink);
            sink.send(bytes::Bytes::from_static(b"1\tone\n2\ttwo\n"))
                .await
                .unwrap();
            assert_eq!(sink.finish().await.unwrap(), 2, "{pool:?}");

            let sink = c
                .copy_in("COPY copy_ext (id, t) FROM STDIN BINARY")
                .await
                .unwrap();
            let writer = BinaryCopyInWriter::new(sink, &[Type::INT4, Type::TEXT]);
            futures_util::pin_mut!(writer);
            for i in 3..103i32 {
                writer.as_mut().write(&[&i, &"bin"]).await.unwrap();
            }
            assert_eq!(writer.finish().await.unwrap(), 100, "{pool:?}");

            // A server error in the middle of the COPY: reported, and the session goes on.
            let sink = c.copy_in("COPY copy_ext FROM STDIN").await.unwrap();
            futures_util::pin_mut!(sink);
            sink.send(bytes::Bytes::from_static(b"x\tbad\n"))
                .await
                .unwrap();
            let e = sink.finish().await.expect_err("bad data");
            assert_eq!(sqlstate(&e), "22P02", "{pool:?}: {e}");

            // Inside a transaction.
            c.batch_execute("BEGIN").await.unwrap();
            let sink = c.copy_in("COPY copy_ext FROM STDIN").await.unwrap();
            futures_util::pin_mut!(sink);
            sink.send(bytes::Bytes::from_static(b"200\ttx\n"))
                .await
                .unwrap();
            assert_eq!(sink.finish().await.unwrap(), 1);
            c.batch_execute("COMMIT").await.unwrap();

            let n: i64 = c
                .query_one("SELECT count(*) FROM copy_ext", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 103, "{pool:?}: the session reads its own COPY");
            let standby: bool = c
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .unwrap()
                .get(0);
            assert!(standby, "{pool:?}: reads still go to the replica");
        }
    });
}

/// CopyFail through the extended protocol: the error is the client's own message, and the
/// connection is not handed to another client mid-COPY (transaction mode).
#[test]
fn copy_fail_through_the_extended_protocol() {
    run(async {
        on_primary("CREATE TABLE IF NOT EXISTS copy_fail (id int)").await;
        for pool in MODES {
            let p = proxy(REPLICA, mode(pool)).await;
            let mut s = raw_session(&p).await;
            let mut batch = frame(b'P', b"\0COPY copy_fail FROM STDIN\0\0\0");
            batch.extend(frame(b'B', b"\0\0\0\0\0\0\0\0"));
            batch.extend(frame(b'E', b"\0\0\0\0\0"));
            batch.extend(frame(b'S', b""));
            s.write_all(&batch).await.unwrap();
            let got = frames_until(&mut s, b'G').await;
            assert_eq!(got.iter().map(|(t, _)| *t).collect::<Vec<_>>(), b"12G");
            let mut rest = frame(b'd', b"1\n");
            rest.extend(frame(b'f', b"client gave up\0"));
            rest.extend(frame(b'S', b""));
            s.write_all(&rest).await.unwrap();
            let got = frames_until(&mut s, b'Z').await;
            assert_eq!(
                error_codes(&got).first().map(String::as_str),
                Some("57014"),
                "{pool:?}: {got:?}"
            );
            let again = simple(&mut s, "SELECT count(*) FROM copy_fail").await;
            assert!(again.iter().any(|(t, _)| *t == b'D'), "{again:?}");
            s.write_all(&frame(b'X', b"")).await.unwrap();
        }
    });
}

/// Every ParameterStatus a direct connection would send reaches the client: after SET of a
/// reported parameter, after RESET, after a rolled-back SET LOCAL, also on a pooled connection
/// that already had the value (transaction mode hands a connection on with its settings).
#[test]
fn parameter_status_reaches_the_client() {
    run(async {
        for pool in MODES {
            for region in [PRIMARY, REPLICA] {
                let p = proxy(region, mode(pool)).await;
                // A first session leaves LATIN1 on the pooled connection.
                let mut s = raw_session(&p).await;
                let got = simple(&mut s, "SET client_encoding TO 'LATIN1'").await;
                assert!(
                    statuses(&got).contains(&("client_encoding".into(), "LATIN1".into())),
                    "{pool:?} {region}: {got:?}"
                );
                drop(s);
                let mut s = raw_session(&p).await;
                let got = simple(&mut s, "SELECT 1").await;
                assert!(statuses(&got).is_empty(), "{pool:?} {region}: {got:?}");
                let got = simple(&mut s, "SET client_encoding TO 'LATIN1'").await;
                assert_eq!(
                    statuses(&got),
                    [("client_encoding".to_string(), "LATIN1".to_string())],
                    "{pool:?} {region}: a second session that sets it is told"
                );
                let got = simple(&mut s, "RESET client_encoding").await;
                assert_eq!(
                    statuses(&got),
                    [("client_encoding".to_string(), "UTF8".to_string())],
                    "{pool:?} {region}"
                );
                let got = simple(&mut s, "SET standard_conforming_strings = off").await;
                assert_eq!(
                    statuses(&got),
                    [("standard_conforming_strings".to_string(), "off".to_string())]
                );
                simple(&mut s, "BEGIN").await;
                let got = simple(&mut s, "SET LOCAL TimeZone = 'Asia/Tokyo'").await;
                assert_eq!(
                    statuses(&got),
                    [("TimeZone".to_string(), "Asia/Tokyo".to_string())]
                );
                let got = simple(&mut s, "ROLLBACK").await;
                assert_eq!(statuses(&got).len(), 1, "{pool:?} {region}: {got:?}");
                assert_ne!(statuses(&got)[0].1, "Asia/Tokyo");
                // Moving between servers tells nothing new.
                let got = simple(&mut s, "SELECT 1").await;
                assert!(statuses(&got).is_empty(), "{pool:?} {region}: {got:?}");
                let got = simple(&mut s, "CREATE TEMP TABLE IF NOT EXISTS ps_t (a int)").await;
                assert!(statuses(&got).is_empty(), "{pool:?} {region}: {got:?}");
                let got = simple(&mut s, "SHOW in_hot_standby").await;
                assert!(statuses(&got).is_empty(), "{pool:?} {region}: {got:?}");
            }
        }
    });
}

/// Non-UTF8 client encodings round-trip through both protocols.
#[test]
fn latin1_round_trips() {
    run(async {
        on_primary("CREATE TABLE IF NOT EXISTS latin1_t (t text)").await;
        let p = proxy(REPLICA, mode(PoolMode::Session)).await;
        let mut s = raw_session(&p).await;
        simple(&mut s, "SET client_encoding TO 'LATIN1'").await;
        // "café" in LATIN1: 0xE9 for é.
        let mut sql = b"INSERT INTO latin1_t VALUES ('caf".to_vec();
        sql.extend_from_slice(&[0xE9]);
        sql.extend_from_slice(b"') RETURNING t, octet_length(convert_to(t, 'UTF8'))");
        let got = {
            let mut body = sql.clone();
            body.push(0);
            s.write_all(&frame(b'Q', &body)).await.unwrap();
            frames_until(&mut s, b'Z').await
        };
        let row = &got.iter().find(|(t, _)| *t == b'D').expect("a row").1;
        assert_eq!(&row[6..10], b"caf\xE9", "{got:?}");
        assert_eq!(&row[14..], b"5", "stored as UTF8 é (2 bytes)");
        let got = simple(&mut s, "SELECT t FROM latin1_t WHERE t LIKE 'caf%' LIMIT 1").await;
        let row = &got.iter().find(|(t, _)| *t == b'D').expect("a row").1;
        assert_eq!(&row[6..], b"caf\xE9");
    });
}

/// With `default_transaction_isolation = 'serializable'` (or a SERIALIZABLE transaction) a
/// standby refuses reads ("cannot use serializable mode in a hot standby"): they run on the
/// primary instead.
#[test]
fn serializable_runs_on_the_primary() {
    run(async {
        for pool in MODES {
            let p = proxy(REPLICA, |c| c.pool.mode = pool).await;
            let c = connect(&url(&p)).await;
            let standby = |rows: Vec<tokio_postgres::SimpleQueryMessage>| first_value(&rows);
            let got = c.simple_query("SELECT pg_is_in_recovery()").await.unwrap();
            assert_eq!(
                standby(got).as_deref(),
                Some("t"),
                "{pool:?}: reads are local"
            );
            c.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY")
                .await
                .unwrap();
            let got = c.simple_query("SELECT pg_is_in_recovery()").await.unwrap();
            assert_eq!(standby(got).as_deref(), Some("f"), "{pool:?}");
            c.batch_execute("COMMIT").await.unwrap();
            c.batch_execute("BEGIN READ ONLY").await.unwrap();
            c.batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                .await
                .unwrap_or_else(|e| panic!("{pool:?}: {e}"));
            c.batch_execute("COMMIT").await.unwrap();

            c.batch_execute("SET default_transaction_isolation = 'serializable'")
                .await
                .unwrap();
            let got = c.simple_query("SELECT pg_is_in_recovery()").await.unwrap();
            assert_eq!(standby(got).as_deref(), Some("f"), "{pool:?}");
            let row = c.query_one("SELECT 1 + $1", &[&1i32]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), 2);
            c.batch_execute("BEGIN READ ONLY").await.unwrap();
            let got = c.simple_query("SELECT pg_is_in_recovery()").await.unwrap();
            assert_eq!(standby(got).as_deref(), Some("f"), "{pool:?}");
            c.batch_execute("COMMIT").await.unwrap();
            c.batch_execute("RESET default_transaction_isolation")
                .await
                .unwrap();
            let got = c.simple_query("SELECT pg_is_in_recovery()").await.unwrap();
            assert_eq!(standby(got).as_deref(), Some("t"), "{pool:?}: local again");
        }
        // Set as the client's startup option.
        let p = proxy(REPLICA, |_| {}).await;
        let c = connect(&format!(
            "{}&options=-c%20default_transaction_isolation%3Dserializable",
            url(&p)
        ))
        .await;
        let got = c.simple_query("SELECT pg_is_in_recovery()").await.unwrap();
        assert_eq!(first_value(&got).as_deref(), Some("f"));
    });
}

/// Objects created in `pg_temp` (types, tables, functions, views, sequences) pin the session
/// to the primary, where they live.
#[test]
fn pg_temp_objects_pin_the_session() {
    run(async {
        let statements = [
            (
                "CREATE TYPE pg_temp.mood AS ENUM ('ok', 'meh')",
                "SELECT 'ok'::pg_temp.mood",
            ),
            (
                "CREATE TABLE pg_temp.foo (a int)",
                "SELECT * FROM pg_temp.foo",
            ),
            (
                "CREATE FUNCTION pg_temp.two() RETURNS int LANGUAGE sql AS 'SELECT 2'",
                "SELECT pg_temp.two()",
            ),
            (
                "CREATE OR REPLACE VIEW pg_temp.v AS SELECT 1 AS one",
                "SELECT * FROM pg_temp.v",
            ),
            (
                "CREATE SEQUENCE pg_temp.s",
                "SELECT last_value FROM pg_temp.s",
            ),
            (
                "SELECT 1 AS a INTO TEMP TABLE into_temp",
                "SELECT * FROM into_temp",
            ),
        ];
        for pool in MODES {
            for (create, read) in statements {
                let p = proxy(REPLICA, |c| c.pool.mode = pool).await;
                let c = connect(&url(&p)).await;
                c.batch_execute(create)
                    .await
                    .unwrap_or_else(|e| panic!("{create}: {e}"));
                c.simple_query(read)
                    .await
                    .unwrap_or_else(|e| panic!("{pool:?}: {read} after {create}: {e}"));
                c.query(read, &[])
                    .await
                    .unwrap_or_else(|e| panic!("{pool:?}: {read} (extended): {e}"));
            }
        }
    });
}

/// `target_session_attrs=read-write` accepts pgnear in a replica region: the probe
/// (`SHOW transaction_read_only`) reads as on the primary; `current_setting` too.
#[test]
fn pgnear_is_read_write_to_clients() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let url = format!("{}&target_session_attrs=read-write", url(&p));
        let c = connect(&url).await;
        let got = c
            .simple_query("SELECT current_setting('transaction_read_only')")
            .await
            .unwrap();
        assert_eq!(first_value(&got).as_deref(), Some("off"));
        let got = c.simple_query("SHOW transaction_read_only").await.unwrap();
        assert_eq!(first_value(&got).as_deref(), Some("off"));
        c.batch_execute("BEGIN READ ONLY").await.unwrap();
        let got = c.simple_query("SHOW transaction_read_only").await.unwrap();
        assert_eq!(
            first_value(&got).as_deref(),
            Some("on"),
            "a read-only transaction"
        );
        c.batch_execute("COMMIT").await.unwrap();
        let psql_url = url.clone();
        let (ok, out, err) =
            tokio::task::spawn_blocking(move || psql(&psql_url, &["-At", "-c", "SELECT 1"], None))
                .await
                .unwrap();
        assert!(ok && out.trim() == "1", "psql: {out} {err}");
    });
}

/// LISTEN inside a transaction, committed: notifications reach the idle client, once.
#[test]
fn listen_in_a_transaction_delivers() {
    run(async {
        for pool in MODES {
            let p = proxy(REPLICA, mode(pool)).await;
            let mut s = raw_session(&p).await;
            simple(&mut s, "BEGIN").await;
            simple(&mut s, "LISTEN conformance_ch").await;
            simple(&mut s, "COMMIT").await;
            let other = connect(&url(&p)).await;
            other
                .batch_execute("NOTIFY conformance_ch, 'hello'")
                .await
                .unwrap();
            let got = tokio::time::timeout(Duration::from_secs(10), frames_until(&mut s, b'A'))
                .await
                .unwrap_or_else(|_| panic!("{pool:?}: no notification"));
            let (_, body) = got.last().unwrap();
            assert!(body.ends_with(b"conformance_ch\0hello\0"), "{body:?}");
        }
    });
}

/// A client's DROP DATABASE is not blocked by pgnear's own idle connections to that database
/// (a test runner drops its test database this way).
#[test]
fn drop_database_is_not_blocked_by_the_pool() {
    run(async {
        let admin = primary_admin().await;
        let app = &cluster().options().app_user;
        admin
            .batch_execute("DROP DATABASE IF EXISTS conformance_drop")
            .await
            .unwrap();
        admin
            .batch_execute(&format!("ALTER ROLE {app} CREATEDB"))
            .await
            .unwrap();
        for region in [PRIMARY, REPLICA] {
            let p = proxy(region, |_| {}).await;
            let c = connect(&url(&p)).await;
            c.batch_execute("CREATE DATABASE conformance_drop")
                .await
                .unwrap();
            cluster().wait_replicas_caught_up().await.unwrap();
            let url_x = url(&p).replace(
                &format!("/{}?", cluster().options().database),
                "/conformance_drop?",
            );
            for _ in 0..3 {
                let x = connect(&url_x).await;
                x.batch_execute("CREATE TABLE IF NOT EXISTS t (a int); INSERT INTO t VALUES (1)")
                    .await
                    .unwrap();
                x.simple_query("SELECT count(*) FROM t").await.unwrap();
            }
            // The closed sessions' connections are back in the pools: none of them still runs
            // anything (their reset) on either server.
            let replica = connect(&cluster().replica_url(REPLICA).unwrap()).await;
            eventually(
                "the sessions' connections idle",
                Duration::from_secs(60),
                || async {
                    let mut busy = 0;
                    for server in [&admin, &replica] {
                        let row = server
                            .query_one(
                                "SELECT count(*) FROM pg_stat_activity \
                             WHERE datname = 'conformance_drop' AND state <> 'idle'",
                                &[],
                            )
                            .await
                            .unwrap();
                        busy += row.get::<_, i64>(0);
                    }
                    busy == 0
                },
            )
            .await;
            c.batch_execute("ALTER DATABASE conformance_drop RENAME TO conformance_drop2")
                .await
                .unwrap_or_else(|e| panic!("{region}: rename: {e}"));
            c.batch_execute("ALTER DATABASE conformance_drop2 RENAME TO conformance_drop")
                .await
                .unwrap();
            c.batch_execute("DROP DATABASE conformance_drop")
                .await
                .unwrap_or_else(|e| panic!("{region}: {e}"));
        }
    });
}

/// A client that connects and leaves at once (node-postgres `connect(); end()`) sends
/// Terminate before its startup packet: Postgres closes without a word, and so does pgnear.
#[test]
fn an_invalid_startup_packet_closes_silently() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        for packet in [
            &b"X\0\0\0\x04"[..],
            &b"\0\0\0\x02"[..],
            &b"\0\0\0\x09\0\x03"[..],
        ] {
            let mut s = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
            s.write_all(packet).await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
                .await
                .expect("closed");
            assert!(
                matches!(n, Ok(0)) || n.is_err(),
                "{packet:?}: nothing is answered, got {got:?}"
            );
        }
    });
}

/// A raw protocol session (trust) with extra startup parameters; the startup's frames.
async fn raw_session_with(
    p: &pgnear::Proxy,
    extra: &[(&str, &str)],
) -> (tokio::net::TcpStream, Vec<(u8, Vec<u8>)>) {
    let o = cluster().options();
    let mut params = vec![
        ("user", o.app_user.as_str()),
        ("database", o.database.as_str()),
    ];
    params.extend_from_slice(extra);
    let mut s = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
    s.write_all(&startup_packet(&params, 196608)).await.unwrap();
    let frames = frames_until(&mut s, b'Z').await;
    (s, frames)
}

/// RESET ALL, DISCARD ALL and RESET of a startup parameter return it to the value the client
/// gave at startup, as on a direct connection (asyncpg's pool resets with RESET ALL), and the
/// client is told nothing changed. Startup values are reported as the server normalises them.
#[test]
fn resets_return_to_the_startup_values() {
    run(async {
        for pool in MODES {
            for region in [PRIMARY, REPLICA] {
                let p = proxy(region, mode(pool)).await;
                let startup = [
                    ("application_name", "conf_app"),
                    ("client_encoding", "utf-8"),
                    ("DateStyle", "ISO"),
                ];
                let (mut s, frames) = raw_session_with(&p, &startup).await;
                let told = statuses(&frames);
                for (name, value) in [
                    ("application_name", "conf_app"),
                    ("client_encoding", "UTF8"),
                    ("DateStyle", "ISO, MDY"),
                ] {
                    assert!(
                        told.contains(&(name.to_string(), value.to_string())),
                        "{pool:?} {region}: {name} at startup: {told:?}"
                    );
                }
                for reset in ["RESET ALL", "DISCARD ALL", "RESET application_name"] {
                    simple(&mut s, "SET application_name = 'changed'").await;
                    let got = simple(&mut s, reset).await;
                    assert_eq!(
                        statuses(&got),
                        [("application_name".to_string(), "conf_app".to_string())],
                        "{pool:?} {region}: {reset}: {got:?}"
                    );
                    let tags: Vec<u8> = got.iter().map(|(t, _)| *t).collect();
                    assert_eq!(tags, b"CSZ", "{pool:?} {region}: {reset}");
                    let shown = simple(&mut s, "SHOW application_name").await;
                    let row = &shown.iter().find(|(t, _)| *t == b'D').expect("a row").1;
                    assert_eq!(&row[6..], b"conf_app", "{pool:?} {region}: after {reset}");
                }
                // On the other server too (a write moves the session to the primary).
                simple(&mut s, "RESET ALL").await;
                let got = simple(&mut s, "CREATE TEMP TABLE reset_t (a int)").await;
                assert!(statuses(&got).is_empty(), "{pool:?} {region}: {got:?}");
                let shown = simple(&mut s, "SELECT current_setting('application_name')").await;
                let row = &shown.iter().find(|(t, _)| *t == b'D').expect("a row").1;
                assert_eq!(&row[6..], b"conf_app", "{pool:?} {region}");
            }
        }
    });
}

/// Found by SQLAlchemy's own suite in transaction mode: psycopg 3 sends `DEALLOCATE ALL` after
/// any DROP or ALTER, which drops every statement of the server connection it runs on, other
/// sessions' shared ones included. pgnear still believed they were there: the next session to
/// use one on that connection got "prepared statement pgnear_… does not exist".
#[test]
fn deallocate_all_on_a_shared_connection_leaves_other_sessions_statements_working() {
    let _serial = serial();
    run(async {
        for region in [PRIMARY, REPLICA] {
            let p = proxy(region, |c| {
                c.pool.mode = PoolMode::Transaction;
                c.pool.primary_size = 1;
                c.pool.replica_size = 1;
            })
            .await;
            let a = connect(&url(&p)).await;
            let b = connect(&url(&p)).await;
            let stmt = a.prepare("SELECT 40 + $1::int").await.unwrap();
            let first: i32 = a.query_one(&stmt, &[&2]).await.unwrap().get(0);
            assert_eq!(first, 42);
            // The other session, on the only connection of each pool, in both protocols.
            b.batch_execute("DEALLOCATE ALL").await.unwrap();
            b.execute("DEALLOCATE ALL", &[]).await.unwrap();
            for _ in 0..3 {
                let again: i32 = a.query_one(&stmt, &[&2]).await.unwrap().get(0);
                assert_eq!(again, 42, "{region}");
            }
            // Its own statements are gone, as on a direct connection.
            let own = b.prepare("SELECT 1").await.unwrap();
            b.batch_execute("DEALLOCATE ALL").await.unwrap();
            let e = b.query(&own, &[]).await.unwrap_err();
            assert_eq!(sqlstate(&e), "26000", "{region}: {e}");
            p.shutdown().await;
        }
    });
}

/// A Parse that fails leaves no statement behind: parsed again once it can succeed, the
/// statement is really prepared (in transaction mode pgnear had recorded the failed one as
/// present and answered the second Parse from a scratch statement).
#[test]
fn a_failed_parse_leaves_no_statement_behind() {
    let _serial = serial();
    run(async {
        on_primary("DROP TABLE IF EXISTS later_table").await;
        for pool in MODES {
            let p = proxy(PRIMARY, |c| {
                c.pool.mode = pool;
                c.pool.primary_size = 1;
            })
            .await;
            let c = connect(&url(&p)).await;
            let sql = "SELECT count(*) FROM later_table";
            let e = c.prepare(sql).await.unwrap_err();
            assert_eq!(sqlstate(&e), "42P01", "{pool:?}: {e}");
            c.batch_execute("CREATE TABLE later_table (a int)")
                .await
                .unwrap();
            let stmt = c.prepare(sql).await.unwrap();
            let n: i64 = c.query_one(&stmt, &[]).await.unwrap().get(0);
            assert_eq!(n, 0, "{pool:?}");
            c.batch_execute("DROP TABLE later_table").await.unwrap();
            p.shutdown().await;
        }
    });
}
