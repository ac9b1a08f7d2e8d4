//! One PostgreSQL node of the lab: finding the server binaries, running them (through
//! `runuser -u postgres` when we are root, because Postgres refuses to run as root), and
//! creating, starting, stopping, killing and promoting one data directory.
//!
//! Layout of a node under the cluster's temporary directory:
//! `<base>/<name>/` (socket directory, `postgres.log`) and `<base>/<name>/data/` (PGDATA).

use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

pub use super::pgbin::PgBin;

/// Name of the per-node settings file (port, socket directory) included from `postgresql.conf`.
/// It lives in PGDATA, so a base backup copies it and the replica then overwrites it.
const NODE_CONF: &str = "pgnear_node.conf";

/// How long `pg_ctl` may wait for a start/stop/promote.
const PG_CTL_TIMEOUT_SECS: u32 = 60;

/// Everything that can go wrong in the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// No PostgreSQL server binaries on this machine.
    #[error(
        "PostgreSQL server binaries not found ({detail}). Install them: \
         `apt-get install -y postgresql` on Debian/Ubuntu, `brew install postgresql@16` on macOS, \
         or set PGNEAR_PG_BIN to the directory that holds initdb, pg_ctl and postgres"
    )]
    MissingBinaries {
        /// What was looked for and where.
        detail: String,
    },
    /// An external command exited unsuccessfully.
    #[error("`{command}` failed ({status}){}", fmt_tail(.tail))]
    Command {
        /// The command line (passwords masked).
        command: String,
        /// Its exit status.
        status: String,
        /// The last lines of its stderr/stdout and, for server commands, of the node's log.
        tail: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What we were waiting for.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// A filesystem or process-spawning error.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A control connection or query failed.
    #[error("SQL error on {node}: {}", error_chain(.source))]
    Sql {
        /// Which node (region name) the query went to.
        node: String,
        /// The driver error (its message includes the server's).
        #[source]
        source: tokio_postgres::Error,
    },
    /// The lab cannot be set up as asked (bad options, no `postgres` user when root, ...).
    #[error("lab setup: {0}")]
    Setup(String),
}

fn fmt_tail(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!(":\n{}", tail.trim_end())
    }
}

/// `tokio_postgres::Error` displays only its kind ("db error"); add the causes.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

pub(super) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
    let context = context.into();
    move |source| LabError::Io { context, source }
}

/// A free TCP port on 127.0.0.1 (bound, read, released: a small race, handled by retrying).
pub(super) fn free_port() -> Result<u16, LabError> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_err("binding 127.0.0.1:0"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("reading a bound port"))?
        .port();
    Ok(port)
}

/// The command line for messages, with `password=...` masked.
pub(super) fn describe(cmd: &std::process::Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        let arg = arg.to_string_lossy();
        let masked: Vec<String> = arg
            .split(' ')
            .map(|w| match w.split_once("password=") {
                Some((pre, _)) => format!("{pre}password=***"),
                None => w.to_string(),
            })
            .collect();
        s.push_str(&masked.join(" "));
    }
    s
}

/// The last `n` lines of `text`.
pub(super) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn read_tail(path: &Path, n: usize) -> String {
    std::fs::read(path)
        .map(|b| last_lines(&String::from_utf8_lossy(&b), n))
        .unwrap_or_default()
}

/// Builds the `Command` error: command line, status, output tail and log tail.
pub(super) fn command_failed(
    command: String,
    status: impl ToString,
    output: Option<&Output>,
    log: Option<&Path>,
) -> LabError {
    let mut tail = String::new();
    if let Some(out) = output {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let text = if stderr.trim().is_empty() {
            stdout
        } else {
            stderr
        };
        tail.push_str(&last_lines(&text, 20));
    }
    if let Some(log) = log {
        let log_tail = read_tail(log, 20);
        if !log_tail.trim().is_empty() {
            let _ = write!(
                tail,
                "\n--- last lines of {} ---\n{log_tail}",
                log.display()
            );
        }
    }
    LabError::Command {
        command,
        status: status.to_string(),
        tail,
    }
}

/// Runs a command to completion; an unsuccessful exit becomes `LabError::Command`.
pub(super) async fn run(
    mut cmd: tokio::process::Command,
    log: Option<&Path>,
) -> Result<Output, LabError> {
    let what = describe(cmd.as_std());
    tracing::debug!(command = %what, "lab: running");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(io_err(format!("running `{what}`")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(command_failed(what, out.status, Some(&out), log))
    }
}

/// Whether `pid` is a live process (a zombie counts as dead: nobody may reap it here).
pub(super) fn process_alive(pid: u32) -> bool {
    if Path::new("/proc/self/status").exists() {
        match std::fs::read_to_string(format!("/proc/{pid}/status")) {
            Ok(s) => !s
                .lines()
                .any(|l| l.starts_with("State:") && l[6..].trim_start().starts_with('Z')),
            Err(_) => false,
        }
    } else {
        std::process::Command::new("kill")
            .arg("-0")
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// Direct children of `pid` (Linux only; empty elsewhere).
fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Reads the postmaster pid from `<data_dir>/postmaster.pid`.
pub(super) fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    postmaster_pid_in(&data_dir.join("postmaster.pid"))
}

/// The pid on the first line of a Postgres lock file.
fn postmaster_pid_in(lock_file: &Path) -> Option<u32> {
    std::fs::read_to_string(lock_file)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Settings appended to the primary's `postgresql.conf` (copied to replicas by the base backup).
/// `dynamic_shared_memory_type = mmap` keeps DSM segments in PGDATA/pg_dynshmem instead of
/// /dev/shm, so removing the directory frees them even after a node was SIGKILLed.
fn server_conf() -> String {
    format!(
        "\n# --- pgnear lab ---\n\
         listen_addresses = '127.0.0.1'\n\
         max_connections = 300\n\
         shared_buffers = 32MB\n\
         fsync = off\n\
         synchronous_commit = on\n\
         full_page_writes = off\n\
         wal_level = replica\n\
         max_wal_senders = 10\n\
         wal_keep_size = 128MB\n\
         hot_standby = on\n\
         hot_standby_feedback = on\n\
         wal_receiver_status_interval = 1s\n\
         wal_retrieve_retry_interval = 1s\n\
         password_encryption = 'scram-sha-256'\n\
         dynamic_shared_memory_type = mmap\n\
         logging_collector = off\n\
         log_line_prefix = '%m [%p] %q%u@%d '\n\
         include_if_exists = '{NODE_CONF}'\n"
    )
}

const PG_HBA: &str = "\
# pgnear lab
local all         all                trust
local replication all                trust
host  all         legacy  127.0.0.1/32  md5
host  all         all  127.0.0.1/32  scram-sha-256
host  replication all  127.0.0.1/32  scram-sha-256
";

fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One Postgres server of the lab.
#[derive(Debug)]
pub struct PgNode {
    /// Region name; also the directory name and `cluster_name`.
    pub name: String,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// PGDATA.
    pub data_dir: PathBuf,
    dir: PathBuf,
    bin: Arc<PgBin>,
}

impl PgNode {
    /// `initdb` a new primary in `<base>/<name>/data` (scram for TCP, trust on the socket),
    /// configure it, start it on a free port.
    pub(super) async fn create_primary(
        bin: Arc<PgBin>,
        base: &Path,
        name: &str,
        superuser_password: &str,
    ) -> Result<PgNode, LabError> {
        let dir = base.join(name);
        bin.make_dir(&dir)?;
        let data_dir = dir.join("data");
        let pwfile = dir.join("pwfile");
        bin.write_file(&pwfile, &format!("{superuser_password}\n"))?;
        let mut cmd = bin.command("initdb");
        cmd.arg("-D")
            .arg(&data_dir)
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()));
        let result = run(cmd, None).await;
        let _ = std::fs::remove_file(&pwfile);
        result?;
        let conf = data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)
            .map_err(io_err(format!("reading {}", conf.display())))?;
        text.push_str(&server_conf());
        bin.write_file(&conf, &text)?;
        bin.write_file(&data_dir.join("pg_hba.conf"), PG_HBA)?;
        Self::launch(bin, name, dir).await
    }

    /// `pg_basebackup -R` a new standby of the server at `source` (typically a relay in front of
    /// the primary, so the replication stream crosses the simulated distance), start it.
    /// Does not wait for streaming.
    pub(super) async fn create_replica(
        bin: Arc<PgBin>,
        base: &Path,
        name: &str,
        source: SocketAddr,
        superuser_password: &str,
    ) -> Result<PgNode, LabError> {
        let dir = base.join(name);
        bin.make_dir(&dir)?;
        let data_dir = dir.join("data");
        let conninfo = format!(
            "host={} port={} user=postgres password={} application_name={} sslmode=disable",
            source.ip(),
            source.port(),
            superuser_password,
            name
        );
        let mut cmd = bin.command("pg_basebackup");
        cmd.args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-D"])
            .arg(&data_dir)
            .arg("-d")
            .arg(conninfo);
        run(cmd, None).await?;
        Self::launch(bin, name, dir).await
    }

    /// Picks a free port, writes the node settings, starts; on "address in use", tries again
    /// with another port.
    async fn launch(bin: Arc<PgBin>, name: &str, dir: PathBuf) -> Result<PgNode, LabError> {
        const ATTEMPTS: usize = 5;
        let data_dir = dir.join("data");
        for attempt in 1..=ATTEMPTS {
            let port = free_port()?;
            let conf = format!(
                "# written by the pgnear lab for this node\n\
                 port = {port}\n\
                 unix_socket_directories = {}\n\
                 cluster_name = {}\n",
                conf_quote(&dir.to_string_lossy()),
                conf_quote(name)
            );
            bin.write_file(&data_dir.join(NODE_CONF), &conf)?;
            let node = PgNode {
                name: name.to_string(),
                port,
                data_dir: data_dir.clone(),
                dir: dir.clone(),
                bin: bin.clone(),
            };
            let log_len = std::fs::metadata(node.log_path()).map_or(0, |m| m.len() as usize);
            match node.start().await {
                Ok(()) => return Ok(node),
                Err(e) if attempt < ATTEMPTS && node.port_was_taken(log_len) => {
                    tracing::warn!(node = name, port, "lab: port taken, retrying: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    fn port_was_taken(&self, log_offset: usize) -> bool {
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        let new = String::from_utf8_lossy(log.get(log_offset..).unwrap_or_default());
        new.contains("Address already in use") || new.contains("could not bind")
    }

    /// Starts the server (`pg_ctl start -w`). Stale lock files (`postmaster.pid`, the socket's
    /// `.lock`) left by a killed server whose process is gone, or is a zombie nobody reaps
    /// (as under an init that does not reap orphans), are removed first.
    pub async fn start(&self) -> Result<(), LabError> {
        // Postgres checks a lock file's pid with kill(pid, 0), which an unreaped zombie passes.
        let socket_lock = self.dir.join(format!(".s.PGSQL.{}.lock", self.port));
        for lock in [self.data_dir.join("postmaster.pid"), socket_lock] {
            if postmaster_pid_in(&lock).is_some_and(|pid| !process_alive(pid)) {
                let _ = std::fs::remove_file(&lock);
            }
        }
        let mut cmd = self.bin.command("pg_ctl");
        cmd.args(["start", "-w", "-t", &PG_CTL_TIMEOUT_SECS.to_string(), "-D"])
            .arg(&self.data_dir)
            .arg("-l")
            .arg(self.log_path());
        run(cmd, Some(&self.log_path())).await?;
        tracing::debug!(node = %self.name, port = self.port, "lab: postgres started");
        Ok(())
    }

    /// Stops the server (`pg_ctl stop -m fast -w`); a node that is not running is fine.
    pub async fn stop(&self) -> Result<(), LabError> {
        match postmaster_pid(&self.data_dir) {
            None => return Ok(()),
            Some(pid) if !process_alive(pid) => return Ok(()),
            Some(_) => {}
        }
        let mut cmd = self.bin.command("pg_ctl");
        cmd.args([
            "stop",
            "-m",
            "fast",
            "-w",
            "-t",
            &PG_CTL_TIMEOUT_SECS.to_string(),
        ])
        .arg("-D")
        .arg(&self.data_dir);
        run(cmd, Some(&self.log_path())).await.map(drop)
    }

    /// Crashes the node: `kill -9` the postmaster, then waits until it and the processes it had
    /// forked are gone (its backends exit by themselves when they notice; stragglers get
    /// SIGKILL after 5 s). `postmaster.pid` stays, as after a real crash.
    pub async fn kill(&self) -> Result<(), LabError> {
        let Some(pid) = postmaster_pid(&self.data_dir).filter(|p| process_alive(*p)) else {
            return Ok(());
        };
        let children = child_pids(pid);
        let mut cmd = tokio::process::Command::new("kill");
        cmd.arg("-9").arg(pid.to_string());
        run(cmd, None).await?;
        let started = tokio::time::Instant::now();
        let mut escalated = false;
        loop {
            let left: Vec<u32> = std::iter::once(pid)
                .chain(children.iter().copied())
                .filter(|p| process_alive(*p))
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            let waited = started.elapsed();
            if waited > Duration::from_secs(5) && !escalated {
                escalated = true;
                for p in &left {
                    let _ = tokio::process::Command::new("kill")
                        .arg("-9")
                        .arg(p.to_string())
                        .stderr(Stdio::null())
                        .status()
                        .await;
                }
            }
            if waited > Duration::from_secs(15) {
                return Err(LabError::Timeout {
                    what: format!(
                        "the processes of killed node {} to exit: {left:?}",
                        self.name
                    ),
                    after: waited,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Promotes a standby to primary (`pg_ctl promote -w`).
    pub async fn promote(&self) -> Result<(), LabError> {
        let mut cmd = self.bin.command("pg_ctl");
        cmd.args([
            "promote",
            "-w",
            "-t",
            &PG_CTL_TIMEOUT_SECS.to_string(),
            "-D",
        ])
        .arg(&self.data_dir);
        run(cmd, Some(&self.log_path())).await.map(drop)
    }

    /// The server log (`pg_ctl -l`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// `127.0.0.1:port`, direct (no relay).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The Unix socket directory (also holds the log).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The postmaster's pid while it runs (from `postmaster.pid`).
    pub fn pid(&self) -> Option<u32> {
        postmaster_pid(&self.data_dir).filter(|p| process_alive(*p))
    }

    /// A superuser control connection over the node's Unix socket (trust auth: no SCRAM cost),
    /// driven on a spawned task.
    pub(super) async fn control_client(&self) -> Result<tokio_postgres::Client, LabError> {
        self.superuser_client("postgres").await
    }

    /// A superuser connection to `database`, over the Unix socket.
    pub(super) async fn superuser_client(
        &self,
        database: &str,
    ) -> Result<tokio_postgres::Client, LabError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.dir)
            .port(self.port)
            .user("postgres")
            .dbname(database)
            .application_name("pgnear-lab")
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|source| self.sql_error(source))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("lab: control connection ended: {e}");
            }
        });
        Ok(client)
    }

    pub(super) fn sql_error(&self, source: tokio_postgres::Error) -> LabError {
        LabError::Sql {
            node: self.name.clone(),
            source,
        }
    }
}

/// Parses a textual LSN (`16/B374D848`) into a number.
pub(super) fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_parsing_and_order() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x300_0060));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert!(parse_lsn("1/0") > parse_lsn("0/FFFFFFFF"));
        assert_eq!(parse_lsn("garbage"), None);
    }

    #[test]
    fn passwords_are_masked_in_command_lines() {
        let mut cmd = std::process::Command::new("pg_basebackup");
        cmd.arg("-d")
            .arg("host=127.0.0.1 password=hunter2 user=postgres");
        let s = describe(&cmd);
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("password=***"), "{s}");
    }

    #[test]
    fn command_error_shows_tail() {
        let err = command_failed("pg_ctl start".into(), "exit status: 1", None, None);
        assert_eq!(err.to_string(), "`pg_ctl start` failed (exit status: 1)");
        let text = (1..=30).map(|i| format!("line {i}")).collect::<Vec<_>>();
        let tail = last_lines(&text.join("\n"), 20);
        assert!(tail.starts_with("line 11\n") && tail.ends_with("line 30"));
    }
}
