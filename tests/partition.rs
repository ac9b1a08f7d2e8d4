//! Real network partitions: the upstream pgnear uses lives on a test host in its own network
//! namespace (tests/common/netns.rs), reached only over a veth pair, and the path is cut in
//! that host's firewall, silently (packets dropped both ways) or loudly (TCP resets).
//!
//! A read sent after the replica is cut off is answered by the primary, `/readyz` and `/status`
//! say the replica is down, and reads return to it after the heal. A write in flight to a cut-off
//! primary gets 08006, new writes fail, reads still work, and writes return after the heal.
//!
//! No assertion holds a wall-clock threshold: the times are measured and printed
//! (`cargo test --test partition -- --nocapture`), the assertions are on behaviour.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::netns::{Cut, TestHost};
use common::*;

/// Longest any client operation may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(60);

/// The application's URL to a server at `addr`.
fn app_url(addr: SocketAddr) -> String {
    let o = cluster().options();
    format!(
        "postgres://{}:{}@{addr}/{}?sslmode=disable",
        o.app_user, o.app_password, o.database
    )
}

fn replica_cut(how: Cut) {
    let _serial = serial();
    run(async {
        let mut host = TestHost::create();
        let replica = host
            .forward(cluster().replica(REPLICA).unwrap().node.addr())
            .await;
        let p = proxy(REPLICA, |c| c.upstream.replica_url = app_url(replica)).await;
        let u = url(&p);
        let clients = [connect(&u).await, connect(&u).await, connect(&u).await];
        for c in &clients {
            assert_eq!(answered_by(c).await.unwrap(), "replica");
        }
        assert_eq!(answered_by_extended(&clients[2]).await.unwrap(), "replica");
        let (status, body) = http_get(p.admin_addr(), "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("replica and primary up"), "{body}");

        host.cut(how);
        let t_cut = Instant::now();
        // Reads sent right after the cut, on sessions that hold a replica connection, in the
        // simple and the extended protocol.
        let (by, extended) = tokio::join!(
            tokio::time::timeout(HANG, answered_by(&clients[0])),
            tokio::time::timeout(HANG, answered_by_extended(&clients[2])),
        );
        let first_read = t_cut.elapsed();
        let by = by.expect("a read on the cut-off replica hung");
        assert_eq!(by.expect("the read is answered, not failed"), "primary");
        let extended = extended.expect("an extended read on the cut-off replica hung");
        assert_eq!(
            extended.expect("the read is answered, not failed"),
            "primary"
        );
        // A reset read is run again on the primary before the watcher's next poll has failed:
        // the replica is reported down at that poll.
        eventually("/readyz to report the replica down", HANG, || async {
            let (status, body) = http_get(p.admin_addr(), "/readyz").await;
            assert_eq!(status, 200, "{body}");
            body.contains("the replica is down")
        })
        .await;
        let reported_down = t_cut.elapsed();
        let s = upstream_status(&p, "replica").await;
        assert_eq!(s["up"], false, "{s}");
        assert!(s["lag_bytes"].is_null(), "{s}");
        let t = Instant::now();
        assert_eq!(answered_by(&clients[1]).await.unwrap(), "primary");
        let other_read = t.elapsed();
        let fresh = connect(&u).await;
        assert_eq!(answered_by(&fresh).await.unwrap(), "primary");

        host.heal();
        let t_heal = Instant::now();
        eventually("reads back on the replica", HANG, || async {
            answered_by(&fresh).await.unwrap() == "replica"
        })
        .await;
        let back = t_heal.elapsed();
        for c in &clients {
            assert_eq!(answered_by(c).await.unwrap(), "replica");
        }
        assert_eq!(upstream_status(&p, "replica").await["up"], true);
        eprintln!(
            "replica partition ({how:?}): first read served (by the primary) {first_read:?} after the cut, \
             reported down {reported_down:?} after the cut, another session's next read {other_read:?}; reads back on the replica {back:?} after the heal"
        );
        p.shutdown().await;
    });
}

fn primary_cut(how: Cut) {
    let _serial = serial();
    run(async {
        on_primary("CREATE TABLE IF NOT EXISTS partition_writes (a int)").await;
        let mut host = TestHost::create();
        let primary = host.forward(cluster().primary().addr()).await;
        let p = proxy(REPLICA, |c| c.upstream.primary_url = app_url(primary)).await;
        let u = url(&p);
        let writer = connect(&u).await;
        writer
            .batch_execute("INSERT INTO partition_writes VALUES (1)")
            .await
            .unwrap();
        let reader = connect(&u).await;
        assert_eq!(answered_by(&reader).await.unwrap(), "replica");

        // A write in flight: sent, then the path is cut once the primary works on it (seen
        // there directly, not over the path that is cut).
        let admin = primary_admin().await;
        let in_flight =
            writer.batch_execute("INSERT INTO partition_writes SELECT 2 FROM pg_sleep(2)");
        let cut = async {
            eventually("the write running on the primary", HANG, || async {
                let row = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                         AND query LIKE 'INSERT INTO partition_writes SELECT 2%'",
                        &[],
                    )
                    .await
                    .unwrap();
                row.get::<_, i64>(0) > 0
            })
            .await;
            host.cut(how);
            Instant::now()
        };
        let (r, t_cut) = tokio::time::timeout(HANG, async { tokio::join!(in_flight, cut) })
            .await
            .expect("a write in flight to the cut-off primary hung");
        let failed_after = t_cut.elapsed();
        let e = r.expect_err("the primary is cut off");
        assert_eq!(sqlstate(&e), "08006", "{e}");
        let message = e.as_db_error().map_or("", |d| d.message());
        assert!(message.contains("primary"), "{message}");

        // New writes fail; reads still work.
        let fresh = connect(&u).await;
        let t = Instant::now();
        let e = tokio::time::timeout(
            HANG,
            fresh.batch_execute("INSERT INTO partition_writes VALUES (3)"),
        )
        .await
        .expect("a new write to the cut-off primary hung")
        .expect_err("the primary is cut off");
        let new_write = t.elapsed();

        assert_eq!(sqlstate(&e), "08006", "{e}");
        let t = Instant::now();
        assert_eq!(answered_by(&reader).await.unwrap(), "replica");
        let read = t.elapsed();
        eventually("/status to report the primary down", HANG, || async {
            upstream_status(&p, "primary").await["up"] == false
        })
        .await;

        host.heal();
        let t_heal = Instant::now();
        eventually("a write after the heal", HANG, || {
            let u = u.clone();
            async move {
                let c = connect(&u).await;
                c.batch_execute("INSERT INTO partition_writes VALUES (4)")
                    .await
                    .is_ok()
            }
        })
        .await;
        let back = t_heal.elapsed();
        eprintln!(
            "primary partition ({how:?}): the write in flight got 08006 {failed_after:?} after the cut; \
             a new write failed in {new_write:?}; a read meanwhile took {read:?}; writes back {back:?} after the heal"
        );
        cluster().wait_replicas_caught_up().await.unwrap();
        p.shutdown().await;
    });
}

#[test]
fn a_silently_partitioned_replica_is_down_and_reads_go_to_the_primary() {
    replica_cut(Cut::Silent);
}

#[test]
fn a_loudly_partitioned_replica_is_down_and_reads_go_to_the_primary() {
    replica_cut(Cut::Loud);
}

#[test]
fn a_write_in_flight_to_a_silently_partitioned_primary_gets_08006() {
    primary_cut(Cut::Silent);
}

#[test]
fn a_write_in_flight_to_a_loudly_partitioned_primary_gets_08006() {
    primary_cut(Cut::Loud);
}
