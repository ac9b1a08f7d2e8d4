//! Reading an extended-protocol batch (Parse, Bind, Describe, Execute, Close up to a Sync or a
//! Flush): what it parses, binds, runs and closes, and what that means for routing. Reading
//! changes nothing: the statements it parses and the names it gives are recorded in the
//! `BatchPlan`, and applied to the session only once the request's plan is accepted.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::plan::{self, InBand, Shape, TxEffect};
use super::rename::NO_STATEMENT;
use super::state::{self, PendingState};
use super::Session;
use crate::config::PoolMode;
use crate::error::PgError;
use crate::protocol::{cstr, frames, sql_text, tag};
use crate::router::classify::{database_lifecycle, Classified, Hint, Kind};

/// What an extended-protocol batch does, as far as routing is concerned.
#[derive(Default)]
pub(super) struct BatchPlan {
    pub read: bool,
    pub hint: Option<Hint>,
    pub starts_read_only_tx: bool,
    /// Runs a portal bound by an earlier batch: must stay where that portal lives.
    pub sticky: bool,
    /// Named statements used but not parsed in this batch.
    pub needs: Vec<String>,
    /// The unnamed statement is used but not parsed in this batch.
    pub needs_unnamed: bool,
    pub parsed: Vec<String>,
    /// Parses (their place among the batch's frames) of a name that already exists: sent as
    /// they are, so that the server answers 42P05 as Postgres would (see `read_batch`).
    pub dups: Vec<usize>,
    /// Transaction mode: the client's statement name of each frame (its place among the
    /// batch's, in order) that names one by its shared name: an error answering the frame
    /// names the client's, and a failed Parse of a new one forgets it.
    pub clients: Vec<(usize, String)>,
    pub closed: Vec<String>,
    pub parsed_unnamed: bool,
    /// May leave state on the server that pgnear does not track (see `Server::dirty`).
    pub taints: bool,
    /// Parses or uses a pgnear command (`SHOW pgnear.…`), and parses or uses anything else.
    pub pgnear: bool,
    pub other: bool,
    /// A statement in the batch may be a COPY.
    pub copy: bool,
    /// A statement in the batch may declare a cursor WITH HOLD.
    pub hold_cursor: bool,
    /// A database a statement of the batch drops, renames or copies (see `Pool::fence`).
    pub database: Option<String>,
    pub syncs: usize,
    /// Runs something (Execute); a batch that only prepares and describes does not.
    pub executes: bool,
    pub tx: Option<TxEffect>,
    /// Every statement it parses or uses is a session SET/RESET (pgjdbc's start-up
    /// `SET extra_float_digits = 3`): it runs where the session is, like a simple-query SET.
    /// (`None`: no statement.)
    pub state_only: Option<bool>,
    /// Every statement it parses or uses needs the primary but writes nothing (see `only_pins`).
    pub only_pins: bool,
    /// Portals bound in the batch that change session state (SET, LISTEN, …), not yet executed.
    bound_changes: Vec<(String, PendingState)>,
    /// Session-state changes the batch executes: pins apply when it is sent, SET/RESET are
    /// recorded for replay on the other server once it succeeds, as for a simple query.
    pub changes: Vec<PendingState>,
    /// The batch as it goes to a server, when it differs from the client's (transaction mode:
    /// statement names shared between sessions).
    pub renamed: Option<BytesMut>,
    /// Applied once the plan is accepted: the named statements it parses (Parse frames as they
    /// go out), the unnamed one, the client-to-shared names it gives (`None`: forgotten), and
    /// whether it changes session state that pgnear keeps on one server.
    pub statements: Vec<(String, Bytes)>,
    pub unnamed: Option<Bytes>,
    pub names: Vec<(String, Option<String>)>,
    pub extended_state: bool,
    /// Once accepted: the unnamed statement the session had before, which a Bind ahead of
    /// the batch's own unnamed Parse uses.
    pub unnamed_before: Option<Bytes>,
    /// The named portals bound after the batch's last Sync and not closed, and the ones it
    /// closes (see `Exchange::portals`).
    pub portals: Vec<String>,
    pub portals_closed: Vec<String>,
}

impl BatchPlan {
    /// What routing needs to know of the batch. `ends_in_sync`: its last message is a Sync.
    pub fn request(&self, s: &Session, ends_in_sync: bool) -> plan::Request {
        let extended_state = s.state.pins.extended_state || self.extended_state;
        let in_band = match (self.pgnear, self.other) {
            (true, false) => InBand::Only,
            (true, true) => InBand::Mixed,
            _ => InBand::No,
        };
        let state_only = self.state_only == Some(true);
        plan::Request {
            in_band,
            read: self.read,
            hint: self.hint,
            starts_read_only_tx: self.starts_read_only_tx,
            state_only,
            tx: self.tx,
            only_pins: self.other && self.only_pins,
            executes: self.executes,
            sticky: self.sticky,
            // (One it parses again later routes as that statement does.)
            needs_unnamed: self.needs_unnamed && !self.parsed_unnamed,
            pins: self.extended_state || self.changes.iter().any(PendingState::pins),
            shareable: self.syncs == 1
                && ends_in_sync
                && self.executes
                && self.read
                && self.changes.is_empty()
                && self.closed.is_empty()
                && self.parsed.is_empty()
                && self.tx.is_none()
                && !state_only
                && !(self.needs_unnamed
                    || self.sticky
                    || self.pgnear
                    || self.taints
                    || self.copy
                    || extended_state),
            retryable: self.syncs == 1 && self.dups.is_empty() && ends_in_sync,
            writes_lsn: self.executes
                && !self.read
                && !state_only
                && self.syncs > 0
                && !extended_state,
            copy: self.copy,
            database: self.database.is_some() && self.executes,
            syncs: self.syncs,
            open_end: !ends_in_sync,
            ..plan::Request::new(Shape::Batch)
        }
    }

    /// The named statement `name` as the session will know it once the batch is accepted.
    fn statement<'a>(&'a self, s: &'a Session, name: &str) -> Option<&'a Bytes> {
        self.statements
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, f)| f)
            .or_else(|| s.state.statements.get(name))
    }

    /// The shared name the client's `name` has at this point of the batch (transaction mode).
    pub(super) fn shared_name<'a>(&'a self, s: &'a Session, name: &str) -> Option<&'a String> {
        match self.names.iter().rev().find(|(n, _)| n == name) {
            Some((_, shared)) => shared.as_ref(),
            None => s.state.names.get(name),
        }
    }
}

pub(super) fn tx_effect(c: &Classified) -> Option<TxEffect> {
    c.statements.iter().fold(None, |acc, s| match s.kind {
        Kind::Begin { .. } => Some(TxEffect::Begin),
        Kind::Commit | Kind::Rollback | Kind::PrepareTransaction => Some(TxEffect::End),
        _ => acc,
    })
}

pub(super) fn is_state_only(c: &Classified) -> bool {
    !c.statements.is_empty()
        && c.statements.iter().all(|s| {
            matches!(
                s.kind,
                Kind::Set { local: false, .. } | Kind::Reset { .. } | Kind::Empty
            )
        })
}

/// LISTEN/UNLISTEN and advisory locks need the primary but write nothing: not refused in replay mode.
pub(super) fn only_pins(c: &Classified) -> bool {
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

/// Whether a statement may be a COPY (then nothing may be pipelined behind it).
pub(super) fn may_copy(sql: &str) -> bool {
    mentions(sql, b"copy")
}

/// Whether a statement may declare a cursor WITH HOLD (a portal that outlives its transaction).
pub(super) fn may_hold_cursor(sql: &str) -> bool {
    mentions(sql, b"declare") && mentions(sql, b"hold")
}

fn mentions(sql: &str, word: &[u8]) -> bool {
    sql.as_bytes()
        .windows(word.len())
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// The query text of a Parse frame.
pub(super) fn parse_text(frame: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let body = &frame[5..];
    let (_, used) = cstr(body)?;
    Some(sql_text(&body[used..])?.0)
}

/// What a statement's text tells a batch beyond its class: it may be a COPY, it may act on a
/// whole database (a read acts on none).
fn note_text(sql: &str, read: bool, plan: &mut BatchPlan) {
    plan.copy |= may_copy(sql);
    plan.hold_cursor |= !read && may_hold_cursor(sql);
    if !read {
        if let Some(db) = database_lifecycle(sql) {
            plan.database = Some(db);
        }
    }
}

fn bad(what: &str) -> PgError {
    PgError::protocol(format!("invalid {what} message"))
}

impl Session {
    pub(super) fn classify(&self, sql: &str) -> Arc<Classified> {
        self.shared.classifier.get_or_classify(sql)
    }

    /// Reads the pending batch: which statements it parses, binds, runs and closes.
    pub(super) fn read_batch(&self) -> Result<BatchPlan, PgError> {
        let mut plan = BatchPlan {
            read: true,
            only_pins: true,
            ..BatchPlan::default()
        };
        // Transaction mode: the client's names are known only before they are renamed.
        let renamed_dups = if self.shares_statements() {
            Some(self.rename_statements(&mut plan)?)
        } else {
            None
        };
        let renamed = plan.renamed.take();
        let batch = renamed.as_deref().unwrap_or(&self.batch);
        let mut bound_portals: Vec<&str> = Vec::new();
        // Statements parsed in the batch since its last Sync.
        let mut exchange: Vec<String> = Vec::new();
        // After a Parse of a name that exists, the server skips to the Sync: nothing of what
        // follows runs (no transaction begins or ends, no state changes).
        let mut skipped = false;
        for (i, (t, frame)) in frames(batch).enumerate() {
            let body = &frame[5..];
            if skipped && t != tag::SYNC {
                // (Still an exchange that ran something, as far as what follows it goes.)
                plan.executes |= t == tag::EXECUTE;
                continue;
            }
            match t {
                tag::PARSE => {
                    let (name, used) = cstr(body).ok_or_else(|| bad("Parse"))?;
                    let (sql, _) = sql_text(&body[used..]).ok_or_else(|| bad("Parse"))?;
                    let dup = match &renamed_dups {
                        Some(dups) => dups.iter().find(|&&(at, _)| at == i).map(|&(_, e)| e),
                        None if name.is_empty() => None,
                        None => self.duplicate(name, &plan, &exchange),
                    };
                    if let Some(dup) = dup {
                        // The name exists: the server is to refuse it (42P05), so it must have
                        // the statement too, and the session keeps the statement it has. (In an
                        // aborted transaction the server refuses it for that first, 25P02, unless
                        // it ends the transaction: a Parse of pgnear's ahead would fail so too,
                        // and take the batch's answers before it along.)
                        let refused_anyway = plan.syncs == 0
                            && self.aborted_tx()
                            && !ends_aborted_tx(&self.classify(&sql));
                        if dup && !refused_anyway && !plan.needs.iter().any(|n| n == name) {
                            plan.needs.push(name.to_string());
                        }
                        plan.dups.push(i);
                        skipped = true;
                        continue;
                    }
                    let c = self.classify(&sql);
                    note_text(&sql, c.is_read(), &mut plan);
                    self.note_statement(&c, &mut plan);
                    let frame = Bytes::copy_from_slice(frame);
                    if name.is_empty() {
                        plan.parsed_unnamed = true;
                        plan.unnamed = Some(frame);
                    } else {
                        exchange.push(name.to_string());
                        plan.statements.push((name.to_string(), frame));
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
                    if !portal.is_empty() {
                        let open = self.exchange.as_ref().is_some_and(|e| {
                            e.portals.iter().any(|p| p == portal)
                                && !plan.portals_closed.iter().any(|p| p == portal)
                        });
                        // Bound again while the exchange a Flush left open still has it.
                        plan.sticky |= open && plan.syncs == 0;
                        plan.portals.push(portal.to_string());
                    }
                    self.note_use(stmt, &mut plan);
                    let parse = match stmt {
                        "" if plan.parsed_unnamed => plan.unnamed.as_ref(),
                        "" => self.state.unnamed.as_ref(),
                        name => plan.statement(self, name),
                    };
                    let change = parse.and_then(|parse| {
                        let sql = parse_text(parse)?;
                        self.state.prepare_change(&sql, &self.classify(&sql))
                    });
                    plan.bound_changes.retain(|(p, _)| p != portal);
                    if let Some(change) = change {
                        plan.bound_changes.push((portal.to_string(), change));
                    }
                }
                tag::DESCRIBE | tag::CLOSE => {
                    let kind = *body.first().ok_or_else(|| bad("Describe/Close"))?;
                    let (name, _) = cstr(&body[1..]).ok_or_else(|| bad("Describe/Close"))?;
                    match (t, kind) {
                        (tag::CLOSE, b'S') if !name.is_empty() && name != NO_STATEMENT => {
                            plan.closed.push(name.to_string())
                        }
                        (tag::CLOSE, b'P') if !name.is_empty() => {
                            plan.portals.retain(|p| p != name);
                            plan.portals_closed.push(name.to_string());
                        }
                        (tag::DESCRIBE, b'S') => self.note_use(name, &mut plan),
                        (tag::DESCRIBE, b'P') if !bound_portals.contains(&name) => {
                            plan.sticky |= self.portal_may_live(name)
                        }
                        _ => {}
                    }
                }
                tag::EXECUTE => {
                    plan.executes = true;
                    let (portal, _) = cstr(body).ok_or_else(|| bad("Execute"))?;
                    if !bound_portals.contains(&portal) {
                        plan.sticky |= self.portal_may_live(portal);
                    }
                    if let Some(i) = plan.bound_changes.iter().position(|(p, _)| p == portal) {
                        plan.changes.push(plan.bound_changes.remove(i).1);
                    }
                }
                tag::SYNC => {
                    plan.syncs += 1;
                    exchange.clear();
                    plan.portals.clear();
                    skipped = false;
                }
                _ => {}
            }
        }
        plan.renamed = renamed;
        if !(plan.executes || self.state.pins.extended_state || plan.extended_state) {
            // Preparing and describing any statement works on a standby and writes nothing: the
            // replica saves a round trip to a far primary, which re-prepares it when it runs.
            plan.read = true;
            plan.tx = None;
        }
        Ok(plan)
    }

    /// The transaction is open and failed (25P02 for all but its end), as last answered.
    fn aborted_tx(&self) -> bool {
        self.tx
            .open()
            .and_then(|r| self.slot_ref(r))
            .is_some_and(|s| s.tx == b'E' && s.expect.is_empty())
    }

    /// Whether a portal bound by an earlier batch may still exist: the unnamed one ends with
    /// its transaction (an implicit one at its Sync), so with none open nor an exchange a Flush
    /// left open, it does not, and a batch that uses it routes as its other statements do (the
    /// server refuses it, 34000, wherever it runs). Nor does a named one, unless the session
    /// may have declared a cursor WITH HOLD.
    fn portal_may_live(&self, portal: &str) -> bool {
        !matches!(self.tx, plan::Tx::Idle)
            || self.exchange.is_some()
            || (!portal.is_empty() && self.state.hold_cursors)
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
    fn note_use(&self, stmt: &str, plan: &mut BatchPlan) {
        if stmt.is_empty() {
            if !plan.parsed_unnamed {
                // The unnamed statement of an earlier batch: its text tells what the Parse's did.
                plan.needs_unnamed = true;
                if let Some(sql) = self.state.unnamed.as_ref().and_then(|f| parse_text(f)) {
                    let c = self.classify(&sql);
                    note_text(&sql, c.is_read(), plan);
                    self.note_statement(&c, plan);
                }
            }
            return;
        }
        if plan.parsed.iter().any(|p| p == stmt) {
            return;
        }
        match self.statement_class(Some(stmt)) {
            Some((sql, c)) => {
                // Known from an earlier Parse: it is prepared where the batch runs. (One parsed
                // later in this batch does not exist yet when this message runs.)
                note_text(&sql, c.is_read(), plan);
                if !plan.needs.iter().any(|n| n == stmt) {
                    plan.needs.push(stmt.to_string());
                }
                self.note_statement(&c, plan)
            }
            // Unknown to pgnear: let the server report it, on the primary.
            None => {
                plan.read = false;
                plan.state_only = Some(false);
                plan.only_pins = false;
                plan.other = true;
            }
        }
    }

    /// A statement the session has (`None`: the unnamed one): its text and class.
    pub(super) fn statement_class(&self, name: Option<&str>) -> Option<(String, Arc<Classified>)> {
        let frame = match name {
            Some(n) => self.state.statements.get(n)?,
            None => self.state.unnamed.as_ref()?,
        };
        let sql = parse_text(frame)?.into_owned();
        let c = self.classify(&sql);
        Some((sql, c))
    }

    fn note_statement(&self, c: &Classified, plan: &mut BatchPlan) {
        if super::inband::command(c).is_some() {
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
        plan.only_pins &= only_pins(c);
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
        // pinning until released) it tracks here too, from the Execute (see `read_batch`).
        let tracked = c.statements.iter().all(|s| {
            matches!(s.kind, Kind::Read | Kind::Write | Kind::Empty) || state::is_tracked(&s.kind)
        });
        if changes_state && !tracked {
            plan.extended_state = true;
            plan.read = false;
        }
        plan.taints |= self.taints(c);
    }

    /// Whether running `c` may leave state on its server that pgnear does not track and a
    /// later session must not see. Settings are tracked (re-applied per session). In session
    /// mode a write may have changed anything (`set_config`, a cursor WITH HOLD...); in
    /// transaction mode, as in other poolers, that is the application's contract.
    pub(super) fn taints(&self, c: &Classified) -> bool {
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

    /// The statements the client prepared with the protocol that `c` uses by name in SQL
    /// (`EXECUTE name`, `DEALLOCATE name`): they must exist where it runs. Session mode only:
    /// transaction mode's statements have shared names the SQL does not know.
    pub(super) fn sql_uses(&self, c: &Classified) -> Vec<String> {
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

    /// The batch is accepted: the session records what it parsed and named.
    pub(super) fn accept_batch(&mut self, plan: &mut BatchPlan) {
        for (name, frame) in plan.statements.drain(..) {
            self.state.statements.insert(name, frame);
        }
        if let Some(unnamed) = plan.unnamed.take() {
            plan.unnamed_before = self.state.unnamed.replace(unnamed);
        }
        for (name, shared) in plan.names.drain(..) {
            match shared {
                Some(shared) => self.state.names.insert(name, shared),
                None => self.state.names.remove(&name),
            };
        }
        if plan.extended_state {
            self.state.pins.extended_state = true;
        }
        self.state.hold_cursors |= plan.hold_cursor;
    }
}

/// Whether Postgres runs this in a failed transaction (an end of it, or nothing at all).
fn ends_aborted_tx(c: &Classified) -> bool {
    c.statements
        .first()
        .is_none_or(|s| s.kind == Kind::Empty || state::is_end(&s.kind))
}
