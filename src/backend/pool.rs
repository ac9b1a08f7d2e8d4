//! Server connection pools, one per upstream. A pool bounds the connections open to its upstream
//! (`primary_size` / `replica_size`, all roles and databases together), keeps idle ones per
//! role and database (`Target`) for the next session, keeps `min_idle` of them warm for the
//! URL's role and database, and retires those idle past `idle_timeout`, older than
//! `max_lifetime`, or closed by the server. When the pool is full and several roles use it, a
//! role that has its fair share open (the size divided among them) waits for one of its own;
//! the others have idle connections of other targets closed to make room.
//!
//! Connections are opened without the client's startup parameters: sessions apply their own
//! settings with SET (see `session::state`), so any client can use any connection of its
//! role and database. Connections to an address that has left the upstream's DNS answer are retired
//! when next looked at. What a connection carries between sessions (the settings applied, the prepared
//! statements it has) travels with it as `Carry`.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::conn::{ServerConn, Upstream};
use super::login::Login;
use crate::config::PoolConfig;
use crate::error::{ErrorKind, PgError};
use crate::metrics::PoolMetrics;
use crate::protocol::backend as be;
use crate::role::Role;
use crate::shutdown::Shutdown;
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

impl Carry {
    /// What it has applied is no longer known (settings committed outside any session's log):
    /// whoever uses it next resets them all (no log starts with this entry).
    pub fn forget_applied(&mut self) {
        self.applied = vec![(None, String::new())];
    }
}

/// Whom a server connection is for: the role it logs in as, and its database.
#[derive(Clone, Debug)]
pub struct Target {
    pub login: Arc<Login>,
    pub database: Arc<str>,
    /// Role and database together: the key of its idle connections.
    key: Arc<str>,
}

impl Target {
    pub fn new(login: Arc<Login>, database: &str) -> Target {
        let key = format!("{}\0{database}", login.user).into();
        Target {
            login,
            database: database.into(),
            key,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn user(&self) -> &str {
        &self.login.user
    }
}

/// A server connection out of its pool. Dropping it closes the connection and frees its slot.
pub struct Pooled {
    pub conn: ServerConn,
    pub carry: Carry,
    pub target: Target,
    created: Instant,
    _permit: OwnedSemaphorePermit,
    _share: Share,
}

/// A role's use of the pool.
#[derive(Default)]
struct RoleUse {
    open: AtomicUsize,
    waits: AtomicU64,
}

/// Counts a connection in its role's share of the pool while it is open. Closing it wakes the
/// sessions waiting for their role's share to have room.
struct Share {
    role: Arc<RoleUse>,
    returned: Arc<Notify>,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.role.open.fetch_sub(1, Ordering::Relaxed);
        self.returned.notify_waiters();
    }
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
    /// Per target key.
    idle: HashMap<Arc<str>, Vec<Idle>>,
    /// The ParameterStatus set of the last connection opened per target key: new clients are
    /// answered from it without waiting for a server.
    params: HashMap<Arc<str>, Arc<[(String, String)]>>,
    /// Per role.
    roles: HashMap<String, Arc<RoleUse>>,
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
    returned: Arc<Notify>,
    metrics: PoolMetrics,
    shutdown: Shutdown,
    /// The URL's role and database, kept warm (`min_idle`).
    home: Target,
}

impl Pool {
    /// Creates the pool and starts its maintenance task (stops when `shutdown` turns true).
    pub fn spawn(
        upstream: Arc<Upstream>,
        home: Arc<Login>,
        config: PoolConfig,
        metrics: PoolMetrics,
        shutdown: Shutdown,
    ) -> Arc<Pool> {
        let size = match upstream.role {
            Role::Primary => config.primary_size,
            Role::Replica => config.replica_size,
        };
        let upstream_database = upstream.url.database.clone();
        let pool = Arc::new(Pool {
            size,
            upstream,
            config,
            permits: Arc::new(Semaphore::new(size)),
            inner: Mutex::default(),
            returned: Arc::default(),
            metrics,
            shutdown: shutdown.clone(),
            home: Target::new(home, &upstream_database),
        });
        tokio::spawn(pool.clone().maintain(shutdown));
        pool
    }

    fn m(&self) -> &PoolMetrics {
        &self.metrics
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing under this lock can panic half-way through an update.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server parameters a client of `target` is told at startup, if known.
    pub fn cached_params(&self, target: &Target) -> Option<Arc<[(String, String)]>> {
        self.inner().params.get(target.key()).cloned()
    }

    /// Closes the idle connections to `database` and keeps the pool off it (no connection
    /// opened, none kept idle) until the fence is dropped: a client's `DROP DATABASE`, rename
    /// or copy of it as a template fails while any other session is connected to it.
    pub fn fence(self: &Arc<Self>, database: &str) -> Fence {
        let closed = {
            let mut inner = self.inner();
            *inner.fenced.entry(database.to_string()).or_default() += 1;
            let mut closed = Vec::new();
            inner.idle.retain(|_, list| {
                if list
                    .first()
                    .is_some_and(|i| &*i.pooled.target.database == database)
                {
                    closed.append(list);
                }
                !list.is_empty()
            });
            closed
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

    /// A connection for `target`: an idle one if there is one, else a new one while the pool
    /// has room, else (within the role's share: see `within_share`) the next one returned or
    /// made room for. 53300 after `acquire_timeout`.
    pub async fn acquire(&self, target: &Target) -> Result<Pooled, PgError> {
        let database = &*target.database;
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.config.acquire_timeout.0);
        let mut counted = false;
        let got = loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if self.is_fenced(database) {
                // A statement on this database is running: wait until it ends.
                self.waiting(target, &mut counted);
                tokio::select! {
                    _ = returned => continue,
                    _ = tokio::time::sleep_until(deadline) => break Err(self.timed_out()),
                }
            }
            if let Some(p) = self.take_idle(target) {
                break Ok(p);
            }
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                break self.open(target, permit).await;
            }
            // The pool is full. A role with its share open waits for one of its own (or for
            // room); the others may close another target's idle connection to make room.
            if !self.within_share(target) {
                self.waiting(target, &mut counted);
                tokio::select! {
                    _ = returned => continue,
                    _ = tokio::time::sleep_until(deadline) => break Err(self.timed_out()),
                }
            }
            if self.evict_other(target) {
                continue;
            }
            self.waiting(target, &mut counted);
            tokio::select! {
                permit = self.permits.clone().acquire_owned() => {
                    let permit = permit.expect("the pool's semaphore is never closed");
                    break self.open(target, permit).await;
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

    /// Counts a session's wait for a connection, once per `acquire`.
    fn waiting(&self, target: &Target, counted: &mut bool) {
        if !std::mem::replace(counted, true) {
            self.role_use(target).waits.fetch_add(1, Ordering::Relaxed);
        }
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

    /// Whether `target`'s role may open another connection: it has fewer than its fair share,
    /// the pool's size divided among the roles with connections open (itself included). Alone,
    /// its share is the whole pool.
    fn within_share(&self, target: &Target) -> bool {
        let inner = self.inner();
        let mine = inner
            .roles
            .get(target.user())
            .map_or(0, |r| r.open.load(Ordering::Relaxed));
        let others = inner
            .roles
            .iter()
            .filter(|(user, r)| {
                user.as_str() != target.user() && r.open.load(Ordering::Relaxed) > 0
            })
            .count();
        others == 0 || mine < self.size.div_ceil(others + 1)
    }

    fn role_use(&self, target: &Target) -> Arc<RoleUse> {
        let mut inner = self.inner();
        match inner.roles.get(target.user()) {
            Some(r) => r.clone(),
            None => inner
                .roles
                .entry(target.user().to_string())
                .or_default()
                .clone(),
        }
    }

    /// Each role's connections open and waits so far.
    pub fn roles(&self) -> Vec<crate::metrics::RoleFigures> {
        let inner = self.inner();
        let mut roles: Vec<_> = inner
            .roles
            .iter()
            .map(|(role, r)| crate::metrics::RoleFigures {
                role: role.clone(),
                open: r.open.load(Ordering::Relaxed),
                waits: r.waits.load(Ordering::Relaxed),
            })
            .collect();
        roles.sort_by(|a, b| a.role.cmp(&b.role));
        roles
    }

    async fn open(&self, target: &Target, permit: OwnedSemaphorePermit) -> Result<Pooled, PgError> {
        let role = self.role_use(target);
        role.open.fetch_add(1, Ordering::Relaxed);
        let share = Share {
            role,
            returned: self.returned.clone(),
        };
        let login = if target.login.url {
            &self.upstream.login
        } else {
            &target.login
        };
        let conn = self.upstream.connect(login, &target.database, &[]).await?;
        self.m().connects.inc();
        self.inner()
            .params
            .insert(target.key.clone(), conn.params.clone().into());
        Ok(Pooled {
            conn,
            carry: Carry::default(),
            target: target.clone(),
            created: Instant::now(),
            _permit: permit,
            _share: share,
        })
    }

    /// The most recently returned live idle connection for `target`.
    fn take_idle(&self, target: &Target) -> Option<Pooled> {
        let mut inner = self.inner();
        let list = inner.idle.get_mut(target.key())?;
        while let Some(idle) = list.pop() {
            if self.usable(&idle.pooled) {
                return Some(idle.pooled);
            }
        }
        None
    }

    /// Closes one idle connection of another target to make room; false when there is none.
    fn evict_other(&self, target: &Target) -> bool {
        let mut inner = self.inner();
        let victim = inner
            .idle
            .iter_mut()
            .filter(|(key, list)| &***key != target.key() && !list.is_empty())
            .map(|(_, list)| list)
            .next()
            .and_then(|list| (!list.is_empty()).then(|| list.remove(0)));
        victim.is_some()
    }

    /// Not too old, still at an address that takes the upstream's connections (in DNS, the
    /// primary among its hosts), and not closed or spoken
    /// to by the server while idle: an idle connection has nothing to read, so readable means
    /// EOF or a FATAL message (checked without a round trip, by peeking at the socket).
    fn usable(&self, p: &Pooled) -> bool {
        if p.created.elapsed() >= self.config.max_lifetime.0 || !self.upstream.takes(p.addr) {
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
        if self.shutdown.is_stopped() || self.is_fenced(&p.target.database) {
            self.terminate(p);
        } else if self.usable(&p) {
            let mut inner = self.inner();
            inner
                .idle
                .entry(p.target.key.clone())
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
    /// for the URL's role and database up to `min_idle`. On shutdown, close the idle
    /// connections.
    async fn maintain(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let home = self.home.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.stopped() => break,
            }
            let missing = {
                let mut inner = self.inner();
                for (key, list) in inner.idle.iter_mut() {
                    let keep = if **key == *home.key() {
                        self.config.min_idle
                    } else {
                        0
                    };
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
                inner.idle.retain(|_, list| !list.is_empty());
                let idle_home = inner.idle.get(home.key()).map_or(0, Vec::len);
                self.config.min_idle.saturating_sub(idle_home)
            };
            let missing = if self.is_fenced(&home.database) {
                0
            } else {
                missing
            };
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
