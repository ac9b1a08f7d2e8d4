//! A server connection as a session uses it: its buffers, what it still owes, its transaction
//! status, and the scan that turns its bytes into frames forwarded to the client (raw) or
//! consumed by pgnear.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::expect::{Expectations, Owner, Pending, Purpose};
use super::state::PendingState;
use crate::backend::conn::Role;
use crate::backend::pool::Pooled;
use crate::error::PgError;
use crate::protocol::backend::{self as be, header};

/// Frames longer than this are streamed to the client in pieces instead of buffered whole.
const STREAM_THRESHOLD: usize = 64 * 1024;
/// Read-buffer growth step.
const READ_CHUNK: usize = 16 * 1024;
/// Most bytes of a tentative answer held back before it is released anyway.
const HOLD_LIMIT: usize = 16 * 1024;

/// A client request (a Query, or a batch ending in Sync) in flight on a server.
#[derive(Debug, Default)]
pub struct Request {
    /// A session-state change to record if the request succeeds.
    pub change: Option<PendingState>,
    /// The Query frame, when a 25006 from the replica may send it to the primary instead.
    pub retry: Option<Bytes>,
    /// The server answered with an error.
    pub failed: bool,
    /// Learn the commit position once this completes (it may enter COPY IN mode, during which
    /// nothing else can be pipelined behind it).
    pub capture_after: bool,
    /// When it was sent (for the duration histogram).
    pub started: Option<std::time::Instant>,
}

pub struct Server {
    /// The connection, with what it carries between sessions (applied settings, prepared
    /// statements).
    pub conn: Pooled,
    pub role: Role,
    rbuf: BytesMut,
    pub out: BytesMut,
    pub expect: Expectations,
    /// Transaction status from the last ReadyForQuery: b'I', b'T' or b'E'.
    pub tx: u8,
    /// Bytes of a partially forwarded frame that still have to pass through.
    skip: usize,
    /// Client requests in flight, oldest first.
    pub requests: VecDeque<Request>,
    /// Statements the client closed elsewhere, to close here before the next use.
    pub to_close: Vec<String>,
    /// Sequence number of the session state this server has applied (`state::FROM_POOL`: see
    /// `conn.carry.applied`).
    pub synced: u64,
    /// It ran something that may leave state behind that pgnear does not track (a write, a
    /// pin, a named statement): `DISCARD ALL` before another session gets it.
    pub dirty: bool,
    /// A tentative answer's first frames.
    held: BytesMut,
    /// When bytes last arrived or were sent (or the session took the connection), to tell a
    /// server that went silent.
    last_activity: std::time::Instant,
    /// The replica refused the tentative request; its remaining answer is dropped.
    retrying: bool,
    /// In COPY FROM STDIN (CopyInResponse seen, ReadyForQuery not yet): the server waits for
    /// the client's data.
    pub copy_in: bool,
}

/// What a scan saw that the session cares about.
#[derive(Default, Debug)]
pub struct Seen {
    /// Client requests that completed (their ReadyForQuery went out).
    pub done: Vec<Request>,
    /// A query the replica refused as a write, to run on the primary.
    pub retry: Option<Bytes>,
    /// Value captured from pgnear's own commit-position lookup.
    pub write_lsn: Option<String>,
}

impl Server {
    pub fn new(conn: Pooled, role: Role) -> Server {
        Server {
            conn,
            role,
            rbuf: BytesMut::new(),
            out: BytesMut::new(),
            expect: Expectations::default(),
            tx: b'I',
            skip: 0,
            requests: VecDeque::new(),
            to_close: Vec::new(),
            synced: super::state::FROM_POOL,
            dirty: false,
            held: BytesMut::new(),
            last_activity: std::time::Instant::now(),
            retrying: false,
            copy_in: false,
        }
    }

    fn lost(&self, what: impl std::fmt::Display) -> PgError {
        PgError::upstream(format!(
            "lost connection to {} upstream {}: {what}",
            self.role.name(),
            self.conn.addr
        ))
    }

    /// How long since anything was sent to or received from the server.
    pub fn silent_for(&self) -> std::time::Duration {
        self.last_activity.elapsed()
    }

    /// Idle: nothing owed and no transaction open.
    pub fn is_idle(&self) -> bool {
        self.expect.is_empty() && self.tx == b'I'
    }

    /// Idle with nothing buffered either way: it can serve another session.
    pub fn is_reusable(&self) -> bool {
        self.is_idle() && self.requests.is_empty() && self.out.is_empty() && self.rbuf.is_empty()
    }

    /// Whether the server has the named statement (marking it used).
    pub fn has_statement(&mut self, name: &str) -> bool {
        let tick = self.next_tick();
        match self.conn.carry.prepared.get_mut(name) {
            Some(t) => {
                *t = tick;
                true
            }
            None => false,
        }
    }

    /// Records a statement parsed on the server. Past `limit` statements, the least recently
    /// used one is closed on the server and returned.
    pub fn add_statement(&mut self, name: &str, limit: usize) -> Option<String> {
        let tick = self.next_tick();
        self.conn.carry.prepared.insert(name.to_string(), tick);
        if self.conn.carry.prepared.len() <= limit {
            return None;
        }
        let oldest = self
            .conn
            .carry
            .prepared
            .iter()
            .min_by_key(|(_, t)| **t)
            .map(|(n, _)| n.clone())?;
        self.conn.carry.prepared.remove(&oldest);
        Some(oldest)
    }

    pub fn remove_statement(&mut self, name: &str) -> bool {
        self.conn.carry.prepared.remove(name).is_some()
    }

    fn next_tick(&mut self) -> u64 {
        self.conn.carry.tick += 1;
        self.conn.carry.tick
    }

    /// Queues a whole client frame and what it will be answered with.
    pub fn send_client_frame(&mut self, tag: u8, frame: &[u8]) {
        self.out.extend_from_slice(frame);
        if let Some(p) = Pending::for_tag(tag) {
            self.expect.push(p, Owner::Client);
        }
    }

    /// Queues a client Query; with `request.retry` set its answer is held until it is clear the
    /// server does not refuse it as a write.
    pub fn send_query(&mut self, frame: &[u8], mut request: Request) {
        request.started = Some(std::time::Instant::now());
        self.out.extend_from_slice(frame);
        let owner = if request.retry.is_some() {
            Owner::Tentative
        } else {
            Owner::Client
        };
        self.expect.push(Pending::Query, owner);
        self.requests.push_back(request);
    }

    /// Queues frames of pgnear's own whose answers are swallowed (re-prepares, closes).
    pub fn send_internal_frame(&mut self, tag: u8, frame: &[u8]) {
        self.out.extend_from_slice(frame);
        if let Some(p) = Pending::for_tag(tag) {
            self.expect.push(p, Owner::Internal(Purpose::Sync));
        }
    }

    /// Queues a simple query of pgnear's own; its answer is swallowed.
    pub fn send_internal_query(&mut self, sql: &str, purpose: Purpose) {
        postgres_protocol::message::frontend::query(sql, &mut self.out)
            .expect("query text has no NUL");
        self.expect.push(Pending::Query, Owner::Internal(purpose));
    }

    /// Writes everything queued. Not cancel-safe (a partial write would be lost).
    pub async fn flush(&mut self) -> Result<(), PgError> {
        if !self.out.is_empty() {
            self.conn
                .stream
                .write_all(&self.out)
                .await
                .map_err(|e| self.lost(e))?;
            self.out.clear();
            self.last_activity = std::time::Instant::now();
        }
        Ok(())
    }

    /// Reads and consumes the answers to pgnear's own queries, once no client request is in
    /// flight (the client is gone).
    pub async fn finish_internal(&mut self) -> Result<(), PgError> {
        self.flush().await?;
        let mut sink = BytesMut::new();
        while !self.expect.is_empty() {
            self.read().await?;
            self.scan(&mut sink, &mut Seen::default())?;
            sink.clear();
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
            Ok(_) => {
                self.last_activity = std::time::Instant::now();
                Ok(())
            }
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
                let owner = self.expect.front_owner();
                if bulk
                    && total > STREAM_THRESHOLD
                    && owner.is_some_and(Owner::is_client)
                    && !self.retrying
                {
                    // Stream the frame: its header and what we have go now, the rest as it comes.
                    // Data means the request was not refused: a held answer goes first.
                    if owner == Some(Owner::Tentative) {
                        cout.extend_from_slice(&buf[run_start..pos]);
                        cout.extend_from_slice(&self.held);
                        self.held.clear();
                        run_start = pos;
                        self.expect.confirm_front();
                    }
                    self.expect.on_frame(tag);
                    self.skip = total - avail;
                    pos = buf.len();
                } else {
                    grow = total - avail;
                }
                break;
            }
            let frame = &buf[pos..pos + total];
            let body = &frame[5..];
            let front = self.expect.front();
            let m = self.expect.on_frame(tag);
            tracing::trace!(role = self.role.name(), tag = %(tag as char), ?m, "frame");
            let mut forward = m.forward;
            if m.owner == Some(Owner::Tentative) {
                forward = false;
                if self.retrying {
                    if tag == be::READY_FOR_QUERY {
                        self.retrying = false;
                        seen.retry = self.requests.pop_front().and_then(|r| r.retry);
                    }
                } else if tag == be::ERROR_RESPONSE && be::error_fields(body).code == "25006" {
                    self.retrying = true;
                    self.held.clear();
                } else if matches!(
                    tag,
                    be::ROW_DESCRIPTION | be::NOTICE_RESPONSE | be::PARAMETER_STATUS
                ) && self.held.len() < HOLD_LIMIT
                {
                    self.held.extend_from_slice(frame);
                } else {
                    // Past the point where a refusal could come: release what was held.
                    cout.extend_from_slice(&buf[run_start..pos]);
                    cout.extend_from_slice(&self.held);
                    self.held.clear();
                    run_start = pos;
                    forward = true;
                    if m.completed.is_none() {
                        self.expect.confirm_front();
                    }
                }
            }
            match tag {
                be::COPY_IN => self.copy_in = true,
                be::READY_FOR_QUERY => {
                    self.copy_in = false;
                    self.tx = body.first().copied().unwrap_or(b'I');
                    if forward && m.completed.is_some() {
                        if let Some(r) = self.requests.pop_front() {
                            seen.done.push(r);
                        }
                    }
                }
                be::ERROR_RESPONSE
                    if front == Some((Pending::Query, Owner::Internal(Purpose::Sync))) =>
                {
                    // The server refused session state or a statement the session already has
                    // elsewhere: it cannot stand in for the session. Say so instead of blaming the
                    // client's next request.
                    let f = be::error_fields(body);
                    return Err(PgError::upstream(format!(
                        "{} upstream could not take over the session's state: {} ({})",
                        self.role.name(),
                        f.message,
                        f.code
                    )));
                }
                be::ERROR_RESPONSE if forward => {
                    if let Some(r) = self
                        .requests
                        .front_mut()
                        .filter(|_| m.owner.is_some_and(Owner::is_client))
                    {
                        r.failed = true;
                    }
                    // A dying replica's FATAL (e.g. 57P01) would tell the client its session is
                    // over; it is not: pgnear reports the lost statement as 08006 and goes on.
                    if self.role == Role::Replica
                        && matches!(be::error_fields(body).severity.as_str(), "FATAL" | "PANIC")
                    {
                        forward = false;
                    }
                }
                be::DATA_ROW if m.owner == Some(Owner::Internal(Purpose::WriteLsn)) => {
                    seen.write_lsn = be::first_column(body).map(str::to_string);
                }
                _ => {}
            }
            if !forward {
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
