//! One task per client: owns the client socket, its server connections and its session state,
//! decides where each request goes and relays the answers back as raw frames.

mod answers;
mod batch;
mod consistent;
mod establish;
pub mod expect;
mod inband;
pub mod lane;
pub mod plan;
mod reader;
mod rename;
pub mod reported;
mod retry;
mod route;
pub mod server;
mod shared;
mod shared_read;
pub mod startup;
pub mod state;

pub use shared::Shared;

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use self::server::Server;
use self::state::SessionState;
use crate::backend::conn::send_cancel;
use crate::backend::health::SILENT_CHECK;
use crate::backend::pool::{Target, TERMINATE};
use crate::cancel::CancelKey;
use crate::config::PoolMode;
use crate::error::{ErrorKind, PgError};
use crate::lsn::Lsn;
use crate::protocol::frontend::next_frame;
use crate::protocol::{tag, write};
use crate::role::Role;
use crate::tls::Stream;

/// Client read-buffer growth step.
const CLIENT_CHUNK: usize = 8 * 1024;
/// A new session's first client read buffer: small, since most of an idle client's memory is
/// this buffer (10,000 idle clients must fit in 100 MB).
const CLIENT_FIRST_CHUNK: usize = 1024;

pub struct Session {
    shared: Arc<Shared>,
    client: Stream,
    cbuf: BytesMut,
    cout: BytesMut,
    /// The client's role and database: whom its server connections are for.
    target: Target,
    primary: Option<Server>,
    replica: Option<Server>,
    /// Extended-protocol messages waiting for their Sync or Flush.
    batch: BytesMut,
    batch_tags: Vec<u8>,
    /// The server that ran the last request (COPY data and cancels go there).
    last: Role,
    cancel: CancelKey,
    cancel_role: Option<Role>,
    state: SessionState,
    /// The client's transaction: none, a BEGIN pgnear deferred, or open on a server.
    tx: plan::Tx,
    /// Where a transaction's end was sent whose answer is still to come (see `RouteState`).
    ending: Option<Role>,
    /// Where the last unnamed statement was parsed.
    unnamed_role: Option<Role>,
    /// Commit position of the session's last write.
    write_lsn: Option<Lsn>,
    /// `SET pgnear.min_lsn`: a position reads must see (a causal token from elsewhere).
    min_lsn: Option<Lsn>,
    /// The highest position a read waited for in vain (`wait_timeout`): with `on_timeout =
    /// "primary"`, reads needing it go to the primary at once until the replica has replayed
    /// it (a token no replica will reach, say of a write lost in a failover, costs one
    /// timeout, not one per read). With `"error"` each read waits again: the client retries.
    gave_up: Option<Lsn>,
    /// An extended-protocol exchange that ended in Flush, not yet Sync.
    exchange: Option<plan::Exchange>,
    /// The settings of a replica exchange a write ended (see `Run::end_replica_exchange`):
    /// they run on the primary ahead of that write, and are the session's if it succeeds.
    carried: Option<state::PendingState>,
    /// `routing.write_mode`, or the session's `SET pgnear.write_mode`.
    write_mode: crate::config::WriteMode,
    /// Where shared (pipelined) replica connections send the answers to this session's reads.
    answers: Option<Box<lane::Answers>>,
    /// The parameters the client was told (ParameterStatus), to tell it every change.
    told: crate::protocol::backend::Params,
}

enum Flow {
    Continue,
    Terminate,
}

impl Session {
    /// Relays until the client leaves or pgnear shuts down. On an error the client is told
    /// (ErrorResponse) before the connection closes.
    pub async fn run(mut self: Box<Self>) {
        let result = self.relay().await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "session ends with an error");
            self.shared.metrics.error(e.kind);
            let mut out = BytesMut::new();
            write::error_response(&mut out, &e);
            let _ = self.client.write_all(&out).await;
        }
        let _ = self.client.shutdown().await;
        for role in [Role::Primary, Role::Replica] {
            let Some(mut s) = self.slot(role).take() else {
                continue;
            };
            let timeout = self.shared.config.upstream.connect_timeout.0;
            if s.requests.is_empty() && !self.exchange_on(role) && !s.expect.is_empty() {
                // Only pgnear's own queries are in flight (a commit-position lookup): let them
                // finish so the connection can be pooled.
                let _ = tokio::time::timeout(timeout, s.finish_internal()).await;
            }
            if s.is_reusable() && !self.exchange_on(role) {
                let reset = self.needs_reset(&s);
                self.shared.pool(role).release(s.conn, reset);
                continue;
            }
            if !s.expect.is_empty() {
                // The client left with a query running: stop the server's work now.
                Box::pin(send_cancel(
                    s.conn.addr,
                    s.conn.pid,
                    &s.conn.secret,
                    timeout,
                ))
                .await;
            }
            // Terminate, so the server ends the session (and rolls back) at once.
            let _ = s.conn.stream.write_all(TERMINATE).await;
        }
    }

    /// The upstream's connections go elsewhere now (the primary moved to another host, reads to
    /// another replica): between requests, the session's connection there is given back (the
    /// pool closes it) and the next request opens one where they go. A session whose state
    /// lives on the old primary (LISTEN, temp objects, locks) cannot move: it ends with 08006.
    fn leave_if_moved(&mut self, role: Role) -> Result<(), PgError> {
        let Some(s) = self.slot_ref(role) else {
            return Ok(());
        };
        let upstream = self.shared.upstream(role);
        if upstream.takes(s.conn.conn.addr)
            || !s.is_reusable()
            || self.exchange_on(role)
            || self.tx.open() == Some(role)
        {
            return Ok(());
        }
        if role == Role::Primary && self.state.pins.any() {
            return Err(PgError::upstream(format!(
                "the primary moved from {}: this session's state (LISTEN, temporary objects, locks) was there",
                s.conn.conn.addr
            ))
            .with_detail("Reconnect: the new session runs on the new primary."));
        }
        tracing::info!(role = role.name(), addr = %s.conn.conn.addr, "the upstream moved; leaving the old server");
        let s = self.slot(role).take().expect("checked above");
        if self.cancel_role == Some(role) {
            self.cancel_role = None;
        }
        if self.unnamed_role == Some(role) {
            self.unnamed_role = None;
        }
        self.shared.pool(role).release(s.conn, true);
        Ok(())
    }

    /// Whether an exchange a Flush left open is on `role`.
    fn exchange_on(&self, role: Role) -> bool {
        self.exchange.as_ref().is_some_and(|e| e.role == role)
    }

    /// Whether a server connection needs `DISCARD ALL` before another session gets it.
    fn needs_reset(&self, s: &Server) -> bool {
        s.dirty || self.state.pins.any()
    }

    /// In transaction mode, gives a server connection back to the pool once it has finished
    /// the session's transaction (or autocommit statement) and owes nothing, unless the
    /// session is pinned to it.
    fn release_if_done(&mut self, role: Role) {
        if self.shared.config.pool.mode != PoolMode::Transaction
            || self.state.pins.any()
            || self.exchange_on(role)
            || self.tx.open() == Some(role)
            || !self.slot_ref(role).is_some_and(Server::is_reusable)
        {
            return;
        }
        let Some(s) = self.slot(role).take() else {
            return;
        };
        if self.cancel_role == Some(role) {
            self.cancel_role = None;
            if let Ok(mut slot) = self.cancel.slot.lock() {
                *slot = None;
            }
        }
        if self.unnamed_role == Some(role) {
            self.unnamed_role = None;
        }
        let reset = s.dirty;
        self.shared.pool(role).release(s.conn, reset);
    }

    async fn relay(&mut self) -> Result<(), PgError> {
        let mut shutdown = self.shared.shutdown.clone();
        // Made once, not per loop turn: each turn would register and unregister a waiter.
        let stop = shutdown.stopped();
        tokio::pin!(stop);
        let mut deadline: Option<Instant> = None;
        let mut health = tokio::time::interval(SILENT_CHECK);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if deadline.is_some() && self.is_idle() {
                return Err(shutting_down());
            }
            if self.cbuf.capacity() - self.cbuf.len() < 512 {
                let step = if self.cbuf.capacity() == 0 {
                    CLIENT_FIRST_CHUNK
                } else {
                    CLIENT_CHUNK
                };
                self.cbuf.reserve(step);
            }
            self.shared.spinner.poke();
            tokio::select! {
                r = read_opt(&mut self.primary) => match r {
                    Ok(()) => self.on_server(Role::Primary).await?,
                    Err(e) => Box::pin(self.server_failed(Role::Primary, e)).await?,
                },
                r = read_opt(&mut self.replica) => {
                    match r {
                        Ok(()) => self.on_server(Role::Replica).await?,
                        Err(e) => Box::pin(self.server_failed(Role::Replica, e)).await?,
                    }
                    // Frames held back behind a tentative request can go now.
                    if !self.tentative_in_flight() && !self.cbuf.is_empty() {
                        if let Flow::Terminate = self.client_frames().await? { return Ok(()) }
                    }
                }
                r = self.client.read_buf(&mut self.cbuf), if !self.tentative_in_flight() => {
                    match r {
                        Ok(0) | Err(_) => return Ok(()),
                        Ok(n) => {
                            self.shared.metrics.bytes_in(n);
                            if let Flow::Terminate = self.client_frames().await? { return Ok(()) }
                        }
                    }
                }
                _ = health.tick(), if self.in_flight() => Box::pin(self.check_silent_servers()).await?,
                _ = &mut stop, if deadline.is_none() => {
                    deadline = Some(Instant::now() + self.shared.config.proxy.shutdown_grace.0);
                }
                _ = sleep_until_opt(deadline) => return Err(shutting_down()),
            }
        }
    }

    fn in_flight(&self) -> bool {
        [&self.primary, &self.replica]
            .into_iter()
            .flatten()
            .any(|s| !s.expect.is_empty())
    }

    fn is_idle(&self) -> bool {
        self.batch.is_empty()
            && !matches!(self.tx, plan::Tx::Deferred(_))
            && [&self.primary, &self.replica]
                .into_iter()
                .flatten()
                .all(Server::is_idle)
    }

    /// `on_client`, boxed: its future is large (routing, waiting for the replica, connecting),
    /// and inline it would be part of every idle session's task; one allocation per client
    /// read is the cheaper side. (The relay loop boxes its rare paths for the same reason.)
    async fn client_frames(&mut self) -> Result<Flow, PgError> {
        Box::pin(self.on_client()).await
    }

    /// Handles every complete frame the client sent, then writes to the servers. Stops early
    /// while a tentative request is in flight (what follows must not overtake its retry).
    async fn on_client(&mut self) -> Result<Flow, PgError> {
        let max = self.shared.config.proxy.max_message_size;
        while !self.tentative_in_flight() {
            let Some((t, len)) = next_frame(&self.cbuf, max)? else {
                break;
            };
            let frame = self.cbuf.split_to(len);
            match t {
                tag::QUERY => {
                    let sent = match self.dispatch_unsynced(&frame).await {
                        Ok(true) => Ok(()),
                        Ok(false) => self.on_query(frame).await,
                        Err(e) => Err(e),
                    };
                    self.unless_primary_unreachable(sent, 1).await?;
                }
                tag::FUNCTION_CALL => {
                    // libpq's fast path (large objects): a complete request, answered by
                    // FunctionCallResponse and ReadyForQuery, never followed by a Sync.
                    let sent = match self.dispatch_unsynced(&frame).await {
                        Ok(true) => Ok(()),
                        Ok(false) => self.on_function_call(frame).await,
                        Err(e) => Err(e),
                    };
                    self.unless_primary_unreachable(sent, 1).await?;
                }
                tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE => {
                    self.batch.extend_from_slice(&frame);
                    self.batch_tags.push(t);
                }
                tag::SYNC | tag::FLUSH if self.batch.is_empty() && self.copying().is_some() => {
                    // A server in COPY FROM STDIN ignores Sync and Flush: they pass unanswered.
                    let role = self.copying().expect("checked above");
                    self.server(role).await?.out.extend_from_slice(&frame);
                }
                tag::SYNC | tag::FLUSH => {
                    self.batch.extend_from_slice(&frame);
                    self.batch_tags.push(t);
                    let syncs = usize::from(t == tag::SYNC);
                    let sent = self.dispatch_batch().await;
                    self.unless_primary_unreachable(sent, syncs).await?;
                }
                tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL if !self.batch.is_empty() => {
                    // Pipelined behind an Execute not yet sent: it goes after it, in order.
                    self.batch.extend_from_slice(&frame);
                    self.batch_tags.push(t);
                }
                tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {
                    // COPY continues on the server that started it; outside COPY the server ignores these.
                    let role = self.copy_role().unwrap_or(self.last);
                    let server = self.server(role).await?;
                    if t != tag::COPY_DATA && server.reader.copy_in {
                        server.reader.client_ended_copy = true;
                    }
                    server.send_client_frame(t, &frame);
                }
                tag::TERMINATE => {
                    // Like Postgres, run and answer what the client sent before Terminate,
                    // unless a COPY FROM STDIN waits for data that will not come.
                    if ![&self.primary, &self.replica]
                        .into_iter()
                        .flatten()
                        .any(|s| s.reader.copy_in)
                    {
                        self.flush_servers().await?;
                        self.drain_all().await?;
                    }
                    return Ok(Flow::Terminate);
                }
                other => {
                    return Err(PgError::protocol(format!(
                        "invalid frontend message type {other}"
                    )));
                }
            }
        }
        self.flush_servers().await?;
        Ok(Flow::Continue)
    }

    /// Sends the extended-protocol messages a Query or FunctionCall (`request`) follows with
    /// no Sync: with a Flush of pgnear's behind them, which a client cannot tell (it has no
    /// answer), so that the server sends their answers now (Postgres holds them until a Sync
    /// or Flush). When they failed, the server skips the request up to the Sync: it goes
    /// there unanswered, changing nothing (`true`). (Drivers do not send requests into an
    /// unsynced exchange; this waits for its answers.)
    async fn dispatch_unsynced(&mut self, request: &[u8]) -> Result<bool, PgError> {
        if self.batch_tags.last().is_some_and(|&t| t != tag::FLUSH) {
            self.batch.extend_from_slice(&[tag::FLUSH, 0, 0, 0, 4]);
            self.batch_tags.push(tag::FLUSH);
        }
        self.dispatch_batch().await?;
        let Some(role) = self.exchange.as_ref().map(|e| e.role) else {
            return Ok(false);
        };
        if self.copy_role().is_some() {
            return Ok(false);
        }
        self.drain(role).await?;
        match self.slot(role).as_mut().filter(|s| s.expect.skipping) {
            Some(server) => {
                server.out.extend_from_slice(request);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// A primary that could not be connected on first use fails the request, not the session:
    /// its reads can go on (the session has no state on a primary it never reached). So does a
    /// pool that had no connection free within `acquire_timeout` (nothing was sent).
    async fn unless_primary_unreachable(
        &mut self,
        sent: Result<(), PgError>,
        syncs: usize,
    ) -> Result<(), PgError> {
        match sent {
            Err(e)
                if (e.kind == ErrorKind::Upstream && self.primary.is_none())
                    || e.kind == ErrorKind::Capacity =>
            {
                tracing::warn!(error = %e, "no server for the request; it failed");
                self.shared.metrics.error(e.kind);
                self.batch.clear();
                self.batch_tags.clear();
                self.tx = plan::Tx::Idle;
                self.refuse_request(e.non_fatal(), syncs).await
            }
            other => other,
        }
    }

    async fn flush_servers(&mut self) -> Result<(), PgError> {
        for role in [Role::Primary, Role::Replica] {
            if let Some(s) = self.slot(role).as_mut() {
                if let Err(e) = s.flush().await {
                    self.server_failed(role, e).await?;
                }
            }
        }
        Ok(())
    }

    /// The client closed `names` on `role` (a Close, or SQL `DEALLOCATE`): the session forgets
    /// them, and the other server's copies are closed before its next batch.
    fn forget_statements(&mut self, role: Role, names: &[String]) {
        for name in names {
            self.state.statements.remove(name);
            if let Some(s) = self.slot(role).as_mut() {
                s.remove_statement(name);
            }
            if let Some(o) = self.slot(role.other()).as_mut() {
                if o.remove_statement(name) {
                    o.to_close.push(name.clone());
                }
            }
        }
    }

    /// The server in COPY FROM STDIN whose data the client has not ended yet.
    fn copying(&self) -> Option<Role> {
        [Role::Primary, Role::Replica].into_iter().find(|&r| {
            self.slot_ref(r)
                .is_some_and(|s| s.reader.copy_in && !s.reader.client_ended_copy)
        })
    }

    /// The server of a COPY FROM STDIN not yet finished: in copy-in mode, owed the Sync of
    /// an extended-protocol COPY (see `Reader::owed_sync`), or running a batch that may start
    /// one (see `Request::may_copy_in`). What the client sends goes there.
    pub(super) fn copy_role(&self) -> Option<Role> {
        [Role::Primary, Role::Replica].into_iter().find(|&r| {
            self.slot_ref(r).is_some_and(|s| {
                s.reader.copy_in || s.reader.owed_sync || s.requests.iter().any(|q| q.may_copy_in)
            })
        })
    }

    /// Whether a COPY FROM STDIN in flight may still wait for the client: a server in copy-in
    /// mode the client has not ended, owed the Sync of an extended-protocol COPY, or running
    /// more requests that may start one than the client sent CopyDone or CopyFail behind them.
    /// Waiting for that server's answers now would wait forever.
    pub(super) fn copy_awaits_client(&self) -> bool {
        [Role::Primary, Role::Replica].into_iter().any(|r| {
            self.slot_ref(r).is_some_and(|s| {
                let copies = s.requests.iter().filter(|q| q.may_copy_in).count();
                s.reader.owed_sync
                    || (s.reader.copy_in && !s.reader.client_ended_copy)
                    || copies > s.expect.copy_ends_queued()
            })
        })
    }

    fn tentative_in_flight(&self) -> bool {
        self.replica
            .as_ref()
            .is_some_and(|s| s.expect.has_tentative())
    }

    /// The server for `role`, connected on first use. Before switching away from a server that
    /// still owes answers, those answers are relayed first, so the client sees them in order.
    async fn server(&mut self, role: Role) -> Result<&mut Server, PgError> {
        self.drain(role.other()).await?;
        self.leave_if_moved(role)?;
        if self.slot(role).is_none() && role == Role::Primary && self.shared.probe.current().down {
            // Connecting would wait out connect_timeout on a path that swallows packets.
            return Err(
                PgError::upstream("primary upstream is down: its health checks fail")
                    .with_detail("Nothing was sent; retry once the primary answers again."),
            );
        }
        if self.slot(role).is_none() {
            // Boxed: opening a connection is a large future, rarely needed.
            let conn = Box::pin(self.shared.pool(role).acquire(&self.target)).await?;
            *self.slot(role) = Some(Server::new(conn, role));
        }
        self.last = role;
        let seq = self.state.seq();
        let server = self.slot_ref(role).expect("connected above");
        if server.synced != seq {
            let replay = if server.synced == state::FROM_POOL {
                self.state.sync_from(&server.conn.carry.applied)
            } else {
                self.state.replay_since(server.synced)
            };
            let applied = self.state.applied();
            let server = self.slot(role).as_mut().expect("connected above");
            if let Some(sql) = replay {
                server.send_internal_query(&sql, expect::Purpose::Sync);
            }
            server.synced = seq;
            server.conn.carry.applied = applied;
        }
        if self.cancel_role != Some(role) {
            self.cancel_role = Some(role);
            let target = self
                .slot_ref(role)
                .expect("connected above")
                .cancel_target();
            if let Ok(mut slot) = self.cancel.slot.lock() {
                *slot = Some(target);
            }
        }
        Ok(self.slot(role).as_mut().expect("connected above"))
    }

    /// Relays everything `role` still owes the client.
    async fn drain(&mut self, role: Role) -> Result<(), PgError> {
        self.drain_while(role, |_| true).await
    }

    /// Relays what `role` still owes the client, while `more` holds.
    async fn drain_while(
        &mut self,
        role: Role,
        more: impl Fn(&Session) -> bool,
    ) -> Result<(), PgError> {
        if let Some(s) = self.slot(role).as_mut() {
            if s.requests.iter().any(|q| q.may_copy_in) {
                // A COPY started by Execute swallows the Syncs sent behind it: what the server
                // answers once the client's CopyDone is in (CommandComplete, the errors of
                // what follows) stays in its output buffer until the next Sync or Flush. A
                // Flush of pgnear's sends it (it has no answer; in copy-in mode it is ignored).
                s.out.extend_from_slice(&[tag::FLUSH, 0, 0, 0, 4]);
            }
            if let Err(e) = s.flush().await {
                return self.server_failed(role, e).await;
            }
        }
        while self
            .slot(role)
            .as_ref()
            .is_some_and(|s| !s.expect.is_empty())
            && more(self)
        {
            // Bounded like the relay loop: a server gone silent is noticed here too.
            match tokio::time::timeout(SILENT_CHECK, read_opt(self.slot(role))).await {
                Ok(Ok(())) => self.on_server(role).await?,
                Ok(Err(e)) => return self.server_failed(role, e).await,
                Err(_) => self.check_silent_servers().await?,
            }
        }
        Ok(())
    }

    /// Relays everything both servers still owe the client (before pgnear answers itself).
    async fn drain_all(&mut self) -> Result<(), PgError> {
        self.drain(Role::Primary).await?;
        self.drain(Role::Replica).await
    }

    async fn write_client(&mut self, out: &[u8]) -> Result<(), PgError> {
        self.shared.metrics.bytes_out(out.len());
        self.client
            .write_all(out)
            .await
            .map_err(|_| PgError::protocol("client connection lost"))
    }

    fn slot_ref(&self, role: Role) -> Option<&Server> {
        match role {
            Role::Primary => self.primary.as_ref(),
            Role::Replica => self.replica.as_ref(),
        }
    }

    fn slot(&mut self, role: Role) -> &mut Option<Server> {
        match role {
            Role::Primary => &mut self.primary,
            Role::Replica => &mut self.replica,
        }
    }
}

async fn read_opt(s: &mut Option<Server>) -> Result<(), PgError> {
    match s {
        Some(s) => s.read().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn shutting_down() -> PgError {
    PgError::new(
        ErrorKind::Shutdown,
        "terminating connection due to administrator command",
    )
    .with_detail("pgnear is shutting down")
}
