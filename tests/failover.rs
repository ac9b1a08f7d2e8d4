//! The replica dies under read load: reads keep succeeding on the primary (only statements in
//! flight on the dead connection may fail, with 08006), and return to the replica once it is back.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

#[derive(Default)]
struct Seen {
    on_replica: Vec<Instant>,
    on_primary: Vec<Instant>,
    errors: Vec<String>,
}

#[test]
fn reads_survive_the_replica_dying_and_come_back_to_it() {
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
