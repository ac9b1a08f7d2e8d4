//! The primary's health, and which of the primary URL's hosts is the primary. Every
//! `PROBE_INTERVAL` a control connection to each address of each host asks whether it is in
//! recovery, and the primary's WAL position and timeline, within `upstream.connect_timeout`.
//! The one address not in recovery takes the primary's connections (`Upstream::chosen`); of two
//! that both claim to be primary (an old primary restarted after a promotion) the newer timeline
//! wins, and when they are on the same one writes are refused (08006, naming both). A promotion
//! is followed at the next probe, and a connect that fails asks for one at once.
//!
//! For the chosen address: no answer by the deadline marks the primary down at once (it stopped
//! answering); other failures (a refused or closed connection, an error) mark it down when two
//! come in a row. One success marks it up. The position it reads also gives the replica's lag.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::conn::{Chosen, Pick, Upstream};
use super::control::{ControlConn, ControlError};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::role::Role;
use crate::shutdown::Shutdown;

pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive failures (other than a missed deadline) before the primary counts as down.
const DOWN_AFTER: u32 = 2;
/// How often a session (or a shared connection) that is owed answers checks whether its
/// server stopped answering: the health state can turn down at any moment, and the client's
/// 08006 should follow it closely.
pub const SILENT_CHECK: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrimaryState {
    pub up: bool,
    /// Its health checks failed (not merely: not probed yet): new server connections to it
    /// are not attempted, so new writes fail at once instead of after `connect_timeout`.
    pub down: bool,
    /// The primary's WAL write position at the last probe.
    pub lsn: Option<Lsn>,
}

/// What one address of the primary's hosts answered at the last probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRole {
    /// Not in recovery, on this timeline, at this WAL position.
    Primary { timeline: u32, lsn: Option<Lsn> },
    /// In recovery (a standby, or a demoted old primary).
    Standby,
    /// No answer (down, refused, or too slow).
    Down,
}

/// The shortest time between two probes when connects keep failing and asking for one.
const RECHECK_MIN: Duration = Duration::from_millis(100);

/// The probe's question: in recovery?, and for a primary its WAL position and timeline (from
/// the name of the WAL file it writes).
const PROBE_QUERY: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
     CASE WHEN pg_is_in_recovery() THEN NULL \
     ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END";

/// Which address takes the primary's connections, given what each answered (in the URL's
/// order) and the previous choice.
pub fn choose(prev: Chosen, seen: &[(SocketAddr, HostRole)]) -> Chosen {
    let primaries: Vec<(SocketAddr, u32)> = seen
        .iter()
        .filter_map(|&(a, r)| match r {
            HostRole::Primary { timeline, .. } => Some((a, timeline)),
            _ => None,
        })
        .collect();
    if let Some(newest) = primaries.iter().map(|&(_, t)| t).max() {
        let on_newest: Vec<SocketAddr> = primaries
            .iter()
            .filter(|&&(_, t)| t == newest)
            .map(|&(a, _)| a)
            .collect();
        return match on_newest[..] {
            [one] => Chosen::At(one),
            [a, b, ..] => Chosen::Conflict(a, b),
            [] => prev,
        };
    }
    let answered = |addr: SocketAddr| seen.iter().any(|&(a, r)| a == addr && r != HostRole::Down);
    match prev {
        // Down, not demoted: it stays the primary (its connects fail until it is back).
        Chosen::At(a) if !answered(a) => prev,
        _ if seen.iter().any(|&(_, r)| r != HostRole::Down) => Chosen::Nowhere,
        _ => prev,
    }
}

pub struct PrimaryProbe {
    state: watch::Sender<PrimaryState>,
    /// What each address answered at the last probe, in the URL's order (for `/status`).
    hosts: Mutex<Vec<(SocketAddr, HostRole)>>,
}

impl PrimaryProbe {
    pub fn spawn(
        primary: Arc<Upstream>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Arc<PrimaryProbe> {
        let probe = Arc::new(PrimaryProbe {
            state: watch::channel(PrimaryState::default()).0,
            hosts: Mutex::new(Vec::new()),
        });
        tokio::spawn(probe.clone().run(primary, metrics, shutdown));
        probe
    }

    pub fn current(&self) -> PrimaryState {
        *self.state.borrow()
    }

    /// What each address of the primary's hosts answered at the last probe.
    pub fn hosts(&self) -> Vec<(SocketAddr, HostRole)> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (at most `limit`) for the first successful probe.
    pub async fn first_contact(&self, limit: Duration) {
        let mut rx = self.state.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| s.up)).await;
    }

    async fn run(
        self: Arc<Self>,
        primary: Arc<Upstream>,
        metrics: Arc<Metrics>,
        mut shutdown: Shutdown,
    ) {
        let mut conns: HashMap<SocketAddr, ControlConn> = HashMap::new();
        let mut failures = 0u32;
        loop {
            let started = tokio::time::Instant::now();
            let addrs: Vec<SocketAddr> = match primary.resolve().await {
                Ok(addrs) => addrs.into_iter().map(|(_, a)| a).collect(),
                Err(_) => Vec::new(),
            };
            // The addresses that left DNS: their servers are no longer this upstream.
            conns.retain(|a, _| addrs.contains(a));
            let mut probes = tokio::task::JoinSet::new();
            for &addr in &addrs {
                let conn = conns.remove(&addr);
                let primary = primary.clone();
                probes.spawn(async move { (addr, probe(&primary, addr, conn).await) });
            }
            let mut answers = HashMap::new();
            while let Some(done) = probes.join_next().await {
                if let Ok((addr, answer)) = done {
                    answers.insert(addr, answer);
                }
            }
            let mut seen = Vec::with_capacity(addrs.len());
            let mut errors = HashMap::new();
            for addr in addrs {
                let role = match answers.remove(&addr) {
                    Some(Ok((role, conn))) => {
                        conns.insert(addr, conn);
                        role
                    }
                    Some(Err(e)) => {
                        errors.insert(addr, e);
                        HostRole::Down
                    }
                    None => HostRole::Down,
                };
                seen.push((addr, role));
            }
            let prev = primary.chosen();
            let chosen = choose(prev, &seen);
            if chosen != prev {
                primary.choose(chosen);
                note_change(&primary, prev, chosen, &metrics);
            }
            *self.hosts.lock().unwrap_or_else(|p| p.into_inner()) = seen.clone();
            self.update(&primary, chosen, &seen, &mut errors, &mut failures);
            metrics.upstream_up(Role::Primary, self.state.borrow().up);
            let next = started + PROBE_INTERVAL;
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = primary.recheck.notified() => {
                    tokio::time::sleep_until(started + RECHECK_MIN).await;
                }
                _ = shutdown.stopped() => return,
            }
        }
    }

    /// The primary's state from what its chosen address answered.
    fn update(
        &self,
        primary: &Upstream,
        chosen: Chosen,
        seen: &[(SocketAddr, HostRole)],
        errors: &mut HashMap<SocketAddr, ControlError>,
        failures: &mut u32,
    ) {
        let addr = match chosen {
            Chosen::At(a) => a,
            // Connects fail at once with what is wrong (see `Upstream::candidates`).
            Chosen::Nowhere | Chosen::Conflict(..) => {
                self.state.send_replace(PrimaryState::default());
                return;
            }
            // Nothing answered yet: the first (or only) address speaks for the primary.
            Chosen::Unknown => match seen.first() {
                Some(&(a, _)) => a,
                None => {
                    *failures += 1;
                    if *failures >= DOWN_AFTER {
                        self.mark_down(primary, "its host cannot be resolved");
                    }
                    return;
                }
            },
        };
        match seen.iter().find(|&&(a, _)| a == addr).map(|&(_, r)| r) {
            Some(HostRole::Primary { lsn, .. }) => {
                *failures = 0;
                if !self.state.borrow().up {
                    tracing::info!(primary = %primary.url, %addr, "primary is up");
                }
                self.state.send_replace(PrimaryState {
                    up: true,
                    down: false,
                    lsn,
                });
            }
            _ => {
                *failures += 1;
                let error = errors.remove(&addr);
                let missed = error.as_ref().is_some_and(ControlError::is_missed);
                if missed || *failures >= DOWN_AFTER {
                    let why = error.map_or("in recovery".to_string(), |e| e.to_string());
                    self.mark_down(primary, &why);
                }
            }
        }
    }

    fn mark_down(&self, primary: &Upstream, why: &str) {
        if self.state.borrow().up {
            tracing::warn!(primary = %primary.url, error = why, "primary is down");
        }
        self.state.send_modify(|s| {
            s.up = false;
            s.down = true;
        });
    }
}

/// Asks one address what it is, on `conn` or a new control connection to it.
async fn probe(
    primary: &Upstream,
    addr: SocketAddr,
    conn: Option<ControlConn>,
) -> Result<(HostRole, ControlConn), ControlError> {
    let deadline = primary.connect_timeout;
    let mut conn = match conn {
        Some(c) => c,
        None => ControlConn::connect_to(primary, Pick::Only(addr), deadline).await?,
    };
    let row = conn.query_row_within(PROBE_QUERY, deadline).await?;
    let column = |i: usize| row.get(i).cloned().flatten();
    let role = if column(0).as_deref() == Some("t") {
        HostRole::Standby
    } else {
        HostRole::Primary {
            timeline: column(2)
                .and_then(|t| u32::from_str_radix(&t, 16).ok())
                .unwrap_or(0),
            lsn: column(1).and_then(|v| v.parse().ok()),
        }
    };
    Ok((role, conn))
}

/// Logs and counts a change of the address that takes the primary's connections.
fn note_change(primary: &Upstream, prev: Chosen, chosen: Chosen, metrics: &Metrics) {
    metrics.primary_changes.inc();
    match chosen {
        Chosen::At(addr) if prev == Chosen::Unknown => {
            tracing::info!(primary = %primary.url, %addr, "found the primary")
        }
        Chosen::At(addr) => {
            tracing::warn!(primary = %primary.url, %addr, was = ?prev, "the primary moved")
        }
        Chosen::Nowhere => tracing::warn!(
            primary = %primary.url,
            "no host of the primary is a primary (every one that answers is in recovery): writes fail"
        ),
        Chosen::Conflict(a, b) => tracing::error!(
            primary = %primary.url, %a, %b,
            "two hosts claim to be the primary on the same timeline (split brain): writes are refused"
        ),
        Chosen::Unknown => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn primary(timeline: u32) -> HostRole {
        HostRole::Primary {
            timeline,
            lsn: None,
        }
    }

    #[test]
    fn the_one_not_in_recovery_is_the_primary() {
        let (a, b) = (addr(1), addr(2));
        let seen = [(a, HostRole::Standby), (b, primary(1))];
        assert_eq!(choose(Chosen::Unknown, &seen), Chosen::At(b));
        // A promotion: the old primary gone, the standby now primary on a newer timeline.
        let seen = [(a, primary(2)), (b, HostRole::Down)];
        assert_eq!(choose(Chosen::At(b), &seen), Chosen::At(a));
        // The old primary back as it was (split brain): the newer timeline wins.
        let seen = [(a, primary(2)), (b, primary(1))];
        assert_eq!(choose(Chosen::At(a), &seen), Chosen::At(a));
        // Nothing tells them apart: no guess.
        let seen = [(a, primary(1)), (b, primary(1))];
        assert_eq!(choose(Chosen::At(a), &seen), Chosen::Conflict(a, b));
    }

    #[test]
    fn a_primary_down_stays_chosen_a_demoted_one_does_not() {
        let (a, b) = (addr(1), addr(2));
        let down = [(a, HostRole::Down), (b, HostRole::Standby)];
        assert_eq!(choose(Chosen::At(a), &down), Chosen::At(a));
        let demoted = [(a, HostRole::Standby), (b, HostRole::Standby)];
        assert_eq!(choose(Chosen::At(a), &demoted), Chosen::Nowhere);
        let silent = [(a, HostRole::Down), (b, HostRole::Down)];
        assert_eq!(choose(Chosen::Unknown, &silent), Chosen::Unknown);
        assert_eq!(choose(Chosen::Unknown, &[]), Chosen::Unknown);
    }
}
