//! A server connection as a session uses it: its buffers, what it still owes, its transaction
//! status, and the scan that turns its bytes into frames forwarded to the client (raw) or
//! consumed by pgnear.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::expect::{Expectations, Owner, Pending, Purpose};
use crate::backend::conn::{Role, ServerConn};
use crate::error::PgError;
use crate::protocol::backend::{self as be, header};

/// Frames longer than this are streamed to the client in pieces instead of buffered whole.
const STREAM_THRESHOLD: usize = 64 * 1024;
/// Read-buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

pub struct Server {
    pub conn: ServerConn,
    pub role: Role,
    rbuf: BytesMut,
    pub out: BytesMut,
    pub expect: Expectations,
    /// Transaction status from the last ReadyForQuery: b'I', b'T' or b'E'.
    pub tx: u8,
    /// Bytes of a partially forwarded frame that still have to pass through.
    skip: usize,
}

/// What a scan saw that the session cares about.
#[derive(Default, Debug)]
pub struct Seen {
    /// A client's request completed (its ReadyForQuery went out).
    pub client_ready: bool,
    /// SQLSTATE of errors answered to the client in this scan.
    pub errors: Vec<String>,
    /// Value captured from pgnear's own commit-position lookup.
    pub write_lsn: Option<String>,
}

impl Server {
    pub fn new(conn: ServerConn, role: Role) -> Server {
        Server {
            conn,
            role,
            rbuf: BytesMut::new(),
            out: BytesMut::new(),
            expect: Expectations::default(),
            tx: b'I',
            skip: 0,
        }
    }

    fn lost(&self, what: impl std::fmt::Display) -> PgError {
        PgError::upstream(format!("lost connection to {} upstream {}: {what}", self.role.name(), self.conn.addr))
    }

    /// Idle: nothing owed and no transaction open.
    pub fn is_idle(&self) -> bool {
        self.expect.is_empty() && self.tx == b'I'
    }

    /// Queues a whole client frame and what it will be answered with.
    pub fn send_client_frame(&mut self, tag: u8, frame: &[u8]) {
        self.out.extend_from_slice(frame);
        if let Some(p) = Pending::for_tag(tag) {
            self.expect.push(p, Owner::Client);
        }
    }

    /// Queues a simple query of pgnear's own; its answer is swallowed.
    pub fn send_internal_query(&mut self, sql: &str, purpose: Purpose) {
        postgres_protocol::message::frontend::query(sql, &mut self.out).expect("query text has no NUL");
        self.expect.push(Pending::Query, Owner::Internal(purpose));
    }

    /// Writes everything queued. Not cancel-safe (a partial write would be lost).
    pub async fn flush(&mut self) -> Result<(), PgError> {
        if !self.out.is_empty() {
            self.conn.stream.write_all(&self.out).await.map_err(|e| self.lost(e))?;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads more bytes. Cancel-safe (read_buf is).
    pub async fn read(&mut self) -> Result<(), PgError> {
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            self.rbuf.reserve(READ_CHUNK);
        }
        match self.conn.stream.read_buf(&mut self.rbuf).await {
            Ok(0) => Err(self.lost("server closed the connection")),
            Ok(_) => Ok(()),
            Err(e) => Err(self.lost(e)),
        }
    }

    /// Moves every complete frame (and the leading part of a long one) out of the read buffer:
    /// frames for the client are appended to `cout` as raw bytes, pgnear's own answers consumed.
    pub fn scan(&mut self, cout: &mut BytesMut, seen: &mut Seen) -> Result<(), PgError> {
        let buf = &self.rbuf[..];
        let mut grow = 0;
        let mut pos = 0;
        let mut run_start = 0;
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            self.skip -= n;
            pos = n;
        }
        while self.skip == 0 {
            let Some((tag, total)) = header(&buf[pos..]) else {
                break;
            };
            if total < 5 {
                return Err(self.lost("malformed message from server"));
            }
            let avail = buf.len() - pos;
            if avail < total {
                let bulk = matches!(tag, be::DATA_ROW | be::COPY_DATA | be::FUNCTION_RESULT);
                if bulk && total > STREAM_THRESHOLD && self.expect.front_owner() != Some(Owner::Internal(Purpose::WriteLsn)) {
                    // Stream the frame: its header and what we have go now, the rest as it comes.
                    self.expect.on_frame(tag);
                    self.skip = total - avail;
                    pos = buf.len();
                } else {
                    grow = total - avail;
                }
                break;
            }
            let body = &buf[pos + 5..pos + total];
            let m = self.expect.on_frame(tag);
            match tag {
                be::READY_FOR_QUERY => {
                    self.tx = body.first().copied().unwrap_or(b'I');
                    if m.forward {
                        seen.client_ready = true;
                    }
                }
                be::ERROR_RESPONSE if m.forward => seen.errors.push(be::error_fields(body).code),
                be::DATA_ROW if m.owner == Some(Owner::Internal(Purpose::WriteLsn)) => {
                    seen.write_lsn = be::first_column(body).map(str::to_string);
                }
                _ => {}
            }
            if !m.forward {
                cout.extend_from_slice(&buf[run_start..pos]);
                run_start = pos + total;
            }
            pos += total;
        }
        cout.extend_from_slice(&buf[run_start..pos]);
        self.rbuf.advance(pos);
        self.rbuf.reserve(grow);
        Ok(())
    }
}

