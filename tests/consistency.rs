//! Read-your-writes against the lab: replay paused and resumed on the replica, eventual mode,
//! causal tokens between sessions, a concurrent checker across simulated distance, and the
//! commit-position lookup never disturbing the client.

mod common;

use std::time::Duration;

use common::*;
use pgnear::config::{ConsistencyMode, HumanDuration, OnTimeout, PoolMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;

async fn setup_table(name: &str) {
    on_primary(&format!(
        "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int PRIMARY KEY, v int)"
    ))
    .await;
}

/// (served by the replica, rows matching id)
async fn read_back(c: &Client, table: &str, id: i32) -> (bool, i64) {
    let row = c
        .query_one(
            &format!("SELECT pg_is_in_recovery(), count(*) FROM {table} WHERE id = $1"),
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn paused_replay_waits_then_falls_back_resumes_or_errors() {
    let _serial = serial();
    run(async {
        setup_table("ryw").await;
        let admin = replica_admin().await;
        let short = |c: &mut pgnear::config::Config| {
            c.consistency.wait_timeout = HumanDuration(Duration::from_millis(300))
        };
        let p = proxy(REPLICA, short).await;
        let c = connect(&url(&p)).await;

        // Nothing written yet: reads use the replica.
        assert_eq!(read_back(&c, "ryw", 0).await, (true, 0));
        assert_eq!(
            first_value(&c.simple_query("SHOW pgnear.write_lsn").await.unwrap()).unwrap(),
            ""
        );

        // Replay paused: the read waits, times out, and reads its write on the primary.
        admin
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .unwrap();
        c.execute("INSERT INTO ryw VALUES (1, 1)", &[])
            .await
            .unwrap();
        let token = first_value(&c.simple_query("SHOW pgnear.write_lsn").await.unwrap()).unwrap();
        assert!(token.contains('/'), "a write LSN after a write: {token:?}");
        assert_eq!(read_back(&c, "ryw", 1).await, (false, 1));

        // Eventual mode does not wait: it reads the (stale) replica.
        let eventual = proxy(REPLICA, |c| c.consistency.mode = ConsistencyMode::Eventual).await;
        let e = connect(&url(&eventual)).await;
        e.execute("INSERT INTO ryw VALUES (2, 2)", &[])
            .await
            .unwrap();
        assert_eq!(
            read_back(&e, "ryw", 2).await,
            (true, 0),
            "eventual reads do not wait"
        );

        // Another session carrying the token waits too; with on_timeout = error it gets 40001.
        let strict = proxy(REPLICA, |c| {
            short(c);
            c.consistency.on_timeout = OnTimeout::Error;
        })
        .await;
        let other = connect(&url(&strict)).await;
        other
            .batch_execute(&format!("SET pgnear.min_lsn = '{token}'"))
            .await
            .unwrap();
        let err = other
            .query_one("SELECT count(*) FROM ryw", &[])
            .await
            .unwrap_err();
        let db = err.as_db_error().expect("a 40001 error");
        assert_eq!(db.code().code(), "40001");
        assert!(
            db.detail().unwrap_or("").contains(&token),
            "{:?}",
            db.detail()
        );
        assert!(other
            .batch_execute("SET pgnear.min_lsn = 'not-an-lsn'")
            .await
            .is_err());

        // Resume during the wait: the read is served by the replica and sees the write.
        let patient = proxy(REPLICA, |c| {
            c.consistency.wait_timeout = HumanDuration(Duration::from_secs(20))
        })
        .await;
        let pc = connect(&url(&patient)).await;
        pc.execute("INSERT INTO ryw VALUES (3, 3)", &[])
            .await
            .unwrap();
        let resume = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            admin
                .batch_execute("SELECT pg_wal_replay_resume()")
                .await
                .unwrap();
        });
        assert_eq!(
            read_back(&pc, "ryw", 3).await,
            (true, 1),
            "waited for the replica"
        );
        resume.await.unwrap();
        // The token session is satisfied now as well.
        assert_eq!(read_back(&other, "ryw", 1).await, (true, 1));
        for p in [p, eventual, strict, patient] {
            p.shutdown().await;
        }
    });
}

#[test]
fn concurrent_write_then_read_across_distance_is_never_stale() {
    let _serial = serial();
    run(async {
        setup_table("checker").await;
        let relay = &cluster().replica(REPLICA).unwrap().relay;
        relay.set_delay(Duration::from_millis(10));
        // Transaction pooling: 32 sessions share 8 + 8 server connections, and each still
        // reads its own writes.
        let p = proxy(REPLICA, |c| {
            c.pool.mode = PoolMode::Transaction;
            c.pool.primary_size = 8;
            c.pool.replica_size = 8;
        })
        .await;
        let u = url(&p);
        let sessions = 32;
        let pairs = 500;
        let mut tasks = Vec::new();
        for s in 0..sessions {
            let u = u.clone();
            tasks.push(tokio::spawn(async move {
                let c = connect(&u).await;
                c.execute("INSERT INTO checker VALUES ($1, 0)", &[&s])
                    .await
                    .unwrap();
                let write = c
                    .prepare("UPDATE checker SET v = $2 WHERE id = $1")
                    .await
                    .unwrap();
                let read = c
                    .prepare("SELECT v, pg_is_in_recovery() FROM checker WHERE id = $1")
                    .await
                    .unwrap();
                let (mut stale, mut on_replica) = (0, 0);
                for i in 1..=pairs {
                    c.execute(&write, &[&s, &i]).await.unwrap();
                    let row = c.query_one(&read, &[&s]).await.unwrap();
                    stale += usize::from(row.get::<_, i32>(0) != i);
                    on_replica += usize::from(row.get::<_, bool>(1));
                }
                (stale, on_replica)
            }));
        }
        let (mut stale, mut on_replica) = (0, 0);
        for t in tasks {
            let (s, r) = t.await.unwrap();
            stale += s;
            on_replica += r;
        }
        relay.set_delay(Duration::ZERO);
        let total = (sessions * pairs) as usize;
        eprintln!("checker: {total} write-then-read pairs, {stale} stale, {on_replica} reads served by the replica");
        assert_eq!(stale, 0, "stale reads out of {total}");
        // Reads go to the replica unless it could not catch up within wait_timeout.
        assert!(
            on_replica * 10 >= total * 9,
            "only {on_replica} of {total} reads on the replica"
        );
        p.shutdown().await;
    });
}

#[test]
fn failed_lookup_and_pipelining_leave_the_client_undisturbed() {
    let _serial = serial();
    run(async {
        setup_table("piped").await;
        let p = proxy(REPLICA, |_| {}).await;
        let c = connect(&url(&p)).await;
        // The lookup behind this COMMIT runs in an aborted transaction and fails (25P02):
        // the client only sees its own error, and the session carries on.
        let e = c
            .batch_execute("BEGIN; SELECT 1/0; COMMIT")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22012");
        c.batch_execute("ROLLBACK").await.unwrap();
        c.execute("INSERT INTO piped VALUES (0, 0)", &[])
            .await
            .unwrap();
        assert_eq!(read_back(&c, "piped", 0).await.1, 1);

        // Pipelined writes and reads: every answer, in order, each read seeing its own write.
        let c = &c;
        let futures = (1..=60).map(|i| async move {
            c.execute("INSERT INTO piped VALUES ($1, $1)", &[&i])
                .await
                .unwrap();
            c.query_one("SELECT v FROM piped WHERE id = $1", &[&i])
                .await
                .unwrap()
                .get::<_, i32>(0)
        });
        let got = join_all(futures).await;
        assert_eq!(got, (1..=60).collect::<Vec<i32>>());
        p.shutdown().await;
    });
}

#[test]
fn write_lsn_is_reported_as_parameter_status() {
    let _serial = serial();
    run(async {
        setup_table("reported").await;
        let p = proxy(REPLICA, |c| {
            c.auth.method = Some(pgnear::config::AuthMethod::Trust)
        })
        .await;
        let mut s = raw_session(&p).await;
        let mut buf = Vec::new();
        let query = b"INSERT INTO reported VALUES (1, 1)\0";
        let mut q = vec![b'Q'];
        q.extend_from_slice(&((query.len() + 4) as u32).to_be_bytes());
        q.extend_from_slice(query);
        s.write_all(&q).await.unwrap();
        // The report may follow the ReadyForQuery: read until it shows up.
        buf.clear();
        let needle = b"pgnear.write_lsn\0";
        tokio::time::timeout(Duration::from_secs(10), async {
            while !buf.windows(needle.len()).any(|w| w == needle) {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("ParameterStatus pgnear.write_lsn");
        let at = buf.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len();
        let end = at + buf[at..].iter().position(|&b| b == 0).unwrap();
        let lsn: pgnear::lsn::Lsn = std::str::from_utf8(&buf[at..end]).unwrap().parse().unwrap();
        assert!(lsn.0 > 0);
        p.shutdown().await;
    });
}

/// Found by tests/chaos.rs: a read sent right behind the Sync that ends the session's own
/// extended-protocol `COPY ... FROM STDIN`, before the COPY's ReadyForQuery came back, went to
/// the replica without waiting for the COPY's commit position (asked for only after that
/// ReadyForQuery): with replay paused it read the replica without the copied row.
#[test]
fn a_read_right_behind_a_copy_waits_for_it() {
    let _serial = serial();
    run(async {
        setup_table("ryw_copy").await;
        let admin = replica_admin().await;
        let p = proxy(REPLICA, |c| {
            c.auth.method = Some(pgnear::config::AuthMethod::Trust)
        })
        .await;
        let mut s = raw_session(&p).await;
        admin
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .unwrap();
        let mut copy = frame(b'P', b"\0COPY ryw_copy (id) FROM STDIN\0\0\0");
        copy.extend(frame(b'B', b"\0\0\0\0\0\0\0\0"));
        copy.extend(frame(b'E', b"\0\0\0\0\0"));
        copy.extend(frame(b'S', b""));
        s.write_all(&copy).await.unwrap();
        assert_eq!(read_until(&mut s, b'G').await, b"12G");
        let mut rest = frame(b'd', b"1\n");
        rest.extend(frame(b'c', b""));
        rest.extend(frame(b'S', b""));
        rest.extend(frame(
            b'Q',
            b"SELECT pg_is_in_recovery(), count(*) FROM ryw_copy\0",
        ));
        s.write_all(&rest).await.unwrap();
        assert_eq!(read_until(&mut s, b'Z').await, b"CZ");
        let rows: Vec<String> = frames_until(&mut s, b'Z')
            .await
            .into_iter()
            .filter(|(t, _)| *t == b'D')
            .map(|(_, body)| String::from_utf8_lossy(&body[2..]).into_owned())
            .collect();
        admin
            .batch_execute("SELECT pg_wal_replay_resume()")
            .await
            .unwrap();
        // One row: (false, 1) from the primary after the wait, never (true, 0) from the replica.
        assert_eq!(rows, ["\0\0\0\u{1}f\0\0\0\u{1}1"], "{rows:?}");
        p.shutdown().await;
    });
}
