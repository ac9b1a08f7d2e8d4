//! The local multi-region lab: a real Postgres primary, a streaming replica per other region,
//! latency relays between regions (see `cluster`), and one pgnear per region wired to them.

mod cleanup;
pub mod cluster;
mod pgbin;
pub mod postgres;
pub mod process;
pub mod relay;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use self::cluster::{Cluster, ClusterOptions};
use crate::config::Config;
use crate::proxy::Proxy;

/// The config of a pgnear running in `region` of `cluster`: the primary through the region's
/// relay, the region's replica directly, ephemeral listen ports.
pub fn proxy_config(cluster: &Cluster, region: &str) -> Config {
    let mut env = BTreeMap::new();
    env.insert("DATABASE_URL".to_string(), cluster.primary_url_from(region));
    if let Some(url) = cluster.replica_url(region) {
        env.insert("PGNEAR_REPLICA_URL".to_string(), url);
    }
    env.insert("FLY_REGION".to_string(), region.to_string());
    env.insert(
        "PRIMARY_REGION".to_string(),
        cluster.primary_region().to_string(),
    );
    env.insert("PGNEAR_LISTEN".to_string(), "127.0.0.1:0".to_string());
    env.insert("PGNEAR_ADMIN_LISTEN".to_string(), "127.0.0.1:0".to_string());
    Config::from_toml_and_env("", "lab", &env).expect("the lab's config is valid")
}

/// A client URL for a pgnear of the lab.
pub fn proxy_url(cluster: &Cluster, proxy: &Proxy) -> String {
    let o = cluster.options();
    format!(
        "postgres://{}:{}@{}/{}?sslmode=disable",
        o.app_user,
        o.app_password,
        proxy.addr(),
        o.database
    )
}

/// `pgnear lab`: starts everything, prints where things run, waits for `stop`, tears down.
pub async fn run_cli(
    regions: Vec<String>,
    one_way: Duration,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    if regions.is_empty() || regions.iter().any(|r| r.is_empty()) {
        anyhow::bail!("--regions needs at least one region name, primary first (e.g. iad,syd)");
    }
    println!(
        "starting a {}-region lab ({} ms between regions, one way)...",
        regions.len(),
        one_way.as_millis()
    );
    let cluster = Cluster::start(ClusterOptions {
        regions: regions.clone(),
        one_way_delay: one_way,
        ..ClusterOptions::default()
    })
    .await?;
    let mut proxies = Vec::new();
    for region in &regions {
        // Every role of the lab logs in as itself (see `cluster::LAB_ROLES`).
        let mut config = proxy_config(&cluster, region);
        // Every node in the lists: the pgnears follow a failover (`failover` below) and read
        // from another region's replica when their own is down.
        config.upstream.primary_url = failover_url(&cluster, region, true);
        if cluster.replica(region).is_some() {
            config.upstream.replica_url = failover_url(&cluster, region, false);
        }
        config.auth.users = crate::config::AuthUsers::Query;
        config.auth.query = cluster::VERIFIER_QUERY.to_string();
        let proxy = Proxy::start(config).await?;
        proxies.push((region.clone(), proxy));
    }
    println!("\nlab ready (files in {}):", cluster.dir().display());
    println!(
        "  primary   {:<6} postgres on {}",
        cluster.primary_region(),
        cluster.primary().addr()
    );
    for r in cluster.replicas() {
        println!(
            "  replica   {:<6} postgres on {} (streams from the primary through relay {})",
            r.region,
            r.node.addr(),
            r.relay.addr()
        );
    }
    println!();
    for (region, proxy) in &proxies {
        let role = if region == cluster.primary_region() {
            "primary region"
        } else {
            "replica region"
        };
        println!("  {region} ({role}): psql '{}'", proxy_url(&cluster, proxy));
    }
    let roles: Vec<String> = cluster::LAB_ROLES
        .iter()
        .map(|(role, password, encryption)| format!("{role}:{password} ({encryption})"))
        .collect();
    println!(
        "  other roles log in as themselves: {} (replace {}:{} in the URL)",
        roles.join(", "),
        cluster.options().app_user,
        cluster.options().app_password
    );
    println!("\nTry: SELECT pg_is_in_recovery(); SHOW pgnear.region;  Ctrl-C stops everything.");
    if let Some(first) = cluster.replicas().first() {
        println!(
            "Type `failover` and Enter: the primary stops and {}'s replica is promoted; the pgnears follow.",
            first.region
        );
    }
    let mut lines = console_lines();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            line = lines.recv() => match line.as_deref().map(str::trim) {
                Some("failover") => failover(&cluster).await,
                Some("") => {}
                Some(other) => println!("unknown command {other:?}; try `failover`"),
                // No console (stdin closed): wait for Ctrl-C.
                None => {
                    (&mut stop).await;
                    break;
                }
            },
        }
    }
    println!("stopping...");
    for (_, proxy) in proxies {
        proxy.shutdown().await;
    }
    cluster.shutdown().await;
    Ok(())
}

/// A URL of the lab's app listing every node: for the primary, the primary (through the
/// region's relay) then the replicas; for the replica, the region's own replica first.
fn failover_url(cluster: &Cluster, region: &str, primary: bool) -> String {
    let own = cluster.replica(region).map(|r| r.node.addr());
    let mut hosts = Vec::new();
    if primary {
        hosts.push(cluster.primary_addr_from(region));
    }
    hosts.extend(own);
    hosts.extend(
        cluster
            .replicas()
            .iter()
            .map(|r| r.node.addr())
            .filter(|a| Some(*a) != own),
    );
    cluster.app_url_at(&hosts)
}

/// The lines typed on the lab's console (none once stdin closes).
fn console_lines() -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Stops the primary and promotes the first replica.
async fn failover(cluster: &Cluster) {
    let Some(next) = cluster.replicas().first() else {
        println!("no replica to promote");
        return;
    };
    let started = std::time::Instant::now();
    println!("failover: stopping the primary...");
    if let Err(e) = cluster.primary().stop().await {
        println!("failover: stopping the primary failed: {e}");
        return;
    }
    println!("failover: promoting {}'s replica...", next.region);
    match next.node.promote().await {
        Ok(()) => println!(
            "failover: done in {:?}; {} ({}) is the primary; the pgnears move their writes there at their next probe (within 1 s)",
            started.elapsed(),
            next.region,
            next.node.addr()
        ),
        Err(e) => println!("failover: promoting failed: {e}"),
    }
}
