//! One task per client: owns the client socket, its server connections and its session state,
//! decides where each request goes and relays the answers back as raw frames.

pub mod expect;
pub mod lane;
pub mod reported;
mod route;
pub mod server;
mod shared;
pub mod startup;
pub mod state;

pub use shared::Shared;

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use self::server::{Seen, Server};
use self::state::SessionState;
use crate::backend::conn::send_cancel;
use crate::backend::health::SILENT_CHECK;
use crate::backend::login::Login;
use crate::backend::pool::{Target, TERMINATE};
use crate::cancel::{CancelKey, CancelRegistry};
use crate::config::PoolMode;
use crate::consistency::gate;
use crate::error::{ErrorKind, PgError};
use crate::lsn::Lsn;
use crate::protocol::frontend::{next_frame, Startup};
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
    /// The server holding the client's open transaction, as predicted from what was sent and
    /// corrected by each ReadyForQuery.
    open_tx: Option<Role>,
    /// Where the last unnamed statement was parsed.
    unnamed_role: Option<Role>,
    /// Commit position of the session's last write.
    write_lsn: Option<Lsn>,
    /// `SET pgnear.min_lsn`: a position reads must see (a causal token from elsewhere).
    min_lsn: Option<Lsn>,
    /// The server of an extended-protocol exchange that ended in Flush, not yet Sync.
    unsynced: Option<Role>,
    /// That exchange executed something (else it only prepared and described, and what follows
    /// may run elsewhere: see `dispatch_batch`).
    unsynced_executed: bool,
    /// Session-state changes (SET, LISTEN, …) that exchange executed: recorded once the Sync
    /// that ends it succeeds (an error before it rolls them back).
    unsynced_changes: Vec<state::PendingState>,
    /// A `BEGIN` answered by pgnear and not yet sent (see `start_deferred`).
    deferred_begin: Option<bytes::Bytes>,
    /// `routing.write_mode`, or the session's `SET pgnear.write_mode`.
    write_mode: crate::config::WriteMode,
    /// A read the consistency gate refused (`on_timeout = "error"`), answered instead of run.
    refused: Option<PgError>,
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
    /// Completes the client's startup and returns the session. The client is told the server
    /// parameters pgnear has cached for its database, so it waits for no upstream; without
    /// them (the first client of a database) a server connection is taken first: from the
    /// local replica when it can serve reads (a far region then pays no cross-region
    /// handshake), else the primary.
    pub async fn establish(
        shared: Arc<Shared>,
        mut client: Stream,
        startup: Startup,
        login: Arc<Login>,
    ) -> Result<Box<Session>, (Stream, PgError)> {
        let database = startup
            .get("database")
            .filter(|d| !d.is_empty())
            .unwrap_or(&shared.primary.url.database);
        let target = Target::new(login, database);
        let state = match SessionState::from_startup(&startup.params) {
            Ok(s) => s,
            Err(why) => {
                let e = PgError::new(
                    ErrorKind::Protocol,
                    format!("invalid startup parameter \"options\": {why}"),
                );
                return Err((client, e));
            }
        };
        let replica_ready = shared.watcher.as_ref().is_some_and(|w| {
            let c = &shared.config.consistency;
            gate::decide(c.mode, None, &w.current(), c.max_replica_lag.0) == gate::Gate::Go
        });
        let home = if replica_ready && shared.replica_pool.is_some() {
            Role::Replica
        } else {
            Role::Primary
        };
        let mut first = None;
        let params = match shared.pool(home).cached_params(&target) {
            Some(p) => p,
            None => {
                let mut got = Err(PgError::upstream("unreachable"));
                for role in [home, Role::Primary] {
                    got = shared.pool(role).acquire(&target).await.map(|c| (role, c));
                    match &got {
                        Err(e) if role == Role::Replica => {
                            tracing::warn!(error = %e, "replica unavailable at startup; using the primary")
                        }
                        _ => break,
                    }
                }
                match got {
                    Ok((role, conn)) => {
                        let params = conn.params.clone().into();
                        first = Some(Server::new(conn, role));
                        params
                    }
                    Err(e) => return Err((client, e)),
                }
            }
        };
        // The client's own settings are what its session will have, as the server reports
        // them (learned once per value: see `reported`).
        let given: Vec<(String, String)> = params
            .iter()
            .filter_map(|(k, v)| {
                let (_, mine) = startup
                    .params
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(k))?;
                (mine != v).then(|| (k.clone(), mine.clone()))
            })
            .collect();
        let unknown: Vec<(String, String)> = given
            .iter()
            .filter(|(k, v)| shared.reported.get(k, v).is_none())
            .cloned()
            .collect();
        if !unknown.is_empty() {
            let mut role = first.as_ref().map_or(home, |s| s.role);
            let mut conn = match first.take() {
                Some(s) => Ok(s.conn),
                None => shared.pool(role).acquire(&target).await,
            };
            if conn.is_err() && role == Role::Replica {
                role = Role::Primary;
                conn = shared.pool(role).acquire(&target).await;
            }
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => return Err((client, e)),
            };
            let learned = shared.reported.learn(&mut conn, &unknown).await;
            // Set and reset: what it carried from earlier sessions is no longer known.
            shared.pool(role).release(conn, true);
            if let Err(e) = learned {
                return Err((client, e));
            }
        }
        let cancel = shared.cancels.register();
        let mut out = BytesMut::new();
        let mut told = Vec::with_capacity(params.len());
        for (k, v) in params.iter() {
            // pgnear as a whole accepts writes, whichever server answered the startup.
            let v = match given.iter().find(|(name, _)| name == k) {
                Some((name, mine)) => shared.reported.get(name, mine).unwrap_or(mine.clone()),
                None => server::as_primary(k, v).to_string(),
            };
            write::parameter_status(&mut out, k, &v);
            told.push((k.clone(), v));
        }
        if !shared.config.regions.primary.is_empty() {
            write::parameter_status(
                &mut out,
                "pgnear.primary_region",
                &shared.config.regions.primary,
            );
        }
        write::backend_key_data(&mut out, cancel.pid, cancel.secret);
        write::ready_for_query(&mut out, b'I');
        if let Err(e) = client.write_all(&out).await {
            return Err((
                client,
                PgError::protocol(format!("client connection lost: {e}")),
            ));
        }
        let write_mode = shared.config.routing.write_mode;
        let mut session = Session {
            shared,
            client,
            cbuf: BytesMut::new(),
            cout: BytesMut::new(),
            target,
            primary: None,
            replica: None,
            batch: BytesMut::new(),
            batch_tags: Vec::new(),
            last: home,
            cancel,
            cancel_role: None,
            state,
            open_tx: None,
            unnamed_role: None,
            write_lsn: None,
            min_lsn: None,
            refused: None,
            answers: None,
            told,
            write_mode,
            deferred_begin: None,
            unsynced: None,
            unsynced_executed: false,
            unsynced_changes: Vec::new(),
        };
        if let Some(server) = first {
            let role = server.role;
            session.last = role;
            *session.slot(role) = Some(server);
            session.release_if_done(role);
        }
        // Boxed: the session lives as long as the client, and its future is kept small.
        Ok(Box::new(session))
    }

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
            if s.requests.is_empty() && self.unsynced != Some(role) && !s.expect.is_empty() {
                // Only pgnear's own queries are in flight (a commit-position lookup): let them
                // finish so the connection can be pooled.
                let _ = tokio::time::timeout(timeout, s.finish_internal()).await;
            }
            if s.is_reusable() && self.unsynced != Some(role) {
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
            || self.unsynced == Some(role)
            || self.open_tx == Some(role)
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

    /// A server that owes answers, has sent nothing for `connect_timeout` (the replica: for
    /// its watcher's poll deadline), and whose upstream the health checks report down is taken
    /// as lost (a silent partition or a frozen server: TCP alone would wait for many minutes).
    /// Losing the primary ends the session with 08006; the replica's statements fail with 08006
    /// (or run again on the primary, see `replica_lost`) and the session goes on.
    async fn check_silent_servers(&mut self) -> Result<(), PgError> {
        let connect_timeout = self.shared.config.upstream.connect_timeout.0;
        for role in [Role::Primary, Role::Replica] {
            let (up, limit) = match role {
                Role::Primary => (self.shared.probe.current().up, connect_timeout),
                Role::Replica => (
                    self.shared.watcher.as_ref().is_some_and(|w| w.current().up),
                    crate::consistency::watcher::poll_deadline(connect_timeout),
                ),
            };
            let lost = self
                .slot_ref(role)
                .and_then(|s| s.stopped_answering(limit, up));
            if let Some(e) = lost {
                let e = e.with_detail("The statement may or may not have completed.");
                self.server_failed(role, e).await?;
            }
        }
        Ok(())
    }

    fn is_idle(&self) -> bool {
        self.batch.is_empty()
            && self.deferred_begin.is_none()
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
                    let sent = match self.dispatch_batch().await {
                        Ok(()) => self.on_query(frame).await,
                        Err(e) => Err(e),
                    };
                    self.unless_primary_unreachable(sent, 1).await?;
                }
                tag::FUNCTION_CALL => {
                    // libpq's fast path (large objects): a complete request, answered by
                    // FunctionCallResponse and ReadyForQuery, never followed by a Sync.
                    let sent = match self.dispatch_batch().await {
                        Ok(()) => self.on_function_call(frame).await,
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
                self.deferred_begin = None;
                self.open_tx = None;
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

    /// A server connection failed: losing the primary ends the session, losing the replica
    /// does not (see `replica_lost`).
    async fn server_failed(&mut self, role: Role, e: PgError) -> Result<(), PgError> {
        match role {
            Role::Primary => Err(e),
            Role::Replica => self.replica_lost(e).await,
        }
    }

    /// The replica connection failed. The session goes on: requests in flight there get an
    /// 08006 error (they may not have completed), later reads go to the primary until the
    /// replica is back. Only losing the primary ends the session (its state lives there).
    /// Autocommit reads none of whose answer has reached the client run again on the primary
    /// instead (a standby changed nothing), in order, so the client just sees a slower answer.
    async fn replica_lost(&mut self, e: PgError) -> Result<(), PgError> {
        let Some(mut server) = self.replica.take() else {
            return Ok(());
        };
        tracing::warn!(error = %e, "lost the replica connection; reads go to the primary");
        self.shared.metrics.error(e.kind);
        let again: Vec<_> =
            if !server.reader.begun && server.requests.iter().all(|r| r.again.is_some()) {
                let reads = server.requests.drain(..);
                reads
                    .filter_map(|mut r| r.again.take().map(|a| (r, a)))
                    .collect()
            } else {
                Vec::new()
            };
        let e = PgError { fatal: false, ..e }.with_detail("The statement may not have completed.");
        let mut out = BytesMut::new();
        if again.is_empty() && server.requests.is_empty() && !server.expect.is_empty() {
            write::error_response(&mut out, &e);
        }
        if self.open_tx == Some(Role::Replica) {
            self.open_tx = None;
        }
        for _ in 0..server.requests.len() {
            write::error_response(&mut out, &e);
            write::ready_for_query(&mut out, b'I');
        }
        if self.last == Role::Replica {
            self.last = Role::Primary;
        }
        if self.unnamed_role == Some(Role::Replica) {
            self.unnamed_role = None;
        }
        if self.cancel_role == Some(Role::Replica) {
            self.cancel_role = None;
        }
        if !out.is_empty() {
            self.write_client(&out).await?;
        }
        if !again.is_empty() {
            tracing::info!(
                reads = again.len(),
                "no answer had begun; running the reads on the primary"
            );
            // Boxed: it goes through server(), which may relay, and so re-enter this function.
            Box::pin(self.run_again_on_primary(again)).await?;
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

    fn tentative_in_flight(&self) -> bool {
        self.replica
            .as_ref()
            .is_some_and(|s| s.expect.has_tentative())
    }

    /// The server for `role`, connected on first use. Before switching away from a server that
    /// still owes answers, those answers are relayed first, so the client sees them in order.
    async fn server(&mut self, role: Role) -> Result<&mut Server, PgError> {
        self.drain(role.other()).await?;
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
        if let Some(s) = self.slot(role).as_mut() {
            if let Err(e) = s.flush().await {
                return self.server_failed(role, e).await;
            }
        }
        while self
            .slot(role)
            .as_ref()
            .is_some_and(|s| !s.expect.is_empty())
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

    /// Relays what a server sent.
    async fn on_server(&mut self, role: Role) -> Result<(), PgError> {
        let mut seen = Seen::default();
        let server = match role {
            Role::Primary => self.primary.as_mut(),
            Role::Replica => self.replica.as_mut(),
        };
        let server = server.expect("read from a connected server");
        let names =
            (self.shared.config.pool.mode == PoolMode::Transaction).then_some(&self.state.names);
        server.scan(&mut self.cout, &mut seen, Some(&mut self.told), names)?;
        for &at in &seen.notifications {
            map_notification_pid(&mut self.cout, at, server.conn.addr, &self.shared.cancels);
        }
        let (idle, tx) = (server.expect.is_empty(), server.tx);
        for name in &seen.failed_parses {
            // The client's Parse of a new statement failed: it does not exist, as in Postgres.
            self.state.statements.remove(name);
        }
        if seen.unnamed_failed && self.unnamed_role == Some(role) {
            // What a Bind of it gets now is the server's own answer, as from Postgres.
            self.state.unnamed = None;
        }
        let mut capture = false;
        for request in seen.done {
            capture |= (request.capture_after && !request.failed) || request.capture_owed;
            if let Some(t) = request.started {
                self.shared
                    .metrics
                    .duration(role, t.elapsed().as_secs_f64());
            }
            if let Some(change) = request.change.filter(|_| !request.failed) {
                let dropped = SessionState::drops_statements(&change);
                let deallocated = SessionState::deallocated(&change);
                let seq = self.state.commit_change(change);
                let applied = self.state.applied();
                if let Some(s) = self.slot(role).as_mut() {
                    s.synced = seq;
                    s.conn.carry.applied = applied;
                    if dropped {
                        s.conn.carry.prepared.clear();
                        s.unnamed_dropped = true;
                    }
                }
                if !self.shares_statements() {
                    self.forget_statements(role, &deallocated);
                }
                if dropped && !self.shares_statements() {
                    // The client's statements are gone; the other server's copies go too.
                    if let Some(o) = self.slot(role.other()).as_mut() {
                        let names: Vec<String> =
                            o.conn.carry.prepared.drain().map(|(n, _)| n).collect();
                        o.to_close.extend(names);
                    }
                }
            }
        }
        // Only the server holding the transaction (or any, when none does) says whether it
        // is still open: the other one going idle (pgnear's own Sync) says nothing of it.
        if idle && self.open_tx.is_none_or(|r| r == role) {
            self.open_tx = (tx != b'I').then_some(role);
        }
        if let Some(lsn) = seen
            .write_lsn
            .as_deref()
            .and_then(|v| v.parse::<Lsn>().ok())
        {
            if self.write_lsn.is_none_or(|w| lsn > w) {
                self.write_lsn = Some(lsn);
                if self.shared.config.consistency.report_write_lsn {
                    write::parameter_status(&mut self.cout, "pgnear.write_lsn", &lsn.to_string());
                }
            }
        }
        if !self.cout.is_empty() {
            self.shared.metrics.bytes_out(self.cout.len());
            let r = self.client.write_all(&self.cout).await;
            self.cout.clear();
            if r.is_err() {
                // The client is gone; the caller's next client read sees it.
                return Err(PgError::protocol("client connection lost"));
            }
        }
        if capture {
            let open = self.unsynced == Some(role);
            if let Some(s) = self.slot(role).as_mut() {
                if let Some(last) = s.requests.back_mut() {
                    // The client sent more behind it (another COPY, say): the lookup waits for
                    // the last, so that nothing of pgnear's reaches a server in copy-in mode.
                    last.capture_owed = true;
                } else if !(open || s.reader.copy_in || s.expect.skipping) {
                    s.send_internal_query(route::WRITE_LSN_QUERY, expect::Purpose::WriteLsn);
                    s.flush().await?;
                }
            }
        }
        if let Some(retry) = seen.retry {
            // Boxed: retrying goes through server(), which may relay (and so re-enter this function).
            Box::pin(self.retry_on_primary(retry)).await?;
        }
        self.release_if_done(role);
        Ok(())
    }
}

/// Rewrites the sender pid of the notification at `at` in `out` (from a server at `addr`) when
/// another pgnear session's server connection sent it: the client knows that session by the
/// pid pgnear gave it, not by the server's.
fn map_notification_pid(
    out: &mut BytesMut,
    at: usize,
    addr: std::net::SocketAddr,
    cancels: &CancelRegistry,
) {
    let Some(field) = out.get_mut(at + 5..at + 9) else {
        return;
    };
    let pid = i32::from_be_bytes([field[0], field[1], field[2], field[3]]);
    if let Some(client) = cancels.client_pid(addr, pid) {
        field.copy_from_slice(&client.to_be_bytes());
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
