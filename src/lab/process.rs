//! The `pgnear` binary as a process of its own, wired to a lab region: what benchmarks and the
//! soak run measure (memory, file descriptors) is then pgnear's alone, not the load generator's.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use super::cluster::Cluster;

pub struct PgnearProcess {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl PgnearProcess {
    /// Starts `bin` as the pgnear of `region` (the lab's wiring, as `pgnear lab` does) with
    /// `env` added, and waits until it accepts connections.
    pub async fn start(
        bin: &Path,
        cluster: &Cluster,
        region: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<PgnearProcess> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = tempfile::NamedTempFile::new()?;
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("DATABASE_URL", cluster.primary_url_from(region))
            .env("PGNEAR_LISTEN", addr.to_string())
            .env("PGNEAR_ADMIN_LISTEN", "127.0.0.1:0")
            .env("FLY_REGION", region)
            .env("PRIMARY_REGION", cluster.primary_region())
            .env("PGNEAR_LOG_LEVEL", "warn");
        if let Some(url) = cluster.replica_url(region) {
            cmd.env("PGNEAR_REPLICA_URL", url);
        }
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen()?)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("pgnear exited at once")?;
        let mut p = PgnearProcess {
            child,
            pid,
            addr,
            log,
        };
        if let Err(e) = wait_listening(addr, &mut p.child).await {
            bail!("{e}; pgnear log: {}", p.log().trim());
        }
        Ok(p)
    }

    /// Resident memory now, in kB.
    pub fn rss_kb(&self) -> anyhow::Result<u64> {
        rss_kb(self.pid)
    }

    /// Open file descriptors now.
    pub fn open_fds(&self) -> anyhow::Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid))?.count())
    }

    /// What it logged (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Waits until `addr` accepts connections; fails if `child` exits first or after 15 s.
pub async fn wait_listening(addr: SocketAddr, child: &mut Child) -> anyhow::Result<()> {
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

/// Resident memory of a process, in kB.
pub fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    status_kb(pid, "VmRSS:")
}

/// A `kB` field of `/proc/<pid>/status`, e.g. `VmRSS:` or `VmHWM:` (the peak RSS so far).
pub fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let value = status.lines().find_map(|l| l.strip_prefix(field));
    let kb = value.and_then(|v| v.trim().strip_suffix(" kB")?.trim().parse().ok());
    kb.with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// A port nothing listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
