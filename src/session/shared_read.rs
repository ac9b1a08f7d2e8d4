//! A session's side of the shared (pipelined) replica connections (see `lane`): offering an
//! autocommit read to them and relaying its answer.

use bytes::{Bytes, BytesMut};

use super::lane::{Job, Reply};
use super::Session;
use crate::error::PgError;
use crate::protocol::write;
use crate::role::Role;

/// Answer chunks a shared replica connection may pass ahead of the session writing them out.
const REPLY_CHUNKS: usize = 16;

/// A read offered to the shared replica connections.
pub(super) struct SharedRead {
    pub frames: Bytes,
    /// A simple Query (else extended-protocol messages ending in their Sync).
    pub query: bool,
    /// Shared statements the messages use, with their Parse.
    pub statements: Vec<(String, Bytes)>,
}

/// What became of a read offered to the shared replica connections.
pub(super) enum Piped {
    /// It ran there; its answer (or error) was relayed.
    Served,
    /// None could take it: nothing was sent.
    Unsent,
    /// Its connection was lost before any of its answer reached the client: it can run on the
    /// primary.
    Lost,
}

impl Session {
    /// Whether the shared replica connections could take this session's reads now.
    pub(super) fn lanes_free(&self) -> bool {
        self.shared.lanes.is_some() && self.replica.is_none()
    }

    /// Runs a read on a shared replica connection and relays its answer.
    pub(super) async fn pipelined(&mut self, read: SharedRead) -> Result<Piped, PgError> {
        let Some(lanes) = self.shared.lanes.clone() else {
            return Ok(Piped::Unsent);
        };
        self.drain_all().await?;
        // One channel per session for the answers of all its pipelined reads (they run one
        // at a time).
        let answers = self
            .answers
            .get_or_insert_with(|| Box::new(tokio::sync::mpsc::channel(REPLY_CHUNKS)));
        let job = Job {
            frames: read.frames,
            query: read.query,
            applied: self.state.applied_shared(),
            statements: read.statements,
            cancel: self.cancel.slot.clone(),
            reply: answers.0.clone(),
        };
        if lanes.submit(&self.target, job).is_err() {
            return Ok(Piped::Unsent);
        }
        // The lane points the cancel slot at its connection while the read runs.
        self.cancel_role = None;
        let mut begun = false;
        loop {
            let answer = match self.answers.as_mut() {
                Some(a) => a.1.recv().await,
                None => None,
            };
            let lost = match answer {
                Some(Reply::Bytes(out)) => {
                    begun = true;
                    self.write_client(&out).await?;
                    continue;
                }
                Some(Reply::Done(request, retry)) => {
                    if let Some(t) = request.started {
                        let seconds = t.elapsed().as_secs_f64();
                        self.shared.metrics.duration(Role::Replica, seconds);
                    }
                    if let Some(retry) = retry {
                        Box::pin(self.retry_on_primary(retry)).await?;
                    }
                    return Ok(Piped::Served);
                }
                Some(Reply::Unsent) => return Ok(Piped::Unsent),
                Some(Reply::Failed(e)) => e,
                None => PgError::upstream("a shared replica connection was dropped")
                    .with_detail("The statement may not have completed."),
            };
            if begun {
                return self.shared_read_failed(lost).await.map(|()| Piped::Served);
            }
            // Nothing of the answer reached the client, and a standby changed nothing.
            tracing::info!(error = %lost, "a shared replica connection was lost before the read's answer began; running it on the primary");
            self.shared.metrics.error(lost.kind);
            return Ok(Piped::Lost);
        }
    }

    /// A read on a shared replica connection failed with the connection: the client gets the
    /// error and the session goes on, as when its own replica connection is lost.
    async fn shared_read_failed(&mut self, e: PgError) -> Result<(), PgError> {
        self.shared.metrics.error(e.kind);
        let mut out = BytesMut::new();
        write::error_response(&mut out, &PgError { fatal: false, ..e });
        write::ready_for_query(&mut out, b'I');
        self.write_client(&out).await
    }
}
