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
    stop.await;
    println!("stopping...");
    for (_, proxy) in proxies {
        proxy.shutdown().await;
    }
    cluster.shutdown().await;
    Ok(())
}
