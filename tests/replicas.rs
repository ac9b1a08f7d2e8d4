//! A list of replicas: when the local one dies, or lags past `max_replica_lag` (its replay
//! paused, as when its own upstream is gone), reads move to the next one (10 ms away), not to
//! the primary (100 ms away), keep reading their own writes through the switch, and come back
//! once the local one is up (caught up) again. Its own cluster (three regions): the tests stop
//! a replica and pause its replay.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgnear::config::ReplicaOrder;
use pgnear::lab::postgres::PgNode;
use pgnear::lab::relay::Relay;

const FAR: &str = "lhr";

fn start_cluster() {
    cluster_with(&[PRIMARY, REPLICA, FAR]);
}

/// The local replica's node and the far one's.
fn replica_nodes() -> (&'static PgNode, &'static PgNode) {
    let cluster = cluster();
    let node = |region| &cluster.replica(region).unwrap().node;
    (node(REPLICA), node(FAR))
}

/// The port of the server a read ran on.
async fn read_port(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until reads through `c` run on the server at `port`.
async fn until_reads_on(c: &tokio_postgres::Client, port: i32, what: &str) {
    eventually(what, Duration::from_secs(30), || async move {
        matches!(c.query_one("SELECT inet_server_port()", &[]).await, Ok(r) if r.get::<_, i32>(0) == port)
    })
    .await;
}

/// The median of `n` timed reads.
async fn p50(c: &tokio_postgres::Client, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        read_port(c).await;
        times.push(t.elapsed());
    }
    times.sort();
    times[n / 2]
}

#[test]
fn reads_move_to_the_next_replica_and_come_back() {
    let _serial = serial();
    start_cluster();
    run(async {
        let cluster = cluster();
        let (local, far) = replica_nodes();
        // The primary 100 ms away from this region, the other replica 10 ms.
        cluster
            .replica(REPLICA)
            .unwrap()
            .relay
            .set_delay(Duration::from_millis(50));
        let next = Relay::start(far.addr(), Duration::from_millis(5))
            .await
            .unwrap();
        on_primary("CREATE TABLE IF NOT EXISTS replicas (id int PRIMARY KEY)").await;
        cluster.wait_replicas_caught_up().await.unwrap();
        let listed = cluster.app_url_at(&[local.addr(), next.addr()]);
        let p = proxy(REPLICA, |c| c.upstream.replica_url = listed).await;
        let alone = proxy(REPLICA, |_| {}).await;
        let c = connect(&url(&p)).await;
        let (local_port, far_port) = (i32::from(local.addr().port()), i32::from(far.addr().port()));
        let primary_port = i32::from(cluster.primary().addr().port());
        assert_eq!(read_port(&c).await, local_port);
        let local_p50 = p50(&c, 21).await;

        // Read-your-writes through the switch: every read sees the session's last write.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ryw = {
            let (url, done) = (url(&p), done.clone());
            tokio::spawn(async move {
                let c = connect(&url).await;
                let (mut stale, mut reads) = (0, 0);
                for id in 0..i32::MAX {
                    if done.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    if c.execute("INSERT INTO replicas VALUES ($1)", &[&id])
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    match c
                        .query_one("SELECT count(*) FROM replicas WHERE id = $1", &[&id])
                        .await
                    {
                        Ok(row) => {
                            reads += 1;
                            stale += usize::from(row.get::<_, i64>(0) != 1);
                        }
                        Err(_) => continue,
                    }
                }
                (reads, stale)
            })
        };
        let stopped = Instant::now();
        local.stop().await.unwrap();
        until_reads_on(&c, far_port, "reads on the next replica").await;
        let switched = stopped.elapsed();
        let next_p50 = p50(&c, 21).await;
        assert_eq!(
            read_port(&c).await,
            far_port,
            "reads stay on the next replica"
        );
        // With only the local replica listed, the same reads fall back to the far primary.
        let fallback = connect(&url(&alone)).await;
        until_reads_on(&fallback, primary_port, "reads on the primary").await;
        let primary_p50 = p50(&fallback, 11).await;

        let restarted = Instant::now();
        local.start().await.unwrap();
        until_reads_on(&c, local_port, "reads back on the local replica").await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let (reads, stale) = ryw.await.unwrap();
        assert!(reads > 0);
        assert_eq!(stale, 0, "stale reads among {reads} through both switches");
        println!(
            "replicas: reads on the next replica {switched:?} after the local one stopped, back {:?} after it started; \
             read p50 local {local_p50:?}, next replica (10 ms) {next_p50:?}, primary (100 ms) {primary_p50:?}; \
             {reads} reads after their write through the switch, {stale} stale",
            restarted.elapsed()
        );
        p.shutdown().await;
        alone.shutdown().await;
    });
}

#[test]
fn a_lagging_replica_hands_reads_to_the_next_one() {
    let _serial = serial();
    start_cluster();
    run(async {
        let cluster = cluster();
        let (local, far) = replica_nodes();
        on_primary("CREATE TABLE IF NOT EXISTS lagging (id int PRIMARY KEY)").await;
        cluster.wait_replicas_caught_up().await.unwrap();
        let listed = cluster.app_url_at(&[local.addr(), far.addr()]);
        let p = proxy(REPLICA, |c| {
            c.upstream.replica_url = listed;
            c.consistency.max_replica_lag = pgnear::config::HumanDuration(Duration::from_secs(1));
        })
        .await;
        let c = connect(&url(&p)).await;
        let (local_port, far_port) = (i32::from(local.addr().port()), i32::from(far.addr().port()));
        assert_eq!(read_port(&c).await, local_port);

        // The local replica stops replaying while the primary goes on.
        let admin = replica_admin().await;
        admin
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .unwrap();
        let paused = Instant::now();
        let writer = connect(&url(&p)).await;
        let mut id = 0;
        let mut stale = 0;
        let mut switched = None;
        while paused.elapsed() < Duration::from_secs(30) {
            id += 1;
            writer
                .execute("INSERT INTO lagging VALUES ($1)", &[&id])
                .await
                .unwrap();
            // The writer's own reads see its writes wherever they run.
            let seen: i64 = writer
                .query_one("SELECT count(*) FROM lagging WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            stale += usize::from(seen != 1);
            if read_port(&c).await == far_port {
                switched = Some(paused.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let switched = switched.expect("reads moved to the next replica");
        assert_eq!(
            read_port(&c).await,
            far_port,
            "reads stay on the next replica"
        );
        assert_eq!(stale, 0, "stale reads after the writer's own writes");

        admin
            .batch_execute("SELECT pg_wal_replay_resume()")
            .await
            .unwrap();
        let resumed = Instant::now();
        until_reads_on(&c, local_port, "reads back on the caught-up local replica").await;
        println!(
            "replicas: reads on the next replica {switched:?} after the local one stopped replaying \
             (max_replica_lag 1 s), back {:?} after it resumed; {id} writes read back, {stale} stale",
            resumed.elapsed()
        );
        p.shutdown().await;
    });
}

#[test]
fn latency_order_reads_from_the_nearest_replica() {
    let _serial = serial();
    start_cluster();
    run(async {
        let cluster = cluster();
        let (local, far) = replica_nodes();
        // The far replica 10 ms away, listed first; the local one as near as loopback.
        let next = Relay::start(far.addr(), Duration::from_millis(5))
            .await
            .unwrap();
        let near = Relay::start(local.addr(), Duration::ZERO).await.unwrap();
        cluster.wait_replicas_caught_up().await.unwrap();
        let listed = cluster.app_url_at(&[next.addr(), near.addr()]);
        let by_list = {
            let listed = listed.clone();
            proxy(REPLICA, |c| c.upstream.replica_url = listed).await
        };
        let started = Instant::now();
        let by_latency = proxy(REPLICA, |c| {
            c.upstream.replica_url = listed;
            c.upstream.replica_order = ReplicaOrder::Latency;
        })
        .await;
        let (local_port, far_port) = (i32::from(local.addr().port()), i32::from(far.addr().port()));
        let c = connect(&url(&by_latency)).await;
        until_reads_on(&c, local_port, "reads on the nearest replica").await;
        let found = started.elapsed();
        let first = connect(&url(&by_list)).await;
        assert_eq!(
            read_port(&first).await,
            far_port,
            "the listed order keeps the first replica of the list"
        );
        let (nearest_p50, first_p50) = (p50(&c, 21).await, p50(&first, 21).await);

        // The local replica moves 40 ms away: reads go to the one now nearer, and back.
        near.set_delay(Duration::from_millis(20));
        let moved = Instant::now();
        until_reads_on(&c, far_port, "reads on the replica now nearest").await;
        let away = moved.elapsed();
        near.set_delay(Duration::ZERO);
        let back = Instant::now();
        until_reads_on(&c, local_port, "reads back on the local replica").await;
        let back = back.elapsed();
        assert_eq!(read_port(&c).await, local_port, "reads stay on the nearest");
        println!(
            "replicas by latency: reads on the nearest {found:?} after start; read p50 {nearest_p50:?} \
             (the first listed, 10 ms away: {first_p50:?}); on the other {away:?} after the local one \
             moved 40 ms away, back {back:?} after it came near again"
        );
        by_list.shutdown().await;
        by_latency.shutdown().await;
    });
}
