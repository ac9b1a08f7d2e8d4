//! End-to-end benchmark against the lab cluster: `cargo bench --bench regions`.
//!
//! One run starts a two-region lab (primary `iad`, replica `syd`) and measures side by side:
//! A. local overhead: pgbench read-only against the syd replica directly, through pgnear and
//!    through PgBouncer (transaction mode); TPC-B against the primary directly and through pgnear;
//! B. multi-region latency at 100 ms RTT: an app in syd talking to the primary vs through pgnear;
//! C. memory of the real `pgnear` binary (`target/release/pgnear`, which cargo builds alongside
//!    this bench): idle, with many idle clients, and while one client streams 100 MB.
//!
//! The Markdown report goes to stdout and `target/bench-report.md`; progress goes to stderr.
//! `PGNEAR_BENCH_SECS` sets the pgbench run length (default 10 s), `PGNEAR_BENCH_SAMPLES` the
//! latency samples per measurement (default 200). Each pgbench configuration runs 3 times with
//! the targets interleaved and reports the median: this machine is small and shared.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgnear::lab::cluster::{Cluster, ClusterOptions};
use pgnear::lab::{proxy_config, proxy_url};
use pgnear::Proxy;
use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

const PRIMARY: &str = "iad";
const REPLICA: &str = "syd";
const REPS: usize = 3;
const ONE_WAY: Duration = Duration::from_millis(50);
const IDLE_CLIENTS: usize = 2_000;
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";
const HEAD: &str = "| pgbench | target | TPS | avg latency (ms) | TPS vs direct | added latency (µs) |\n|---|---|---:|---:|---:|---:|\n";
const READ_SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
const WRITE_SQL: &str = "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = $1";
const STREAM_SQL: &str =
    "COPY (SELECT repeat('x', 1000) FROM generate_series(1, 100000)) TO STDOUT";

/// The running lab and the run settings.
struct Bench<'a> {
    cluster: &'a Cluster,
    secs: u64,
    samples: usize,
}

/// pgbench targets: (name, address).
type Targets = [(&'static str, SocketAddr)];
type Res = anyhow::Result<String>;

fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = subscriber.with_writer(std::io::stderr).try_init();
    let secs = env_num("PGNEAR_BENCH_SECS", 10).max(1);
    let samples = env_num("PGNEAR_BENCH_SAMPLES", 200).max(1);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    let runtime = runtime.worker_threads(2).enable_all().build()?;
    let report = runtime.block_on(run(secs, samples))?;
    print!("{report}");
    let path = target_dir().join("bench-report.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    progress(format!("report written to {}", path.display()));
    Ok(())
}

/// Starts the lab, runs every section, and shuts the lab down whatever happened.
async fn run(secs: u64, samples: usize) -> anyhow::Result<String> {
    let began = Instant::now();
    progress("starting the lab: primary in iad, replica in syd");
    let regions = vec![PRIMARY.into(), REPLICA.into()];
    let options = ClusterOptions {
        regions,
        ..Default::default()
    };
    let cluster = Cluster::start(options).await?;
    let mut report = String::new();
    let bench = Bench {
        cluster: &cluster,
        secs,
        samples,
    };
    let result = sections(&bench, &mut report).await;
    progress("stopping the lab");
    cluster.shutdown().await;
    result?;
    let total = began.elapsed().as_secs_f64();
    writeln!(report, "\n_Total bench run time: {total:.0} s._")?;
    Ok(report)
}

/// A failing section is reported as such; the others still run.
async fn sections(b: &Bench<'_>, out: &mut String) -> anyhow::Result<()> {
    let (cluster, bouncer) = (b.cluster, ensure_pgbouncer().await);
    out.push_str(&header(b, &bouncer).await?);
    progress("pgbench -i -s 10 on the primary");
    let (o, primary) = (cluster.options(), cluster.primary().addr());
    if let Err(e) = pgbench(o, primary, &["-i", "-s", "10", "-q"]).await {
        bail!("pgbench -i failed: {e}");
    }
    cluster.wait_replicas_caught_up().await?;
    let local = section_local(b, bouncer.as_deref().ok()).await;
    push_section(out, "A. Local overhead (pgbench, no added latency)", local);
    let regions = section_regions(b).await;
    push_section(out, "B. Multi-region latency (100 ms RTT)", regions);
    let memory = section_memory(cluster).await;
    push_section(out, "C. Memory of the pgnear process", memory);
    let observability = section_observability(b).await;
    push_section(out, "D. Cost of per-statement metrics", observability);
    Ok(())
}

/// pgbench -S through two pgnear instances in syd that differ only in `proxy.metrics`.
async fn section_observability(b: &Bench<'_>) -> Res {
    let c = b.cluster;
    let mut off_config = proxy_config(c, REPLICA);
    off_config.proxy.metrics = false;
    let off = Proxy::start(off_config).await?;
    let on = Proxy::start(proxy_config(c, REPLICA)).await?;
    let targets = [("metrics off", off.addr()), ("metrics on", on.addr())];
    let mut notes = String::new();
    let mut out = format!(
        "Two pgnear instances in syd, identical but for `proxy.metrics`; the ratio column is \
         against the first row (metrics off). Logging is at its default level in both (no \
         per-statement log line at info).\n\n{HEAD}"
    );
    for mode in ["simple", "prepared"] {
        let args = ["-S", "-M", mode, "-c", "8", "-j", "2"];
        out.push_str(&pgbench_rows(b, &args, &targets, &mut notes).await?);
    }
    if !notes.is_empty() {
        write!(out, "\nFailed runs:\n{notes}")?;
    }
    off.shutdown().await;
    on.shutdown().await;
    Ok(out)
}

fn push_section(out: &mut String, title: &str, body: anyhow::Result<String>) {
    let _ = writeln!(out, "\n## {title}\n");
    match body {
        Ok(text) => out.push_str(&text),
        Err(e) => {
            progress(format!("section failed: {e:#}"));
            let _ = writeln!(out, "**Section failed:** {e:#}");
        }
    }
}

async fn header(b: &Bench<'_>, bouncer: &Result<PathBuf, String>) -> anyhow::Result<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo.lines().find_map(|l| l.strip_prefix("model name"));
    let cpu = cpu.map_or("unknown", |m| m.trim_start_matches([' ', '\t', ':']));
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).await;
    let manifest = env!("CARGO_MANIFEST_DIR");
    let git = first_line("git", &["-C", manifest, "describe", "--always", "--dirty"]).await;
    let version = env!("CARGO_PKG_VERSION");
    let client = connect(&b.cluster.primary_url_from(PRIMARY)).await?;
    let postgres: String = client.query_one("SELECT version()", &[]).await?.get(0);
    let pgbench = first_line("pgbench", &["--version"]).await;
    let pgbouncer = match bouncer {
        Ok(bin) => first_line(bin.as_os_str(), &["--version"]).await,
        Err(e) => e.clone(),
    };
    let (secs, samples) = (b.secs, b.samples);
    Ok(format!(
        "# pgnear end-to-end benchmark\n\n| | |\n|---|---|\n| date | {date} |\n\
         | machine | {nproc} CPUs ({cpu}) |\n| pgnear | {version} (git {git}) |\n\
         | Postgres | {postgres} |\n| pgbench | {pgbench} |\n| PgBouncer | {pgbouncer} |\n\
         | pgbench runs | {secs} s each, median of {REPS}, targets interleaved |\n\
         | latency samples | {samples} per measurement |\n"
    ))
}

// ---------------------------------------------------------------------------------------------
// A. Local overhead

#[derive(Debug, Default, Clone, Copy)]
struct Run {
    tps: f64,
    lat_ms: f64,
}

async fn section_local(b: &Bench<'_>, pgbouncer: Option<&Path>) -> anyhow::Result<String> {
    let (c, o) = (b.cluster, b.cluster.options());
    let replica = c.replica(REPLICA).context("no syd replica")?.node.addr();
    let syd = Proxy::start(proxy_config(c, REPLICA)).await?;
    let iad = Proxy::start(proxy_config(c, PRIMARY)).await?;
    let mut out = String::from(
        "pgbench, both Postgres servers and pgnear (in the bench process) share the machine's \
         CPUs, so at 8 clients the ratios show CPU cost per query as much as latency.\n\n",
    );
    let bouncer = match pgbouncer {
        Some(bin) => Bouncer::start(bin, replica, o).await.map(Some),
        None => Ok(None),
    };
    let bouncer = bouncer.unwrap_or_else(|e| {
        let _ = writeln!(out, "PgBouncer did not start, no rows for it: {e:#}\n");
        None
    });
    let mut targets = vec![("direct", replica), ("pgnear", syd.addr())];
    targets.extend(bouncer.as_ref().map(|p| ("pgbouncer", p.addr)));
    write!(out, "### Read-only (`pgbench -S`), syd replica\n\n{HEAD}")?;
    let mut notes = String::new();
    for mode in ["simple", "extended", "prepared"] {
        for (clients, threads) in [("1", "1"), ("8", "2")] {
            let args = ["-S", "-M", mode, "-c", clients, "-j", threads];
            out.push_str(&pgbench_rows(b, &args, &targets, &mut notes).await?);
        }
    }
    write!(out, "\n### TPC-B (`pgbench`), iad primary\n\n{HEAD}")?;
    let targets = [("direct", c.primary().addr()), ("pgnear (iad)", iad.addr())];
    let args = ["-c", "8", "-j", "2"];
    out.push_str(&pgbench_rows(b, &args, &targets, &mut notes).await?);
    if !notes.is_empty() {
        write!(out, "\nFailed runs (n/a above):\n{notes}")?;
    }
    drop(bouncer);
    syd.shutdown().await;
    iad.shutdown().await;
    Ok(out)
}

/// Runs `args` against each target in turn, `REPS` times over (a target that fails once is not
/// run again), and returns one table row per target with the median run.
async fn pgbench_rows(b: &Bench<'_>, args: &[&str], targets: &Targets, notes: &mut String) -> Res {
    let (o, what, secs) = (b.cluster.options(), args.join(" "), b.secs.to_string());
    let args = [args, &["-n", "-T", secs.as_str()][..]].concat();
    let mut cells: Vec<Result<Vec<Run>, String>> = vec![Ok(Vec::new()); targets.len()];
    for rep in 1..=REPS {
        for ((name, addr), cell) in targets.iter().zip(cells.iter_mut()) {
            let Ok(runs) = cell else { continue };
            progress(format!("pgbench {what} -> {name} ({rep}/{REPS})"));
            match pgbench(o, *addr, &args).await {
                Ok(run) => runs.push(run),
                Err(e) => *cell = Err(e),
            }
        }
    }
    let median = |cell: &Result<Vec<Run>, String>| {
        let runs = cell.as_ref().ok().filter(|r| !r.is_empty())?;
        let tps: Vec<f64> = runs.iter().map(|r| r.tps).collect();
        let lat: Vec<f64> = runs.iter().map(|r| r.lat_ms).collect();
        let (tps, lat_ms) = (percentile(&tps, 50.0), percentile(&lat, 50.0));
        Some(Run { tps, lat_ms })
    };
    let direct = median(&cells[0]);
    let one_client = args.windows(2).any(|w| w == ["-c", "1"]);
    let mut out = String::new();
    for ((name, _), cell) in targets.iter().zip(&cells) {
        let Some((m, d)) = median(cell).zip(direct) else {
            writeln!(out, "| `{what}` | {name} | n/a | n/a | n/a | n/a |")?;
            if let Err(e) = cell {
                writeln!(notes, "- {name}, `{what}`: {e}")?;
            }
            continue;
        };
        let added = match one_client && *name != "direct" {
            true => format!("{:+.0}", (m.lat_ms - d.lat_ms) * 1000.0),
            false => String::new(),
        };
        let (tps, lat, ratio) = (m.tps, m.lat_ms, m.tps / d.tps);
        let row = format!("{tps:.0} | {lat:.3} | {ratio:.2} | {added}");
        writeln!(out, "| `{what}` | {name} | {row} |")?;
    }
    Ok(out)
}

/// Runs pgbench as the app user; the result of a timed (`-T`) run is parsed.
async fn pgbench(o: &ClusterOptions, at: SocketAddr, args: &[&str]) -> Result<Run, String> {
    let (host, port) = (at.ip().to_string(), at.port().to_string());
    let mut cmd = command("pgbench", &["-h", &host, "-p", &port, "-U", &o.app_user]);
    cmd.args(args)
        .arg(&o.database)
        .env("PGPASSWORD", &o.app_password);
    let timed = args.iter().position(|a| *a == "-T");
    let secs = timed.and_then(|i| args.get(i + 1)?.parse::<u64>().ok());
    let limit = Duration::from_secs(secs.unwrap_or(300) + 60);
    let out = match tokio::time::timeout(limit, cmd.output()).await {
        Err(_) => return Err(format!("timed out after {limit:?}")),
        Ok(Err(e)) => return Err(format!("cannot run pgbench: {e}")),
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let mut lines = stderr.lines().map(str::trim).filter(|l| !l.is_empty());
        let line = lines.find(|l| l.contains("error")).unwrap_or("no output");
        return Err(format!("{}: {line}", out.status));
    }
    let field = |prefix: &str, suffix: &str| {
        let mut lines = stdout.lines();
        lines.find_map(|l| l.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok())
    };
    let tps = field("tps = ", " (without initial connection time)");
    match (secs, tps, field("latency average = ", " ms")) {
        (None, ..) => Ok(Run::default()),
        (Some(_), Some(tps), Some(lat_ms)) => Ok(Run { tps, lat_ms }),
        _ => Err(format!("unexpected pgbench output: {}", stdout.trim())),
    }
}

/// `/usr/sbin/pgbouncer`, installed with apt-get when missing; Err says why it is skipped.
async fn ensure_pgbouncer() -> Result<PathBuf, String> {
    let bin = PathBuf::from(PGBOUNCER);
    for step in "install -y -q pgbouncer|update -q|install -y -q pgbouncer".split('|') {
        if bin.is_file() {
            return Ok(bin);
        }
        progress(format!("PgBouncer is missing: apt-get {step}"));
        let mut apt = command("apt-get", &step.split(' ').collect::<Vec<_>>());
        apt.env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null());
        let _ = apt.status().await;
    }
    match bin.is_file() {
        true => Ok(bin),
        false => Err("not installed (`apt-get install -y pgbouncer` failed): skipped".into()),
    }
}

/// A PgBouncer in transaction mode in front of the replica, in its own temporary directory.
/// Killed on drop, by the pid in its pidfile: under `runuser` it is not our direct child.
struct Bouncer {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Bouncer {
    async fn start(bin: &Path, replica: SocketAddr, o: &ClusterOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("pgnear-bench-").tempdir()?;
        let d = dir.path();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let (host, port, listen) = (replica.ip(), replica.port(), addr.port());
        let (users, pid, db) = (d.join("userlist.txt"), d.join("pgbouncer.pid"), &o.database);
        let ini = format!(
            "[databases]\n{db} = host={host} port={port} dbname={db}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {}\npool_mode = transaction\n\
             default_pool_size = 20\nmax_client_conn = 200\npidfile = {}\n",
            users.display(),
            pid.display(),
        );
        std::fs::write(d.join("pgbouncer.ini"), ini)?;
        let (user, password) = (&o.app_user, &o.app_password);
        std::fs::write(&users, format!("\"{user}\" \"{password}\"\n"))?;
        let log = std::fs::File::create(d.join("pgbouncer.log"))?;
        let mut cmd = command(bin, &[]);
        if running_as_root() {
            // PgBouncer refuses to run as root: hand it the directory, run it as postgres.
            let chown = command("chown", &["-R", "postgres"]).arg(d).status();
            if !chown.await?.success() {
                bail!("chown -R postgres {} failed", d.display());
            }
            cmd = command("runuser", &["-u", "postgres", "--"]);
            cmd.arg(bin);
        }
        cmd.arg(d.join("pgbouncer.ini")).current_dir("/");
        cmd.stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn()?;
        let mut bouncer = Bouncer { child, dir, addr };
        if let Err(e) = wait_listening(addr, &mut bouncer.child).await {
            let log = std::fs::read_to_string(bouncer.dir.path().join("pgbouncer.log"));
            bail!("{e:#}; log: {}", log.unwrap_or_default().trim());
        }
        Ok(bouncer)
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.path().join("pgbouncer.pid"));
        if let Some(pid) = pid.ok().and_then(|p| p.trim().parse::<u32>().ok()) {
            let mut kill = std::process::Command::new("kill");
            let _ = kill.args(["-KILL", &pid.to_string()]).status();
        }
        let _ = self.child.start_kill();
    }
}

// ---------------------------------------------------------------------------------------------
// B. Multi-region latency

/// Latencies in ms: plain reads, writes, reads right after a write, connect + first query.
#[derive(Default)]
struct Samples {
    read: Vec<f64>,
    /// Reads straight to the local replica (no pgnear), for the plain-read overhead.
    replica_read: Vec<f64>,
    write: Vec<f64>,
    raw: Vec<f64>,
    connect: Vec<f64>,
}

async fn section_regions(b: &Bench<'_>) -> Res {
    let relay = &b.cluster.replica(REPLICA).context("no syd replica")?.relay;
    relay.set_delay(ONE_WAY);
    let result = regions_measure(b.cluster, b.samples).await;
    relay.set_delay(Duration::ZERO);
    result
}

async fn regions_measure(cluster: &Cluster, samples: usize) -> Res {
    let proxy = Proxy::start(proxy_config(cluster, REPLICA)).await?;
    progress(format!("{} latency samples each, direct", samples));
    let direct = latency_samples(&cluster.primary_url_from(REPLICA), samples).await;
    progress("latency samples through pgnear in syd");
    let near = latency_samples(&proxy_url(cluster, &proxy), samples).await;
    proxy.shutdown().await;
    let (d, mut n) = (direct.context("direct")?, near.context("through pgnear")?);
    progress("read samples straight to the syd replica");
    let replica_url = cluster.replica_url(REPLICA).context("no syd replica")?;
    n.replica_read = latency_samples_reads(&replica_url, samples).await?;
    let delay = ONE_WAY.as_millis();
    let mut out = format!(
        "The syd relay adds {delay} ms each way. The app in syd talks either to the primary \
         directly (`primary_url_from(\"syd\")`) or to pgnear in syd (forward mode, session \
         consistency). Reads: `{READ_SQL}`; writes: `{WRITE_SQL}`; read after write: the same \
         read right after a write, same session; connect: a new connection's `SELECT 1`. \
         Client-side prepared statements; {samples} samples each; milliseconds.\n\n\
         | sample | direct p50 | direct p99 | pgnear p50 | pgnear p99 |\n|---|---:|---:|---:|---:|\n"
    );
    let rows = [
        ("read", &d.read, &n.read),
        (
            "read, straight to the syd replica (pgnear column)",
            &d.read,
            &n.replica_read,
        ),
        ("write", &d.write, &n.write),
        ("read after write", &d.raw, &n.raw),
        ("connect + `SELECT 1`", &d.connect, &n.connect),
    ];
    for (name, d, n) in rows {
        let [d50, d99, n50, n99] =
            [(d, 50.0), (d, 99.0), (n, 50.0), (n, 99.0)].map(|(v, p)| percentile(v, p));
        writeln!(
            out,
            "| {name} | {d50:.2} | {d99:.2} | {n50:.2} | {n99:.2} |"
        )?;
    }
    let [dr, nr, dw, nw, nraw, dc, nc] = [
        &d.read, &n.read, &d.write, &n.write, &n.raw, &d.connect, &n.connect,
    ]
    .map(|v| percentile(v, 50.0));
    let (speedup, write_cost, wait) = (dr / nr.max(1e-9), nw - dw, nraw - nr);
    write!(
        out,
        "\n- Reads: {dr:.2} ms direct to the primary vs {nr:.2} ms through pgnear (local \
         replica): {speedup:.0}x faster at p50.\n\
         - Writes: pgnear adds {write_cost:+.2} ms at p50 over writing to the primary directly.\n\
         - Read after write through pgnear: {nraw:.2} ms vs {nr:.2} ms for a plain read \
         ({wait:+.2} ms at p50: the wait for the replica to replay the write).\n\
         - Connect + first query: {dc:.2} ms direct vs {nc:.2} ms through pgnear.\n"
    )?;
    let straight = percentile(&n.replica_read, 50.0);
    let straight99 = percentile(&n.replica_read, 99.0);
    let (n99, raw99) = (percentile(&n.read, 99.0), percentile(&n.raw, 99.0));
    writeln!(
        out,
        "- Plain reads: {nr:.3} ms through pgnear vs {straight:.3} ms straight to the replica \
         ({:+.3} ms at p50, {:+.3} ms at p99). Read after write vs plain read at p99: {:+.2} ms.",
        nr - straight,
        n99 - straight99,
        raw99 - n99
    )?;
    Ok(out)
}

/// `n` timed reads in one session (prepared once).
async fn latency_samples_reads(url: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let aid = |i: usize| (i * 7919 % 1_000_000 + 1) as i32;
    let reader = connect(url).await?;
    let read = reader.prepare(READ_SQL).await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 5 {
        let t = Instant::now();
        reader.query_one(&read, &[&aid(i)]).await?;
        if i >= 5 {
            out.push(ms(t));
        }
    }
    Ok(out)
}

/// `n` timed reads in a session that never writes; `n` timed writes, each followed by a timed
/// read of the same row, in a second session; `n` timed connect + `SELECT 1`.
async fn latency_samples(url: &str, n: usize) -> anyhow::Result<Samples> {
    let aid = |i: usize| (i * 7919 % 1_000_000 + 1) as i32;
    let reader = connect(url).await?;
    let read = reader.prepare(READ_SQL).await?;
    let writer = connect(url).await?;
    let update = writer.prepare(WRITE_SQL).await?;
    let reread = writer.prepare(READ_SQL).await?;
    for i in 0..5 {
        reader.query_one(&read, &[&aid(i)]).await?;
    }
    let mut out = Samples::default();
    for i in 0..n {
        let t = Instant::now();
        reader.query_one(&read, &[&aid(i)]).await?;
        out.read.push(ms(t));
    }
    for i in n..2 * n {
        let t = Instant::now();
        writer.execute(&update, &[&aid(i)]).await?;
        out.write.push(ms(t));
        let t = Instant::now();
        writer.query_one(&reread, &[&aid(i)]).await?;
        out.raw.push(ms(t));
    }
    for _ in 0..n {
        let t = Instant::now();
        connect(url).await?.simple_query("SELECT 1").await?;
        out.connect.push(ms(t));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// C. Memory

async fn section_memory(cluster: &Cluster) -> anyhow::Result<String> {
    // Cargo builds the package's binaries for its benches and names them here.
    let bin = Path::new(env!("CARGO_BIN_EXE_pgnear"));
    if !bin.is_file() {
        let why = "is missing: `cargo build --release --bin pgnear`";
        return Ok(format!("Skipped: `{}` {why}.\n", bin.display()));
    }
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let log = tempfile::NamedTempFile::new()?;
    let replica_url = cluster.replica_url(REPLICA).context("no syd replica")?;
    let mut cmd = command(bin, &[]);
    cmd.env_clear()
        .env("DATABASE_URL", cluster.primary_url_from(REPLICA))
        .env("PGNEAR_REPLICA_URL", replica_url)
        .env("PGNEAR_LISTEN", listen.to_string())
        .env("PGNEAR_ADMIN_LISTEN", "127.0.0.1:0")
        .env("FLY_REGION", REPLICA)
        .env("PRIMARY_REGION", PRIMARY)
        .env("PGNEAR_LOG_LEVEL", "warn");
    cmd.stdout(Stdio::null()).stderr(log.reopen()?);
    let mut child = cmd.spawn().context("starting pgnear")?;
    let pid = child.id().context("pgnear exited at once")?;
    let result = match wait_listening(listen, &mut child).await {
        Ok(()) => memory_measure(cluster, pid, listen).await,
        Err(e) => Err(e),
    };
    let _ = child.kill().await;
    let log = std::fs::read_to_string(log.path()).unwrap_or_default();
    let text = result.with_context(|| format!("pgnear log: {}", log.trim()))?;
    let bin = bin.display();
    Ok(format!(
        "Binary `{bin}` in syd, no added latency.\n\n{text}"
    ))
}

async fn memory_measure(cluster: &Cluster, pid: u32, addr: SocketAddr) -> anyhow::Result<String> {
    let o = cluster.options();
    let (user, password, db) = (&o.app_user, &o.app_password, &o.database);
    let url = format!("postgres://{user}:{password}@{addr}/{db}?sslmode=disable");
    connect(&url).await?.simple_query("SELECT 1").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kb(pid)?;

    let (target, why) = client_budget(cluster).await?;
    progress(format!("opening {target} idle clients through pgnear"));
    let (mut clients, mut failed) = (Vec::with_capacity(target), None);
    while clients.len() < target && failed.is_none() {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..(target - clients.len()).min(25) {
            let url = url.clone();
            batch.spawn(async move { connect(&url).await });
        }
        while let Some(joined) = batch.join_next().await {
            match joined? {
                Ok(c) => clients.push(c),
                Err(e) => failed = Some(format!("{e:#}")),
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (held, n) = (rss_kb(pid)?, clients.len());
    drop(clients);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kb(pid)?;

    progress("streaming 100 MB through pgnear");
    let hwm_before = status_kb(pid, "VmHWM:")?;
    let (sampled, secs, outcome) = stream_peak(pid, &url).await?;
    // A spike shorter than the sampling period still shows in the high-water mark.
    let hwm = status_kb(pid, "VmHWM:")?;
    let peak = if hwm > hwm_before {
        sampled.max(hwm)
    } else {
        sampled
    };
    let [idle_mb, held_mb, after_mb, peak_mb] =
        [idle, held, after, peak].map(|kb| kb as f64 / 1024.0);
    let per_client = held.saturating_sub(idle) as f64 / n.max(1) as f64;
    let (growth, rate) = (peak_mb - after_mb, 100.0 / secs.max(1e-9));
    let mut out = format!(
        "| state | VmRSS (MB) |\n|---|---:|\n\
         | idle after startup (one query served) | {idle_mb:.1} |\n\
         | {n} idle authenticated clients | {held_mb:.1} |\n\
         | after those clients left | {after_mb:.1} |\n\
         | peak while one client streams 100 MB | {peak_mb:.1} |\n\n\
         - Per idle client: {per_client:.1} KB ((RSS with {n} clients - idle) / {n}).\n\
         - Streaming (`{STREAM_SQL}` by psql, RSS sampled every 50 ms and checked against \
         VmHWM): peak {growth:+.1} MB over the RSS before it; {secs:.1} s, {rate:.0} MB/s; \
         {outcome}.\n"
    );
    if let Some(why) = why {
        writeln!(out, "- Scaled down from {IDLE_CLIENTS} clients: {why}")?;
    }
    if let Some(e) = failed {
        writeln!(out, "- Connecting stopped after {n} clients: {e}")?;
    }
    Ok(out)
}

/// How many idle clients to open, and why fewer than `IDLE_CLIENTS` if so. pgnear opens a
/// primary connection per client at startup, so the primary's free slots bound it, as does the
/// fd limit (this process holds 3 sockets per client: the client and both ends of the relay).
async fn client_budget(cluster: &Cluster) -> anyhow::Result<(usize, Option<String>)> {
    let (password, primary) = (cluster.superuser_password(), cluster.primary().addr());
    let url = format!("postgres://postgres:{password}@{primary}/postgres?sslmode=disable");
    let sql = "SELECT current_setting('max_connections')::int \
               - current_setting('superuser_reserved_connections')::int \
               - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int";
    let free: i32 = connect(&url).await?.query_one(sql, &[]).await?.get(0);
    let pg_cap = usize::try_from(free - 10).unwrap_or(0);
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let fds = limits.lines().find(|l| l.starts_with("Max open files"));
    let fds: usize = fds
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(1024);
    let fd_cap = fds.saturating_sub(256) / 3;
    let n = IDLE_CLIENTS.min(pg_cap).min(fd_cap);
    let why = format!(
        "without a shared pool pgnear opens one server connection per client at startup (the \
         replica in syd), and the lab's servers had {free} free connection slots \
         (max_connections = 300), so {pg_cap} fit (10 kept spare); the open-files limit ({fds}) \
         allows {fd_cap}."
    );
    Ok((n, (n < IDLE_CLIENTS).then_some(why)))
}

/// Streams 100 MB through pgnear with psql while sampling RSS every 50 ms.
/// Returns (peak kB, seconds, outcome).
async fn stream_peak(pid: u32, url: &str) -> anyhow::Result<(u64, f64, String)> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        while !stopped.load(Ordering::Relaxed) {
            peak = rss_kb(pid).unwrap_or(0).max(peak);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak
    });
    let began = Instant::now();
    let mut psql = command(
        "psql",
        &[url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", STREAM_SQL],
    );
    let out = psql.stdout(Stdio::null()).output().await;
    let secs = began.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await?;
    let outcome = match out {
        Ok(o) if o.status.success() => "psql finished".to_string(),
        Ok(o) => format!("psql FAILED: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => format!("psql did not run: {e}"),
    };
    Ok((peak, secs, outcome))
}

fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    status_kb(pid, "VmRSS:")
}

/// A `kB` field of `/proc/<pid>/status`, e.g. `VmRSS:` or `VmHWM:` (the peak RSS so far).
fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let value = status.lines().find_map(|l| l.strip_prefix(field));
    let kb = value.and_then(|v| v.trim().strip_suffix(" kB")?.trim().parse().ok());
    kb.with_context(|| format!("no {field} in /proc/{pid}/status"))
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A command with stdin closed, killed if dropped before it exits.
fn command(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Waits until `addr` accepts connections; fails if `child` exits first or after 15 s.
async fn wait_listening(addr: SocketAddr, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("exited with {status} before listening on {addr}");
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not listening on {addr} after 15 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nearest-rank percentile.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn running_as_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"));
    uid.and_then(|ids| ids.split_whitespace().next()) == Some("0")
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    let value = std::env::var(name).ok();
    value.and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// The first line a command prints, or why there is none.
async fn first_line(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
    match command(program, args).output().await {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Ok(o) => format!("unknown ({})", o.status),
        Err(e) => format!("unknown ({e})"),
    }
}

/// `target/`: the bench runs as `target/<profile>/deps/regions-<hash>`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let dir = exe.and_then(|e| e.ancestors().nth(3).map(Path::to_path_buf));
    let dir = dir.filter(|d| d.join("CACHEDIR.TAG").is_file());
    dir.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn progress(msg: impl std::fmt::Display) {
    static START: OnceLock<Instant> = OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[bench {t:6.1}s] {msg}");
}
