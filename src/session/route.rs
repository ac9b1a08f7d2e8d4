//! Routing inside a session: a simple Query or an extended-protocol batch is classified, the
//! policy picks a server, and the server is brought up to date (session state, prepared
//! statements) before the request goes out. Also pgnear's own in-band commands.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::expect;
use super::lane::{Job, Reply};
use super::server::{Again, Request, Retry, Server};
use super::state::{self, PendingState};
use super::Session;
use crate::backend::pool::Fence;
use crate::config::{OnTimeout, PoolMode, WriteMode};
use crate::consistency::gate::{self, Gate};
use crate::error::{ErrorKind, PgError};
use crate::lsn::Lsn;
use crate::protocol::frontend::query_text;
use crate::protocol::{build_frame, cstr, frames, sql_text, tag, write};
use crate::region::RegionRole;
use crate::role::Role;
use crate::router::classify::{database_lifecycle, Classified, Hint, Kind};
use crate::router::route::{decide, Context, Reason, Request as RouteRequest, RouteSetting};

/// What an extended-protocol batch does, as far as routing is concerned.
#[derive(Default)]
struct BatchPlan {
    read: bool,
    hint: Option<Hint>,
    starts_read_only_tx: bool,
    /// Runs a portal bound by an earlier batch: must stay where that portal lives.
    sticky: bool,
    /// Named statements used but not parsed in this batch.
    needs: Vec<String>,
    /// The unnamed statement is used but not parsed in this batch.
    needs_unnamed: bool,
    parsed: Vec<String>,
    /// Parses (their place among the batch's frames) of a name that already exists: sent as
    /// they are, so that the server answers 42P05 as Postgres would (see `plan_batch`).
    dups: Vec<usize>,
    closed: Vec<String>,
    parsed_unnamed: bool,
    /// May leave state on the server that pgnear does not track (see `Server::dirty`).
    taints: bool,
    /// Parses or uses a pgnear command (`SHOW pgnear.…`), and parses or uses anything else.
    pgnear: bool,
    other: bool,
    /// A statement in the batch may be a COPY.
    copy: bool,
    /// A database a statement of the batch drops, renames or copies (see `Pool::fence`).
    database: Option<String>,
    syncs: usize,
    /// Runs something (Execute); a batch that only prepares and describes does not.
    executes: bool,
    tx: Option<TxEffect>,
    /// Every statement it parses or uses is a session SET/RESET (pgjdbc's start-up
    /// `SET extra_float_digits = 3`): it runs where the session is, like a simple-query SET.
    /// (`None`: no statement.)
    state_only: Option<bool>,
    /// Portals bound in the batch that change session state (SET, LISTEN, …), not yet executed.
    bound_changes: Vec<(String, PendingState)>,
    /// Session-state changes the batch executes: pins apply when it is sent, SET/RESET are
    /// recorded for replay on the other server once it succeeds, as for a simple query.
    changes: Vec<PendingState>,
}

#[derive(Clone, Copy)]
enum TxEffect {
    Begin,
    End,
}

fn tx_effect(c: &Classified) -> Option<TxEffect> {
    c.statements.iter().fold(None, |acc, s| match s.kind {
        Kind::Begin { .. } => Some(TxEffect::Begin),
        Kind::Commit | Kind::Rollback | Kind::PrepareTransaction => Some(TxEffect::End),
        _ => acc,
    })
}

fn is_state_only(c: &Classified) -> bool {
    !c.statements.is_empty()
        && c.statements.iter().all(|s| {
            matches!(
                s.kind,
                Kind::Set { local: false, .. } | Kind::Reset { .. } | Kind::Empty
            )
        })
}

fn is_plain_begin(sql: &str) -> bool {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_ascii_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    matches!(
        words
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["begin"]
            | ["begin", "work"]
            | ["begin", "transaction"]
            | ["start", "transaction"]
            | ["begin", "read", "only"]
            | ["begin", "work" | "transaction", "read", "only"]
            | ["start", "transaction", "read", "only"]
    )
}

/// LISTEN/UNLISTEN and advisory locks need the primary but write nothing: not refused in replay mode.
fn only_pins(c: &Classified) -> bool {
    c.statements.iter().all(|s| {
        matches!(
            s.kind,
            Kind::Listen
                | Kind::Unlisten { .. }
                | Kind::AdvisoryLock
                | Kind::AdvisoryUnlockAll
                | Kind::Empty
        )
    })
}

fn is_pgnear(c: &Classified) -> bool {
    c.statements.iter().any(|s| {
        matches!(
            s.kind,
            Kind::PgnearSet { .. } | Kind::PgnearShow { .. } | Kind::PgnearReset { .. }
        )
    })
}

/// The command, when `c` is exactly one pgnear command.
fn pgnear_command(c: &Classified) -> Option<Kind> {
    let mut statements = c.statements.iter().filter(|s| s.kind != Kind::Empty);
    match (statements.next(), statements.next()) {
        (Some(s), None) if is_pgnear(c) => Some(s.kind.clone()),
        _ => None,
    }
}

impl Session {
    fn context(&self) -> Context {
        Context {
            in_transaction: self.open_tx,
            pinned: self.state.pins.any(),
            serializable: self.state.serializable_default,
            setting: self.state.setting,
            replica_available: self.replica_gate() != Gate::Unavailable,
        }
    }

    fn classify(&self, sql: &str) -> Arc<Classified> {
        self.shared.classifier.get_or_classify(sql)
    }

    /// Routes and sends one simple Query.
    pub(super) async fn on_query(&mut self, frame: BytesMut) -> Result<(), PgError> {
        // Shared, not copied: a replica read keeps it for a possible retry on the primary.
        let frame = frame.freeze();
        let text = query_text(&frame[5..])?;
        let sql: &str = &text;
        let c = self.classify(sql);
        // A simple query drops the unnamed statement, as the server does.
        self.state.unnamed = None;
        if is_pgnear(&c) {
            return self.answer_pgnear(&c).await;
        }
        // A Flush-ended exchange that only prepared (asyncpg's way, e.g. before its COPY) does
        // not hold the Query: see `dispatch_batch`.
        let prepared_on = self
            .unsynced
            .filter(|_| !self.unsynced_executed && self.open_tx.is_none());
        let prepared_on = match prepared_on {
            Some(_) if !self.prepared_fine().await? => None,
            other => other,
        };
        if prepared_on.is_some() {
            self.unsynced = None;
        }
        if self.open_tx.is_none()
            && self.unsynced.is_none()
            && self.deferred_begin.is_none()
            && self.defers(sql, &c)
        {
            // Answered now, sent with the next statement: that statement decides which server
            // holds the transaction (SET TRANSACTION READ ONLY sends it to the replica), and the
            // BEGIN costs no round trip of its own. A prepare-only exchange left open is ended
            // first: the transaction's statements must not join it.
            if let Some(prepared_on) = prepared_on {
                self.sync_prepared_only(prepared_on);
            }
            self.drain_all().await?;
            self.deferred_begin = Some(frame.clone());
            let mut out = BytesMut::new();
            write::command_complete(&mut out, "BEGIN");
            write::ready_for_query(&mut out, b'T');
            return self.write_client(&out).await;
        }
        if self.deferred_begin.is_some() {
            let sets = match c.statements.as_slice() {
                [s] => match s.kind {
                    Kind::SetTransaction { read_only } => read_only,
                    _ => None,
                },
                _ => None,
            };
            self.start_deferred(sets).await?;
        }
        if !c.is_read() && self.copy_role().is_none() {
            self.end_replica_exchange(false).await?;
        }
        let restore = self.state.restore_after(&c);
        let change = self.state.prepare_change(sql, &c);
        if let Some(change) = &change {
            self.state.apply_pins(change);
        }
        let starts_read_only_tx = c.statements.first().is_some_and(|s| {
            matches!(s.kind, Kind::Begin { read_only } if read_only || self.state.read_only_default)
        });
        let (role, reason) = if let Some(role) = self.copy_role() {
            // What follows a COPY FROM STDIN belongs to the server running it; a Query also
            // ends an exchange a Flush left open there.
            if self.unsynced.take().is_some() {
                self.end_unsynced_changes();
            }
            (role, Reason::Transaction)
        } else if let Some(role) = self.unsynced.take() {
            // A Query ends an exchange a Flush left open; it runs where that exchange is.
            self.end_unsynced_changes();
            (role, Reason::Transaction)
        } else if self.open_tx.is_none() && is_state_only(&c) {
            // SET and RESET run where the session is; other servers get them replayed later.
            (self.last, Reason::Read)
        } else {
            let request = RouteRequest {
                read: c.is_read(),
                hint: c.hint,
                starts_read_only_tx,
            };
            decide(request, self.context())
        };
        let shareable = prepared_on.is_none()
            && change.is_none()
            && self.may_share()
            && c.statements.len() == 1
            && c.is_read()
            && tx_effect(&c).is_none()
            && !may_copy(sql)
            && !self.taints(&c);
        let shared = shareable.then(|| SharedRead {
            frames: frame.clone(),
            query: true,
            statements: Vec::new(),
        });
        let (role, reason) = match self.settle(role, reason, shared).await? {
            Settled::Route(role, reason) => (role, reason),
            Settled::Done => return Ok(()),
        };
        if let Some(prepared_on) = prepared_on.filter(|&r| r != role) {
            self.sync_prepared_only(prepared_on);
        }
        if let Some(e) = self.refused.take() {
            return self.refuse_request(e, 1).await;
        }
        if reason == Reason::Write && self.replays_writes() && !only_pins(&c) {
            return self.refuse_request(self.replay_error(), 1).await;
        }
        tracing::debug!(route = role.name(), reason = reason.label(), "query routed");
        self.shared.metrics.statement(role, reason);
        match tx_effect(&c) {
            Some(TxEffect::Begin) => self.open_tx = Some(role),
            Some(TxEffect::End) => self.open_tx = None,
            None => {}
        }
        let again = (role == Role::Replica
            && reason == Reason::Read
            && self.open_tx.is_none()
            && restore.is_none())
        .then(|| Again::Query(frame.clone()));
        let capture = role == Role::Primary
            && self.open_tx.is_none()
            && !c.is_read()
            && !is_state_only(&c)
            && self.captures_lsn();
        let capture_after = capture && may_copy(sql);
        let capture = capture && !capture_after;
        let fences = if role == Role::Primary && !c.is_read() {
            fences_on(&self.shared, database_lifecycle(sql).as_deref())
        } else {
            Vec::new()
        };
        let request = Request {
            change,
            again,
            capture_after,
            fences,
            ..Request::default()
        };
        let taints = self.taints(&c);
        let statements: Vec<(String, Bytes)> = self
            .sql_uses(&c)
            .into_iter()
            .filter_map(|n| self.state.statements.get(&n).map(|f| (n, f.clone())))
            .collect();
        let server = self.server(role).await?;
        server.dirty |= taints;
        if prepare_missing(server, statements, usize::MAX) {
            // The session's own statement names: no later session may find them.
            server.dirty = true;
            server.send_internal_frame(tag::SYNC, &build_frame(tag::SYNC, &[]));
        }
        server.send_query(&frame, request);
        if let Some(sql) = restore.filter(|_| !server.expect.skipping) {
            // Its ReadyForQuery comes from the restore, once the startup settings are back.
            server.expect.defer_ready();
            server.send_internal_query(&sql, expect::Purpose::Restore);
        }
        if capture {
            server.send_internal_query(WRITE_LSN_QUERY, expect::Purpose::WriteLsn);
        }
        Ok(())
    }

    /// The state changes of a Flush-driven exchange that a Query or FunctionCall ends (not a
    /// Sync): whether they hold is not tracked, so the session stays on this server instead.
    fn end_unsynced_changes(&mut self) {
        if !self.unsynced_changes.is_empty() {
            self.unsynced_changes.clear();
            self.state.pins.extended_state = true;
        }
    }

    /// Routes and sends one FunctionCall (libpq's fast path: large objects). It may write, so it
    /// runs on the primary, or on the server holding the session's transaction.
    pub(super) async fn on_function_call(&mut self, frame: BytesMut) -> Result<(), PgError> {
        self.start_deferred(None).await?;
        if self.copy_role().is_none() {
            self.end_replica_exchange(false).await?;
        }
        if self.unsynced.is_some() {
            self.end_unsynced_changes();
        }
        let (role, reason) = match self.copy_role().or(self.open_tx).or(self.unsynced) {
            Some(role) => (role, Reason::Transaction),
            None => (Role::Primary, Reason::Write),
        };
        if reason == Reason::Write && self.replays_writes() {
            return self.refuse_request(self.replay_error(), 1).await;
        }
        tracing::debug!(
            route = role.name(),
            reason = reason.label(),
            "function call routed"
        );
        self.shared.metrics.statement(role, reason);
        let capture = reason == Reason::Write && self.captures_lsn();
        let session_mode = self.shared.config.pool.mode == PoolMode::Session;
        let server = self.server(role).await?;
        server.dirty |= session_mode;
        server.send_function_call(&frame);
        if capture {
            server.send_internal_query(WRITE_LSN_QUERY, expect::Purpose::WriteLsn);
        }
        Ok(())
    }

    /// The statements the client prepared with the protocol that `c` uses by name in SQL
    /// (`EXECUTE name`, `DEALLOCATE name`): they must exist where it runs. Session mode only:
    /// transaction mode's statements have shared names the SQL does not know.
    fn sql_uses(&self, c: &Classified) -> Vec<String> {
        if self.shares_statements() || self.state.statements.is_empty() {
            return Vec::new();
        }
        c.statements
            .iter()
            .filter_map(|s| match &s.kind {
                Kind::Execute { name } | Kind::Deallocate { name: Some(name) } => Some(name),
                _ => None,
            })
            .filter(|n| self.state.statements.contains_key(*n))
            .cloned()
            .collect()
    }

    /// Replay mode outside the primary region: writes are refused with a replay signal.
    fn replays_writes(&self) -> bool {
        self.write_mode == WriteMode::Replay && self.shared.region == RegionRole::Replica
    }

    fn replay_error(&self) -> PgError {
        self.shared.metrics.replay_refusals.inc();
        let r = &self.shared.config.regions;
        PgError::new(
            ErrorKind::Replay,
            format!(
                "cannot execute a write in region {}: writes run in the primary region {}",
                r.current, r.primary
            ),
        )
        .non_fatal()
        .with_hint(format!(
            "Replay the request in region {0} (fly-replay: region={0}).",
            r.primary
        ))
    }

    /// Whether commit positions are worth learning: a replica to wait for, or tokens to report.
    fn captures_lsn(&self) -> bool {
        self.shared.watcher.is_some() || self.shared.config.consistency.report_write_lsn
    }

    fn replica_gate(&self) -> Gate {
        let Some(w) = &self.shared.watcher else {
            return Gate::Unavailable;
        };
        let c = &self.shared.config.consistency;
        let target = self.write_lsn.max(self.min_lsn);
        gate::decide(c.mode, target, &w.current(), c.max_replica_lag.0)
    }

    /// Makes a replica read consistent: waits until the replica has replayed the session's
    /// writes. Returns a reason to use the primary instead, or sets `self.refused` when
    /// `on_timeout = "error"`.
    async fn consistent_read(&mut self) -> Result<Option<Reason>, PgError> {
        // A commit position still on its way back from the primary must be known first. So must
        // one still to be asked for: a COPY's is looked up after its ReadyForQuery, and a read
        // may follow the Sync that ends the COPY before that arrives. (Not while the COPY is
        // still waiting for the client's data or Sync: that answer would never come.)
        if self.primary.as_ref().is_some_and(|p| {
            let copy_ended =
                !p.reader.owed_sync && (!p.reader.copy_in || p.reader.client_ended_copy);
            p.expect.has_internal(expect::Purpose::WriteLsn)
                || (copy_ended && p.requests.iter().any(|r| r.capture_after || r.capture_owed))
        }) {
            self.drain(Role::Primary).await?;
        }
        let Some(watcher) = self.shared.watcher.clone() else {
            return Ok(Some(Reason::Fallback));
        };
        match self.replica_gate() {
            Gate::Go => Ok(None),
            Gate::Unavailable => Ok(Some(Reason::Fallback)),
            Gate::Wait(target) => {
                let c = &self.shared.config.consistency;
                let (timeout, on_timeout) = (c.wait_timeout.0, c.on_timeout);
                let metrics = self.shared.metrics.clone();
                metrics.lsn_waits.inc();
                let started = std::time::Instant::now();
                let waited = watcher.wait_for(target, timeout).await;
                metrics
                    .lsn_wait_seconds
                    .observe(started.elapsed().as_secs_f64());
                if waited.is_err() {
                    metrics.lsn_wait_timeouts.inc();
                }
                match waited {
                    Ok(()) => Ok(None),
                    Err(_) if on_timeout == OnTimeout::Primary => Ok(Some(Reason::Fallback)),
                    Err(reached) => {
                        self.refused = Some(not_consistent(target, reached, timeout));
                        Ok(None)
                    }
                }
            }
        }
    }

    /// Answers a request pgnear will not run: the error, then ReadyForQuery per Sync.
    pub(super) async fn refuse_request(&mut self, e: PgError, syncs: usize) -> Result<(), PgError> {
        // Answers still owed for earlier requests go first.
        self.drain_all().await?;
        let mut out = BytesMut::new();
        if syncs == 0 {
            // A Flush-driven exchange: the error now, ReadyForQuery when its Sync comes.
            write::error_response(&mut out, &e);
        }
        for _ in 0..syncs {
            write::error_response(&mut out, &e);
            write::ready_for_query(&mut out, self.client_tx_status());
        }
        self.write_client(&out).await
    }

    /// A lone plain `BEGIN` (or `BEGIN READ ONLY`) is deferred until the transaction's first
    /// statement, which may still make it read-write, read-only or SERIALIZABLE. Only the exact
    /// forms that cannot fail are, so that answering it early never hides an error.
    fn defers(&self, sql: &str, c: &Classified) -> bool {
        c.statements.len() == 1
            && matches!(c.statements[0].kind, Kind::Begin { .. })
            && is_plain_begin(sql)
            && !self.replays_writes()
    }

    /// Sends the deferred BEGIN (its answer was already given) to the server that will hold the
    /// transaction: the replica for a read-only one that can be served consistently there.
    /// `sets`: what the transaction's first statement sets (`SET TRANSACTION READ ONLY` or
    /// `READ WRITE`, or SERIALIZABLE, which is `Some(false)`).
    pub(super) async fn start_deferred(&mut self, sets: Option<bool>) -> Result<(), PgError> {
        let Some(begin) = self.deferred_begin.take() else {
            return Ok(());
        };
        let begins_read_only = query_text(&begin[5..]).is_ok_and(|sql| {
            let c = self.classify(&sql);
            matches!(c.statements[..], [ref s] if s.kind == Kind::Begin { read_only: true })
        });
        let read_only = sets.unwrap_or(begins_read_only || self.state.read_only_default);
        let mut role = Role::Primary;
        let ctx = self.context();
        if read_only && ctx.replica_available && !ctx.pinned && !ctx.serializable {
            let fallback = self.consistent_read().await?;
            let refused = self.refused.take().is_some();
            if fallback.is_none() && !refused && self.ensure_replica().await.is_ok() {
                role = Role::Replica;
            }
        }
        self.open_tx = Some(role);
        self.server(role)
            .await?
            .send_internal_frame(tag::QUERY, &begin);
        Ok(())
    }

    fn client_tx_status(&self) -> u8 {
        if self.deferred_begin.is_some() {
            return b'T';
        }
        self.open_tx
            .and_then(|r| self.slot_ref(r).map(|s| s.tx))
            .unwrap_or(b'I')
    }

    /// For a replica route: makes the read consistent and connects the replica, or falls back to
    /// the primary. (With `on_timeout = "error"` it sets `self.refused` instead.)
    /// With `shared`, a read that passes the gate is first offered to the shared (pipelined)
    /// replica connections: `Settled::Done` when one ran it.
    async fn settle(
        &mut self,
        role: Role,
        reason: Reason,
        shared: Option<SharedRead>,
    ) -> Result<Settled, PgError> {
        // A transaction (or an unsynced exchange) stays where it is, whatever the gate says.
        if role != Role::Replica || reason == Reason::Transaction {
            return Ok(Settled::Route(role, reason));
        }
        if let Some(fallback) = self.consistent_read().await? {
            return Ok(Settled::Route(Role::Primary, fallback));
        }
        if let Some(read) = shared.filter(|_| self.refused.is_none()) {
            match self.pipelined(read).await? {
                Piped::Served => {
                    self.shared.metrics.statement(role, reason);
                    self.shared.metrics.pool(role).pipelined.inc();
                    return Ok(Settled::Done);
                }
                Piped::Lost => return Ok(Settled::Route(Role::Primary, Reason::Retry)),
                Piped::Unsent => {}
            }
        }
        Ok(match self.ensure_replica().await {
            Err(_) => Settled::Route(Role::Primary, Reason::Fallback),
            Ok(()) => Settled::Route(role, reason),
        })
    }

    /// Whether this session's next autocommit read may use a shared replica connection.
    fn may_share(&self) -> bool {
        self.shared.lanes.is_some()
            && self.replica.is_none()
            && self.open_tx.is_none()
            && self.unsynced.is_none()
            && self.deferred_begin.is_none()
            && !self.state.pins.any()
    }

    /// Runs a read on a shared replica connection and relays its answer.
    async fn pipelined(&mut self, read: SharedRead) -> Result<Piped, PgError> {
        let Some(lanes) = self.shared.lanes.clone() else {
            return Ok(Piped::Unsent);
        };
        self.drain_all().await?;
        // One channel per session for the answers of all its pipelined reads (they run one
        // at a time).
        let answers = self
            .answers
            .get_or_insert_with(|| Box::new(tokio::sync::mpsc::channel(REPLY_CHUNKS)));
        let job = Job {
            frames: read.frames,
            query: read.query,
            applied: self.state.applied_shared(),
            statements: read.statements,
            cancel: self.cancel.slot.clone(),
            reply: answers.0.clone(),
        };
        if lanes.submit(&self.target, job).is_err() {
            return Ok(Piped::Unsent);
        }
        // The lane points the cancel slot at its connection while the read runs.
        self.cancel_role = None;
        let mut begun = false;
        loop {
            let answer = match self.answers.as_mut() {
                Some(a) => a.1.recv().await,
                None => None,
            };
            let lost = match answer {
                Some(Reply::Bytes(out)) => {
                    begun = true;
                    self.write_client(&out).await?;
                    continue;
                }
                Some(Reply::Done(request, retry)) => {
                    if let Some(t) = request.started {
                        let seconds = t.elapsed().as_secs_f64();
                        self.shared.metrics.duration(Role::Replica, seconds);
                    }
                    if let Some(retry) = retry {
                        Box::pin(self.retry_on_primary(retry)).await?;
                    }
                    return Ok(Piped::Served);
                }
                Some(Reply::Unsent) => return Ok(Piped::Unsent),
                Some(Reply::Failed(e)) => e,
                None => PgError::upstream("a shared replica connection was dropped")
                    .with_detail("The statement may not have completed."),
            };
            if begun {
                return self.shared_read_failed(lost).await.map(|()| Piped::Served);
            }
            // Nothing of the answer reached the client, and a standby changed nothing.
            tracing::info!(error = %lost, "a shared replica connection was lost before the read's answer began; running it on the primary");
            self.shared.metrics.error(lost.kind);
            return Ok(Piped::Lost);
        }
    }

    /// A read on a shared replica connection failed with the connection: the client gets the
    /// error and the session goes on, as when its own replica connection is lost.
    async fn shared_read_failed(&mut self, e: PgError) -> Result<(), PgError> {
        self.shared.metrics.error(e.kind);
        let mut out = BytesMut::new();
        write::error_response(&mut out, &PgError { fatal: false, ..e });
        write::ready_for_query(&mut out, b'I');
        self.write_client(&out).await
    }

    /// Connects the replica if it is not yet connected.
    async fn ensure_replica(&mut self) -> Result<(), PgError> {
        if self.replica.is_some() {
            return Ok(());
        }
        let last = self.last;
        let result = self.server(Role::Replica).await.map(|_| ());
        if let Err(e) = &result {
            tracing::warn!(error = %e, "replica unavailable; reads go to the primary");
            self.last = last;
        }
        result
    }

    /// The replica refused a query (see `Retry`): run it on the primary, once, and remember
    /// that this text writes when that was the reason.
    pub(super) async fn retry_on_primary(&mut self, retry: Retry) -> Result<(), PgError> {
        let frame = retry.frame;
        if let Some(sql) = query_text(&frame[5..]).ok().filter(|_| retry.learn) {
            self.shared.classifier.mark_write(&sql);
        }
        tracing::debug!("replica refused a read-only query; running it on the primary");
        self.shared.metrics.replica_retries.inc();
        self.shared.metrics.statement(Role::Primary, Reason::Retry);
        let capture = self.captures_lsn();
        let server = self.server(Role::Primary).await?;
        server.send_query(&frame, Request::default());
        if capture {
            // It wrote: its commit position must gate the session's next reads.
            server.send_internal_query(WRITE_LSN_QUERY, expect::Purpose::WriteLsn);
        }
        self.flush_servers().await
    }

    /// Runs on the primary, in order, replica reads whose answers had not begun when the
    /// replica was lost (see `Session::replica_lost`).
    pub(super) async fn run_again_on_primary(
        &mut self,
        reads: Vec<(Request, Again)>,
    ) -> Result<(), PgError> {
        let shared_names = self.shares_statements();
        let limit = self.statement_limit();
        let metrics = self.shared.metrics.clone();
        let primary = self.server(Role::Primary).await?;
        for (mut request, again) in reads {
            metrics.statement(Role::Primary, Reason::Retry);
            match again {
                Again::Query(frame) => primary.send_query(&frame, request),
                Again::Batch {
                    frames,
                    statements,
                    unnamed,
                } => {
                    primary.dirty |= prepare_missing(primary, statements, limit) && !shared_names;
                    if let Some(parse) = &unnamed {
                        primary.send_internal_frame(tag::PARSE, parse);
                    }
                    send_batch(primary, &frames, shared_names.then_some(&[]), limit);
                    request.started = Some(std::time::Instant::now());
                    primary.requests.push_back(request);
                }
            }
        }
        self.flush_servers().await
    }

    /// Most statements pgnear keeps prepared on one server connection for this session.
    fn statement_limit(&self) -> usize {
        if self.shares_statements() {
            STATEMENTS_PER_CONNECTION
        } else {
            usize::MAX
        }
    }

    /// Sends the pending extended-protocol messages to the server chosen for them.
    pub(super) async fn dispatch_batch(&mut self) -> Result<(), PgError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        if self.deferred_begin.is_some() {
            self.start_deferred(None).await?;
        }
        let plan = self.plan_batch()?;
        if plan.pgnear && !plan.other && !plan.sticky {
            return self.answer_pgnear_batch().await;
        }
        if plan.executes && !plan.read && self.copy_role().is_none() {
            self.end_replica_exchange(plan.sticky).await?;
        }
        // An exchange a Flush left open after only Parse/Describe (asyncpg prepares every
        // statement that way) holds nothing the next statement depends on: when that statement
        // runs, it is routed on its own, and the server that prepared is sent a Sync.
        let movable = self.unsynced.is_some()
            && !self.unsynced_executed
            && plan.executes
            && !plan.sticky
            && self.open_tx.is_none()
            && self.prepared_fine().await?;
        let (role, reason) = if let Some(role) = self.copy_role() {
            // What follows a COPY FROM STDIN (its Sync, say) belongs to the server running it.
            (role, Reason::Transaction)
        } else if let Some(role) = self.unsynced.filter(|_| !movable) {
            // The rest of an exchange that a Flush left open (an implicit transaction, a
            // skip-to-Sync after an error) belongs to the server that has it.
            (role, Reason::Transaction)
        } else if plan.sticky {
            (self.last, Reason::Transaction)
        } else if let Some(role) = self
            .unnamed_role
            .filter(|_| plan.needs_unnamed && self.state.unnamed.is_none())
        {
            // The unnamed statement's last Parse failed there: that server answers for it
            // (as Postgres would: it does not exist), not one holding an older one.
            (role, Reason::Transaction)
        } else if plan.state_only == Some(true) && self.open_tx.is_none() {
            // SET and RESET run where the session is; other servers get them replayed later.
            (self.last, Reason::Read)
        } else {
            let request = RouteRequest {
                read: plan.read,
                hint: plan.hint,
                starts_read_only_tx: plan.starts_read_only_tx,
            };
            decide(request, self.context())
        };
        let shared = self.shareable(&plan).then(|| SharedRead {
            frames: Bytes::copy_from_slice(&self.batch),
            query: false,
            statements: plan
                .needs
                .iter()
                .filter_map(|n| self.state.statements.get(n).map(|f| (n.clone(), f.clone())))
                .collect(),
        });
        let (role, reason) = match self.settle(role, reason, shared).await? {
            Settled::Route(role, reason) => (role, reason),
            Settled::Done => {
                self.batch.clear();
                self.batch_tags.clear();
                if plan.parsed_unnamed {
                    // Parsed on a shared connection: no server of the session has it now.
                    self.unnamed_role = None;
                }
                return Ok(());
            }
        };
        if let Some(e) = self.refused.take() {
            self.batch.clear();
            self.batch_tags.clear();
            return self.refuse_request(e, plan.syncs).await;
        }
        if reason == Reason::Write && self.replays_writes() {
            self.batch.clear();
            self.batch_tags.clear();
            return self.refuse_request(self.replay_error(), plan.syncs).await;
        }
        tracing::debug!(route = role.name(), reason = reason.label(), "batch routed");
        if plan.executes {
            self.shared.metrics.statement(role, reason);
        }
        for change in &plan.changes {
            self.state.apply_pins(change);
        }
        match plan.tx {
            Some(TxEffect::Begin) => self.open_tx = Some(role),
            Some(TxEffect::End) => self.open_tx = None,
            None => {}
        }
        // An autocommit read that starts and ends its exchange can run again on the primary if
        // the replica is lost before its answer begins (see `Session::replica_lost`).
        let again_on_primary = role == Role::Replica
            && reason == Reason::Read
            && self.unsynced.is_none()
            && self.open_tx.is_none()
            && plan.syncs == 1
            && plan.dups.is_empty()
            && self.batch_tags.last() == Some(&tag::SYNC);
        let mut executed_before = self.unsynced.is_some() && self.unsynced_executed;
        if let Some(prepared_on) = self.unsynced.filter(|_| movable) {
            executed_before = false;
            if prepared_on != role {
                self.sync_prepared_only(prepared_on);
            }
        }
        self.unsynced = (plan.syncs == 0).then_some(role);
        self.unsynced_executed = plan.syncs == 0 && (plan.executes || executed_before);
        let capture_lsn = role == Role::Primary
            && plan.executes
            && self.open_tx.is_none()
            && !plan.read
            && plan.state_only != Some(true)
            && plan.syncs > 0
            && !self.state.pins.extended_state
            && self.captures_lsn();
        let batch = std::mem::take(&mut self.batch);
        if plan.needs_unnamed
            && !plan.parsed_unnamed
            && self.unnamed_role == Some(role)
            && self.copy_role().is_none()
            && self
                .slot_ref(role)
                .is_some_and(|s| s.unnamed_dropped && s.expect.unnamed_pending())
        {
            // The unnamed statement is to be parsed again (pgnear's own query dropped it), but
            // whether its Parse succeeded is in an answer still to come: a failed one must not
            // be parsed again (Postgres would not have it). Pipelines rarely get here.
            self.drain(role).await?;
        }
        // (After the drain: in transaction mode it may have given the connection back.)
        let unnamed_here = self.unnamed_role == Some(role);
        let unnamed = self.state.unnamed.clone().filter(|_| plan.needs_unnamed);
        let statements: Vec<(String, Bytes)> = plan
            .needs
            .iter()
            .filter_map(|n| self.state.statements.get(n).map(|f| (n.clone(), f.clone())))
            .collect();
        let shared_names = self.shares_statements();
        let limit = self.statement_limit();
        let mut again = again_on_primary.then(|| Again::Batch {
            frames: Bytes::copy_from_slice(&batch),
            statements: statements.clone(),
            unnamed: unnamed.clone(),
        });
        // A Flush-driven exchange's changes wait for the Sync that ends it.
        let mut changes = std::mem::take(&mut self.unsynced_changes);
        changes.extend(plan.changes);
        if plan.syncs == 0 {
            self.unsynced_changes = std::mem::take(&mut changes);
        }
        let mut change = changes.into_iter().reduce(|mut all, c| {
            all.extend(c);
            all
        });
        let server = self.server(role).await?;
        server.dirty |= plan.taints;
        for name in std::mem::take(&mut server.to_close) {
            server.send_internal_frame(tag::CLOSE, &close_frame(&name));
        }
        // Session mode: the session's own statement names, which no later session may find.
        server.dirty |= prepare_missing(server, statements, limit) && !shared_names;
        // A simple query of pgnear's own since (a commit-position lookup, a state replay)
        // dropped the server's unnamed statement: it is parsed again.
        let unnamed = unnamed.filter(|_| !unnamed_here || server.unnamed_dropped);
        if let Some(parse) = &unnamed {
            server.send_internal_frame(tag::PARSE, parse);
        }
        if plan.parsed_unnamed || unnamed.is_some() {
            server.unnamed_dropped = false;
        }
        send_batch(
            server,
            &batch,
            shared_names.then_some(&plan.dups[..]),
            limit,
        );
        // The first Sync after an extended-protocol COPY ends the request already in flight.
        let owed = usize::from(std::mem::take(&mut server.reader.owed_sync));
        let database = plan
            .database
            .filter(|_| role == Role::Primary && plan.executes);
        let mut fences = fences_on(&self.shared, database.as_deref());
        let server = self.slot(role).as_mut().expect("connected above");
        for i in owed.min(plan.syncs)..plan.syncs {
            let last = i + 1 == plan.syncs;
            server.requests.push_back(Request {
                change: if last { change.take() } else { None },
                fences: if last {
                    std::mem::take(&mut fences)
                } else {
                    Vec::new()
                },
                capture_after: last && capture_lsn && plan.copy,
                may_copy_in: plan.copy && !plan.read,
                again: if last { again.take() } else { None },
                started: Some(std::time::Instant::now()),
                ..Request::default()
            });
        }
        if capture_lsn && !plan.copy {
            server.send_internal_query(WRITE_LSN_QUERY, expect::Purpose::WriteLsn);
        }
        self.forget_statements(role, &plan.closed);
        if plan.parsed_unnamed || unnamed.is_some() {
            self.unnamed_role = Some(role);
        }
        self.batch = batch;
        self.batch.clear();
        self.batch_tags.clear();
        Ok(())
    }

    /// Whether a batch is one autocommit read a shared replica connection can run: it ends
    /// in its only Sync, executes only reads, changes no state, and uses no statement that
    /// lives on one server (the unnamed one from an earlier batch, a portal, a Parse of a
    /// named statement, which goes the usual way once).
    fn shareable(&self, plan: &BatchPlan) -> bool {
        self.may_share()
            && plan.syncs == 1
            && self.batch_tags.last() == Some(&tag::SYNC)
            && plan.executes
            && plan.read
            && plan.changes.is_empty()
            && plan.closed.is_empty()
            && plan.parsed.is_empty()
            && plan.tx.is_none()
            && plan.state_only != Some(true)
            && !(plan.needs_unnamed
                || plan.sticky
                || plan.pgnear
                || plan.taints
                || plan.copy
                || self.state.pins.extended_state)
    }

    /// A write comes into an exchange a Flush left open on the replica, which ran reads there:
    /// unless the write runs a portal of that exchange, the exchange ends on the replica (its
    /// reads' answers are in; a standby changed nothing) and the write is routed on its own,
    /// as Postgres runs both in one implicit transaction. Not after an error there (the server
    /// skips what follows up to the Sync), nor with state changes waiting for the Sync.
    async fn end_replica_exchange(&mut self, sticky: bool) -> Result<(), PgError> {
        if self.unsynced != Some(Role::Replica)
            || !self.unsynced_executed
            || sticky
            || self.open_tx.is_some()
            || !self.unsynced_changes.is_empty()
            || !self.prepared_fine().await?
        {
            return Ok(());
        }
        self.sync_prepared_only(Role::Replica);
        self.unsynced = None;
        self.unsynced_executed = false;
        Ok(())
    }

    /// Whether the prepare-only exchange a Flush left open succeeded, once its answers are in:
    /// after an error the server skips everything up to the Sync, so what follows must go
    /// where it is skipped too, not run elsewhere. (Drivers wait for those answers before
    /// going on, so this rarely waits.)
    async fn prepared_fine(&mut self) -> Result<bool, PgError> {
        let Some(role) = self.unsynced else {
            return Ok(true);
        };
        self.drain(role).await?;
        Ok(self.slot_ref(role).is_none_or(|s| !s.expect.skipping))
    }

    /// Ends an exchange that only prepared and described on `role` (it was left open by a
    /// Flush, and what follows runs elsewhere): pgnear's own Sync, its answer swallowed.
    fn sync_prepared_only(&mut self, role: Role) {
        if let Some(s) = self.slot(role).as_mut() {
            s.send_internal_frame(tag::SYNC, &build_frame(tag::SYNC, &[]));
        }
    }

    /// Reads the batch: which statements it parses, binds, runs and closes.
    fn plan_batch(&mut self) -> Result<BatchPlan, PgError> {
        let mut plan = BatchPlan {
            read: true,
            ..BatchPlan::default()
        };
        let mut parsed_unnamed = false;
        let mut bound_portals: Vec<&str> = Vec::new();
        // Statements parsed in the batch since its last Sync.
        let mut exchange: Vec<String> = Vec::new();
        // Transaction mode: the client's names are known only before they are renamed.
        let renamed_dups = if self.shares_statements() {
            Some(self.rename_statements()?)
        } else {
            None
        };
        let batch = std::mem::take(&mut self.batch);
        let bad = |what: &str| PgError::protocol(format!("invalid {what} message"));
        for (i, (t, frame)) in frames(&batch).enumerate() {
            let body = &frame[5..];
            match t {
                tag::PARSE => {
                    let (name, used) = cstr(body).ok_or_else(|| bad("Parse"))?;
                    let (sql, _) = sql_text(&body[used..]).ok_or_else(|| bad("Parse"))?;
                    let sql: &str = &sql;
                    let c = self.classify(sql);
                    if c.is_read() {
                        note_read_text(sql, &mut plan);
                    } else {
                        note_text(sql, &mut plan);
                    }
                    self.note_statement(&c, &mut plan);
                    let frame = Bytes::copy_from_slice(frame);
                    if name.is_empty() {
                        parsed_unnamed = true;
                        self.state.unnamed = Some(frame);
                    } else if let Some(dup) = match &renamed_dups {
                        Some(dups) => dups.iter().find(|&&(at, _)| at == i).map(|&(_, e)| e),
                        None => self.duplicate(name, &plan, &exchange),
                    } {
                        // The name exists: the server is to refuse it (42P05), so it must have
                        // the statement too, and the session keeps the statement it has.
                        if dup && !plan.needs.iter().any(|n| n == name) {
                            plan.needs.push(name.to_string());
                        }
                        plan.dups.push(i);
                    } else {
                        exchange.push(name.to_string());
                        self.state.statements.insert(name.to_string(), frame);
                        plan.parsed.push(name.to_string());
                        // A session's own statement names leave state behind; transaction
                        // mode's shared ones are meant to stay.
                        plan.taints |= !self.shares_statements();
                    }
                }
                tag::BIND => {
                    let (portal, used) = cstr(body).ok_or_else(|| bad("Bind"))?;
                    let (stmt, _) = cstr(&body[used..]).ok_or_else(|| bad("Bind"))?;
                    bound_portals.push(portal);
                    self.note_use(stmt, parsed_unnamed, &mut plan);
                    let sql = match stmt {
                        "" => self.state.unnamed.as_ref(),
                        name => self.state.statements.get(name),
                    }
                    .and_then(|parse| parse_text(parse));
                    plan.bound_changes.retain(|(p, _)| p != portal);
                    if let Some(sql) = sql {
                        let c = self.classify(&sql);
                        if let Some(change) = self.state.prepare_change(&sql, &c) {
                            plan.bound_changes.push((portal.to_string(), change));
                        }
                    }
                }
                tag::DESCRIBE | tag::CLOSE => {
                    let kind = *body.first().ok_or_else(|| bad("Describe/Close"))?;
                    let (name, _) = cstr(&body[1..]).ok_or_else(|| bad("Describe/Close"))?;
                    match (t, kind) {
                        (tag::CLOSE, b'S') if !name.is_empty() && name != NO_STATEMENT => {
                            plan.closed.push(name.to_string())
                        }
                        (tag::DESCRIBE, b'S') => self.note_use(name, parsed_unnamed, &mut plan),
                        (tag::DESCRIBE, b'P') if !bound_portals.contains(&name) => {
                            plan.sticky = true
                        }
                        _ => {}
                    }
                }
                tag::EXECUTE => {
                    plan.executes = true;
                    let (portal, _) = cstr(body).ok_or_else(|| bad("Execute"))?;
                    if !bound_portals.contains(&portal) {
                        plan.sticky = true;
                    }
                    if let Some(i) = plan.bound_changes.iter().position(|(p, _)| p == portal) {
                        plan.changes.push(plan.bound_changes.remove(i).1);
                    }
                }
                tag::SYNC => {
                    plan.syncs += 1;
                    exchange.clear();
                }
                _ => {}
            }
        }
        self.batch = batch;
        plan.parsed_unnamed = parsed_unnamed;
        if !plan.executes && !self.state.pins.extended_state {
            // Preparing and describing any statement works on a standby and writes nothing: the
            // replica saves a round trip to a far primary, which re-prepares it when it runs.
            plan.read = true;
            plan.tx = None;
        }
        Ok(plan)
    }

    /// Whether a Parse of `name` at this point of the batch names a statement that exists, so
    /// that Postgres refuses it: `Some(true)` for one from an earlier batch (to be prepared where
    /// the batch runs first), `Some(false)` for one parsed earlier in the same exchange (if that
    /// Parse failed, the server skips this one anyway). A name parsed before an earlier Sync of
    /// the batch may or may not exist by now: the server alone tells.
    fn duplicate(&self, name: &str, plan: &BatchPlan, exchange: &[String]) -> Option<bool> {
        if exchange.iter().any(|n| n == name) {
            return Some(false);
        }
        let earlier = self.state.statements.contains_key(name)
            && !plan.parsed.iter().any(|n| n == name)
            && !plan.closed.iter().any(|n| n == name);
        earlier.then_some(true)
    }

    /// A statement used (Bind, Describe) in the batch: it must exist where the batch runs.
    fn note_use(&mut self, stmt: &str, parsed_unnamed: bool, plan: &mut BatchPlan) {
        // A statement from an earlier batch: its text tells what the Parse's did then.
        let earlier = match stmt {
            "" if !parsed_unnamed => self.state.unnamed.as_ref(),
            "" => None,
            name if !plan.parsed.iter().any(|p| p == name) => self.state.statements.get(name),
            _ => None,
        };
        if let Some(sql) = earlier.and_then(|f| parse_text(f)) {
            note_text(&sql, plan);
        }
        if stmt.is_empty() {
            if !parsed_unnamed {
                plan.needs_unnamed = true;
                if let Some(c) = self.statement_class(None) {
                    self.note_statement(&c, plan);
                }
            }
        } else if !plan.parsed.iter().any(|p| p == stmt) {
            match self.statement_class(Some(stmt)) {
                Some(c) => {
                    // Known from an earlier Parse: it is prepared where the batch runs. (One
                    // parsed later in this batch does not exist yet when this message runs.)
                    if !plan.needs.iter().any(|n| n == stmt) {
                        plan.needs.push(stmt.to_string());
                    }
                    self.note_statement(&c, plan)
                }
                // Unknown to pgnear: let the server report it, on the primary.
                None => {
                    plan.read = false;
                    plan.state_only = Some(false);
                    plan.other = true;
                }
            }
        }
    }

    fn statement_class(&self, name: Option<&str>) -> Option<Arc<Classified>> {
        let frame = match name {
            Some(n) => self.state.statements.get(n)?,
            None => self.state.unnamed.as_ref()?,
        };
        Some(self.classify(&parse_text(frame)?))
    }

    fn note_statement(&mut self, c: &Classified, plan: &mut BatchPlan) {
        if pgnear_command(c).is_some() {
            plan.pgnear = true;
            return;
        }
        for name in self.sql_uses(c) {
            if !plan.needs.contains(&name) {
                plan.needs.push(name);
            }
        }
        plan.other = true;
        plan.read &= c.is_read();
        plan.state_only = Some(plan.state_only.unwrap_or(true) && is_state_only(c));
        plan.hint = plan.hint.or(c.hint);
        if let Some(effect) = tx_effect(c) {
            plan.tx = Some(effect);
        }
        if c.statements.iter().any(|s| {
            matches!(s.kind, Kind::Begin { read_only } if read_only || self.state.read_only_default)
        }) {
            plan.starts_read_only_tx = true;
        }
        // Session state changed through the extended protocol stays on the primary.
        let changes_state = c.statements.iter().any(|s| {
            !matches!(
                s.kind,
                Kind::Read
                    | Kind::Write
                    | Kind::Empty
                    | Kind::Begin { .. }
                    | Kind::Commit
                    | Kind::Rollback
                    | Kind::Savepoint
                    | Kind::Release
                    | Kind::RollbackTo
                    | Kind::SetTransaction { .. }
                    | Kind::Set { local: true, .. }
            )
        });
        // What pgnear tracks for simple queries (SET/RESET replayed, LISTEN and the like
        // pinning until released) it tracks here too, from the Execute (see `plan_batch`).
        let tracked = c.statements.iter().all(|s| {
            matches!(s.kind, Kind::Read | Kind::Write | Kind::Empty) || state::is_tracked(&s.kind)
        });
        if changes_state && !tracked {
            self.state.pins.extended_state = true;
            plan.read = false;
        }
        plan.taints |= self.taints(c);
    }

    /// Whether running `c` may leave state on its server that pgnear does not track and a
    /// later session must not see. Settings are tracked (re-applied per session). In session
    /// mode a write may have changed anything (`set_config`, a cursor WITH HOLD...); in
    /// transaction mode, as in other poolers, that is the application's contract.
    fn taints(&self, c: &Classified) -> bool {
        let session_mode = self.shared.config.pool.mode == PoolMode::Session;
        c.statements.iter().any(|s| match s.kind {
            Kind::Write => session_mode,
            Kind::Listen
            | Kind::CreateTemp
            | Kind::AdvisoryLock
            | Kind::Prepare { .. }
            | Kind::Discard { .. } => true,
            _ => false,
        })
    }

    /// Transaction mode shares prepared statements between sessions, under names derived from
    /// their text (`pgnear_<hash>`).
    pub(super) fn shares_statements(&self) -> bool {
        self.shared.config.pool.mode == PoolMode::Transaction
    }

    /// Rewrites the batch's statement names (Parse, Bind, Describe, Close) to the shared
    /// server-side names. A Close only forgets the client's name: it is sent for a name that
    /// never exists, which the server answers with CloseComplete. Returns the Parses of a name
    /// the client has already, as `duplicate` does.
    fn rename_statements(&mut self) -> Result<Vec<(usize, bool)>, PgError> {
        let batch = std::mem::take(&mut self.batch);
        let mut out = BytesMut::with_capacity(batch.len() + 64);
        let bad = |what: &str| PgError::protocol(format!("invalid {what} message"));
        // Client names parsed in the batch since its last Sync.
        let mut exchange: Vec<&str> = Vec::new();
        let mut dups = Vec::new();
        for (i, (t, frame)) in frames(&batch).enumerate() {
            let body = &frame[5..];
            match t {
                tag::PARSE => {
                    let (name, used) = cstr(body).ok_or_else(|| bad("Parse"))?;
                    if name.is_empty() {
                        out.extend_from_slice(frame);
                        continue;
                    }
                    // A name the client has already: the Parse goes out under the shared name it
                    // has, which the server refuses (42P05), keeping the statement.
                    let existing = self.state.names.get(name).filter(|shared| {
                        exchange.contains(&name) || self.state.statements.contains_key(*shared)
                    });
                    let shared = match existing {
                        Some(shared) => {
                            dups.push((i, !exchange.contains(&name)));
                            shared.clone()
                        }
                        None => {
                            let shared = self.shared_name(&body[used..]);
                            self.state.names.insert(name.to_string(), shared.clone());
                            shared
                        }
                    };
                    exchange.push(name);
                    out.extend_from_slice(&renamed_parse(frame, &shared));
                }
                tag::SYNC => {
                    exchange.clear();
                    out.extend_from_slice(frame);
                }
                tag::BIND => {
                    let (portal, used) = cstr(body).ok_or_else(|| bad("Bind"))?;
                    let (stmt, used2) = cstr(&body[used..]).ok_or_else(|| bad("Bind"))?;
                    match self.state.names.get(stmt) {
                        Some(shared) => out.extend_from_slice(&build_frame(
                            tag::BIND,
                            &[
                                portal.as_bytes(),
                                b"\0",
                                shared.as_bytes(),
                                b"\0",
                                &body[used + used2..],
                            ],
                        )),
                        None => out.extend_from_slice(frame),
                    }
                }
                tag::DESCRIBE | tag::CLOSE if body.first() == Some(&b'S') => {
                    let (name, _) = cstr(&body[1..]).ok_or_else(|| bad("Describe/Close"))?;
                    let target = if t == tag::CLOSE {
                        self.state
                            .names
                            .remove(name)
                            .map(|_| NO_STATEMENT.to_string())
                    } else {
                        self.state.names.get(name).cloned()
                    };
                    match target {
                        Some(target) => out
                            .extend_from_slice(&build_frame(t, &[b"S", target.as_bytes(), b"\0"])),
                        None => out.extend_from_slice(frame),
                    }
                }
                _ => out.extend_from_slice(frame),
            }
        }
        self.batch = out;
        Ok(dups)
    }

    /// `pgnear_` and a hash of the statement's text and parameter types (and the search_path
    /// it is planned under, which decides what its names mean).
    fn shared_name(&self, text_and_types: &[u8]) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(text_and_types);
        if let Some(sql) = self.state.setting_sql("search_path") {
            h.update(sql.as_bytes());
        }
        let digest = h.finalize();
        let mut name = String::with_capacity(39);
        name.push_str("pgnear_");
        for b in &digest[..16] {
            name.push_str(&format!("{b:02x}"));
        }
        name
    }

    /// Answers SHOW/SET/RESET pgnear.* itself, after everything sent before it was answered.
    async fn answer_pgnear(&mut self, c: &Classified) -> Result<(), PgError> {
        self.drain_all().await?;
        let mut out = BytesMut::new();
        match pgnear_command(c) {
            Some(kind) => {
                self.run_pgnear(&kind, &mut out, true);
            }
            None => {
                let e = PgError::new(
                    crate::error::ErrorKind::Protocol,
                    "pgnear commands must be sent alone, one per query",
                )
                .non_fatal();
                write::error_response(
                    &mut out,
                    &PgError {
                        code: Some("0A000".into()),
                        ..e
                    },
                );
            }
        }
        write::ready_for_query(&mut out, self.client_tx_status());
        self.write_client(&out).await
    }

    /// Runs one in-band command, writing its answer (with the RowDescription of a SHOW when
    /// `describe`, as the simple protocol has it). False when it failed.
    fn run_pgnear(&mut self, kind: &Kind, out: &mut BytesMut, describe: bool) -> bool {
        let done = match kind {
            Kind::PgnearShow { name } => match self.show(name) {
                Some(value) => {
                    if describe {
                        write::text_row_description(out, &format!("pgnear.{name}"));
                    }
                    write::text_data_row(out, value.as_deref());
                    Ok("SHOW")
                }
                None => Err(unknown_setting(name)),
            },
            Kind::PgnearSet { name, value } => self.set(name, Some(value)).map(|()| "SET"),
            Kind::PgnearReset { name } => self
                .set(name.as_deref().unwrap_or("route"), None)
                .map(|()| "RESET"),
            _ => Ok("SHOW"),
        };
        match done {
            Ok(tag) => {
                write::command_complete(out, tag);
                true
            }
            Err(e) => {
                write::error_response(out, &e);
                false
            }
        }
    }

    /// Answers an extended-protocol batch whose every statement is a pgnear command (drivers
    /// that prepare everything, e.g. psycopg after a few runs, send `SHOW pgnear.write_lsn`
    /// this way), after everything sent before it was answered.
    async fn answer_pgnear_batch(&mut self) -> Result<(), PgError> {
        self.drain_all().await?;
        let batch = std::mem::take(&mut self.batch);
        let mut out = BytesMut::new();
        let mut portals: Vec<(String, Option<Kind>)> = Vec::new();
        let mut failed = false;
        for (t, frame) in frames(&batch) {
            let body = &frame[5..];
            if failed && t != tag::SYNC {
                continue;
            }
            let name_at =
                |at: usize| cstr(body.get(at..).unwrap_or_default()).map_or("", |(n, _)| n);
            match t {
                tag::PARSE => {
                    if name_at(0).is_empty() {
                        // The server's unnamed statement is no longer the client's.
                        self.unnamed_role = None;
                    }
                    write::empty(&mut out, b'1');
                }
                tag::BIND => {
                    let (portal, used) = cstr(body).unwrap_or_default();
                    let kind = self.statement_command(name_at(used));
                    portals.retain(|(p, _)| p != portal);
                    portals.push((portal.to_string(), kind));
                    write::empty(&mut out, b'2');
                }
                tag::DESCRIBE => {
                    let name = name_at(1);
                    let kind = if body.first() == Some(&b'S') {
                        write::no_parameters(&mut out);
                        self.statement_command(name)
                    } else {
                        portals
                            .iter()
                            .find(|(p, _)| p == name)
                            .and_then(|(_, k)| k.clone())
                    };
                    match kind {
                        Some(Kind::PgnearShow { name }) => {
                            write::text_row_description(&mut out, &format!("pgnear.{name}"))
                        }
                        _ => write::empty(&mut out, b'n'),
                    }
                }
                tag::EXECUTE => {
                    let portal = name_at(0);
                    let kind = portals
                        .iter()
                        .find(|(p, _)| p == portal)
                        .and_then(|(_, k)| k.clone());
                    if let Some(kind) = kind {
                        failed = !self.run_pgnear(&kind, &mut out, false);
                    }
                }
                tag::CLOSE => write::empty(&mut out, b'3'),
                tag::SYNC => {
                    failed = false;
                    write::ready_for_query(&mut out, self.client_tx_status());
                }
                _ => {}
            }
        }
        self.batch = batch;
        self.batch.clear();
        self.batch_tags.clear();
        self.write_client(&out).await
    }

    /// The pgnear command a prepared statement (`""`: the unnamed one) is, if it is one.
    fn statement_command(&self, name: &str) -> Option<Kind> {
        let c = self.statement_class((!name.is_empty()).then_some(name))?;
        pgnear_command(&c)
    }

    fn show(&self, name: &str) -> Option<Option<String>> {
        let regions = &self.shared.config.regions;
        Some(match name {
            "route" => Some(self.state.setting.name().to_string()),
            "write_lsn" => Some(self.write_lsn.map(|l| l.to_string()).unwrap_or_default()),
            "min_lsn" => Some(self.min_lsn.map(|l| l.to_string()).unwrap_or_default()),
            "region" => Some(regions.current.clone()),
            "write_mode" => Some(match self.write_mode {
                WriteMode::Forward => "forward".to_string(),
                WriteMode::Replay => "replay".to_string(),
            }),
            "primary_region" => Some(regions.primary.clone()),
            _ => return None,
        })
    }

    fn set(&mut self, name: &str, value: Option<&str>) -> Result<(), PgError> {
        match name {
            "route" => {
                let v = value.unwrap_or("auto");
                self.state.setting = RouteSetting::parse(v)
                    .ok_or_else(|| invalid_value(name, v, "auto, primary, replica"))?;
                Ok(())
            }
            "write_mode" => {
                self.write_mode = match value.map(|v| v.to_ascii_lowercase()).as_deref() {
                    None => self.shared.config.routing.write_mode,
                    Some("forward") => WriteMode::Forward,
                    Some("replay") => WriteMode::Replay,
                    Some(v) => return Err(invalid_value(name, v, "forward, replay")),
                };
                Ok(())
            }
            "min_lsn" => {
                self.min_lsn = match value.map(str::trim).filter(|v| !v.is_empty()) {
                    None => None,
                    Some(v) => Some(
                        v.parse::<Lsn>()
                            .map_err(|e| invalid_value(name, v, &e.to_string()))?,
                    ),
                };
                Ok(())
            }
            _ => Err(unknown_setting(name)),
        }
    }
}

/// The query text of a Parse frame.
fn parse_text(frame: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let body = &frame[5..];
    let (_, used) = cstr(body)?;
    Some(sql_text(&body[used..])?.0)
}

/// What a statement's text tells a batch beyond its class: it may be a COPY, it may act on a
/// whole database.
fn note_text(sql: &str, plan: &mut BatchPlan) {
    plan.copy |= may_copy(sql);
    if let Some(db) = database_lifecycle(sql) {
        plan.database = Some(db);
    }
}

/// `note_text` for a statement known to be a read (which acts on no database as a whole).
fn note_read_text(sql: &str, plan: &mut BatchPlan) {
    plan.copy |= may_copy(sql);
}

/// Keeps the pools off `database` while a statement on it runs (see `Pool::fence`); nothing
/// for a statement on no database as a whole.
fn fences_on(shared: &super::Shared, database: Option<&str>) -> Vec<Fence> {
    let Some(database) = database else {
        return Vec::new();
    };
    let mut fences = vec![shared.primary_pool.fence(database)];
    fences.extend(shared.replica_pool.as_ref().map(|p| p.fence(database)));
    fences
}

/// Parses on `server` the statements (name, the client's Parse) it lacks, closing the least
/// recently used past `limit`; whether it parsed any.
/// Queues a batch of client messages. With statement names shared between sessions
/// (transaction mode), a Parse of a name the server already has gets its answer from a scratch
/// statement; past `limit` statements the least recently used is closed.
/// Sends a batch's frames. `dups`, in transaction mode (shared names): the Parses of a name the
/// client already has, which the server is to refuse; a Parse of another shared name that the
/// connection has already answers as a new statement would.
fn send_batch(server: &mut Server, batch: &[u8], dups: Option<&[usize]>, limit: usize) {
    for (i, (t, frame)) in frames(batch).enumerate() {
        if t == tag::PARSE {
            let name = cstr(&frame[5..]).map_or("", |(n, _)| n);
            if dups.is_some_and(|d| d.contains(&i)) {
                server.send_client_frame(t, frame);
                continue;
            }
            if dups.is_some() && !name.is_empty() && server.has_statement(name) {
                // Another session prepared it here already: the client still gets its
                // ParseComplete (or its error), from a scratch statement dropped at once.
                server.send_scratch_parse(&renamed_parse(frame, SCRATCH_STATEMENT), name);
                server.send_internal_frame(tag::CLOSE, &close_frame(SCRATCH_STATEMENT));
                continue;
            }
            // Sent before it is recorded: the expectation notes whether the name existed.
            server.send_client_frame(t, frame);
            if !name.is_empty() {
                if let Some(old) = server.add_statement(name, limit) {
                    server.send_internal_frame(tag::CLOSE, &close_frame(&old));
                }
            }
            continue;
        }
        server.send_client_frame(t, frame);
    }
}

fn prepare_missing(server: &mut Server, statements: Vec<(String, Bytes)>, limit: usize) -> bool {
    let mut parsed = false;
    for (name, parse) in statements {
        if !server.has_statement(&name) {
            server.send_internal_frame(tag::PARSE, &parse);
            if let Some(old) = server.add_statement(&name, limit) {
                server.send_internal_frame(tag::CLOSE, &close_frame(&old));
            }
            parsed = true;
        }
    }
    parsed
}

/// Whether a statement may be a COPY (then nothing may be pipelined behind it).
fn may_copy(sql: &str) -> bool {
    sql.as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"copy"))
}

/// pgnear's commit-position lookup, pipelined behind a write on the same connection.
///
/// With `synchronous_commit` on (any value but `off`) the commit was flushed before it was
/// acknowledged, so the flush position covers it and is all the replica can be sent. The insert
/// position may lie beyond WAL that only the WAL writer flushes, up to seconds later when it
/// hibernates: waiting for it would stall reads for nothing. With `off` the commit itself may
/// not be flushed yet, and only the insert position is sure to cover it.
pub(super) const WRITE_LSN_QUERY: &str =
    "SELECT CASE WHEN current_setting('synchronous_commit') = 'off' \
     THEN pg_current_wal_insert_lsn() ELSE pg_current_wal_flush_lsn() END";

fn not_consistent(target: Lsn, reached: Option<Lsn>, timeout: std::time::Duration) -> PgError {
    let reached = reached.map_or("nothing yet".to_string(), |l| l.to_string());
    let e = PgError::new(
        ErrorKind::Consistency,
        format!("the replica did not replay this session's writes within {timeout:?}"),
    )
    .non_fatal()
    .with_detail(format!(
        "The session needs WAL position {target}; the replica has replayed {reached}."
    ))
    .with_hint(
        "Retry, or raise consistency.wait_timeout, or set consistency.on_timeout = \"primary\".",
    );
    e
}

/// Server-side prepared statements kept per connection in transaction mode; past this the
/// least recently used is closed.
pub(super) const STATEMENTS_PER_CONNECTION: usize = 1000;
/// Answer chunks a shared replica connection may pass ahead of the session writing them out.
const REPLY_CHUNKS: usize = 16;

/// A read offered to the shared replica connections (see `lane`).
struct SharedRead {
    frames: Bytes,
    /// A simple Query (else extended-protocol messages ending in their Sync).
    query: bool,
    /// Shared statements the messages use, with their Parse.
    statements: Vec<(String, Bytes)>,
}

/// Where `settle` sends a request.
/// What became of a read offered to the shared replica connections.
enum Piped {
    /// It ran there; its answer (or error) was relayed.
    Served,
    /// None could take it: nothing was sent.
    Unsent,
    /// Its connection was lost before any of its answer reached the client: it can run on the
    /// primary.
    Lost,
}

enum Settled {
    Route(Role, Reason),
    /// It ran on a shared replica connection; its answer was relayed.
    Done,
}

/// A statement name that never exists on a server.
const NO_STATEMENT: &str = "pgnear_none";
/// A statement parsed only to answer a client's Parse, closed at once.
const SCRATCH_STATEMENT: &str = "pgnear_scratch";

/// A Parse frame with its statement name replaced.
fn renamed_parse(frame: &[u8], name: &str) -> BytesMut {
    let body = &frame[5..];
    let rest = cstr(body).map_or(body, |(_, used)| &body[used..]);
    build_frame(tag::PARSE, &[name.as_bytes(), b"\0", rest])
}

pub(super) fn close_frame(name: &str) -> BytesMut {
    build_frame(tag::CLOSE, &[b"S", name.as_bytes(), b"\0"])
}

fn unknown_setting(name: &str) -> PgError {
    let e = PgError::new(
        crate::error::ErrorKind::Protocol,
        format!("unrecognized configuration parameter \"pgnear.{name}\""),
    )
    .non_fatal();
    PgError {
        code: Some("42704".into()),
        ..e
    }
}

fn invalid_value(name: &str, value: &str, allowed: &str) -> PgError {
    let e = PgError::new(
        crate::error::ErrorKind::Protocol,
        format!("invalid value for parameter \"pgnear.{name}\": \"{value}\""),
    )
    .non_fatal()
    .with_hint(format!("Available values: {allowed}."));
    PgError {
        code: Some("22023".into()),
        ..e
    }
}
