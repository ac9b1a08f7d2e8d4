//! Soak run (not part of CI): `cargo bench --bench soak`.
//!
//! Starts a two-region lab (5 ms one way) and the `pgnear` binary in the replica region
//! (transaction pooling, 8 + 8 server connections), then runs mixed load from 16 clients that
//! reconnect every few hundred operations: reads, writes, read-after-write, short transactions,
//! prepared statements, a larger result now and then. Every `PGNEAR_SOAK_RESTART_MINUTES`
//! (default 5) the replica and the primary take turns being stopped for 5 s and started again.
//! Every 10 s pgnear's RSS and open file descriptors are sampled; the samples go to stdout and
//! `target/soak.csv`. `PGNEAR_SOAK_MINUTES` sets the length (default 30).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pgnear::lab::cluster::{Cluster, ClusterOptions};
use pgnear::lab::process::PgnearProcess;
use tokio_postgres::NoTls;

const PRIMARY: &str = "iad";
const REPLICA: &str = "syd";
const CLIENTS: u64 = 16;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counts {
    ops: AtomicU64,
    errors: AtomicU64,
    connects: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let minutes: u64 = env_num("PGNEAR_SOAK_MINUTES", 30);
    let restart_every = Duration::from_secs(60 * env_num("PGNEAR_SOAK_RESTART_MINUTES", 5));
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(soak(Duration::from_secs(60 * minutes), restart_every))
}

async fn soak(length: Duration, restart_every: Duration) -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        regions: vec![PRIMARY.into(), REPLICA.into()],
        one_way_delay: Duration::from_millis(5),
        ..ClusterOptions::default()
    })
    .await?;
    let result = run(&cluster, length, restart_every).await;
    cluster.shutdown().await;
    result
}

async fn run(cluster: &Cluster, length: Duration, restart_every: Duration) -> anyhow::Result<()> {
    let direct = connect(&cluster.primary_url_from(PRIMARY)).await?;
    direct
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS soak (id bigint PRIMARY KEY, v bigint NOT NULL); \
             INSERT INTO soak SELECT g, 0 FROM generate_series(1, 10000) g ON CONFLICT DO NOTHING",
        )
        .await?;
    cluster.wait_replicas_caught_up().await?;
    let bin = Path::new(env!("CARGO_BIN_EXE_pgnear"));
    let env = [
        ("PGNEAR_POOL_MODE", "transaction"),
        ("PGNEAR_POOL_PRIMARY_SIZE", "8"),
        ("PGNEAR_POOL_REPLICA_SIZE", "8"),
        ("PGNEAR_UPSTREAM_CONNECT_TIMEOUT", "2s"),
    ];
    let pgnear = PgnearProcess::start(bin, cluster, REPLICA, &env).await?;
    let o = cluster.options();
    let url = format!(
        "postgres://{}:{}@{}/{}?sslmode=disable",
        o.app_user, o.app_password, pgnear.addr, o.database
    );
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client(url.clone(), i, counts.clone(), stop.clone())))
        .collect();

    let started = Instant::now();
    let mut csv = String::from("seconds,rss_kb,fds,ops,errors,connects,event\n");
    let mut next_restart = restart_every;
    let mut restarts = 0u32;
    let mut samples = Vec::new();
    eprintln!(
        "soak: {} min, pgnear pid {}",
        length.as_secs() / 60,
        pgnear.pid
    );
    println!("{}", csv.trim_end());
    while started.elapsed() < length {
        tokio::time::sleep(SAMPLE_EVERY).await;
        let mut event = String::new();
        if started.elapsed() >= next_restart {
            next_restart += restart_every;
            restarts += 1;
            let (name, node) = if restarts % 2 == 1 {
                (
                    "replica",
                    &cluster.replica(REPLICA).context("replica")?.node,
                )
            } else {
                ("primary", cluster.primary())
            };
            node.stop().await?;
            tokio::time::sleep(Duration::from_secs(5)).await;
            node.start().await?;
            event = format!("restarted {name}");
        }
        let rss = pgnear.rss_kb().context("pgnear is gone")?;
        let fds = pgnear.open_fds()?;
        let line = format!(
            "{},{rss},{fds},{},{},{},{event}",
            started.elapsed().as_secs(),
            counts.ops.load(Ordering::Relaxed),
            counts.errors.load(Ordering::Relaxed),
            counts.connects.load(Ordering::Relaxed),
        );
        println!("{line}");
        csv.push_str(&line);
        csv.push('\n');
        samples.push((started.elapsed(), rss, fds));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let csv_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/soak.csv");
    std::fs::write(&csv_path, &csv)?;
    // Past the first two minutes (warm-up: pools fill, allocator settles).
    let steady: Vec<_> = samples
        .iter()
        .filter(|(t, _, _)| *t >= Duration::from_secs(120))
        .collect();
    let range = |f: fn(&(Duration, u64, usize)) -> u64| {
        let v: Vec<u64> = steady.iter().map(|s| f(s)).collect();
        (
            v.iter().min().copied(),
            v.iter().max().copied(),
            v.last().copied(),
        )
    };
    let (rss_min, rss_max, rss_last) = range(|s| s.1);
    let (fd_min, fd_max, fd_last) = range(|s| s.2 as u64);
    println!(
        "\nsoak done: {} ops, {} errors, {} connects, {restarts} restarts; \
         steady RSS kB min {rss_min:?} max {rss_max:?} last {rss_last:?}; \
         fds min {fd_min:?} max {fd_max:?} last {fd_last:?}; samples in {}",
        counts.ops.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed),
        counts.connects.load(Ordering::Relaxed),
        csv_path.display()
    );
    let log = pgnear.log();
    if log.contains("panicked") {
        anyhow::bail!("pgnear panicked: {log}");
    }
    pgnear.stop().await;
    Ok(())
}

/// One client: connects, runs a few hundred mixed operations, disconnects, again, until
/// stopped. Errors (expected while servers restart) are counted and followed by a reconnect.
async fn client(url: String, seed: u64, counts: Arc<Counts>, stop: Arc<AtomicBool>) {
    let mut n = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        n ^= n << 13;
        n ^= n >> 7;
        n ^= n << 17;
        n
    };
    while !stop.load(Ordering::Relaxed) {
        let Ok(c) = connect(&url).await else {
            counts.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        counts.connects.fetch_add(1, Ordering::Relaxed);
        for _ in 0..(100 + next() % 400) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let id = (1 + next() % 10_000) as i64;
            let r = match next() % 10 {
                0..=3 => c
                    .query_opt("SELECT v FROM soak WHERE id = $1", &[&id])
                    .await
                    .map(drop),
                4..=5 => c
                    .execute("UPDATE soak SET v = v + 1 WHERE id = $1", &[&id])
                    .await
                    .map(drop),
                6 => {
                    async {
                        c.execute("UPDATE soak SET v = v + 1 WHERE id = $1", &[&id])
                            .await?;
                        c.query_one("SELECT v FROM soak WHERE id = $1", &[&id])
                            .await
                            .map(drop)
                    }
                    .await
                }
                7 => {
                    c.batch_execute(&format!(
                        "BEGIN; UPDATE soak SET v = v - 1 WHERE id = {id}; \
                         SELECT sum(v) FROM soak WHERE id < 100; COMMIT"
                    ))
                    .await
                }
                8 => c
                    .query(
                        "SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g",
                        &[],
                    )
                    .await
                    .map(drop),
                _ => c
                    .simple_query("SET application_name = 'soak'; SELECT 1")
                    .await
                    .map(drop),
            };
            match r {
                Ok(()) => {
                    counts.ops.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    if c.is_closed() {
                        break;
                    }
                }
            }
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}
