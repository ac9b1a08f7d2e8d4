//! A server connection as a session uses it: its buffers, what it still owes, its transaction
//! status, and the scan that turns its bytes into frames forwarded to the client (raw) or
//! consumed by pgnear.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::expect::{Expectations, FailedParse, Owner, Pending, Purpose};
pub use super::reader::{as_primary, Reader, Reported, Retry, ScanError, Seen};
use super::state::PendingState;
use crate::backend::pool::Pooled;
use crate::cancel::CancelTarget;
use crate::error::PgError;
use crate::protocol::backend::Params;
use crate::role::Role;

/// Read-buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

/// A client request (a Query, or a batch ending in Sync) in flight on a server.
#[derive(Debug, Default)]
pub struct Request {
    /// A session-state change to record if the request succeeds.
    pub change: Option<PendingState>,
    /// An autocommit read on the replica: what it takes to run it on the primary instead, when
    /// the replica refuses it (a simple Query only) or is lost before its answer begins.
    pub again: Option<Again>,
    /// The server answered with an error.
    pub failed: bool,
    /// The transaction status its ReadyForQuery reported.
    pub tx_after: u8,
    /// Its last CommandComplete was ROLLBACK (a COMMIT of a failed block is answered so).
    pub rolled_back: bool,
    /// The transaction ends it ran (see `PendingState::settled`): after a failure, what they
    /// settled holds.
    pub ends: Vec<bool>,
    /// Learn the commit position once this completes (it may enter COPY IN mode, during which
    /// nothing else can be pipelined behind it).
    pub capture_after: bool,
    /// Learn the commit position once this completes, whatever its outcome: a write before it
    /// left that to it (see `Session::on_server`).
    pub capture_owed: bool,
    /// An extended-protocol batch that may start a COPY FROM STDIN: until it ends, what the
    /// client pipelines behind it goes to the same server (in copy-in mode the server ignores
    /// the batch's Sync, and only the client's next one ends the request).
    pub may_copy_in: bool,
    /// When it was sent (for the duration histogram).
    pub started: Option<std::time::Instant>,
    /// Keep the pools off a database the request drops, renames or copies, until it ends.
    pub fences: Vec<crate::backend::pool::Fence>,
}

impl Request {
    /// Makes `later` part of this request: one ReadyForQuery ends both (an extended-protocol
    /// COPY's, owed the client's next Sync).
    pub fn absorb(&mut self, later: Request) {
        self.change = PendingState::join(self.change.take(), later.change);
        self.failed |= later.failed;
        self.ends.extend(later.ends);
        self.capture_after |= later.capture_after;
        self.capture_owed |= later.capture_owed;
        self.may_copy_in |= later.may_copy_in;
        self.fences.extend(later.fences);
    }
}

/// A replica read as it can be sent again, to the primary.
#[derive(Debug)]
pub enum Again {
    /// A simple Query. Its answer is held back (`Owner::Tentative`) until it is clear the
    /// replica does not refuse it as a write (SQLSTATE 25006).
    Query(Bytes),
    /// Extended-protocol messages ending in their Sync, with the statements they use that
    /// were parsed before them (the unnamed one apart), as their Parse.
    Batch {
        frames: Bytes,
        statements: Vec<(String, Bytes)>,
        unnamed: Option<Bytes>,
    },
}

pub struct Server {
    /// The connection, with what it carries between sessions (applied settings, prepared
    /// statements).
    pub conn: Pooled,
    pub role: Role,
    /// Bytes read and not yet scanned, and the scan's state between reads.
    pub reader: Reader,
    pub out: BytesMut,
    pub expect: Expectations,
    /// Transaction status from the last ReadyForQuery: b'I', b'T' or b'E'.
    pub tx: u8,
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
    /// A simple query of pgnear's own ran since the session's last unnamed Parse here: the
    /// server no longer has the client's unnamed statement.
    pub unnamed_dropped: bool,
    /// The session's unnamed statement before the batch being sent (see
    /// `Expectations::take_unnamed_lost`).
    pub unnamed_before: super::expect::Unnamed,
    /// When bytes last arrived or were sent (or the session took the connection), to tell a
    /// server that went silent.
    last_activity: std::time::Instant,
}

impl Server {
    pub fn new(conn: Pooled, role: Role) -> Server {
        Server {
            conn,
            role,
            reader: Reader::fresh(),
            out: BytesMut::new(),
            expect: Expectations::default(),
            tx: b'I',
            requests: VecDeque::new(),
            to_close: Vec::new(),
            synced: super::state::FROM_POOL,
            dirty: false,
            unnamed_dropped: false,
            unnamed_before: (None, None),
            last_activity: std::time::Instant::now(),
        }
    }

    fn lost(&self, what: impl std::fmt::Display) -> PgError {
        PgError::upstream(format!(
            "lost connection to {} upstream {}: {what}",
            self.role.name(),
            self.conn.addr
        ))
    }

    /// Where a CancelRequest for what this connection runs goes.
    pub fn cancel_target(&self) -> CancelTarget {
        CancelTarget {
            addr: self.conn.addr,
            pid: self.conn.pid,
            secret: self.conn.secret.clone(),
        }
    }

    /// The error for a server that owes answers, has sent nothing for `limit`, and whose
    /// upstream's health checks fail (`up` false): taken as lost (a silent partition, which TCP
    /// alone would wait out for many minutes). `None` while it may still answer.
    pub fn stopped_answering(&self, limit: std::time::Duration, up: bool) -> Option<PgError> {
        let silent = !self.expect.is_empty() && self.silent_for() >= limit;
        (silent && !up).then(|| {
            PgError::upstream(format!(
                "{} upstream stopped answering: nothing received for {limit:?} and its health checks fail",
                self.role.name()
            ))
        })
    }

    /// How long since anything was sent to or received from the server.
    fn silent_for(&self) -> std::time::Duration {
        self.last_activity.elapsed()
    }

    /// Idle: nothing owed and no transaction open.
    pub fn is_idle(&self) -> bool {
        self.expect.is_empty() && self.tx == b'I'
    }

    /// Idle with nothing buffered either way, and not skipping to a Sync after an error (it
    /// would skip the next session's first request): it can serve another session.
    pub fn is_reusable(&self) -> bool {
        self.is_idle()
            && !self.expect.skipping
            && self.requests.is_empty()
            && self.out.is_empty()
            && self.reader.rbuf.is_empty()
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

    /// Queues a client's Parse of shared statement `name`, which this connection has, under the
    /// scratch name `parse` carries (see `Expectations::push_scratch_parse`).
    pub fn send_scratch_parse(&mut self, parse: &[u8], name: &str, client: Option<&str>) {
        self.out.extend_from_slice(parse);
        self.expect.push_scratch_parse(name, client);
    }

    /// Queues a client's Parse, renamed from `client` (transaction mode).
    pub fn send_client_parse(&mut self, frame: &[u8], client: Option<&str>) {
        self.out.extend_from_slice(frame);
        self.expect_parse(frame, Owner::Client, client);
    }

    /// Queues a whole client frame and what it will be answered with.
    pub fn send_client_frame(&mut self, tag: u8, frame: &[u8]) {
        self.out.extend_from_slice(frame);
        self.expect_answer(tag, frame, Owner::Client);
    }

    /// Queues a client's Bind, Describe or Close of statement `client` under its shared name
    /// (transaction mode): an error it gets names the client's.
    pub fn send_client_frame_named(&mut self, tag: u8, frame: &[u8], client: &str) {
        self.out.extend_from_slice(frame);
        if let Some(p) = Pending::for_tag(tag) {
            self.expect.push_named(p, Owner::Client, Some(client));
        }
    }

    fn expect_answer(&mut self, tag: u8, frame: &[u8], owner: Owner) {
        if tag == crate::protocol::tag::PARSE {
            self.expect_parse(frame, owner, None);
        } else if let Some(p) = Pending::for_tag(tag) {
            self.expect.push(p, owner);
        }
    }

    fn expect_parse(&mut self, frame: &[u8], owner: Owner, client: Option<&str>) {
        let name = crate::protocol::cstr(&frame[5..]).map_or("", |(n, _)| n);
        let existed = self.conn.carry.prepared.contains_key(name);
        self.expect
            .push_parse(owner, frame, (existed, &self.unnamed_before), client);
    }

    /// Queues a client Query; with `request.again` set its answer is held until it is clear the
    /// server does not refuse it as a write.
    pub fn send_query(&mut self, frame: &[u8], request: Request) {
        let owner = if matches!(request.again, Some(Again::Query(_))) {
            Owner::Tentative
        } else {
            Owner::Client
        };
        self.send_request(frame, Pending::Query, owner, request);
    }

    /// Queues a client FunctionCall, a request of its own (see `Pending::FunctionCall`).
    /// `change`: settings carried ahead of it (see `Session::carried`), the session's if it succeeds.
    pub fn send_function_call(&mut self, frame: &[u8], change: Option<PendingState>) {
        let request = Request {
            change,
            ..Request::default()
        };
        self.send_request(frame, Pending::FunctionCall, Owner::Client, request);
    }

    /// Queues a client request that ends in its own ReadyForQuery (Query, FunctionCall).
    fn send_request(&mut self, frame: &[u8], pending: Pending, owner: Owner, mut request: Request) {
        request.started = Some(std::time::Instant::now());
        self.out.extend_from_slice(frame);
        if self.expect.skipping {
            // The server skips it (an extended-protocol error awaits its Sync): no answer.
            return;
        }
        self.expect.push(pending, owner);
        match self.requests.back_mut().filter(|_| self.reader.owed_sync) {
            // After an extended-protocol COPY the server is owed a Sync: this request's
            // ReadyForQuery ends that request too, so the two are one.
            Some(owed) => {
                self.reader.owed_sync = false;
                owed.absorb(request);
            }
            None => self.requests.push_back(request),
        }
    }

    /// Queues frames of pgnear's own whose answers are swallowed (re-prepares, closes).
    pub fn send_internal_frame(&mut self, tag: u8, frame: &[u8]) {
        self.out.extend_from_slice(frame);
        self.unnamed_dropped |= tag == crate::protocol::tag::QUERY;
        self.expect_answer(tag, frame, Owner::Internal(Purpose::Sync));
    }

    /// Queues a simple query of pgnear's own; its answer is swallowed.
    pub fn send_internal_query(&mut self, sql: &str, purpose: Purpose) {
        if self.expect.skipping {
            // It would be skipped too.
            return;
        }
        postgres_protocol::message::frontend::query(sql, &mut self.out)
            .expect("query text has no NUL");
        self.unnamed_dropped = true;
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
            self.scan(&mut sink, &mut Seen::default(), None)?;
            sink.clear();
        }
        Ok(())
    }

    /// Reads more bytes. Cancel-safe (read_buf is).
    pub async fn read(&mut self) -> Result<(), PgError> {
        let rbuf = &mut self.reader.rbuf;
        if rbuf.capacity() - rbuf.len() < 1024 {
            rbuf.reserve(READ_CHUNK);
        }
        match self.conn.stream.read_buf(rbuf).await {
            Ok(0) => Err(self.lost("server closed the connection")),
            Ok(_) => {
                self.last_activity = std::time::Instant::now();
                Ok(())
            }
            Err(e) => Err(self.lost(e)),
        }
    }

    /// The client's Parses the server turned out not to have prepared (failed, or skipped after
    /// an error), forgotten here, and the session's unnamed statement if the last unnamed Parse
    /// did not succeed (see `Expectations::take_unnamed_lost`); the session forgets them too
    /// (`Session::forget_lost_parses`).
    pub fn take_lost_parses(&mut self) -> (Vec<FailedParse>, Option<super::expect::Unnamed>) {
        let mut failed = self.expect.take_failed_parses();
        for f in &failed {
            if !f.kept {
                self.conn.carry.prepared.remove(&f.name);
            }
        }
        failed.retain(|f| !f.internal);
        (failed, self.expect.take_unnamed_lost())
    }

    /// Moves every complete frame (and the leading part of a long one) out of the read buffer:
    /// frames for the client are appended to `cout` as raw bytes, pgnear's own answers consumed.
    /// `told`: the parameters the client was told (see `Reader::scan`); `None` when what is
    /// scanned cannot change one (pgnear's own queries, shared replica connections).
    pub fn scan(
        &mut self,
        cout: &mut BytesMut,
        seen: &mut Seen,
        told: Option<&mut Params>,
    ) -> Result<(), PgError> {
        let r = self.reader.scan(
            self.role,
            &mut self.expect,
            &mut self.tx,
            &mut self.requests,
            Reported {
                server: &mut self.conn.conn.params,
                told,
            },
            cout,
            seen,
        );
        let (failed, unnamed) = self.take_lost_parses();
        seen.failed_parses.extend(failed);
        if unnamed.is_some() {
            seen.unnamed_lost = unnamed;
        }
        r.map_err(|e| match e {
            ScanError::Malformed => self.lost("malformed message from server"),
            ScanError::Fatal(e) => e,
        })
    }
}
