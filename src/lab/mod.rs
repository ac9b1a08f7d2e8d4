//! The local multi-region lab: a real Postgres primary, streaming replicas, a latency relay
//! between regions and one pgnear per region.

use std::future::Future;
use std::time::Duration;

pub async fn run_cli(_regions: Vec<String>, _one_way: Duration, _stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::bail!("lab not built yet")
}
