//! How servers report the values clients give at startup: Postgres answers a client's
//! `client_encoding=utf-8` with ParameterStatus `client_encoding` = `UTF8`, `DateStyle=ISO` with
//! `ISO, MDY`. pgnear answers a startup without a server, so it learns each (name, value) once
//! from one (setting it on a pooled connection, which is then reset) and tells later clients the
//! same, as a direct connection would. A value the server refuses refuses the client, with the
//! server's own error, as Postgres does at startup.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::state::{quote_literal, quote_name};
use crate::backend::conn::ServerConn;
use crate::error::{ErrorKind, PgError};
use crate::protocol::backend as be;

/// Most (name, value) pairs remembered: clients choose them, so the map is bounded.
const MAX_LEARNED: usize = 1024;

#[derive(Default)]
pub struct ReportedValues {
    learned: Mutex<HashMap<(String, String), String>>,
}

impl ReportedValues {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.learned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value a server reports for `name` after the client set it to `value`, if learned.
    pub fn get(&self, name: &str, value: &str) -> Option<String> {
        self.map()
            .get(&(name.to_string(), value.to_string()))
            .cloned()
    }

    /// Sets each (name, value) on `conn`, recording what the server reports (Postgres reports
    /// changes at the query's end: a reset in the same query would hide them). The caller
    /// resets the connection before anyone else uses it.
    pub async fn learn(
        &self,
        conn: &mut ServerConn,
        wanted: &[(String, String)],
    ) -> Result<(), PgError> {
        let mut sql = String::new();
        for (name, value) in wanted {
            sql.push_str(&format!(
                "SET {} TO {}; ",
                quote_name(name),
                quote_literal(value)
            ));
        }
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::query(&sql, &mut out)
            .map_err(|_| PgError::protocol("invalid startup parameter value"))?;
        let lost = |e: std::io::Error| PgError::upstream(format!("server connection lost: {e}"));
        conn.stream.write_all(&out).await.map_err(lost)?;
        let before = conn.params.clone();
        let mut seen: Vec<(String, String)> = Vec::new();
        let mut refused = None;
        let mut buf = BytesMut::new();
        loop {
            let (tag, body) = crate::protocol::read_frame(&mut conn.stream, &mut buf, 1 << 20)
                .await
                .map_err(lost)?;
            match tag {
                be::PARAMETER_STATUS => {
                    if let Some((k, v)) = be::parameter_status(&body) {
                        if !seen.iter().any(|(n, _)| n == k) {
                            seen.push((k.to_string(), v.to_string()));
                        }
                        be::set_param(&mut conn.params, k, v);
                    }
                }
                be::ERROR_RESPONSE => refused = Some(be::error_fields(&body)),
                be::READY_FOR_QUERY => break,
                _ => {}
            }
        }
        if let Some(f) = refused {
            let e = PgError::new(ErrorKind::Protocol, f.message);
            return Err(PgError {
                code: Some(f.code),
                ..e
            });
        }
        let mut learned = self.map();
        if learned.len() + wanted.len() > MAX_LEARNED {
            learned.clear();
        }
        for (name, value) in wanted {
            // Unchanged values are not reported: the value is what the server already had.
            let reported = seen
                .iter()
                .chain(before.iter())
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone());
            if let Some(reported) = reported {
                learned.insert((name.clone(), value.clone()), reported);
            }
        }
        Ok(())
    }
}
