//! Prepared statements on server connections: transaction mode's shared statement names
//! (`pgnear_<hash>`, so that sessions share what the server prepared), and preparing on a
//! server what a request uses and it lacks.

use bytes::{Bytes, BytesMut};

use super::batch::BatchPlan;
use super::server::Server;
use super::Session;
use crate::config::PoolMode;
use crate::error::PgError;
use crate::protocol::{build_frame, cstr, frames, tag};
use crate::role::Role;

/// Server-side prepared statements kept per connection in transaction mode; past this the
/// least recently used is closed.
pub(super) const STATEMENTS_PER_CONNECTION: usize = 1000;
/// A statement name that never exists on a server.
pub(super) const NO_STATEMENT: &str = "pgnear_none";
/// A statement parsed only to answer a client's Parse, closed at once.
const SCRATCH_STATEMENT: &str = "pgnear_scratch";

impl Session {
    /// Transaction mode shares prepared statements between sessions, under names derived from
    /// their text (`pgnear_<hash>`).
    pub(super) fn shares_statements(&self) -> bool {
        self.shared.config.pool.mode == PoolMode::Transaction
    }

    /// Most statements pgnear keeps prepared on one server connection for this session.
    pub(super) fn statement_limit(&self) -> usize {
        if self.shares_statements() {
            STATEMENTS_PER_CONNECTION
        } else {
            usize::MAX
        }
    }

    /// Writes into `plan` the batch with its statement names (Parse, Bind, Describe, Close)
    /// rewritten to the shared server-side names, and the names it gives and forgets. A Close
    /// only forgets the client's name: it is sent for a name that never exists, which the
    /// server answers with CloseComplete. Returns the Parses of a name the client has already,
    /// as `duplicate` does.
    pub(super) fn rename_statements(
        &self,
        plan: &mut BatchPlan,
    ) -> Result<Vec<(usize, bool)>, PgError> {
        let batch = &self.batch;
        let mut out = BytesMut::with_capacity(batch.len() + 64);
        let bad = |what: &str| PgError::protocol(format!("invalid {what} message"));
        // Client names parsed in the batch since its last Sync.
        let mut exchange: Vec<&str> = Vec::new();
        let mut dups = Vec::new();
        // After a Parse the server refuses, it skips to the Sync: nothing there names or
        // forgets a statement.
        let mut skipped = false;
        for (i, (t, frame)) in frames(batch).enumerate() {
            let body = &frame[5..];
            if skipped && t != tag::SYNC {
                out.extend_from_slice(frame);
                continue;
            }
            match t {
                tag::PARSE => {
                    let (name, used) = cstr(body).ok_or_else(|| bad("Parse"))?;
                    if name.is_empty() {
                        out.extend_from_slice(frame);
                        continue;
                    }
                    // A name the client has already: the Parse goes out under the shared name it
                    // has, which the server refuses (42P05), keeping the statement.
                    let existing = plan
                        .shared_name(self, name)
                        .filter(|shared| {
                            exchange.contains(&name) || self.state.statements.contains_key(*shared)
                        })
                        .cloned();
                    let shared = match existing {
                        Some(shared) => {
                            dups.push((i, !exchange.contains(&name)));
                            plan.clients.push((i, name.to_string()));
                            skipped = true;
                            shared
                        }
                        None => {
                            let shared = self.shared_name(&body[used..]);
                            plan.names.push((name.to_string(), Some(shared.clone())));
                            plan.clients.push((i, name.to_string()));
                            shared
                        }
                    };
                    exchange.push(name);
                    out.extend_from_slice(&renamed_parse(frame, &shared));
                }
                tag::SYNC => {
                    exchange.clear();
                    skipped = false;
                    out.extend_from_slice(frame);
                }
                tag::BIND => {
                    let (portal, used) = cstr(body).ok_or_else(|| bad("Bind"))?;
                    let (stmt, used2) = cstr(&body[used..]).ok_or_else(|| bad("Bind"))?;
                    match plan.shared_name(self, stmt).cloned() {
                        Some(shared) => {
                            plan.clients.push((i, stmt.to_string()));
                            out.extend_from_slice(&build_frame(
                                tag::BIND,
                                &[
                                    portal.as_bytes(),
                                    b"\0",
                                    shared.as_bytes(),
                                    b"\0",
                                    &body[used + used2..],
                                ],
                            ))
                        }
                        None => out.extend_from_slice(frame),
                    }
                }
                tag::DESCRIBE | tag::CLOSE if body.first() == Some(&b'S') => {
                    let (name, _) = cstr(&body[1..]).ok_or_else(|| bad("Describe/Close"))?;
                    let target = plan.shared_name(self, name).cloned();
                    let target = if t == tag::CLOSE && target.is_some() {
                        plan.names.push((name.to_string(), None));
                        Some(NO_STATEMENT.to_string())
                    } else {
                        if target.is_some() {
                            plan.clients.push((i, name.to_string()));
                        }
                        target
                    };
                    match target {
                        Some(target) => out
                            .extend_from_slice(&build_frame(t, &[b"S", target.as_bytes(), b"\0"])),
                        None => out.extend_from_slice(frame),
                    }
                }
                _ => out.extend_from_slice(frame),
            }
        }
        plan.renamed = Some(out);
        Ok(dups)
    }

    /// The servers where a Parse of a statement the pending batch names (Parse, Bind, Describe,
    /// Close) waits for its answer; the unnamed statement's too, when the batch uses it before
    /// parsing it.
    pub(super) fn unconfirmed_statements(&self) -> Vec<Role> {
        // Most batches find every Parse answered: no need to read their frames.
        let waiting = |role| {
            self.slot_ref(role)
                .is_some_and(|s| !s.expect.skipping && s.expect.parses_pending())
        };
        if !waiting(Role::Primary) && !waiting(Role::Replica) {
            return Vec::new();
        }
        let mut names: Vec<&str> = Vec::new();
        // Transaction mode: the shared names its named Parses go out under. One the server is
        // said to have already (another client name's Parse of the same text, unanswered) is
        // answered from a scratch statement (see `send_batch`): it must exist by then.
        let mut parsed_shared: Vec<String> = Vec::new();
        let mut unnamed = false;
        let mut parsed_unnamed = false;
        for (t, frame) in frames(&self.batch) {
            let body = &frame[5..];
            let name = match t {
                tag::PARSE => cstr(body)
                    .inspect(|&(n, used)| {
                        if self.shares_statements() && !n.is_empty() {
                            parsed_shared.push(self.shared_name(&body[used..]));
                        }
                    })
                    .map(|(n, _)| n),
                tag::BIND => cstr(body).and_then(|(_, used)| cstr(&body[used..]).map(|(n, _)| n)),
                tag::DESCRIBE | tag::CLOSE if body.first() == Some(&b'S') => {
                    cstr(&body[1..]).map(|(n, _)| n)
                }
                _ => None,
            };
            match name {
                Some("") if t == tag::PARSE => parsed_unnamed = true,
                Some("") => unnamed |= !parsed_unnamed,
                Some(n) => names.push(n),
                None => {}
            }
        }
        let on_server: Vec<&str> = names
            .iter()
            .filter_map(|&n| match self.shares_statements() {
                true => self.state.names.get(n).map(String::as_str),
                false => Some(n),
            })
            .chain(parsed_shared.iter().map(String::as_str))
            .collect();
        [Role::Primary, Role::Replica]
            .into_iter()
            // (A server skipping to a Sync after an error answers nothing before it.)
            .filter(|&role| waiting(role))
            .filter(|&role| {
                self.slot_ref(role).is_some_and(|s| {
                    unnamed && s.expect.unnamed_pending()
                        || on_server.iter().any(|n| s.expect.parse_pending(n))
                })
            })
            .collect()
    }

    /// `pgnear_` and a hash of the statement's text and parameter types (and the search_path
    /// it is planned under, which decides what its names mean).
    fn shared_name(&self, text_and_types: &[u8]) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(text_and_types);
        if let Some(sql) = self.state.setting_sql("search_path") {
            h.update(sql.as_bytes());
        }
        let digest = h.finalize();
        let mut name = String::with_capacity(39);
        name.push_str("pgnear_");
        for b in &digest[..16] {
            name.push_str(&format!("{b:02x}"));
        }
        name
    }
}

/// A renamed batch's Parses of names the client has (their places among its frames), and the
/// client's names of its other named Parses (see `BatchPlan::clients`).
pub(super) type SharedNames<'a> = (&'a [usize], &'a [(usize, String)]);

/// Sends a batch's frames. `shared`, in transaction mode (shared names): the Parses of a name
/// the client already has, which the server is to refuse, and the client's names of the others
/// (see `BatchPlan`); a Parse of another shared name that the connection has already answers as
/// a new statement would, from a scratch statement. Past `limit` statements the least recently
/// used is closed.
pub(super) fn send_batch(
    server: &mut Server,
    batch: &[u8],
    shared: Option<SharedNames<'_>>,
    limit: usize,
) {
    // After a refused Parse the server skips to the Sync: what follows is sent as it is.
    let mut skipped = false;
    let mut clients = shared.map_or(&[][..], |(_, c)| c).iter().peekable();
    for (i, (t, frame)) in frames(batch).enumerate() {
        if t == tag::SYNC {
            skipped = false;
        }
        let client = clients.next_if(|(at, _)| *at == i).map(|(_, n)| n.as_str());
        if t == tag::PARSE {
            let name = cstr(&frame[5..]).map_or("", |(n, _)| n);
            if shared.is_some_and(|(d, _)| d.contains(&i)) || skipped {
                skipped |= shared.is_some();
                server.send_client_parse(frame, client);
                continue;
            }
            if shared.is_some() && !name.is_empty() && server.has_statement(name) {
                // Another session prepared it here already: the client still gets its
                // ParseComplete (or its error), from a scratch statement dropped at once.
                server.send_scratch_parse(&renamed_parse(frame, SCRATCH_STATEMENT), name, client);
                server.send_internal_frame(tag::CLOSE, &close_frame(SCRATCH_STATEMENT));
                continue;
            }
            // Sent before it is recorded: the expectation notes whether the name existed.
            server.send_client_parse(frame, client);
            if !name.is_empty() {
                if let Some(old) = server.add_statement(name, limit) {
                    server.send_internal_frame(tag::CLOSE, &close_frame(&old));
                }
            }
            continue;
        }
        match client {
            Some(client) => server.send_client_frame_named(t, frame, client),
            None => server.send_client_frame(t, frame),
        }
    }
}

/// Parses on `server` the statements (name, the client's Parse) it lacks, closing the least
/// recently used past `limit`; whether it parsed any.
pub(super) fn prepare_missing(
    server: &mut Server,
    statements: Vec<(String, Bytes)>,
    limit: usize,
) -> bool {
    let mut parsed = false;
    for (name, parse) in statements {
        if !server.has_statement(&name) {
            server.send_internal_frame(tag::PARSE, &parse);
            if let Some(old) = server.add_statement(&name, limit) {
                server.send_internal_frame(tag::CLOSE, &close_frame(&old));
            }
            parsed = true;
        }
    }
    parsed
}

/// A Parse frame with its statement name replaced.
fn renamed_parse(frame: &[u8], name: &str) -> BytesMut {
    let body = &frame[5..];
    let rest = cstr(body).map_or(body, |(_, used)| &body[used..]);
    build_frame(tag::PARSE, &[name.as_bytes(), b"\0", rest])
}

pub(super) fn close_frame(name: &str) -> BytesMut {
    build_frame(tag::CLOSE, &[b"S", name.as_bytes(), b"\0"])
}
