//! The replica dies under read load: reads keep succeeding on the primary (only statements in
//! flight on the dead connection may fail, with 08006), and return to the replica once it is back.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The tests stop servers of the shared cluster: one at a time.

#[derive(Default)]
struct Seen {
    on_replica: Vec<Instant>,
    on_primary: Vec<Instant>,
    errors: Vec<String>,
}

#[test]
fn reads_survive_the_replica_dying_and_come_back_to_it() {
    let _serial = serial();
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let u = url(&p);
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut readers = Vec::new();
        for _ in 0..4 {
            let (u, stop, seen) = (u.clone(), stop.clone(), seen.clone());
            readers.push(tokio::spawn(async move {
                let c = connect(&u).await;
                while !stop.load(Ordering::Relaxed) {
                    let r = c.query_one("SELECT pg_is_in_recovery()", &[]).await;
                    let now = Instant::now();
                    {
                        let mut s = seen.lock().unwrap();
                        match r {
                            Ok(row) if row.get::<_, bool>(0) => s.on_replica.push(now),
                            Ok(_) => s.on_primary.push(now),
                            Err(e) => s.errors.push(sqlstate(&e)),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                assert!(!c.is_closed(), "the session survived");
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let replica = &cluster().replica(REPLICA).unwrap().node;
        let killed = Instant::now();
        replica.kill().await.unwrap();
        eventually("reads on the primary", Duration::from_secs(20), || async {
            seen.lock().unwrap().on_primary.iter().any(|t| *t > killed)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        replica.start().await.unwrap();
        let started = Instant::now();
        eventually(
            "reads back on the replica",
            Duration::from_secs(30),
            || async { seen.lock().unwrap().on_replica.iter().any(|t| *t > started) },
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.await.unwrap();
        }
        let s = std::mem::take(&mut *seen.lock().unwrap());
        let to_primary = s
            .on_primary
            .iter()
            .filter(|t| **t > killed)
            .min()
            .unwrap()
            .duration_since(killed);
        let back = s
            .on_replica
            .iter()
            .filter(|t| **t > started)
            .min()
            .unwrap()
            .duration_since(started);
        eprintln!(
            "failover: reads on the primary {to_primary:?} after the kill, back on the replica {back:?} after restart; {} errors {:?}",
            s.errors.len(),
            s.errors
        );
        assert!(s.errors.iter().all(|e| e == "08006"), "{:?}", s.errors);
        assert!(
            s.errors.len() <= 4,
            "only statements in flight may fail: {:?}",
            s.errors
        );
        p.shutdown().await;
    });
}

#[test]
fn with_the_primary_down_new_clients_read_and_writes_fail_fast() {
    let _serial = serial();
    run(async {
        let direct = on_primary("CREATE TABLE IF NOT EXISTS primary_down (a int)").await;
        drop(direct);
        let p = proxy(REPLICA, |c| {
            c.upstream.connect_timeout = pgnear::config::HumanDuration(Duration::from_secs(1))
        })
        .await;
        let primary = cluster().primary();
        primary.stop().await.unwrap();
        // A new client connects (its first server is the local replica) and reads.
        let c = connect(&url(&p)).await;
        let on_replica: bool = c
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(on_replica);
        // A write fails with 08006 naming the primary; the session goes on.
        let e = c
            .execute("INSERT INTO primary_down VALUES (1)", &[])
            .await
            .unwrap_err();
        let db = e.as_db_error().expect("an error from pgnear");
        assert_eq!(db.code().code(), "08006");
        assert!(
            db.message().contains("primary upstream"),
            "{}",
            db.message()
        );
        let n: i64 = c
            .query_one("SELECT count(*) FROM primary_down", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
        // Once the primary is back, the same session writes.
        primary.start().await.unwrap();
        eventually("a write to succeed", Duration::from_secs(30), || async {
            c.execute("INSERT INTO primary_down VALUES (2)", &[])
                .await
                .is_ok()
        })
        .await;
        p.shutdown().await;
    });
}

#[test]
fn a_silent_partition_ends_a_write_with_08006_instead_of_a_hang() {
    let _serial = serial();
    run(async {
        drop(on_primary("CREATE TABLE IF NOT EXISTS partitioned (a int)").await);
        let p = proxy(REPLICA, |c| {
            c.upstream.connect_timeout = pgnear::config::HumanDuration(Duration::from_millis(500))
        })
        .await;
        let c = connect(&url(&p)).await;
        c.execute("INSERT INTO partitioned VALUES (1)", &[])
            .await
            .unwrap();
        // The path to the primary accepts bytes and delivers none, as a partition does; TCP
        // would wait for many minutes before giving up.
        let relay = &cluster().replica(REPLICA).unwrap().relay;
        relay.partition(true);
        let e = c
            .execute("INSERT INTO partitioned VALUES (2)", &[])
            .await
            .expect_err("the write cannot complete");
        relay.partition(false);
        // The session ends (its state was on the primary): the client reads pgnear's FATAL
        // 08006, or, when pgnear was still waiting for an earlier answer and the client had no
        // request of its own in flight, just the close.
        match e.as_db_error() {
            Some(db) => {
                assert_eq!(db.code().code(), "08006", "{}", db.message());
                assert!(
                    db.message().contains("primary upstream stopped answering"),
                    "{}",
                    db.message()
                );
            }
            None => assert!(c.is_closed(), "{e}"),
        }
        eventually("writes work again", Duration::from_secs(30), || async {
            let Ok((c, conn)) = tokio_postgres::connect(&url(&p), tokio_postgres::NoTls).await
            else {
                return false;
            };
            tokio::spawn(conn);
            c.execute("INSERT INTO partitioned VALUES (3)", &[])
                .await
                .is_ok()
        })
        .await;
        cluster().wait_replicas_caught_up().await.unwrap();
        p.shutdown().await;
    });
}
