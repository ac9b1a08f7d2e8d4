//! Frozen servers: every process of a lab Postgres stopped with SIGSTOP, the way a paused VM or
//! a wedged host looks (tests/frozen.rs, tests/chaos.rs).

use std::process::Command;

use pgnear::lab::postgres::PgNode;

/// A Postgres with all its processes stopped (SIGSTOP); thawed (SIGCONT) when dropped, however
/// the test ends, so no Postgres is left stopped.
pub struct Frozen {
    pids: Vec<u32>,
}

impl Frozen {
    /// Stops the postmaster first (so it starts no new child), then each of its children.
    pub fn freeze(node: &PgNode) -> Frozen {
        let postmaster = node.pid().expect("the node is running");
        let mut frozen = Frozen { pids: Vec::new() };
        signal("STOP", postmaster);
        frozen.pids.push(postmaster);
        let out = Command::new("pgrep")
            .args(["-P", &postmaster.to_string()])
            .output()
            .expect("pgrep is installed");
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
        {
            signal("STOP", pid);
            frozen.pids.push(pid);
        }
        assert!(frozen.pids.len() > 1, "the postmaster has children");
        frozen
    }

    pub fn thaw(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for pid in self.pids.iter().rev() {
            signal("CONT", *pid);
        }
    }
}

fn signal(sig: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    // A child may have exited in between; SIGCONT must not panic in a drop guard.
    if !ok && sig != "CONT" {
        eprintln!("kill -{sig} {pid} failed");
    }
}
