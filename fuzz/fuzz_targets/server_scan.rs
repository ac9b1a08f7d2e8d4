//! The server side of the wire: `Server::scan` (through its socket-free `Reader`) matching
//! server frames against what was sent, plus the backend helpers it is built on.
//!
//! Input: one byte of pending-entry count `n`, `n` bytes choosing (message, owner), one byte for
//! the role, then server bytes fed in chunks whose sizes come from the data itself.
#![no_main]

use std::collections::VecDeque;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgnear::role::Role;
use pgnear::protocol::backend::{error_fields, first_column, header, parameter_status};
use pgnear::protocol::{cstr, frames};
use pgnear::session::expect::{Expectations, Owner, Pending, Purpose};
use pgnear::session::server::{Reader, Reported, Request, ScanError, Seen};

const PENDING: [Pending; 8] = [
    Pending::Parse,
    Pending::Bind,
    Pending::Close,
    Pending::Describe,
    Pending::Execute,
    Pending::FunctionCall,
    Pending::Sync,
    Pending::Query,
];

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16);
    if rest.len() < n + 1 {
        return;
    }
    let (choices, rest) = rest.split_at(n);
    let role = if rest[0] & 1 == 0 {
        Role::Primary
    } else {
        Role::Replica
    };
    let chunk = 1 + usize::from(rest[0] >> 1);
    let server = &rest[1..];

    let mut expect = Expectations::default();
    let mut requests = VecDeque::new();
    for &c in choices {
        let p = PENDING[usize::from(c & 7)];
        let owner = match (c >> 3) % 4 {
            0 => Owner::Client,
            1 => Owner::Tentative,
            2 => Owner::Internal(Purpose::WriteLsn),
            _ => Owner::Internal(Purpose::Sync),
        };
        expect.push(p, owner);
        if owner.is_client() && matches!(p, Pending::Query | Pending::Sync) {
            requests.push_back(Request {
                retry: (owner == Owner::Tentative).then(|| bytes::Bytes::from_static(b"Q")),
                ..Request::default()
            });
        }
    }

    let mut reader = Reader::default();
    let mut tx = b'I';
    let mut cout = BytesMut::new();
    let mut seen = Seen::default();
    let (mut server_params, mut told) = (Vec::new(), Vec::new());
    let mut fed = 0;
    for piece in server.chunks(chunk) {
        reader.feed(piece);
        fed += piece.len();
        match reader.scan(
            role,
            &mut expect,
            &mut tx,
            &mut requests,
            Reported {
                server: &mut server_params,
                told: Some(&mut told),
            },
            &mut cout,
            &mut seen,
        ) {
            Ok(()) => {}
            Err(ScanError::Malformed | ScanError::Fatal(_)) => break,
        }
        // Nothing is made up: what goes to the client is at most what the server sent.
        assert!(cout.len() <= fed);
    }

    // The helpers on their own, on the same bytes.
    let _ = header(server);
    let _ = cstr(server);
    for (_, f) in frames(server) {
        let body = &f[5..];
        let e = error_fields(body);
        assert!(!e.code.contains('\0') && !e.message.contains('\0'));
        if let Some((k, v)) = parameter_status(body) {
            assert!(k.len() + v.len() + 2 <= body.len());
        }
        if let Some(c) = first_column(body) {
            assert!(c.len() + 6 <= body.len());
        }
    }
});
