//! No secrets in the logs: with every event enabled (TRACE) and captured in memory, a workload of
//! logins (right and wrong password), a write, reads with a bind parameter and a cancel leaves no
//! password and no parameter value in what pgnear (and the lab) logged.
//!
//! Its own binary: the capturing subscriber is the process-wide default (pgnear's tasks run on the
//! runtime's worker threads), installed before the lab cluster starts.

mod common;

use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use common::*;

/// An `io::Write` that appends to a shared buffer.
#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The process-wide TRACE subscriber, installed on first use; returns its buffer.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buffer.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this binary");
        buffer
    })
}

fn logs() -> String {
    let bytes = captured().lock().unwrap_or_else(|e| e.into_inner()).clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The log lines containing `needle` (for a failure message that does not dump everything).
fn lines_with<'a>(logs: &'a str, needle: &str) -> Vec<&'a str> {
    logs.lines().filter(|l| l.contains(needle)).collect()
}

const PARAM: &str = "param-value-7f3a";
const WRONG_PASSWORD: &str = "wrong-pw-c41d9e";

#[test]
fn logs_hold_no_passwords_and_no_parameter_values() {
    captured(); // before the cluster starts, so the lab's own events are captured too
    run(async {
        let p = proxy(REPLICA, |_| {}).await;
        let o = cluster().options();

        // A wrong password, then the right one.
        let e = tokio_postgres::connect(
            &url_with(&p, &o.app_user, WRONG_PASSWORD, ""),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .expect("a wrong password is refused");
        assert_eq!(sqlstate(&e), "28P01", "{e}");
        let c = connect(&url(&p)).await;

        // A write with a bind parameter, then reads with it (the replica waits for the write).
        c.batch_execute("CREATE TABLE IF NOT EXISTS log_secrets (v text)")
            .await
            .unwrap();
        let n = c
            .execute("INSERT INTO log_secrets (v) VALUES ($1)", &[&PARAM])
            .await
            .unwrap();
        assert_eq!(n, 1);
        let row = c
            .query_one(
                "SELECT count(*), pg_is_in_recovery() FROM log_secrets WHERE v = $1",
                &[&PARAM],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 1);
        assert!(row.get::<_, bool>(1), "the read ran on the replica");
        let echoed: String = c
            .query_one("SELECT $1::text", &[&PARAM])
            .await
            .unwrap()
            .get(0);
        assert_eq!(echoed, PARAM);

        // A cancel of a running read.
        drop(assert_cancel_stops_a_sleep(c).await);
        p.shutdown().await;
    });

    let logs = logs();
    // The capture is real: startup, the refused login and the session's routing were logged.
    for expected in ["pgnear listening", "client refused", "request routed"] {
        assert!(
            logs.contains(expected),
            "{expected:?} was not captured; {} bytes of logs",
            logs.len()
        );
    }
    let superuser = cluster().superuser_password();
    assert!(superuser.len() >= 8, "a real superuser password");
    let secrets = [
        (
            "the app password",
            cluster().options().app_password.as_str(),
        ),
        ("the superuser password", superuser),
        ("the wrong password", WRONG_PASSWORD),
        ("a bind parameter value", PARAM),
    ];
    for (what, secret) in secrets {
        let found = lines_with(&logs, secret);
        assert!(found.is_empty(), "{what} is in the logs:\n{found:#?}");
    }
}
