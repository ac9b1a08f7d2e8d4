//! The read-your-writes gate: may this read use the replica now, wait for it, or go elsewhere?

use std::time::Duration;

use super::watcher::ReplicaState;
use crate::config::ConsistencyMode;
use crate::lsn::Lsn;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// The replica can serve the read now.
    Go,
    /// The replica must first replay this position.
    Wait(Lsn),
    /// The replica cannot serve reads (down, promoted, or lagging beyond `max_replica_lag`).
    Unavailable,
}

/// `target`: the highest of the session's write LSN and its `pgnear.min_lsn`.
pub fn decide(
    mode: ConsistencyMode,
    target: Option<Lsn>,
    replica: &ReplicaState,
    max_lag: Duration,
) -> Gate {
    let lagging = replica
        .lag_seconds
        .is_none_or(|l| l > max_lag.as_secs_f64());
    if !replica.up || !replica.in_recovery || lagging {
        return Gate::Unavailable;
    }
    match (mode, target) {
        (ConsistencyMode::Session, Some(t)) if replica.replay.is_none_or(|r| r < t) => {
            Gate::Wait(t)
        }
        _ => Gate::Go,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(replay: u64, lag_seconds: f64) -> ReplicaState {
        ReplicaState {
            up: true,
            in_recovery: true,
            replay: Some(Lsn(replay)),
            lag_seconds: Some(lag_seconds),
            ..ReplicaState::default()
        }
    }

    #[test]
    fn table() {
        let lag = Duration::from_secs(10);
        let s = ConsistencyMode::Session;
        let e = ConsistencyMode::Eventual;
        let cases: &[(ConsistencyMode, Option<u64>, ReplicaState, Gate)] = &[
            (s, None, state(100, 0.0), Gate::Go),
            (s, Some(100), state(100, 0.0), Gate::Go),
            (s, Some(50), state(100, 0.0), Gate::Go),
            (s, Some(101), state(100, 0.0), Gate::Wait(Lsn(101))),
            (e, Some(101), state(100, 0.0), Gate::Go),
            (s, None, state(100, 11.0), Gate::Unavailable),
            (e, None, state(100, 11.0), Gate::Unavailable),
            (
                s,
                None,
                ReplicaState {
                    up: false,
                    ..state(100, 0.0)
                },
                Gate::Unavailable,
            ),
            (
                s,
                None,
                ReplicaState {
                    lag_seconds: None,
                    ..state(100, 0.0)
                },
                Gate::Unavailable,
            ),
            (
                s,
                None,
                ReplicaState {
                    in_recovery: false,
                    ..state(100, 0.0)
                },
                Gate::Unavailable,
            ),
            (
                s,
                Some(1),
                ReplicaState {
                    replay: None,
                    ..state(0, 0.0)
                },
                Gate::Wait(Lsn(1)),
            ),
        ];
        for (mode, target, st, want) in cases {
            assert_eq!(
                decide(*mode, target.map(Lsn), st, lag),
                *want,
                "{mode:?} {target:?} {st:?}"
            );
        }
    }
}
