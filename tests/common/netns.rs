//! Test hosts in network namespaces, for real network faults.
//!
//! A [`TestHost`] is a namespace `pgn-<pid>-<random>` joined to the machine by a veth pair, with
//! an address in 10.213.0.0/16 on each end (a /30 per host, assigned only to those two
//! interfaces). [`TestHost::forward`] makes a lab server reachable *only* through that veth: a
//! listener bound inside the namespace, whose connections the test process relays to the server
//! on loopback. pgnear connects to the namespace's address, so its sockets cross the veth, and
//! [`TestHost::cut`] breaks that path in the namespace's own firewall, the kernel way: silently
//! (every packet dropped, both ways) or loudly (every packet answered with a TCP reset).
//!
//! Dropping the host deletes the namespace, and with it the veth pair and the firewall rules;
//! namespaces left behind by a test process that was killed are deleted by the next one.
//! A machine that cannot create namespaces fails the test with a message saying so.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};

/// How a path is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Packets dropped both ways (a black hole: sockets stay open, nothing arrives).
    Silent,
    /// Every packet that arrives is answered with a TCP reset, and nothing else leaves
    /// (a host that lost its connection state, or a firewall that rejects).
    Loud,
}

/// A network namespace joined to the machine by a veth pair; see the module docs.
pub struct TestHost {
    /// The namespace's name (`ip netns exec <name> ...`).
    pub name: String,
    /// The namespace's end of the veth pair.
    ns_if: String,
    /// The address inside the namespace (what clients connect to).
    pub ip: Ipv4Addr,
    relays: Vec<AbortHandle>,
}

const PREFIX: &str = "pgn-";

impl TestHost {
    /// Creates the namespace, the veth pair and the addresses. Panics, saying why, when the
    /// machine cannot (no `ip`, not root, no namespaces in this kernel or container).
    pub fn create() -> TestHost {
        // Installed on first use, by the script .ci/run runs (as for the driver suites).
        super::require(
            || {
                ["/usr/sbin/iptables", "/sbin/iptables", "/usr/bin/iptables"]
                    .iter()
                    .any(|p| std::path::Path::new(p).exists())
            },
            "iptables",
        );
        remove_stale();
        let (tag, third, fourth) = loop {
            let r: u32 = rand::random();
            let (third, fourth) = ((r >> 8) as u8, (r as u8) & 0xfc);
            let taken =
                ip(&["-4", "-o", "addr"]).contains(&format!("10.213.{third}.{}/", fourth + 1));
            if !taken {
                break (r & 0xffff, third, fourth);
            }
        };
        let name = format!("{PREFIX}{}-{tag:04x}", std::process::id());
        let host_if = format!("pgn{tag:04x}h{}", std::process::id() % 1000);
        let ns_if = format!("pgn{tag:04x}n{}", std::process::id() % 1000);
        let host_ip = Ipv4Addr::new(10, 213, third, fourth + 1);
        let ns_ip = Ipv4Addr::new(10, 213, third, fourth + 2);
        if let Err(e) = try_ip(&["netns", "add", &name]) {
            panic!(
                "this machine cannot create network namespaces, which the partition tests need \
                 (they run as root with iproute2 and iptables; .ci/run installs them): {e}"
            );
        }
        // From here on, Drop deletes the namespace (and the veth pair with it).
        let host = TestHost {
            name: name.clone(),
            ns_if: ns_if.clone(),
            ip: ns_ip,
            relays: Vec::new(),
        };
        let steps: Vec<Vec<String>> = vec![
            vec![
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &name,
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            words(&format!("addr add {host_ip}/30 dev {host_if}")),
            words(&format!("link set {host_if} up")),
            words(&format!("-n {name} addr add {ns_ip}/30 dev {ns_if}")),
            words(&format!("-n {name} link set {ns_if} up")),
            words(&format!("-n {name} link set lo up")),
        ];
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            if let Err(e) = try_ip(&args) {
                panic!("setting up the test host {name} failed: {e}");
            }
        }
        // The firewall must work here, or a cut would silently cut nothing.
        host.iptables(&["-L", "INPUT", "-n"]);
        host
    }

    /// Makes `target` (a lab server on loopback) reachable at the returned address inside the
    /// namespace, and only there. The relay's sockets on the namespace side have short
    /// keepalives, so a connection whose client went away during a cut ends after the heal
    /// (and the server's session with it) instead of lingering.
    pub async fn forward(&mut self, target: SocketAddr) -> SocketAddr {
        let (name, ip) = (self.name.clone(), self.ip);
        let listener = std::thread::spawn(move || -> std::io::Result<std::net::TcpListener> {
            let ns = std::fs::File::open(format!("/run/netns/{name}"))?;
            // SAFETY: setns(2) on a valid namespace fd; it changes only this thread's network
            // namespace, and this thread only binds one socket and exits.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let l = std::net::TcpListener::bind((ip, 0))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .expect("the namespace thread")
        .unwrap_or_else(|e| panic!("binding a listener in {}: {e}", self.name));
        let listener = TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = tokio::spawn(async move {
            // Dropped with the accept task (abort): every connection ends with it.
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                conns.spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let keepalive = socket2::TcpKeepalive::new()
                        .with_time(Duration::from_secs(1))
                        .with_interval(Duration::from_secs(1))
                        .with_retries(3);
                    let _ = socket2::SockRef::from(&inbound).set_tcp_keepalive(&keepalive);
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        self.relays.push(relay.abort_handle());
        addr
    }

    /// Cuts the path between the machine and the namespace (in the namespace's firewall).
    pub fn cut(&self, how: Cut) {
        let i = self.ns_if.as_str();
        match how {
            Cut::Silent => {
                self.iptables(&["-A", "INPUT", "-i", i, "-j", "DROP"]);
                self.iptables(&["-A", "OUTPUT", "-o", i, "-j", "DROP"]);
            }
            Cut::Loud => {
                self.iptables(&[
                    "-A",
                    "INPUT",
                    "-i",
                    i,
                    "-p",
                    "tcp",
                    "-j",
                    "REJECT",
                    "--reject-with",
                    "tcp-reset",
                ]);
                self.iptables(&["-A", "INPUT", "-i", i, "-j", "DROP"]);
                // Only the resets leave.
                self.iptables(&[
                    "-A",
                    "OUTPUT",
                    "-o",
                    i,
                    "-p",
                    "tcp",
                    "--tcp-flags",
                    "RST",
                    "RST",
                    "-j",
                    "ACCEPT",
                ]);
                self.iptables(&["-A", "OUTPUT", "-o", i, "-j", "DROP"]);
            }
        }
    }

    /// Removes every cut.
    pub fn heal(&self) {
        self.iptables(&["-F", "INPUT"]);
        self.iptables(&["-F", "OUTPUT"]);
    }

    fn iptables(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "iptables", "-w"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running ip netns exec ... iptables: {e}"));
        assert!(
            out.status.success(),
            "iptables {args:?} in {} failed (iptables is installed by .ci/run): {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for r in &self.relays {
            r.abort();
        }
        // Deleting the namespace destroys its end of the veth pair, which destroys the other
        // end, and the namespace's firewall.
        if let Err(e) = try_ip(&["netns", "del", &self.name]) {
            eprintln!("deleting the test host {}: {e}", self.name);
        }
    }
}

/// Deletes the test hosts of test processes that are gone (killed before their Drop ran).
fn remove_stale() {
    let Ok(list) = try_ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = try_ip(&["netns", "del", name]);
        }
    }
}

fn words(s: &str) -> Vec<String> {
    s.split(' ').map(String::from).collect()
}

fn ip(args: &[&str]) -> String {
    try_ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `ip args...`: its stdout, or what failed.
fn try_ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
