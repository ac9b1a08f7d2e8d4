//! The executor: each request (a simple Query, a FunctionCall, an extended-protocol batch) is
//! read into a `plan::Request`, planned by `plan::plan`, and the plan run here. Running it is
//! the only part that waits (for the replica to replay the session's writes), connects and
//! sends; session state changes only once the plan is accepted (not refused).

use bytes::{Bytes, BytesMut};

use super::batch::{is_state_only, may_copy, only_pins, tx_effect};
use super::consistent::{Consistent, Settled, WRITE_LSN_QUERY};
use super::expect;
use super::inband;
use super::plan::{self, Capture, Exchange, InBand, Plan, Request, RouteState, Run, Shape, Tx};
use super::rename::{close_frame, prepare_missing, send_batch};
use super::server::{self, Again};
use super::shared_read::SharedRead;
use super::state::{BlockEnd, PendingState};
use super::Session;
use crate::backend::pool::Fence;
use crate::config::{PoolMode, WriteMode};
use crate::consistency::gate::Gate;
use crate::error::{ErrorKind, PgError};
use crate::protocol::frontend::query_text;
use crate::protocol::{build_frame, tag, write};
use crate::region::RegionRole;
use crate::role::Role;
use crate::router::classify::{database_lifecycle, Classified, Kind};
use crate::router::route::Reason;

/// What running the routing part of a plan came to.
enum Outcome {
    /// pgnear's own command: the caller answers it.
    InBand,
    /// A BEGIN deferred: the caller keeps it and answers it.
    Defer,
    /// Answered without a server: refused.
    Answered,
    /// Run on a shared replica connection: the caller records what it parsed.
    Shared,
    /// Accepted: it goes to `role`.
    Run(Role, Reason, Run),
}

/// A lone plain `BEGIN` (or `BEGIN READ ONLY`) is deferred until the transaction's first
/// statement, which may still make it read-write, read-only or SERIALIZABLE. Only the exact
/// forms that cannot fail are, so that answering it early never hides an error.
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

impl Session {
    /// Where the session stands, for `plan::plan`.
    fn route_state(&self) -> RouteState {
        RouteState {
            tx: self.tx.state(),
            exchange: self.exchange.as_ref().map(Exchange::state),
            copy: self.copy_role(),
            last: self.last,
            unnamed_gone: self.unnamed_role.filter(|_| self.state.unnamed.is_none()),
            pinned: self.state.pins.any(),
            serializable: self.state.serializable_default,
            setting: self.state.setting,
            replays_writes: self.replays_writes(),
            captures_lsn: self.captures_lsn(),
            lanes: self.lanes_free(),
            ending: self.ending,
        }
    }

    /// Plans `r` and runs the plan up to the server: settles a replica route, answers what
    /// is refused, and applies what every request's plan changes (transaction, open exchange).
    async fn route(&mut self, r: &Request, lane: Option<SharedRead>) -> Result<Outcome, PgError> {
        let run = loop {
            let mut state = self.route_state();
            if plan::checks_exchange(r, &state) {
                let fine = self.exchange_fine().await?;
                state = self.route_state();
                if let Some(e) = state.exchange.as_mut() {
                    e.fine = Some(fine);
                }
            }
            match plan::plan(r, &state, &self.replica_gate()) {
                Plan::InBand => return Ok(Outcome::InBand),
                Plan::DeferBegin { end_prepared } => {
                    // A prepare-only exchange left open is ended first: the transaction's
                    // statements must not join it.
                    if let Some(role) = end_prepared {
                        self.sync_prepared_only(role);
                        self.exchange = None;
                    }
                    self.drain_all().await?;
                    return Ok(Outcome::Defer);
                }
                // Then planned again, in the transaction.
                Plan::StartDeferred { sets, writes } => self.start_deferred(sets, writes).await?,
                Plan::Confirm(role) => {
                    self.drain(role).await?;
                    // (Known now, or that server is gone.)
                    self.ending = None;
                }
                Plan::Run(run) => break run,
            }
        };
        let (role, reason) = if run.settle {
            match self
                .settle(run.role, run.reason, lane.filter(|_| run.share))
                .await?
            {
                Settled::Route(role, reason) => (role, reason),
                Settled::Refused(e) => {
                    self.refuse_request(e, r.syncs).await?;
                    return Ok(Outcome::Answered);
                }
                Settled::Shared => {
                    self.shared.metrics.statement(run.role, run.reason);
                    self.shared.metrics.pool(Role::Replica).pipelined.inc();
                    return Ok(Outcome::Shared);
                }
            }
        } else {
            (run.role, run.reason)
        };
        if run.refuse_write {
            self.refuse_request(self.replay_error(), r.syncs).await?;
            return Ok(Outcome::Answered);
        }
        // Accepted.
        tracing::debug!(route = role.name(), reason = reason.label(), shape = ?r.shape, "request routed");
        if r.executes {
            self.shared.metrics.statement(role, reason);
        }
        if run.end_replica_exchange {
            // Its reads' answers are in, and a standby changed nothing but settings, which
            // pgnear's Sync commits there: what that connection has applied is not the log's.
            // What a transaction end in it settled is the session's now; the rest goes with
            // the write.
            self.sync_prepared_only(Role::Replica);
            let changes = self.exchange.take().map(|e| e.changes).unwrap_or_default();
            let changes = PendingState::all(changes);
            let settings = changes
                .as_ref()
                .is_some_and(|c| !c.setting_statements().is_empty());
            let (settled, rest) = changes.map_or((None, None), PendingState::split_settled);
            if let Some(settled) = settled {
                self.state.commit_change(settled, BlockEnd::Committed);
            }
            self.carried = rest;
            if let Some(s) = self.slot(Role::Replica).as_mut() {
                s.reader.ends_unsynced.clear();
                if settings {
                    s.synced = super::state::FROM_POOL;
                    s.conn.carry.forget_applied();
                }
            }
        }
        if let Some(prepared_on) = run.end_prepared {
            if prepared_on != role {
                self.sync_prepared_only(prepared_on);
            }
            self.exchange = None;
        }
        if r.shape != Shape::Batch {
            // A Query or FunctionCall ends an exchange a Flush left open.
            if run.ends_unsynced {
                self.state.pins.extended_state = true;
            }
            self.exchange = None;
        }
        match run.tx {
            Some(plan::TxEffect::Begin) => {
                self.tx = Tx::Open(role);
                self.ending = None;
            }
            Some(plan::TxEffect::End) => {
                self.tx = Tx::Idle;
                self.ending = Some(role);
            }
            None => {}
        }
        Ok(Outcome::Run(role, reason, run))
    }

    /// What routing needs to know of a simple query.
    fn query_request(
        &self,
        sql: &str,
        c: &Classified,
        change: Option<&PendingState>,
        restores: bool,
    ) -> Request {
        let read = c.is_read();
        let tx = tx_effect(c);
        let state_only = is_state_only(c);
        let copy = may_copy(sql);
        let in_band = match (inband::is_command(c), inband::command(c)) {
            (false, _) => InBand::No,
            (true, Some(_)) => InBand::Only,
            (true, None) => InBand::Mixed,
        };
        // A BEGIN inside the transaction sets its modes too (with a warning).
        let sets = match c.statements.as_slice() {
            [s] => match s.kind {
                Kind::SetTransaction { read_only } => read_only,
                Kind::Begin { read_only: true } => Some(true),
                Kind::Begin { .. } if !is_plain_begin(sql) => Some(false),
                _ => None,
            },
            _ => None,
        };
        Request {
            in_band,
            read,
            hint: c.hint,
            starts_read_only_tx: c.statements.first().is_some_and(|s| {
                matches!(s.kind, Kind::Begin { read_only } if read_only || self.state.read_only_default)
            }),
            state_only,
            tx,
            only_pins: only_pins(c),
            defers: c.statements.len() == 1
                && matches!(c.statements[0].kind, Kind::Begin { .. })
                && is_plain_begin(sql),
            sets,
            pins: change.is_some_and(PendingState::pins),
            shareable: change.is_none()
                && c.statements.len() == 1
                && read
                && tx.is_none()
                && !copy
                && !self.taints(c),
            retryable: !restores,
            writes_lsn: !read && !state_only,
            copy,
            database: !read && database_lifecycle(sql).is_some(),
            ..Request::new(Shape::Query)
        }
    }

    /// Routes and sends one simple Query. One that first ends a transaction on the replica,
    /// then does more that is not a read (`ROLLBACK; INSERT ...`), runs as two: the end there,
    /// the rest routed on its own (Postgres runs it in an implicit transaction of its own
    /// anyway, and the end cannot fail); the client gets the rest's ReadyForQuery only.
    pub(super) async fn on_query(&mut self, frame: BytesMut) -> Result<(), PgError> {
        // Shared, not copied: a replica read keeps it for a possible retry on the primary.
        let frame = frame.freeze();
        // (Looked at only in a replica transaction: every other query is read once, below.)
        let split = match self.tx.open() {
            Some(Role::Replica) => {
                let text = query_text(&frame[5..])?;
                let c = self.classify(&text);
                ends_first(&text, &c).map(|at| {
                    let rest =
                        text[at..].trim_start_matches(|ch: char| ch == ';' || ch.is_whitespace());
                    (query_frame(&text[..at]), query_frame(rest))
                })
            }
            _ => None,
        };
        match split {
            Some((end, rest)) => {
                self.query_part(end?, true).await?;
                // What the end changed (a SET rolled back) is told with the rest's answer.
                for role in [Role::Primary, Role::Replica] {
                    if let Some(s) = self.slot(role).as_mut() {
                        s.reader.recheck_params();
                    }
                }
                self.query_part(rest?, false).await
            }
            None => self.query_part(frame, false).await,
        }
    }

    /// Routes and sends one simple Query, or (`head`) the first part of one (see `on_query`).
    async fn query_part(&mut self, frame: Bytes, head: bool) -> Result<(), PgError> {
        let text = query_text(&frame[5..])?;
        let sql: &str = &text;
        let c = self.classify(sql);
        // A simple query drops the unnamed statement, as the server does.
        self.state.unnamed = None;
        for role in [Role::Primary, Role::Replica] {
            if let Some(s) = self.slot(role).as_mut() {
                s.expect.unnamed_superseded();
            }
        }
        let change = self.state.prepare_change(sql, &c);
        let restore = self.state.restore_after(&c);
        let r = self.query_request(sql, &c, change.as_ref(), restore.is_some());
        let lane = (r.shareable && self.lanes_free()).then(|| SharedRead {
            frames: frame.clone(),
            query: true,
            statements: Vec::new(),
        });
        let (role, reason, run) = match self.route(&r, lane).await? {
            Outcome::InBand => return self.answer_pgnear(&c).await,
            Outcome::Defer => {
                // Answered now, sent with the next statement: that statement decides which
                // server holds the transaction, and the BEGIN costs no round trip of its own.
                self.tx = Tx::Deferred(frame.clone());
                let mut out = BytesMut::new();
                write::command_complete(&mut out, "BEGIN");
                write::ready_for_query(&mut out, b'T');
                return self.write_client(&out).await;
            }
            Outcome::Answered | Outcome::Shared => return Ok(()),
            Outcome::Run(role, reason, run) => (role, reason, run),
        };
        if let Some(change) = &change {
            self.state.apply_pins(change);
        }
        self.state.hold_cursors |= !c.is_read() && super::batch::may_hold_cursor(sql);
        let carried = self.carried.take();
        let change = PendingState::join(carried.clone(), change);
        let again = (run.again && role == Role::Replica && reason == Reason::Read)
            .then(|| Again::Query(frame.clone()));
        let capture = self.capture(role, &run);
        let fences = if run.fences && role == Role::Primary {
            fences_on(&self.shared, database_lifecycle(sql).as_deref())
        } else {
            Vec::new()
        };
        let request = server::Request {
            change,
            again,
            capture_after: capture == Capture::AfterCopy,
            fences,
            ..server::Request::default()
        };
        let taints = self.taints(&c);
        let statements = self.statements_named(&self.sql_uses(&c));
        if !statements.is_empty() && self.copy_role().is_none() && self.dropping_statements(role) {
            self.drain(role).await?;
        }
        let server = self.server(role).await?;
        server.dirty |= taints;
        if prepare_missing(server, statements, usize::MAX) {
            // The session's own statement names: no later session may find them.
            server.dirty = true;
            server.send_internal_frame(tag::SYNC, &build_frame(tag::SYNC, &[]));
        }
        send_carried(server, carried.as_ref());
        server.send_query(&frame, request);
        if head {
            server.expect.swallow_ready();
        }
        if let Some(sql) = restore.filter(|_| !server.expect.skipping) {
            // Its ReadyForQuery comes from the restore, once the startup settings are back.
            server.expect.defer_ready();
            server.send_internal_query(&sql, expect::Purpose::Restore);
        }
        if capture == Capture::Behind {
            server.send_internal_query(WRITE_LSN_QUERY, expect::Purpose::WriteLsn);
        }
        Ok(())
    }

    /// Routes and sends one FunctionCall (libpq's fast path: large objects). It may write, so it
    /// runs on the primary, or on the server holding the session's transaction.
    pub(super) async fn on_function_call(&mut self, frame: BytesMut) -> Result<(), PgError> {
        let r = Request {
            read: false,
            writes_lsn: true,
            ..Request::new(Shape::Call)
        };
        let Outcome::Run(role, _, run) = self.route(&r, None).await? else {
            return Ok(());
        };
        let capture = self.capture(role, &run);
        let session_mode = self.shared.config.pool.mode == PoolMode::Session;
        let carried = self.carried.take();
        let server = self.server(role).await?;
        server.dirty |= session_mode;
        send_carried(server, carried.as_ref());
        server.send_function_call(&frame, carried);
        if capture == Capture::Behind {
            server.send_internal_query(WRITE_LSN_QUERY, expect::Purpose::WriteLsn);
        }
        Ok(())
    }

    /// Whether a request in flight on `role` drops every prepared statement there (`DISCARD
    /// ALL`, `DEALLOCATE ALL` pipelined ahead): which statements the server still has is known
    /// only once it is answered (it may fail), so what parses or uses one waits for that.
    fn dropping_statements(&self, role: Role) -> bool {
        self.slot_ref(role).is_some_and(|s| {
            s.requests.iter().any(|r| {
                r.change
                    .as_ref()
                    .is_some_and(super::state::SessionState::drops_statements)
            })
        })
    }

    /// When a request planned as `run`, sent to `role`, has its commit position looked up.
    fn capture(&self, role: Role, run: &Run) -> Capture {
        if role == Role::Primary {
            run.capture
        } else {
            Capture::No
        }
    }

    /// Sends the pending extended-protocol messages to the server chosen for them.
    pub(super) async fn dispatch_batch(&mut self) -> Result<(), PgError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        // A statement it parses or uses whose earlier Parse is still unanswered may not exist
        // (that Parse may fail, or be skipped after an error): what the batch means, and where
        // it may run, waits for the answer. Pipelines rarely get here: a driver uses a
        // statement once its ParseComplete is in.
        // Or a request in flight drops every statement (`DISCARD ALL` pipelined ahead): what
        // the batch parses is the session's only once that is answered. (A COPY the client
        // has ended does not stop the wait: its server answers.)
        // (A Parse sent while its server skips after an error failed already: forgotten now,
        // the unnamed one too, so that a Bind of it is not sent with a Parse of pgnear's.)
        for role in [Role::Primary, Role::Replica] {
            if let Some((failed, unnamed)) = self
                .slot(role)
                .as_mut()
                .map(server::Server::take_lost_parses)
            {
                self.forget_lost_parses(role, failed, unnamed);
            }
        }
        // Also behind a batch that may start a COPY FROM STDIN: a Parse ahead of the COPY is
        // answered ahead of it, and the wait ends once the server waits for the client's data
        // (or for the Sync the COPY is owed, which would flush what follows it).
        for role in self.unconfirmed_statements() {
            self.drain_while(role, |s| {
                s.unconfirmed_statements().contains(&role)
                    && s.slot_ref(role).is_some_and(|v| {
                        !v.reader.owed_sync && (!v.reader.copy_in || v.reader.client_ended_copy)
                    })
            })
            .await?;
        }
        if !self.copy_awaits_client() {
            for role in [Role::Primary, Role::Replica] {
                if self.dropping_statements(role) {
                    self.drain(role).await?;
                }
            }
        }
        let mut plan = self.read_batch()?;
        let r = plan.request(self, self.batch_tags.last() == Some(&tag::SYNC));
        let lane = (r.shareable && self.lanes_free()).then(|| SharedRead {
            frames: Bytes::copy_from_slice(plan.renamed.as_deref().unwrap_or(&self.batch)),
            query: false,
            statements: self.statements_named(&plan.needs),
        });
        let outcome = self.route(&r, lane).await?;
        self.batch_tags.clear();
        let batch = plan
            .renamed
            .take()
            .unwrap_or_else(|| std::mem::take(&mut self.batch));
        let sent = match outcome {
            Outcome::InBand => {
                self.accept_batch(&mut plan);
                self.answer_pgnear_batch(&batch).await
            }
            Outcome::Shared => {
                self.accept_batch(&mut plan);
                if plan.parsed_unnamed {
                    // Parsed on a shared connection: no server of the session has it now.
                    self.unnamed_role = None;
                }
                Ok(())
            }
            // A batch is never deferred (only a simple-query BEGIN is).
            Outcome::Answered | Outcome::Defer => Ok(()),
            Outcome::Run(role, reason, run) => {
                self.accept_batch(&mut plan);
                self.send_batch_to(role, reason, run, plan, &batch).await
            }
        };
        // The buffer is kept for the next batch.
        if self.batch.capacity() < batch.capacity() {
            self.batch = batch;
        }
        self.batch.clear();
        sent
    }

    /// The session's statements of these names (shared names in transaction mode), as their Parse.
    fn statements_named(&self, names: &[String]) -> Vec<(String, Bytes)> {
        names
            .iter()
            .filter_map(|n| self.state.statements.get(n).map(|f| (n.clone(), f.clone())))
            .collect()
    }

    /// Sends an accepted batch to `role`: what that server lacks first (statements, the
    /// unnamed statement), then the batch, one expected request per Sync.
    async fn send_batch_to(
        &mut self,
        role: Role,
        reason: Reason,
        run: Run,
        mut plan: super::batch::BatchPlan,
        batch: &[u8],
    ) -> Result<(), PgError> {
        for change in &plan.changes {
            self.state.apply_pins(change);
        }
        let capture = self.capture(role, &run);
        // The unnamed statement is to be parsed again (pgnear's own query dropped it), but
        // whether its Parse succeeded is in an answer still to come: a failed one must not be
        // parsed again (Postgres would not have it). Pipelines rarely get here.
        let unnamed_unknown = plan.needs_unnamed
            && !plan.parsed_unnamed
            && self.unnamed_role == Some(role)
            && self
                .slot_ref(role)
                .is_some_and(|s| s.unnamed_dropped && s.expect.unnamed_pending());
        if unnamed_unknown && self.copy_role().is_none() {
            self.drain(role).await?;
        }
        // (After the drains: in transaction mode it may have given the connection back.)
        let unnamed_here = self.unnamed_role == Some(role);
        let unnamed = match plan.parsed_unnamed {
            true => plan.unnamed_before.clone(),
            false => self.state.unnamed.clone(),
        }
        .filter(|_| plan.needs_unnamed);
        let unnamed_before = match plan.parsed_unnamed {
            true => (plan.unnamed_before.take(), self.unnamed_role),
            false => (self.state.unnamed.clone(), self.unnamed_role),
        };
        let statements = self.statements_named(&plan.needs);
        let shared_names = self.shares_statements();
        let limit = self.statement_limit();
        // An autocommit read that starts and ends its exchange can run again on the primary if
        // the replica is lost before its answer begins (see `Session::replica_lost`).
        let mut again =
            (run.again && role == Role::Replica && reason == Reason::Read).then(|| Again::Batch {
                frames: Bytes::copy_from_slice(batch),
                statements: statements.clone(),
                unnamed: unnamed.clone(),
            });
        let carried = self.carried.take();
        let server = self.server(role).await?;
        server.unnamed_before = unnamed_before.clone();
        server.dirty |= plan.taints;
        for name in std::mem::take(&mut server.to_close) {
            server.send_internal_frame(tag::CLOSE, &close_frame(&name));
        }
        if plan.needs_unnamed && unnamed_before.0.is_none() {
            // The session has no unnamed statement: nor may the server (a pooled connection
            // keeps the last holder's), so that the Bind fails as it would on Postgres.
            server.send_internal_frame(tag::CLOSE, &close_frame(""));
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
        send_carried(server, carried.as_ref());
        send_batch(
            server,
            batch,
            shared_names.then_some((&plan.dups[..], &plan.clients[..])),
            limit,
        );
        // The first Sync after an extended-protocol COPY ends the request already in flight.
        let owed = std::mem::take(&mut server.reader.owed_sync);
        let database = plan
            .database
            .filter(|_| run.fences && role == Role::Primary);
        let mut fences = fences_on(&self.shared, database.as_deref());
        // A Flush-driven exchange's changes wait for the Sync that ends it. (Recorded once the
        // batch is out: the drains above still see the exchange as it was.)
        let (mut changes, mut portals) = self
            .exchange
            .take()
            .map(|e| (e.changes, e.portals))
            .unwrap_or_default();
        changes.splice(0..0, carried);
        if plan.syncs > 0 {
            portals.clear();
        }
        portals.retain(|p| !plan.portals_closed.contains(p));
        portals.append(&mut plan.portals);
        // A message of the exchange failed already: what it changed is rolled back (but for
        // what a transaction end in it settled), what followed skipped, up to this batch's
        // first Sync, whose request takes the ends it ran.
        let (failed, ends) = match self.slot(role).as_mut().filter(|_| plan.syncs > 0) {
            Some(s) => (
                std::mem::take(&mut s.reader.failed_unsynced),
                std::mem::take(&mut s.reader.ends_unsynced),
            ),
            None => (false, Vec::new()),
        };
        if failed {
            let ran = PendingState::all(std::mem::take(&mut changes));
            changes.extend(ran.and_then(|c| c.settled(&ends)));
        }
        changes.extend(std::mem::take(&mut plan.changes));
        if let Some(executed) = run.exchange_after {
            self.exchange = Some(Exchange {
                role,
                executed,
                changes: std::mem::take(&mut changes),
                portals,
            });
        }
        let mut change = PendingState::all(changes);
        let server = self.slot(role).as_mut().expect("connected above");
        for i in 0..plan.syncs {
            let last = i + 1 == plan.syncs;
            let request = server::Request {
                failed: failed && i == 0,
                ends: if i == 0 { ends.clone() } else { Vec::new() },
                change: if last { change.take() } else { None },
                fences: if last {
                    std::mem::take(&mut fences)
                } else {
                    Vec::new()
                },
                capture_after: last && capture == Capture::AfterCopy,
                may_copy_in: plan.copy && !plan.read,
                again: if last { again.take() } else { None },
                started: Some(std::time::Instant::now()),
                ..server::Request::default()
            };
            match server.requests.back_mut().filter(|_| owed && i == 0) {
                Some(copy) => copy.absorb(request),
                None => server.requests.push_back(request),
            }
        }
        if capture == Capture::Behind {
            server.send_internal_query(WRITE_LSN_QUERY, expect::Purpose::WriteLsn);
        }
        self.forget_statements(role, &plan.closed);
        if plan.parsed_unnamed || unnamed.is_some() {
            self.unnamed_role = Some(role);
        }
        Ok(())
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

    /// Sends the deferred BEGIN (its answer was already given) to the server that will hold the
    /// transaction: the replica for a read-only one that can be served consistently there.
    /// `sets`: what the transaction's first statement sets (`SET TRANSACTION READ ONLY` or
    /// `READ WRITE`, or SERIALIZABLE, which is `Some(false)`); `writes`: it neither reads nor
    /// sets (see `Plan::StartDeferred`).
    async fn start_deferred(&mut self, sets: Option<bool>, writes: bool) -> Result<(), PgError> {
        let Tx::Deferred(begin) = std::mem::take(&mut self.tx) else {
            return Ok(());
        };
        let begins_read_only = query_text(&begin[5..]).is_ok_and(|sql| {
            let c = self.classify(&sql);
            matches!(c.statements[..], [ref s] if s.kind == Kind::Begin { read_only: true })
        });
        let read_only = sets.unwrap_or(begins_read_only || self.state.read_only_default);
        let mut role = Role::Primary;
        if read_only
            && !writes
            && self.replica_gate() != Gate::Unavailable
            && !self.state.pins.any()
            && !self.state.serializable_default
            && matches!(self.consistent_read().await?, Consistent::Go)
            && self.ensure_replica().await.is_ok()
        {
            role = Role::Replica;
        }
        self.tx = Tx::Open(role);
        self.server(role)
            .await?
            .send_internal_frame(tag::QUERY, &begin);
        Ok(())
    }

    pub(super) fn client_tx_status(&self) -> u8 {
        match self.tx {
            Tx::Deferred(_) => b'T',
            Tx::Open(r) => self.slot_ref(r).map_or(b'I', |s| s.tx),
            Tx::Idle => b'I',
        }
    }

    /// Whether the exchange a Flush left open went well so far, once its answers are in:
    /// after an error the server skips everything up to the Sync, so what follows must go
    /// where it is skipped too, not run elsewhere. (Drivers wait for those answers before
    /// going on, so this rarely waits.)
    async fn exchange_fine(&mut self) -> Result<bool, PgError> {
        let Some(role) = self.exchange.as_ref().map(|e| e.role) else {
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

/// The statement name and portal pgnear runs carried settings under.
const CARRY: &[u8] = b"pgnear_carry\0";

/// Runs settings carried from a replica exchange (see `Session::carried`) on `server` ahead of
/// the request that ended that exchange, in the request's implicit transaction (extended
/// protocol, no Sync), so that they hold only if it does; their answers are swallowed.
fn send_carried(server: &mut server::Server, carried: Option<&PendingState>) {
    let statements = carried.map(PendingState::setting_statements);
    let Some(statements) = statements.filter(|s| !s.is_empty()) else {
        return;
    };
    for sql in statements {
        // Closed first: one a failed carry left behind would refuse the Parse.
        server.send_internal_frame(tag::CLOSE, &build_frame(tag::CLOSE, &[b"S", CARRY]));
        let parse = build_frame(tag::PARSE, &[CARRY, sql.as_bytes(), b"\0", &[0, 0]]);
        server.send_internal_frame(tag::PARSE, &parse);
        let bind = build_frame(tag::BIND, &[CARRY, CARRY, &[0, 0, 0, 0, 0, 0]]);
        server.send_internal_frame(tag::BIND, &bind);
        server.send_internal_frame(tag::EXECUTE, &build_frame(tag::EXECUTE, &[CARRY, &[0; 4]]));
        server.send_internal_frame(tag::CLOSE, &build_frame(tag::CLOSE, &[b"P", CARRY]));
    }
    server.send_internal_frame(tag::CLOSE, &build_frame(tag::CLOSE, &[b"S", CARRY]));
}

/// A Query frame of `sql` (a part of a client's query text, which has no NUL).
fn query_frame(sql: &str) -> Result<Bytes, PgError> {
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut out)
        .map_err(|_| PgError::protocol("invalid Query message"))?;
    Ok(out.freeze())
}

/// Where the first statement of `c` ends, if it ends the transaction and what follows it is not
/// all reads (which a replica holding that transaction would refuse). (Not one AND CHAIN,
/// which opens the next transaction there.)
fn ends_first(sql: &str, c: &Classified) -> Option<usize> {
    let [first, rest @ ..] = c.statements.as_slice() else {
        return None;
    };
    let ends = matches!(first.kind, Kind::Commit | Kind::Rollback)
        && !first.text(sql).to_ascii_lowercase().contains("chain");
    let writes = rest
        .iter()
        .any(|s| !matches!(s.kind, Kind::Read | Kind::Empty));
    (ends && writes && first.span.1 > 0).then_some(first.span.1 as usize)
}
