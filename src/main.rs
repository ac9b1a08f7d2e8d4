//! The `pgnear` binary: `run` (default), `lab`, `check`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgnear::config::{Config, HumanDuration, LogFormat};

#[derive(Parser)]
#[command(
    name = "pgnear",
    version,
    about = "Postgres sidecar: local reads, writes to the primary region, read-your-writes"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run {
        /// Config file (TOML); also PGNEAR_CONFIG.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Start a local multi-region cluster: a primary, a replica per other region, a latency relay
    /// between regions and one pgnear per region. Ctrl-C stops everything.
    Lab {
        /// Round-trip time between regions, e.g. 100ms.
        #[arg(long, default_value = "100ms", value_parser = parse_duration)]
        rtt: Duration,
        /// Regions, primary first.
        #[arg(long, default_value = "iad,syd", value_delimiter = ',')]
        regions: Vec<String>,
    },
    /// Validate the config, then print it (secrets masked) and the derived upstreams.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    HumanDuration::parse(s).ok_or_else(|| format!("invalid duration {s:?} (e.g. 100ms, 1s)"))
}

fn load(config: Option<PathBuf>) -> anyhow::Result<Config> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let path = config.or_else(|| env.get("PGNEAR_CONFIG").map(PathBuf::from));
    Ok(Config::load(path.as_deref(), &env)?)
}

fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = |threads: usize| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    match cli.command.unwrap_or(Command::Run { config: None }) {
        Command::Run { config } => {
            let config = load(config)?;
            init_tracing(config.log.format, &config.log.level);
            runtime(config.proxy.worker_threads)?.block_on(async {
                let proxy = pgnear::Proxy::start(config).await?;
                wait_for_signal().await;
                tracing::info!("shutting down");
                proxy.shutdown().await;
                anyhow::Ok(())
            })
        }
        Command::Lab { rtt, regions } => {
            init_tracing(LogFormat::Text, "warn,pgnear::lab=info");
            let threads = pgnear::config::ProxyConfig::default().worker_threads;
            runtime(threads)?.block_on(pgnear::lab::run_cli(regions, rtt / 2, wait_for_signal()))
        }
        Command::Check { config } => {
            let config = load(config)?;
            print!("{}", pgnear::check_report(&config));
            Ok(())
        }
    }
    .context("pgnear")
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
