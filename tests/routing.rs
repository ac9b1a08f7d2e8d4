//! Routing against the lab: reads on the replica, writes and read-write transactions on the
//! primary, prepared statements and session state on both, pins, the 25006 retry, pgbench.

mod common;

use std::time::Duration;

use common::*;
use tokio_postgres::{AsyncMessage, Client, SimpleQueryMessage};

/// `pg_is_in_recovery()` on whichever server ran it: true on the replica.
async fn on_replica_simple(c: &Client, prefix: &str) -> bool {
    let rows = c
        .simple_query(&format!("{prefix}SELECT pg_is_in_recovery()"))
        .await
        .unwrap();
    first_value(&rows).expect("a row") == "t"
}

async fn on_replica(c: &Client) -> bool {
    c.query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0)
}

#[test]
fn reads_go_to_the_replica_writes_and_transactions_to_the_primary() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let c = connect(&url(&p)).await;
        assert!(on_replica_simple(&c, "").await, "plain read");
        assert!(on_replica(&c).await, "extended-protocol read");
        assert!(
            !on_replica_simple(&c, "/* pgnear:primary */ ").await,
            "primary hint"
        );
        c.batch_execute("BEGIN").await.unwrap();
        assert!(
            !on_replica(&c).await,
            "read inside a read-write transaction"
        );
        c.batch_execute("COMMIT").await.unwrap();
        c.batch_execute("BEGIN READ ONLY").await.unwrap();
        assert!(on_replica(&c).await, "read-only transaction");
        c.batch_execute("COMMIT").await.unwrap();
        // A write inside a read-only transaction fails like on Postgres, and the client sees the
        // failed transaction status.
        c.batch_execute("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .unwrap();
        let e = c
            .batch_execute("CREATE TABLE nope (a int)")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "25006");
        let e = c.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(sqlstate(&e), "25P02", "{e}");
        c.batch_execute("ROLLBACK").await.unwrap();
        assert!(on_replica(&c).await);
        // Writes work and are visible once replayed.
        c.batch_execute("CREATE TABLE IF NOT EXISTS routed (a int); INSERT INTO routed VALUES (1)")
            .await
            .unwrap();
        let n: i64 = c
            .query_one("/* pgnear:primary */ SELECT count(*) FROM routed", &[])
            .await
            .unwrap()
            .get(0);
        assert!(n >= 1);
        // SET pgnear.route pins the session.
        c.batch_execute("SET pgnear.route = 'primary'")
            .await
            .unwrap();
        assert!(!on_replica_simple(&c, "").await);
        let rows = c.simple_query("SHOW pgnear.route").await.unwrap();
        assert!(matches!(&rows[1], SimpleQueryMessage::Row(r) if r.get(0) == Some("primary")));
        c.batch_execute("SET pgnear.route = 'auto'").await.unwrap();
        assert!(on_replica_simple(&c, "").await);
        let e = c
            .batch_execute("SET pgnear.route = 'sideways'")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22023");
        let rows = c.simple_query("SHOW pgnear.region").await.unwrap();
        assert!(matches!(&rows[1], SimpleQueryMessage::Row(r) if r.get(0) == Some(REPLICA)));
        let rows = c.simple_query("SHOW pgnear.primary_region").await.unwrap();
        assert!(matches!(&rows[1], SimpleQueryMessage::Row(r) if r.get(0) == Some(PRIMARY)));
        p.shutdown().await;
    });
}

#[test]
fn prepared_statements_run_on_both_servers() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let c = connect(&url(&p)).await;
        let stmt = c
            .prepare("SELECT pg_is_in_recovery(), $1::int + 1")
            .await
            .unwrap();
        let row = c.query_one(&stmt, &[&1i32]).await.unwrap();
        assert!(row.get::<_, bool>(0));
        assert_eq!(row.get::<_, i32>(1), 2);
        // Inside a read-write transaction the same statement runs on the primary: re-prepared there.
        c.batch_execute("BEGIN").await.unwrap();
        for i in 0..20 {
            let row = c.query_one(&stmt, &[&i]).await.unwrap();
            assert!(!row.get::<_, bool>(0));
            assert_eq!(row.get::<_, i32>(1), i + 1);
        }
        c.batch_execute("COMMIT").await.unwrap();
        assert!(c
            .query_one(&stmt, &[&5i32])
            .await
            .unwrap()
            .get::<_, bool>(0));
        // Closing it closes it everywhere; a new statement with a reused name works.
        drop(stmt);
        for _ in 0..3 {
            let s = c
                .prepare("SELECT pg_is_in_recovery(), 'again'")
                .await
                .unwrap();
            assert!(c.query_one(&s, &[]).await.unwrap().get::<_, bool>(0));
            c.batch_execute("BEGIN").await.unwrap();
            assert!(!c.query_one(&s, &[]).await.unwrap().get::<_, bool>(0));
            c.batch_execute("COMMIT").await.unwrap();
        }
        p.shutdown().await;
    });
}

#[test]
fn session_state_reaches_both_servers_in_order() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let u = format!(
            "{}&options=-c%20statement_timeout%3D4321&application_name=state_test",
            url(&p)
        );
        let c = connect(&u).await;
        let show = |name: &'static str| {
            let c = &c;
            async move {
                c.query_one(&format!("SHOW {name}"), &[])
                    .await
                    .unwrap()
                    .get::<_, String>(0)
            }
        };
        // Startup parameters on the replica (a read) and the primary (in a transaction).
        assert_eq!(show("statement_timeout").await, "4321ms");
        assert_eq!(show("application_name").await, "state_test");
        c.batch_execute("SET search_path = 'first'").await.unwrap();
        c.batch_execute("SET search_path = 'second', public")
            .await
            .unwrap();
        c.batch_execute("SET DateStyle = 'SQL, DMY'").await.unwrap();
        assert!(on_replica(&c).await);
        assert_eq!(show("search_path").await, "second, public");
        c.batch_execute("BEGIN").await.unwrap();
        assert!(!on_replica(&c).await);
        assert_eq!(show("search_path").await, "second, public");
        assert_eq!(show("DateStyle").await, "SQL, DMY");
        assert_eq!(show("statement_timeout").await, "4321ms");
        c.batch_execute("SET LOCAL work_mem = '7MB'").await.unwrap();
        assert_eq!(show("work_mem").await, "7MB");
        c.batch_execute("COMMIT").await.unwrap();
        // SET LOCAL stayed inside its transaction.
        assert_ne!(show("work_mem").await, "7MB");
        c.batch_execute("RESET search_path").await.unwrap();
        assert_eq!(show("search_path").await, "\"$user\", public");
        c.batch_execute("BEGIN").await.unwrap();
        assert_eq!(show("search_path").await, "\"$user\", public");
        c.batch_execute("COMMIT").await.unwrap();
        // A failed SET is not replayed anywhere.
        assert!(c
            .batch_execute("SET statement_timeout = 'soon'")
            .await
            .is_err());
        c.batch_execute("BEGIN").await.unwrap();
        assert_eq!(show("statement_timeout").await, "4321ms");
        c.batch_execute("COMMIT").await.unwrap();
        p.shutdown().await;
    });
}

#[test]
fn pins_keep_the_session_on_the_primary_until_released() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let (c, mut conn) = tokio_postgres::connect(&url(&p), tokio_postgres::NoTls)
            .await
            .unwrap();
        let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx))
                .await
                .map(Some)
                .unwrap_or(None)
            {
                if let AsyncMessage::Notification(n) = m {
                    let _ = tx.send(n.payload().to_string());
                }
            }
        });
        assert!(on_replica(&c).await);
        c.batch_execute("LISTEN jobs").await.unwrap();
        assert!(!on_replica(&c).await, "LISTEN pins");
        let other = connect(&url(&p)).await;
        other.batch_execute("NOTIFY jobs, 'job-1'").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), notes.recv())
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some("job-1"));
        c.batch_execute("UNLISTEN *").await.unwrap();
        assert!(on_replica(&c).await, "UNLISTEN * releases");

        c.batch_execute("CREATE TEMP TABLE scratch (a int); INSERT INTO scratch VALUES (1)")
            .await
            .unwrap();
        let n: i64 = c
            .query_one("SELECT count(*) FROM scratch", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "temp table readable: the session is on the primary");
        c.batch_execute("DISCARD ALL").await.unwrap();
        assert!(on_replica(&c).await, "DISCARD ALL releases");

        c.batch_execute("SELECT pg_advisory_lock(42)")
            .await
            .unwrap();
        assert!(!on_replica(&c).await, "advisory lock pins");
        c.batch_execute("SELECT pg_advisory_unlock_all()")
            .await
            .unwrap();
        assert!(on_replica(&c).await, "unlock releases");
        p.shutdown().await;
    });
}

#[test]
fn a_write_hidden_in_a_function_is_retried_on_the_primary_once() {
    run(async {
        let direct = on_primary(
            "DROP TABLE IF EXISTS hidden_t; CREATE TABLE hidden_t (a int);
                 CREATE OR REPLACE FUNCTION write_hidden() RETURNS int LANGUAGE sql AS
                 $$ INSERT INTO hidden_t VALUES (1) RETURNING 1 $$;",
        )
        .await;
        let p = proxy(REPLICA, |_| {}).await;
        let c = connect(&url(&p)).await;
        for _ in 0..3 {
            let rows = c.simple_query("SELECT write_hidden()").await.unwrap();
            assert!(matches!(&rows[1], SimpleQueryMessage::Row(r) if r.get(0) == Some("1")));
        }
        let n: i64 = direct
            .query_one("SELECT count(*) FROM hidden_t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 3, "each call ran exactly once");
        // A read after it still goes to the replica.
        assert!(on_replica_simple(&c, "").await);
        p.shutdown().await;
    });
}

#[test]
fn pgbench_tpcb_through_pgnear_adds_up() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let o = cluster().options();
        let direct = cluster().primary().addr();
        let init = std::process::Command::new("pgbench")
            .args([
                "-i",
                "-s",
                "1",
                "-q",
                "-h",
                &direct.ip().to_string(),
                "-p",
                &direct.port().to_string(),
                "-U",
                &o.app_user,
                &o.database,
            ])
            .env("PGPASSWORD", &o.app_password)
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        for mode in ["simple", "extended", "prepared"] {
            let out = std::process::Command::new("pgbench")
                .args([
                    "-n",
                    "-M",
                    mode,
                    "-c",
                    "4",
                    "-j",
                    "2",
                    "-t",
                    "100",
                    "-h",
                    "127.0.0.1",
                ])
                .args([
                    "-p",
                    &p.addr().port().to_string(),
                    "-U",
                    &o.app_user,
                    &o.database,
                ])
                .env("PGPASSWORD", &o.app_password)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{mode}: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                stdout.contains("number of transactions actually processed: 400/400"),
                "{mode}: {stdout}"
            );
            assert!(
                stdout.contains("number of failed transactions: 0"),
                "{mode}: {stdout}"
            );
        }
        let admin = connect(&cluster().primary_url_from(PRIMARY)).await;
        let sums = admin
            .query_one(
                "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::bigint,
                        (SELECT sum(tbalance) FROM pgbench_tellers)::bigint,
                        (SELECT sum(bbalance) FROM pgbench_branches)::bigint,
                        (SELECT sum(delta) FROM pgbench_history)::bigint,
                        (SELECT count(*) FROM pgbench_history)",
                &[],
            )
            .await
            .unwrap();
        let (a, t, b, h, n): (i64, i64, i64, i64, i64) = (
            sums.get(0),
            sums.get(1),
            sums.get(2),
            sums.get(3),
            sums.get(4),
        );
        assert_eq!(n, 1200);
        assert_eq!((a, t, b), (h, h, h));
        p.shutdown().await;
    });
}

/// A batch pgnear refuses (replay mode) leaves nothing behind: the client got no
/// ParseComplete, so the statement it named does not exist for it, and parsing that name
/// again works, as on a server that never saw it.
#[test]
fn a_refused_batch_leaves_no_statement_behind() {
    use tokio::io::AsyncWriteExt;
    run(async {
        on_primary("CREATE TABLE IF NOT EXISTS replayed (a int)").await;
        use pgnear::config::{AuthMethod, PoolMode, WriteMode};
        for pool in [PoolMode::Session, PoolMode::Transaction] {
            let p = proxy(REPLICA, |c| {
                c.routing.write_mode = WriteMode::Replay;
                c.auth.method = Some(AuthMethod::Trust);
                c.pool.mode = pool;
            })
            .await;
            let mut s = raw_session(&p).await;
            let refused = [
                parse_msg("s1", "INSERT INTO replayed VALUES (1)"),
                bind_msg("", "s1", &[]),
                execute_msg(""),
                sync_msg(),
            ]
            .concat();
            s.write_all(&refused).await.unwrap();
            let got = until_ready(&mut s).await;
            assert_eq!(tags(&got), "EZ", "{pool:?}");
            assert_eq!(error_codes(&got), ["25006"], "{pool:?}");
            let again = [
                parse_msg("s1", "SELECT 1"),
                bind_msg("", "s1", &[]),
                execute_msg(""),
                sync_msg(),
            ]
            .concat();
            s.write_all(&again).await.unwrap();
            let got = until_ready(&mut s).await;
            assert_eq!(tags(&got), "12DCZ", "{pool:?}: {:?}", error_codes(&got));
            p.shutdown().await;
        }
    });
}

#[test]
fn replay_mode_refuses_writes_outside_the_primary_region() {
    run(async {
        let direct = on_primary("CREATE TABLE IF NOT EXISTS replayed (a int)").await;
        let replay = |c: &mut pgnear::config::Config| {
            c.routing.write_mode = pgnear::config::WriteMode::Replay
        };
        let p = proxy(REPLICA, replay).await;
        let c = connect(&url(&p)).await;
        for write in ["INSERT INTO replayed VALUES (1)", "BEGIN"] {
            let e = c.batch_execute(write).await.unwrap_err();
            let db = e.as_db_error().expect("a 25006 error");
            assert_eq!(db.code().code(), "25006", "{write}");
            assert!(
                db.message().contains("primary region iad"),
                "{}",
                db.message()
            );
            assert_eq!(
                db.hint(),
                Some("Replay the request in region iad (fly-replay: region=iad).")
            );
        }
        // Extended protocol too, and the session stays usable.
        let e = c
            .execute("INSERT INTO replayed VALUES ($1)", &[&2i32])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "25006");
        // Reads stay local; read-only transactions are fine.
        assert!(on_replica(&c).await);
        c.batch_execute("BEGIN READ ONLY").await.unwrap();
        assert!(on_replica(&c).await);
        c.batch_execute("COMMIT").await.unwrap();
        let rows = c.simple_query("SHOW pgnear.write_mode").await.unwrap();
        assert!(matches!(&rows[1], SimpleQueryMessage::Row(r) if r.get(0) == Some("replay")));
        // Per session: forward.
        c.batch_execute("SET pgnear.write_mode = 'forward'")
            .await
            .unwrap();
        c.batch_execute("INSERT INTO replayed VALUES (3)")
            .await
            .unwrap();
        let n: i64 = direct
            .query_one("SELECT count(*) FROM replayed", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "only the forwarded write reached the primary");
        // In the primary region replay mode forwards everything.
        let home = proxy(PRIMARY, replay).await;
        let h = connect(&url(&home)).await;
        h.batch_execute("INSERT INTO replayed VALUES (4)")
            .await
            .unwrap();
        p.shutdown().await;
        home.shutdown().await;
    });
}

#[test]
fn a_fenced_primary_refusing_writes_is_passed_through_once() {
    run(async {
        let direct = on_primary("CREATE TABLE IF NOT EXISTS fenced (a int)").await;
        let p = proxy(REPLICA, |_| {}).await;
        let c = connect(&url(&p)).await;
        // A read-only primary (as a fenced primary would be) answers writes with 25006.
        c.batch_execute("SET pgnear.route = 'primary'")
            .await
            .unwrap();
        c.batch_execute("SET default_transaction_read_only = on")
            .await
            .unwrap();
        let e = c
            .batch_execute("INSERT INTO fenced VALUES (1)")
            .await
            .unwrap_err();
        let db = e.as_db_error().expect("the primary's own error");
        assert_eq!(db.code().code(), "25006");
        assert!(
            db.message().contains("read-only transaction"),
            "{}",
            db.message()
        );
        c.batch_execute("RESET default_transaction_read_only")
            .await
            .unwrap();
        c.batch_execute("SET pgnear.route = 'auto'").await.unwrap();
        let n: i64 = direct
            .query_one("SELECT count(*) FROM fenced", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
        p.shutdown().await;
    });
}

#[test]
fn begin_then_set_transaction_read_only_runs_on_the_replica() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let c = connect(&url(&p)).await;
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute("SET TRANSACTION READ ONLY").await.unwrap();
        assert!(on_replica(&c).await, "read-only transaction on the replica");
        let e = c
            .batch_execute("CREATE TABLE nope_ro (a int)")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "25006");
        c.batch_execute("ROLLBACK").await.unwrap();
        // A plain BEGIN: the transaction runs on the primary, reads included.
        c.batch_execute("BEGIN").await.unwrap();
        assert!(!on_replica(&c).await);
        c.batch_execute("COMMIT").await.unwrap();
        // BEGIN then COMMIT with nothing in between, and pipelined BEGIN/statement/COMMIT.
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute("COMMIT").await.unwrap();
        let rows = c
            .simple_query("BEGIN; SELECT pg_is_in_recovery(); COMMIT")
            .await
            .unwrap();
        assert!(rows
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("f"))));
        let c = &c;
        let results = join_all((0..9).map(|i| async move {
            if i % 3 == 0 {
                c.simple_query("BEGIN").await.map(|_| ())
            } else if i % 3 == 1 {
                c.simple_query("SELECT 1").await.map(|_| ())
            } else {
                c.simple_query("COMMIT").await.map(|_| ())
            }
        }))
        .await;
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        assert!(on_replica(c).await);
        p.shutdown().await;
    });
}

#[test]
fn preparing_a_write_is_not_a_write() {
    run(async {
        on_primary("CREATE TABLE IF NOT EXISTS prepared_w (a int)").await;
        let p = proxy(REPLICA, |_| {}).await;
        let c = connect(&url(&p)).await;
        let insert = c
            .prepare("INSERT INTO prepared_w VALUES ($1)")
            .await
            .unwrap();
        let token = |rows: Vec<SimpleQueryMessage>| first_value(&rows).expect("a row");
        assert_eq!(
            token(c.simple_query("SHOW pgnear.write_lsn").await.unwrap()),
            "",
            "no write yet"
        );
        // Executed, it runs on the primary (re-prepared there) and is a write.
        c.execute(&insert, &[&1i32]).await.unwrap();
        assert!(token(c.simple_query("SHOW pgnear.write_lsn").await.unwrap()).contains('/'));
        p.shutdown().await;
    });
}

#[test]
fn a_sync_follows_the_flush_ended_exchange_it_closes() {
    run(async {
        use tokio::io::AsyncWriteExt;
        let direct = on_primary("CREATE TABLE IF NOT EXISTS flushed (a int)").await;
        let p = proxy(REPLICA, |c| {
            c.auth.method = Some(pgnear::config::AuthMethod::Trust)
        })
        .await;
        let mut s = raw_session(&p).await;
        // Parse/Bind/Execute of a write, then Flush: the primary runs it in an implicit
        // transaction that only the Sync ends.
        let mut msgs = frame(b'P', b"\0INSERT INTO flushed VALUES (7)\0\0\0");
        msgs.extend(frame(b'B', b"\0\0\0\0\0\0\0\0"));
        msgs.extend(frame(b'E', b"\0\0\0\0\0"));
        msgs.extend(frame(b'H', b""));
        s.write_all(&msgs).await.unwrap();
        assert_eq!(read_until(&mut s, b'C').await, b"12C");
        // The lone Sync must reach the primary and commit there.
        s.write_all(&frame(b'S', b"")).await.unwrap();
        read_until(&mut s, b'Z').await;
        let n: i64 = direct
            .query_one("SELECT count(*) FROM flushed WHERE a = 7", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "committed on the primary");
        p.shutdown().await;
    });
}

/// Drivers that prepare everything (psycopg after a few runs, asyncpg, pgjdbc) send pgnear's
/// in-band commands through Parse/Bind/Execute; pgnear answers them there too, without
/// pinning the session.
#[test]
fn pgnear_commands_in_the_extended_protocol() {
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let c = connect(&url(&p)).await;
        for _ in 0..3 {
            let row = c.query_one("SHOW pgnear.region", &[]).await.unwrap();
            assert_eq!(row.get::<_, String>(0), REPLICA);
            assert_eq!(row.columns()[0].name(), "pgnear.region");
        }
        let show = c.prepare("SHOW pgnear.route").await.unwrap();
        assert_eq!(show.params().len(), 0);
        assert_eq!(show.columns()[0].name(), "pgnear.route");
        async fn route(c: &Client, show: &tokio_postgres::Statement) -> String {
            c.query_one(show, &[]).await.unwrap().get(0)
        }
        assert_eq!(route(&c, &show).await, "auto");
        assert!(on_replica(&c).await, "reads stay on the replica");
        c.execute("SET pgnear.route = 'primary'", &[])
            .await
            .unwrap();
        assert_eq!(route(&c, &show).await, "primary");
        assert!(
            !on_replica(&c).await,
            "the session's reads go to the primary"
        );
        c.execute("RESET pgnear.route", &[]).await.unwrap();
        assert_eq!(route(&c, &show).await, "auto");
        assert!(on_replica(&c).await);
        let e = c
            .query_one("SHOW pgnear.nonsense", &[])
            .await
            .expect_err("an unknown setting");
        assert_eq!(sqlstate(&e), "42704", "{e}");
        // The write position arrives through the extended protocol as well.
        c.execute("CREATE TABLE IF NOT EXISTS ext_pgnear (a int)", &[])
            .await
            .unwrap();
        let lsn: String = c
            .query_one("SHOW pgnear.write_lsn", &[])
            .await
            .unwrap()
            .get(0);
        assert!(lsn.contains('/'), "{lsn}");
        drop(show);
        p.shutdown().await;
    });
}
