//! `/readyz` follows the upstreams: 200 while reads can be served, 503 (with the reason) once
//! the replica and the primary are both down, 200 again after they come back. In its own test
//! binary because it stops the lab's Postgres servers.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

async fn readyz(admin: SocketAddr) -> (u16, String) {
    http_get(admin, "/readyz").await
}

/// Probes run every second and need two failures in a row; stopping and starting Postgres
/// takes a few seconds more.
const PATIENCE: Duration = Duration::from_secs(30);

#[test]
fn readyz_goes_503_when_both_upstreams_stop_and_recovers() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let admin = p.admin_addr();
        let (status, body) = readyz(admin).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("ready"), "{body}");

        let lab = cluster();
        let replica = &lab.replica(REPLICA).expect("a replica in syd").node;
        replica.stop().await.expect("stopping the replica");
        lab.primary().stop().await.expect("stopping the primary");

        eventually("/readyz to answer 503", PATIENCE, || async {
            readyz(admin).await.0 == 503
        })
        .await;
        let (status, body) = readyz(admin).await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains("not ready") && body.contains("both down"),
            "the body names the reason: {body}"
        );
        // Liveness is not readiness.
        assert_eq!(http_get(admin, "/healthz").await.0, 200);

        lab.primary().start().await.expect("starting the primary");
        replica.start().await.expect("starting the replica");
        eventually("/readyz to answer 200 again", PATIENCE, || async {
            readyz(admin).await.0 == 200
        })
        .await;

        // A new client reads through pgnear again, and once the watcher is back, from the replica.
        let c = connect(&url(&p)).await;
        let rows = c
            .simple_query("SELECT 1")
            .await
            .expect("a read after the restart");
        assert_eq!(first_value(&rows).as_deref(), Some("1"));
        eventually("reads served by the replica again", PATIENCE, || async {
            let rows = c.simple_query("SELECT pg_is_in_recovery()").await.unwrap();
            first_value(&rows).as_deref() == Some("t")
        })
        .await;
        drop(c);
        p.shutdown().await;
    });
}
