//! What the servers send the session: their answers relayed to the client (with the state
//! changes, commit positions and retries they settle), and a server lost (failed, or silent).

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::expect::FailedParse;
use super::server::Seen;
use super::state::{BlockEnd, PendingState, SessionState};
use super::{consistent, expect, plan, Session};
use crate::cancel::CancelRegistry;
use crate::error::PgError;
use crate::lsn::Lsn;
use crate::protocol::write;
use crate::role::Role;

impl Session {
    /// Relays what a server sent.
    pub(super) async fn on_server(&mut self, role: Role) -> Result<(), PgError> {
        let mut seen = Seen::default();
        let server = match role {
            Role::Primary => self.primary.as_mut(),
            Role::Replica => self.replica.as_mut(),
        };
        let server = server.expect("read from a connected server");
        server.scan(&mut self.cout, &mut seen, Some(&mut self.told))?;
        for &at in &seen.notifications {
            map_notification_pid(&mut self.cout, at, server.conn.addr, &self.shared.cancels);
        }
        let (idle, tx) = (server.expect.is_empty(), server.tx);
        let failed = std::mem::take(&mut seen.failed_parses);
        self.forget_lost_parses(role, failed, seen.unnamed_lost.take());
        let mut capture = false;
        for request in seen.done {
            capture |= (request.capture_after && !request.failed) || request.capture_owed;
            if let Some(t) = request.started {
                self.shared
                    .metrics
                    .duration(role, t.elapsed().as_secs_f64());
            }
            // A failed query keeps what a transaction end before the failure settled (the
            // rest it rolled back).
            let (change, settled) = match request.change {
                Some(change) if request.failed => {
                    let settled = change.settled(&request.ends);
                    let some = settled.is_some();
                    (settled, some)
                }
                change => (change, false),
            };
            // Settings made in a transaction block wait for its end (see `SessionState::block`).
            let end = match request.tx_after {
                b'T' | b'E' => BlockEnd::Open,
                _ if settled => BlockEnd::Committed,
                _ if request.failed || request.rolled_back => BlockEnd::RolledBack,
                _ => BlockEnd::Committed,
            };
            let change = match change {
                Some(change) => Some(change),
                None if end != BlockEnd::Open && self.state.holds_block() => {
                    Some(PendingState::default())
                }
                None => None,
            };
            if let Some(change) = change {
                let dropped = SessionState::drops_statements(&change);
                let deallocated = SessionState::deallocated(&change);
                let seq = self.state.commit_change(change, end);
                let applied = self.state.applied();
                if let Some(s) = self.slot(role).as_mut() {
                    s.synced = seq;
                    s.conn.carry.applied = applied;
                    if dropped {
                        s.conn.carry.prepared.clear();
                        s.unnamed_dropped = true;
                    }
                }
                if !self.shares_statements() {
                    self.forget_statements(role, &deallocated);
                }
                if dropped && !self.shares_statements() {
                    // The client's statements are gone; the other server's copies go too.
                    if let Some(o) = self.slot(role.other()).as_mut() {
                        let names: Vec<String> =
                            o.conn.carry.prepared.drain().map(|(n, _)| n).collect();
                        o.to_close.extend(names);
                    }
                }
            }
        }
        // Only the server holding the transaction (or any, when none does) says whether it
        // is still open: the other one going idle (pgnear's own Sync) says nothing of it, nor
        // does one that answered a Flush-driven exchange (no ReadyForQuery: its status is
        // from before, and a BEGIN in the exchange is not in it). Nor does a ReadyForQuery read
        // with the answers of such an exchange still open there (pgnear's own lookup ahead of
        // it): it is older than what the exchange ran.
        let deferred = matches!(self.tx, plan::Tx::Deferred(_));
        let exchange_ran = self
            .exchange
            .as_ref()
            .is_some_and(|e| e.role == role && e.executed);
        if idle
            && seen.ready
            && !deferred
            && !exchange_ran
            && self.tx.open().is_none_or(|r| r == role)
        {
            self.tx = if tx == b'I' {
                plan::Tx::Idle
            } else {
                plan::Tx::Open(role)
            };
            if self.ending == Some(role) {
                self.ending = None;
            }
        }
        if let Some(lsn) = seen
            .write_lsn
            .as_deref()
            .and_then(|v| v.parse::<Lsn>().ok())
        {
            if self.write_lsn.is_none_or(|w| lsn > w) {
                self.write_lsn = Some(lsn);
                if self.shared.config.consistency.report_write_lsn {
                    write::parameter_status(&mut self.cout, "pgnear.write_lsn", &lsn.to_string());
                }
            }
        }
        if !self.cout.is_empty() {
            self.shared.metrics.bytes_out(self.cout.len());
            let r = self.client.write_all(&self.cout).await;
            self.cout.clear();
            if r.is_err() {
                // The client is gone; the caller's next client read sees it.
                return Err(PgError::protocol("client connection lost"));
            }
        }
        if capture {
            let open = self.exchange_on(role);
            if let Some(s) = self.slot(role).as_mut() {
                if let Some(last) = s.requests.back_mut() {
                    // The client sent more behind it (another COPY, say): the lookup waits for
                    // the last, so that nothing of pgnear's reaches a server in copy-in mode.
                    last.capture_owed = true;
                } else if !(open || s.reader.copy_in || s.expect.skipping) {
                    s.send_internal_query(consistent::WRITE_LSN_QUERY, expect::Purpose::WriteLsn);
                    s.flush().await?;
                }
            }
        }
        if let Some(retry) = seen.retry {
            // Boxed: retrying goes through server(), which may relay (and so re-enter this function).
            Box::pin(self.retry_on_primary(retry)).await?;
        }
        self.release_if_done(role);
        Ok(())
    }

    /// A server that owes answers, has sent nothing for `connect_timeout` (the replica: for
    /// its watcher's poll deadline), and whose upstream the health checks report down is taken
    /// as lost (a silent partition or a frozen server: TCP alone would wait for many minutes).
    /// Losing the primary ends the session with 08006; the replica's statements fail with 08006
    /// (or run again on the primary, see `replica_lost`) and the session goes on.
    pub(super) async fn check_silent_servers(&mut self) -> Result<(), PgError> {
        let connect_timeout = self.shared.config.upstream.connect_timeout.0;
        for role in [Role::Primary, Role::Replica] {
            let (up, limit) = match role {
                Role::Primary => (self.shared.probe.current().up, connect_timeout),
                Role::Replica => (
                    self.shared.watcher.as_ref().is_some_and(|w| w.current().up),
                    crate::consistency::watcher::poll_deadline(connect_timeout),
                ),
            };
            let lost = self
                .slot_ref(role)
                .and_then(|s| s.stopped_answering(limit, up));
            if let Some(e) = lost {
                let e = e.with_detail("The statement may or may not have completed.");
                self.server_failed(role, e).await?;
            }
        }
        Ok(())
    }

    /// The client's Parses on `role` that created nothing (failed, or skipped after an error):
    /// those statements do not exist, as in Postgres. `unnamed`: the last unnamed Parse there
    /// did not succeed, and the session's unnamed statement is this instead (none after a
    /// failed Parse, so a Bind of it gets the server's own answer; the one before after a
    /// skipped one).
    pub(super) fn forget_lost_parses(
        &mut self,
        role: Role,
        failed: Vec<FailedParse>,
        unnamed: Option<super::expect::Unnamed>,
    ) {
        for f in failed {
            self.state.forget_failed_parse(&f.name, f.client.as_deref());
        }
        if let Some((instead, on)) = unnamed.filter(|_| self.unnamed_role == Some(role)) {
            self.state.unnamed = instead;
            self.unnamed_role = on.or(Some(role));
        }
    }

    /// A server connection failed: losing the primary ends the session, losing the replica
    /// does not (see `replica_lost`).
    pub(super) async fn server_failed(&mut self, role: Role, e: PgError) -> Result<(), PgError> {
        match role {
            Role::Primary => Err(e),
            Role::Replica => self.replica_lost(e).await,
        }
    }

    /// The replica connection failed. The session goes on: requests in flight there get an
    /// 08006 error (they may not have completed), later reads go to the primary until the
    /// replica is back. Only losing the primary ends the session (its state lives there).
    /// Autocommit reads none of whose answer has reached the client run again on the primary
    /// instead (a standby changed nothing), in order, so the client just sees a slower answer.
    async fn replica_lost(&mut self, e: PgError) -> Result<(), PgError> {
        let Some(mut server) = self.replica.take() else {
            return Ok(());
        };
        tracing::warn!(error = %e, "lost the replica connection; reads go to the primary");
        self.shared.metrics.error(e.kind);
        let again: Vec<_> =
            if !server.reader.begun && server.requests.iter().all(|r| r.again.is_some()) {
                let reads = server.requests.drain(..);
                reads
                    .filter_map(|mut r| r.again.take().map(|a| (r, a)))
                    .collect()
            } else {
                Vec::new()
            };
        let e = PgError { fatal: false, ..e }.with_detail("The statement may not have completed.");
        let mut out = BytesMut::new();
        if again.is_empty() && server.requests.is_empty() && !server.expect.is_empty() {
            write::error_response(&mut out, &e);
        }
        if self.tx.open() == Some(Role::Replica) {
            // The transaction ended with the connection: what it set is undone.
            self.tx = plan::Tx::Idle;
            self.state
                .commit_change(PendingState::default(), BlockEnd::RolledBack);
        }
        if self.exchange_on(Role::Replica) {
            // It died with the connection.
            self.exchange = None;
        }
        for _ in 0..server.requests.len() {
            write::error_response(&mut out, &e);
            write::ready_for_query(&mut out, b'I');
        }
        if self.last == Role::Replica {
            self.last = Role::Primary;
        }
        if self.unnamed_role == Some(Role::Replica) {
            self.unnamed_role = None;
        }
        if self.cancel_role == Some(Role::Replica) {
            self.cancel_role = None;
        }
        if !out.is_empty() {
            self.write_client(&out).await?;
        }
        if !again.is_empty() {
            tracing::info!(
                reads = again.len(),
                "no answer had begun; running the reads on the primary"
            );
            // Boxed: it goes through server(), which may relay, and so re-enter this function.
            Box::pin(self.run_again_on_primary(again)).await?;
        }
        Ok(())
    }
}

/// Rewrites the sender pid of the notification at `at` in `out` (from a server at `addr`) when
/// another pgnear session's server connection sent it: the client knows that session by the
/// pid pgnear gave it, not by the server's.
fn map_notification_pid(
    out: &mut BytesMut,
    at: usize,
    addr: std::net::SocketAddr,
    cancels: &CancelRegistry,
) {
    let Some(field) = out.get_mut(at + 5..at + 9) else {
        return;
    };
    let pid = i32::from_be_bytes([field[0], field[1], field[2], field[3]]);
    if let Some(client) = cancels.client_pid(addr, pid) {
        field.copy_from_slice(&client.to_be_bytes());
    }
}
