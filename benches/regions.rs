//! End-to-end benchmark against the lab cluster: `cargo bench --bench regions`.
//!
//! One run starts a two-region lab (primary `iad`, replica `syd`) and measures side by side:
//! A. local overhead: pgbench read-only against the syd replica directly, through pgnear and
//!    through PgBouncer (transaction mode), also with a new connection per transaction (`-C`);
//!    TPC-B against the primary directly and through pgnear;
//! B. multi-region latency at 100 ms RTT: an app in syd talking to the primary vs through pgnear
//!    (forward mode with a warm pool, and replay mode), including a new connection's first
//!    write; the distributions are drawn in `target/bench-latency.svg`;
//! C. memory of the real `pgnear` binary (`target/release/pgnear`, which cargo builds alongside
//!    this bench): idle, with 10,000 idle clients (and PgBouncer's for comparison), and while
//!    one client streams 100 MB.
//!
//! The Markdown report goes to stdout and `target/bench-report.md`; progress goes to stderr.
//! `PGNEAR_BENCH_SECS` sets the pgbench run length (default 10 s), `PGNEAR_BENCH_SAMPLES` the
//! latency samples per measurement (default 200), `PGNEAR_BENCH_IDLE_CLIENTS` the idle clients
//! of section C (default 10,000), `PGNEAR_BENCH_SECTIONS` which sections run (e.g. `AC`; default
//! all). Each pgbench configuration runs 3 times with the targets
//! interleaved and reports the median: this machine is small and shared.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgnear::config::WriteMode;
use pgnear::lab::cluster::{Cluster, ClusterOptions};
use pgnear::lab::process::{free_port, rss_kb, status_kb, wait_listening, PgnearProcess};
use pgnear::lab::{proxy_config, proxy_url};
use pgnear::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

const PRIMARY: &str = "iad";
const REPLICA: &str = "syd";
const REPS: usize = 3;
const ONE_WAY: Duration = Duration::from_millis(50);
const IDLE_CLIENTS: usize = 10_000;
/// Warm connections per upstream for the multi-region pgnear (`pool.min_idle`): one for the next
/// client while another is being reset (`DISCARD ALL`, one round trip) after a write.
const MIN_IDLE: usize = 2;
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";
/// The pgnear target in transaction mode with pipelined reads.
const PIPELINED: &str = "pgnear, pipelined";
/// The pgnear target with busy polling.
const POLLING: &str = "pgnear, busy poll";
const HEAD: &str = "| pgbench | target | TPS | avg latency (ms) | TPS vs direct | added latency (µs) |\n|---|---|---:|---:|---:|---:|\n";
const READ_SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
const WRITE_SQL: &str = "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = $1";
const INSERT_SQL: &str =
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now())";
const STREAM_SQL: &str =
    "COPY (SELECT repeat('x', 1000) FROM generate_series(1, 100000)) TO STDOUT";

/// The running lab and the run settings.
struct Bench<'a> {
    cluster: &'a Cluster,
    secs: u64,
    samples: usize,
    idle_clients: usize,
    /// Rows of the report's summary table, added by the sections as they measure.
    summary: Mutex<Vec<String>>,
}

impl Bench<'_> {
    /// A summary row: figure, target, measured, verdict.
    fn summary(&self, cells: [&str; 4]) {
        let row = format!("| {} |", cells.join(" | "));
        self.summary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(row);
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**not met**"
    }
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
    let idle_clients = env_num("PGNEAR_BENCH_IDLE_CLIENTS", IDLE_CLIENTS).max(1);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    let runtime = runtime.worker_threads(2).enable_all().build()?;
    let report = runtime.block_on(run(secs, samples, idle_clients))?;
    print!("{report}");
    let path = target_dir().join("bench-report.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    progress(format!("report written to {}", path.display()));
    Ok(())
}

/// Starts the lab, runs every section, and shuts the lab down whatever happened.
async fn run(secs: u64, samples: usize, idle_clients: usize) -> anyhow::Result<String> {
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
        idle_clients,
        summary: Mutex::default(),
    };
    let result = sections(&bench, &mut report).await;
    let rows = bench
        .summary
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    progress("stopping the lab");
    cluster.shutdown().await;
    result?;
    let summary = format!(
        "\n## Summary of the new figures\n\n| figure | target | measured (this run) | |\n\
         |---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    // After the header (the first section), before the sections.
    let at = report.find("\n## ").unwrap_or(report.len());
    report.insert_str(at, &summary);
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
    // `PGNEAR_BENCH_SECTIONS=AC` runs only sections A and C (default: all).
    let only = std::env::var("PGNEAR_BENCH_SECTIONS").unwrap_or_default();
    let wanted = |letter: char| only.is_empty() || only.contains(letter);
    if wanted('A') {
        let local = section_local(b, bouncer.as_deref().ok()).await;
        push_section(out, "A. Local overhead (pgbench, no added latency)", local);
    }
    if wanted('B') {
        let regions = section_regions(b).await;
        push_section(out, "B. Multi-region latency (100 ms RTT)", regions);
    }
    if wanted('C') {
        let memory = section_memory(b, bouncer.as_deref().ok()).await;
        push_section(out, "C. Memory of the pgnear process", memory);
    }
    if wanted('D') {
        let observability = section_observability(b).await;
        push_section(out, "D. Cost of per-statement metrics", observability);
    }
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
        out.push_str(&pgbench_rows(b, &args, &targets, &mut notes).await?.0);
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
    // The real binary, as deployed (its own runtime, `proxy.worker_threads`).
    let bin = Path::new(env!("CARGO_BIN_EXE_pgnear"));
    let syd = PgnearProcess::start(bin, c, REPLICA, &[]).await?;
    let pipelined = [
        ("PGNEAR_POOL_MODE", "transaction"),
        ("PGNEAR_POOL_PIPELINE", "1"),
    ];
    let syd_pipelined = PgnearProcess::start(bin, c, REPLICA, &pipelined).await?;
    let polling = [("PGNEAR_PROXY_BUSY_POLL", "100us")];
    let syd_polling = PgnearProcess::start(bin, c, REPLICA, &polling).await?;
    let iad = PgnearProcess::start(bin, c, PRIMARY, &[]).await?;
    let iad_polling = PgnearProcess::start(bin, c, PRIMARY, &polling).await?;
    let mut out = String::from(
        "pgbench, both Postgres servers and pgnear (the release binary, one worker thread by \
         default) share the machine's CPUs, so at 8 clients the ratios show CPU cost per query \
         as much as latency.\n\n",
    );
    let bouncer = match pgbouncer {
        Some(bin) => Bouncer::start(bin, replica, o, "scram-sha-256", 200)
            .await
            .map(Some),
        None => Ok(None),
    };
    let bouncer = bouncer.unwrap_or_else(|e| {
        let _ = writeln!(out, "PgBouncer did not start, no rows for it: {e:#}\n");
        None
    });
    let mut targets = vec![
        ("direct", replica),
        ("pgnear", syd.addr),
        (PIPELINED, syd_pipelined.addr),
        (POLLING, syd_polling.addr),
    ];
    targets.extend(bouncer.as_ref().map(|p| ("pgbouncer", p.addr)));
    write!(
        out,
        "`pgnear` runs the defaults (session mode); `{PIPELINED}` runs transaction mode with \
         `pool.pipeline = 1` (reads of all sessions share one replica connection, several in \
         flight), like PgBouncer in transaction mode; `{POLLING}` runs the defaults with \
         `proxy.busy_poll = \"100us\"`.\n\n"
    )?;
    write!(out, "### Read-only (`pgbench -S`), syd replica\n\n{HEAD}")?;
    let mut notes = String::new();
    for mode in ["simple", "extended", "prepared"] {
        for (clients, threads) in [("1", "1"), ("8", "2")] {
            let args = ["-S", "-M", mode, "-c", clients, "-j", threads];
            let (rows, runs) = pgbench_rows(b, &args, &targets, &mut notes).await?;
            out.push_str(&rows);
            read_only_summary(b, mode, clients == "1", &targets, &runs);
        }
    }
    // A new connection (and SCRAM authentication) per transaction: pgnear answers the startup
    // itself and hands out a pooled server connection; direct, the replica forks a backend.
    let args = ["-S", "-C", "-M", "simple", "-c", "8", "-j", "2"];
    let (rows, runs) = pgbench_rows(b, &args, &targets, &mut notes).await?;
    out.push_str(&rows);
    write!(out, "\n{}", connect_ratios(b, &targets, &runs))?;
    write!(out, "\n### TPC-B (`pgbench`), iad primary\n\n{HEAD}")?;
    let targets = [
        ("direct", c.primary().addr()),
        ("pgnear (iad)", iad.addr),
        ("pgnear (iad), busy poll", iad_polling.addr),
    ];
    let args = ["-c", "8", "-j", "2"];
    let (rows, runs) = pgbench_rows(b, &args, &targets, &mut notes).await?;
    out.push_str(&rows);
    for (i, (name, _)) in targets.iter().enumerate().skip(1) {
        let Some((near, direct)) = runs[i].zip(runs[0]) else {
            continue;
        };
        let ratio = near.tps / direct.tps;
        let what = format!("TPC-B 8 clients, {name} vs direct to the primary");
        b.summary([
            &what,
            "≥ 0.8x",
            &format!("{ratio:.2}x"),
            verdict(ratio >= 0.8),
        ]);
    }
    if !notes.is_empty() {
        write!(out, "\nFailed runs (n/a above):\n{notes}")?;
    }
    drop(bouncer);
    for p in [syd, syd_pipelined, syd_polling, iad, iad_polling] {
        p.stop().await;
    }
    Ok(out)
}

/// Summary rows for a `pgbench -S` run: at 1 client the latency each pgnear adds (at most
/// 10 µs), at 8 clients each pgnear's TPS against direct (at least 0.65x) and PgBouncer (at
/// least 1.15x).
fn read_only_summary(
    b: &Bench<'_>,
    mode: &str,
    one: bool,
    targets: &Targets,
    runs: &[Option<Run>],
) {
    let run = |name: &str| {
        let i = targets.iter().position(|(n, _)| *n == name)?;
        runs.get(i).copied().flatten()
    };
    let Some(direct) = run("direct") else {
        return;
    };
    let bouncer = run("pgbouncer");
    for name in ["pgnear", PIPELINED, POLLING] {
        let Some(near) = run(name) else {
            continue;
        };
        if one {
            let added = (near.lat_ms - direct.lat_ms) * 1000.0;
            let mut measured = format!("{added:+.0} µs");
            if let Some(p) = bouncer {
                let _ = write!(
                    measured,
                    " (PgBouncer {:+.0} µs)",
                    (p.lat_ms - direct.lat_ms) * 1000.0
                );
            }
            let what = format!("`pgbench -S -M {mode}` 1 client, {name}: added latency");
            b.summary([&what, "≤ 10 µs", &measured, verdict(added <= 10.0)]);
            continue;
        }
        let ratio = near.tps / direct.tps;
        let mut measured = format!("{ratio:.2}x direct");
        let mut met = ratio >= 0.65;
        match bouncer {
            Some(p) => {
                let vs = near.tps / p.tps;
                let _ = write!(
                    measured,
                    ", {vs:.2}x PgBouncer ({:.2}x direct)",
                    p.tps / direct.tps
                );
                met &= vs >= 1.15;
            }
            None => measured.push_str(", PgBouncer n/a"),
        }
        let what = format!("`pgbench -S -M {mode}` 8 clients, {name}");
        b.summary([
            &what,
            "≥ 0.65x direct, ≥ 1.15x PgBouncer",
            &measured,
            verdict(met),
        ]);
    }
}

/// The `pgbench -S -C` figures: pgnear's and PgBouncer's TPS against direct (the first target),
/// as a note for the report; also a summary row.
fn connect_ratios(b: &Bench<'_>, targets: &Targets, runs: &[Option<Run>]) -> String {
    let tps = |name: &str| {
        let i = targets.iter().position(|(n, _)| *n == name)?;
        runs.get(i).copied().flatten().map(|r| r.tps)
    };
    let Some((direct, near)) = tps("direct").zip(tps("pgnear")) else {
        b.summary([
            "`pgbench -S -C` 8 clients, pgnear vs direct to the replica",
            "(report)",
            "n/a: a run failed",
            "—",
        ]);
        return "- `pgbench -S -C`: no ratio, a run failed.\n".into();
    };
    let ratio = near / direct;
    let mut note = format!(
        "- New connection per transaction (`pgbench -S -C`, SCRAM each time, 8 clients): \
         pgnear {near:.0} TPS vs {direct:.0} direct to the replica, {ratio:.2}x"
    );
    let mut measured = format!("{ratio:.2}x ({near:.0} vs {direct:.0} TPS)");
    if let Some(bouncer) = tps("pgbouncer") {
        let (vs, of) = (near / bouncer, bouncer / direct);
        let _ = write!(
            note,
            "; PgBouncer {bouncer:.0} TPS, {of:.2}x direct; pgnear vs PgBouncer {vs:.2}x"
        );
        let _ = write!(measured, "; PgBouncer {of:.2}x, pgnear/PgBouncer {vs:.2}x");
    }
    note.push_str(".\n");
    b.summary([
        "`pgbench -S -C` 8 clients (new connection per transaction), pgnear vs direct to the replica",
        "(report the ratio)",
        &measured,
        "—",
    ]);
    note
}

/// Runs `args` against each target in turn, `REPS` times over (a target that fails once is not
/// run again), and returns one table row per target with the median run, and the medians.
async fn pgbench_rows(
    b: &Bench<'_>,
    args: &[&str],
    targets: &Targets,
    notes: &mut String,
) -> anyhow::Result<(String, Vec<Option<Run>>)> {
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
    let medians: Vec<Option<Run>> = cells.iter().map(median).collect();
    let direct = medians[0];
    let one_client = args.windows(2).any(|w| w == ["-c", "1"]);
    let mut out = String::new();
    for (((name, _), cell), m) in targets.iter().zip(&cells).zip(&medians) {
        let Some((m, d)) = m.zip(direct) else {
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
    Ok((out, medians))
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
    // `tps = N (without initial connection time)`, or `(including reconnection times)` with -C.
    let field = |prefix: &str| {
        let mut lines = stdout.lines();
        lines.find_map(|l| l.strip_prefix(prefix)?.split(' ').next()?.parse().ok())
    };
    match (secs, field("tps = "), field("latency average = ")) {
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

/// A PgBouncer in transaction mode in front of the replica, in its own temporary directory, with
/// `auth_type` and `max_client_conn` as given.
/// Killed on drop, by the pid in its pidfile: under `runuser` it is not our direct child.
struct Bouncer {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Bouncer {
    async fn start(
        bin: &Path,
        replica: SocketAddr,
        o: &ClusterOptions,
        auth_type: &str,
        max_clients: usize,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("pgnear-bench-").tempdir()?;
        let d = dir.path();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let (host, port, listen) = (replica.ip(), replica.port(), addr.port());
        let (users, pid, db) = (d.join("userlist.txt"), d.join("pgbouncer.pid"), &o.database);
        let ini = format!(
            "[databases]\n{db} = host={host} port={port} dbname={db}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n\
             auth_type = {auth_type}\nauth_file = {}\npool_mode = transaction\n\
             default_pool_size = 20\nmax_client_conn = {max_clients}\npidfile = {}\n",
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
            // runuser's PAM session lowers the open-files soft limit (to 1024 here): restore ours.
            let (soft, hard) = nofile("self");
            let nofile = format!("--nofile={soft}:{hard}");
            cmd = command("runuser", &["-u", "postgres", "--", "prlimit", &nofile]);
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

impl Bouncer {
    /// PgBouncer's own pid, from its pidfile.
    fn pid(&self) -> Option<u32> {
        let pid = std::fs::read_to_string(self.dir.path().join("pgbouncer.pid"));
        pid.ok()?.trim().parse().ok()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
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
    /// A new connection's first statement is a write (`INSERT_SQL`).
    connect_write: Vec<f64>,
}

async fn section_regions(b: &Bench<'_>) -> Res {
    let relay = &b.cluster.replica(REPLICA).context("no syd replica")?.relay;
    relay.set_delay(ONE_WAY);
    let result = regions_measure(b).await;
    relay.set_delay(Duration::ZERO);
    result
}

/// pgnear in syd twice: forward mode and replay mode, both with `pool.min_idle = MIN_IDLE`.
async fn regions_measure(b: &Bench<'_>) -> Res {
    let mut config = proxy_config(b.cluster, REPLICA);
    config.pool.min_idle = MIN_IDLE;
    let mut replay_config = config.clone();
    replay_config.routing.write_mode = WriteMode::Replay;
    let forward = Proxy::start(config).await?;
    let replay = match Proxy::start(replay_config).await {
        Ok(p) => p,
        Err(e) => {
            forward.shutdown().await;
            return Err(e.into());
        }
    };
    let result = regions_run(b, &forward, &replay).await;
    forward.shutdown().await;
    replay.shutdown().await;
    result
}

async fn regions_run(b: &Bench<'_>, forward: &Proxy, replay: &Proxy) -> Res {
    let (cluster, samples) = (b.cluster, b.samples);
    let direct_url = cluster.primary_url_from(REPLICA);
    progress(format!("{samples} latency samples each, direct"));
    let mut d = latency_samples(&direct_url, samples)
        .await
        .context("direct")?;
    d.connect_write = connect_samples(&direct_url, samples, INSERT_SQL).await?;
    progress("latency samples through pgnear in syd (forward mode)");
    let near_url = proxy_url(cluster, forward);
    let mut n = latency_samples(&near_url, samples)
        .await
        .context("through pgnear")?;
    // The pool is warm again (a write session may have taken a connection), then count what
    // the new connections' first writes cost the pool.
    let admin = forward.admin_addr();
    let idle = r#"pgnear_pool_idle_connections{upstream="primary"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(admin, idle).await.unwrap_or(0.0) < MIN_IDLE as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let warm = metric(admin, idle).await.unwrap_or(f64::NAN);
    let connects = r#"pgnear_pool_server_connects_total{upstream="primary"}"#;
    let resets = r#"pgnear_pool_resets_total{upstream="primary"}"#;
    let before = [metric(admin, connects).await, metric(admin, resets).await];
    n.connect_write = connect_samples(&near_url, samples, INSERT_SQL)
        .await
        .context("connect + INSERT through pgnear")?;
    let after = [metric(admin, connects).await, metric(admin, resets).await];
    let [opened, reset] = [0, 1].map(|i| match (before[i], after[i]) {
        (Some(x), Some(y)) => format!("{:.0}", y - x),
        _ => "?".into(),
    });
    progress("read samples straight to the syd replica");
    let replica_url = cluster.replica_url(REPLICA).context("no syd replica")?;
    n.replica_read = latency_samples_reads(&replica_url, samples).await?;
    progress("latency samples through pgnear in syd (replay mode)");
    let replay_url = proxy_url(cluster, replay);
    let r = Samples {
        read: latency_samples_reads(&replay_url, samples).await?,
        connect: connect_samples(&replay_url, samples, "SELECT 1").await?,
        ..Samples::default()
    };

    let delay = ONE_WAY.as_millis();
    let mut out = format!(
        "The syd relay adds {delay} ms each way. The app in syd talks either to the primary \
         directly (`primary_url_from(\"syd\")`) or to pgnear in syd (forward mode, session \
         consistency, session pooling with `pool.min_idle = {MIN_IDLE}`; replay-mode rows: a \
         second pgnear with `write_mode = \"replay\"`, same pool). Reads: `{READ_SQL}`; writes: \
         `{WRITE_SQL}`; read after write: the same read right after a write, same session; \
         connect: a new connection (SCRAM) and its first statement, `SELECT 1` or \
         `{INSERT_SQL}`, in the simple protocol. Otherwise client-side prepared statements; \
         {samples} samples each; milliseconds.\n\n\
         | sample | direct p50 | direct p99 | pgnear p50 | pgnear p99 |\n|---|---:|---:|---:|---:|\n"
    );
    let rows = [
        ("read", &d.read, &n.read),
        (
            "read, straight to the syd replica (pgnear column)",
            &d.read,
            &n.replica_read,
        ),
        ("read, pgnear in replay mode", &d.read, &r.read),
        ("write", &d.write, &n.write),
        ("read after write", &d.raw, &n.raw),
        ("connect + `SELECT 1`", &d.connect, &n.connect),
        (
            "connect + `SELECT 1`, pgnear in replay mode",
            &d.connect,
            &r.connect,
        ),
        (
            "connect + first `INSERT`",
            &d.connect_write,
            &n.connect_write,
        ),
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
    let rtt = 2.0 * ONE_WAY.as_secs_f64() * 1000.0;
    let target = rtt + 5.0;
    let [dw50, dw99, nw50, nw99] = [
        (&d.connect_write, 50.0),
        (&d.connect_write, 99.0),
        (&n.connect_write, 50.0),
        (&n.connect_write, 99.0),
    ]
    .map(|(v, p)| percentile(v, p));
    let (rtts50, rtts99) = (dw50 / rtt, dw99 / rtt);
    writeln!(
        out,
        "- New connection + first write (`INSERT`): {dw50:.2} / {dw99:.2} ms (p50 / p99) direct \
         ({rtts50:.1} / {rtts99:.1} RTT: TCP, SCRAM and the statement each cross the distance) vs \
         {nw50:.2} / {nw99:.2} ms through pgnear, whose pool was warm ({warm} idle primary \
         connections before the samples). Target 1 RTT + 5 ms = {target:.0} ms: {} at p50, {} at \
         p99. During those {samples} samples pgnear opened {opened} server connection(s) to the \
         primary (the pool's own top-up included) and reset {reset} (`DISCARD ALL`, run in the \
         background after each session that wrote, in session mode, before the connection is \
         reused).",
        verdict(nw50 <= target),
        verdict(nw99 <= target),
    )?;
    let slowest = n.connect_write.iter().copied().fold(0.0, f64::max);
    let (w50, w99) = (percentile(&n.write, 50.0), percentile(&n.write, 99.0));
    // Waiting behind a reset adds up to 1 RTT, a new server connection about 4.
    let waited = match slowest < 1.5 * rtt {
        true => "so no client waited for a reset or a server handshake",
        false => "so at least one client waited for a reset or a server handshake",
    };
    writeln!(
        out,
        "- The same through pgnear, against a write on an established session: {:+.2} ms at \
         p50, {:+.2} ms at p99 (the local connect and SCRAM exchange with pgnear). Slowest \
         sample {slowest:.2} ms, {waited} (a reset costs up to 1 RTT, a handshake about 4).",
        nw50 - w50,
        nw99 - w99,
    )?;
    let p99 = match nw99 <= target {
        true => "",
        false => "; p99 not met",
    };
    b.summary([
        "new connection + first write from the far region, pool warm (p50 / p99)",
        &format!("at most 1 RTT + 5 ms ({target:.0} ms)"),
        &format!("{nw50:.2} / {nw99:.2} ms vs {dw50:.2} / {dw99:.2} ms direct"),
        &format!("{} at p50{p99}", verdict(nw50 <= target)),
    ]);

    let chart = target_dir().join("bench-latency.svg");
    let groups: [ChartGroup; 5] = [
        (
            "read",
            vec![
                (0, &d.read),
                (1, &n.replica_read),
                (2, &n.read),
                (3, &r.read),
            ],
        ),
        ("write", vec![(0, &d.write), (2, &n.write)]),
        ("read after write", vec![(0, &d.raw), (2, &n.raw)]),
        (
            "new connection + SELECT 1",
            vec![(0, &d.connect), (2, &n.connect), (3, &r.connect)],
        ),
        (
            "new connection + INSERT",
            vec![(0, &d.connect_write), (2, &n.connect_write)],
        ),
    ];
    let title = format!(
        "App in syd, primary in iad, {:.0} ms RTT: latency per statement ({samples} samples each)",
        rtt
    );
    std::fs::write(&chart, latency_svg(&title, &groups))
        .with_context(|| format!("writing {}", chart.display()))?;
    writeln!(
        out,
        "- Chart of these distributions: `{}` (box p25 to p75, bar at p50, whiskers p1 to p99; \
         committed as `docs/latency.svg`).",
        chart.display()
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
    drop((reader, writer));
    out.connect = connect_samples(url, n, "SELECT 1").await?;
    Ok(out)
}

/// `n` timed new connections, each running `sql` (simple protocol) and closing, one at a time.
async fn connect_samples(url: &str, n: usize, sql: &str) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        connect(url).await?.simple_query(sql).await?;
        out.push(ms(t));
    }
    Ok(out)
}

/// One sample of pgnear's `/metrics` (`name` with its labels, as printed), over plain HTTP.
async fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(admin).await.ok()?;
    let request = "GET /metrics HTTP/1.1\r\nHost: pgnear\r\nConnection: close\r\n\r\n";
    s.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text));
    read.await.ok()?.ok()?;
    let mut lines = text.lines();
    lines.find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// What the chart draws for one measurement: its name, and (setup index, samples) per row.
type ChartGroup<'a> = (&'a str, Vec<(usize, &'a [f64])>);

/// The setups drawn in the chart: legend text and colour, by index.
const SETUPS: [(&str, &str); 4] = [
    ("direct to the primary (iad)", "#d62728"),
    ("direct to the local replica (syd)", "#8c8c8c"),
    ("pgnear in syd, forward mode", "#1f77b4"),
    ("pgnear in syd, replay mode", "#2ca02c"),
];

/// A horizontal box plot (log-scale milliseconds) of latency distributions, grouped by what was
/// measured, one row per setup (an index into `SETUPS`): plain SVG text.
fn latency_svg(title: &str, groups: &[ChartGroup]) -> String {
    let (width, left, right, top, row, gap) = (960.0, 220.0, 70.0, 78.0, 20.0, 14.0);
    let rows: usize = groups.iter().map(|(_, r)| r.len()).sum();
    let plot_h = rows as f64 * row + groups.len() as f64 * gap;
    let height = top + plot_h + 56.0;
    let all = groups
        .iter()
        .flat_map(|(_, r)| r.iter().flat_map(|(_, v)| v.iter()));
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let lo = lo.max(1e-3).log10().floor() as i32;
    let hi = (hi.max(1e-3).log10().ceil() as i32).max(lo + 1);
    let x = |v: f64| {
        let f = (v.max(1e-3).log10() - lo as f64) / (hi - lo) as f64;
        left + f.clamp(0.0, 1.0) * (width - left - right)
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" font-size=\"15\" font-weight=\"bold\" \
         text-anchor=\"middle\">{}</text>\n",
        width / 2.0,
        xml(title)
    );
    // Legend.
    let mut lx = 20.0;
    for (name, colour) in SETUPS {
        let _ = writeln!(
            svg,
            "<rect x=\"{lx}\" y=\"36\" width=\"14\" height=\"10\" fill=\"{colour}\" \
             fill-opacity=\"0.45\" stroke=\"{colour}\"/><text x=\"{}\" y=\"45\">{}</text>",
            lx + 18.0,
            xml(name)
        );
        lx += 18.0 + 6.5 * name.len() as f64 + 16.0;
    }
    // Decades: grid lines and labels; lighter lines at 2..9.
    let bottom = top + plot_h;
    for e in lo..=hi {
        let v = 10f64.powi(e);
        let xv = x(v);
        let label = if e < 0 {
            format!("{:.*}", (-e) as usize, v)
        } else {
            format!("{v:.0}")
        };
        let _ = writeln!(
            svg,
            "<line x1=\"{xv:.1}\" y1=\"{}\" x2=\"{xv:.1}\" y2=\"{bottom}\" stroke=\"#bbb\"/>\
             <text x=\"{xv:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            top - 8.0,
            bottom + 16.0
        );
        for m in 2..10 {
            let xm = x(v * m as f64);
            if e < hi {
                let _ = writeln!(
                    svg,
                    "<line x1=\"{xm:.1}\" y1=\"{}\" x2=\"{xm:.1}\" y2=\"{bottom}\" \
                     stroke=\"#eee\"/>",
                    top - 8.0
                );
            }
        }
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">milliseconds, log scale \
         (box: p25 to p75, bar: p50, whiskers: p1 to p99; the number: p50)</text>",
        left + (width - left - right) / 2.0,
        bottom + 36.0
    );
    let mut y = top;
    for (name, series) in groups {
        let group_h = series.len() as f64 * row;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-weight=\"bold\">{}</text>",
            left - 10.0,
            y + group_h / 2.0 + 4.0,
            xml(name)
        );
        for (setup, values) in series {
            let (_, colour) = SETUPS[*setup];
            let [p1, p25, p50, p75, p99] =
                [1.0, 25.0, 50.0, 75.0, 99.0].map(|p| percentile(values, p));
            let mid = y + row / 2.0;
            if !values.is_empty() {
                let _ = writeln!(
                    svg,
                    "<line x1=\"{:.1}\" y1=\"{mid}\" x2=\"{:.1}\" y2=\"{mid}\" stroke=\"{colour}\"/>\
                     <line x1=\"{:.1}\" y1=\"{}\" x2=\"{:.1}\" y2=\"{}\" stroke=\"{colour}\"/>\
                     <line x1=\"{:.1}\" y1=\"{}\" x2=\"{:.1}\" y2=\"{}\" stroke=\"{colour}\"/>\
                     <rect x=\"{:.1}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"{colour}\" \
                     fill-opacity=\"0.45\" stroke=\"{colour}\"/>\
                     <line x1=\"{:.1}\" y1=\"{}\" x2=\"{:.1}\" y2=\"{}\" stroke=\"{colour}\" \
                     stroke-width=\"3\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>",
                    x(p1),
                    x(p99),
                    x(p1),
                    mid - 4.0,
                    x(p1),
                    mid + 4.0,
                    x(p99),
                    mid - 4.0,
                    x(p99),
                    mid + 4.0,
                    x(p25),
                    mid - 6.0,
                    (x(p75) - x(p25)).max(1.0),
                    12.0,
                    x(p50),
                    mid - 7.0,
                    x(p50),
                    mid + 7.0,
                    x(p99) + 6.0,
                    mid + 4.0,
                    fmt_ms(p50)
                );
            }
            y += row;
        }
        y += gap;
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
            y - gap / 2.0,
            width - right,
            y - gap / 2.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Milliseconds with about three significant digits.
fn fmt_ms(v: f64) -> String {
    match v {
        v if v >= 100.0 => format!("{v:.0} ms"),
        v if v >= 10.0 => format!("{v:.1} ms"),
        v if v >= 1.0 => format!("{v:.2} ms"),
        v => format!("{v:.3} ms"),
    }
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

// ---------------------------------------------------------------------------------------------
// C. Memory

async fn section_memory(b: &Bench<'_>, pgbouncer: Option<&Path>) -> Res {
    let cluster = b.cluster;
    // Cargo builds the package's binaries for its benches and names them here.
    let bin = Path::new(env!("CARGO_BIN_EXE_pgnear"));
    if !bin.is_file() {
        let why = "is missing: `cargo build --release --bin pgnear`";
        return Ok(format!("Skipped: `{}` {why}.\n", bin.display()));
    }
    let (clients, fd_note) = client_budget(b.idle_clients);
    // Clients use trust auth here (a raw startup packet is all they send); pgnear still
    // authenticates to the servers with SCRAM.
    let limit = (clients + 100).to_string();
    let env = [
        ("PGNEAR_AUTH_METHOD", "trust"),
        ("PGNEAR_PROXY_MAX_CLIENT_CONNECTIONS", limit.as_str()),
    ];
    let pgnear = PgnearProcess::start(bin, cluster, REPLICA, &env).await?;
    let result = memory_measure(b, pgnear.pid, pgnear.addr, clients).await;
    let log = pgnear.log();
    pgnear.stop().await;
    let (text, idle_kb, held_kb, n) =
        result.with_context(|| format!("pgnear log: {}", log.trim()))?;
    let bin = bin.display();
    let mut out = format!("Binary `{bin}` in syd, no added latency.\n\n{text}");
    if let Some(note) = fd_note {
        writeln!(out, "- {note}")?;
    }
    let bouncer = match pgbouncer {
        None => Err(anyhow::anyhow!("not installed")),
        Some(bin) => bouncer_memory(cluster, bin, clients).await,
    };
    let per = |idle: u64, held: u64, n: usize| held.saturating_sub(idle) as f64 / n.max(1) as f64;
    let mb = |kb: u64| kb as f64 / 1024.0;
    write!(
        out,
        "\nIdle clients side by side (raw startup packets, trust auth, each client held open and \
         silent after ReadyForQuery):\n\n\
         | proxy | clients | VmRSS idle (MB) | VmRSS with the clients (MB) | per client (KB) |\n\
         |---|---:|---:|---:|---:|\n\
         | pgnear | {n} | {:.1} | {:.1} | {:.1} |\n",
        mb(idle_kb),
        mb(held_kb),
        per(idle_kb, held_kb, n)
    )?;
    match bouncer {
        Ok((idle, held, bn, limit, failed)) => {
            writeln!(
                out,
                "| PgBouncer (transaction mode, `max_client_conn = {}`, open-files limit {limit}) \
                 | {bn} | {:.1} | {:.1} | {:.1} |",
                clients + 100,
                mb(idle),
                mb(held),
                per(idle, held, bn)
            )?;
            if let Some(e) = failed {
                writeln!(
                    out,
                    "\n- PgBouncer stopped accepting after {bn} clients: {e}"
                )?;
            }
        }
        Err(e) => writeln!(out, "| PgBouncer: failed, {e:#} | | | | |")?,
    }
    let total = mb(held_kb);
    b.summary([
        &format!("pgnear RSS with {n} idle clients"),
        "at most 100 MB",
        &format!(
            "{total:.1} MB ({:.1} KB per client, idle {:.1} MB)",
            per(idle_kb, held_kb, n),
            mb(idle_kb)
        ),
        verdict(total <= 100.0 && n >= IDLE_CLIENTS),
    ]);
    Ok(out)
}

/// The pgnear process with idle clients, then streaming: (the report's table and notes,
/// idle kB, kB with the clients, clients held).
async fn memory_measure(
    b: &Bench<'_>,
    pid: u32,
    addr: SocketAddr,
    target: usize,
) -> anyhow::Result<(String, u64, u64, usize)> {
    let o = b.cluster.options();
    let (user, password, db) = (&o.app_user, &o.app_password, &o.database);
    let url = format!("postgres://{user}:{password}@{addr}/{db}?sslmode=disable");
    // One query served: pgnear has connected to the replica and cached its startup parameters.
    connect(&url).await?.simple_query("SELECT 1").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kb(pid)?;

    progress(format!("opening {target} idle clients through pgnear"));
    let began = Instant::now();
    let (clients, failed) = raw_clients(addr, user, db, target).await;
    let secs = began.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (held, n) = (rss_kb(pid)?, clients.len());
    drop(clients);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kb(pid)?;

    progress("streaming 100 MB through pgnear");
    let hwm_before = status_kb(pid, "VmHWM:")?;
    let (sampled, stream_secs, outcome) = stream_peak(pid, &url).await?;
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
    let (growth, rate) = (peak_mb - after_mb, 100.0 / stream_secs.max(1e-9));
    let mut out = format!(
        "| state | VmRSS (MB) |\n|---|---:|\n\
         | idle after startup (one query served) | {idle_mb:.1} |\n\
         | {n} idle clients (startup done) | {held_mb:.1} |\n\
         | after those clients left | {after_mb:.1} |\n\
         | peak while one client streams 100 MB | {peak_mb:.1} |\n\n\
         - Per idle client: {per_client:.1} KB ((RSS with {n} clients - idle) / {n}); they \
         connected in {secs:.1} s, 100 at a time, each a raw startup packet read up to \
         ReadyForQuery (pgnear answers it from cached server parameters: an idle client holds no \
         server connection).\n\
         - Streaming (`{STREAM_SQL}` by psql, RSS sampled every 50 ms and checked against \
         VmHWM): peak {growth:+.1} MB over the RSS before it; {stream_secs:.1} s, {rate:.0} MB/s; \
         {outcome}.\n"
    );
    if let Some(e) = failed {
        writeln!(out, "- Connecting stopped after {n} clients: {e}")?;
    }
    Ok((out, idle, held, n))
}

/// What `bouncer_memory` measured: idle kB, kB with the clients, clients held, PgBouncer's
/// open-files limit, why connecting stopped early.
type BouncerMemory = (u64, u64, usize, String, Option<String>);

/// A PgBouncer (trust auth) in front of the replica with `clients` idle clients.
async fn bouncer_memory(
    cluster: &Cluster,
    bin: &Path,
    clients: usize,
) -> anyhow::Result<BouncerMemory> {
    let o = cluster.options();
    let replica = cluster
        .replica(REPLICA)
        .context("no syd replica")?
        .node
        .addr();
    let bouncer = Bouncer::start(bin, replica, o, "trust", clients + 100).await?;
    let pid = bouncer.pid().context("no PgBouncer pid")?;
    // The first client makes PgBouncer log in to the server; later ones get its parameters.
    let (first, failed) = raw_clients(bouncer.addr, &o.app_user, &o.database, 1).await;
    if let Some(e) = failed {
        bail!("a first client failed: {e}");
    }
    drop(first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kb(pid)?;
    progress(format!("opening {clients} idle clients through PgBouncer"));
    let (held_clients, failed) = raw_clients(bouncer.addr, &o.app_user, &o.database, clients).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = rss_kb(pid)?;
    let n = held_clients.len();
    drop(held_clients);
    let limit = nofile(&pid.to_string()).0;
    if let Some(e) = failed.as_ref().filter(|_| n == 0) {
        bail!("no client connected: {e}");
    }
    Ok((idle, held, n, limit.to_string(), failed))
}

/// Opens `n` client connections to `addr`, 100 at a time, each a startup packet read up to
/// ReadyForQuery (trust auth). Stops at the first batch with a failure and says why.
async fn raw_clients(
    addr: SocketAddr,
    user: &str,
    db: &str,
    n: usize,
) -> (Vec<TcpStream>, Option<String>) {
    let mut startup = Vec::new();
    startup.extend_from_slice(&196_608u32.to_be_bytes());
    for (k, v) in [("user", user), ("database", db)] {
        for s in [k, v] {
            startup.extend_from_slice(s.as_bytes());
            startup.push(0);
        }
    }
    startup.push(0);
    let len = (startup.len() as u32 + 4).to_be_bytes();
    let packet: Arc<[u8]> = [&len[..], &startup].concat().into();
    let mut clients = Vec::with_capacity(n);
    while clients.len() < n {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..(n - clients.len()).min(100) {
            let packet = packet.clone();
            let startup = raw_startup(addr, packet);
            batch.spawn(tokio::time::timeout(Duration::from_secs(15), startup));
        }
        let mut failed = None;
        while let Some(joined) = batch.join_next().await {
            match joined {
                Ok(Ok(Ok(s))) => clients.push(s),
                Ok(Ok(Err(e))) => failed = Some(format!("{e:#}")),
                Ok(Err(_)) => failed = Some("no ReadyForQuery within 15 s".into()),
                Err(e) => failed = Some(e.to_string()),
            }
        }
        if failed.is_some() {
            return (clients, failed);
        }
    }
    (clients, None)
}

async fn raw_startup(addr: SocketAddr, packet: Arc<[u8]>) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&packet).await?;
    let mut body = Vec::new();
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        body.resize(len.saturating_sub(4), 0);
        s.read_exact(&mut body).await?;
        match head[0] {
            b'Z' => return Ok(s),
            b'E' => bail!(
                "error: {}",
                String::from_utf8_lossy(&body).replace('\0', " ")
            ),
            b'R' if body.get(..4) != Some(&[0, 0, 0, 0]) => bail!("a password was asked for"),
            _ => {}
        }
    }
}

/// How many idle clients to open: the open-files limit must allow one socket per client here
/// and in the proxy (which inherits it). A soft limit below what is needed is raised to the
/// hard limit (`prlimit`) when that helps; the note says what happened.
fn client_budget(wanted: usize) -> (usize, Option<String>) {
    let (mut soft, hard) = nofile("self");
    let needed = wanted + 512;
    let mut note = None;
    if soft < needed && hard > soft {
        let pid = std::process::id().to_string();
        let set = format!("--nofile={hard}:{hard}");
        let mut prlimit = std::process::Command::new("prlimit");
        let ran = prlimit.args(["--pid", &pid, &set]).status();
        let was = soft;
        soft = nofile("self").0;
        note = Some(format!(
            "Open-files limit raised from {was} to {soft} for this run ({})",
            match ran {
                Ok(s) if s.success() => "prlimit".to_string(),
                Ok(s) => format!("prlimit: {s}"),
                Err(e) => format!("prlimit: {e}"),
            }
        ));
    }
    let n = wanted.min(soft.saturating_sub(512));
    if n < wanted {
        note = Some(format!(
            "Scaled down from {wanted} clients: the open-files limit is {soft} (hard {hard}); \
             raise it (`ulimit -n`) to run them all."
        ));
    }
    (n, note)
}

/// The open-files limit (soft, hard) of `/proc/<pid>` (`self` for this process).
fn nofile(pid: &str) -> (usize, usize) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let line = text.lines().find(|l| l.starts_with("Max open files"));
    let mut fields = line.map(|l| l.split_whitespace().skip(3));
    let mut next = || fields.as_mut()?.next()?.parse::<usize>().ok();
    (next().unwrap_or(1024), next().unwrap_or(1024))
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
