//! Hostile clients against the lab: junk, truncated and oversized messages, bad startups,
//! messages out of order, Sync storms, thousands of stalled handshakes, a client that stops
//! reading a huge result, and one that vanishes in the middle of COPY FROM. Each gets an 08P01
//! or a close (never a hang), and pgnear keeps serving everyone else.
//!
//! (tests/proxy.rs already covers startup lengths 0, 3 and 2^31-1, a startup without user, protocol
//! 2.0 and 4.0, an unterminated last string, SSLRequest twice, an oversized Query and a client
//! vanishing mid-query; these tests cover the rest.)
//!
//! Every test here runs under `serial()`: one measures the test process's memory, one counts
//! client connections, one counts server backends.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgnear::config::{AuthMethod, Config, HumanDuration, PoolMode};
use pgnear::protocol::frontend::MESSAGE_TAGS;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn trust(c: &mut Config) {
    c.auth.method = Some(AuthMethod::Trust);
}

/// Trust auth, and clients that stall in startup are dropped after 1 s.
fn trust_quick_startup(c: &mut Config) {
    trust(c);
    c.proxy.startup_timeout = HumanDuration(Duration::from_secs(1));
}

/// `pgnear_client_connections` from the admin endpoint.
async fn client_gauge(p: &pgnear::Proxy) -> i64 {
    metric(p, "pgnear_client_connections").await as i64
}

async fn assert_serves(p: &pgnear::Proxy) {
    let c = connect(&url(p)).await;
    let n: i32 = c.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
}

/// Waits until `pgnear_client_connections` is back to `baseline`. The bound only keeps a leak
/// from hanging the test: it is far above the moment it takes.
async fn gauge_back_to(p: &pgnear::Proxy, baseline: i64) {
    let what = format!(
        "pgnear_client_connections back to its baseline of {baseline} (a client connection \
         outlived its client)"
    );
    eventually(&what, Duration::from_secs(60), || async {
        client_gauge(p).await == baseline
    })
    .await;
}

// ---------------------------------------------------------------------------------------------

#[test]
fn random_bytes_from_many_connections_get_08p01_or_a_close() {
    let _serial = serial();
    run(async {
        let p = proxy(REPLICA, trust_quick_startup).await;
        let addr = p.addr();
        let baseline = client_gauge(&p).await;
        const CONNECTIONS: u64 = 600;
        const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::new();
        for i in 0..CONNECTIONS {
            let limit = limit.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                let mut rng = rand::rngs::StdRng::seed_from_u64(SEED ^ i);
                let len = rng.random_range(1..2048usize);
                let mut junk = vec![0u8; len];
                rng.fill(&mut junk[..]);
                let what = format!("connection {i} (seed {SEED:#x}^{i}, {len} bytes)");
                match i % 8 {
                    // Junk after a good startup: well-framed answers, an 08P01 first when the
                    // first byte is no frontend message at all.
                    0..=3 => {
                        let (mut s, _) = startup(addr, &[]).await;
                        let _ = s.write_all(&junk).await;
                        let _ = s.shutdown().await;
                        let (out, closed) = read_to_close(&mut s, HANG).await;
                        assert!(closed, "{what}: no close within {HANG:?}");
                        let frames = backend_frames(&out);
                        let framed: usize = frames.iter().map(|(_, b)| b.len() + 5).sum();
                        assert_eq!(framed, out.len(), "{what}: answer is not whole frames");
                        if !MESSAGE_TAGS.contains(&junk[0]) {
                            assert_eq!(
                                error_codes(&frames).first().map(String::as_str),
                                Some("08P01"),
                                "{what}: {}",
                                tags(&frames)
                            );
                        }
                    }
                    // Junk instead of a startup packet, then silence: closed by
                    // startup_timeout at the latest, silently when the junk is no readable
                    // startup packet (as Postgres does), else with an 08P01.
                    4 => {
                        let out = exchange(addr, &junk, false, &what).await;
                        let codes = error_codes(&backend_frames(&out));
                        assert!(
                            codes.is_empty() || codes == ["08P01"],
                            "{what}: {codes:?} {out:?}"
                        );
                    }
                    // Junk instead of a startup packet, then a half-close.
                    _ => {
                        let out = exchange(addr, &junk, true, &what).await;
                        let codes = error_codes(&backend_frames(&out));
                        assert!(
                            codes.is_empty() || codes == ["08P01"],
                            "{what}: {codes:?} {out:?}"
                        );
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_serves(&p).await;
        gauge_back_to(&p, baseline).await;
        p.shutdown().await;
    });
}

#[test]
fn truncated_oversized_and_malformed_startups() {
    let _serial = serial();
    run(async {
        let p = proxy(PRIMARY, trust_quick_startup).await;
        let addr = p.addr();
        let good = startup_packet(&[("user", "app"), ("database", "app")], 196608);
        let ssl: &[u8] = &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let gss: &[u8] = &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
        let with_len = |len: u32, rest: &[u8]| [&len.to_be_bytes()[..], rest].concat();
        let body = |b: &[u8]| {
            let mut v = ((b.len() + 4) as u32).to_be_bytes().to_vec();
            v.extend_from_slice(b);
            v
        };
        let v3 = 196608u32.to_be_bytes();
        // (name, bytes, half-close afterwards)
        // A packet that cannot be read (a bad length, cut short) is only logged by Postgres,
        // which closes the connection without a word: so does pgnear.
        let silent: Vec<(&str, Vec<u8>, bool)> = vec![
            ("length 7", with_len(7, &[0, 3, 0]), true),
            ("length 10001", with_len(10_001, &v3), false),
            ("length u32::MAX", with_len(u32::MAX, &v3), false),
            ("truncated, then EOF", good[..good.len() / 2].to_vec(), true),
            (
                "truncated, then silence",
                good[..good.len() / 2].to_vec(),
                false,
            ),
            ("only two bytes, then silence", vec![0, 0], false),
        ];
        for (name, bytes, half_close) in silent {
            let out = exchange(addr, &bytes, half_close, name).await;
            assert!(out.is_empty(), "{name}: {out:?}");
        }
        let refused: Vec<(&str, Vec<u8>, bool)> = vec![
            (
                "user without a value",
                body(&[&v3[..], b"user\0"].concat()),
                false,
            ),
            (
                "no final terminator",
                body(&[&v3[..], b"user\0app\0"].concat()),
                false,
            ),
            (
                "empty user",
                startup_packet(&[("user", ""), ("database", "app")], 196608),
                false,
            ),
            (
                "user not UTF-8",
                body(&[&v3[..], b"user\0\xff\xfe\0\0"].concat()),
                false,
            ),
            ("protocol 0.0", startup_packet(&[("user", "app")], 0), false),
            (
                "protocol 7.7",
                startup_packet(&[("user", "app")], (7 << 16) | 7),
                false,
            ),
            (
                "SSLRequest with a body",
                body(&[0x04, 0xd2, 0x16, 0x2f, 1]),
                false,
            ),
            ("GSSENC, SSL, GSSENC", [gss, ssl, gss].concat(), false),
            (
                "replication connection",
                startup_packet(&[("user", "app"), ("replication", "database")], 196608),
                false,
            ),
        ];
        for (name, bytes, half_close) in refused {
            let out = exchange(addr, &bytes, half_close, name).await;
            let codes = error_codes(&backend_frames(&out));
            assert_eq!(codes, ["08P01"], "{name}: {out:?}");
        }
        // A cancel request of the wrong length: closed without an answer, as by Postgres.
        let short = body(&[0x04, 0xd2, 0x16, 0x2e, 0, 0]);
        assert_eq!(exchange(addr, &short, false, "short cancel").await, b"");
        // A cancel request for a key nobody has: closed without an answer.
        let mut cancel = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        cancel.extend_from_slice(&[0, 0, 0, 7, 1, 2, 3, 4]);
        assert_eq!(exchange(addr, &cancel, false, "unknown cancel").await, b"");
        // Accepted: a newer minor version (answered with NegotiateProtocolVersion, then served
        // as 3.0), GSSENC then SSL then startup (both declined), and a startup at exactly the
        // 10 000-byte limit.
        let long_value = "x".repeat(10_000 - 4 - 4 - "user\0app\0application_name\0\0\0".len());
        let accepted: Vec<(&str, Vec<u8>)> = vec![
            ("GSSENC, SSL, startup", [gss, ssl, &good].concat()),
            ("plain", good.clone()),
            (
                "protocol 3.99",
                startup_packet(&[("user", "app"), ("database", "app")], (3 << 16) | 99),
            ),
            (
                "startup of 10000 bytes",
                startup_packet(
                    &[("user", "app"), ("application_name", &long_value)],
                    196608,
                ),
            ),
        ];
        for (name, bytes) in accepted {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            s.write_all(&query_msg("SELECT 1")).await.unwrap();
            s.write_all(&frame(b'X', &[])).await.unwrap();
            let (out, closed) = read_to_close(&mut s, HANG).await;
            assert!(closed, "{name}: no close");
            let frames = backend_frames(&out);
            let t = tags(&frames);
            assert!(error_codes(&frames).is_empty(), "{name}: {t} {out:?}");
            // (a notice may come first: Postgres warns that the long application_name is
            // truncated when pgnear sets it on the server)
            assert!(t.replace('N', "").contains("ZTDCZ"), "{name}: {t}");
            if name == "protocol 3.99" {
                assert!(t.starts_with('v'), "{name}: {t}");
            }
        }
        assert_serves(&p).await;
        p.shutdown().await;
    });
}

#[test]
fn truncated_oversized_and_malformed_messages_after_startup() {
    let _serial = serial();
    run(async {
        const MAX: usize = 4096;
        let p = proxy(REPLICA, |c| {
            trust(c);
            c.proxy.max_message_size = MAX;
        })
        .await;
        let addr = p.addr();
        // (name, bytes; half-close afterwards)
        let refused: Vec<(&str, Vec<u8>, bool)> = vec![
            ("Query, length 0", header(b'Q', 0), false),
            (
                "Query, length 3",
                [header(b'Q', 3), vec![0; 3]].concat(),
                false,
            ),
            ("Sync, length 0", header(b'S', 0), false),
            ("Parse, length 2^31-1", header(b'P', i32::MAX as u32), false),
            ("Query, length u32::MAX", header(b'Q', u32::MAX), false),
            (
                "CopyData, length max+1",
                [header(b'd', MAX as u32 + 1), vec![b'x'; MAX - 3]].concat(),
                false,
            ),
            (
                "Query, length max+1",
                query_msg(&format!("SELECT '{}'", "x".repeat(MAX - 13))),
                false,
            ),
            ("Query without its NUL", frame(b'Q', b"SELECT 1"), false),
            ("unknown message type", frame(b'Z', b"I"), false),
            (
                "a startup packet again",
                startup_packet(&[("user", "app")], 196608),
                false,
            ),
            (
                "SSLRequest after startup",
                vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
                false,
            ),
            ("a password message", frame(b'p', b"secret\0"), false),
        ];
        for (name, bytes, half_close) in refused {
            let (mut s, _) = startup(addr, &[]).await;
            let _ = s.write_all(&bytes).await;
            if half_close {
                let _ = s.shutdown().await;
            }
            let (out, closed) = read_to_close(&mut s, HANG).await;
            assert!(closed, "{name}: no close within {HANG:?}: {out:?}");
            let codes = error_codes(&backend_frames(&out));
            assert_eq!(
                codes.first().map(String::as_str),
                Some("08P01"),
                "{name}: {out:?}"
            );
        }
        // Malformed contents inside well-formed frames reach the server, which answers 08P01
        // (and may end the session); either way the client hears of it and is not left hanging.
        let malformed: Vec<(&str, Vec<u8>)> = vec![
            (
                "Parse without NULs",
                [frame(b'P', b"stmt"), sync_msg()].concat(),
            ),
            (
                "Bind with a negative parameter count",
                [
                    parse_msg("", "SELECT 1"),
                    frame(b'B', &[0, 0, 0, 0, 0xff, 0xff, 0, 0]),
                    sync_msg(),
                ]
                .concat(),
            ),
            (
                "Execute without a portal name",
                [frame(b'E', b""), sync_msg()].concat(),
            ),
        ];
        for (name, bytes) in malformed {
            let (mut s, _) = startup(addr, &[]).await;
            s.write_all(&bytes).await.unwrap();
            s.write_all(&frame(b'X', &[])).await.unwrap();
            let (out, closed) = read_to_close(&mut s, HANG).await;
            assert!(closed, "{name}: no close within {HANG:?}: {out:?}");
            let codes = error_codes(&backend_frames(&out));
            assert_eq!(
                codes.first().map(String::as_str),
                Some("08P01"),
                "{name}: {out:?}"
            );
        }
        // Truncated messages, then EOF: the session just ends.
        for (name, bytes) in [
            ("Query cut short", query_msg("SELECT 1")[..7].to_vec()),
            ("header cut short", vec![b'Q', 0, 0]),
            ("Parse cut short", parse_msg("s", "SELECT 1")[..10].to_vec()),
        ] {
            let (mut s, _) = startup(addr, &[]).await;
            s.write_all(&bytes).await.unwrap();
            s.shutdown().await.unwrap();
            let (_, closed) = read_to_close(&mut s, HANG).await;
            assert!(closed, "{name}: no close within {HANG:?}");
        }
        // A Query of exactly max_message_size is fine.
        let sql = format!("SELECT '{}'", "x".repeat(MAX - 14));
        assert_eq!(query_msg(&sql).len(), MAX + 1);
        let (mut s, _) = startup(addr, &[]).await;
        s.write_all(&query_msg(&sql)).await.unwrap();
        let frames = until_ready(&mut s).await;
        assert_eq!(tags(&frames), "TDCZ");
        assert_serves(&p).await;
        p.shutdown().await;
    });
}

#[test]
fn messages_out_of_order_get_errors_and_the_session_goes_on() {
    let _serial = serial();
    run(async {
        let p = proxy(REPLICA, trust).await;
        let (mut s, _) = startup(p.addr(), &[]).await;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "Bind before Parse (unnamed)",
                [bind_msg("", "", &[]), execute_msg(""), sync_msg()].concat(),
                "26000",
            ),
            (
                "Bind of an unknown statement",
                [bind_msg("", "nope", &[]), execute_msg(""), sync_msg()].concat(),
                "26000",
            ),
            (
                "Execute of an unknown portal",
                [execute_msg("nope"), sync_msg()].concat(),
                "34000",
            ),
            (
                "Describe of an unknown portal",
                [describe_msg(b'P', "nope"), sync_msg()].concat(),
                "34000",
            ),
            (
                "Describe of an unknown statement",
                [describe_msg(b'S', "nope"), sync_msg()].concat(),
                "26000",
            ),
        ];
        for (name, bytes, code) in cases {
            s.write_all(&bytes).await.unwrap();
            let frames = until_ready(&mut s).await;
            assert_eq!(error_codes(&frames), [code], "{name}: {}", tags(&frames));
            assert_eq!(frames.last().unwrap().1, b"I", "{name}");
            // The session is fine afterwards.
            s.write_all(&query_msg("SELECT 1")).await.unwrap();
            assert_eq!(tags(&until_ready(&mut s).await), "TDCZ", "after {name}");
        }
        // COPY messages outside COPY are ignored (as by Postgres), Close of an unknown
        // statement completes.
        s.write_all(&[frame(b'd', b"1\n"), frame(b'c', &[]), frame(b'f', b"no\0")].concat())
            .await
            .unwrap();
        s.write_all(&[frame(b'C', b"Snope\0"), sync_msg()].concat())
            .await
            .unwrap();
        assert_eq!(tags(&until_ready(&mut s).await), "3Z");

        // A Sync storm: thousands of pipelined Syncs, then batches alternating between the
        // replica and the primary with a Sync between each. Every Sync gets its ReadyForQuery,
        // and the rows come back in the order asked.
        const SYNCS: usize = 5_000;
        const BATCHES: usize = 600;
        let mut storm = sync_msg().repeat(SYNCS);
        for i in 0..BATCHES {
            let sql = if i % 2 == 0 {
                "SELECT $1::int, pg_is_in_recovery()"
            } else {
                "/* pgnear:primary */ SELECT $1::int, pg_is_in_recovery()"
            };
            storm.extend(parse_msg("", sql));
            storm.extend(bind_msg("", "", &[&i.to_string()]));
            storm.extend(execute_msg(""));
            storm.extend(sync_msg());
            storm.extend(sync_msg());
        }
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            wr.write_all(&storm).await.unwrap();
            wr
        });
        let expected_z = SYNCS + 2 * BATCHES;
        let mut z = 0;
        let mut rows = Vec::new();
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        while z < expected_z {
            let n = tokio::time::timeout(HANG, rd.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("a hang after {z} of {expected_z} ReadyForQuery"))
                .unwrap();
            assert!(n > 0, "closed after {z} ReadyForQuery");
            buf.extend_from_slice(&chunk[..n]);
            let mut used = 0;
            for (tag, body) in backend_frames(&buf) {
                used += body.len() + 5;
                match tag {
                    b'Z' => {
                        assert_eq!(body, b"I");
                        z += 1;
                    }
                    b'D' => {
                        let len = i32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
                        let v: usize = std::str::from_utf8(&body[6..6 + len])
                            .unwrap()
                            .parse()
                            .unwrap();
                        let rec = &body[6 + len + 4..];
                        rows.push((v, rec == b"t"));
                    }
                    b'E' => panic!("error in the storm: {:?}", error_field(&body, b'M')),
                    _ => {}
                }
            }
            buf.drain(..used);
        }
        assert_eq!(z, expected_z);
        let values: Vec<usize> = rows.iter().map(|r| r.0).collect();
        assert_eq!(
            values,
            (0..BATCHES).collect::<Vec<_>>(),
            "rows out of order"
        );
        for (i, on_replica) in rows {
            assert_eq!(on_replica, i % 2 == 0, "batch {i} ran on the wrong server");
        }
        let mut s = rd.reunite(writer.await.unwrap()).unwrap();
        s.write_all(&query_msg("SELECT 1")).await.unwrap();
        assert_eq!(tags(&until_ready(&mut s).await), "TDCZ");
        p.shutdown().await;
    });
}

/// The soft limit on open files, from /proc/self/limits.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[test]
fn thousands_of_stalled_startups_neither_block_others_nor_outlive_startup_timeout() {
    let _serial = serial();
    run(async {
        // Each stalled client costs two descriptors in this process (the client's socket and
        // pgnear's); keep 1000 spare for the cluster's connections and everything else.
        let wanted = 2000usize;
        let count = match open_files_limit() {
            Some(limit) if (limit as usize) < 2 * wanted + 1000 => {
                let n = (limit as usize).saturating_sub(1000) / 2;
                eprintln!(
                    "open-files soft limit is {limit}: testing {n} stalled clients instead of {wanted} (raise `ulimit -n` to test all)"
                );
                n
            }
            _ => wanted,
        };
        assert!(count >= 100, "open-files limit too low to test this");
        // The stalled clients must all still hang while the ordinary client logs in, so the
        // timeout has to outlast opening them and that login: normally well under a second
        // together, 20 s leaves room for a loaded machine. Nothing below waits for a fixed
        // time; the bounds only keep a failure from hanging.
        let timeout = Duration::from_secs(20);
        let p = proxy(PRIMARY, |c| {
            c.proxy.startup_timeout = HumanDuration(timeout)
        })
        .await;
        const REFUSED: &str = "pgnear_client_connections_rejected_total{reason=\"protocol\"}";
        let baseline = client_gauge(&p).await;
        let refused_before = metric(&p, REFUSED).await;
        let opened = Instant::now();
        let mut stalled = Vec::with_capacity(count);
        for i in 0..count {
            let mut s = TcpStream::connect(p.addr()).await.unwrap();
            if i % 2 == 1 {
                // half of them send part of a startup packet, then nothing
                s.write_all(&[0, 0, 0, 40, 0, 3]).await.unwrap();
            }
            stalled.push(s);
        }
        // (Past the timeout the first of them are closed and the count cannot be reached.)
        let counted = format!(
            "pgnear to count all {count} stalled clients before startup_timeout ({timeout:?}) \
             closes the first of them"
        );
        eventually(&counted, timeout, || async {
            client_gauge(&p).await >= baseline + count as i64
        })
        .await;
        // An ordinary client (SCRAM) logs in and queries while they hang.
        let before = Instant::now();
        assert_serves(&p).await;
        let served = before.elapsed();
        let still_open = client_gauge(&p).await - baseline;
        eprintln!(
            "{count} stalled clients opened in {:?}; an ordinary client connected and queried in {served:?}, with {still_open} stalled clients open",
            before - opened
        );
        assert!(
            still_open >= count as i64,
            "the stalled clients were already gone ({still_open} left) when the ordinary client was done, {:?} after the first was opened (startup_timeout {timeout:?}): this does not show it got through while they hung",
            opened.elapsed()
        );
        // Every stalled client is closed without a word, as Postgres closes a client that
        // never completes its startup packet: once startup_timeout is over, however long that
        // takes on this machine (the bound only stops a hang).
        let guard = timeout + Duration::from_secs(60);
        let readers: Vec<_> = stalled
            .into_iter()
            .map(|mut s| {
                tokio::spawn(async move {
                    let (out, closed) = read_to_close(&mut s, guard).await;
                    (closed, error_codes(&backend_frames(&out)))
                })
            })
            .collect();
        for (i, r) in readers.into_iter().enumerate() {
            let (closed, codes) = r.await.unwrap();
            assert!(
                closed,
                "stalled client {i} was still open {guard:?} after the ordinary client was \
                 served (startup_timeout {timeout:?})"
            );
            assert!(codes.is_empty(), "stalled client {i}: {codes:?}");
        }
        gauge_back_to(&p, baseline).await;
        // Each close is counted as a protocol rejection (maybe just after the gauge went down).
        eventually(
            &format!("{REFUSED} to count all {count} stalled clients"),
            Duration::from_secs(60),
            || async { metric(&p, REFUSED).await - refused_before >= count as f64 },
        )
        .await;
        assert_eq!(metric(&p, REFUSED).await - refused_before, count as f64);
        assert_serves(&p).await;
        p.shutdown().await;
    });
}

/// This process's resident set size, in bytes (pgnear runs inside it).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

#[test]
fn a_client_that_stops_reading_a_huge_result_keeps_pgnear_memory_bounded() {
    let _serial = serial();
    run(async {
        let p = proxy(PRIMARY, trust).await;
        let admin = primary_admin().await;
        assert_serves(&p).await;
        let baseline = rss();
        // About 2 GB of rows; the client reads none of them.
        let sql = "SELECT repeat('x', 1000) FROM generate_series(1, 2000000) AS slow_reader";
        let (mut s, key) = startup(p.addr(), &[]).await;
        s.write_all(&query_msg(sql)).await.unwrap();
        // The server ends up blocked writing to pgnear: back-pressure reached it.
        let blocked = || async {
            admin
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%AS slow_reader' \
                     AND wait_event = 'ClientWrite' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .is_some()
        };
        eventually(
            "the server to block on ClientWrite",
            Duration::from_secs(30),
            blocked,
        )
        .await;
        let mut peak = 0u64;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            peak = peak.max(rss().saturating_sub(baseline));
        }
        assert!(blocked().await, "the server is still held back");
        eprintln!(
            "slow reader: pgnear's process grew by {} KiB at most while the server was held back",
            peak / 1024
        );
        assert!(peak < 64 << 20, "memory grew by {peak} bytes");
        // End the query cleanly: a cancel through pgnear, then read what was already in
        // flight up to the 57014 and ReadyForQuery; the session then goes on.
        let mut cancel = TcpStream::connect(p.addr()).await.unwrap();
        let mut packet = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        packet.extend_from_slice(&key);
        cancel.write_all(&packet).await.unwrap();
        let _ = read_to_close(&mut cancel, HANG).await;
        let mut drained = 0usize;
        let mut codes = Vec::new();
        loop {
            let (tag, body) = read_frame(&mut s).await;
            drained += body.len() + 5;
            match tag {
                b'E' => codes.push(error_field(&body, b'C').unwrap()),
                b'Z' => break,
                _ => {}
            }
        }
        eprintln!(
            "slow reader: {} KiB were in flight after the cancel",
            drained / 1024
        );
        assert_eq!(codes, ["57014"]);
        assert!(drained < 256 << 20, "{drained} bytes after the cancel");
        s.write_all(&query_msg("SELECT 1")).await.unwrap();
        assert_eq!(tags(&until_ready(&mut s).await), "TDCZ");
        s.write_all(&frame(b'X', &[])).await.unwrap();
        assert!(read_to_close(&mut s, HANG).await.1);
        eventually("the huge query to be gone", Duration::from_secs(10), || async {
            admin
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%AS slow_reader' AND state = 'active' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .is_none()
        })
        .await;
        p.shutdown().await;
    });
}

#[test]
fn a_client_vanishing_mid_copy_from_leaves_nothing_behind() {
    let _serial = serial();
    run(async {
        on_primary("CREATE TABLE IF NOT EXISTS hostile_copy (id int PRIMARY KEY)").await;
        let admin = primary_admin().await;
        let direct = connect(&cluster().primary_url_from(PRIMARY)).await;
        for (mode, in_transaction, terminate) in [
            (PoolMode::Session, false, false),
            (PoolMode::Session, true, false),
            (PoolMode::Session, false, true),
            (PoolMode::Transaction, false, false),
            (PoolMode::Transaction, true, false),
            (PoolMode::Transaction, true, true),
        ] {
            {
                let t0 = Instant::now();
                let what = format!(
                    "{mode:?} mode, in a transaction: {in_transaction}, {}",
                    if terminate { "Terminate" } else { "vanishing" }
                );
                direct.batch_execute("TRUNCATE hostile_copy").await.unwrap();
                let p = proxy(PRIMARY, |c| {
                    trust(c);
                    c.pool.mode = mode;
                    c.pool.primary_size = 1;
                    c.pool.acquire_timeout = HumanDuration(Duration::from_secs(10));
                })
                .await;
                let (mut s, _) = startup(p.addr(), &[]).await;
                if in_transaction {
                    s.write_all(&query_msg("BEGIN; INSERT INTO hostile_copy VALUES (-1)"))
                        .await
                        .unwrap();
                    until_ready(&mut s).await;
                }
                s.write_all(&query_msg("COPY hostile_copy FROM STDIN"))
                    .await
                    .unwrap();
                let (tag, _) = read_frame(&mut s).await;
                assert_eq!(tag, b'G', "{what}: CopyInResponse");
                let mut data = Vec::new();
                for i in 0..1000 {
                    data.extend(frame(b'd', format!("{i}\n").as_bytes()));
                }
                // the last CopyData cut in the middle
                if terminate {
                    // a Terminate instead of CopyDone: the session ends, the COPY with it
                    data.extend(frame(b'X', &[]));
                    s.write_all(&data).await.unwrap();
                    let (_, closed) = read_to_close(&mut s, HANG).await;
                    assert!(closed, "{what}: no close after Terminate");
                } else {
                    // the last CopyData cut in the middle, then the client is gone
                    data.extend(&frame(b'd', b"1000\n1001\n")[..8]);
                    s.write_all(&data).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                drop(s);
                // The next client gets the pool's only connection (or a new one), clean.
                let c = connect(&url(&p)).await;
                let n: i64 = c
                    .query_one("SELECT count(*) FROM hostile_copy", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n, 0, "{what}: the abandoned COPY was rolled back");
                c.batch_execute("INSERT INTO hostile_copy VALUES (5000)")
                    .await
                    .unwrap();
                // (in session mode this client holds the only connection until it leaves)
                drop(c);
                let u = url(&p);
                let (ok, _, err) = tokio::task::spawn_blocking(move || {
                    psql(
                        &u,
                        &["-c", "COPY hostile_copy FROM STDIN"],
                        Some("1\n2\n3\n"),
                    )
                })
                .await
                .unwrap();
                assert!(ok, "{what}: {err}");
                let c = connect(&url(&p)).await;
                let n: i64 = c
                    .query_one("SELECT count(*) FROM hostile_copy", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n, 4, "{what}");
                drop(c);
                eventually(
                    "no backend left in a transaction or in COPY",
                    Duration::from_secs(10),
                    || async {
                        admin
                            .query_one(
                                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' \
                                 AND (state LIKE 'idle in transaction%' \
                                 OR (state = 'active' AND query LIKE 'COPY%'))",
                                &[],
                            )
                            .await
                            .unwrap()
                            .get::<_, i64>(0)
                            == 0
                    },
                )
                .await;
                p.shutdown().await;
                eprintln!("{what}: {:?}", t0.elapsed());
            }
        }
    });
}

#[test]
fn statements_pipelined_before_terminate_are_run_and_answered() {
    let _serial = serial();
    run(async {
        on_primary("CREATE TABLE IF NOT EXISTS hostile_terminate (a int)").await;
        for region in [PRIMARY, REPLICA] {
            let p = proxy(region, trust).await;
            let (mut s, _) = startup(p.addr(), &[]).await;
            s.write_all(&[query_msg("SELECT 1"), frame(b'X', &[])].concat())
                .await
                .unwrap();
            let (out, closed) = read_to_close(&mut s, HANG).await;
            assert!(closed);
            assert_eq!(tags(&backend_frames(&out)), "TDCZ", "{region}: {out:?}");
            p.shutdown().await;
        }
        let p = proxy(REPLICA, trust).await;
        let (mut s, _) = startup(p.addr(), &[]).await;
        let mut bytes = query_msg("INSERT INTO hostile_terminate VALUES (1)");
        bytes.extend(parse_msg(
            "",
            "INSERT INTO hostile_terminate VALUES ($1::int)",
        ));
        bytes.extend(bind_msg("", "", &["2"]));
        bytes.extend(execute_msg(""));
        bytes.extend(sync_msg());
        bytes.extend(query_msg("SELECT count(*) FROM hostile_terminate"));
        bytes.extend(frame(b'X', &[]));
        s.write_all(&bytes).await.unwrap();
        let (out, closed) = read_to_close(&mut s, HANG).await;
        assert!(closed);
        let frames = backend_frames(&out);
        assert_eq!(tags(&frames), "CZ12CZTDCZ", "{frames:?}");
        let direct = connect(&cluster().primary_url_from(PRIMARY)).await;
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM hostile_terminate WHERE a IN (1, 2)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 2, "both INSERTs sent before Terminate ran");
        p.shutdown().await;
    });
}
