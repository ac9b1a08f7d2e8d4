//! Driver compatibility: the drivers people use (psycopg 3, asyncpg, node-postgres, pgjdbc) run
//! the same scenario through a pgnear in the replica region of the lab, over TLS with SCRAM:
//! routing, prepared statements past the drivers' thresholds, transactions, read-your-writes,
//! LISTEN/NOTIFY, COPY, cancel, and text and binary results compared with a direct connection to
//! the primary. Each scenario is a script in tests/drivers/ that asserts everything itself and
//! exits non-zero with a message; this file starts the lab and pgnear and runs each script.
//!
//! The drivers are installed by `scripts/install-test-deps.sh` (`.ci/run` calls it). A driver
//! that is missing fails its test with a message naming that script: a skipped test would hide a
//! missing install step.

mod common;
#[path = "drivers/regressions.rs"]
mod regressions;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// Everything the scripts need: one pgnear with TLS in the replica region, shared by the tests.
struct Lab {
    /// libpq-style URL through pgnear: SCRAM, `sslmode=verify-full` against the test CA.
    pgnear_url: String,
    /// The same database straight on the primary (no pgnear, no TLS).
    direct_url: String,
    ca_path: PathBuf,
    /// pgnear's client listener.
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
    _proxy: pgnear::Proxy,
}

fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        cluster();
        let dir = tempfile::tempdir().unwrap();
        // A test CA and a server certificate for both names a client may use.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Its own name: a server certificate whose issuer equals its subject looks self-signed.
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pgnear driver-test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let ca_path = dir.path().join("ca.pem");
        let cert_path = dir.path().join("server.pem");
        let key_path = dir.path().join("server.key");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let proxy = rt().block_on(proxy(REPLICA, |c| {
            c.tls.cert = cert_path.display().to_string();
            c.tls.key = key_path.display().to_string();
        }));
        let o = cluster().options();
        let pgnear_url = format!(
            "postgres://{}:{}@{}/{}?sslmode=verify-full&sslrootcert={}",
            o.app_user,
            o.app_password,
            proxy.addr(),
            o.database,
            ca_path.display()
        );
        Lab {
            pgnear_url,
            direct_url: cluster().primary_url_from(PRIMARY),
            ca_path,
            addr: proxy.addr(),
            _dir: dir,
            _proxy: proxy,
        }
    })
}

/// Runs a driver's scenario with the lab's URLs in its environment; panics with its output when
/// it fails. A scenario that hangs is killed (its own waits are bounded well below this).
fn run_scenario(name: &str, mut cmd: Command) {
    let lab = lab();
    cmd.current_dir(drivers_dir())
        .env("PGNEAR_URL", &lab.pgnear_url)
        .env("DIRECT_URL", &lab.direct_url)
        .env("PGNEAR_CA", &lab.ca_path)
        .env("PGNEAR_REGION", REPLICA)
        .stdin(Stdio::null());
    let out_path = lab._dir.path().join(format!("{name}.out"));
    let out = std::fs::File::create(&out_path).unwrap();
    cmd.stdout(out.try_clone().unwrap()).stderr(out);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting the {name} scenario: {e}"));
    let limit = Duration::from_secs(300);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => println!("{name} scenario passed:\n{output}"),
        Some(s) => panic!("{name} scenario failed ({s}):\n{output}"),
        None => panic!("{name} scenario hung and was killed after {limit:?}:\n{output}"),
    }
}

#[test]
fn psycopg() {
    let python = drivers_dir().join(".deps/venv/bin/python");
    require(|| python.exists(), "the Python venv with psycopg");
    let mut cmd = Command::new(python);
    cmd.arg("psycopg_test.py");
    run_scenario("psycopg", cmd);
}

#[test]
fn asyncpg() {
    let python = drivers_dir().join(".deps/venv/bin/python");
    require(|| python.exists(), "the Python venv with asyncpg");
    let mut cmd = Command::new(python);
    cmd.arg("asyncpg_test.py");
    run_scenario("asyncpg", cmd);
}

#[test]
fn node_pg() {
    require(
        || {
            drivers_dir().join("node_modules/pg").is_dir()
                && drivers_dir().join("node_modules/pg-copy-streams").is_dir()
        },
        "the npm packages pg and pg-copy-streams",
    );
    require(|| which("node"), "Node.js (node)");
    let mut cmd = Command::new("node");
    cmd.arg("node_pg_test.js");
    run_scenario("node-postgres", cmd);
}

#[test]
fn pgjdbc() {
    let jar = Path::new("/usr/share/java/postgresql.jar");
    require(|| jar.exists(), "pgjdbc (/usr/share/java/postgresql.jar)");
    require(|| which("javac") && which("java"), "a JDK (javac)");
    let classes = lab()._dir.path().join("jdbc-classes");
    let javac = Command::new("javac")
        .arg("-cp")
        .arg(jar)
        .arg("-d")
        .arg(&classes)
        .arg(drivers_dir().join("jdbc/DriverTest.java"))
        .output()
        .unwrap();
    assert!(
        javac.status.success(),
        "javac failed:\n{}",
        String::from_utf8_lossy(&javac.stderr)
    );
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{}:{}", classes.display(), jar.display()))
        .arg("DriverTest");
    run_scenario("pgjdbc", cmd);
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
