//! DNS discovery of the upstream hosts: where a connection to an upstream may go right now.
//!
//! One [`Discovery`] per upstream, with its own hickory resolver. The answer (AAAA and A) is
//! cached for its TTL, clamped to [`MIN_TTL`, `MAX_TTL`], and a side task looks the host up again
//! when it runs out, so connecting never waits for a routine refresh. A failed connect marks the
//! answer stale: the next connect looks the host up first (at most once per `MIN_TTL`, so a dead
//! upstream does not hammer DNS). When a lookup fails the last good answer stays in use. IP
//! literals skip all of it.
//!
//! /etc/hosts comes first, as with glibc's `hosts: files dns`: a name listed there (for either
//! family) is never asked of DNS. The file is read at every lookup, so an edit is seen within
//! `MAX_TTL`. (hickory's own hosts support is per family: a name with only an IPv4 entry would
//! still send an AAAA query, and wait for it when DNS is unreachable.)

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::op::Query;
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::{Hosts, Resolver, TokioResolver};

use crate::metrics::Metrics;
use crate::role::Role;
use crate::shutdown::Shutdown;

/// The shortest time an answer is used before it is looked up again, and the least time between
/// two lookups of one host (after a failed connect or a failed lookup): a TTL of 0 must not turn
/// into a DNS query per connection, nor a dead upstream into a query per retry.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest time an answer is used, whatever its TTL: a moved upstream (or an edited
/// /etc/hosts) is noticed within a minute even when no connection fails.
pub const MAX_TTL: Duration = Duration::from_secs(60);
/// The port of a nameserver given without one.
pub const DNS_PORT: u16 = 53;
const HOSTS_FILE: &str = "/etc/hosts";

/// An answer's time to live as pgnear uses it.
pub fn clamp_ttl(ttl: Duration) -> Duration {
    ttl.clamp(MIN_TTL, MAX_TTL)
}

/// `upstream.nameserver`: an IP address with an optional port, which defaults to 53
/// (`127.0.0.1:5353`, `[fdaa::3]:53`, `fdaa::3`, `[fdaa::3]`). `None` for anything else, a host
/// name included (it would need a nameserver itself).
pub fn parse_nameserver(value: &str) -> Option<SocketAddr> {
    let value = value.trim();
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Some(addr);
    }
    let ip = match value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
        Some(v6) => IpAddr::V6(v6.parse().ok()?),
        None => value.parse().ok()?,
    };
    Some(SocketAddr::new(ip, DNS_PORT))
}

/// Where pgnear's DNS questions go.
#[derive(Clone, Debug)]
pub enum Nameservers {
    /// `upstream.nameserver`: only this server (UDP, TCP when an answer is truncated).
    Configured(SocketAddr),
    /// /etc/resolv.conf: its servers, search list and options.
    System(Box<(ResolverConfig, ResolverOpts)>),
    /// /etc/resolv.conf could not be used (why): a resolver on this machine, 127.0.0.1:53, as
    /// glibc does without one.
    Fallback(String),
}

impl Nameservers {
    /// `configured` (from `upstream.nameserver`), or else the system's.
    pub fn read(configured: Option<SocketAddr>) -> Nameservers {
        match configured {
            Some(addr) => Nameservers::Configured(addr),
            None => match hickory_resolver::system_conf::read_system_conf() {
                Ok(system) => Nameservers::System(Box::new(system)),
                Err(e) => Nameservers::Fallback(e.to_string()),
            },
        }
    }

    fn resolver(&self) -> Result<TokioResolver, NetError> {
        let only = |addr: SocketAddr| {
            let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                .into_iter()
                .map(|mut c| {
                    c.port = addr.port();
                    c
                })
                .collect();
            ResolverConfig::from_name_servers(vec![NameServerConfig::new(
                addr.ip(),
                true,
                connections,
            )])
        };
        let (config, mut opts) = match self {
            Nameservers::Configured(addr) => (only(*addr), ResolverOpts::default()),
            Nameservers::System(system) => (system.0.clone(), system.1.clone()),
            Nameservers::Fallback(_) => (
                only(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), DNS_PORT)),
                ResolverOpts::default(),
            ),
        };
        opts.ip_strategy = LookupIpStrategy::Ipv6AndIpv4;
        // Discovery reads /etc/hosts itself (module docs) and keeps its own cache: hickory's
        // would answer a re-resolution after a failed connect from memory.
        opts.use_hosts_file = ResolveHosts::Never;
        opts.cache_size = 0;
        Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
    }
}

impl fmt::Display for Nameservers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Nameservers::Configured(addr) => write!(f, "{addr} (upstream.nameserver)"),
            Nameservers::System(system) => {
                let servers: Vec<String> = system
                    .0
                    .name_servers()
                    .iter()
                    .map(|s| {
                        let port = s.connections.first().map_or(DNS_PORT, |c| c.port);
                        SocketAddr::new(s.ip, port).to_string()
                    })
                    .collect();
                write!(f, "{} (/etc/resolv.conf)", servers.join(", "))
            }
            Nameservers::Fallback(why) => write!(
                f,
                "127.0.0.1:{DNS_PORT} (/etc/resolv.conf cannot be used: {why})"
            ),
        }
    }
}

/// The current addresses of one upstream host; see the module docs.
pub struct Discovery {
    role: Role,
    host: String,
    port: u16,
    /// `None` for an IP literal.
    resolver: Option<TokioResolver>,
    /// Bounds one lookup (all of hickory's attempts and servers).
    lookup_timeout: Duration,
    state: Mutex<State>,
    /// Held while a lookup runs: one lookup at a time, and whoever waited uses its answer.
    flight: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct State {
    /// The last good answer (`None` until the first one).
    addrs: Option<Arc<[SocketAddr]>>,
    /// When that answer's (clamped) TTL runs out.
    expires: Instant,
    /// A connect to one of the addresses failed since the last lookup.
    stale: bool,
    /// When the last lookup ended; the next may start `MIN_TTL` later.
    looked_up: Option<Instant>,
    /// Why lookups fail, while they do.
    error: Option<String>,
}

/// What a connect does with the state it finds.
#[derive(Debug, PartialEq)]
enum Plan {
    Use(Arc<[SocketAddr]>),
    Lookup,
    Fail(String),
}

impl State {
    fn new(now: Instant) -> State {
        State {
            addrs: None,
            expires: now,
            stale: false,
            looked_up: None,
            error: None,
        }
    }

    fn may_look_up(&self, now: Instant) -> bool {
        self.looked_up
            .is_none_or(|t| now.saturating_duration_since(t) >= MIN_TTL)
    }

    /// A connect uses the answer it has unless a connect to it failed (or there is none yet);
    /// then it looks up first, if the rate limit allows, and otherwise uses what there is.
    /// An expired answer is still used: the refresher is on it.
    fn plan(&self, now: Instant) -> Plan {
        match &self.addrs {
            Some(addrs) if !self.stale => Plan::Use(addrs.clone()),
            _ if self.may_look_up(now) => Plan::Lookup,
            Some(addrs) => Plan::Use(addrs.clone()),
            None => Plan::Fail(
                self.error
                    .clone()
                    .unwrap_or_else(|| "not resolved yet".into()),
            ),
        }
    }

    /// When the refresher looks up next: when the TTL runs out, or `MIN_TTL` after a failed
    /// lookup.
    fn next_refresh(&self) -> Instant {
        match self.looked_up {
            Some(t) => self.expires.max(t + MIN_TTL),
            None => self.expires,
        }
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Discovery {
    /// Discovery for `host` (a name or an IP literal); for a name, also starts the refresher,
    /// which stops when `shutdown` turns true.
    pub fn start(
        role: Role,
        host: &str,
        port: u16,
        nameservers: &Nameservers,
        lookup_timeout: Duration,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<Arc<Discovery>, NetError> {
        let now = Instant::now();
        let mut state = State::new(now);
        let resolver = match host.parse::<IpAddr>() {
            Ok(ip) => {
                state.addrs = Some(Arc::from([SocketAddr::new(ip, port)]));
                None
            }
            Err(_) => Some(nameservers.resolver()?),
        };
        let dns = Arc::new(Discovery {
            role,
            host: host.to_string(),
            port,
            lookup_timeout,
            state: Mutex::new(state),
            flight: tokio::sync::Mutex::new(()),
            metrics,
            resolver,
        });
        if dns.resolver.is_some() {
            tokio::spawn(dns.clone().refresh(shutdown));
        }
        Ok(dns)
    }

    /// The addresses to try, in order (IPv6 first, as DNS answered). Waits for DNS only when
    /// there is no answer yet or a connect to the current one failed.
    pub async fn addrs(&self) -> Result<Arc<[SocketAddr]>, String> {
        match lock(&self.state).plan(Instant::now()) {
            Plan::Use(addrs) => return Ok(addrs),
            Plan::Fail(why) => return Err(why),
            Plan::Lookup => {}
        }
        let _flight = self.flight.lock().await;
        // A lookup that ended while this one waited has answered already.
        let plan = lock(&self.state).plan(Instant::now());
        match plan {
            Plan::Use(addrs) => Ok(addrs),
            Plan::Fail(why) => Err(why),
            Plan::Lookup => self.look_up().await,
        }
    }

    /// A connect to `addr` failed: the next connect looks the host up again first.
    pub fn connect_failed(&self, addr: SocketAddr) {
        if self.resolver.is_none() {
            return;
        }
        let mut s = lock(&self.state);
        if s.addrs.as_ref().is_some_and(|a| a.contains(&addr)) {
            s.stale = true;
        }
    }

    /// Whether `addr` is still in the host's answer: a long-lived connection to an address that
    /// left it talks to a server that no longer is this upstream, and should be replaced.
    /// Without an answer yet, nothing is known to have left.
    pub fn is_current(&self, addr: SocketAddr) -> bool {
        lock(&self.state)
            .addrs
            .as_ref()
            .is_none_or(|a| a.contains(&addr))
    }

    /// The current answer (empty before the first).
    pub fn current(&self) -> Vec<SocketAddr> {
        lock(&self.state)
            .addrs
            .as_deref()
            .unwrap_or_default()
            .to_vec()
    }

    /// The side task: looks the host up whenever the answer's TTL runs out.
    async fn refresh(self: Arc<Self>, mut shutdown: Shutdown) {
        loop {
            let at = lock(&self.state).next_refresh();
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = shutdown.stopped() => return,
            }
            let _flight = self.flight.lock().await;
            // A connect may have looked up while this waited for the flight.
            let due = lock(&self.state).next_refresh() <= Instant::now();
            if due {
                let _ = self.look_up().await;
            }
        }
    }

    /// One lookup (the caller holds `flight`), recorded in the state. Returns the addresses to
    /// use: the new answer, or the last good one when the lookup failed.
    async fn look_up(&self) -> Result<Arc<[SocketAddr]>, String> {
        let answer = match tokio::time::timeout(self.lookup_timeout, self.query()).await {
            Ok(answer) => answer,
            Err(_) => Err(format!(
                "DNS lookup timed out after {:?}",
                self.lookup_timeout
            )),
        };
        let now = Instant::now();
        let mut s = lock(&self.state);
        s.looked_up = Some(now);
        match answer {
            Ok((addrs, ttl)) => {
                let new: Arc<[SocketAddr]> = addrs.into();
                s.expires = now + ttl;
                s.stale = false;
                s.error = None;
                let old = s.addrs.replace(new.clone());
                drop(s);
                match old {
                    None => tracing::info!(
                        upstream = self.role.name(),
                        host = %self.host,
                        addrs = ?new,
                        ttl = ?ttl,
                        "upstream host resolved"
                    ),
                    Some(old) if !same_set(&old, &new) => {
                        self.metrics.dns_change(self.role);
                        tracing::info!(
                            upstream = self.role.name(),
                            host = %self.host,
                            old = ?old,
                            new = ?new,
                            "upstream addresses changed"
                        );
                    }
                    Some(_) => {}
                }
                Ok(new)
            }
            Err(why) => {
                self.metrics.dns_failure(self.role);
                let first = s.error.is_none();
                s.error = Some(why.clone());
                let last_good = s.addrs.clone();
                drop(s);
                // Warn when lookups start failing, not at every retry.
                match &last_good {
                    Some(addrs) if first => tracing::warn!(
                        upstream = self.role.name(),
                        host = %self.host,
                        error = %why,
                        keeping = ?addrs,
                        "DNS lookup failed; keeping the last good addresses"
                    ),
                    None if first => tracing::warn!(
                        upstream = self.role.name(),
                        host = %self.host,
                        error = %why,
                        "DNS lookup failed"
                    ),
                    _ => {}
                }
                last_good.ok_or(why)
            }
        }
    }

    /// Asks /etc/hosts, then DNS: the addresses and how long to use them.
    async fn query(&self) -> Result<(Vec<SocketAddr>, Duration), String> {
        let with_port = |ips: Vec<IpAddr>| -> Vec<SocketAddr> {
            let mut addrs: Vec<SocketAddr> = Vec::with_capacity(ips.len());
            for ip in ips {
                let addr = SocketAddr::new(ip, self.port);
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
            addrs
        };
        if let Ok(text) = std::fs::read(HOSTS_FILE) {
            if let Some(ips) = from_hosts_file(&text, &self.host) {
                return Ok((with_port(ips), MAX_TTL));
            }
        }
        let Some(resolver) = &self.resolver else {
            return Err("an IP literal is not looked up".into());
        };
        let answer = resolver
            .lookup_ip(self.host.as_str())
            .await
            .map_err(|e| describe(&e))?;
        let ttl = clamp_ttl(
            answer
                .valid_until()
                .saturating_duration_since(Instant::now()),
        );
        let addrs = with_port(answer.iter().collect());
        if addrs.is_empty() {
            return Err("no A or AAAA records".into());
        }
        Ok((addrs, ttl))
    }
}

/// A lookup error in a few words.
fn describe(e: &NetError) -> String {
    if e.is_nx_domain() {
        "no such host (NXDOMAIN)".into()
    } else if e.is_no_records_found() {
        "no A or AAAA records".into()
    } else {
        e.to_string()
    }
}

fn same_set(a: &[SocketAddr], b: &[SocketAddr]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

/// What a hosts file (its text) lists for `host`, IPv6 first; `None` when it lists nothing.
fn from_hosts_file(text: &[u8], host: &str) -> Option<Vec<IpAddr>> {
    let mut hosts = Hosts::default();
    hosts.read_hosts_conf(text).ok()?;
    let name = Name::from_str(host).ok()?;
    let ips: Vec<IpAddr> = [RecordType::AAAA, RecordType::A]
        .into_iter()
        .filter_map(|t| hosts.lookup_static_host(&Query::query(name.clone(), t)))
        .flat_map(|lookup| {
            lookup
                .answers()
                .iter()
                .filter_map(|r| r.data.ip_addr())
                .collect::<Vec<_>>()
        })
        .collect();
    (!ips.is_empty()).then_some(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_clamped() {
        assert_eq!(clamp_ttl(Duration::ZERO), MIN_TTL);
        assert_eq!(clamp_ttl(Duration::from_secs(30)), Duration::from_secs(30));
        assert_eq!(clamp_ttl(Duration::from_secs(86_400)), MAX_TTL);
    }

    #[test]
    fn nameserver_values() {
        let ok = [
            ("127.0.0.1:5353", "127.0.0.1:5353"),
            ("127.0.0.1", "127.0.0.1:53"),
            ("[fdaa::3]:53", "[fdaa::3]:53"),
            ("fdaa::3", "[fdaa::3]:53"),
            ("[fdaa::3]", "[fdaa::3]:53"),
            (" 10.0.0.1:54 ", "10.0.0.1:54"),
        ];
        for (value, want) in ok {
            assert_eq!(
                parse_nameserver(value).map(|a| a.to_string()).as_deref(),
                Some(want),
                "{value}"
            );
        }
        for bad in [
            "",
            "dns.google",
            "127.0.0.1:99999",
            "[127.0.0.1]",
            "fdaa::3:x",
            "1.2.3",
        ] {
            assert_eq!(parse_nameserver(bad), None, "{bad}");
        }
    }

    #[test]
    fn nameservers_in_effect_are_described() {
        let at = "127.0.0.1:5353".parse().ok();
        assert_eq!(
            Nameservers::read(at).to_string(),
            "127.0.0.1:5353 (upstream.nameserver)"
        );
        let fallback = Nameservers::Fallback("No such file or directory".into()).to_string();
        assert!(fallback.starts_with("127.0.0.1:53 "), "{fallback}");
        // The system's, whatever this machine has, says where it came from.
        let system = Nameservers::read(None).to_string();
        assert!(system.contains("/etc/resolv.conf"), "{system}");
    }

    #[test]
    fn hosts_file_wins_for_both_families() {
        let text = b"# comment\n127.0.0.1 localhost\n127.0.0.5 db.test other\n::1 db.test\n";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            from_hosts_file(text, "db.test"),
            Some(vec![ip("::1"), ip("127.0.0.5")])
        );
        assert_eq!(
            from_hosts_file(text, "DB.Test"),
            Some(vec![ip("::1"), ip("127.0.0.5")])
        );
        assert_eq!(from_hosts_file(text, "other"), Some(vec![ip("127.0.0.5")]));
        assert_eq!(from_hosts_file(text, "missing.test"), None);
        assert_eq!(from_hosts_file(b"", "db.test"), None);
    }

    fn addrs(list: &[&str]) -> Arc<[SocketAddr]> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn connects_look_up_only_when_needed_and_at_most_once_per_min_ttl() {
        let t0 = Instant::now();
        let mut s = State::new(t0);
        // Nothing yet: look up.
        assert_eq!(s.plan(t0), Plan::Lookup);
        // The first lookup failed: the error, until MIN_TTL has passed.
        s.looked_up = Some(t0);
        s.error = Some("no such host (NXDOMAIN)".into());
        assert_eq!(s.plan(t0), Plan::Fail("no such host (NXDOMAIN)".into()));
        assert_eq!(s.plan(t0 + MIN_TTL), Plan::Lookup);
        // An answer is used, even past its TTL (the refresher renews it).
        let a = addrs(&["127.0.0.2:5432"]);
        s.addrs = Some(a.clone());
        s.error = None;
        s.expires = t0 + MIN_TTL;
        assert_eq!(s.plan(t0), Plan::Use(a.clone()));
        assert_eq!(s.plan(t0 + MAX_TTL), Plan::Use(a.clone()));
        // After a failed connect: look up, but not twice within MIN_TTL.
        s.stale = true;
        assert_eq!(s.plan(t0), Plan::Use(a.clone()));
        assert_eq!(s.plan(t0 + MIN_TTL), Plan::Lookup);
    }

    #[test]
    fn the_refresher_follows_the_ttl_and_retries_after_min_ttl() {
        let t0 = Instant::now();
        let mut s = State::new(t0);
        assert_eq!(s.next_refresh(), t0, "first lookup at once");
        s.looked_up = Some(t0);
        s.expires = t0 + Duration::from_secs(30);
        assert_eq!(s.next_refresh(), t0 + Duration::from_secs(30));
        // A failed lookup (the TTL ran out meanwhile) is retried MIN_TTL later.
        let t1 = t0 + Duration::from_secs(31);
        s.looked_up = Some(t1);
        assert_eq!(s.next_refresh(), t1 + MIN_TTL);
    }

    #[test]
    fn address_sets_compare_without_order() {
        let a = addrs(&["127.0.0.2:1", "[::1]:1"]);
        assert!(same_set(&a, &addrs(&["[::1]:1", "127.0.0.2:1"])));
        assert!(!same_set(&a, &addrs(&["127.0.0.2:1"])));
        assert!(!same_set(&a, &addrs(&["127.0.0.3:1", "[::1]:1"])));
    }

    #[tokio::test]
    async fn ip_literals_and_hosts_file_names_need_no_dns() {
        let (_stop, shutdown) = crate::shutdown::channel();
        let metrics = Arc::new(Metrics::default());
        // A nameserver nothing answers on: any DNS query would time out.
        let nowhere = Nameservers::Configured("127.0.0.1:9".parse().unwrap());
        let start = |host: &str| {
            Discovery::start(
                Role::Primary,
                host,
                5432,
                &nowhere,
                Duration::from_secs(30),
                metrics.clone(),
                shutdown.clone(),
            )
            .unwrap()
        };
        let literal = start("::1");
        assert_eq!(literal.addrs().await.unwrap()[..], *addrs(&["[::1]:5432"]));
        assert!(literal.is_current("[::1]:5432".parse().unwrap()));
        assert!(!literal.is_current("127.0.0.1:5432".parse().unwrap()));
        // localhost: from /etc/hosts, or hickory's built-in answer when the file lacks it.
        let local = start("localhost").addrs().await.unwrap();
        assert!(!local.is_empty(), "{local:?}");
        assert!(local.iter().all(|a| a.ip().is_loopback()), "{local:?}");
    }
}
