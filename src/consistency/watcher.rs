//! One watcher per replica: a control connection polls `pg_last_wal_replay_lsn()` (every
//! millisecond while a session waits, every `SLOW_POLL` otherwise) and publishes the replica's
//! state through a `watch` channel. Sessions wait on the channel; they never poll themselves.
//!
//! Each poll runs under `poll_deadline`: a replica that does not answer by then is published
//! down at once, with its lag unknown, and the control connection is dropped and reconnected.
//! One good poll after that publishes it up again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::backend::conn::{Chosen, Pick, Upstream};
use crate::backend::control::ControlConn;
use crate::backend::health::PrimaryProbe;
use crate::config::ReplicaOrder;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::role::Role;
use crate::shutdown::Shutdown;

const FAST_POLL: Duration = Duration::from_millis(1);
const SLOW_POLL: Duration = Duration::from_millis(100);
const RECONNECT: Duration = Duration::from_millis(500);
/// How often a watcher on a later replica of the list tries the earlier ones again (and one on
/// a lagging replica looks for one further along).
const PREFER_EARLIER: Duration = Duration::from_secs(1);
/// How much nearer another replica must be to take the reads, at least (see `nearer`).
const NEARER_BY: Duration = Duration::from_millis(1);
const POLL_SQL: &str = "SELECT pg_last_wal_replay_lsn(), pg_is_in_recovery()";
/// Longest a poll may take, whatever `connect_timeout` says.
const MAX_POLL_DEADLINE: Duration = Duration::from_secs(1);

/// How long a poll of the replica may take before the replica counts as down:
/// `connect_timeout`, at most one second. The poll reads shared memory on a replica in the
/// region (a millisecond when healthy), so one second is a wide margin, and a replica slower
/// than that is failing its reads anyway. A false "down" costs little: reads go to the
/// primary until the next good poll, `RECONNECT` later at most. Sessions use the same bound
/// for the silence after which a replica that owes them answers is taken as lost.
pub fn poll_deadline(connect_timeout: Duration) -> Duration {
    connect_timeout.min(MAX_POLL_DEADLINE)
}

/// What pgnear knows about the replica.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicaState {
    /// The watcher can talk to the replica.
    pub up: bool,
    /// The replica is still a standby (false: it was promoted).
    pub in_recovery: bool,
    pub replay: Option<Lsn>,
    /// How far replay is behind the primary, in bytes and seconds (0 when caught up; `None`
    /// while the replica is down: unknown, never a stale figure).
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
}

impl ReplicaState {
    /// The replica as published when the watcher cannot reach it.
    fn down(&mut self) {
        self.up = false;
        self.lag_bytes = None;
        self.lag_seconds = None;
    }
}

pub struct Watcher {
    state: watch::Sender<ReplicaState>,
    waiters: AtomicUsize,
    wake: Notify,
}

/// Counts a session as waiting while it lives, so the watcher polls fast.
struct Waiting<'a>(&'a Watcher);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Watcher {
    /// Starts the watcher task; it stops when `shutdown` turns true. A replica lagging past
    /// `max_lag` hands the reads to another of the list that has replayed further; `order`
    /// says which replica of the list serves when several can.
    pub fn spawn(
        replica: Arc<Upstream>,
        primary: Arc<PrimaryProbe>,
        metrics: Arc<Metrics>,
        (max_lag, order): (Duration, ReplicaOrder),
        shutdown: Shutdown,
    ) -> Arc<Watcher> {
        let watcher = Arc::new(Watcher {
            state: watch::channel(ReplicaState::default()).0,
            waiters: AtomicUsize::new(0),
            wake: Notify::new(),
        });
        tokio::spawn(
            watcher
                .clone()
                .run(replica, primary, metrics, (max_lag, order), shutdown),
        );
        watcher
    }

    /// Waits (at most `limit`) until the replica has been reached once, so a fresh pgnear does
    /// not send its first reads to the primary just because it has not looked yet.
    pub async fn first_contact(&self, limit: Duration) {
        let mut rx = self.state.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| s.up)).await;
    }

    pub fn current(&self) -> ReplicaState {
        self.state.borrow().clone()
    }

    /// Waits until the replica has replayed `target`, at most `timeout`. Returns the replay
    /// position reached when it gave up.
    pub async fn wait_for(&self, target: Lsn, timeout: Duration) -> Result<(), Option<Lsn>> {
        let mut rx = self.state.subscribe();
        if rx.borrow().replay.is_some_and(|r| r >= target) {
            return Ok(());
        }
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(self);
        self.wake.notify_one();
        let reached = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| s.replay.is_some_and(|r| r >= target)),
        )
        .await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self.state.borrow().replay),
        }
    }

    /// Publishes the replica down, its lag unknown (NaN in the metrics).
    fn publish_down(&self, metrics: &Metrics) {
        self.state.send_if_modified(|s| {
            let was = s.clone();
            s.down();
            *s != was
        });
        metrics.upstream_up(Role::Replica, false);
        metrics.replica_lag_bytes.set(f64::NAN);
        metrics.replica_lag_seconds.set(f64::NAN);
    }

    async fn run(
        self: Arc<Self>,
        replica: Arc<Upstream>,
        primary: Arc<PrimaryProbe>,
        metrics: Arc<Metrics>,
        (max_lag, order): (Duration, ReplicaOrder),
        mut shutdown: Shutdown,
    ) {
        let mut conn: Option<ControlConn> = None;
        let mut tried_earlier = Instant::now();
        type Search = tokio::task::JoinHandle<(Survey, Option<(ControlConn, Better)>)>;
        let mut better: Option<Search> = None;
        let mut survey = Survey::new();
        let mut rtt: Option<Duration> = None;
        let mut was_in_recovery = true;
        let mut caught_up_at = Instant::now();
        let poll_deadline = poll_deadline(replica.connect_timeout);
        loop {
            if shutdown.is_stopped() {
                return;
            }
            // The host now names other servers (e.g. another nearest replica): watch those,
            // as sessions will use them.
            if conn.as_ref().is_some_and(|c| !replica.in_dns(c.addr())) {
                tracing::info!(replica = %replica.url, "the watched address left DNS; reconnecting");
                conn = None;
            }
            // Another replica of the list may serve better (see `better_replica`): looked for
            // beside the polls, which a silent replica must not hold up.
            if let Some(found) = better.take_if(|h| h.is_finished()) {
                let found = found.await.ok().and_then(|(surveyed, found)| {
                    survey = surveyed;
                    found
                });
                if let Some((c, why)) = found {
                    let addr = c.addr();
                    match why {
                        Better::Earlier => {
                            tracing::info!(replica = %replica.url, %addr, "an earlier replica of the list answers again; reads go there")
                        }
                        Better::Nearer { theirs, ours } => {
                            tracing::info!(replica = %replica.url, %addr, ?theirs, ?ours, "a nearer replica (by round trip); reads go there")
                        }
                        Better::FurtherAlong => {
                            tracing::warn!(replica = %replica.url, %addr, "the replica lags past max_replica_lag; reads go to one further along")
                        }
                    }
                    watch_here(&replica, addr);
                    if let Some(old) = conn.replace(c) {
                        survey.insert(old.addr(), old);
                    }
                    rtt = None;
                }
            }
            if let Some(addr) = conn.as_ref().map(ControlConn::addr) {
                if better.is_none() && tried_earlier.elapsed() >= PREFER_EARLIER {
                    tried_earlier = Instant::now();
                    let serving = {
                        let s = self.state.borrow();
                        Serving {
                            addr,
                            replay: s.replay,
                            lagging: s.lag_seconds.is_some_and(|l| l > max_lag.as_secs_f64()),
                            rtt: rtt.take(),
                        }
                    };
                    let (replica, mut survey) = (replica.clone(), std::mem::take(&mut survey));
                    better = Some(tokio::spawn(async move {
                        let found = better_replica(&replica, &mut survey, serving, order).await;
                        (survey, found)
                    }));
                }
            }
            if conn.is_none() {
                // Any replica of the list that answers (sessions go where the watcher is).
                match ControlConn::connect_to(&replica, Pick::Any, replica.connect_timeout).await {
                    Ok(c) => {
                        tracing::info!(replica = %replica.url, addr = %c.addr(), "replica watcher connected");
                        watch_here(&replica, c.addr());
                        conn = Some(c);
                        rtt = None;
                    }
                    Err(e) => {
                        if self.state.borrow().up {
                            tracing::warn!(error = %e, "replica unreachable; reads go to the primary");
                        }
                        self.publish_down(&metrics);
                        tokio::select! {
                            _ = tokio::time::sleep(RECONNECT) => continue,
                            _ = shutdown.stopped() => return,
                        }
                    }
                }
            }
            let sent = Instant::now();
            let polled = conn
                .as_mut()
                .expect("connected above")
                .query_row_within(POLL_SQL, poll_deadline)
                .await;
            match polled {
                Ok(row) => {
                    rtt = Some(rtt.map_or(sent.elapsed(), |r| r.min(sent.elapsed())));
                    let (replay, in_recovery) = replay_of(&row);
                    if was_in_recovery && !in_recovery {
                        tracing::warn!(replica = %replica.url, "the replica was promoted; reads go to the primary");
                    }
                    was_in_recovery = in_recovery;
                    // Lag in time: how long the replica has been behind the primary's last known
                    // position (the time since the last replayed transaction would count idle
                    // time as lag).
                    let (lag_bytes, lag_seconds) = match (primary.current().lsn, replay) {
                        (Some(p), Some(r)) if p > r => {
                            (p.bytes_since(r), caught_up_at.elapsed().as_secs_f64())
                        }
                        _ => {
                            caught_up_at = Instant::now();
                            (0, 0.0)
                        }
                    };
                    metrics.replica_lag_bytes.set(lag_bytes as f64);
                    metrics.replica_lag_seconds.set(lag_seconds);
                    metrics
                        .replica_replay_lsn
                        .set(replay.map_or(0, |l| l.0 as i64));
                    metrics.upstream_up(Role::Replica, true);
                    let next = ReplicaState {
                        up: true,
                        in_recovery,
                        replay,
                        lag_bytes: Some(lag_bytes),
                        lag_seconds: Some(lag_seconds),
                    };
                    self.state.send_if_modified(|s| {
                        let changed = *s != next;
                        *s = next;
                        changed
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "replica watcher lost its connection; reads go to the primary");
                    conn = None;
                    self.publish_down(&metrics);
                    continue;
                }
            }
            let interval = if self.waiters.load(Ordering::Relaxed) > 0 {
                FAST_POLL
            } else {
                SLOW_POLL
            };
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.stopped() => return,
            }
        }
    }
}

/// The watched address serves the replica's sessions: they read where the replay position is
/// known (their reads wait for it), and connections elsewhere close once idle.
fn watch_here(replica: &Upstream, addr: SocketAddr) {
    let prev = replica.choose(Chosen::At(addr));
    if prev != Chosen::At(addr) && prev != Chosen::Unknown {
        tracing::warn!(replica = %replica.url, %addr, was = ?prev, "reads move to another replica");
    }
}

/// The replay position and recovery state in a row of `POLL_SQL`.
fn replay_of(row: &[Option<String>]) -> (Option<Lsn>, bool) {
    let replay = row.first().cloned().flatten().and_then(|v| v.parse().ok());
    let in_recovery = row.get(1).cloned().flatten().as_deref() == Some("t");
    (replay, in_recovery)
}

/// What the watcher knows of the replica serving reads, for the search for a better one.
#[derive(Clone, Copy)]
struct Serving {
    addr: SocketAddr,
    replay: Option<Lsn>,
    /// Replay has been behind the primary for longer than `max_replica_lag`.
    lagging: bool,
    /// The shortest poll round trip since the last search (`None`: no poll answered since).
    rtt: Option<Duration>,
}

/// Why another replica serves instead.
#[derive(Debug, PartialEq)]
enum Better {
    /// Listed before the serving one, and answers again as a standby that has replayed as far.
    Earlier,
    /// A standby that has replayed as far, nearer by measured round trip (`replica_order =
    /// "latency"`).
    Nearer { theirs: Duration, ours: Duration },
    /// The serving one lags past `max_replica_lag`; this one has replayed further.
    FurtherAlong,
}

/// Connections to the other replicas of the list, kept from one search to the next.
type Survey = HashMap<SocketAddr, ControlConn>;

/// A round trip shorter than `ours` by enough to move the reads: by 1 ms and a fifth, so that
/// replicas equally near (or noise) do not trade the reads back and forth.
fn nearer(theirs: Duration, ours: Duration) -> bool {
    theirs + NEARER_BY.max(ours / 5) < ours
}

/// What another replica of the list says: its replay position, whether it is a standby, and
/// the shortest round trip of `polls` polls, on the survey's connection to it (opened when
/// missing, dropped when it fails).
async fn survey_one(
    replica: &Upstream,
    survey: &mut Survey,
    addr: SocketAddr,
    polls: usize,
) -> Option<(Option<Lsn>, bool, Duration)> {
    let deadline = poll_deadline(replica.connect_timeout);
    let mut conn = match survey.remove(&addr) {
        Some(c) => c,
        None => ControlConn::connect_to(replica, Pick::Only(addr), deadline)
            .await
            .ok()?,
    };
    let mut rtt = Duration::MAX;
    let mut row = Vec::new();
    for _ in 0..polls {
        let sent = Instant::now();
        row = conn.query_row_within(POLL_SQL, deadline).await.ok()?;
        rtt = rtt.min(sent.elapsed());
    }
    survey.insert(addr, conn);
    let (replay, in_recovery) = replay_of(&row);
    Some((replay, in_recovery, rtt))
}

/// A replica that should serve instead of the serving one, with the connection to it. With
/// `replica_order = "listed"`: the first listed before it that answers as a standby and has
/// replayed as far, or, when the serving one lags past `max_replica_lag`, the first other
/// one that has replayed further (a replica whose own upstream died stalls while others go
/// on). With `"latency"`: of the standbys that have replayed as far (further, when the serving
/// one lags), the one with the shortest round trip, if it is clearly nearer than the serving
/// one (any, when that one lags).
async fn better_replica(
    replica: &Upstream,
    survey: &mut Survey,
    serving: Serving,
    order: ReplicaOrder,
) -> Option<(ControlConn, Better)> {
    let addrs = replica.resolve().await.ok()?;
    survey.retain(|a, _| addrs.iter().any(|(_, b)| b == a));
    let polls = match order {
        ReplicaOrder::Listed => 1,
        ReplicaOrder::Latency => 3,
    };
    let mut earlier = true;
    let mut nearest: Option<(SocketAddr, Duration, Better)> = None;
    for (_, addr) in addrs {
        if addr == serving.addr {
            if order == ReplicaOrder::Listed && !serving.lagging {
                return None;
            }
            earlier = false;
            continue;
        }
        let Some((theirs, in_recovery, rtt)) = survey_one(replica, survey, addr, polls).await
        else {
            continue;
        };
        let (as_far, further) = match (theirs, serving.replay) {
            (Some(t), Some(r)) => (t >= r, t > r),
            (Some(_), None) => (true, true),
            (None, _) => (false, false),
        };
        let why = match order {
            ReplicaOrder::Listed if earlier && as_far => Better::Earlier,
            _ if serving.lagging && further => Better::FurtherAlong,
            ReplicaOrder::Latency if !serving.lagging && as_far => match serving.rtt {
                Some(ours) if nearer(rtt, ours) => Better::Nearer { theirs: rtt, ours },
                _ => continue,
            },
            _ => continue,
        };
        if !in_recovery {
            continue;
        }
        if order == ReplicaOrder::Listed {
            return survey.remove(&addr).map(|c| (c, why));
        }
        if nearest.as_ref().is_none_or(|&(_, best, _)| rtt < best) {
            nearest = Some((addr, rtt, why));
        }
    }
    let (addr, _, why) = nearest?;
    survey.remove(&addr).map(|c| (c, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_clearly_nearer_replica_takes_the_reads() {
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        // 10 ms of relay against a replica in the same region.
        assert!(nearer(us(400), ms(10)));
        // Two replicas on loopback: noise, not distance.
        assert!(!nearer(us(200), us(900)));
        // Within a fifth: not worth a switch.
        assert!(!nearer(ms(85), ms(100)));
        assert!(nearer(ms(75), ms(100)));
        assert!(!nearer(ms(10), ms(10)));
    }
}
