//! The primary's health: a control connection runs `SELECT pg_current_wal_lsn()` every
//! `PROBE_INTERVAL`, connecting and querying within `upstream.connect_timeout`. A probe that
//! gets no answer by then marks the primary down at once (it stopped answering); other failures
//! (a refused or closed connection, an error) mark it down when two come in a row. One success
//! marks it up. The position it reads also gives the replica's lag in bytes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::conn::Upstream;
use super::control::ControlConn;
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

pub struct PrimaryProbe {
    state: watch::Sender<PrimaryState>,
}

impl PrimaryProbe {
    pub fn spawn(
        primary: Arc<Upstream>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Arc<PrimaryProbe> {
        let probe = Arc::new(PrimaryProbe {
            state: watch::channel(PrimaryState::default()).0,
        });
        tokio::spawn(probe.clone().run(primary, metrics, shutdown));
        probe
    }

    pub fn current(&self) -> PrimaryState {
        *self.state.borrow()
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
        let mut conn: Option<ControlConn> = None;
        let mut failures = 0u32;
        loop {
            if conn
                .as_ref()
                .is_some_and(|c| !primary.dns.is_current(c.addr()))
            {
                tracing::info!(primary = %primary.url, "the probe's address left DNS; reconnecting");
                conn = None;
            }
            let deadline = primary.connect_timeout;
            let result = async {
                if conn.is_none() {
                    conn = Some(ControlConn::connect(&primary, deadline).await?);
                }
                let c = conn.as_mut().expect("connected above");
                c.query_row_within("SELECT pg_current_wal_lsn()", deadline)
                    .await
            }
            .await;
            match result {
                Ok(row) => {
                    failures = 0;
                    let lsn = row.first().cloned().flatten().and_then(|v| v.parse().ok());
                    if !self.state.borrow().up {
                        tracing::info!(primary = %primary.url, "primary is up");
                    }
                    self.state.send_replace(PrimaryState {
                        up: true,
                        down: false,
                        lsn,
                    });
                }
                Err(e) => {
                    conn = None;
                    failures += 1;
                    let down = e.is_missed() || failures >= DOWN_AFTER;
                    if down && self.state.borrow().up {
                        tracing::warn!(primary = %primary.url, error = %e, "primary is down");
                    }
                    if down {
                        self.state.send_modify(|s| {
                            s.up = false;
                            s.down = true;
                        });
                    }
                }
            }
            metrics.upstream_up(Role::Primary, self.state.borrow().up);
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = shutdown.stopped() => return,
            }
        }
    }
}
