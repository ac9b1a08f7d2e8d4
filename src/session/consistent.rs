//! Read-your-writes for one request: the consistency gate, waiting for the replica to replay
//! the session's writes, and settling a replica route (consistent, or on the primary, or
//! refused), with the commit-position lookup that feeds it.

use super::expect;
use super::shared_read::{Piped, SharedRead};
use super::Session;
use crate::config::OnTimeout;
use crate::consistency::gate::{self, Gate};
use crate::error::{ErrorKind, PgError};
use crate::lsn::Lsn;
use crate::role::Role;
use crate::router::route::Reason;

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

/// What `settle` made of a replica route.
pub(super) enum Settled {
    Route(Role, Reason),
    /// The replica did not replay the session's writes in time (`on_timeout = "error"`).
    Refused(PgError),
    /// It ran on a shared replica connection; its answer was relayed.
    Shared,
}

/// What the consistency gate allows a replica read, once waited for.
pub(super) enum Consistent {
    Go,
    Fallback,
    Refuse(PgError),
}

impl Session {
    /// Whether commit positions are worth learning: a replica to wait for, or tokens to report.
    pub(super) fn captures_lsn(&self) -> bool {
        self.shared.watcher.is_some() || self.shared.config.consistency.report_write_lsn
    }

    pub(super) fn replica_gate(&self) -> Gate {
        let Some(w) = &self.shared.watcher else {
            return Gate::Unavailable;
        };
        let c = &self.shared.config.consistency;
        let target = self.write_lsn.max(self.min_lsn);
        gate::decide(c.mode, target, &w.current(), c.max_replica_lag.0)
    }

    /// Makes a replica read consistent: waits until the replica has replayed the session's
    /// writes, or says to use the primary instead, or (`on_timeout = "error"`) to refuse it.
    pub(super) async fn consistent_read(&mut self) -> Result<Consistent, PgError> {
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
            return Ok(Consistent::Fallback);
        };
        let target = match self.replica_gate() {
            Gate::Go => return Ok(Consistent::Go),
            Gate::Unavailable => return Ok(Consistent::Fallback),
            Gate::Wait(target) => target,
        };
        let c = &self.shared.config.consistency;
        let (timeout, on_timeout) = (c.wait_timeout.0, c.on_timeout);
        let metrics = self.shared.metrics.clone();
        let gave_up = self.gave_up.is_some_and(|g| g >= target);
        let waited = if gave_up && on_timeout == OnTimeout::Primary {
            Err(watcher.current().replay)
        } else {
            metrics.lsn_waits.inc();
            let started = std::time::Instant::now();
            let waited = watcher.wait_for(target, timeout).await;
            metrics
                .lsn_wait_seconds
                .observe(started.elapsed().as_secs_f64());
            if waited.is_err() {
                metrics.lsn_wait_timeouts.inc();
                self.gave_up = Some(target);
            }
            waited
        };
        Ok(match waited {
            Ok(()) => Consistent::Go,
            Err(reached) => match on_timeout {
                OnTimeout::Primary => Consistent::Fallback,
                OnTimeout::Error => Consistent::Refuse(not_consistent(target, reached, timeout)),
            },
        })
    }

    /// For a replica route: makes the read consistent and connects the replica, or falls back to
    /// the primary, or refuses it. With `lane`, a read that passes the gate is first offered to
    /// the shared (pipelined) replica connections.
    pub(super) async fn settle(
        &mut self,
        role: Role,
        reason: Reason,
        lane: Option<SharedRead>,
    ) -> Result<Settled, PgError> {
        match self.consistent_read().await? {
            Consistent::Go => {}
            Consistent::Fallback => return Ok(Settled::Route(Role::Primary, Reason::Fallback)),
            Consistent::Refuse(e) => return Ok(Settled::Refused(e)),
        }
        if let Some(read) = lane {
            match self.pipelined(read).await? {
                Piped::Served => return Ok(Settled::Shared),
                Piped::Lost => return Ok(Settled::Route(Role::Primary, Reason::Retry)),
                Piped::Unsent => {}
            }
        }
        Ok(match self.ensure_replica().await {
            Err(_) => Settled::Route(Role::Primary, Reason::Fallback),
            Ok(()) => Settled::Route(role, reason),
        })
    }

    /// Connects the replica if it is not yet connected.
    pub(super) async fn ensure_replica(&mut self) -> Result<(), PgError> {
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
}

fn not_consistent(target: Lsn, reached: Option<Lsn>, timeout: std::time::Duration) -> PgError {
    let reached = reached.map_or("nothing yet".to_string(), |l| l.to_string());
    PgError::new(
        ErrorKind::Consistency,
        format!("the replica did not replay this session's writes within {timeout:?}"),
    )
    .non_fatal()
    .with_detail(format!(
        "The session needs WAL position {target}; the replica has replayed {reached}."
    ))
    .with_hint(
        "Retry, or raise consistency.wait_timeout, or set consistency.on_timeout = \"primary\".",
    )
}
