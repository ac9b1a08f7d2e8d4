//! A control connection: pgnear's own simple queries to an upstream (LSN polling, probes).
//! It reuses the proxy's upstream connector, so TLS and authentication behave exactly as for
//! client traffic. Connecting and every query run under a deadline: a server that stops
//! answering makes them fail (`ControlError::Missed`), never wait; the caller then drops the
//! connection.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;

use super::conn::{Pick, ServerConn, Upstream};
use crate::error::PgError;
use crate::protocol::backend::{self as be, error_fields};

pub struct ControlConn {
    conn: ServerConn,
    buf: BytesMut,
    out: BytesMut,
}

/// Why a control connection or query failed.
#[derive(Debug)]
pub enum ControlError {
    /// The server did not answer within the deadline.
    Missed(&'static str, Duration),
    /// The server answered with an error, or the connection failed.
    Failed(PgError),
}

impl ControlError {
    pub fn is_missed(&self) -> bool {
        matches!(self, ControlError::Missed(..))
    }
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::Missed(what, d) => write!(f, "{what} got no answer within {d:?}"),
            ControlError::Failed(e) => e.fmt(f),
        }
    }
}

impl From<PgError> for ControlError {
    fn from(e: PgError) -> ControlError {
        ControlError::Failed(e)
    }
}

impl ControlConn {
    /// Connects (TCP, TLS, startup, authentication) within `deadline`.
    pub async fn connect(
        upstream: &Upstream,
        deadline: Duration,
    ) -> Result<ControlConn, ControlError> {
        ControlConn::connect_to(upstream, Pick::Chosen, deadline).await
    }

    /// `connect`, to the addresses `pick` allows.
    pub async fn connect_to(
        upstream: &Upstream,
        pick: Pick,
        deadline: Duration,
    ) -> Result<ControlConn, ControlError> {
        let params = [("application_name".to_string(), "pgnear-control".to_string())];
        let conn = tokio::time::timeout(
            deadline,
            upstream.connect_to(pick, &upstream.login, &upstream.url.database, &params),
        )
        .await
        .map_err(|_| ControlError::Missed("connecting", deadline))??;
        Ok(ControlConn {
            conn,
            buf: BytesMut::new(),
            out: BytesMut::new(),
        })
    }

    /// `query_row` within `deadline`. After any error the connection is in an unknown state:
    /// drop it.
    pub async fn query_row_within(
        &mut self,
        sql: &str,
        deadline: Duration,
    ) -> Result<Vec<Option<String>>, ControlError> {
        self.query_first_within(sql, deadline)
            .await?
            .ok_or_else(|| PgError::upstream("control query returned no row").into())
    }

    /// The first row of `sql`, if any, within `deadline` (see `query_row_within`).
    pub async fn query_first_within(
        &mut self,
        sql: &str,
        deadline: Duration,
    ) -> Result<Option<Vec<Option<String>>>, ControlError> {
        match tokio::time::timeout(deadline, self.query_first(sql)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ControlError::Missed("a control query", deadline)),
        }
    }

    /// The server address this connection went to.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.conn.addr
    }

    /// Runs `sql` and returns the text columns of its first row (`None` for NULL).
    /// Not cancel-safe: drop the connection if the future is dropped.
    async fn query_first(&mut self, sql: &str) -> Result<Option<Vec<Option<String>>>, PgError> {
        self.out.clear();
        postgres_protocol::message::frontend::query(sql, &mut self.out)
            .expect("no NUL in pgnear's SQL");
        self.conn.stream.write_all(&self.out).await.map_err(lost)?;
        let mut row = None;
        let mut error = None;
        loop {
            let (tag, body) = self.read_frame().await?;
            match tag {
                be::DATA_ROW if row.is_none() => row = Some(columns(&body)),
                be::ERROR_RESPONSE => error = Some(error_fields(&body)),
                be::READY_FOR_QUERY => break,
                _ => {}
            }
        }
        if let Some(e) = error {
            return Err(PgError::upstream(format!(
                "control query failed: {} ({})",
                e.message, e.code
            )));
        }
        Ok(row)
    }

    async fn read_frame(&mut self) -> Result<(u8, BytesMut), PgError> {
        crate::protocol::read_frame(&mut self.conn.stream, &mut self.buf, 1 << 30)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    PgError::upstream("control connection closed by the server")
                }
                std::io::ErrorKind::InvalidData => {
                    PgError::upstream("malformed message on control connection")
                }
                _ => lost(e),
            })
    }
}

fn lost(e: std::io::Error) -> PgError {
    PgError::upstream(format!("control connection lost: {e}"))
}

fn columns(body: &[u8]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let mut b = body;
    if b.len() < 2 {
        return out;
    }
    let n = b.get_i16();
    for _ in 0..n.max(0) {
        if b.len() < 4 {
            break;
        }
        let len = b.get_i32();
        if len < 0 {
            out.push(None);
            continue;
        }
        let len = (len as usize).min(b.len());
        out.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
        b.advance(len);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns() {
        let body = b"\0\x03\0\0\0\x030/1\xff\xff\xff\xff\0\0\0\x01t";
        assert_eq!(
            super::columns(body),
            vec![Some("0/1".into()), None, Some("t".into())]
        );
        assert!(super::columns(b"\0").is_empty());
        // Truncated rows yield what is there, never a panic.
        assert_eq!(
            super::columns(b"\0\x02\0\0\0\x09ab"),
            vec![Some("ab".into())]
        );
    }
}
