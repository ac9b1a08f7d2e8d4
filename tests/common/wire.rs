//! Raw protocol helpers: frontend messages built by hand, backend frames read and taken apart.
//! Re-exported by `common`, so test binaries use them as `common::*`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest a raw connection may take to answer (a frame, a close) before it counts as a hang.
pub const HANG: Duration = Duration::from_secs(15);

/// `s` with its terminating NUL.
pub fn cstring(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// One frontend message: tag, length, body.
pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![tag];
    f.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// A frame header with an arbitrary length field.
pub fn header(tag: u8, len: u32) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend(len.to_be_bytes());
    v
}

/// A startup packet (length, protocol version, NUL-separated parameters).
pub fn startup_packet(params: &[(&str, &str)], version: u32) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

/// A simple Query.
pub fn query_msg(sql: &str) -> Vec<u8> {
    frame(b'Q', &cstring(sql))
}

/// A Parse of `sql` as statement `name`, with no parameter types given.
pub fn parse_msg(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstring(name);
    b.extend(cstring(sql));
    b.extend(0i16.to_be_bytes());
    frame(b'P', &b)
}

/// A Bind of statement `stmt` to `portal`, parameters and results in text.
pub fn bind_msg(portal: &str, stmt: &str, params: &[&str]) -> Vec<u8> {
    let mut b = cstring(portal);
    b.extend(cstring(stmt));
    b.extend(0i16.to_be_bytes()); // all parameters in text
    b.extend((params.len() as i16).to_be_bytes());
    for p in params {
        b.extend((p.len() as i32).to_be_bytes());
        b.extend(p.as_bytes());
    }
    b.extend(0i16.to_be_bytes()); // all results in text
    frame(b'B', &b)
}

/// An Execute of `portal`, without a row limit.
pub fn execute_msg(portal: &str) -> Vec<u8> {
    let mut b = cstring(portal);
    b.extend(0i32.to_be_bytes());
    frame(b'E', &b)
}

/// A Describe of a statement (`kind` `S`) or a portal (`P`).
pub fn describe_msg(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend(cstring(name));
    frame(b'D', &b)
}

/// A Sync.
pub fn sync_msg() -> Vec<u8> {
    frame(b'S', &[])
}

/// Backend frames laid end to end in `bytes`: (tag, body). Leading one-byte `N`/`S` answers (to
/// SSLRequest/GSSENCRequest) are skipped; parsing stops at anything incomplete or malformed.
pub fn backend_frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    fn parse(mut rest: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
        let mut out = Vec::new();
        while rest.len() >= 5 {
            let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            if !(4..=1 << 24).contains(&len) || rest.len() < len + 1 {
                return if out.is_empty() { None } else { Some(out) };
            }
            out.push((rest[0], rest[5..len + 1].to_vec()));
            rest = &rest[len + 1..];
        }
        Some(out)
    }
    // Up to two one-byte answers (GSSENC and SSL declined) may come first.
    for skip in 0..=2.min(bytes.len()) {
        if !bytes[..skip].iter().all(|b| matches!(b, b'N' | b'S')) {
            break;
        }
        match parse(&bytes[skip..]) {
            Some(f) if !f.is_empty() || skip == bytes.len() => return f,
            _ => {}
        }
    }
    Vec::new()
}

/// A field (`C` for the SQLSTATE, `M` for the message) of an ErrorResponse body.
pub fn error_field(body: &[u8], field: u8) -> Option<String> {
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let end = i + 1 + body[i + 1..].iter().position(|&b| b == 0)?;
        if body[i] == field {
            return Some(String::from_utf8_lossy(&body[i + 1..end]).into_owned());
        }
        i = end + 1;
    }
    None
}

/// The SQLSTATE of every ErrorResponse among `frames`.
pub fn error_codes(frames: &[(u8, Vec<u8>)]) -> Vec<String> {
    frames
        .iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| error_field(b, b'C').unwrap_or_default())
        .collect()
}

/// The tags of `frames`, without ParameterStatus (`S`), which may come at any time: pgnear
/// reports `pgnear.write_lsn` behind any statement that went to the primary outside a
/// transaction, even one that failed (the lookup is pipelined before the outcome is known).
pub fn tags(frames: &[(u8, Vec<u8>)]) -> String {
    frames
        .iter()
        .filter(|(t, _)| *t != b'S')
        .map(|(t, _)| *t as char)
        .collect()
}

/// The next backend frame on `s`: (tag, body), however long it takes (the test's own bound,
/// `run`'s, still applies).
pub async fn next_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.expect("a backend frame");
    let len = u32::from_be_bytes(head[1..].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.unwrap();
    (head[0], body)
}

/// The next backend frame on `s`: (tag, body). Panics when none comes within [`HANG`].
pub async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    tokio::time::timeout(HANG, next_frame(s))
        .await
        .unwrap_or_else(|_| panic!("no backend frame within {HANG:?}"))
}

/// Reads backend frames until one with `tag`: every (tag, body) seen, that one included.
pub async fn frames_until(s: &mut TcpStream, tag: u8) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let f = next_frame(s).await;
        let done = f.0 == tag;
        out.push(f);
        if done {
            return out;
        }
    }
}

/// Reads backend frames until one with `tag`; returns the tags seen (that one included).
pub async fn read_until(s: &mut TcpStream, tag: u8) -> Vec<u8> {
    frames_until(s, tag)
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

/// Frames up to and including the next ReadyForQuery, each within [`HANG`].
pub async fn until_ready(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let f = read_frame(s).await;
        let done = f.0 == b'Z';
        out.push(f);
        if done {
            return out;
        }
    }
}

/// Reads until EOF (or a reset) within `limit`: the bytes, and whether the peer closed.
pub async fn read_to_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Connects, sends `bytes` (write errors ignored: the peer may already have closed), optionally
/// half-closes, and reads to the close. Panics when there is no close within [`HANG`].
pub async fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool, what: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let (out, closed) = read_to_close(&mut s, HANG).await;
    assert!(closed, "{what}: no close within {HANG:?}; got {out:?}");
    out
}
