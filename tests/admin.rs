//! The admin endpoints against the lab: exact metric deltas for reads, pins, writes,
//! connections and failed logins; upstream health gauges; `/healthz`, `/status` and 404s.
//! (`/readyz` with stopped upstreams has its own binary: `tests/readiness.rs`.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// Prometheus text exposition -> `series line (name and labels) -> value`.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("`series value`");
            let value = value
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("value of {l:?}: {e}"));
            (series.to_string(), value)
        })
        .collect()
}

struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    async fn take(addr: SocketAddr) -> Scrape {
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        Scrape(parse_metrics(&body))
    }

    /// A series' value; series of labelled families appear on first use, so absent means 0.
    fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// How much `series` moved since `before`.
    fn delta(&self, before: &Scrape, series: &str) -> f64 {
        self.get(series) - before.get(series)
    }

    /// Every series of `family` that moved since `before`, with how much.
    fn moved(&self, before: &Scrape, family: &str) -> BTreeMap<String, f64> {
        let names: BTreeSet<&String> = self.0.keys().chain(before.0.keys()).collect();
        names
            .into_iter()
            .filter(|s| s.starts_with(family) && s[family.len()..].starts_with('{'))
            .map(|s| (s.clone(), self.delta(before, s)))
            .filter(|(_, d)| *d != 0.0)
            .collect()
    }
}

fn statements(route: &str, reason: &str) -> String {
    format!("pgnear_statements_total{{reason=\"{reason}\",route=\"{route}\"}}")
}

fn durations(route: &str) -> String {
    format!("pgnear_statement_duration_seconds_count{{route=\"{route}\"}}")
}

fn expect_moved(pairs: &[(String, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().cloned().collect()
}

const BYTES_IN: &str = "pgnear_client_bytes_received_total";
const BYTES_OUT: &str = "pgnear_client_bytes_sent_total";

/// Length of the Query message that carries `sql`: tag, length, text, NUL.
fn query_message_len(sql: &str) -> f64 {
    (1 + 4 + sql.len() + 1) as f64
}

#[test]
fn statement_counters_move_by_exactly_what_was_sent() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let admin = p.admin_addr();
        let c = connect(&url(&p)).await;

        // A first read connects the replica; the next one gives the size of an answer (the
        // same for every `SELECT 1`).
        c.simple_query("SELECT 1").await.unwrap();
        let before_one = Scrape::take(admin).await;
        c.simple_query("SELECT 1").await.unwrap();
        let after_one = Scrape::take(admin).await;
        let answer_bytes = after_one.delta(&before_one, BYTES_OUT);
        assert!(answer_bytes > 0.0, "bytes sent to the client are counted");

        // 137 replica reads: exactly 137, nothing else counted.
        const READS: usize = 137;
        for _ in 0..READS {
            let rows = c.simple_query("SELECT 1").await.unwrap();
            assert_eq!(first_value(&rows).as_deref(), Some("1"));
        }
        let after_reads = Scrape::take(admin).await;
        let n = READS as f64;
        assert_eq!(
            after_reads.moved(&after_one, "pgnear_statements_total"),
            expect_moved(&[(statements("replica", "read"), n)]),
        );
        assert_eq!(
            after_reads.moved(&after_one, "pgnear_statement_duration_seconds_count"),
            expect_moved(&[(durations("replica"), n)]),
        );
        assert_eq!(
            after_reads.delta(&after_one, BYTES_IN),
            n * query_message_len("SELECT 1")
        );
        assert_eq!(after_reads.delta(&after_one, BYTES_OUT), n * answer_bytes);

        // `SET pgnear.route` is answered by pgnear itself (not a statement); the read after it
        // is pinned to the primary.
        c.batch_execute("SET pgnear.route = 'primary'")
            .await
            .unwrap();
        let after_set = Scrape::take(admin).await;
        assert_eq!(
            after_set.moved(&after_reads, "pgnear_statements_total"),
            BTreeMap::new(),
            "pgnear's own commands are not statements"
        );
        let rows = c.simple_query("SELECT pg_is_in_recovery()").await.unwrap();
        assert!(
            first_value(&rows).as_deref() == Some("f"),
            "pinned read ran on the primary"
        );
        let after_pin = Scrape::take(admin).await;
        assert_eq!(
            after_pin.moved(&after_set, "pgnear_statements_total"),
            expect_moved(&[(statements("primary", "pin"), 1.0)]),
        );
        assert_eq!(
            after_pin.moved(&after_set, "pgnear_statement_duration_seconds_count"),
            expect_moved(&[(durations("primary"), 1.0)]),
        );
        c.batch_execute("SET pgnear.route = 'auto'").await.unwrap();

        // One write. pgnear pipelines its own `SELECT pg_current_wal_insert_lsn()` behind it;
        // that one must not be counted (neither as a statement nor in the latency histogram).
        let before_write = Scrape::take(admin).await;
        c.simple_query("CREATE TABLE admin_metrics_write AS SELECT 1 AS a")
            .await
            .unwrap();
        let after_write = Scrape::take(admin).await;
        assert_eq!(
            after_write.moved(&before_write, "pgnear_statements_total"),
            expect_moved(&[(statements("primary", "write"), 1.0)]),
        );
        assert_eq!(
            after_write.moved(&before_write, "pgnear_statement_duration_seconds_count"),
            expect_moved(&[(durations("primary"), 1.0)]),
        );
        // The write LSN was learnt (the internal query ran) and reads still see their writes.
        let token = c.simple_query("SHOW pgnear.write_lsn").await.unwrap();
        assert!(
            first_value(&token).is_some_and(|v| v.contains('/')),
            "a write LSN after the write"
        );
        let rows = c
            .simple_query("SELECT count(*) FROM admin_metrics_write")
            .await
            .unwrap();
        assert_eq!(first_value(&rows).as_deref(), Some("1"));
        let after_read_back = Scrape::take(admin).await;
        let moved = after_read_back.moved(&after_write, "pgnear_statements_total");
        assert_eq!(
            moved.values().sum::<f64>(),
            1.0,
            "one read, counted once: {moved:?}"
        );
        drop(c);
        p.shutdown().await;
    });
}

#[test]
fn client_connection_gauge_and_accept_counter() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let admin = p.admin_addr();
        const GAUGE: &str = "pgnear_client_connections";
        const ACCEPTED: &str = "pgnear_client_connections_accepted_total";
        let before = Scrape::take(admin).await;
        assert_eq!(before.get(GAUGE), 0.0);

        let c = connect(&url(&p)).await;
        c.simple_query("SELECT 1").await.unwrap();
        let during = Scrape::take(admin).await;
        assert_eq!(during.delta(&before, GAUGE), 1.0);
        assert_eq!(during.delta(&before, ACCEPTED), 1.0);

        drop(c);
        eventually(
            "the connection gauge to return",
            Duration::from_secs(10),
            || async { Scrape::take(admin).await.get(GAUGE) == before.get(GAUGE) },
        )
        .await;
        let after = Scrape::take(admin).await;
        assert_eq!(after.delta(&before, ACCEPTED), 1.0, "accepts never go down");
        p.shutdown().await;
    });
}

#[test]
fn wrong_password_counts_one_auth_error() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let admin = p.admin_addr();
        let before = Scrape::take(admin).await;
        let user = &cluster().options().app_user;
        let e = tokio_postgres::connect(
            &url_with(&p, user, "not-the-password", ""),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .expect("a wrong password is refused");
        assert_eq!(sqlstate(&e), "28P01", "{e}");
        let after = Scrape::take(admin).await;
        assert_eq!(
            after.moved(&before, "pgnear_errors_total"),
            expect_moved(&[("pgnear_errors_total{kind=\"auth\"}".into(), 1.0)]),
        );
        assert_eq!(
            after.moved(&before, "pgnear_client_connections_rejected_total"),
            expect_moved(&[(
                "pgnear_client_connections_rejected_total{reason=\"auth\"}".into(),
                1.0
            )]),
        );
        assert_eq!(
            after.delta(&before, "pgnear_client_connections_accepted_total"),
            1.0
        );
        assert_eq!(
            after.moved(&before, "pgnear_statements_total"),
            BTreeMap::new()
        );
        p.shutdown().await;
    });
}

#[test]
fn upstream_gauges_and_endpoints() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let admin = p.admin_addr();

        // Both gauges are set by the health tasks right after their first successful probe.
        eventually(
            "both upstreams up in /metrics",
            Duration::from_secs(10),
            || async {
                let m = Scrape::take(admin).await;
                m.get("pgnear_upstream_up{upstream=\"replica\"}") == 1.0
                    && m.get("pgnear_upstream_up{upstream=\"primary\"}") == 1.0
            },
        )
        .await;
        let m = Scrape::take(admin).await;
        for family in [
            "pgnear_client_connections",
            "pgnear_client_connections_accepted_total",
            "pgnear_client_bytes_received_total",
            "pgnear_client_bytes_sent_total",
            "pgnear_lsn_waits_total",
            "pgnear_lsn_wait_timeouts_total",
            "pgnear_replica_retries_total",
            "pgnear_replica_lag_bytes",
            "pgnear_replica_lag_seconds",
            "pgnear_replica_replay_lsn",
            "pgnear_lsn_wait_duration_seconds_count",
        ] {
            assert!(m.0.contains_key(family), "{family} is exported");
        }
        assert!(
            m.get("pgnear_replica_replay_lsn") > 0.0,
            "the watcher publishes the replay position"
        );

        let (status, body) = http_get(admin, "/healthz").await;
        assert_eq!(status, 200, "{body}");

        let (status, body) = http_get(admin, "/status").await;
        assert_eq!(status, 200, "{body}");
        let s: serde_json::Value = serde_json::from_str(&body).expect("/status is JSON");
        assert_eq!(s["region"], REPLICA, "{s}");
        assert_eq!(s["primary_region"], PRIMARY, "{s}");
        assert_eq!(s["role"], "replica-region", "{s}");
        let upstreams = s["upstreams"].as_array().expect("an upstreams array");
        assert_eq!(upstreams.len(), 2, "{s}");
        let roles: BTreeSet<&str> = upstreams
            .iter()
            .map(|u| u["role"].as_str().expect("a role"))
            .collect();
        assert_eq!(roles, BTreeSet::from(["primary", "replica"]), "{s}");
        for u in upstreams {
            assert_eq!(u["up"], true, "{u}");
            let url = u["url"].as_str().expect("a url");
            assert!(!url.contains(&cluster().options().app_password), "{url}");
        }

        let (status, body) = http_get(admin, "/no/such/page").await;
        assert_eq!(status, 404, "{body}");
        p.shutdown().await;
    });
}
