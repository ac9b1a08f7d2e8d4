//! Server connection pools, one per upstream. A pool bounds the connections open to its upstream
//! (`primary_size` / `replica_size`, all databases together), keeps idle ones per database for
//! the next session, keeps `min_idle` of them warm for the URL's database, and retires those
//! idle past `idle_timeout`, older than `max_lifetime`, or closed by the server.
//!
//! Connections are opened without the client's startup parameters: sessions apply their own
//! settings with SET (see `session::state`), so any client can use any connection of its
//! database. Connections to an address that has left the upstream's DNS answer are retired
//! when next looked at. What a connection carries between sessions (the settings applied, the prepared
//! statements it has) travels with it as `Carry`.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::conn::{ServerConn, Upstream};
use crate::admin::metrics::PoolMetrics;
use crate::config::PoolConfig;
use crate::error::{ErrorKind, PgError};
use crate::protocol::backend as be;
use crate::tls::Stream;

/// How often the maintenance task looks at idle connections.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(1);

/// What a server connection carries from one session to the next.
#[derive(Debug, Default, Clone)]
pub struct Carry {
    /// The session settings applied on it, as (name, SQL) in the order they were applied.
    pub applied: Vec<(Option<String>, String)>,
    /// Prepared statements it has (transaction mode's shared `pgnear_<hash>` names), with the
    /// tick of their last use, for LRU eviction.
    pub prepared: HashMap<String, u64>,
    /// Use counter for `prepared`.
    pub tick: u64,
}

/// A server connection out of its pool. Dropping it closes the connection and frees its slot.
pub struct Pooled {
    pub conn: ServerConn,
    pub carry: Carry,
    database: String,
    created: Instant,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for Pooled {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        &self.conn
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut ServerConn {
        &mut self.conn
    }
}

struct Idle {
    pooled: Pooled,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    idle: HashMap<String, Vec<Idle>>,
    /// The ParameterStatus set of the last connection opened per database: new clients are
    /// answered from it without waiting for a server.
    params: HashMap<String, Arc<[(String, String)]>>,
    /// Databases no connection may be opened to or kept idle on (see `Pool::fence`), with the
    /// number of fences on each.
    fenced: HashMap<String, usize>,
}

pub struct Pool {
    upstream: Arc<Upstream>,
    /// Connections it may have open: `primary_size` or `replica_size`.
    size: usize,
    config: PoolConfig,
    permits: Arc<Semaphore>,
    inner: Mutex<Inner>,
    returned: Notify,
    metrics: Arc<crate::admin::metrics::Metrics>,
    shutdown: watch::Receiver<bool>,
}

impl Pool {
    /// Creates the pool and starts its maintenance task (stops when `shutdown` turns true).
    pub fn spawn(
        upstream: Arc<Upstream>,
        config: PoolConfig,
        metrics: Arc<crate::admin::metrics::Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Pool> {
        let size = match upstream.role {
            super::conn::Role::Primary => config.primary_size,
            super::conn::Role::Replica => config.replica_size,
        };
        let pool = Arc::new(Pool {
            size,
            upstream,
            config,
            permits: Arc::new(Semaphore::new(size)),
            inner: Mutex::default(),
            returned: Notify::new(),
            metrics,
            shutdown: shutdown.clone(),
        });
        tokio::spawn(pool.clone().maintain(shutdown));
        pool
    }

    fn m(&self) -> &PoolMetrics {
        self.metrics.pool(self.upstream.role)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing under this lock can panic half-way through an update.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server parameters a client of `database` is told at startup, if known.
    pub fn cached_params(&self, database: &str) -> Option<Arc<[(String, String)]>> {
        self.inner().params.get(database).cloned()
    }

    /// Closes the idle connections to `database` and keeps the pool off it (no connection
    /// opened, none kept idle) until the fence is dropped: a client's `DROP DATABASE`, rename
    /// or copy of it as a template fails while any other session is connected to it.
    pub fn fence(self: &Arc<Self>, database: &str) -> Fence {
        let closed = {
            let mut inner = self.inner();
            *inner.fenced.entry(database.to_string()).or_default() += 1;
            inner.idle.remove(database).unwrap_or_default()
        };
        if !closed.is_empty() {
            tracing::debug!(
                upstream = self.upstream.role.name(),
                database,
                closed = closed.len(),
                "idle connections closed for a statement on their database"
            );
        }
        for idle in closed {
            self.terminate(idle.pooled);
        }
        self.gauges();
        Fence {
            pool: self.clone(),
            database: database.to_string(),
        }
    }

    fn is_fenced(&self, database: &str) -> bool {
        self.inner().fenced.contains_key(database)
    }

    /// Ends a connection at once (Terminate, then close) and frees its slot.
    fn terminate(&self, mut p: Pooled) {
        tokio::spawn(async move {
            let _ = p.conn.stream.write_all(TERMINATE).await;
        });
        self.returned.notify_one();
    }

    /// A connection to `database`: an idle one if there is one, else a new one while the pool
    /// has room, else the next one returned. 53300 after `acquire_timeout`.
    pub async fn acquire(&self, database: &str) -> Result<Pooled, PgError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.config.acquire_timeout.0);
        let got = loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if self.is_fenced(database) {
                // A statement on this database is running: wait until it ends.
                tokio::select! {
                    _ = returned => continue,
                    _ = tokio::time::sleep_until(deadline) => break Err(self.timed_out()),
                }
            }
            if let Some(p) = self.take_idle(database) {
                break Ok(p);
            }
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                break self.open(database, permit).await;
            }
            if self.evict_other(database) {
                continue;
            }
            tokio::select! {
                permit = self.permits.clone().acquire_owned() => {
                    let permit = permit.expect("the pool's semaphore is never closed");
                    break self.open(database, permit).await;
                }
                _ = returned => continue,
                _ = tokio::time::sleep_until(deadline) => break Err(self.timed_out()),
            }
        };
        self.m()
            .acquire_seconds
            .observe(started.elapsed().as_secs_f64());
        self.gauges();
        got
    }

    fn timed_out(&self) -> PgError {
        self.m().acquire_timeouts.inc();
        PgError::new(
            ErrorKind::Capacity,
            format!(
                "no {} server connection free within pool.acquire_timeout ({:?}): all {} are in use",
                self.upstream.role.name(),
                self.config.acquire_timeout.0,
                self.size,
            ),
        )
        .with_hint("Raise pool size or acquire_timeout, or use pool.mode = \"transaction\".")
    }

    async fn open(&self, database: &str, permit: OwnedSemaphorePermit) -> Result<Pooled, PgError> {
        let conn = self.upstream.connect(database, &[]).await?;
        self.m().connects.inc();
        self.inner()
            .params
            .insert(database.to_string(), conn.params.clone().into());
        Ok(Pooled {
            conn,
            carry: Carry::default(),
            database: database.to_string(),
            created: Instant::now(),
            _permit: permit,
        })
    }

    /// The most recently returned live idle connection to `database`.
    fn take_idle(&self, database: &str) -> Option<Pooled> {
        let mut inner = self.inner();
        let list = inner.idle.get_mut(database)?;
        while let Some(idle) = list.pop() {
            if self.usable(&idle.pooled) {
                return Some(idle.pooled);
            }
        }
        None
    }

    /// Closes one idle connection to another database to make room; false when there is none.
    fn evict_other(&self, database: &str) -> bool {
        let mut inner = self.inner();
        let victim = inner
            .idle
            .iter_mut()
            .filter(|(db, list)| db.as_str() != database && !list.is_empty())
            .map(|(_, list)| list)
            .next()
            .and_then(|list| (!list.is_empty()).then(|| list.remove(0)));
        victim.is_some()
    }

    /// Not too old, still at an address DNS gives for the upstream, and not closed or spoken
    /// to by the server while idle: an idle connection has nothing to read, so readable means
    /// EOF or a FATAL message (checked without a round trip, by peeking at the socket).
    fn usable(&self, p: &Pooled) -> bool {
        if p.created.elapsed() >= self.config.max_lifetime.0
            || !self.upstream.dns.is_current(p.addr)
        {
            return false;
        }
        let tcp = match &p.conn.stream {
            Stream::Plain(s) => s,
            Stream::Client(s) => s.get_ref().0,
            Stream::Server(s) => s.get_ref().0,
        };
        let mut byte = [MaybeUninit::<u8>::uninit()];
        matches!(
            socket2::SockRef::from(tcp).peek(&mut byte),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }

    /// Puts a connection back for the next session, after `DISCARD ALL` when `reset` (in the
    /// background: the session that returns it does not wait).
    pub fn release(self: &Arc<Self>, mut p: Pooled, reset: bool) {
        if !reset {
            self.put(p);
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let timeout = pool.upstream.connect_timeout;
            match tokio::time::timeout(timeout, discard_all(&mut p.conn)).await {
                Ok(Ok(())) => {
                    pool.m().resets.inc();
                    p.carry = Carry::default();
                    pool.put(p);
                }
                _ => {
                    tracing::debug!(
                        upstream = pool.upstream.role.name(),
                        "reset failed; connection closed"
                    );
                    drop(p);
                    pool.returned.notify_one();
                    pool.gauges();
                }
            }
        });
    }

    fn put(&self, p: Pooled) {
        if *self.shutdown.borrow() || self.is_fenced(&p.database) {
            self.terminate(p);
        } else if self.usable(&p) {
            let mut inner = self.inner();
            inner
                .idle
                .entry(p.database.clone())
                .or_default()
                .push(Idle {
                    pooled: p,
                    since: Instant::now(),
                });
        }
        self.returned.notify_one();
        self.gauges();
    }

    fn gauges(&self) {
        let idle: usize = self.inner().idle.values().map(Vec::len).sum();
        let open = self.size - self.permits.available_permits();
        self.m().idle.set(idle as i64);
        self.m().open.set(open as i64);
    }

    /// Every second: retire idle connections that timed out, aged or died; open connections
    /// for the URL's database up to `min_idle`. On shutdown, close the idle connections.
    async fn maintain(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let home = self.upstream.url.database.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::session::stopped(&mut shutdown) => break,
            }
            let missing = {
                let mut inner = self.inner();
                for (db, list) in inner.idle.iter_mut() {
                    let keep = if *db == home { self.config.min_idle } else { 0 };
                    let mut kept = 0;
                    // Newest last: keep the newest `keep` even when idle for long.
                    for i in (0..list.len()).rev() {
                        let idle = &list[i];
                        let timed_out =
                            kept >= keep && idle.since.elapsed() >= self.config.idle_timeout.0;
                        if timed_out || !self.usable(&idle.pooled) {
                            list.remove(i);
                        } else {
                            kept += 1;
                        }
                    }
                }
                let idle_home = inner.idle.get(&home).map_or(0, Vec::len);
                self.config.min_idle.saturating_sub(idle_home)
            };
            let missing = if self.is_fenced(&home) { 0 } else { missing };
            for _ in 0..missing {
                let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                    break;
                };
                match self.open(&home, permit).await {
                    Ok(p) => self.put(p),
                    Err(e) => {
                        tracing::debug!(error = %e, "warming the pool failed");
                        break;
                    }
                }
            }
            self.gauges();
        }
        let idle: Vec<Idle> = self.inner().idle.drain().flat_map(|(_, l)| l).collect();
        for mut i in idle {
            let _ = i.pooled.conn.stream.write_all(TERMINATE).await;
        }
        self.gauges();
    }
}

/// Keeps a pool off a database while it lives (see `Pool::fence`).
pub struct Fence {
    pool: Arc<Pool>,
    database: String,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fence({})", self.database)
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        let mut inner = self.pool.inner();
        if let Some(n) = inner.fenced.get_mut(&self.database) {
            *n -= 1;
            if *n == 0 {
                inner.fenced.remove(&self.database);
            }
        }
        drop(inner);
        self.pool.returned.notify_waiters();
    }
}

/// The Terminate message.
pub const TERMINATE: &[u8] = b"X\0\0\0\x04";

/// Runs `DISCARD ALL` and reads its answer, which must be exactly its CommandComplete and an
/// idle ReadyForQuery (with the ParameterStatus changes it causes, which are recorded):
/// anything else (an answer still owed to an earlier request, an error) means the connection
/// is not in the state pgnear believes, and it is closed instead of handed on.
async fn discard_all(conn: &mut ServerConn) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query("DISCARD ALL", &mut out)
        .expect("query text has no NUL");
    conn.stream.write_all(&out).await?;
    let mut buf = BytesMut::new();
    let mut completed = false;
    let unexpected =
        |what: &str| std::io::Error::other(format!("DISCARD ALL was answered with {what}"));
    loop {
        let (tag, body) = crate::protocol::read_frame(&mut conn.stream, &mut buf, 1 << 20).await?;
        match tag {
            be::PARAMETER_STATUS => {
                if let Some((name, value)) = be::parameter_status(&body) {
                    be::set_param(&mut conn.params, name, value);
                }
            }
            be::NOTICE_RESPONSE => {}
            be::COMMAND_COMPLETE if !completed && body.starts_with(b"DISCARD ALL\0") => {
                completed = true
            }
            be::READY_FOR_QUERY if completed && body.first() == Some(&b'I') => return Ok(()),
            other => return Err(unexpected(&format!("message type {}", other as char))),
        }
    }
}
