//! Running reads again on the primary: a query the replica refused as a write (25006), and
//! reads whose replica connection was lost before their answer began.

use super::consistent::WRITE_LSN_QUERY;
use super::expect;
use super::rename::{prepare_missing, send_batch};
use super::server::{self, Again, Retry};
use super::Session;
use crate::error::PgError;
use crate::protocol::frontend::query_text;
use crate::protocol::tag;
use crate::role::Role;
use crate::router::route::Reason;

impl Session {
    /// The replica refused a query (see `Retry`): run it on the primary, once, and remember
    /// that this text writes when that was the reason.
    pub(super) async fn retry_on_primary(&mut self, retry: Retry) -> Result<(), PgError> {
        let frame = retry.frame;
        if let Some(sql) = query_text(&frame[5..]).ok().filter(|_| retry.learn) {
            self.shared.classifier.mark_write(&sql);
        }
        tracing::debug!("replica refused a read-only query; running it on the primary");
        self.shared.metrics.replica_retries.inc();
        self.shared.metrics.statement(Role::Primary, Reason::Retry);
        let capture = self.captures_lsn();
        let server = self.server(Role::Primary).await?;
        server.send_query(&frame, server::Request::default());
        if capture {
            // It wrote: its commit position must gate the session's next reads.
            server.send_internal_query(WRITE_LSN_QUERY, expect::Purpose::WriteLsn);
        }
        self.flush_servers().await
    }

    /// Runs on the primary, in order, replica reads whose answers had not begun when the
    /// replica was lost (see `Session::replica_lost`).
    pub(super) async fn run_again_on_primary(
        &mut self,
        reads: Vec<(server::Request, Again)>,
    ) -> Result<(), PgError> {
        let shared_names = self.shares_statements();
        let limit = self.statement_limit();
        let metrics = self.shared.metrics.clone();
        let primary = self.server(Role::Primary).await?;
        for (mut request, again) in reads {
            metrics.statement(Role::Primary, Reason::Retry);
            match again {
                Again::Query(frame) => primary.send_query(&frame, request),
                Again::Batch {
                    frames,
                    statements,
                    unnamed,
                } => {
                    primary.dirty |= prepare_missing(primary, statements, limit) && !shared_names;
                    if let Some(parse) = &unnamed {
                        primary.send_internal_frame(tag::PARSE, parse);
                    }
                    send_batch(primary, &frames, shared_names.then_some((&[], &[])), limit);
                    request.started = Some(std::time::Instant::now());
                    primary.requests.push_back(request);
                }
            }
        }
        self.flush_servers().await
    }
}
