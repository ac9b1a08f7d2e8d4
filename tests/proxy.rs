//! The proxy core against real Postgres and real clients: queries in both protocols, pipelining,
//! COPY, cancel, TLS, SCRAM, errors and notices passing through, bad input, limits, shutdown.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[test]
fn simple_and_extended_queries_and_pipelining() {
    run(async {
        let p = proxy(PRIMARY, |_| {}).await;
        let c = connect(&url(&p)).await;
        let rows = c
            .simple_query("SELECT 1 AS one; SELECT 'two'")
            .await
            .unwrap();
        let values: Vec<String> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(values, ["1", "two"]);

        let row = c
            .query_one("SELECT $1::int + 1, $2::text", &[&41i32, &"x"])
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i32>(0), row.get::<_, String>(1)),
            (42, "x".to_string())
        );

        // Prepared once, executed many times.
        let stmt = c.prepare("SELECT $1::bigint * 2").await.unwrap();
        for i in 0..50i64 {
            let r = c.query_one(&stmt, &[&i]).await.unwrap();
            assert_eq!(r.get::<_, i64>(0), i * 2);
        }

        // Pipelining: tokio-postgres sends all of these before reading any answer.
        let params: Vec<i32> = (0..100).collect();
        let c = &c;
        let futures = params
            .iter()
            .map(|i| async move { c.query_one("SELECT $1::int", &[i]).await });
        let results = join_all(futures).await;
        for (i, r) in results.into_iter().enumerate() {
            assert_eq!(r.unwrap().get::<_, i32>(0), i as i32);
        }
        p.shutdown().await;
    });
}

#[test]
fn copy_in_and_out_with_psql() {
    run(async {
        let p = proxy(PRIMARY, |_| {}).await;
        let u = url(&p);
        let (ok, _, err) = psql(
            &u,
            &[
                "-c",
                "DROP TABLE IF EXISTS copy_t; CREATE TABLE copy_t (a int, b text)",
            ],
            None,
        );
        assert!(ok, "{err}");
        let data: String = (0..5000).map(|i| format!("{i}\trow {i}\n")).collect();
        let (ok, out, err) = psql(&u, &["-c", "\\copy copy_t FROM STDIN"], Some(&data));
        assert!(ok && out.contains("COPY 5000"), "{out} {err}");
        let (ok, out, err) = psql(
            &u,
            &["-c", "COPY (SELECT * FROM copy_t ORDER BY a) TO STDOUT"],
            None,
        );
        assert!(ok, "{err}");
        assert_eq!(out, data);
        // A failed COPY FROM leaves nothing behind and the session usable.
        let (ok, _, err) = psql(
            &u,
            &["-c", "\\copy copy_t FROM STDIN"],
            Some("1\tok\nnot-a-number\tx\n"),
        );
        assert!(!ok && err.contains("invalid input syntax"), "{err}");
        let c = connect(&u).await;
        let n: i64 = c
            .query_one("SELECT count(*) FROM copy_t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 5000);
        p.shutdown().await;
    });
}

#[test]
fn cancel_really_cancels() {
    run(async {
        let p = proxy(PRIMARY, |_| {}).await;
        let c = assert_cancel_stops_a_sleep(connect(&url(&p)).await).await;
        // The session goes on.
        let v: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
        assert_eq!(v, 7);
        p.shutdown().await;
    });
}

#[test]
fn scram_and_wrong_password() {
    run(async {
        let p = proxy(PRIMARY, |_| {}).await;
        assert_eq!(
            config(PRIMARY, |_| {}).auth_method(),
            pgnear::config::AuthMethod::ScramSha256
        );
        let ok = tokio_postgres::connect(&url(&p), tokio_postgres::NoTls).await;
        assert!(ok.is_ok());
        let bad =
            tokio_postgres::connect(&url_with(&p, "app", "wrong", ""), tokio_postgres::NoTls).await;
        assert_eq!(
            sqlstate(&bad.err().expect("wrong password refused")),
            "28P01"
        );
        let other_user = tokio_postgres::connect(
            &url_with(&p, "mallory", "secret", ""),
            tokio_postgres::NoTls,
        )
        .await;
        // Another role is never served as the URL's (see tests/identity.rs).
        assert_eq!(
            sqlstate(&other_user.err().expect("another user refused")),
            "28000"
        );
        // md5 as well, with psql (libpq).
        let p2 = proxy(PRIMARY, |c| {
            c.auth.method = Some(pgnear::config::AuthMethod::Md5)
        })
        .await;
        let (ok, out, err) = psql(&url(&p2), &["-tAc", "SELECT current_user"], None);
        assert!(ok && out.trim() == "app", "{out} {err}");
        let (ok, _, err) = psql(&url_with(&p2, "app", "nope", ""), &["-c", "SELECT 1"], None);
        assert!(
            !ok && err.contains("password authentication failed"),
            "{err}"
        );
        p.shutdown().await;
        p2.shutdown().await;
    });
}

#[test]
fn tls_from_a_client_with_sslmode_require() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
        let p = proxy(PRIMARY, |c| {
            c.tls.cert = cert_path.display().to_string();
            c.tls.key = key_path.display().to_string();
        })
        .await;
        let u = url(&p).replace("sslmode=disable", "sslmode=require");
        let (ok, out, err) = psql(&u, &["-c", "\\conninfo", "-tAc", "SELECT 40 + 2"], None);
        assert!(ok, "{err}");
        assert!(out.contains("SSL connection (protocol: TLSv1.3"), "{out}");
        assert!(out.contains("42"), "{out}");
        // Without a certificate configured, sslmode=require is refused ('N'), prefer falls back.
        let plain = proxy(PRIMARY, |_| {}).await;
        let (ok, _, err) = psql(
            &url(&plain).replace("sslmode=disable", "sslmode=require"),
            &["-c", "SELECT 1"],
            None,
        );
        assert!(!ok && err.contains("does not support SSL"), "{err}");
        let (ok, _, err) = psql(
            &url(&plain).replace("sslmode=disable", "sslmode=prefer"),
            &["-c", "SELECT 1"],
            None,
        );
        assert!(ok, "{err}");
        p.shutdown().await;
        plain.shutdown().await;
    });
}

#[test]
fn errors_and_notices_pass_through() {
    run(async {
        let p = proxy(PRIMARY, |_| {}).await;
        let c = connect(&url(&p)).await;
        let e = c.query_one("SELECT 1/0", &[]).await.unwrap_err();
        let db = e.as_db_error().expect("a server error");
        assert_eq!(
            (db.code().code(), db.message()),
            ("22012", "division by zero")
        );
        // The session stays usable after an error in the extended protocol.
        let v: i32 = c.query_one("SELECT 3", &[]).await.unwrap().get(0);
        assert_eq!(v, 3);
        let (ok, _, err) = psql(
            &url(&p),
            &[
                "-c",
                "DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$",
            ],
            None,
        );
        assert!(ok && err.contains("NOTICE:  hello from plpgsql"), "{err}");
        p.shutdown().await;
    });
}

#[test]
fn a_client_vanishing_mid_query_frees_its_server_connection() {
    run(async {
        let p = proxy(PRIMARY, |_| {}).await;
        let admin = primary_admin().await;
        let u = format!("{}&application_name=vanisher", url(&p));
        let (client, conn) = tokio_postgres::connect(&u, tokio_postgres::NoTls)
            .await
            .unwrap();
        let conn_task = tokio::spawn(conn);
        let q =
            tokio::spawn(
                async move { client.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) },
            );
        let count = || async {
            admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'vanisher'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        };
        eventually("the query to start", Duration::from_secs(10), || async {
            count().await == 1
        })
        .await;
        conn_task.abort();
        q.abort();
        // pgnear cancels the abandoned query and closes the server connection.
        eventually(
            "the server connection to go away",
            Duration::from_secs(20),
            || async { count().await == 0 },
        )
        .await;
        p.shutdown().await;
    });
}

async fn raw_exchange(p: &pgnear::Proxy, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    out
}

/// The SQLSTATE of the first ErrorResponse in `bytes` (after an optional 'N' byte).
fn first_error_code(bytes: &[u8]) -> Option<String> {
    error_codes(&backend_frames(bytes)).into_iter().next()
}

#[test]
fn bad_input_gets_08p01_or_a_close_never_a_hang() {
    run(async {
        let p = proxy(PRIMARY, |c| {
            c.proxy.startup_timeout = pgnear::config::HumanDuration(Duration::from_millis(500))
        })
        .await;
        // An unreadable startup packet: closed without a word, as by Postgres.
        for (name, bytes) in [
            ("length 0", vec![0, 0, 0, 0]),
            ("length 3", vec![0, 0, 0, 3, 1, 2, 3]),
            ("length 2^31-1", vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]),
        ] {
            let out = raw_exchange(&p, &bytes).await;
            assert!(out.is_empty(), "{name}: {out:?}");
        }
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("no user", startup_packet(&[("database", "app")], 196608)),
            ("protocol 2.0", startup_packet(&[("user", "app")], 2 << 16)),
            ("protocol 4.0", startup_packet(&[("user", "app")], 4 << 16)),
            ("unterminated", {
                let mut b = startup_packet(&[("user", "app")], 196608);
                let n = b.len();
                b[n - 1] = b'x';
                b
            }),
            ("SSLRequest twice", {
                let ssl = [0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
                [ssl, ssl].concat()
            }),
        ];
        for (name, bytes) in cases {
            let out = raw_exchange(&p, &bytes).await;
            assert_eq!(
                first_error_code(&out).as_deref(),
                Some("08P01"),
                "{name}: {out:?}"
            );
        }
        // Random bytes: an error or a close, and pgnear keeps serving.
        let mut seed = 0x2545f4914f6cdd1du64;
        for _ in 0..50 {
            let junk: Vec<u8> = (0..64)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let out = raw_exchange(&p, &junk).await;
            if !out.is_empty() {
                assert!(first_error_code(&out).is_some(), "{out:?}");
            }
        }
        // A client that never finishes its startup packet is dropped after startup_timeout,
        // without a word (as by Postgres).
        let out = raw_exchange(&p, &[0, 0]).await;
        assert!(out.is_empty(), "{out:?}");
        // Oversized message after startup.
        let small = proxy(PRIMARY, |c| c.proxy.max_message_size = 4096).await;
        let c = connect(&url(&small)).await;
        let big = "x".repeat(10_000);
        let e = c
            .simple_query(&format!("SELECT '{big}'"))
            .await
            .unwrap_err();
        assert!(e.is_closed() || sqlstate(&e) == "08P01", "{e}");
        // Still serving.
        let c = connect(&url(&p)).await;
        assert_eq!(
            c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
            1
        );
        p.shutdown().await;
        small.shutdown().await;
    });
}

#[test]
fn connection_limit_gives_53300() {
    run(async {
        let p = proxy(PRIMARY, |c| c.proxy.max_client_connections = 2).await;
        let a = connect(&url(&p)).await;
        let b = connect(&url(&p)).await;
        let third = tokio_postgres::connect(&url(&p), tokio_postgres::NoTls).await;
        assert_eq!(
            sqlstate(&third.err().expect("third client refused")),
            "53300"
        );
        // Refused before TLS and authentication: an SSLRequest is answered with the refusal
        // itself (no 'S' or 'N'), a startup packet with the refusal (no authentication request).
        let o = cluster().options();
        let mut ssl_request = 8u32.to_be_bytes().to_vec();
        ssl_request.extend_from_slice(&80877103u32.to_be_bytes());
        let startup = startup_packet(&[("user", &o.app_user), ("database", &o.database)], 196608);
        for packet in [ssl_request, startup] {
            use tokio::io::AsyncWriteExt;
            let mut s = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
            s.write_all(&packet).await.unwrap();
            let frames = frames_until(&mut s, b'E').await;
            assert_eq!(frames.len(), 1, "the first answer is the refusal");
            assert!(
                String::from_utf8_lossy(&frames[0].1).contains("C53300\0"),
                "{:?}",
                String::from_utf8_lossy(&frames[0].1)
            );
        }
        // A cancel request still gets through at the limit.
        let a = assert_cancel_stops_a_sleep(a).await;
        drop(a);
        // A slot frees up once a client leaves.
        eventually("a free slot", Duration::from_secs(10), || async {
            tokio_postgres::connect(&url(&p), tokio_postgres::NoTls)
                .await
                .is_ok()
        })
        .await;
        drop(b);
        p.shutdown().await;
    });
}

#[test]
fn shutdown_lets_transactions_finish_then_sends_57p01() {
    run(async {
        let p = proxy(PRIMARY, |c| {
            c.proxy.shutdown_grace = pgnear::config::HumanDuration(Duration::from_secs(10))
        })
        .await;
        let c = connect(&url(&p)).await;
        c.batch_execute("CREATE TABLE IF NOT EXISTS shutdown_t (a int); BEGIN; INSERT INTO shutdown_t VALUES (1)")
            .await
            .unwrap();
        let idle = connect(&url(&p)).await;
        let stopping = tokio::spawn(p.shutdown());
        // The idle client is told at once.
        eventually(
            "the idle client to be closed",
            Duration::from_secs(10),
            || async { idle.is_closed() },
        )
        .await;
        // The open transaction can still commit.
        c.batch_execute("INSERT INTO shutdown_t VALUES (2); COMMIT")
            .await
            .unwrap();
        eventually(
            "the busy client to be closed",
            Duration::from_secs(10),
            || async { c.is_closed() },
        )
        .await;
        stopping.await.unwrap();
        let direct = connect(&cluster().primary_url_from(PRIMARY)).await;
        let n: i64 = direct
            .query_one("SELECT count(*) FROM shutdown_t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 2);
    });
}
