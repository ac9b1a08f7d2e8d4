//! Finding the PostgreSQL server binaries, and running them as the server user (through
//! `runuser -u postgres` when we are root, because Postgres refuses to run as root).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::postgres::{io_err, LabError};

/// Environment variables that would silently redirect the Postgres tools.
const PG_ENV: &[&str] = &[
    "PGDATA",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGDATABASE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGSSLMODE",
    "PGAPPNAME",
    "PGCTLTIMEOUT",
];

/// The OS user the server binaries run as when we are root.
#[derive(Debug, Clone)]
pub(super) struct RunAs {
    /// `runuser`, by absolute path when found (PATH may lack the sbin directories).
    pub(super) runuser: PathBuf,
    pub(super) user: String,
    pub(super) uid: u32,
    pub(super) gid: u32,
}

/// Located PostgreSQL server binaries, and whether they must run through `runuser`.
#[derive(Debug, Clone)]
pub struct PgBin {
    dir: PathBuf,
    run_as: Option<RunAs>,
    version: String,
}

impl PgBin {
    /// Finds the binaries: `$PGNEAR_PG_BIN`, else the highest `/usr/lib/postgresql/<v>/bin`
    /// holding `initdb`, else `pg_config --bindir`.
    pub fn locate() -> Result<PgBin, LabError> {
        Self::locate_with(std::env::var_os("PGNEAR_PG_BIN").map(PathBuf::from))
    }

    fn locate_with(explicit: Option<PathBuf>) -> Result<PgBin, LabError> {
        let dir = match explicit {
            Some(dir) => {
                if !dir.join("initdb").is_file() {
                    return Err(LabError::MissingBinaries {
                        detail: format!("PGNEAR_PG_BIN={} has no initdb", dir.display()),
                    });
                }
                dir
            }
            None => find_bin_dir().ok_or_else(|| LabError::MissingBinaries {
                detail: "no initdb under /usr/lib/postgresql/*/bin, and no pg_config on PATH"
                    .into(),
            })?,
        };
        for tool in ["pg_ctl", "postgres", "pg_basebackup"] {
            if !dir.join(tool).is_file() {
                return Err(LabError::MissingBinaries {
                    detail: format!("{} has initdb but no {tool}", dir.display()),
                });
            }
        }
        let run_as = if running_as_root() {
            Some(lookup_user("postgres").ok_or_else(|| {
                LabError::Setup(
                    "running as root, and Postgres refuses to run as root, but there is no \
                     `postgres` user in /etc/passwd to run it as (the postgresql package creates it)"
                        .into(),
                )
            })?)
        } else {
            None
        };
        let out = std::process::Command::new(dir.join("postgres"))
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!(
                "running {}/postgres --version",
                dir.display()
            )))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let text = text.trim();
        let version = text
            .split_once("(PostgreSQL) ")
            .map_or(text, |(_, v)| v)
            .to_string();
        Ok(PgBin {
            dir,
            run_as,
            version,
        })
    }

    /// The server version, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub fn version(&self) -> String {
        self.version.clone()
    }

    /// The directory holding the binaries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn run_as(&self) -> Option<&RunAs> {
        self.run_as.as_ref()
    }

    /// A command running `tool` from the bin dir as the server user.
    pub(super) fn std_command(&self, tool: &str) -> std::process::Command {
        let mut cmd = match &self.run_as {
            Some(r) => {
                let mut c = std::process::Command::new(&r.runuser);
                c.arg("-u").arg(&r.user).arg("--").arg(self.dir.join(tool));
                c
            }
            None => std::process::Command::new(self.dir.join(tool)),
        };
        for var in PG_ENV {
            cmd.env_remove(var);
        }
        // The server user may not be allowed into our working directory.
        cmd.current_dir("/").env("LC_ALL", "C").stdin(Stdio::null());
        cmd
    }

    pub(super) fn command(&self, tool: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::from(self.std_command(tool));
        cmd.kill_on_drop(true);
        cmd
    }

    /// Hands a path we created over to the server user (no-op unless root).
    pub(super) fn give(&self, path: &Path) -> Result<(), LabError> {
        if let Some(r) = &self.run_as {
            std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid)).map_err(io_err(format!(
                "chown {} to {}",
                path.display(),
                r.user
            )))?;
        }
        Ok(())
    }

    /// Writes a file and hands it to the server user.
    pub(super) fn write_file(&self, path: &Path, contents: &str) -> Result<(), LabError> {
        std::fs::write(path, contents).map_err(io_err(format!("writing {}", path.display())))?;
        self.give(path)
    }

    /// Creates `<base>/<name>` (mode 0700, owned by the server user) and returns it.
    pub(super) fn make_dir(&self, path: &Path) -> Result<(), LabError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(path).map_err(io_err(format!("creating {}", path.display())))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("chmod 0700 {}", path.display())))?;
        self.give(path)
    }
}

fn find_bin_dir() -> Option<PathBuf> {
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(version) = name
                .split('.')
                .map(str::parse::<u32>)
                .collect::<Result<Vec<u32>, _>>()
            else {
                continue;
            };
            let bin = entry.path().join("bin");
            if bin.join("initdb").is_file() && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    if let Some((_, bin)) = best {
        return Some(bin);
    }
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && dir.join("initdb").is_file()).then_some(dir)
}

fn running_as_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            // Uid: real effective saved fs
            return line.split_whitespace().nth(2) == Some("0");
        }
    }
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn lookup_user(user: &str) -> Option<RunAs> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next()? != user {
            return None;
        }
        let _password = f.next()?;
        let runuser = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("runuser"));
        Some(RunAs {
            runuser,
            user: user.to_string(),
            uid: f.next()?.parse().ok()?,
            gid: f.next()?.parse().ok()?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_message_says_how_to_install() {
        let err = PgBin::locate_with(Some(PathBuf::from("/nonexistent/pg/bin"))).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LabError::MissingBinaries { .. }), "{msg}");
        assert!(msg.contains("apt-get install -y postgresql"), "{msg}");
        assert!(msg.contains("brew install postgresql@16"), "{msg}");
        assert!(msg.contains("PGNEAR_PG_BIN"), "{msg}");
    }
}
