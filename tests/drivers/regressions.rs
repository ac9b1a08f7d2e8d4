//! What the drivers found broken in pgnear, each reduced to the protocol exchange that broke.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::common::*;

/// The text of the first column of the first DataRow.
fn first_text(frames: &[(u8, Vec<u8>)]) -> Option<String> {
    let (_, body) = frames.iter().find(|(t, _)| *t == b'D')?;
    let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
    (len >= 0).then(|| String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned())
}

fn error_of(frames: &[(u8, Vec<u8>)]) -> Option<String> {
    frames
        .iter()
        .find(|(t, _)| *t == b'E')
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
}

fn cstrings(parts: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p.as_bytes());
        v.push(0);
    }
    v
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = cstrings(&[name, sql]);
    body.extend_from_slice(&0u16.to_be_bytes());
    frame(b'P', &body)
}

fn describe_statement(name: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    body.extend(cstrings(&[name]));
    frame(b'D', &body)
}

/// Bind (unnamed portal, no parameters, text results), Execute, Sync.
fn bind_execute_sync(statement: &str) -> Vec<u8> {
    let mut body = cstrings(&["", statement]);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut out = frame(b'B', &body);
    out.extend(frame(b'E', &[0, 0, 0, 0, 0]));
    out.extend(frame(b'S', &[]));
    out
}

/// asyncpg prepares every statement with Parse, Describe and Flush (no Sync), and runs it with
/// Bind, Execute and Sync. pgnear sent the prepare to the replica and then kept the whole
/// exchange there, so every first-time asyncpg write (INSERT … RETURNING, `execute` with
/// arguments) failed with 25006 in a replica region.
#[test]
fn a_statement_prepared_with_flush_runs_where_it_belongs() {
    run(async {
        on_primary("CREATE TABLE IF NOT EXISTS flush_prepared (a int)").await;
        let p = proxy(REPLICA, |c| {
            c.auth.method = Some(pgnear::config::AuthMethod::Trust)
        })
        .await;
        let mut s = raw_session(&p).await;
        for round in 0..3 {
            // A write: prepared on the replica, run on the primary.
            let name = format!("w{round}");
            let mut msg = parse(
                &name,
                "INSERT INTO flush_prepared VALUES (1) RETURNING pg_is_in_recovery()",
            );
            msg.extend(describe_statement(&name));
            msg.extend(frame(b'H', &[]));
            s.write_all(&msg).await.unwrap();
            let prepared = frames_until(&mut s, b'T').await;
            assert_eq!(error_of(&prepared), None);
            s.write_all(&bind_execute_sync(&name)).await.unwrap();
            let ran = frames_until(&mut s, b'Z').await;
            assert_eq!(error_of(&ran), None, "round {round}");
            assert_eq!(
                first_text(&ran).as_deref(),
                Some("f"),
                "the write ran on the primary"
            );
            // A read, the same way, stays on the replica.
            let name = format!("r{round}");
            let mut msg = parse(&name, "SELECT pg_is_in_recovery()");
            msg.extend(describe_statement(&name));
            msg.extend(frame(b'H', &[]));
            s.write_all(&msg).await.unwrap();
            frames_until(&mut s, b'T').await;
            s.write_all(&bind_execute_sync(&name)).await.unwrap();
            let ran = frames_until(&mut s, b'Z').await;
            assert_eq!(
                first_text(&ran).as_deref(),
                Some("t"),
                "the read ran on the replica"
            );
        }
        // A simple query after such a prepare (asyncpg's copy_records_to_table prepares a
        // SELECT of the table, then sends its COPY as a Query) runs where it belongs too.
        let mut msg = parse("intro", "SELECT a FROM flush_prepared LIMIT 1");
        msg.extend(describe_statement("intro"));
        msg.extend(frame(b'H', &[]));
        s.write_all(&msg).await.unwrap();
        frames_until(&mut s, b'T').await;
        s.write_all(&frame(
            b'Q',
            b"INSERT INTO flush_prepared VALUES (3) RETURNING pg_is_in_recovery()\0",
        ))
        .await
        .unwrap();
        let r = frames_until(&mut s, b'Z').await;
        assert_eq!(error_of(&r), None);
        assert_eq!(
            first_text(&r).as_deref(),
            Some("f"),
            "the Query ran on the primary"
        );
        // A prepare that fails: the client's Sync ends it on the server that reported it.
        let mut msg = parse("bad", "SELEC 1");
        msg.extend(describe_statement("bad"));
        msg.extend(frame(b'H', &[]));
        s.write_all(&msg).await.unwrap();
        let failed = frames_until(&mut s, b'E').await;
        assert!(error_of(&failed).unwrap().contains("42601"));
        s.write_all(&frame(b'S', &[])).await.unwrap();
        let tags: Vec<u8> = frames_until(&mut s, b'Z')
            .await
            .iter()
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(tags, vec![b'Z']);
        // Both servers are in step: simple queries on each still answer.
        s.write_all(&frame(b'Q', b"SELECT pg_is_in_recovery()\0"))
            .await
            .unwrap();
        let r = frames_until(&mut s, b'Z').await;
        assert_eq!(first_text(&r).as_deref(), Some("t"));
        s.write_all(&frame(
            b'Q',
            b"INSERT INTO flush_prepared VALUES (2) RETURNING pg_is_in_recovery()\0",
        ))
        .await
        .unwrap();
        let r = frames_until(&mut s, b'Z').await;
        assert_eq!(first_text(&r).as_deref(), Some("f"));
        drop(s);
        p.shutdown().await;
    });
}

/// pgjdbc runs `SET extra_float_digits = 3` (and `SET application_name`) through the extended
/// protocol right after connecting. pgnear pinned every session that changed state that way to
/// the primary for good, so no pgjdbc read ever reached the replica (nor any asyncpg read after
/// `add_listener`, which LISTENs through the extended protocol). A session SET/RESET is now
/// replayed on the other server as a simple-query one is, a failed one is not, and LISTEN and
/// the like pin until released.
#[test]
fn session_state_through_the_extended_protocol_is_tracked_not_pinned() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let c = connect(&url(&p)).await;
        c.execute("SET extra_float_digits = 3", &[]).await.unwrap();
        c.execute("SET application_name = 'extended'", &[])
            .await
            .unwrap();
        let e = c
            .execute("SET extra_float_digits = 'lots'", &[])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22023", "{e}");
        let q = "SELECT pg_is_in_recovery(), current_setting('extra_float_digits'), \
                 current_setting('application_name')";
        let row = c.query_one(q, &[]).await.unwrap();
        let got: (bool, String, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(got, (true, "3".into(), "extended".into()), "on the replica");
        // The primary joins now: it gets the SETs replayed (not the failed one).
        let row = c
            .query_one(&format!("/* pgnear:primary */ {q}"), &[])
            .await
            .unwrap();
        let got: (bool, String, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(
            got,
            (false, "3".into(), "extended".into()),
            "on the primary"
        );
        c.execute("RESET application_name", &[]).await.unwrap();
        let row = c
            .query_one(
                "SELECT pg_is_in_recovery(), current_setting('application_name')",
                &[],
            )
            .await
            .unwrap();
        assert!(row.get::<_, bool>(0), "still not pinned");
        let name: String = row.get(1);
        assert_eq!(name, "", "RESET reached the replica");
        let row = c
            .query_one(
                "/* pgnear:primary */ SELECT current_setting('application_name')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "", "RESET reached the primary");
        // LISTEN through the extended protocol (asyncpg's add_listener) pins the session like a
        // simple-query LISTEN, and UNLISTEN * releases it, instead of pinning it for good.
        let replica = "SELECT pg_is_in_recovery()";
        c.execute("LISTEN extended", &[]).await.unwrap();
        assert!(!c.query_one(replica, &[]).await.unwrap().get::<_, bool>(0));
        c.execute("UNLISTEN *", &[]).await.unwrap();
        assert!(c.query_one(replica, &[]).await.unwrap().get::<_, bool>(0));
        p.shutdown().await;
    });
}

/// libpq 17+ (psycopg's `cancel_safe`, psql's Ctrl-C) sends a CancelRequest over TLS and waits
/// for the server to close. pgnear dropped the TLS stream without close_notify, which OpenSSL
/// reports as "unexpected eof": the client was told its cancel failed.
#[test]
fn a_cancel_request_over_tls_ends_with_close_notify() {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let lab = super::lab();
    run(async {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&lab.ca_path).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut tcp = TcpStream::connect(lab.addr).await.unwrap();
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .unwrap();
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"S");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        // A key pgnear never issued: ignored, and the connection still closes cleanly.
        tls.write_all(&[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0, 0, 2])
            .await
            .unwrap();
        let mut rest = Vec::new();
        let read = tls.read_to_end(&mut rest).await;
        assert!(read.is_ok(), "pgnear closed without close_notify: {read:?}");
        assert!(rest.is_empty());
    });
}
