//! The scan of a server connection's bytes: frames forwarded to the client as raw bytes (long
//! ones streamed in pieces), pgnear's own answers consumed, what the session must learn noted
//! (`Seen`), without a socket (unit tests and fuzzing drive it from bytes alone).

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use super::expect::{Expectations, FailedParse, Owner, Pending, Purpose};
use super::server::{Again, Request};
use crate::error::PgError;
use crate::protocol::backend::{self as be, header, set_param, Params};
use crate::role::Role;

/// Frames longer than this are streamed to the client in pieces instead of buffered whole.
const STREAM_THRESHOLD: usize = 64 * 1024;
/// Most bytes of a tentative answer held back before it is released anyway.
const HOLD_LIMIT: usize = 16 * 1024;
/// Most bytes reserved at once for a partial frame before its bytes arrive.
const MAX_RESERVE: usize = 1024 * 1024;

/// The read side of a server connection, apart from its socket: bytes read and not yet
/// scanned, and what the scan keeps between reads. Separate so the scan can be driven from bytes
/// alone (unit tests, fuzzing: see `feed`).
#[derive(Debug, Default)]
pub struct Reader {
    pub(super) rbuf: BytesMut,
    /// Bytes of a partially forwarded frame that still have to pass through.
    skip: usize,
    /// A tentative answer's first frames.
    held: BytesMut,
    /// The replica refused the tentative request; its remaining answer is dropped.
    retrying: bool,
    /// That refusal said the request writes (25006), not that a standby cannot run it at all.
    retry_writes: bool,
    /// In COPY FROM STDIN (CopyInResponse seen; its CommandComplete, error or ReadyForQuery
    /// not yet): the server waits for the client's data and ignores Sync and Flush.
    pub copy_in: bool,
    /// The client sent CopyDone or CopyFail for that COPY: what it sends next is processed.
    pub client_ended_copy: bool,
    /// Part of the answer to the oldest client request in flight went to the client (after its
    /// ReadyForQuery: to the next one's).
    pub begun: bool,
    /// A COPY started by the extended protocol: the server discarded the Sync that followed
    /// its Execute, and the client's first Sync after the COPY completes that request instead.
    pub owed_sync: bool,
    /// A client message sent with no Sync yet (a Flush-driven exchange) failed: the request
    /// its Sync will end has failed (its state changes were skipped).
    pub failed_unsynced: bool,
    /// The transaction ends a Flush-driven exchange ran so far (see `server::Request::ends`).
    pub ends_unsynced: Vec<bool>,
    /// Stop each scan after a client request finishes (a shared connection answers several
    /// sessions: each one's frames go to it alone).
    pub one_request: bool,
    /// The server's reported parameters may differ from what the client was told: a
    /// ParameterStatus arrived, or the session just took this connection.
    params_changed: bool,
}

/// Why a scan stopped.
#[derive(Debug)]
pub enum ScanError {
    /// A frame header no server sends (length under 4).
    Malformed,
    /// An error that ends the session's use of this server.
    Fatal(PgError),
}

/// What a scan saw that the session cares about.
#[derive(Default, Debug)]
pub struct Seen {
    /// Client requests that completed (their ReadyForQuery went out).
    pub done: Vec<Request>,
    /// A query the replica refused, to run on the primary.
    pub retry: Option<Retry>,
    /// Value captured from pgnear's own commit-position lookup.
    pub write_lsn: Option<String>,
    /// Named statements whose Parse failed, new to the server: they do not exist.
    pub failed_parses: Vec<FailedParse>,
    /// The last unnamed Parse did not succeed: the session's unnamed statement instead (see
    /// `Expectations::take_unnamed_lost`).
    pub unnamed_lost: Option<super::expect::Unnamed>,
    /// A ReadyForQuery arrived: the server's transaction status is fresh.
    pub ready: bool,
    /// Where in the client's output the notifications passed on lie (their sender pid may
    /// need mapping: see `Session::on_server`).
    pub notifications: Vec<usize>,
}

/// A query the replica refused before any of its answer reached the client, to run on the
/// primary instead.
#[derive(Debug)]
pub struct Retry {
    pub frame: Bytes,
    /// It was refused as a write (25006): the classifier learns that its text writes.
    pub learn: bool,
}

/// Whether an ErrorResponse is a standby's refusal of something only a primary can run:
/// `Some(true)` for a write (25006), `Some(false)` for what a hot standby cannot do at all
/// (0A000 "... in a hot standby", e.g. SERIALIZABLE under a database or role default).
fn standby_refusal(body: &[u8]) -> Option<bool> {
    let f = be::error_fields(body);
    match f.code.as_str() {
        "25006" => Some(true),
        "0A000" if f.message.contains("hot standby") => Some(false),
        _ => None,
    }
}

/// What `Reader::scan` keeps of ParameterStatus: the server connection's reported values, and
/// the client's view of them.
pub struct Reported<'a> {
    pub server: &'a mut Params,
    pub told: Option<&'a mut Params>,
}

/// A reported value as the client sees it: pgnear as a whole accepts writes, whichever server
/// reported (a direct connection to the primary reports `in_hot_standby` off).
pub fn as_primary<'a>(name: &str, value: &'a str) -> &'a str {
    if name == "in_hot_standby" {
        "off"
    } else {
        value
    }
}

/// An ErrorResponse that names a shared statement (`"pgnear_<hash>"`, transaction mode) with
/// the client's name for it (`client`) instead; `None` when it names none.
fn client_names(body: &[u8], client: &str) -> Option<BytesMut> {
    const MARK: &str = "\"pgnear_";
    body.windows(MARK.len())
        .any(|w| w == MARK.as_bytes())
        .then_some(())?;
    let mut fields = BytesMut::with_capacity(body.len());
    let mut pos = 0;
    while pos < body.len() && body[pos] != 0 {
        let (value, used) = crate::protocol::cstr(&body[pos + 1..])?;
        fields.extend_from_slice(&body[pos..=pos]);
        let mut rest = value;
        while let Some(at) = rest.find(MARK) {
            // The quoted name, if it is a shared one (a hash): other quoted text stays.
            let name = &rest[at + 1..];
            let close = name.find('"').unwrap_or(name.len());
            let hash = &name["pgnear_".len()..close];
            let end = (at + 2 + close).min(rest.len());
            fields.extend_from_slice(&rest.as_bytes()[..at]);
            if !hash.is_empty() && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                fields.extend_from_slice(format!("\"{client}\"").as_bytes());
            } else {
                fields.extend_from_slice(&rest.as_bytes()[at..end]);
            }
            rest = &rest[end..];
        }
        fields.extend_from_slice(rest.as_bytes());
        fields.extend_from_slice(b"\0");
        pos += 1 + used;
    }
    fields.extend_from_slice(b"\0");
    Some(crate::protocol::build_frame(be::ERROR_RESPONSE, &[&fields]))
}

/// Writes a ParameterStatus for each of `server`'s values that `told` does not have yet.
fn tell_changes(server: &Params, told: &mut Params, cout: &mut BytesMut) {
    for (name, value) in server {
        let value = as_primary(name, value);
        if told.iter().any(|(k, v)| k == name && v == value) {
            continue;
        }
        crate::protocol::write::parameter_status(cout, name, value);
        set_param(told, name, value);
    }
}

impl Reader {
    /// The reader of a connection the session just took: what the client was told of its
    /// parameters is compared on the first scan.
    pub fn fresh() -> Reader {
        Reader {
            params_changed: true,
            ..Reader::default()
        }
    }

    /// Compares what the client was told with this server's values at its next ReadyForQuery
    /// to the client (another server's answer, not passed on, may have changed them).
    pub fn recheck_params(&mut self) {
        self.params_changed = true;
    }

    /// Appends bytes as if read from the server.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.rbuf.extend_from_slice(bytes);
    }

    /// `Server::scan` on this server's `role`, `expect`, `tx`, `requests` and parameters.
    ///
    /// ParameterStatus frames are not passed on as they come: they update what the server
    /// reports, and before each ReadyForQuery that ends a client request the client is told
    /// every reported parameter whose value differs from what it was told (Postgres, too,
    /// reports changes just before ReadyForQuery). So a client learns of a change however it
    /// came about (its SET on a connection that already had the value, a rollback, a move to
    /// the other server), and of nothing that did not change for it.
    #[allow(clippy::too_many_arguments)]
    pub fn scan(
        &mut self,
        role: Role,
        expect: &mut Expectations,
        tx: &mut u8,
        requests: &mut VecDeque<Request>,
        reported: Reported<'_>,
        cout: &mut BytesMut,
        seen: &mut Seen,
    ) -> Result<(), ScanError> {
        let Reported { server, mut told } = reported;
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
                return Err(ScanError::Malformed);
            }
            let avail = buf.len() - pos;
            if avail < total {
                let bulk = matches!(tag, be::DATA_ROW | be::COPY_DATA | be::FUNCTION_RESULT);
                let owner = expect.front_owner();
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
                        expect.confirm_front();
                    }
                    self.begun = true;
                    expect.on_frame(tag);
                    self.skip = total - avail;
                    pos = buf.len();
                } else {
                    grow = total - avail;
                }
                break;
            }
            let frame = &buf[pos..pos + total];
            let body = &frame[5..];
            let front = expect.front();
            // (Transaction mode) the client's name of the statement the message failing names.
            let named = (tag == be::ERROR_RESPONSE)
                .then(|| expect.front_client_name().map(str::to_string))
                .flatten();
            let m = expect.on_frame(tag);
            for _ in 0..expect.take_skipped() {
                // A skipped request ends unanswered: its ErrorResponse went to the batch before it.
                requests.pop_front();
            }
            if tag == be::PARAMETER_STATUS {
                if let Some((name, value)) = be::parameter_status(body) {
                    set_param(server, name, value);
                    self.params_changed = true;
                }
                cout.extend_from_slice(&buf[run_start..pos]);
                pos += total;
                run_start = pos;
                continue;
            }
            tracing::trace!(role = role.name(), tag = %(tag as char), ?m, "frame");
            let mut forward = m.forward;
            let mut renamed = None;
            if m.owner == Some(Owner::Tentative) {
                forward = false;
                if self.retrying {
                    if tag == be::READY_FOR_QUERY {
                        self.retrying = false;
                        seen.retry = requests
                            .pop_front()
                            .and_then(|r| r.again)
                            .and_then(|a| match a {
                                Again::Query(frame) => Some(frame),
                                Again::Batch { .. } => None,
                            })
                            .map(|frame| Retry {
                                frame,
                                learn: self.retry_writes,
                            });
                    }
                } else if let Some(writes) = (tag == be::ERROR_RESPONSE)
                    .then(|| standby_refusal(body))
                    .flatten()
                {
                    self.retrying = true;
                    self.retry_writes = writes;
                    self.held.clear();
                } else if matches!(tag, be::ROW_DESCRIPTION | be::NOTICE_RESPONSE)
                    && self.held.len() < HOLD_LIMIT
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
                        expect.confirm_front();
                    }
                }
            }
            if matches!(tag, be::COMMAND_COMPLETE | be::ERROR_RESPONSE) {
                // The COPY (if one ran) is over: the server processes messages again.
                self.copy_in = false;
            }
            if tag == be::COMMAND_COMPLETE && m.owner.is_some_and(Owner::is_client) {
                let end = match body {
                    b"COMMIT\0" | b"PREPARE TRANSACTION\0" => Some(true),
                    b"ROLLBACK\0" => Some(false),
                    _ => None,
                };
                match requests.front_mut() {
                    Some(r) => {
                        r.rolled_back = end == Some(false);
                        r.ends.extend(end);
                    }
                    // A Flush-driven exchange's: the request its Sync ends takes them.
                    None => self.ends_unsynced.extend(end),
                }
            }
            match tag {
                be::COPY_IN => {
                    self.copy_in = true;
                    // The client may have pipelined its CopyDone already.
                    self.client_ended_copy = expect.copy_ended_behind_front();
                    if front.is_some_and(|(p, _)| p == Pending::Execute) {
                        // The Syncs sent behind the Execute reach a server in copy-in mode,
                        // which ignores them: the request ends at the client's next Sync.
                        let dropped = expect.drop_syncs_after_front();
                        if dropped > 0 {
                            let end = dropped.min(requests.len());
                            if end > 1 {
                                requests.drain(1..end);
                            }
                            // The client's next Sync (or Query) may be out already, behind its
                            // CopyDone, as a request of its own: its ReadyForQuery ends this one.
                            match requests.remove(1) {
                                Some(next) => requests[0].absorb(next),
                                None => self.owed_sync = true,
                            }
                        }
                    }
                }
                be::READY_FOR_QUERY => {
                    self.copy_in = false;
                    self.client_ended_copy = false;
                    // Any exchange is over (a Query ended it, or a Sync whose request took them).
                    self.ends_unsynced.clear();
                    *tx = body.first().copied().unwrap_or(b'I');
                    seen.ready = true;
                    if let Some(told) = told
                        .as_deref_mut()
                        .filter(|_| forward && self.params_changed)
                    {
                        self.params_changed = false;
                        cout.extend_from_slice(&buf[run_start..pos]);
                        run_start = pos;
                        tell_changes(server, told, cout);
                    }
                    let head = matches!(m.completed, Some((_, Owner::ClientHead)));
                    if (forward || head) && m.completed.is_some() {
                        if let Some(mut r) = requests.pop_front() {
                            r.tx_after = *tx;
                            seen.done.push(r);
                        }
                        // What the client gets next answers the request after it.
                        self.begun = false;
                    }
                }
                be::ERROR_RESPONSE
                    if front == Some((Pending::Query, Owner::Internal(Purpose::Sync))) =>
                {
                    // The server refused session state or a statement the session already has
                    // elsewhere: it cannot stand in for the session. Say so instead of blaming the
                    // client's next request.
                    let f = be::error_fields(body);
                    return Err(ScanError::Fatal(PgError::upstream(format!(
                        "{} upstream could not take over the session's state: {} ({})",
                        role.name(),
                        f.message,
                        f.code
                    ))));
                }
                be::ERROR_RESPONSE if forward => {
                    if m.owner.is_some_and(Owner::is_client) {
                        // The requests before the failed message are answered: it belongs to
                        // the front one, or to the one its Sync, not sent yet, will end.
                        match requests.front_mut() {
                            Some(r) => r.failed = true,
                            None => self.failed_unsynced = true,
                        }
                    }
                    // A dying replica's FATAL (e.g. 57P01) would tell the client its session is
                    // over; it is not: pgnear reports the lost statement as 08006 and goes on.
                    if role == Role::Replica
                        && matches!(be::error_fields(body).severity.as_str(), "FATAL" | "PANIC")
                    {
                        forward = false;
                    }
                    renamed = named.and_then(|client| client_names(body, &client));
                }
                be::NOTIFICATION if forward => {
                    seen.notifications.push(cout.len() + pos - run_start)
                }
                be::DATA_ROW if m.owner == Some(Owner::Internal(Purpose::WriteLsn)) => {
                    seen.write_lsn = be::first_column(body).map(str::to_string);
                }
                _ => {}
            }
            if let Some(frame) = renamed.filter(|_| forward) {
                cout.extend_from_slice(&buf[run_start..pos]);
                cout.extend_from_slice(&frame);
                run_start = pos + total;
            }
            if !forward {
                cout.extend_from_slice(&buf[run_start..pos]);
                run_start = pos + total;
            } else if m.owner.is_some_and(Owner::is_client)
                && !(tag == be::READY_FOR_QUERY && m.completed.is_some())
            {
                self.begun = true;
            }
            pos += total;
            if self.one_request && (!seen.done.is_empty() || seen.retry.is_some()) {
                break;
            }
        }
        cout.extend_from_slice(&buf[run_start..pos]);
        self.rbuf.advance(pos);
        // Room for the rest of a partial frame, within reason: its length comes from the server
        // (up to 4 GB); a longer frame grows the buffer as its bytes actually arrive.
        self.rbuf.reserve(grow.min(MAX_RESERVE));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_names_the_clients_statement_instead_of_the_shared_one() {
        let body =
            b"SERROR\0C26000\0Mprepared statement \"pgnear_0a2b\" requires 1 \"pgnear_x\"\0\0";
        let out = super::client_names(body, "s1").expect("names a shared statement");
        let fields = &out[5..];
        assert_eq!(
            fields,
            b"SERROR\0C26000\0Mprepared statement \"s1\" requires 1 \"pgnear_x\"\0\0"
        );
        assert!(super::client_names(b"SERROR\0Mrelation \"t\"\0\0", "s1").is_none());
    }

    use super::*;

    fn scan(reader: &mut Reader, expect: &mut Expectations) -> Result<BytesMut, ScanError> {
        let mut cout = BytesMut::new();
        reader.scan(
            Role::Primary,
            expect,
            &mut b'I',
            &mut VecDeque::new(),
            Reported {
                server: &mut Vec::new(),
                told: None,
            },
            &mut cout,
            &mut Seen::default(),
        )?;
        Ok(cout)
    }

    #[test]
    fn forwards_whole_frames_and_keeps_the_partial_one() {
        let mut expect = Expectations::default();
        expect.push(Pending::Query, Owner::Client);
        let mut reader = Reader::default();
        reader.feed(b"C\0\0\0\x0dSELECT 1\0Z\0\0");
        let out = scan(&mut reader, &mut expect).unwrap();
        assert_eq!(&out[..], b"C\0\0\0\x0dSELECT 1\0");
        reader.feed(b"\0\x05I");
        let out = scan(&mut reader, &mut expect).unwrap();
        assert_eq!(&out[..], b"Z\0\0\0\x05I");
        assert!(expect.is_empty());
    }

    #[test]
    fn a_huge_length_from_the_server_reserves_little() {
        // Found by fuzzing: the header of a frame that is not streamed (here a RowDescription)
        // claiming ~4 GB made the scan reserve all of it up front.
        let mut expect = Expectations::default();
        expect.push(Pending::Query, Owner::Client);
        let mut reader = Reader::default();
        reader.feed(b"T\xff\xff\xff\xf0\0\x01");
        let out = scan(&mut reader, &mut expect).unwrap();
        assert!(out.is_empty());
        assert!(reader.rbuf.capacity() <= 2 * MAX_RESERVE);
        assert!(matches!(
            scan(&mut reader, &mut expect),
            Ok(ref o) if o.is_empty()
        ));
    }

    fn status(name: &str, value: &str) -> Vec<u8> {
        let mut out = BytesMut::new();
        crate::protocol::write::parameter_status(&mut out, name, value);
        out.to_vec()
    }

    /// ParameterStatus frames update the server's values; the client is told the differences
    /// just before its ReadyForQuery, once each, and nothing that did not change for it.
    #[test]
    fn parameter_status_is_told_before_ready_for_query() {
        let mut expect = Expectations::default();
        expect.push(Pending::Query, Owner::Client);
        let mut reader = Reader {
            params_changed: true,
            ..Reader::default()
        };
        let mut server: Params = vec![("TimeZone".into(), "UTC".into())];
        let mut told: Params = vec![
            ("TimeZone".into(), "UTC".into()),
            ("in_hot_standby".into(), "off".into()),
        ];
        let mut bytes = b"C\0\0\0\x08SET\0".to_vec();
        bytes.extend(status("TimeZone", "Asia/Tokyo"));
        bytes.extend(status("in_hot_standby", "on"));
        bytes.extend(status("TimeZone", "Europe/Paris"));
        bytes.extend(b"Z\0\0\0\x05I");
        reader.feed(&bytes);
        let mut cout = BytesMut::new();
        let reported = Reported {
            server: &mut server,
            told: Some(&mut told),
        };
        reader
            .scan(
                Role::Replica,
                &mut expect,
                &mut b'I',
                &mut VecDeque::new(),
                reported,
                &mut cout,
                &mut Seen::default(),
            )
            .unwrap();
        let mut want = b"C\0\0\0\x08SET\0".to_vec();
        want.extend(status("TimeZone", "Europe/Paris"));
        want.extend(b"Z\0\0\0\x05I");
        assert_eq!(&cout[..], &want[..]);
        assert!(told.contains(&("TimeZone".into(), "Europe/Paris".into())));
        assert!(server.contains(&("in_hot_standby".into(), "on".into())));
    }

    #[test]
    fn a_length_under_four_is_malformed() {
        let mut reader = Reader::default();
        reader.feed(b"Z\0\0\0\x03");
        assert!(matches!(
            scan(&mut reader, &mut Expectations::default()),
            Err(ScanError::Malformed)
        ));
    }
}
