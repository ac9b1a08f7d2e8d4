//! The wire: startup packets and frames from clients, frame headers from servers, and the few
//! messages pgnear writes itself. Only what routing needs is decoded.

pub mod backend;
pub mod frontend;
pub mod write;

/// Frontend message tags pgnear looks at.
pub mod tag {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const TERMINATE: u8 = b'X';
    pub const PASSWORD: u8 = b'p';
}

/// Reads one whole tagged frame from `stream` (through `buf`, which keeps any bytes after it):
/// its tag and its body. `UnexpectedEof` when the peer closes first, `InvalidData` for a length
/// field under 4 or a frame longer than `max` bytes. Cancel-safe: partial input stays in `buf`.
pub async fn read_frame<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut bytes::BytesMut,
    max: usize,
) -> std::io::Result<(u8, bytes::BytesMut)> {
    use bytes::Buf;
    use std::io::{Error, ErrorKind};
    use tokio::io::AsyncReadExt;
    loop {
        if let Some((tag, len)) = backend::header(buf) {
            if len < 5 || len > max {
                return Err(Error::new(
                    ErrorKind::InvalidData,
                    format!("invalid message length {}", len - 1),
                ));
            }
            if buf.len() >= len {
                let mut frame = buf.split_to(len);
                frame.advance(5);
                return Ok((tag, frame));
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(Error::new(ErrorKind::UnexpectedEof, "connection closed"));
        }
    }
}

/// Reads a NUL-terminated string at the start of `buf`: (string, bytes consumed).
pub fn cstr(buf: &[u8]) -> Option<(&str, usize)> {
    let end = buf.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&buf[..end]).ok()?;
    Some((s, end + 1))
}

/// A NUL-terminated SQL text at the start of `buf` and the bytes it used. Text in a client
/// encoding other than UTF-8 (LATIN1, WIN1252, ...) is read with its non-UTF-8 bytes replaced:
/// what the classifier looks at (keywords, quotes, punctuation) is ASCII in every client
/// encoding Postgres accepts, and the text sent on is always the client's own bytes.
pub fn sql_text(buf: &[u8]) -> Option<(std::borrow::Cow<'_, str>, usize)> {
    let end = buf.iter().position(|&b| b == 0)?;
    let text = match std::str::from_utf8(&buf[..end]) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(&buf[..end]),
    };
    Some((text, end + 1))
}

/// Iterates over whole tagged frames laid end to end in `buf` (already validated as complete):
/// (tag, the whole frame). Stops at anything short or malformed.
pub fn frames(buf: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let (tag, len) = backend::header(rest)?;
        if len < 5 || len > rest.len() {
            return None;
        }
        let (frame, tail) = rest.split_at(len);
        rest = tail;
        Some((tag, frame))
    })
}

/// A message built from its tag and the parts of its body.
pub fn build_frame(tag: u8, parts: &[&[u8]]) -> bytes::BytesMut {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = bytes::BytesMut::with_capacity(len + 5);
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&((len + 4) as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn frames_iterates_and_stops_at_garbage() {
        let buf = b"P\0\0\0\x05xS\0\0\0\x04Q\0\0";
        let got: Vec<(u8, usize)> = super::frames(buf).map(|(t, f)| (t, f.len())).collect();
        assert_eq!(got, vec![(b'P', 6), (b'S', 5)]);
        assert_eq!(super::frames(b"X\0\0\0\x01").count(), 0);
    }
}
