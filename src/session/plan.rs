//! The plan for one request: a pure function from what the request is (`Request`), where the
//! session stands (`RouteState`) and what the consistency gate says now (`Gate`) to what the
//! session will do with it (`Plan`). The executor (`route.rs`) runs a plan: it alone waits,
//! connects, sends and changes session state, and only once the plan is accepted.

use bytes::Bytes;

use super::state::PendingState;
use crate::consistency::gate::Gate;
use crate::role::Role;
use crate::router::classify::Hint;
use crate::router::route::{decide, Context, Reason, Request as Policy, RouteSetting};

/// How the request came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A simple Query.
    Query,
    /// A FunctionCall (libpq's fast path: large objects).
    Call,
    /// Extended-protocol messages up to a Sync or a Flush.
    Batch,
}

/// What a request does to the client's transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxEffect {
    Begin,
    End,
}

/// Whether a request is one of pgnear's own commands (`SHOW pgnear.write_lsn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InBand {
    #[default]
    No,
    /// Every statement is one.
    Only,
    /// Some are, some are not.
    Mixed,
}

/// What routing needs to know of a request, read off its statements (see `route.rs`).
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub shape: Shape,
    pub in_band: InBand,
    /// Every statement is replica-eligible.
    pub read: bool,
    pub hint: Option<Hint>,
    /// It opens a READ ONLY transaction.
    pub starts_read_only_tx: bool,
    /// Every statement is a session SET/RESET: it runs where the session is.
    pub state_only: bool,
    pub tx: Option<TxEffect>,
    /// It needs the primary but writes nothing (LISTEN, advisory locks): not refused in replay mode.
    pub only_pins: bool,
    /// A lone plain BEGIN, which may be answered now and sent with the next statement.
    pub defers: bool,
    /// What it sets for a transaction pgnear deferred (`SET TRANSACTION READ ONLY`: `Some(true)`).
    pub sets: Option<bool>,
    /// It runs something (a batch may only prepare and describe).
    pub executes: bool,
    /// It runs or describes a portal bound by an earlier batch: it stays where that portal is.
    pub sticky: bool,
    /// It uses the unnamed statement of an earlier request.
    pub needs_unnamed: bool,
    /// Its session-state changes pin the session to one server (LISTEN, a temp table...).
    pub pins: bool,
    /// A shared replica connection could run it: one autocommit read, no state, nothing that
    /// lives on one server.
    pub shareable: bool,
    /// It could run again on the primary if the replica is lost before its answer begins.
    pub retryable: bool,
    /// A write whose commit position later reads must see.
    pub writes_lsn: bool,
    /// It may be a COPY: its commit position is looked up after it ends.
    pub copy: bool,
    /// It drops, renames or copies a whole database (see `Pool::fence`).
    pub database: bool,
    /// Syncs in a batch (a Query and a FunctionCall count as one).
    pub syncs: usize,
    /// A batch whose last message is not a Sync (a Flush, or a Query or FunctionCall comes
    /// next): its last exchange stays open on the server.
    pub open_end: bool,
}

impl Request {
    /// A request of `shape` that reads, with nothing else to it (tests and callers fill in the rest).
    pub fn new(shape: Shape) -> Request {
        Request {
            shape,
            in_band: InBand::No,
            read: true,
            hint: None,
            starts_read_only_tx: false,
            state_only: false,
            tx: None,
            only_pins: false,
            defers: false,
            sets: None,
            executes: true,
            sticky: false,
            needs_unnamed: false,
            pins: false,
            shareable: false,
            retryable: false,
            writes_lsn: false,
            copy: false,
            database: false,
            syncs: 1,
            open_end: false,
        }
    }
}

/// The client's transaction, as pgnear knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxState {
    Idle,
    /// A BEGIN pgnear answered and has not sent yet.
    Deferred,
    /// Open on this server.
    Open(Role),
}

/// The client's transaction, as the session keeps it.
#[derive(Debug, Default)]
pub enum Tx {
    #[default]
    Idle,
    /// A BEGIN pgnear answered and has not sent yet (see `Session::start_deferred`).
    Deferred(Bytes),
    /// Open on this server, as predicted from what was sent and corrected by each ReadyForQuery.
    Open(Role),
}

impl Tx {
    pub fn open(&self) -> Option<Role> {
        match self {
            Tx::Open(role) => Some(*role),
            _ => None,
        }
    }

    pub fn state(&self) -> TxState {
        match self {
            Tx::Idle => TxState::Idle,
            Tx::Deferred(_) => TxState::Deferred,
            Tx::Open(role) => TxState::Open(*role),
        }
    }
}

/// An extended-protocol exchange a Flush left open, as the session keeps it.
#[derive(Debug)]
pub struct Exchange {
    pub role: Role,
    pub executed: bool,
    /// Session-state changes (SET, LISTEN, …) it executed: recorded once the Sync that ends it
    /// succeeds (an error before it rolls them back).
    pub changes: Vec<PendingState>,
    /// The named portals it bound and did not close: a Bind of one again must reach that
    /// server, which refuses it (42P03) as Postgres does.
    pub portals: Vec<String>,
}

impl Exchange {
    pub fn state(&self) -> ExchangeState {
        ExchangeState {
            role: self.role,
            executed: self.executed,
            changes: self.changes.iter().any(PendingState::changes_state),
            fine: None,
        }
    }
}

/// An extended-protocol exchange a Flush left open (no Sync yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExchangeState {
    pub role: Role,
    /// It ran something; else it only prepared and described, and what follows may go elsewhere.
    pub executed: bool,
    /// It executed session-state changes, waiting for its Sync.
    pub changes: bool,
    /// Its answers are in and none was an error (after one, the server skips to the Sync, so
    /// what follows must go there to be skipped too). `None`: not looked at (see `checks_exchange`).
    pub fine: Option<bool>,
}

/// Where the session stands, as far as routing is concerned.
#[derive(Clone, Copy, Debug)]
pub struct RouteState {
    pub tx: TxState,
    pub exchange: Option<ExchangeState>,
    /// The server running a COPY FROM STDIN, or a batch that may start one.
    pub copy: Option<Role>,
    /// The server that ran the last request (where SET runs, where portals live).
    pub last: Role,
    /// The server where the unnamed statement was last parsed, when the session no longer has
    /// it (that Parse failed, or a simple Query dropped it).
    pub unnamed_gone: Option<Role>,
    /// LISTEN, temp objects, session advisory locks, SQL PREPARE, state set by the extended protocol.
    pub pinned: bool,
    pub serializable: bool,
    pub setting: RouteSetting,
    /// Replay mode outside the primary region: writes are answered with a replay signal.
    pub replays_writes: bool,
    /// A replica to wait for, or tokens to report: commit positions are worth learning.
    pub captures_lsn: bool,
    /// Shared replica connections exist and the session has none of its own.
    pub lanes: bool,
    /// A transaction's end (COMMIT, ROLLBACK) went to this server and its ReadyForQuery is
    /// still to come: an error before it keeps the transaction open there (aborted).
    pub ending: Option<Role>,
}

/// What the session does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// pgnear answers it itself (after what earlier requests are owed).
    InBand,
    /// A plain BEGIN: answered now, sent before the transaction's first statement. An exchange
    /// that only prepared on this server is ended first (pgnear's own Sync).
    DeferBegin {
        end_prepared: Option<Role>,
    },
    /// The transaction pgnear deferred starts first (on the replica when it is read-only and
    /// can be served there), then the request is planned again. `writes`: its first statement
    /// is neither a read nor a setting: a read-only transaction on the primary runs some of
    /// those (NOTIFY, LISTEN, large objects) that a standby refuses, and refuses the rest as a
    /// standby does, so it starts on the primary.
    StartDeferred {
        sets: Option<bool>,
        writes: bool,
    },
    /// The request would go elsewhere than a transaction's unanswered end (or be deferred):
    /// that end's answer is waited for, then the request is planned again.
    Confirm(Role),
    Run(Run),
}

/// A request that goes to a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub role: Role,
    pub reason: Reason,
    /// A replica route chosen now (not bound to a server by a transaction, a COPY, an open
    /// exchange or a portal): the executor makes it consistent (waits for the session's commit
    /// position on the replica) or moves it to the primary, per `consistency.on_timeout`.
    pub settle: bool,
    /// Offered first to a shared replica connection (once settled on the replica).
    pub share: bool,
    /// A write comes into an exchange a Flush left open on the replica after reads there: that
    /// exchange is ended there first (pgnear's own Sync), and the write routed on its own. The
    /// settings the exchange made go with it: they run first in the write's exchange, and hold
    /// only if it does, as in the one implicit transaction Postgres would have run.
    pub end_replica_exchange: bool,
    /// An exchange that only prepared on this server holds nothing the request needs: it is
    /// ended there (pgnear's own Sync) unless the request runs there too.
    pub end_prepared: Option<Role>,
    /// The request ends, without a Sync, an exchange whose state changes wait for one: whether
    /// they hold is not known, so the session stays on that server.
    pub ends_unsynced: bool,
    /// Refused with the replay signal (replay mode outside the primary region).
    pub refuse_write: bool,
    pub tx: Option<TxEffect>,
    /// Once run on the replica for a read: it may run again on the primary if the replica is
    /// lost before its answer begins.
    pub again: bool,
    /// Once run on the primary: its commit position is looked up.
    pub capture: Capture,
    /// Once run on the primary: the pools keep off the database it drops, renames or copies.
    pub fences: bool,
    /// A batch that ends in a Flush leaves its exchange open: `Some(executed)`.
    pub exchange_after: Option<bool>,
}

/// When the commit position of a write is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    No,
    /// Pipelined right behind it.
    Behind,
    /// After its ReadyForQuery: it may be a COPY, and nothing of pgnear's may reach a server in
    /// copy-in mode.
    AfterCopy,
}

/// Whether planning `r` needs `ExchangeState::fine` (the executor drains that server to know).
pub fn checks_exchange(r: &Request, s: &RouteState) -> bool {
    let Some(e) = s.exchange else {
        return false;
    };
    s.tx == TxState::Idle && r.executes && !r.sticky && (!e.executed || ends_replica_reads(r, s))
}

/// `Run::end_replica_exchange`'s conditions, but for the exchange's outcome.
fn ends_replica_reads(r: &Request, s: &RouteState) -> bool {
    s.exchange
        .is_some_and(|e| e.role == Role::Replica && e.executed)
        && !r.read
        && s.copy.is_none()
}

/// Plans one request. Pure: the same request in the same state plans the same.
pub fn plan(r: &Request, s: &RouteState, gate: &Gate) -> Plan {
    let batch = r.shape == Shape::Batch;
    match r.in_band {
        InBand::Only if !(batch && r.sticky) => return Plan::InBand,
        InBand::Mixed if !batch => return Plan::InBand,
        _ => {}
    }
    let tx_idle = s.tx == TxState::Idle;
    // Whether the end really ended the transaction decides what follows.
    let unconfirmed_end = s.ending.filter(|_| tx_idle);
    if let Some(role) = unconfirmed_end.filter(|_| r.defers) {
        return Plan::Confirm(role);
    }
    let fine = |e: &ExchangeState| e.fine == Some(true);
    // An exchange that only prepared: what runs now may go elsewhere.
    let movable = s
        .exchange
        .filter(|e| !e.executed && r.executes && !r.sticky && tx_idle && fine(e));
    let end_replica_exchange = r.executes
        && ends_replica_reads(r, s)
        && !r.sticky
        && tx_idle
        && s.exchange.is_some_and(|e| fine(&e));
    let end_prepared = movable.map(|e| e.role);
    // Deferred only with no exchange to end but a prepare-only one.
    if r.defers && tx_idle && (s.exchange.is_none() || movable.is_some()) && !s.replays_writes {
        return Plan::DeferBegin { end_prepared };
    }
    let exchange = s
        .exchange
        .filter(|_| movable.is_none() && !end_replica_exchange);
    if s.tx == TxState::Deferred {
        return Plan::StartDeferred {
            sets: r.sets,
            writes: !r.read && !r.state_only && r.sets.is_none() && r.tx.is_none(),
        };
    }
    let open_tx = match s.tx {
        TxState::Open(role) => Some(role),
        _ => None,
    };
    let bound = if let Some(role) = s.copy {
        // What follows a COPY FROM STDIN belongs to the server running it.
        Some(role)
    } else if let Some(e) = exchange {
        // The rest of an exchange a Flush left open (an implicit transaction, a skip to the
        // Sync after an error) belongs to the server that has it.
        Some(e.role)
    } else if r.sticky {
        Some(s.last)
    } else if r.needs_unnamed && open_tx.is_none() {
        // That server answers for the statement (it does not exist), not one with an older one.
        // (In a transaction, the transaction's server answers, which has none either.)
        s.unnamed_gone
    } else {
        None
    };
    let (role, reason, settle) = match bound {
        Some(role) => (role, Reason::Transaction, false),
        // SET and RESET run where the session is; other servers get them replayed later.
        None if r.state_only && open_tx.is_none() => {
            (s.last, Reason::Read, s.last == Role::Replica)
        }
        None => {
            let policy = Policy {
                read: r.read,
                hint: r.hint,
                starts_read_only_tx: r.starts_read_only_tx,
            };
            let ctx = Context {
                in_transaction: open_tx,
                pinned: s.pinned || r.pins,
                serializable: s.serializable,
                setting: s.setting,
                replica_available: *gate != Gate::Unavailable,
            };
            let (role, reason) = decide(policy, ctx);
            (role, reason, role == Role::Replica && open_tx.is_none())
        }
    };
    if let Some(ending) = unconfirmed_end.filter(|&e| e != role) {
        return Plan::Confirm(ending);
    }
    let ends_unsynced = !batch && exchange.is_some_and(|e| e.changes);
    let open_after = match r.tx {
        Some(TxEffect::Begin) => true,
        Some(TxEffect::End) => false,
        None => open_tx.is_some(),
    };
    let autocommit = !open_after;
    let exchange_after =
        (batch && r.open_end).then(|| r.executes || exchange.is_some_and(|e| e.executed));
    let capture = if autocommit && r.writes_lsn && s.captures_lsn {
        if r.copy {
            Capture::AfterCopy
        } else {
            Capture::Behind
        }
    } else {
        Capture::No
    };
    Plan::Run(Run {
        role,
        reason,
        settle,
        share: settle && r.shareable && s.lanes && s.exchange.is_none() && !s.pinned && !r.pins,
        end_replica_exchange,
        end_prepared,
        ends_unsynced,
        refuse_write: reason == Reason::Write && s.replays_writes && !r.only_pins,
        tx: r.tx,
        again: r.retryable && autocommit && exchange.is_none(),
        capture,
        fences: r.database && !r.read,
        exchange_after,
    })
}

#[cfg(test)]
mod tests;
