//! Several hosts for the primary: writes find the one not in recovery, follow a promotion
//! without losing an acknowledged write, and an old primary restarted as it was (split brain,
//! on an older timeline) gets no writes. This binary's cluster is changed for good: one test.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

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
    run(async {
        let cluster = cluster();
        let old = cluster.primary();
        let standby = &cluster.replica(REPLICA).unwrap().node;
        on_primary("CREATE TABLE IF NOT EXISTS topology (id int PRIMARY KEY, port int)").await;
        cluster.wait_replicas_caught_up().await.unwrap();
        // The standby first: writes must still land on the primary.
        let url = cluster.app_url_at(&[standby.addr(), old.addr()]);
        let p = proxy(PRIMARY, |c| c.upstream.primary_url = url).await;
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
        p.shutdown().await;
    });
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
