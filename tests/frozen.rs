//! Frozen servers: every process of a lab Postgres stopped with SIGSTOP, the way a paused VM or
//! a wedged host looks. Sockets stay open and nothing comes back. A read in flight on a frozen
//! replica is answered by the primary, `/readyz` and `/status` say the replica is down (lag
//! unknown), and reads return to the replica once it is thawed; a write in flight on a frozen
//! primary gets 08006.
//!
//! No assertion holds a wall-clock threshold (machines are noisy): the times are measured and
//! printed (`cargo test --test frozen -- --nocapture`), the assertions are on behaviour.

mod common;

use std::time::{Duration, Instant};

use common::frozen::Frozen;
use common::*;

/// Longest any client operation may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(60);

/// pgnear in the replica region, with the default timeouts; and its `connect_timeout`.
async fn start() -> (pgnear::Proxy, Duration) {
    let c = config(REPLICA, |_| {});
    let connect_timeout = c.upstream.connect_timeout.0;
    let p = pgnear::Proxy::start(c).await.expect("starting pgnear");
    (p, connect_timeout)
}

/// A read's answer, and when it came, measured from `since`.
async fn timed(
    since: Instant,
    read: impl std::future::Future<Output = Result<&'static str, tokio_postgres::Error>>,
) -> (&'static str, Duration) {
    let by = tokio::time::timeout(HANG, read)
        .await
        .expect("a read on the frozen replica hung")
        .expect("the read is answered, not failed");
    (by, since.elapsed())
}

const RETRIED: &str = "pgnear_statements_total{reason=\"retry\",route=\"primary\"}";
const FALLBACK: &str = "pgnear_statements_total{reason=\"fallback\",route=\"primary\"}";

#[test]
fn a_read_in_flight_on_a_frozen_replica_is_answered_by_the_primary() {
    let _serial = serial();
    run(async {
        let (p, connect_timeout) = start().await;
        let u = url(&p);
        // The same in transaction mode, where autocommit reads share pipelined replica
        // connections.
        let shared = pgnear::Proxy::start(config(REPLICA, |c| {
            c.pool.mode = pgnear::config::PoolMode::Transaction;
            c.pool.pipeline = 2;
        }))
        .await
        .expect("starting pgnear");
        let shared_url = url(&shared);
        // Sessions holding a replica connection, as a running app's pool does.
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(connect(&u).await);
        }
        let lane = connect(&shared_url).await;
        for c in &clients {
            assert_eq!(answered_by(c).await.unwrap(), "replica");
        }
        assert_eq!(answered_by_extended(&clients[2]).await.unwrap(), "replica");
        assert_eq!(answered_by(&lane).await.unwrap(), "replica");
        assert_eq!(answered_by_extended(&lane).await.unwrap(), "replica");
        let (status, body) = http_get(p.admin_addr(), "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("replica and primary up"), "{body}");

        let frozen = Frozen::freeze(&cluster().replica(REPLICA).unwrap().node);
        let t_freeze = Instant::now();
        // Reads sent right after the freeze, on sessions whose replica connection is now
        // frozen, in the simple and the extended protocol, on a session's own connection and
        // on a shared one: each is answered, by the primary, none with an error.
        let (simple, extended, lane_simple) = tokio::join!(
            timed(t_freeze, answered_by(&clients[0])),
            timed(t_freeze, answered_by_extended(&clients[2])),
            timed(t_freeze, answered_by(&lane)),
        );
        let first_read = simple.1;
        assert_eq!(simple.0, "primary");
        assert_eq!(extended.0, "primary");
        assert_eq!(lane_simple.0, "primary");
        // They ran again on the primary (the replica's watcher did not yet know when they
        // were sent).
        assert!(metric(&p, RETRIED).await >= 2.0);
        // (The shared lane's read is routed after a hop through its own session: on a loaded
        // machine the watcher may have seen the freeze by then, and it goes to the primary at
        // once.)
        assert!(metric(&shared, RETRIED).await + metric(&shared, FALLBACK).await >= 1.0);

        // pgnear says the replica is down, its lag unknown.
        let (status, body) = http_get(p.admin_addr(), "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("the replica is down"), "{body}");
        let s = upstream_status(&p, "replica").await;
        assert_eq!(s["up"], false, "{s}");
        assert!(
            s["lag_bytes"].is_null() && s["lag_seconds"].is_null(),
            "{s}"
        );
        assert_eq!(
            metric(&p, "pgnear_upstream_up{upstream=\"replica\"}").await,
            0.0
        );
        let (_, metrics) = http_get(p.admin_addr(), "/metrics").await;
        assert!(
            metrics.contains("pgnear_replica_lag_seconds NaN"),
            "lag is unknown in the metrics"
        );
        // Another session's read goes to the primary at once, and so does a new session's.
        let t = Instant::now();
        assert_eq!(answered_by(&clients[1]).await.unwrap(), "primary");
        let other_read = t.elapsed();
        let t = Instant::now();
        let fresh = connect(&u).await;
        assert_eq!(answered_by(&fresh).await.unwrap(), "primary");
        let new_session_read = t.elapsed();

        // Thawed: reads are back on the replica after the watcher's next good poll.
        frozen.thaw();
        let t_thaw = Instant::now();
        eventually("reads back on the replica", HANG, || async {
            answered_by(&fresh).await.unwrap() == "replica"
        })
        .await;
        let back = t_thaw.elapsed();
        for c in &clients {
            assert_eq!(answered_by(c).await.unwrap(), "replica");
        }
        assert_eq!(answered_by_extended(&clients[2]).await.unwrap(), "replica");
        eventually("shared reads back on the replica", HANG, || async {
            answered_by_extended(&lane).await.unwrap() == "replica"
        })
        .await;
        assert_eq!(upstream_status(&p, "replica").await["up"], true);
        eprintln!(
            "frozen replica (connect_timeout {connect_timeout:?}): read in flight answered by the primary {first_read:?} after the freeze \
             (extended protocol {:?}, shared connection {:?}); \
             the next read of another session {other_read:?}, a new session's first read {new_session_read:?}; \
             reads back on the replica {back:?} after the thaw",
            extended.1, lane_simple.1
        );
        shared.shutdown().await;
        p.shutdown().await;
    });
}

#[test]
fn a_write_in_flight_on_a_frozen_primary_gets_08006() {
    let _serial = serial();
    run(async {
        on_primary("CREATE TABLE IF NOT EXISTS frozen_writes (a int)").await;
        let (p, connect_timeout) = start().await;
        let u = url(&p);
        let writer = connect(&u).await;
        writer
            .batch_execute("INSERT INTO frozen_writes VALUES (1)")
            .await
            .unwrap();
        let reader = connect(&u).await;
        assert_eq!(answered_by(&reader).await.unwrap(), "replica");

        let frozen = Frozen::freeze(cluster().primary());
        let t_freeze = Instant::now();
        let e = tokio::time::timeout(
            HANG,
            writer.batch_execute("INSERT INTO frozen_writes VALUES (2)"),
        )
        .await
        .expect("a write on the frozen primary hung")
        .expect_err("the primary is frozen");
        let failed_after = t_freeze.elapsed();
        assert_eq!(sqlstate(&e), "08006", "{e}");
        let message = e.as_db_error().map_or("", |d| d.message());
        assert!(message.contains("primary"), "{message}");
        // Reads are not affected.
        let t = Instant::now();
        assert_eq!(answered_by(&reader).await.unwrap(), "replica");
        let read = t.elapsed();
        let (status, body) = http_get(p.admin_addr(), "/status").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["upstreams"][0]["up"], false, "{body}");

        frozen.thaw();
        let t_thaw = Instant::now();
        eventually("a write after the thaw", HANG, || {
            let u = u.clone();
            async move {
                let c = connect(&u).await;
                c.batch_execute("INSERT INTO frozen_writes VALUES (3)")
                    .await
                    .is_ok()
            }
        })
        .await;
        let back = t_thaw.elapsed();
        eprintln!(
            "frozen primary (connect_timeout {connect_timeout:?}): the write in flight got 08006 {failed_after:?} after the freeze; \
             a read meanwhile took {read:?}; writes back {back:?} after the thaw"
        );
        cluster().wait_replicas_caught_up().await.unwrap();
        p.shutdown().await;
    });
}
