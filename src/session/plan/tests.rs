//! Table tests of `plan()`: every routing and consistency rule, without a socket.

use super::*;
use crate::lsn::Lsn;

fn idle() -> RouteState {
    RouteState {
        tx: TxState::Idle,
        exchange: None,
        copy: None,
        last: Role::Primary,
        unnamed_gone: None,
        pinned: false,
        serializable: false,
        setting: RouteSetting::Auto,
        replays_writes: false,
        captures_lsn: true,
        lanes: false,
        ending: None,
    }
}

fn query() -> Request {
    Request::new(Shape::Query)
}

fn write() -> Request {
    Request {
        read: false,
        writes_lsn: true,
        ..query()
    }
}

fn batch() -> Request {
    Request::new(Shape::Batch)
}

fn run(p: Plan) -> Run {
    match p {
        Plan::Run(run) => run,
        other => panic!("expected a run, got {other:?}"),
    }
}

const GO: Gate = Gate::Go;
const DOWN: Gate = Gate::Unavailable;

fn exchange(role: Role, executed: bool, fine: Option<bool>) -> Option<ExchangeState> {
    Some(ExchangeState {
        role,
        executed,
        changes: false,
        fine,
    })
}

#[test]
fn reads_writes_and_transactions_route_as_designed() {
    let open_on = |role| RouteState {
        tx: TxState::Open(role),
        ..idle()
    };
    let read_only_begin = Request {
        starts_read_only_tx: true,
        tx: Some(TxEffect::Begin),
        ..query()
    };
    let begin = Request {
        read: false,
        tx: Some(TxEffect::Begin),
        ..query()
    };
    // (what, request, state, gate, route, reason, settled through the gate)
    let table: Vec<(&str, Request, RouteState, Gate, Role, Reason, bool)> = vec![
        (
            "a read",
            query(),
            idle(),
            GO,
            Role::Replica,
            Reason::Read,
            true,
        ),
        (
            "a write",
            write(),
            idle(),
            GO,
            Role::Primary,
            Reason::Write,
            false,
        ),
        (
            "a read, no replica",
            query(),
            idle(),
            DOWN,
            Role::Primary,
            Reason::Fallback,
            false,
        ),
        (
            "a read in a transaction",
            query(),
            open_on(Role::Primary),
            GO,
            Role::Primary,
            Reason::Transaction,
            false,
        ),
        (
            "a write in a read-only transaction",
            write(),
            open_on(Role::Replica),
            GO,
            Role::Replica,
            Reason::Transaction,
            false,
        ),
        (
            "BEGIN",
            begin,
            idle(),
            GO,
            Role::Primary,
            Reason::Write,
            false,
        ),
        // A read-only transaction is consistent too: the gate waits for the session's writes.
        (
            "BEGIN READ ONLY ISOLATION LEVEL ...",
            read_only_begin,
            idle(),
            GO,
            Role::Replica,
            Reason::Transaction,
            true,
        ),
        (
            "a read, pinned",
            query(),
            RouteState {
                pinned: true,
                ..idle()
            },
            GO,
            Role::Primary,
            Reason::Pin,
            false,
        ),
        (
            "a read that pins (its own change)",
            Request {
                pins: true,
                ..query()
            },
            idle(),
            GO,
            Role::Primary,
            Reason::Pin,
            false,
        ),
        (
            "a read, serializable",
            query(),
            RouteState {
                serializable: true,
                ..idle()
            },
            GO,
            Role::Primary,
            Reason::Pin,
            false,
        ),
        (
            "a read, SET pgnear.route = primary",
            query(),
            RouteState {
                setting: RouteSetting::Primary,
                ..idle()
            },
            GO,
            Role::Primary,
            Reason::Pin,
            false,
        ),
        (
            "a read, SET pgnear.route = replica",
            query(),
            RouteState {
                setting: RouteSetting::Replica,
                ..idle()
            },
            GO,
            Role::Replica,
            Reason::Hint,
            true,
        ),
        (
            "a read hinted /* pgnear:primary */",
            Request {
                hint: Some(Hint::Primary),
                ..query()
            },
            idle(),
            GO,
            Role::Primary,
            Reason::Hint,
            false,
        ),
        (
            "a write hinted /* pgnear:replica */",
            Request {
                hint: Some(Hint::Replica),
                ..write()
            },
            idle(),
            GO,
            Role::Primary,
            Reason::Write,
            false,
        ),
        (
            "SET where the session is (replica)",
            Request {
                state_only: true,
                ..query()
            },
            RouteState {
                last: Role::Replica,
                ..idle()
            },
            GO,
            Role::Replica,
            Reason::Read,
            true,
        ),
        (
            "SET where the session is (primary)",
            Request {
                state_only: true,
                ..query()
            },
            idle(),
            GO,
            Role::Primary,
            Reason::Read,
            false,
        ),
        (
            "SET in a transaction",
            Request {
                state_only: true,
                ..query()
            },
            open_on(Role::Replica),
            GO,
            Role::Replica,
            Reason::Transaction,
            false,
        ),
        (
            "a read while a COPY runs",
            query(),
            RouteState {
                copy: Some(Role::Primary),
                ..idle()
            },
            GO,
            Role::Primary,
            Reason::Transaction,
            false,
        ),
        (
            "a FunctionCall",
            Request {
                read: false,
                ..Request::new(Shape::Call)
            },
            idle(),
            GO,
            Role::Primary,
            Reason::Write,
            false,
        ),
        (
            "a FunctionCall in a transaction",
            Request {
                read: false,
                ..Request::new(Shape::Call)
            },
            open_on(Role::Replica),
            GO,
            Role::Replica,
            Reason::Transaction,
            false,
        ),
        (
            "a portal of an earlier batch",
            Request {
                sticky: true,
                ..batch()
            },
            RouteState {
                last: Role::Replica,
                ..idle()
            },
            GO,
            Role::Replica,
            Reason::Transaction,
            false,
        ),
        (
            "the unnamed statement whose Parse failed",
            Request {
                needs_unnamed: true,
                ..batch()
            },
            RouteState {
                unnamed_gone: Some(Role::Replica),
                ..idle()
            },
            GO,
            Role::Replica,
            Reason::Transaction,
            false,
        ),
        (
            "the unnamed statement a transaction's BEGIN dropped",
            Request {
                needs_unnamed: true,
                ..batch()
            },
            RouteState {
                unnamed_gone: Some(Role::Replica),
                ..open_on(Role::Primary)
            },
            GO,
            Role::Primary,
            Reason::Transaction,
            false,
        ),
        (
            "the unnamed statement, still there",
            Request {
                needs_unnamed: true,
                ..write()
            },
            idle(),
            GO,
            Role::Primary,
            Reason::Write,
            false,
        ),
    ];
    for (what, r, s, gate, role, reason, settle) in table {
        let got = run(plan(&r, &s, &gate));
        assert_eq!(
            (got.role, got.reason, got.settle),
            (role, reason, settle),
            "{what}"
        );
    }
}

#[test]
fn a_flush_open_exchange_holds_what_follows_unless_it_only_prepared() {
    let on = |e| RouteState {
        exchange: e,
        ..idle()
    };
    // Executed there: the rest of the exchange stays.
    let p = run(plan(
        &query(),
        &on(exchange(Role::Primary, true, None)),
        &GO,
    ));
    assert_eq!((p.role, p.reason), (Role::Primary, Reason::Transaction));
    assert_eq!(p.end_prepared, None);
    // Only prepared, fine: the read is routed on its own; the primary's exchange is ended.
    let s = on(exchange(Role::Primary, false, Some(true)));
    assert!(checks_exchange(&query(), &s));
    let p = run(plan(&query(), &s, &GO));
    assert_eq!((p.role, p.reason), (Role::Replica, Reason::Read));
    assert_eq!(p.end_prepared, Some(Role::Primary));
    // Only prepared, but a Parse failed: what follows is skipped there, as on Postgres.
    let p = run(plan(
        &query(),
        &on(exchange(Role::Primary, false, Some(false))),
        &GO,
    ));
    assert_eq!((p.role, p.end_prepared), (Role::Primary, None));
    // A batch that only prepares more joins the exchange.
    let describe = Request {
        executes: false,
        syncs: 0,
        open_end: true,
        ..batch()
    };
    let s = on(exchange(Role::Replica, false, None));
    assert!(!checks_exchange(&describe, &s));
    let p = run(plan(&describe, &s, &GO));
    assert_eq!((p.role, p.exchange_after), (Role::Replica, Some(false)));
    // A write after reads on the replica's exchange: it ends there; the write goes to the primary.
    let w = Request {
        syncs: 1,
        ..write()
    };
    let s = on(exchange(Role::Replica, true, Some(true)));
    assert!(checks_exchange(
        &Request {
            shape: Shape::Batch,
            ..w
        },
        &s
    ));
    let p = run(plan(
        &Request {
            shape: Shape::Batch,
            ..w
        },
        &s,
        &GO,
    ));
    assert!(p.end_replica_exchange);
    assert_eq!((p.role, p.reason), (Role::Primary, Reason::Write));
    // ... also when its settings wait for the Sync there (they go with the write).
    let changed = |fine| {
        on(Some(ExchangeState {
            changes: true,
            role: Role::Replica,
            executed: true,
            fine,
        }))
    };
    assert!(checks_exchange(&w, &changed(None)));
    let p = run(plan(&w, &changed(Some(true)), &GO));
    assert!(p.end_replica_exchange);
    assert_eq!((p.role, p.ends_unsynced), (Role::Primary, false));
    // ... but a read joins it, and its settings keep the session there.
    let p = run(plan(&query(), &changed(Some(true)), &GO));
    assert!(!p.end_replica_exchange);
    assert_eq!((p.role, p.ends_unsynced), (Role::Replica, true));
    // ... nor when it runs a portal of that exchange.
    let sticky = Request {
        sticky: true,
        shape: Shape::Batch,
        ..w
    };
    let p = run(plan(
        &sticky,
        &on(exchange(Role::Replica, true, Some(true))),
        &GO,
    ));
    assert_eq!((p.role, p.end_replica_exchange), (Role::Replica, false));
}

#[test]
fn a_plain_begin_is_deferred_and_started_with_the_next_statement() {
    let begin = Request {
        defers: true,
        read: false,
        tx: Some(TxEffect::Begin),
        ..query()
    };
    assert_eq!(
        plan(&begin, &idle(), &GO),
        Plan::DeferBegin { end_prepared: None }
    );
    // A prepare-only exchange is ended first.
    let s = RouteState {
        exchange: exchange(Role::Replica, false, Some(true)),
        ..idle()
    };
    assert_eq!(
        plan(&begin, &s, &GO),
        Plan::DeferBegin {
            end_prepared: Some(Role::Replica)
        }
    );
    // After reads on the replica's exchange: that exchange ends there, and the BEGIN is sent.
    let s = RouteState {
        exchange: exchange(Role::Replica, true, Some(true)),
        ..idle()
    };
    let p = run(plan(&begin, &s, &GO));
    assert!(p.end_replica_exchange);
    assert_eq!((p.role, p.reason), (Role::Primary, Reason::Write));
    // Not in replay mode: the BEGIN goes to the server, which answers for itself.
    let replay = RouteState {
        replays_writes: true,
        ..idle()
    };
    assert!(matches!(plan(&begin, &replay, &GO), Plan::Run(_)));
    // The next statement starts it first, with what it sets.
    let deferred = RouteState {
        tx: TxState::Deferred,
        ..idle()
    };
    let set_read_only = Request {
        sets: Some(true),
        ..query()
    };
    assert_eq!(
        plan(&set_read_only, &deferred, &GO),
        Plan::StartDeferred {
            sets: Some(true),
            writes: false
        }
    );
    // A NOTIFY (a write a read-only transaction runs on the primary) starts it there.
    assert_eq!(
        plan(&write(), &deferred, &GO),
        Plan::StartDeferred {
            sets: None,
            writes: true
        }
    );
    // In-band commands do not start it.
    let show = Request {
        in_band: InBand::Only,
        ..query()
    };
    assert_eq!(plan(&show, &deferred, &GO), Plan::InBand);
}

#[test]
fn what_follows_an_unanswered_transaction_end_waits_for_it_unless_it_goes_there_too() {
    // A COMMIT sent to the primary, its answer still to come (an error before it would have
    // kept the transaction open there, aborted).
    let ending = RouteState {
        ending: Some(Role::Primary),
        ..idle()
    };
    // A read would go to the replica: the COMMIT's answer decides.
    assert_eq!(plan(&query(), &ending, &GO), Plan::Confirm(Role::Primary));
    // A lone Sync (a batch that runs nothing) would too.
    let sync = Request {
        executes: false,
        ..batch()
    };
    assert_eq!(plan(&sync, &ending, &GO), Plan::Confirm(Role::Primary));
    // A BEGIN pgnear would answer itself.
    let begin = Request {
        defers: true,
        read: false,
        tx: Some(TxEffect::Begin),
        ..query()
    };
    assert_eq!(plan(&begin, &ending, &GO), Plan::Confirm(Role::Primary));
    // A write goes to the primary anyway: pipelined behind the COMMIT, which the server answers.
    let p = run(plan(&write(), &ending, &GO));
    assert_eq!(p.role, Role::Primary);
    // Once the transaction is known open again (its ReadyForQuery said so), it holds.
    let reopened = RouteState {
        tx: TxState::Open(Role::Primary),
        ..ending
    };
    assert_eq!(run(plan(&query(), &reopened, &GO)).role, Role::Primary);
}

#[test]
fn in_band_commands_are_answered_by_pgnear() {
    let only = Request {
        in_band: InBand::Only,
        ..query()
    };
    let mixed = Request {
        in_band: InBand::Mixed,
        ..query()
    };
    assert_eq!(plan(&only, &idle(), &GO), Plan::InBand);
    // A query mixing them is refused by pgnear (0A000); a batch mixing them goes to the server.
    assert_eq!(plan(&mixed, &idle(), &GO), Plan::InBand);
    assert!(matches!(
        plan(
            &Request {
                shape: Shape::Batch,
                ..mixed
            },
            &idle(),
            &GO
        ),
        Plan::Run(_)
    ));
    // A batch running a portal of an earlier batch goes where it is.
    let sticky = Request {
        shape: Shape::Batch,
        sticky: true,
        ..only
    };
    assert!(matches!(plan(&sticky, &idle(), &GO), Plan::Run(_)));
}

#[test]
fn replay_mode_refuses_writes_but_not_pins() {
    let s = RouteState {
        replays_writes: true,
        ..idle()
    };
    assert!(run(plan(&write(), &s, &GO)).refuse_write);
    let listen = Request {
        only_pins: true,
        ..write()
    };
    assert!(!run(plan(&listen, &s, &GO)).refuse_write);
    assert!(!run(plan(&query(), &s, &GO)).refuse_write);
    // A write inside a transaction on the primary (opened there before) is the server's.
    let open = RouteState {
        tx: TxState::Open(Role::Primary),
        ..s
    };
    assert!(!run(plan(&write(), &open, &GO)).refuse_write);
    assert!(!run(plan(&write(), &idle(), &GO)).refuse_write);
}

#[test]
fn commit_positions_are_captured_for_autocommit_writes_only() {
    let wait = Gate::Wait(Lsn(42));
    assert_eq!(run(plan(&write(), &idle(), &wait)).capture, Capture::Behind);
    let copy = Request {
        copy: true,
        ..write()
    };
    assert_eq!(run(plan(&copy, &idle(), &GO)).capture, Capture::AfterCopy);
    let open = RouteState {
        tx: TxState::Open(Role::Primary),
        ..idle()
    };
    assert_eq!(run(plan(&write(), &open, &GO)).capture, Capture::No);
    // COMMIT ends the transaction: its position is the one that matters.
    let commit = Request {
        tx: Some(TxEffect::End),
        ..write()
    };
    assert_eq!(run(plan(&commit, &open, &GO)).capture, Capture::Behind);
    // Nothing to wait for and no tokens to report.
    let quiet = RouteState {
        captures_lsn: false,
        ..idle()
    };
    assert_eq!(run(plan(&write(), &quiet, &GO)).capture, Capture::No);
    assert_eq!(run(plan(&query(), &idle(), &GO)).capture, Capture::No);
}

#[test]
fn reads_share_lanes_and_run_again_only_when_autocommit() {
    let lanes = RouteState {
        lanes: true,
        ..idle()
    };
    let shareable = Request {
        shareable: true,
        retryable: true,
        ..query()
    };
    let p = run(plan(&shareable, &lanes, &GO));
    assert!(p.share && p.again);
    // Pinned, or an exchange open, or no lanes: its own replica connection.
    let pinned = RouteState {
        pinned: true,
        ..lanes
    };
    assert!(!run(plan(&shareable, &pinned, &GO)).share);
    assert!(!run(plan(&shareable, &idle(), &GO)).share);
    let open = RouteState {
        tx: TxState::Open(Role::Replica),
        ..lanes
    };
    let p = run(plan(&shareable, &open, &GO));
    assert!(!p.share && !p.again && !p.settle);
}

#[test]
fn database_lifecycle_fences_the_pools() {
    let drop = Request {
        database: true,
        ..write()
    };
    assert!(run(plan(&drop, &idle(), &GO)).fences);
    assert!(!run(plan(&write(), &idle(), &GO)).fences);
}

#[test]
fn batches_ending_in_flush_leave_their_exchange_open() {
    let flushed = Request {
        syncs: 0,
        open_end: true,
        ..batch()
    };
    assert_eq!(run(plan(&flushed, &idle(), &GO)).exchange_after, Some(true));
    assert_eq!(run(plan(&batch(), &idle(), &GO)).exchange_after, None);
    // A Sync, then more, then a Flush: the part after the Sync is an open exchange.
    let tail = Request {
        syncs: 1,
        open_end: true,
        ..batch()
    };
    assert_eq!(run(plan(&tail, &idle(), &GO)).exchange_after, Some(true));
    // A Query never leaves one open.
    assert_eq!(
        run(plan(
            &Request {
                syncs: 0,
                ..query()
            },
            &idle(),
            &GO
        ))
        .exchange_after,
        None
    );
}
