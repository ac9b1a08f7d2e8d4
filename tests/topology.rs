//! Several hosts for the primary: writes find the one not in recovery, follow a promotion
//! without losing an acknowledged write, and an old primary restarted as it was (split brain,
//! on an older timeline) gets no writes. Causal tokens from before the failover stay valid on
//! a replica left behind, and one it never reaches (or no server has) does not wedge reads.
//! Two primaries on the same timeline get no writes at all. This binary's cluster (three
//! regions) is changed for good: one test.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgnear::config::HumanDuration;
use pgnear::Proxy;

use common::*;

const FAR: &str = "lhr";

/// The port of the server that ran a write.
async fn write_port(c: &tokio_postgres::Client, id: i32) -> Result<i32, tokio_postgres::Error> {
    let row = c
        .query_one(
            "INSERT INTO topology VALUES ($1, inet_server_port()) RETURNING port",
            &[&id],
        )
        .await?;
    Ok(row.get(0))
}

#[test]
fn writes_find_the_primary_and_follow_a_promotion() {
    cluster_with(&[PRIMARY, REPLICA, FAR]);
    run(async {
        let cluster = cluster();
        let old = cluster.primary();
        let standby = &cluster.replica(REPLICA).unwrap().node;
        let far = &cluster.replica(FAR).unwrap().node;
        on_primary("CREATE TABLE IF NOT EXISTS topology (id int PRIMARY KEY, port int)").await;
        cluster.wait_replicas_caught_up().await.unwrap();
        // The standby first: writes must still land on the primary.
        let url = cluster.app_url_at(&[standby.addr(), old.addr()]);
        let p = proxy(PRIMARY, |c| c.upstream.primary_url = url.clone()).await;
        // A pgnear in a third region, whose replica stays a standby of the old primary.
        let f = proxy(FAR, |c| {
            c.upstream.primary_url = url;
            c.consistency.wait_timeout = HumanDuration(Duration::from_millis(500));
            c.consistency.max_replica_lag = HumanDuration(Duration::from_secs(600));
        })
        .await;
        let fc = connect(&common::url(&f)).await;
        let before = write_token(&fc, -1)
            .await
            .expect("a write before the failover");
        let c = connect(&common::url(&p)).await;
        assert_eq!(
            write_port(&c, 0).await.unwrap(),
            i32::from(old.addr().port())
        );
        let status = upstream_status(&p, "primary").await;
        assert_eq!(status["writes_to"], old.addr().to_string(), "{status}");
        let roles: Vec<&str> = status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["standby", "primary"], "{status}");

        // A writer keeps writing through the failover; what was acknowledged must survive it.
        let acked = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let (acked, url) = (acked.clone(), common::url(&p));
            tokio::spawn(async move {
                let mut c = connect(&url).await;
                for id in 1..i32::MAX {
                    match write_port(&c, id).await {
                        Ok(port) => acked.lock().unwrap().push((id, port, Instant::now())),
                        Err(_) if c.is_closed() => c = reconnect(&url).await,
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        };
        eventually(
            "writes before the failover",
            Duration::from_secs(10),
            || {
                let n = acked.lock().unwrap().len();
                async move { n >= 20 }
            },
        )
        .await;
        let stopped = Instant::now();
        old.stop().await.unwrap();
        standby.promote().await.unwrap();
        let promoted = Instant::now();
        let new_port = i32::from(standby.addr().port());
        eventually(
            "a write on the promoted standby",
            Duration::from_secs(30),
            || {
                let on_new = acked
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|&(_, port, _)| port == new_port);
                async move { on_new }
            },
        )
        .await;
        let first = acked
            .lock()
            .unwrap()
            .iter()
            .find(|&&(_, port, _)| port == new_port)
            .map(|&(_, _, at)| at)
            .unwrap();
        println!(
            "failover: first write on the new primary {:?} after the old one stopped, {:?} after the promotion",
            first - stopped,
            first.saturating_duration_since(promoted)
        );
        let status = upstream_status(&p, "primary").await;
        assert_eq!(status["writes_to"], standby.addr().to_string(), "{status}");

        // Causal tokens across the failover, read through the third region's pgnear: one
        // from before is valid on its replica (left behind on the old timeline); one from
        // the new timeline, which that replica never replays, and one beyond anything any
        // server has, are each answered by the new primary once `wait_timeout` has passed.
        let after = loop {
            match write_token(&reconnect(&common::url(&f)).await, -2).await {
                Some(t) => break t,
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let (far_port, far_read) = read_with_token(&f, &before, -1).await;
        assert_eq!(
            far_port,
            i32::from(far.addr().port()),
            "a token from before the failover"
        );
        let (new_port, new_read) = read_with_token(&f, &after, -2).await;
        assert_eq!(
            new_port,
            i32::from(standby.addr().port()),
            "a token of the new timeline"
        );
        let (lost_port, lost_read) = read_with_token(&f, "FFFFFFFF/0", -2).await;
        assert_eq!(
            lost_port,
            i32::from(standby.addr().port()),
            "a token no server has"
        );
        println!(
            "causal tokens: from before the failover read on the replica left behind in {far_read:?}; \
             of the new timeline {new_read:?} and beyond any server {lost_read:?}, both on the new \
             primary (wait_timeout 500 ms)"
        );

        // The old primary back as it was: it claims to be primary, on the older timeline.
        old.start().await.unwrap();
        eventually(
            "the old primary seen again",
            Duration::from_secs(30),
            || {
                let p = &p;
                async move {
                    let status = upstream_status(p, "primary").await;
                    status["hosts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|h| h["role"] == "primary")
                }
            },
        )
        .await;
        let since = acked.lock().unwrap().len();
        eventually("more writes", Duration::from_secs(10), || {
            let n = acked.lock().unwrap().len();
            async move { n >= since + 50 }
        })
        .await;
        writer.abort();
        let acked = acked.lock().unwrap().clone();
        assert!(
            acked[since..].iter().all(|&(_, port, _)| port == new_port),
            "a write went to the old primary after it came back"
        );
        let status = upstream_status(&p, "primary").await;
        assert_eq!(status["writes_to"], standby.addr().to_string(), "{status}");
        // Every acknowledged write is on the new primary.
        let direct = connect(&cluster.app_url_at(&[standby.addr()])).await;
        let ids: Vec<i32> = direct
            .query("SELECT id FROM topology", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let lost: Vec<i32> = acked
            .iter()
            .map(|&(id, _, _)| id)
            .filter(|id| !ids.contains(id))
            .collect();
        assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

        // The replica left behind promoted too: two primaries on the same timeline, which
        // pgnear cannot tell apart; writes are refused naming both (08006).
        far.promote().await.unwrap();
        let both = cluster.app_url_at(&[standby.addr(), far.addr()]);
        let q = proxy(PRIMARY, |c| c.upstream.primary_url = both).await;
        // In the primary's region every session needs the primary: it is refused at login.
        let refused = tokio_postgres::connect(&common::url(&q), tokio_postgres::NoTls)
            .await
            .map(|_| ())
            .unwrap_err();
        let db = refused.as_db_error().expect("an error from pgnear");
        assert_eq!(db.code().code(), "08006", "{db:?}");
        for addr in [standby.addr(), far.addr()] {
            assert!(db.message().contains(&addr.to_string()), "{db:?}");
        }
        let status = upstream_status(&q, "primary").await;
        let shown = status["writes_to"].as_str().unwrap_or_default();
        assert!(shown.contains("split brain"), "{status}");
        q.shutdown().await;
        f.shutdown().await;
        p.shutdown().await;
    });
}

/// Writes row `id` through `c` (if not there yet) and returns the session's causal token
/// (`None`: the write failed).
async fn write_token(c: &tokio_postgres::Client, id: i32) -> Option<String> {
    c.execute(
        "INSERT INTO topology VALUES ($1, 0) ON CONFLICT DO NOTHING",
        &[&id],
    )
    .await
    .ok()?;
    let row = c.query_one("SHOW pgnear.write_lsn", &[]).await.ok()?;
    Some(row.get(0))
}

/// Reads row `id` twice in a new session through `p` carrying `token`: the port of the server
/// that answered and how long the first read took; the row must be there. A token the replica
/// does not reach in `wait_timeout` costs one timeout, not one per read.
async fn read_with_token(p: &Proxy, token: &str, id: i32) -> (i32, Duration) {
    let c = connect(&common::url(p)).await;
    c.batch_execute(&format!("SET pgnear.min_lsn = '{token}'"))
        .await
        .unwrap();
    let timeouts = metric(p, "pgnear_lsn_wait_timeouts_total").await;
    let sql = "SELECT count(*), inet_server_port() FROM topology WHERE id = $1";
    let started = Instant::now();
    let row = c.query_one(sql, &[&id]).await.unwrap();
    let took = started.elapsed();
    let again = c.query_one(sql, &[&id]).await.unwrap();
    for r in [&row, &again] {
        assert_eq!(r.get::<_, i64>(0), 1, "row {id} read with token {token}");
        assert_eq!(
            r.get::<_, i32>(1),
            row.get::<_, i32>(1),
            "both reads on one server"
        );
    }
    let waited_out = metric(p, "pgnear_lsn_wait_timeouts_total").await - timeouts;
    assert!(waited_out <= 1.0, "{waited_out} timeouts for token {token}");
    (row.get(1), took)
}

async fn reconnect(url: &str) -> tokio_postgres::Client {
    loop {
        if let Ok((c, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
