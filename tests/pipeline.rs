//! Pipelined replica reads (`pool.pipeline`, transaction mode) against the lab: many sessions'
//! reads share a few replica connections, and each session still gets exactly its own answers,
//! settings, errors and cancels.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use pgnear::config::{AuthMethod, Config, HumanDuration, PoolMode};

fn pipelined(width: usize) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.pool.mode = PoolMode::Transaction;
        c.pool.pipeline = width;
        c.auth.method = Some(AuthMethod::Trust);
    }
}

const PIPELINED: &str = "pgnear_pool_pipelined_reads_total{upstream=\"replica\"}";

/// 40 sessions, each with its own application_name and search_path, read concurrently in
/// simple and extended protocol over 2 shared connections: every answer is the session's own
/// (its number, its settings), from the replica; the reads shared few backends.
#[test]
fn each_session_gets_its_own_answers_and_settings() {
    let _serial = serial();
    run(async {
        on_primary(
            "DROP SCHEMA IF EXISTS lane_a CASCADE; DROP SCHEMA IF EXISTS lane_b CASCADE; \
             CREATE SCHEMA lane_a; CREATE SCHEMA lane_b; \
             CREATE TABLE lane_a.t AS SELECT 'a'::text AS v; \
             CREATE TABLE lane_b.t AS SELECT 'b'::text AS v",
        )
        .await;
        let p = proxy(REPLICA, pipelined(2)).await;
        let base = url(&p);
        let sessions = join_all((0..40).map(|i: i32| {
            let schema = if i % 2 == 0 { "lane_a" } else { "lane_b" };
            let u = format!("{base}&application_name=s{i}&options=-csearch_path%3D{schema}");
            async move {
                let c = connect(&u).await;
                let mut pids = HashSet::new();
                for n in 0..30 {
                    let sql = format!(
                        "SELECT {n}, current_setting('application_name'), (SELECT v FROM t), \
                         pg_is_in_recovery(), pg_backend_pid()"
                    );
                    let rows = c.simple_query(&sql).await.unwrap();
                    let row = rows
                        .iter()
                        .find_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                            _ => None,
                        })
                        .expect("a row");
                    assert_eq!(row.get(0), Some(n.to_string().as_str()));
                    assert_eq!(row.get(1), Some(format!("s{i}").as_str()));
                    assert_eq!(row.get(2), Some(&schema[5..]));
                    assert_eq!(row.get(3), Some("t"), "a read runs on the replica");
                    pids.insert(row.get(4).unwrap().to_string());
                    let row = c
                        .query_one(
                            "SELECT $1::int, current_setting('application_name'), \
                             (SELECT v FROM t), pg_backend_pid()::text",
                            &[&(n * 1000 + i)],
                        )
                        .await
                        .unwrap();
                    assert_eq!(row.get::<_, i32>(0), n * 1000 + i);
                    assert_eq!(row.get::<_, String>(1), format!("s{i}"));
                    assert_eq!(row.get::<_, String>(2), &schema[5..]);
                    pids.insert(row.get::<_, String>(3));
                }
                pids
            }
        }))
        .await;
        let all: HashSet<String> = sessions.into_iter().flatten().collect();
        assert!(
            all.len() <= 20,
            "reads used {} backends (pool.replica_size is 20)",
            all.len()
        );
        let shared = metric(&p, PIPELINED).await;
        assert!(shared > 0.0, "no read was pipelined");
        p.shutdown().await;
    });
}

/// pgbench's read-only script in all three query modes over one shared connection, with busy
/// polling: no failures, and the reads were pipelined.
#[test]
fn pgbench_reads_in_every_mode_have_no_failures() {
    let _serial = serial();
    run(async {
        pgbench_init().await;
        // With busy polling too: the runtime never sleeps while the clients are active.
        let p = proxy(REPLICA, |c| {
            pipelined(1)(c);
            c.proxy.busy_poll = HumanDuration(Duration::from_micros(200));
        })
        .await;
        let u = url(&p);
        for mode in ["simple", "extended", "prepared"] {
            let args = ["-S", "-M", mode, "-c", "16", "-j", "2", "-t", "200"];
            pgbench_ok(&u, &args, 3200).await;
        }
        assert!(metric(&p, PIPELINED).await > 0.0);
        p.shutdown().await;
    });
}

/// Errors stay with the session that caused them: one session's failing reads, pipelined with
/// another's good ones on a single connection, fail alone; both sessions go on.
#[test]
fn an_error_stays_with_its_session() {
    let _serial = serial();
    run(async {
        let p = proxy(REPLICA, pipelined(1)).await;
        let (bad, good) = (connect(&url(&p)).await, connect(&url(&p)).await);
        let failing = async {
            for _ in 0..200 {
                let e = bad.simple_query("SELECT 1/0").await.unwrap_err();
                assert_eq!(sqlstate(&e), "22012", "{e}");
                let e = bad.query_one("SELECT 1/$1::int", &[&0]).await.unwrap_err();
                assert_eq!(sqlstate(&e), "22012", "{e}");
            }
        };
        let fine = async {
            for n in 0..200i32 {
                let v: i32 = good
                    .query_one("SELECT $1::int", &[&n])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(v, n);
                let rows = good.simple_query(&format!("SELECT {n}")).await.unwrap();
                assert_eq!(first_value(&rows), Some(n.to_string()));
            }
        };
        tokio::join!(failing, fine);
        let v: i32 = bad.query_one("SELECT 7", &[]).await.unwrap().get(0);
        assert_eq!(v, 7);
        // How many shared a connection depends on timing (a busy one takes no more after
        // 2 ms); some did.
        assert!(metric(&p, PIPELINED).await > 0.0);
        p.shutdown().await;
    });
}

/// A read the replica refuses as a write (a function that inserts) runs on the primary once,
/// and its write is there; a cancel reaches a pipelined read, and other sessions' reads go on
/// meanwhile (a busy shared connection takes no more reads).
#[test]
fn write_retry_and_cancel_on_a_shared_connection() {
    let _serial = serial();
    run(async {
        on_primary(
            "DROP TABLE IF EXISTS lane_log; CREATE TABLE lane_log (n int); \
             CREATE OR REPLACE FUNCTION lane_bump(x int) RETURNS int LANGUAGE sql AS \
             'INSERT INTO lane_log VALUES (x) RETURNING x'",
        )
        .await;
        let p = proxy(REPLICA, pipelined(1)).await;
        let c = connect(&url(&p)).await;
        let rows = c.simple_query("SELECT lane_bump(42)").await.unwrap();
        assert_eq!(first_value(&rows), Some("42".to_string()));
        let direct = connect(&cluster().primary_url_from(PRIMARY)).await;
        let n: i64 = direct
            .query_one("SELECT count(*) FROM lane_log WHERE n = 42", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "the write ran exactly once");
        let other = connect(&url(&p)).await;
        let reads = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            for n in 0..50i32 {
                let v: i32 = other
                    .query_one("SELECT $1::int", &[&n])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(v, n);
            }
        });
        let c = assert_cancel_stops_a_sleep(c).await;
        reads.await.unwrap();
        let rows = c.simple_query("SELECT 1").await.unwrap();
        assert_eq!(first_value(&rows), Some("1".to_string()));
        p.shutdown().await;
    });
}

/// The shared connections' backends are terminated on the replica: sessions survive, and
/// their reads work again (on new connections).
#[test]
fn sessions_survive_losing_the_shared_connection() {
    let _serial = serial();
    run(async {
        let p = proxy(REPLICA, pipelined(2)).await;
        let c = connect(&url(&p)).await;
        // The shared connections open in the background: reads run the usual way until then.
        eventually(
            "a read on a shared connection",
            Duration::from_secs(60),
            || async {
                c.simple_query("SELECT 1").await.unwrap();
                metric(&p, PIPELINED).await > 0.0
            },
        )
        .await;
        let admin = connect(&cluster().replica_url(REPLICA).unwrap()).await;
        let killed: i64 = admin
            .query_one(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE usename = current_user AND backend_type = 'client backend' \
                 AND pid <> pg_backend_pid() AND application_name <> 'pgnear-control') k",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(killed > 0, "the shared connections were found");
        eventually("reads work again", Duration::from_secs(10), || async {
            c.simple_query("SELECT 1").await.is_ok()
        })
        .await;
        for n in 0..20i32 {
            let v: i32 = c.query_one("SELECT $1::int", &[&n]).await.unwrap().get(0);
            assert_eq!(v, n);
        }
        p.shutdown().await;
    });
}

/// A large answer on a shared connection streams through whole (in many pieces), and another
/// session's reads, pipelined with it or sent meanwhile, get their own answers.
#[test]
fn a_large_answer_streams_whole_beside_other_reads() {
    let _serial = serial();
    run(async {
        let p = proxy(REPLICA, pipelined(1)).await;
        let (big, small) = (connect(&url(&p)).await, connect(&url(&p)).await);
        // The shared connection opens on first demand: open it, so the large read uses it.
        eventually("a shared connection", Duration::from_secs(10), || async {
            big.simple_query("SELECT 1").await.unwrap();
            metric(&p, PIPELINED).await > 0.0
        })
        .await;
        let sql = "SELECT i, md5(i::text) FROM generate_series(1, 200000) i";
        let rows = |messages: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<(String, String)> {
            messages
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some((r.get(0)?.to_string(), r.get(1)?.to_string()))
                    }
                    _ => None,
                })
                .collect()
        };
        let large = async { rows(big.simple_query(sql).await.unwrap()) };
        let reads = async {
            for n in 0..100i32 {
                let v: i32 = small
                    .query_one("SELECT $1::int", &[&n])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(v, n);
            }
        };
        let (through, ()) = tokio::join!(large, reads);
        let direct = connect(&cluster().replica_url(REPLICA).unwrap()).await;
        let straight = rows(direct.simple_query(sql).await.unwrap());
        assert_eq!(through.len(), 200_000);
        assert!(
            through == straight,
            "the answer differs from the replica's own"
        );
        assert!(metric(&p, PIPELINED).await > 0.0);
        p.shutdown().await;
    });
}
