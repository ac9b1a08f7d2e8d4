//! Shared test harness: one lab cluster per test binary (a real primary and a streaming replica),
//! one runtime, and helpers to start pgnear instances on ephemeral ports.

#![allow(dead_code)] // each test binary uses its own subset of these helpers

pub mod frozen;
pub mod netns;
pub mod wire;

pub use wire::*;

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use pgnear::config::Config;
use pgnear::lab::cluster::{Cluster, ClusterOptions};
use pgnear::Proxy;
use tokio::runtime::Runtime;
use tokio_postgres::{Client, NoTls};

pub const PRIMARY: &str = "iad";
pub const REPLICA: &str = "syd";

pub fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime")
    })
}

/// Serializes the tests of a binary that change the shared cluster (pause replay, stop
/// servers) or count its connections.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a test body on the shared runtime, bounded so that a hang fails instead of blocking CI.
pub fn run<F: Future<Output = ()>>(f: F) {
    cluster();
    rt().block_on(async {
        tokio::time::timeout(Duration::from_secs(120), f)
            .await
            .expect("test timed out after 120 s");
    })
}

/// The binary's cluster: primary in `iad`, replica in `syd`, no added latency.
/// Stopped by the lab's watchdog when the test process exits.
pub fn cluster() -> &'static Cluster {
    cluster_with(&[PRIMARY, REPLICA])
}

/// The binary's cluster, started with `regions` (primary first) when this is the first call: a
/// binary that needs other regions calls it before anything else in each of its tests.
pub fn cluster_with(regions: &[&str]) -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_ansi(false)
            .with_test_writer()
            .try_init();
        rt().block_on(async {
            Cluster::start(ClusterOptions {
                regions: regions.iter().map(|r| r.to_string()).collect(),
                one_way_delay: Duration::ZERO,
                ..ClusterOptions::default()
            })
            .await
            .expect("starting the lab cluster")
        })
    })
}

/// The lab config for a pgnear in `region`, adjusted by `tweak`.
pub fn config(region: &str, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut c = pgnear::lab::proxy_config(cluster(), region);
    tweak(&mut c);
    c.validate().expect("test config is valid");
    c
}

pub async fn proxy(region: &str, tweak: impl FnOnce(&mut Config)) -> Proxy {
    Proxy::start(config(region, tweak))
        .await
        .expect("starting pgnear")
}

pub fn url(proxy: &Proxy) -> String {
    pgnear::lab::proxy_url(cluster(), proxy)
}

pub fn url_with(proxy: &Proxy, user: &str, password: &str, extra: &str) -> String {
    let o = cluster().options();
    format!(
        "postgres://{user}:{password}@{}/{}?sslmode=disable{extra}",
        proxy.addr(),
        o.database
    )
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connecting");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A superuser connection straight to the primary (no pgnear).
pub async fn primary_admin() -> Client {
    connect(&superuser_url(cluster().primary().addr())).await
}

/// A superuser connection straight to the replica (no pgnear).
pub async fn replica_admin() -> Client {
    connect(&superuser_url(
        cluster().replica(REPLICA).unwrap().node.addr(),
    ))
    .await
}

/// The superuser's URL for the lab node at `addr`.
fn superuser_url(addr: std::net::SocketAddr) -> String {
    format!(
        "postgres://postgres:{}@{addr}/postgres?sslmode=disable",
        cluster().superuser_password()
    )
}

/// Runs psql with `url` and the given extra arguments; returns (success, stdout, stderr).
pub fn psql(url: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("psql")
        .arg(url)
        .args(["-X", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql is installed");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `check` every 50 ms until it returns true; panics with `what` after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no sqlstate: {e}"))
}

/// Polls all futures concurrently (tokio-postgres pipelines them on one connection).
pub async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out = Vec::with_capacity(handles.len());
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(results.into_iter().map(|r| r.unwrap()));
    out
}

/// A raw protocol startup through pgnear at `addr` (user and database of the lab, trust auth)
/// with `extra` parameters: the stream and the BackendKeyData (pid, secret) once ReadyForQuery
/// arrived. Panics on an ErrorResponse.
pub async fn startup(
    addr: std::net::SocketAddr,
    extra: &[(&str, &str)],
) -> (tokio::net::TcpStream, [u8; 8]) {
    use tokio::io::AsyncWriteExt;
    let o = cluster().options();
    let mut params = vec![
        ("user", o.app_user.as_str()),
        ("database", o.database.as_str()),
    ];
    params.extend_from_slice(extra);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&startup_packet(&params, 196608)).await.unwrap();
    let mut key = [0u8; 8];
    loop {
        let (tag, body) = read_frame(&mut s).await;
        match tag {
            b'K' => key.copy_from_slice(&body[..8]),
            b'E' => panic!("startup refused: {:?}", error_field(&body, b'M')),
            b'Z' => return (s, key),
            _ => {}
        }
    }
}

/// A raw protocol connection through `proxy` (which must use trust auth), after its startup.
pub async fn raw_session(proxy: &Proxy) -> tokio::net::TcpStream {
    startup(proxy.addr(), &[]).await.0
}

/// The first column of the first row of a simple-query answer.
pub fn first_value(messages: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => {
            Some(r.get(0).unwrap_or_default().to_string())
        }
        _ => None,
    })
}

/// A minimal HTTP/1.1 GET (`Connection: close`) to pgnear's admin listener: the status code and
/// the body. Admin answers carry a content-length (never chunked); that is asserted.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting to admin");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "admin answers carry a content-length"
    );
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head}"));
    (status, body.to_string())
}

/// Runs `pg_sleep(60)` on `c`, cancels it through pgnear once it runs on a server, asserts
/// 57014, and hands `c` back.
pub async fn assert_cancel_stops_a_sleep(c: tokio_postgres::Client) -> tokio_postgres::Client {
    use std::sync::atomic::{AtomicU64, Ordering};
    // A name of its own, so that another test's sleep is not taken for this one.
    static SLEEPS: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "cancelled_sleep_{}_{}",
        std::process::id(),
        SLEEPS.fetch_add(1, Ordering::Relaxed)
    );
    let token = c.cancel_token();
    let sql = format!("SELECT pg_sleep(60) AS {name}");
    let sleeper = tokio::spawn(async move {
        let r = c.simple_query(&sql).await;
        (r.map(|_| ()), c)
    });
    // A cancel that reaches the server before the query does cancels nothing: wait until the
    // sleep runs. pgnear may have sent it to the primary or to the replica, so ask both. (A
    // server that cannot be reached is just not the one running it.)
    let mut servers = Vec::new();
    let replica = cluster().replica(REPLICA).map(|r| r.node.addr());
    for addr in std::iter::once(cluster().primary().addr()).chain(replica) {
        if let Ok((client, conn)) = tokio_postgres::connect(&superuser_url(addr), NoTls).await {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            servers.push(client);
        }
    }
    let running = format!(
        "SELECT 1 FROM pg_stat_activity WHERE state = 'active' \
         AND query LIKE '%pg_sleep(60) AS {name}%' AND pid <> pg_backend_pid()"
    );
    eventually(
        "the pg_sleep(60) to be active on the primary or the replica",
        Duration::from_secs(60),
        || async {
            assert!(
                !sleeper.is_finished(),
                "pg_sleep(60) ended before it was seen running"
            );
            for s in &servers {
                if let Ok(Some(_)) = s.query_opt(&running, &[]).await {
                    return true;
                }
            }
            false
        },
    )
    .await;
    drop(servers);
    token.cancel_query(NoTls).await.unwrap();
    let (r, c) = sleeper.await.unwrap();
    let e = r.expect_err("pg_sleep was cancelled");
    assert_eq!(sqlstate(&e), "57014", "{e}");
    c
}

/// Runs `sql` directly on the primary, waits until the replicas have replayed it, and returns
/// the direct connection.
pub async fn on_primary(sql: &str) -> Client {
    let direct = connect(&cluster().primary_url_from(PRIMARY)).await;
    direct.batch_execute(sql).await.unwrap();
    cluster().wait_replicas_caught_up().await.unwrap();
    direct
}

/// The value of `series` (its name and labels, exactly) in a /metrics scrape.
pub fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The value of `series` on the /metrics of the admin listener at `admin` (0 when absent).
pub async fn metric_at(admin: std::net::SocketAddr, series: &str) -> f64 {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    metric_value(&body, series).unwrap_or(0.0)
}

/// The value of `series` on pgnear's /metrics (0 when absent).
pub async fn metric(p: &Proxy, series: &str) -> f64 {
    metric_at(p.admin_addr(), series).await
}

/// `pgbench -i` at scale 1 on the primary, then waits until the replicas have it.
pub async fn pgbench_init() {
    let direct = cluster().primary_url_from(PRIMARY);
    let out = std::process::Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", &direct])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench -i: {stderr}");
    cluster().wait_replicas_caught_up().await.unwrap();
}

/// Runs pgbench with `args` against `url` (off the runtime's threads) and asserts that all
/// `transactions` ran, none failed.
pub async fn pgbench_ok(url: &str, args: &[&str], transactions: usize) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let url = url.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("pgbench")
            .args(&args)
            .arg("-n")
            .arg(&url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let processed = format!("actually processed: {transactions}/{transactions}");
    assert!(stdout.contains(&processed), "{stdout}");
    assert!(stdout.contains("failed transactions: 0"), "{stdout}");
}

/// The install script of the driver suites (tests/drivers.rs, tests/suites.rs).
pub const INSTALL: &str = "scripts/install-test-deps.sh";

/// Where the driver suites' scenarios and dependencies live.
pub fn drivers_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Installs the drivers on first use (the script CI's .ci/run runs; quick when all is there),
/// once per test binary and under a file lock against concurrent runs; then fails with a
/// message naming the script when `what` is still missing.
pub fn require(present: impl Fn() -> bool, what: &str) {
    static INSTALLED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::create_dir_all(drivers_dir().join(".deps")).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("flock")
            .arg(drivers_dir().join(".deps/install.lock"))
            .args(["bash", INSTALL])
            .current_dir(root)
            .output()
            .map_err(|e| format!("running {INSTALL}: {e}"))?;
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{log}");
        out.status
            .success()
            .then_some(())
            .ok_or_else(|| format!("{INSTALL} failed ({}):\n{log}", out.status))
    });
    if let Err(e) = installed {
        panic!("{what} is missing and could not be installed: {e}");
    }
    assert!(
        present(),
        "{what} is missing after {INSTALL} ran: see its output above"
    );
}

/// Which server answered: "replica" when it is in recovery.
pub async fn answered_by(c: &Client) -> Result<&'static str, tokio_postgres::Error> {
    let rows = c.simple_query("SELECT pg_is_in_recovery()").await?;
    Ok(match first_value(&rows).as_deref() {
        Some("t") => "replica",
        _ => "primary",
    })
}

/// Which server answered, asked through the extended protocol (a statement prepared first,
/// then run: two exchanges, as tokio-postgres, pgx or pgjdbc send them).
pub async fn answered_by_extended(c: &Client) -> Result<&'static str, tokio_postgres::Error> {
    let row = c.query_one("SELECT pg_is_in_recovery()", &[]).await?;
    Ok(if row.get::<_, bool>(0) {
        "replica"
    } else {
        "primary"
    })
}

/// The entry of pgnear's `/status` for the upstream with `role` ("primary" or "replica").
pub async fn upstream_status(p: &Proxy, role: &str) -> serde_json::Value {
    let (status, body) = http_get(p.admin_addr(), "/status").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["role"] == role)
        .cloned()
        .unwrap_or_else(|| panic!("a {role} upstream in {body}"))
}
