//! A session's start, once the client is authenticated: the parameters it is told (from the
//! cache, or from a first server connection), its cancel key, and its first ReadyForQuery.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::server::{self, Server};
use super::state::SessionState;
use super::{plan, Session, Shared};
use crate::backend::login::Login;
use crate::backend::pool::Target;
use crate::consistency::gate;
use crate::error::{ErrorKind, PgError};
use crate::protocol::frontend::Startup;
use crate::protocol::write;
use crate::role::Role;
use crate::tls::Stream;

impl Session {
    /// Completes the client's startup and returns the session. The client is told the server
    /// parameters pgnear has cached for its database, so it waits for no upstream; without
    /// them (the first client of a database) a server connection is taken first: from the
    /// local replica when it can serve reads (a far region then pays no cross-region
    /// handshake), else the primary.
    pub async fn establish(
        shared: Arc<Shared>,
        mut client: Stream,
        startup: Startup,
        login: Arc<Login>,
    ) -> Result<Box<Session>, (Stream, PgError)> {
        let database = startup
            .get("database")
            .filter(|d| !d.is_empty())
            .unwrap_or(&shared.primary.url.database);
        let target = Target::new(login, database);
        let state = match SessionState::from_startup(&startup.params) {
            Ok(s) => s,
            Err(why) => {
                let e = PgError::new(
                    ErrorKind::Protocol,
                    format!("invalid startup parameter \"options\": {why}"),
                );
                return Err((client, e));
            }
        };
        let replica_ready = shared.watcher.as_ref().is_some_and(|w| {
            let c = &shared.config.consistency;
            gate::decide(c.mode, None, &w.current(), c.max_replica_lag.0) == gate::Gate::Go
        });
        let home = if replica_ready && shared.replica_pool.is_some() {
            Role::Replica
        } else {
            Role::Primary
        };
        let mut first = None;
        let params = match shared.pool(home).cached_params(&target) {
            Some(p) => p,
            None => {
                let mut got = Err(PgError::upstream("unreachable"));
                for role in [home, Role::Primary] {
                    got = shared.pool(role).acquire(&target).await.map(|c| (role, c));
                    match &got {
                        Err(e) if role == Role::Replica => {
                            tracing::warn!(error = %e, "replica unavailable at startup; using the primary")
                        }
                        _ => break,
                    }
                }
                match got {
                    Ok((role, conn)) => {
                        let params = conn.params.clone().into();
                        first = Some(Server::new(conn, role));
                        params
                    }
                    Err(e) => return Err((client, e)),
                }
            }
        };
        // The client's own settings are what its session will have, as the server reports
        // them (learned once per value: see `reported`).
        let given: Vec<(String, String)> = params
            .iter()
            .filter_map(|(k, v)| {
                let (_, mine) = startup
                    .params
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(k))?;
                (mine != v).then(|| (k.clone(), mine.clone()))
            })
            .collect();
        let unknown: Vec<(String, String)> = given
            .iter()
            .filter(|(k, v)| shared.reported.get(k, v).is_none())
            .cloned()
            .collect();
        if !unknown.is_empty() {
            let mut role = first.as_ref().map_or(home, |s| s.role);
            let mut conn = match first.take() {
                Some(s) => Ok(s.conn),
                None => shared.pool(role).acquire(&target).await,
            };
            if conn.is_err() && role == Role::Replica {
                role = Role::Primary;
                conn = shared.pool(role).acquire(&target).await;
            }
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => return Err((client, e)),
            };
            let learned = shared.reported.learn(&mut conn, &unknown).await;
            // Set and reset: what it carried from earlier sessions is no longer known.
            shared.pool(role).release(conn, true);
            if let Err(e) = learned {
                return Err((client, e));
            }
        }
        let cancel = shared.cancels.register();
        let mut out = BytesMut::new();
        let mut told = Vec::with_capacity(params.len());
        for (k, v) in params.iter() {
            // pgnear as a whole accepts writes, whichever server answered the startup.
            let v = match given.iter().find(|(name, _)| name == k) {
                Some((name, mine)) => shared.reported.get(name, mine).unwrap_or(mine.clone()),
                None => server::as_primary(k, v).to_string(),
            };
            write::parameter_status(&mut out, k, &v);
            told.push((k.clone(), v));
        }
        if !shared.config.regions.primary.is_empty() {
            write::parameter_status(
                &mut out,
                "pgnear.primary_region",
                &shared.config.regions.primary,
            );
        }
        write::backend_key_data(&mut out, cancel.pid, cancel.secret);
        write::ready_for_query(&mut out, b'I');
        if let Err(e) = client.write_all(&out).await {
            return Err((
                client,
                PgError::protocol(format!("client connection lost: {e}")),
            ));
        }
        let write_mode = shared.config.routing.write_mode;
        let mut session = Session {
            shared,
            client,
            cbuf: BytesMut::new(),
            cout: BytesMut::new(),
            target,
            primary: None,
            replica: None,
            batch: BytesMut::new(),
            batch_tags: Vec::new(),
            last: home,
            cancel,
            cancel_role: None,
            state,
            tx: plan::Tx::Idle,
            ending: None,
            unnamed_role: None,
            write_lsn: None,
            min_lsn: None,
            gave_up: None,
            answers: None,
            told,
            write_mode,
            exchange: None,
            carried: None,
        };
        if let Some(server) = first {
            let role = server.role;
            session.last = role;
            *session.slot(role) = Some(server);
            session.release_if_done(role);
        }
        // Boxed: the session lives as long as the client, and its future is kept small.
        Ok(Box::new(session))
    }
}
