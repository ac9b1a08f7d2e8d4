//! Teardown that survives its owner: the cluster's base directory, and a detached watchdog
//! shell that stops every node and removes the directory once the owning process is gone (a
//! cluster in a `static`, a killed test binary).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;

use super::postgres::{io_err, postmaster_pid, process_alive, LabError, PgBin};

/// The watchdog: `sh -c WATCHDOG sh <owner pid> <base dir> <pg_ctl> <run-as user or ""> <runuser>`.
/// While the owner lives (a zombie counts as dead) and the directory exists, sleep; then stop
/// every node immediately (SIGKILL as a fallback) and remove the directory.
const WATCHDOG: &str = r#"
trap '' HUP INT QUIT PIPE
owner=$1 base=$2 pgctl=$3 user=$4 runuser=$5
alive() {
  if [ -r "/proc/$owner/status" ]; then
    ! grep -q '^State:[[:space:]]*Z' "/proc/$owner/status"
  elif [ -d /proc/self ]; then
    return 1
  else
    kill -0 "$owner" 2>/dev/null
  fi
}
while alive; do
  [ -d "$base" ] || exit 0
  sleep 1
done
for d in "$base"/*/data; do
  [ -f "$d/postmaster.pid" ] || continue
  if [ -n "$user" ]; then
    "$runuser" -u "$user" -- "$pgctl" stop -D "$d" -m immediate -w -t 10 >/dev/null 2>&1
  else
    "$pgctl" stop -D "$d" -m immediate -w -t 10 >/dev/null 2>&1
  fi
  if [ -f "$d/postmaster.pid" ]; then
    pid=$(head -n 1 "$d/postmaster.pid")
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
  fi
done
rm -rf "$base"
"#;

/// Creates the cluster's directory `pgnear-lab-XXXXXX` under, in this order of preference:
/// `$PGNEAR_LAB_DIR`; `/dev/shm` when it is a filesystem with at least 2 GiB free (a RAM disk:
/// initdb and base backups are several times faster there than on a virtual disk); the system
/// temporary directory (`$TMPDIR`, `/tmp`).
fn make_base_dir() -> Result<PathBuf, LabError> {
    let create = |parent: &Path| {
        tempfile::Builder::new()
            .prefix("pgnear-lab-")
            .tempdir_in(parent)
            .map(tempfile::TempDir::keep)
    };
    if let Some(parent) = std::env::var_os("PGNEAR_LAB_DIR") {
        let parent = PathBuf::from(parent);
        return create(&parent).map_err(io_err(format!(
            "creating the lab directory in PGNEAR_LAB_DIR={}",
            parent.display()
        )));
    }
    let shm = Path::new("/dev/shm");
    if free_kib(shm).is_some_and(|kib| kib >= 2 * 1024 * 1024) {
        if let Ok(dir) = create(shm) {
            return Ok(dir);
        }
    }
    let tmp = std::env::temp_dir();
    create(&tmp).map_err(io_err(format!(
        "creating the lab directory in {}",
        tmp.display()
    )))
}

/// Free space of the filesystem holding `path`, from `df -Pk` (no libc here).
fn free_kib(path: &Path) -> Option<u64> {
    if !path.is_dir() {
        return None;
    }
    let out = std::process::Command::new("df")
        .arg("-Pk")
        .arg(path)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // Filesystem 1024-blocks Used Available Capacity Mounted-on
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()
}

/// Owns the temporary directory and the watchdog; `run` stops whatever still runs under the
/// directory (immediate mode), removes it and ends the watchdog. Runs at most once; also on drop,
/// so a half-started cluster is cleaned up too.
pub(super) struct Cleanup {
    pub(super) base: PathBuf,
    bin: Arc<PgBin>,
    watchdog: Option<Child>,
    done: bool,
}

impl Cleanup {
    pub(super) fn new(bin: Arc<PgBin>) -> Result<Cleanup, LabError> {
        let base = make_base_dir()?;
        let mut cleanup = Cleanup {
            base,
            bin,
            watchdog: None,
            done: false,
        };
        cleanup.bin.make_dir(&cleanup.base)?;
        let (runuser, user) = match cleanup.bin.run_as() {
            Some(r) => (r.runuser.clone(), r.user.clone()),
            None => (PathBuf::new(), String::new()),
        };
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(std::process::id().to_string())
            .arg(&cleanup.base)
            .arg(cleanup.bin.dir().join("pg_ctl"))
            .arg(user)
            .arg(runuser)
            .current_dir("/")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: Ctrl-C on the terminal does not reach it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(io_err("spawning the lab watchdog"))?;
        cleanup.watchdog = Some(child);
        Ok(cleanup)
    }

    pub(super) fn run(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let mut stopping = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.base) {
            for entry in entries.flatten() {
                let data = entry.path().join("data");
                if postmaster_pid(&data).is_some_and(process_alive) {
                    let mut cmd = self.bin.std_command("pg_ctl");
                    cmd.args(["stop", "-m", "immediate", "-w", "-t", "10", "-D"])
                        .arg(&data)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null());
                    if let Ok(child) = cmd.spawn() {
                        stopping.push((data, child));
                    }
                }
            }
        }
        for (data, mut child) in stopping {
            let _ = child.wait();
            if let Some(pid) = postmaster_pid(&data).filter(|p| process_alive(*p)) {
                let _ = std::process::Command::new("kill")
                    .arg("-9")
                    .arg(pid.to_string())
                    .status();
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.base) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.base.display(), "lab: removing the directory: {e}");
            }
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}
