//! A userspace TCP relay that simulates distance: it listens (on `127.0.0.1:0` unless told
//! otherwise) and forwards every accepted connection to a target, adding a one-way delay in each
//! direction.
//!
//! It models latency, not bandwidth. Each direction of a connection has a reader, which stamps
//! every chunk it reads with `now + delay` and queues it (at most [`MAX_IN_FLIGHT`] bytes queued
//! per direction: back-pressure), and a writer, which sleeps until the first queued chunk is due
//! and then writes every chunk already due in one write. Chunks stay in order, and a chunk never
//! waits for more than its own delay behind earlier ones. Reader and writer are two futures
//! joined inside the connection's task, so aborting that task closes everything at once.
//!
//! A new connection also pays the TCP handshake's round trip: the relay "connects" to the
//! target `2 × delay` after accepting, so the client's first bytes arrive `3 × delay` after it
//! connected, as over a real link.
//!
//! While the delay is zero a direction forwards each read directly (one read, one write, as
//! `tokio::io::copy` does, 64 KiB at a time). `copy_bidirectional` itself is not used because a
//! partition or a later `set_delay` must also reach connections that are already open: a direct
//! direction switches to the delayed path at its next chunk once the delay becomes non-zero.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Bytes read per chunk.
const CHUNK: usize = 64 * 1024;
/// Bytes queued (read but not yet written) per direction before reading pauses.
pub const MAX_IN_FLIGHT: usize = 4 * 1024 * 1024;
/// Upper bound on one batched write.
const MAX_BATCH: usize = 1024 * 1024;

/// A latency relay; see the module docs. Dropping it stops accepting and closes every connection.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

struct Shared {
    delay_nanos: AtomicU64,
    target: Mutex<SocketAddr>,
    partitioned: watch::Sender<bool>,
    conns: Mutex<HashMap<u64, AbortHandle>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_nanos.load(Ordering::Relaxed))
    }

    /// Returns once the relay is not partitioned.
    async fn healed(&self) {
        if !*self.partitioned.borrow() {
            return;
        }
        let mut rx = self.partitioned.subscribe();
        // The sender lives as long as `self`, so this only returns once healed.
        let _ = rx.wait_for(|on| !*on).await;
    }
}

impl Relay {
    /// Listens on `127.0.0.1:0` and forwards to `target` with `one_way` delay each direction.
    pub async fn start(target: SocketAddr, one_way: Duration) -> io::Result<Relay> {
        Relay::start_on((Ipv4Addr::LOCALHOST, 0).into(), target, one_way).await
    }

    /// Like [`Relay::start`], listening on `bind` (e.g. another loopback address, or a port
    /// another relay already uses on a different address).
    pub async fn start_on(
        bind: SocketAddr,
        target: SocketAddr,
        one_way: Duration,
    ) -> io::Result<Relay> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            delay_nanos: AtomicU64::new(nanos(one_way)),
            target: Mutex::new(target),
            partitioned: watch::Sender::new(false),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone())).abort_handle();
        Ok(Relay {
            addr,
            shared,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the one-way delay, for new chunks on open connections and for new connections.
    pub fn set_delay(&self, one_way: Duration) {
        self.shared
            .delay_nanos
            .store(nanos(one_way), Ordering::Relaxed);
    }

    /// The current one-way delay.
    pub fn delay(&self) -> Duration {
        self.shared.delay()
    }

    /// Sends new connections to `target` (open ones stay where they are).
    pub fn set_target(&self, target: SocketAddr) {
        *lock(&self.shared.target) = target;
    }

    /// Where new connections go.
    pub fn target(&self) -> SocketAddr {
        *lock(&self.shared.target)
    }

    /// `true`: connections are still accepted but nothing is forwarded either way (bytes are
    /// held, up to the per-direction bound, and new connections do not reach the target);
    /// open connections stall too. `false`: everything held is delivered and traffic resumes.
    pub fn partition(&self, on: bool) {
        self.shared.partitioned.send_replace(on);
    }

    /// Whether the relay is partitioned.
    pub fn is_partitioned(&self) -> bool {
        *self.shared.partitioned.borrow()
    }

    /// Closes every current connection, both sides, now.
    pub fn cut(&self) {
        let handles: Vec<AbortHandle> = lock(&self.shared.conns).drain().map(|(_, h)| h).collect();
        for handle in handles {
            handle.abort();
        }
    }

    /// Connections currently open through the relay.
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("addr", &self.addr)
            .field("target", &self.target())
            .field("delay", &self.delay())
            .field("partitioned", &self.is_partitioned())
            .field("connections", &self.connections())
            .finish()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Removes the connection from the registry when its task ends or is aborted.
struct Registered {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.shared.conns).remove(&self.id);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                // Hold the lock while spawning so the task cannot unregister before it is registered.
                let mut conns = lock(&shared.conns);
                let registered = Registered {
                    id,
                    shared: shared.clone(),
                };
                let task = tokio::spawn(connection(client, registered));
                conns.insert(id, task.abort_handle());
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::debug!("lab relay: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn connection(client: TcpStream, registered: Registered) {
    let shared = registered.shared.clone();
    let _ = client.set_nodelay(true);
    shared.healed().await;
    let handshake = shared.delay() * 2;
    if !handshake.is_zero() {
        tokio::time::sleep(handshake).await;
        shared.healed().await;
    }
    let target = *lock(&shared.target);
    let upstream = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("lab relay: connecting to {target} failed: {e}");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (client_rd, client_wr) = client.into_split();
    let (upstream_rd, upstream_wr) = upstream.into_split();
    // An error in either direction drops both: the connection closes on both sides.
    let result = tokio::try_join!(
        pump(client_rd, upstream_wr, &shared),
        pump(upstream_rd, client_wr, &shared)
    );
    if let Err(e) = result {
        tracing::debug!("lab relay: connection to {target} ended: {e}");
    }
    drop(registered);
}

/// One direction: direct while the delay is zero, delayed from the first chunk read with a
/// non-zero delay on.
async fn pump(mut rd: OwnedReadHalf, mut wr: OwnedWriteHalf, shared: &Shared) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = rd.read(&mut buf).await?;
        let read_at = Instant::now();
        let delay = shared.delay();
        if !delay.is_zero() {
            let first = Chunk::new(read_at + delay, buf[..n].to_vec());
            return delayed(rd, wr, shared, buf, first).await;
        }
        shared.healed().await;
        if n == 0 {
            wr.shutdown().await?;
            return Ok(());
        }
        wr.write_all(&buf[..n]).await?;
    }
}

/// A chunk of bytes and when to deliver it; empty bytes mean end of stream (deliver a FIN).
struct Chunk {
    due: Instant,
    bytes: Vec<u8>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Chunk {
    fn new(due: Instant, bytes: Vec<u8>) -> Chunk {
        Chunk {
            due,
            bytes,
            _permit: None,
        }
    }

    fn is_eof(&self) -> bool {
        self.bytes.is_empty()
    }
}

async fn delayed(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    shared: &Shared,
    mut buf: Vec<u8>,
    mut first: Chunk,
) -> io::Result<()> {
    let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();

    let reader = async move {
        let mut eof = first.is_eof();
        first._permit = Some(take_budget(&budget, first.bytes.len()).await?);
        let _ = tx.send(first);
        while !eof {
            let n = rd.read(&mut buf).await?;
            let due = Instant::now() + shared.delay();
            eof = n == 0;
            let mut chunk = Chunk::new(due, buf[..n].to_vec());
            chunk._permit = Some(take_budget(&budget, n).await?);
            if tx.send(chunk).is_err() {
                break; // the writer is gone (it failed; try_join reports that)
            }
        }
        Ok::<(), io::Error>(())
    };

    let writer = async move {
        let mut batch: Vec<u8> = Vec::with_capacity(CHUNK);
        let mut next: Option<Chunk> = None;
        loop {
            let chunk = match next.take() {
                Some(c) => c,
                None => match rx.recv().await {
                    Some(c) => c,
                    None => return Ok(()),
                },
            };
            tokio::time::sleep_until(chunk.due).await;
            shared.healed().await;
            if chunk.is_eof() {
                wr.shutdown().await?;
                return Ok(());
            }
            // Batch everything else that is already due into one write.
            let now = Instant::now();
            batch.clear();
            batch.extend_from_slice(&chunk.bytes);
            let mut held = vec![chunk];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) if c.due <= now && !c.is_eof() => {
                        batch.extend_from_slice(&c.bytes);
                        held.push(c);
                    }
                    Ok(c) => {
                        next = Some(c);
                        break;
                    }
                    Err(_) => break,
                }
            }
            wr.write_all(&batch).await?;
            drop(held); // releases their budget
        }
    };

    tokio::try_join!(reader, writer).map(drop)
}

async fn take_budget(budget: &Arc<Semaphore>, bytes: usize) -> io::Result<OwnedSemaphorePermit> {
    let n = u32::try_from(bytes.min(MAX_IN_FLIGHT)).unwrap_or(u32::MAX);
    budget
        .clone()
        .acquire_many_owned(n)
        .await
        .map_err(|_| io::Error::other("relay budget closed"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::timeout;

    /// An echo server; each connection first receives `banner` (if any).
    async fn echo_server(banner: Option<u8>) -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    if let Some(b) = banner {
                        s.write_all(&[b]).await.unwrap();
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Duration {
        let t = Instant::now();
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
        t.elapsed()
    }

    async fn connect(relay: &Relay) -> TcpStream {
        let s = TcpStream::connect(relay.addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delay_is_a_lower_bound_each_way() {
        let relay = Relay::start(echo_server(None).await, Duration::from_millis(30))
            .await
            .unwrap();
        let mut s = connect(&relay).await;
        // first exchange also pays the simulated handshake: 2 × 30 + 2 × 30
        let first = roundtrip(&mut s, b"hello").await;
        assert!(first >= Duration::from_millis(120), "{first:?}");
        for _ in 0..3 {
            let rtt = roundtrip(&mut s, b"ping").await;
            assert!(rtt >= Duration::from_millis(60), "{rtt:?}");
        }
        assert_eq!(relay.connections(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zero_delay_forwards_and_later_delay_applies_to_open_connections() {
        let relay = Relay::start(echo_server(None).await, Duration::ZERO)
            .await
            .unwrap();
        let mut s = connect(&relay).await;
        roundtrip(&mut s, b"fast").await;
        relay.set_delay(Duration::from_millis(40));
        let rtt = roundtrip(&mut s, b"slow").await;
        assert!(rtt >= Duration::from_millis(80), "{rtt:?}");
        relay.set_delay(Duration::ZERO);
        roundtrip(&mut s, b"fast again").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_small_chunks_stay_in_order() {
        let relay = Relay::start(echo_server(None).await, Duration::from_millis(5))
            .await
            .unwrap();
        let s = connect(&relay).await;
        let (mut r, mut w) = s.into_split();
        const N: u32 = 20_000;
        let writer = tokio::spawn(async move {
            for i in 0..N {
                w.write_all(&i.to_be_bytes()).await.unwrap();
                if i % 97 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        timeout(Duration::from_secs(60), r.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), N as usize * 4);
        for (i, word) in got.chunks(4).enumerate() {
            assert_eq!(u32::from_be_bytes(word.try_into().unwrap()), i as u32);
        }
    }

    /// Deterministic pseudo-random bytes.
    fn pattern(seed: u64, buf: &mut [u8]) -> u64 {
        let mut x = seed;
        for b in buf {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
        x
    }

    async fn large_transfer(delay: Duration) {
        let relay = Relay::start(echo_server(None).await, delay).await.unwrap();
        let s = connect(&relay).await;
        let (mut r, mut w) = s.into_split();
        const TOTAL: usize = 50 * 1024 * 1024;
        let writer = tokio::spawn(async move {
            let mut seed = 7;
            let mut buf = vec![0u8; 100_000];
            let mut sent = 0;
            while sent < TOTAL {
                let n = buf.len().min(TOTAL - sent);
                seed = pattern(seed, &mut buf[..n]);
                w.write_all(&buf[..n]).await.unwrap();
                sent += n;
            }
            w.shutdown().await.unwrap();
        });
        let reader = async {
            let mut seed = 7;
            let mut expected = vec![0u8; 100_000];
            let mut exp_len = 0;
            let mut exp_pos = 0;
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0;
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                let mut i = 0;
                while i < n {
                    if exp_pos == exp_len {
                        exp_len = expected.len().min(TOTAL - total);
                        assert!(exp_len > 0, "more bytes than sent");
                        seed = pattern(seed, &mut expected[..exp_len]);
                        exp_pos = 0;
                    }
                    let take = (n - i).min(exp_len - exp_pos);
                    assert_eq!(
                        &buf[i..i + take],
                        &expected[exp_pos..exp_pos + take],
                        "corrupt at byte {total}"
                    );
                    i += take;
                    exp_pos += take;
                    total += take;
                }
            }
            total
        };
        let total = timeout(Duration::from_secs(120), reader).await.unwrap();
        writer.await.unwrap();
        assert_eq!(total, TOTAL);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_transfer_is_intact_with_delay() {
        large_transfer(Duration::from_millis(2)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_transfer_is_intact_without_delay() {
        large_transfer(Duration::ZERO).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partition_holds_bytes_and_heals() {
        for delay in [Duration::ZERO, Duration::from_millis(10)] {
            let relay = Relay::start(echo_server(None).await, delay).await.unwrap();
            let mut s = connect(&relay).await;
            roundtrip(&mut s, b"before").await;
            relay.partition(true);
            s.write_all(b"held").await.unwrap();
            let mut back = [0u8; 4];
            let stalled = timeout(Duration::from_millis(300), s.read_exact(&mut back)).await;
            assert!(stalled.is_err(), "delivered during a partition");
            // a new connection is accepted but reaches nothing
            let mut s2 = connect(&relay).await;
            s2.write_all(b"new").await.unwrap();
            relay.partition(false);
            timeout(Duration::from_secs(5), s.read_exact(&mut back))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&back, b"held");
            let mut back2 = [0u8; 3];
            timeout(Duration::from_secs(5), s2.read_exact(&mut back2))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&back2, b"new");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cut_closes_open_connections() {
        let relay = Relay::start(echo_server(None).await, Duration::from_millis(1))
            .await
            .unwrap();
        let mut a = connect(&relay).await;
        let mut b = connect(&relay).await;
        roundtrip(&mut a, b"a").await;
        roundtrip(&mut b, b"b").await;
        assert_eq!(relay.connections(), 2);
        relay.cut();
        assert_eq!(relay.connections(), 0);
        for s in [&mut a, &mut b] {
            let mut buf = [0u8; 1];
            let r = timeout(Duration::from_secs(2), s.read(&mut buf))
                .await
                .unwrap();
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        }
        // the relay itself keeps working
        let mut c = connect(&relay).await;
        roundtrip(&mut c, b"c").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn set_target_moves_new_connections() {
        let relay = Relay::start(echo_server(Some(b'A')).await, Duration::ZERO)
            .await
            .unwrap();
        let mut a = connect(&relay).await;
        let mut byte = [0u8; 1];
        // Read A's greeting first: the relay accepts asynchronously, so only now is `a` known to
        // be attached to the first target.
        a.read_exact(&mut byte).await.unwrap();
        assert_eq!(byte[0], b'A');
        relay.set_target(echo_server(Some(b'B')).await);
        let mut b = connect(&relay).await;
        b.read_exact(&mut byte).await.unwrap();
        assert_eq!(byte[0], b'B');
        roundtrip(&mut a, b"still A").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_closes_everything() {
        let relay = Relay::start(echo_server(None).await, Duration::ZERO)
            .await
            .unwrap();
        let addr = relay.addr();
        let mut s = connect(&relay).await;
        roundtrip(&mut s, b"x").await;
        drop(relay);
        let mut buf = [0u8; 1];
        let r = timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        // the listener goes away once the accept task is dropped
        let mut refused = false;
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused);
    }
}
