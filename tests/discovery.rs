//! DNS discovery against the lab: the primary's URL names a host served by a tiny DNS server in
//! this test, and the answer moves between two relays to the real primary (127.0.0.2 and
//! 127.0.0.3, same port) while pgnear runs. Also: unresolvable and unreachable names fail with
//! 08006, /etc/hosts names never reach DNS, and a failing DNS leaves the last good answer in use.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use pgnear::config::HumanDuration;
use pgnear::discovery::{Discovery, Nameservers};
use pgnear::lab::relay::Relay;
use pgnear::metrics::Metrics;
use pgnear::role::Role;
use pgnear::upstream_url::UpstreamUrl;
use tokio::net::UdpSocket;
use tokio_postgres::NoTls;

const HOST: &str = "db.pgnear.test";

/// A tiny authoritative DNS server on 127.0.0.1 (UDP): A and AAAA answers from a table the test
/// changes while it runs, with a TTL of 1 s unless told otherwise; names not in the table get
/// NXDOMAIN, and `fail(true)` makes every answer SERVFAIL.
struct Dns {
    addr: SocketAddr,
    zone: Arc<Mutex<HashMap<String, Vec<IpAddr>>>>,
    ttl: Arc<AtomicU32>,
    failing: Arc<AtomicBool>,
    queries: Arc<AtomicUsize>,
    task: tokio::task::AbortHandle,
}

impl Dns {
    async fn start() -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone: Arc<Mutex<HashMap<String, Vec<IpAddr>>>> = Arc::default();
        let ttl = Arc::new(AtomicU32::new(1));
        let failing = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicUsize::new(0));
        let (z, t, f, q) = (zone.clone(), ttl.clone(), failing.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                q.fetch_add(1, Ordering::Relaxed);
                let answer = answer(
                    &request,
                    &z.lock().unwrap(),
                    t.load(Ordering::Relaxed),
                    f.load(Ordering::Relaxed),
                );
                if let Ok(bytes) = answer.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        })
        .abort_handle();
        Dns {
            addr,
            zone,
            ttl,
            failing,
            queries,
            task,
        }
    }

    fn set(&self, name: &str, ips: &[&str]) {
        let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        self.zone.lock().unwrap().insert(name.to_string(), ips);
    }

    fn set_ttl(&self, seconds: u32) {
        self.ttl.store(seconds, Ordering::Relaxed);
    }

    fn fail(&self, on: bool) {
        self.failing.store(on, Ordering::Relaxed);
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(
    request: &Message,
    zone: &HashMap<String, Vec<IpAddr>>,
    ttl: u32,
    failing: bool,
) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    for query in &request.queries {
        response.add_query(query.clone());
        let name = query.name().to_ascii().trim_end_matches('.').to_lowercase();
        let ips = match zone.get(&name) {
            _ if failing => {
                response.metadata.response_code = ResponseCode::ServFail;
                continue;
            }
            Some(ips) => ips,
            None => {
                response.metadata.response_code = ResponseCode::NXDomain;
                continue;
            }
        };
        for ip in ips {
            let data = match (ip, query.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            response.add_answer(Record::from_rdata(query.name().clone(), ttl, data));
        }
    }
    response
}

/// The lab's primary URL with another host and port.
fn primary_url_at(host: &str, port: u16) -> String {
    let mut url = UpstreamUrl::parse(&cluster().primary_url_from(PRIMARY)).unwrap();
    url.hosts = vec![pgnear::upstream_url::Host {
        name: host.to_string(),
        port,
    }];
    url.to_url_with_password()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn follows_a_dns_change_when_the_ttl_runs_out() {
    run(primary_moves(1));
}

/// With a TTL far beyond the test's patience (pgnear uses it for 60 s), only the failed connects
/// to the old address can make pgnear look again.
#[test]
fn a_failed_connect_looks_the_host_up_again_before_the_ttl_runs_out() {
    run(primary_moves(3600));
}

/// The primary's host name moves from 127.0.0.2 to 127.0.0.3 (answers with `ttl`) while pgnear
/// runs: new sessions follow without a restart.
async fn primary_moves(ttl: u32) {
    let dns = Dns::start().await;
    dns.set_ttl(ttl);
    let primary = cluster().primary().addr();
    let first = Relay::start_on(addr("127.0.0.2:0"), primary, Duration::ZERO)
        .await
        .unwrap();
    let port = first.addr().port();
    let second = Relay::start_on(
        SocketAddr::new([127, 0, 0, 3].into(), port),
        primary,
        Duration::ZERO,
    )
    .await
    .expect("the first relay's port is free on 127.0.0.3 too");
    dns.set(HOST, &["127.0.0.2"]);
    let p = proxy(PRIMARY, |c| {
        c.upstream.primary_url = primary_url_at(HOST, port);
        c.upstream.nameserver = dns.addr.to_string();
    })
    .await;

    let c = connect(&url(&p)).await;
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS dns_moves (n int); INSERT INTO dns_moves VALUES (1)",
    )
    .await
    .unwrap();
    assert!(first.connections() > 0, "writes went through 127.0.0.2");
    assert_eq!(second.connections(), 0);
    // The session's server connection goes back to the pool, idle, at 127.0.0.2.
    drop(c);
    let idle = "pgnear_pool_idle_connections{upstream=\"primary\"}";
    eventually(
        "the connection is pooled",
        Duration::from_secs(10),
        || async { metric(&p, idle).await == 1.0 },
    )
    .await;

    // The primary moves: DNS names the second relay, and the first one goes away.
    dns.set(HOST, &["127.0.0.3"]);
    if ttl <= 1 {
        // Once the answer changes, nothing stays connected to the old address: the probe
        // reconnects and the pool retires its idle connection.
        eventually(
            "no connection left to 127.0.0.2",
            Duration::from_secs(30),
            || async { first.connections() == 0 },
        )
        .await;
        assert_eq!(metric(&p, idle).await, 0.0);
    }
    drop(first);
    eventually(
        "a new session's write through 127.0.0.3",
        Duration::from_secs(30),
        || async {
            let Ok((c, conn)) = tokio_postgres::connect(&url(&p), NoTls).await else {
                return false;
            };
            tokio::spawn(conn);
            c.batch_execute("INSERT INTO dns_moves VALUES (2)")
                .await
                .is_ok()
        },
    )
    .await;
    assert!(second.connections() > 0, "writes go through 127.0.0.3");
    let changes = "pgnear_dns_changes_total{upstream=\"primary\"}";
    assert_eq!(metric(&p, changes).await, 1.0);

    // The probe reconnected to the new address too, and /status shows it.
    eventually("the primary up again", Duration::from_secs(30), || async {
        metric(&p, "pgnear_upstream_up{upstream=\"primary\"}").await == 1.0
    })
    .await;
    let (_, body) = http_get(p.admin_addr(), "/status").await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        status["upstreams"][0]["addresses"],
        serde_json::json!([format!("127.0.0.3:{port}")]),
        "{status}"
    );
    p.shutdown().await;
}

#[test]
fn unresolvable_and_unreachable_hosts_fail_with_08006_naming_the_upstream() {
    run(async {
        let dns = Dns::start().await;
        // A port nothing listens on at [::1].
        let port = std::net::TcpListener::bind("[::1]:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        dns.set("v6only.pgnear.test", &["::1"]);
        for (host, why) in [
            ("nowhere.pgnear.test", "no such host (NXDOMAIN)".to_string()),
            ("v6only.pgnear.test", format!("[::1]:{port}: ")),
        ] {
            let p = proxy(PRIMARY, |c| {
                c.upstream.primary_url = primary_url_at(host, port);
                c.upstream.nameserver = dns.addr.to_string();
                // Startup waits this long for a first contact that cannot happen.
                c.upstream.connect_timeout = HumanDuration(Duration::from_secs(1));
            })
            .await;
            let e = tokio_postgres::connect(&url(&p), NoTls)
                .await
                .err()
                .expect("no session without the primary");
            assert_eq!(sqlstate(&e), "08006", "{e}");
            let message = e.as_db_error().expect("an error from pgnear").message();
            let upstream = format!("primary upstream {host}:{port} unavailable");
            assert!(message.contains(&upstream), "{message}");
            assert!(message.contains(&why), "{message}");
            p.shutdown().await;
        }
    });
}

#[test]
fn hosts_file_names_never_reach_dns() {
    run(async {
        let dns = Dns::start().await;
        let port = cluster().primary().addr().port();
        let p = proxy(PRIMARY, |c| {
            c.upstream.primary_url = primary_url_at("localhost", port);
            c.upstream.nameserver = dns.addr.to_string();
        })
        .await;
        let c = connect(&url(&p)).await;
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS dns_local (n int); INSERT INTO dns_local VALUES (1)",
        )
        .await
        .unwrap();
        assert_eq!(
            dns.queries(),
            0,
            "localhost comes from /etc/hosts (or hickory's own answer)"
        );
        p.shutdown().await;
    });
}

#[test]
fn a_failing_dns_leaves_the_last_good_answer_in_use() {
    run(async {
        let dns = Dns::start().await;
        dns.set(HOST, &["127.0.0.2"]);
        let metrics = Arc::new(Metrics::default());
        let (_stop, shutdown) = pgnear::shutdown::channel();
        let d = Discovery::start(
            Role::Replica,
            HOST,
            5433,
            &Nameservers::Configured(dns.addr),
            Duration::from_secs(10),
            metrics.clone(),
            shutdown,
        )
        .unwrap();
        let old = addr("127.0.0.2:5433");
        assert_eq!(d.addrs().await.unwrap()[..], [old]);

        // DNS fails; a failed connect asks for a new answer and keeps getting the old one.
        dns.fail(true);
        d.connect_failed(old);
        let failures = "pgnear_dns_failures_total{upstream=\"replica\"} ";
        eventually("a failed lookup", Duration::from_secs(30), || async {
            assert_eq!(d.addrs().await.unwrap()[..], [old]);
            metrics
                .render()
                .lines()
                .any(|l| l.starts_with(failures) && !l.ends_with(" 0"))
        })
        .await;
        assert!(d.is_current(old));

        // DNS is back with another address: it replaces the old one.
        dns.set(HOST, &["127.0.0.3"]);
        dns.fail(false);
        let new = addr("127.0.0.3:5433");
        eventually("the new answer", Duration::from_secs(30), || async {
            d.addrs().await.unwrap()[..] == [new]
        })
        .await;
        assert!(!d.is_current(old));
        assert!(d.is_current(new));
        assert!(metrics
            .render()
            .contains("pgnear_dns_changes_total{upstream=\"replica\"} 1"));
    });
}
