//! What each server connection still owes: one entry per message sent that produces a response.
//! Server frames are matched against the front entry in order, which tells pgnear whether a frame
//! answers the client (forward) or pgnear itself (swallow), and when a request is complete.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::protocol::backend as be;
use crate::protocol::tag;

/// A message sent to the server that will be answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    Parse,
    Bind,
    Close,
    Describe,
    Execute,
    FunctionCall,
    Sync,
    Query,
    /// CopyDone or CopyFail: no answer of its own, but it ends a COPY FROM STDIN, so the Syncs
    /// behind it are processed, not ignored (a marker, dropped once it reaches the front).
    CopyEnd,
}

impl Pending {
    /// The pending entry for a frontend message tag (`None`: no response, e.g. Flush, CopyData).
    pub fn for_tag(t: u8) -> Option<Pending> {
        Some(match t {
            tag::PARSE => Pending::Parse,
            tag::BIND => Pending::Bind,
            tag::CLOSE => Pending::Close,
            tag::DESCRIBE => Pending::Describe,
            tag::EXECUTE => Pending::Execute,
            tag::FUNCTION_CALL => Pending::FunctionCall,
            tag::SYNC => Pending::Sync,
            tag::QUERY => Pending::Query,
            tag::COPY_DONE | tag::COPY_FAIL => Pending::CopyEnd,
            _ => return None,
        })
    }

    /// Whether `frame` is the last frame answering this message.
    fn ends_with(self, frame: u8) -> bool {
        match self {
            Pending::Parse => frame == be::PARSE_COMPLETE,
            Pending::Bind => frame == be::BIND_COMPLETE,
            Pending::Close => frame == be::CLOSE_COMPLETE,
            Pending::Describe => frame == be::ROW_DESCRIPTION || frame == be::NO_DATA,
            Pending::Execute => matches!(
                frame,
                be::COMMAND_COMPLETE | be::EMPTY_QUERY | be::PORTAL_SUSPENDED
            ),
            // A FunctionCall is a complete request, like a Query: answered by
            // FunctionCallResponse (or an error) and ReadyForQuery.
            Pending::Sync | Pending::Query | Pending::FunctionCall => frame == be::READY_FOR_QUERY,
            Pending::CopyEnd => false,
        }
    }

    fn is_sync_point(self) -> bool {
        matches!(self, Pending::Sync | Pending::Query | Pending::FunctionCall)
    }
}

/// Who a pending response is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Client,
    /// The client's, but for its ReadyForQuery, which the request after it (pgnear's own
    /// `Purpose::Restore`) sends in its place.
    ClientBody,
    /// The client's, but for its ReadyForQuery, which is swallowed: the rest of the client's
    /// query runs after it on the other server, whose ReadyForQuery ends it (see
    /// `Session::on_query`). Its request is done there.
    ClientHead,
    /// The client's, but held back until it is clear the replica will not refuse it as a write
    /// (SQLSTATE 25006), in which case it runs again on the primary.
    Tentative,
    /// pgnear's own request (a re-prepare, an LSN lookup, a state sync): answer swallowed.
    Internal(Purpose),
}

impl Owner {
    pub fn is_client(self) -> bool {
        matches!(
            self,
            Owner::Client | Owner::ClientBody | Owner::ClientHead | Owner::Tentative
        )
    }

    /// Whether this entry's ReadyForQuery ends a client request (and goes to the client).
    fn ends_client_request(self) -> bool {
        matches!(
            self,
            Owner::Client | Owner::Tentative | Owner::Internal(Purpose::Restore)
        )
    }

    /// Whether its errors and notices are pgnear's own business (not the client's).
    fn quiet(self) -> bool {
        matches!(self, Owner::Internal(Purpose::WriteLsn | Purpose::Restore))
    }
}

/// Why pgnear sent a request of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Commit-position lookup pipelined behind a write.
    WriteLsn,
    /// Session state or prepared statement replayed on a server that lacked it.
    Sync,
    /// The client's startup settings applied again behind its RESET ALL (or DISCARD ALL, or
    /// RESET of one of them), which returned them to the server's defaults: its
    /// ReadyForQuery ends the client's request (see `Owner::ClientBody`).
    Restore,
}

/// The outcome of matching one server frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matched {
    pub forward: bool,
    /// The frame completed an entry owned by this owner.
    pub completed: Option<(Pending, Owner)>,
    /// Owner of the entry the frame belonged to (`None`: unsolicited, e.g. a notification).
    pub owner: Option<Owner>,
}

/// A Parse sent and not yet answered.
#[derive(Debug)]
struct SentParse {
    /// The statement's name on the server (`None`: the unnamed one).
    name: Option<String>,
    /// The server had a statement of that name when it was sent.
    existed: bool,
    /// Sent under the scratch name (see `push_scratch_parse`).
    scratch: bool,
    /// Transaction mode: the client's name for it.
    client: Option<String>,
    /// pgnear's own (a re-prepare of a statement the client has).
    internal: bool,
    /// The unnamed statement's: its Parse frame, and the session's unnamed statement before.
    unnamed: Option<(Bytes, Unnamed)>,
    /// A client Query sent since dropped the unnamed statement it parses (see
    /// `unnamed_superseded`).
    superseded: bool,
}

/// A client's Parse of a named statement that created nothing (it failed, or was skipped).
#[derive(Debug, PartialEq, Eq)]
pub struct FailedParse {
    /// The statement's name on the server.
    pub name: String,
    /// The server has a statement of that name all the same (a scratch Parse failed).
    pub kept: bool,
    /// Transaction mode: the client's name for it.
    pub client: Option<String>,
    /// pgnear's own Parse: the client's statement is as it was (the server lacks it).
    pub internal: bool,
}

#[derive(Default, Debug)]
pub struct Expectations {
    /// Each message's entry, with (transaction mode) the client's name of the statement it
    /// names under a shared one: the server's errors name the shared one.
    queue: VecDeque<(Pending, Owner, Option<Box<str>>)>,
    /// Client Queries and FunctionCalls the server skipped after an extended-protocol error
    /// (it skips everything up to the next Sync): their requests end unanswered.
    skipped: usize,
    /// An extended-protocol error with no Sync sent yet: the server skips what comes until
    /// one arrives (see `Server::send_query`).
    pub skipping: bool,
    /// Each Parse in the queue, in order.
    parses: VecDeque<SentParse>,
    /// Named statements new to the server whose Parse failed or was skipped: the server does
    /// not have them. (A failed Parse of a name the server had leaves that statement as it was.)
    failed_parses: Vec<FailedParse>,
    /// How the last unnamed Parse that was answered (or skipped) ended.
    unnamed_parsed: Option<ParseEnd>,
    /// The session's unnamed statement as the unnamed Parses answered (or skipped) since the
    /// last look leave it (`None`: as before them).
    unnamed_effective: Option<Unnamed>,
}

/// A session's unnamed statement: its Parse, and the server that has it (`None`: the one
/// whose Parse answered).
pub type Unnamed = (Option<Bytes>, Option<crate::role::Role>);

/// How a Parse sent ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseEnd {
    Ok,
    /// Its own ErrorResponse: for the unnamed statement, the one before is gone too.
    Failed,
    /// Skipped after an error before it: nothing changed.
    Skipped,
}

impl Expectations {
    /// Queues a Parse of statement `name` (empty: the unnamed one); `existed`: the server has
    /// a statement of that name already; `client`: the client's name for it (transaction mode).
    /// `before`: the session's unnamed statement before the batch.
    pub fn push_parse(
        &mut self,
        owner: Owner,
        frame: &[u8],
        (existed, before): (bool, &Unnamed),
        client: Option<&str>,
    ) {
        let name = crate::protocol::cstr(&frame[5..]).map_or("", |(n, _)| n);
        self.parses.push_back(SentParse {
            name: (!name.is_empty()).then(|| name.to_string()),
            existed,
            scratch: false,
            client: client.map(str::to_string),
            internal: !owner.is_client(),
            unnamed: name
                .is_empty()
                .then(|| (Bytes::copy_from_slice(frame), before.clone())),
            superseded: false,
        });
        self.push_named(Pending::Parse, owner, client);
    }

    /// Queues a client's Parse of shared statement `name` that the server has already, sent
    /// under a scratch name (transaction mode): if it fails, the client does not have `name`,
    /// though the server still does.
    pub fn push_scratch_parse(&mut self, name: &str, client: Option<&str>) {
        self.parses.push_back(SentParse {
            name: Some(name.to_string()),
            existed: false,
            scratch: true,
            client: client.map(str::to_string),
            internal: false,
            unnamed: None,
            superseded: false,
        });
        self.push_named(Pending::Parse, Owner::Client, client);
    }

    /// The oldest Parse in the queue ended: with its ParseComplete, its own error, or skipped
    /// after an error before it.
    fn parse_ended(&mut self, end: ParseEnd) {
        let ok = end == ParseEnd::Ok;
        match self.parses.pop_front() {
            Some(SentParse {
                name: Some(name),
                existed: false,
                scratch,
                client,
                internal,
                ..
            }) if !ok => self.failed_parses.push(FailedParse {
                name,
                kept: scratch,
                client,
                internal,
            }),
            Some(SentParse {
                name: None,
                superseded: false,
                unnamed,
                ..
            }) => {
                self.unnamed_parsed = Some(end);
                let (frame, before) = unnamed.expect("an unnamed Parse has its frame");
                match end {
                    ParseEnd::Ok => self.unnamed_effective = Some((Some(frame), None)),
                    ParseEnd::Failed => self.unnamed_effective = Some((None, None)),
                    // Nothing changed: the session keeps what it had (unless a Parse answered
                    // before this one changed that).
                    ParseEnd::Skipped => {
                        self.unnamed_effective.get_or_insert(before);
                    }
                }
            }
            _ => {}
        }
    }

    /// Named statements the client's Parse did not create (see `failed_parses`).
    pub fn take_failed_parses(&mut self) -> Vec<FailedParse> {
        std::mem::take(&mut self.failed_parses)
    }

    /// Whether any Parse sent waits for its answer.
    pub fn parses_pending(&self) -> bool {
        !self.parses.is_empty()
    }

    /// Whether a Parse of statement `name` (its name on the server) waits for its answer.
    pub fn parse_pending(&self, name: &str) -> bool {
        self.parses.iter().any(|p| p.name.as_deref() == Some(name))
    }

    /// An unnamed Parse sent is still waiting for its answer.
    pub fn unnamed_pending(&self) -> bool {
        self.parses.iter().any(|p| p.name.is_none())
    }

    /// When the last unnamed Parse sent did not succeed, once none is still waiting for its
    /// answer: the session's unnamed statement instead (none after a failed one, which drops
    /// it; the one before after a skipped one).
    pub fn take_unnamed_lost(&mut self) -> Option<Unnamed> {
        if self.unnamed_pending() {
            return None;
        }
        let effective = self.unnamed_effective.take();
        self.unnamed_parsed
            .take()
            .filter(|&e| e != ParseEnd::Ok)
            .and(effective)
    }

    /// A client Query was sent: it drops the unnamed statement, whatever the unnamed Parses
    /// still unanswered turn out to do.
    pub fn unnamed_superseded(&mut self) {
        for p in self.parses.iter_mut().filter(|p| p.name.is_none()) {
            p.superseded = true;
        }
        self.unnamed_parsed = None;
        self.unnamed_effective = None;
    }

    pub fn push(&mut self, p: Pending, owner: Owner) {
        self.push_named(p, owner, None);
    }

    /// Queues a client's message that names statement `client` by its shared name.
    pub fn push_named(&mut self, p: Pending, owner: Owner, client: Option<&str>) {
        if p == Pending::Sync {
            // The server skips up to this Sync, not past it: what follows it is answered.
            self.skipping = false;
        } else if self.skipping {
            // Skipped after the error, answered by nothing (a Parse creates nothing).
            if p == Pending::Parse {
                self.parse_ended(ParseEnd::Skipped);
            }
            return;
        }
        self.queue.push_back((p, owner, client.map(Into::into)));
        self.drop_markers();
    }

    /// The client's name of the statement the front entry names (see `push_named`).
    pub fn front_client_name(&self) -> Option<&str> {
        self.queue.front().and_then(|(_, _, c)| c.as_deref())
    }

    /// Drops the CopyEnd markers that reached the front: they are answered by nothing.
    fn drop_markers(&mut self) {
        while self
            .queue
            .front()
            .is_some_and(|(p, _, _)| *p == Pending::CopyEnd)
        {
            self.queue.pop_front();
        }
    }

    /// Whether the client ended the COPY the front entry runs (a CopyEnd behind it).
    pub fn copy_ended_behind_front(&self) -> bool {
        self.queue
            .iter()
            .skip(1)
            .any(|(p, _, _)| *p == Pending::CopyEnd)
    }

    /// How many CopyDone and CopyFail messages are queued (each ends a COPY sent before it).
    pub fn copy_ends_queued(&self) -> usize {
        self.queue
            .iter()
            .filter(|(p, _, _)| *p == Pending::CopyEnd)
            .count()
    }

    pub fn front(&self) -> Option<(Pending, Owner)> {
        self.queue.front().map(|(p, o, _)| (*p, *o))
    }

    pub fn front_owner(&self) -> Option<Owner> {
        self.queue.front().map(|(_, o, _)| *o)
    }

    /// Turns a tentative front entry into a plain client one (its answer is being released).
    pub fn confirm_front(&mut self) {
        if let Some((_, o, _)) = self.queue.front_mut() {
            if *o == Owner::Tentative {
                *o = Owner::Client;
            }
        }
    }

    pub fn has_tentative(&self) -> bool {
        self.queue.iter().any(|(_, o, _)| *o == Owner::Tentative)
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether any request of pgnear's own with this purpose is still pending.
    pub fn has_internal(&self, purpose: Purpose) -> bool {
        self.queue
            .iter()
            .any(|(_, o, _)| *o == Owner::Internal(purpose))
    }

    /// Removes the Syncs queued right behind the front entry; returns how many.
    pub fn drop_syncs_after_front(&mut self) -> usize {
        let n = self
            .queue
            .iter()
            .skip(1)
            .take_while(|(p, _, _)| *p == Pending::Sync)
            .count();
        self.queue.drain(1..1 + n);
        n
    }

    /// How many client requests the server skipped since the last call (see `skipped`).
    pub fn take_skipped(&mut self) -> usize {
        std::mem::take(&mut self.skipped)
    }

    /// Makes the last entry's ReadyForQuery pgnear's (see `Owner::ClientBody`).
    pub fn defer_ready(&mut self) {
        self.retag_last(Owner::ClientBody);
    }

    /// Swallows the last entry's ReadyForQuery (see `Owner::ClientHead`).
    pub fn swallow_ready(&mut self) {
        self.retag_last(Owner::ClientHead);
    }

    fn retag_last(&mut self, owner: Owner) {
        if let Some((_, o, _)) = self
            .queue
            .back_mut()
            .filter(|(_, o, _)| *o == Owner::Client)
        {
            *o = owner;
        }
    }

    pub fn clear(&mut self) {
        self.queue.clear();
        self.parses.clear();
    }

    /// Matches one server frame against the queue.
    pub fn on_frame(&mut self, frame: u8) -> Matched {
        let m = self.match_frame(frame);
        self.drop_markers();
        m
    }

    fn match_frame(&mut self, frame: u8) -> Matched {
        match frame {
            // Asynchronous messages can arrive at any time; they always reach the client.
            be::NOTICE_RESPONSE | be::NOTIFICATION => {
                let owner = self.queue.front().map(|(_, o, _)| *o);
                let forward = !owner.is_some_and(Owner::quiet);
                Matched {
                    forward,
                    completed: None,
                    owner,
                }
            }
            be::PARAMETER_STATUS => {
                let owner = self.queue.front().map(|(_, o, _)| *o);
                Matched {
                    forward: !matches!(owner, Some(Owner::Internal(_))),
                    completed: None,
                    owner,
                }
            }
            be::ERROR_RESPONSE => {
                let Some(&(front, owner, _)) = self.queue.front() else {
                    return Matched {
                        forward: true,
                        completed: None,
                        owner: None,
                    };
                };
                if !front.is_sync_point() {
                    // Extended protocol: the server now skips everything up to the next Sync,
                    // Queries and FunctionCalls included.
                    let mut end = ParseEnd::Failed;
                    while let Some(&(p, o, _)) =
                        self.queue.front().filter(|(p, _, _)| *p != Pending::Sync)
                    {
                        self.queue.pop_front();
                        if p == Pending::Parse {
                            self.parse_ended(end);
                        }
                        end = ParseEnd::Skipped;
                        if p.is_sync_point() && o.is_client() {
                            self.skipped += 1;
                        }
                    }
                    self.skipping = self.queue.is_empty();
                }
                // An error caused by pgnear's state replay matters to the client; only the LSN
                // lookup's failure (e.g. after an aborted transaction) is pgnear's own business.
                let forward = !owner.quiet();
                Matched {
                    forward,
                    completed: None,
                    owner: Some(owner),
                }
            }
            be::READY_FOR_QUERY => {
                self.skipping = false;
                // Completes the oldest sync point; anything before it was skipped by the server.
                while let Some((p, o, _)) = self.queue.pop_front() {
                    if p == Pending::Parse {
                        self.parse_ended(ParseEnd::Skipped);
                    }
                    if p.is_sync_point() {
                        return Matched {
                            forward: o.ends_client_request(),
                            completed: Some((p, o)),
                            owner: Some(o),
                        };
                    }
                }
                Matched {
                    forward: true,
                    completed: None,
                    owner: None,
                }
            }
            _ => {
                let Some(&(front, owner, _)) = self.queue.front() else {
                    return Matched {
                        forward: true,
                        completed: None,
                        owner: None,
                    };
                };
                let completed = if front.ends_with(frame) {
                    self.queue.pop_front();
                    if front == Pending::Parse {
                        self.parse_ended(ParseEnd::Ok);
                    }
                    Some((front, owner))
                } else {
                    None
                };
                Matched {
                    forward: owner.is_client(),
                    completed,
                    owner: Some(owner),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(e: &mut Expectations, frames: &[u8]) -> Vec<bool> {
        frames.iter().map(|f| e.on_frame(*f).forward).collect()
    }

    #[test]
    fn simple_query() {
        let mut e = Expectations::default();
        e.push(Pending::Query, Owner::Client);
        assert_eq!(run(&mut e, b"TDDCZ"), vec![true; 5]);
        assert!(e.is_empty());
    }

    #[test]
    fn extended_with_internal_reprepare() {
        let mut e = Expectations::default();
        e.push(Pending::Parse, Owner::Internal(Purpose::Sync));
        for p in [Pending::Bind, Pending::Execute, Pending::Sync] {
            e.push(p, Owner::Client);
        }
        assert_eq!(
            run(&mut e, b"12DDCZ"),
            vec![false, true, true, true, true, true]
        );
        assert!(e.is_empty());
    }

    #[test]
    fn lsn_lookup_is_swallowed_even_on_error() {
        let mut e = Expectations::default();
        e.push(Pending::Query, Owner::Client);
        e.push(Pending::Query, Owner::Internal(Purpose::WriteLsn));
        assert_eq!(run(&mut e, b"CZ"), vec![true, true]);
        assert_eq!(run(&mut e, b"TDCZ"), vec![false; 4]);
        e.push(Pending::Query, Owner::Internal(Purpose::WriteLsn));
        assert_eq!(run(&mut e, b"EZ"), vec![false, false]);
        assert!(e.is_empty());
    }

    #[test]
    fn error_skips_to_sync() {
        let mut e = Expectations::default();
        for p in [
            Pending::Parse,
            Pending::Bind,
            Pending::Execute,
            Pending::Sync,
            Pending::Parse,
            Pending::Sync,
        ] {
            e.push(p, Owner::Client);
        }
        // Parse fails: Bind and Execute are skipped by the server.
        assert_eq!(run(&mut e, b"EZ"), vec![true, true]);
        assert_eq!(e.len(), 2);
        assert_eq!(run(&mut e, b"1Z"), vec![true, true]);
        assert!(e.is_empty());
    }

    /// After an extended-protocol error the server skips a Query up to the Sync (found by the
    /// protocol fuzzer: pgnear waited for the skipped Query's answer forever).
    #[test]
    fn error_skips_queries_up_to_sync() {
        let mut e = Expectations::default();
        e.push(Pending::Parse, Owner::Client);
        e.push(Pending::Query, Owner::Client);
        e.push(Pending::Query, Owner::Internal(Purpose::WriteLsn));
        e.push(Pending::FunctionCall, Owner::Client);
        e.push(Pending::Sync, Owner::Client);
        assert_eq!(run(&mut e, b"EZ"), vec![true, true]);
        assert!(e.is_empty());
        assert_eq!(e.take_skipped(), 2);
        assert!(!e.skipping);
        e.push(Pending::Parse, Owner::Client);
        assert_eq!(run(&mut e, b"E"), vec![true]);
        assert!(e.skipping);
        // A Sync sent ends the skip, before its ReadyForQuery is in: what follows it is answered
        // (found by the fuzzer: a FunctionCall sent then went unexpected, a hang).
        e.push(Pending::Sync, Owner::Client);
        assert!(!e.skipping);
    }

    /// A RESET ALL's own ReadyForQuery is swallowed; the restore behind it answers for it.
    #[test]
    fn restore_answers_for_the_client() {
        let mut e = Expectations::default();
        e.push(Pending::Query, Owner::Client);
        e.defer_ready();
        e.push(Pending::Query, Owner::Internal(Purpose::Restore));
        assert_eq!(run(&mut e, b"CZ"), vec![true, false]);
        assert_eq!(run(&mut e, b"CCNZ"), vec![false, false, false, true]);
        assert!(e.is_empty());
        // In a failed transaction the restore's error stays pgnear's.
        e.push(Pending::Query, Owner::Client);
        e.defer_ready();
        e.push(Pending::Query, Owner::Internal(Purpose::Restore));
        assert_eq!(run(&mut e, b"EZEZ"), vec![true, false, false, true]);
    }

    #[test]
    fn flush_driven_then_sync() {
        let mut e = Expectations::default();
        e.push(Pending::Parse, Owner::Client);
        e.push(Pending::Describe, Owner::Client);
        assert_eq!(run(&mut e, b"1tT"), vec![true; 3]);
        assert!(e.is_empty());
        e.push(Pending::Sync, Owner::Client);
        assert_eq!(run(&mut e, b"Z"), vec![true]);
    }

    #[test]
    fn unsolicited_frames_are_forwarded() {
        let mut e = Expectations::default();
        assert_eq!(run(&mut e, b"ANSE"), vec![true; 4]);
    }
}
