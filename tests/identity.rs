//! Identity: a client is the role it logs in as. With `auth.users = "url"` another role is
//! refused (28000) whatever the auth method; with `"query"` every role the primary knows logs in
//! with its own password (SCRAM or md5 verifier, looked up on the primary) and its statements run
//! as that role on the primary and on the replica, in session and transaction mode.

mod common;

use std::time::Duration;

use common::*;
use pgnear::config::{AuthMethod, AuthUsers, Config, HumanDuration, PoolMode};
use pgnear::lab::cluster::VERIFIER_QUERY;
use tokio_postgres::{Client, NoTls};

const HANG: Duration = Duration::from_secs(60);

fn query_mode(method: AuthMethod) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.auth.users = AuthUsers::Query;
        c.auth.query = VERIFIER_QUERY.to_string();
        c.auth.method = Some(method);
    }
}

async fn try_connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// current_user, session_user, and whether the replica answered.
async fn whoami(c: &Client) -> (String, String, bool) {
    let rows = c
        .simple_query("SELECT current_user, session_user, pg_is_in_recovery()")
        .await
        .unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    (
        row.get(0).unwrap().to_string(),
        row.get(1).unwrap().to_string(),
        row.get(2) == Some("t"),
    )
}

/// A table the app owns and no other role may read.
async fn private_table() {
    on_primary(
        "CREATE TABLE IF NOT EXISTS identity_private (v int); \
         REVOKE ALL ON identity_private FROM PUBLIC",
    )
    .await;
}

/// Runs `sql` on the primary as the superuser and waits until the replicas have it.
async fn as_superuser(sql: &str) {
    primary_admin().await.batch_execute(sql).await.unwrap();
    cluster().wait_replicas_caught_up().await.unwrap();
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or(e.to_string(), |d| d.message().to_string())
}

#[test]
fn another_role_is_refused_by_default_in_every_auth_method() {
    let _serial = serial();
    run(async {
        for method in [AuthMethod::Trust, AuthMethod::Md5, AuthMethod::ScramSha256] {
            let p = proxy(PRIMARY, |c| c.auth.method = Some(method)).await;
            for (user, password) in [("reporter", "reporter-secret"), ("nosuchuser", "x")] {
                let e = try_connect(&url_with(&p, user, password, ""))
                    .await
                    .err()
                    .unwrap_or_else(|| panic!("{user} was let in with {method:?}"));
                assert_eq!(sqlstate(&e), "28000", "{method:?} {user}: {e}");
                assert_eq!(message(&e), "pgnear serves role \"app\" only", "{e}");
            }
            let c = connect(&url(&p)).await;
            assert_eq!(whoami(&c).await.0, "app");
            p.shutdown().await;
        }
    });
}

#[test]
fn each_role_logs_in_as_itself_in_both_regions() {
    let _serial = serial();
    run(async {
        private_table().await;
        // Right passwords, but one role may not log in and the other has expired.
        as_superuser(
            "DROP ROLE IF EXISTS identity_nologin; DROP ROLE IF EXISTS identity_expired; \
             CREATE ROLE identity_nologin NOLOGIN PASSWORD 'nologin-secret'; \
             CREATE ROLE identity_expired LOGIN PASSWORD 'expired-secret' VALID UNTIL '2001-01-01'",
        )
        .await;
        let direct = try_connect(&format!(
            "postgres://reporter:reporter-secret@{}/app?sslmode=disable",
            cluster().primary().addr()
        ))
        .await
        .unwrap();
        let on_postgres = direct
            .simple_query("SELECT * FROM identity_private")
            .await
            .unwrap_err();
        for region in [PRIMARY, REPLICA] {
            let p = proxy(region, query_mode(AuthMethod::Md5)).await;
            for (user, password) in [
                ("reporter", "reporter-secret"),
                ("legacy", "legacy-secret"),
                ("app", cluster().options().app_password.as_str()),
            ] {
                let c = try_connect(&url_with(&p, user, password, ""))
                    .await
                    .unwrap_or_else(|e| panic!("{user} in {region}: {e}"));
                let (current, session, on_replica) = whoami(&c).await;
                assert_eq!((current.as_str(), session.as_str()), (user, user));
                assert_eq!(on_replica, region == REPLICA, "{user} in {region}");
                if user != "app" {
                    // Its own privileges, on the replica as on the primary.
                    let e = c
                        .simple_query("SELECT * FROM identity_private")
                        .await
                        .unwrap_err();
                    assert_eq!(sqlstate(&e), "42501", "{user} in {region}: {e}");
                    assert_eq!(message(&e), message(&on_postgres));
                    let e = c
                        .simple_query("INSERT INTO identity_private VALUES (1)")
                        .await
                        .unwrap_err();
                    assert_eq!(sqlstate(&e), "42501", "{user} in {region}: {e}");
                }
            }
            for (user, password) in [
                ("reporter", "wrong"),
                ("legacy", "wrong"),
                ("nosuchuser", "x"),
                ("app", "wrong"),
                ("identity_nologin", "nologin-secret"),
                ("identity_expired", "expired-secret"),
            ] {
                let e = try_connect(&url_with(&p, user, password, ""))
                    .await
                    .err()
                    .unwrap_or_else(|| panic!("{user} was let in with a wrong password"));
                assert_eq!(sqlstate(&e), "28P01", "{user}: {e}");
                assert_eq!(
                    message(&e),
                    format!("password authentication failed for user \"{user}\"")
                );
            }
            p.shutdown().await;
        }
        // With scram-sha-256 demanded, an md5 verifier cannot serve (as in Postgres).
        let p = proxy(REPLICA, query_mode(AuthMethod::ScramSha256)).await;
        let e = try_connect(&url_with(&p, "legacy", "legacy-secret", ""))
            .await
            .map(drop)
            .expect_err("legacy let in by SCRAM with an md5 verifier");
        assert_eq!(sqlstate(&e), "28P01", "{e}");
        let c = try_connect(&url_with(&p, "reporter", "reporter-secret", ""))
            .await
            .unwrap();
        assert_eq!(whoami(&c).await.0, "reporter");
        p.shutdown().await;
    });
}

/// 200 clients of 4 roles at once, in transaction mode with pipelined replica reads: every
/// statement, in every transaction, runs as the client's own role.
#[test]
fn many_roles_at_once_in_transaction_mode() {
    let _serial = serial();
    run(async {
        as_superuser(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'auditor') \
             THEN CREATE ROLE auditor LOGIN PASSWORD 'auditor-secret'; END IF; END $$",
        )
        .await;
        let p = proxy(REPLICA, |c| {
            query_mode(AuthMethod::Md5)(c);
            c.pool.mode = PoolMode::Transaction;
            c.pool.pipeline = 2;
        })
        .await;
        let app_password = cluster().options().app_password.clone();
        let roles = [
            ("app", app_password.as_str()),
            ("reporter", "reporter-secret"),
            ("legacy", "legacy-secret"),
            ("auditor", "auditor-secret"),
        ];
        let clients = join_all((0..200).map(|i| {
            let (user, password) = roles[i % roles.len()];
            let u = url_with(&p, user, password, "");
            async move { (user, try_connect(&u).await.unwrap()) }
        }))
        .await;
        let checked = join_all(clients.iter().map(|(user, c)| async move {
            let mut n = 0;
            for _ in 0..5 {
                // An autocommit read (replica), a transaction on the primary, a prepared read.
                assert_eq!(whoami(c).await.0, *user);
                let tx = c
                    .simple_query("BEGIN; SELECT current_user, txid_current() IS NOT NULL; COMMIT")
                    .await
                    .unwrap();
                assert_eq!(first_value(&tx).as_deref(), Some(*user));
                let row = c.query_one("SELECT current_user::text", &[]).await.unwrap();
                assert_eq!(row.get::<_, String>(0), *user);
                n += 3;
            }
            n
        }))
        .await;
        assert_eq!(checked.iter().sum::<usize>(), 200 * 15);
        // Per role in /status and the metrics: its clients, its server connections.
        let (_, body) = http_get(p.admin_addr(), "/status").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        for (user, _) in roles {
            let r = &v["roles"][user];
            assert_eq!(r["clients"], 50, "{user}: {body}");
            assert!(
                r["primary"]["connections"].as_u64().unwrap() > 0,
                "{user}: {body}"
            );
            assert!(r["replica"]["connections"].is_u64(), "{user}: {body}");
            let series = format!("pgnear_role_clients{{role=\"{user}\"}}");
            assert_eq!(metric(&p, &series).await, 50.0);
        }
        assert!(!body.contains("secret"), "no password in /status: {body}");
        p.shutdown().await;
    });
}

#[test]
fn a_password_change_takes_effect_within_the_cache_bound() {
    let _serial = serial();
    run(async {
        let p = proxy(REPLICA, |c| {
            query_mode(AuthMethod::ScramSha256)(c);
            c.auth.cache_ttl = HumanDuration(Duration::from_secs(1));
        })
        .await;
        let old = url_with(&p, "reporter", "reporter-secret", "");
        let new = url_with(&p, "reporter", "reporter-changed", "");
        try_connect(&old).await.unwrap();
        let admin = primary_admin().await;
        admin
            .batch_execute("ALTER ROLE reporter PASSWORD 'reporter-changed'")
            .await
            .unwrap();
        cluster().wait_replicas_caught_up().await.unwrap();
        let started = std::time::Instant::now();
        eventually("the new password to work", HANG, || async {
            try_connect(&new).await.is_ok()
        })
        .await;
        let took = started.elapsed();
        let c = try_connect(&new).await.unwrap();
        assert_eq!(
            whoami(&c).await,
            ("reporter".into(), "reporter".into(), true)
        );
        let e = try_connect(&old)
            .await
            .map(drop)
            .expect_err("the old password still works");
        assert_eq!(sqlstate(&e), "28P01", "{e}");
        admin
            .batch_execute("ALTER ROLE reporter PASSWORD 'reporter-secret'")
            .await
            .unwrap();
        cluster().wait_replicas_caught_up().await.unwrap();
        eprintln!("a password change took effect through pgnear after {took:?} (cache_ttl 1s)");
        p.shutdown().await;
    });
}

/// `SET ROLE` is session state: it holds on both servers and never reaches another session.
#[test]
fn set_role_is_session_state() {
    let _serial = serial();
    run(async {
        as_superuser("GRANT reporter TO app").await;
        let p = proxy(REPLICA, |c| {
            c.pool.mode = PoolMode::Transaction;
            c.pool.primary_size = 2;
            c.pool.replica_size = 2;
        })
        .await;
        let a = connect(&url(&p)).await;
        let b = connect(&url(&p)).await;
        a.batch_execute("SET ROLE reporter").await.unwrap();
        for _ in 0..3 {
            let (current, session, on_replica) = whoami(&a).await;
            assert_eq!(
                (current.as_str(), session.as_str(), on_replica),
                ("reporter", "app", true)
            );
            let on_primary = a
                .simple_query("SELECT current_user, txid_current()")
                .await
                .unwrap();
            assert_eq!(first_value(&on_primary).as_deref(), Some("reporter"));
            assert_eq!(whoami(&b).await.0, "app");
            let on_primary = b
                .simple_query("SELECT current_user, txid_current()")
                .await
                .unwrap();
            assert_eq!(first_value(&on_primary).as_deref(), Some("app"));
        }
        a.batch_execute("RESET ROLE").await.unwrap();
        assert_eq!(whoami(&a).await.0, "app");
        p.shutdown().await;
    });
}

/// A busy role does not keep another out: in transaction mode with a small pool, 12 clients of
/// the URL's role keep every connection busy, and a client of another role still gets its
/// statements run (the busy role's idle connections give way, and it stays within its share).
#[test]
fn a_busy_role_leaves_room_for_another() {
    let _serial = serial();
    run(async {
        let p = proxy(PRIMARY, |c| {
            query_mode(AuthMethod::Md5)(c);
            c.pool.mode = PoolMode::Transaction;
            c.pool.primary_size = 4;
            c.pool.acquire_timeout = HumanDuration(Duration::from_secs(30));
        })
        .await;
        let busy = join_all((0..12).map(|_| {
            let u = url(&p);
            async move { connect(&u).await }
        }))
        .await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load: Vec<_> = busy
            .into_iter()
            .map(|c| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        c.batch_execute("SELECT pg_sleep(0.02)").await.unwrap();
                    }
                })
            })
            .collect();
        // Every connection of the pool is open, for the busy role.
        eventually("the busy role to fill the pool", HANG, || async {
            let (_, body) = http_get(p.admin_addr(), "/status").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["roles"]["app"]["primary"]["connections"] == 4
        })
        .await;
        let reporter = try_connect(&url_with(&p, "reporter", "reporter-secret", ""))
            .await
            .unwrap();
        for _ in 0..20 {
            let rows = tokio::time::timeout(HANG, reporter.simple_query("SELECT current_user"))
                .await
                .expect("the other role's statement waited too long")
                .unwrap();
            assert_eq!(first_value(&rows).as_deref(), Some("reporter"));
        }
        let (_, body) = http_get(p.admin_addr(), "/status").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let app = v["roles"]["app"]["primary"]["connections"]
            .as_u64()
            .unwrap();
        let other = v["roles"]["reporter"]["primary"]["connections"]
            .as_u64()
            .unwrap();
        assert!(other >= 1 && app + other <= 4, "{body}");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for l in load {
            l.await.unwrap();
        }
        p.shutdown().await;
    });
}

#[test]
fn pgnear_check_shows_which_roles_are_served() {
    let url_mode = pgnear::check_report(&config(PRIMARY, |_| {}));
    assert!(
        url_mode.contains("role \"app\" only (auth.users = \"url\")"),
        "{url_mode}"
    );
    let query = pgnear::check_report(&config(PRIMARY, query_mode(AuthMethod::ScramSha256)));
    assert!(query.contains("any role the primary knows"), "{query}");
    assert!(query.contains("users = \"query\""), "{query}");
    assert!(query.contains(VERIFIER_QUERY), "{query}");
}
