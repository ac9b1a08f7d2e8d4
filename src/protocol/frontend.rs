//! Client-to-pgnear: startup packets and regular frames.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::cstr;
use crate::error::PgError;

pub const SSL_REQUEST: u32 = 80877103;
pub const GSSENC_REQUEST: u32 = 80877104;
pub const CANCEL_REQUEST: u32 = 80877102;
/// Postgres' own limit for a startup packet.
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// The first packet a client sends (before any tagged frame).
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: Vec<u8> },
    Startup(Startup),
}

#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Startup {
    pub minor: u16,
    /// Every parameter in the order sent, `_pq_.` options included.
    pub params: Vec<(String, String)>,
}

impl Startup {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one startup-phase packet (length-prefixed, no tag).
/// Not cancel-safe: a partial read is lost if the future is dropped.
pub async fn read_startup_packet<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<StartupPacket>, PgError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(PgError::protocol(format!("reading startup packet: {e}")).silent()),
    }
    // Like Postgres, a packet that cannot be read is only logged: the connection closes
    // without an answer (a client that connects and ends at once sends Terminate first).
    let len = u32::from_be_bytes(len) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(PgError::protocol(format!("invalid length of startup packet: {len}")).silent());
    }
    let mut body = vec![0u8; len - 4];
    r.read_exact(&mut body)
        .await
        .map_err(|_| PgError::protocol("incomplete startup packet").silent())?;
    parse_startup_body(&body).map(Some)
}

/// Parses the body of a startup packet (after the length).
pub fn parse_startup_body(body: &[u8]) -> Result<StartupPacket, PgError> {
    let head: [u8; 4] = body
        .get(..4)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| PgError::protocol("short startup packet"))?;
    let code = u32::from_be_bytes(head);
    let rest = &body[4..];
    match code {
        SSL_REQUEST if rest.is_empty() => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST if rest.is_empty() => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST if rest.len() >= 8 && rest.len() <= 260 => Ok(StartupPacket::Cancel {
            pid: i32::from_be_bytes(rest[..4].try_into().expect("4 bytes")),
            secret: rest[4..].to_vec(),
        }),
        CANCEL_REQUEST => {
            Err(PgError::protocol("invalid length of cancel request packet").silent())
        }
        SSL_REQUEST | GSSENC_REQUEST => Err(PgError::protocol("malformed SSL or GSSENC request")),
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(PgError::protocol(format!(
                    "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
                )));
            }
            let mut params = Vec::new();
            let mut pos = 0;
            loop {
                let (key, used) = cstr(&rest[pos..]).ok_or_else(|| {
                    PgError::protocol(
                        "invalid startup packet layout: expected terminator as last byte",
                    )
                })?;
                pos += used;
                if key.is_empty() {
                    break;
                }
                let (value, used) = cstr(&rest[pos..]).ok_or_else(|| {
                    PgError::protocol(
                        "invalid startup packet layout: expected terminator as last byte",
                    )
                })?;
                pos += used;
                params.push((key.to_string(), value.to_string()));
            }
            if pos != rest.len() {
                return Err(PgError::protocol(
                    "invalid startup packet layout: expected terminator as last byte",
                ));
            }
            let startup = Startup { minor, params };
            if startup.get("user").is_none_or(str::is_empty) {
                return Err(PgError::protocol(
                    "no PostgreSQL user name specified in startup packet",
                ));
            }
            if startup
                .get("replication")
                .is_some_and(|v| v != "false" && v != "0" && v != "off")
            {
                return Err(PgError::protocol(
                    "replication connections are not supported by pgnear",
                ));
            }
            Ok(StartupPacket::Startup(startup))
        }
    }
}

/// Tags of the messages a client may send after startup.
pub const MESSAGE_TAGS: &[u8] = b"QPBDECSHFdcfX";

/// The next complete frame in `buf`: (tag, total length including tag).
/// `Ok(None)` means more bytes are needed. An unknown tag is refused at once, as by Postgres,
/// without waiting for the body its length field announces.
pub fn next_frame(buf: &BytesMut, max: usize) -> Result<Option<(u8, usize)>, PgError> {
    if let Some(&t) = buf.first().filter(|t| !MESSAGE_TAGS.contains(t)) {
        return Err(PgError::protocol(format!(
            "invalid frontend message type {t}"
        )));
    }
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(PgError::protocol(format!("invalid message length {len}")));
    }
    if len > max {
        return Err(PgError::protocol(format!(
            "message of {len} bytes exceeds proxy.max_message_size ({max})"
        )));
    }
    if buf.len() < len + 1 {
        return Ok(None);
    }
    Ok(Some((buf[0], len + 1)))
}

/// The query text of a Query frame body.
pub fn query_text(body: &[u8]) -> Result<std::borrow::Cow<'_, str>, PgError> {
    super::sql_text(body)
        .map(|(s, _)| s)
        .ok_or_else(|| PgError::protocol("invalid Query message"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)], version: u32) -> Vec<u8> {
        let mut body = version.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    #[test]
    fn startup_packets() {
        let p =
            parse_startup_body(&startup(&[("user", "app"), ("database", "db")], 196608)).unwrap();
        let StartupPacket::Startup(s) = p else {
            panic!()
        };
        assert_eq!(
            (s.minor, s.get("user"), s.get("database")),
            (0, Some("app"), Some("db"))
        );
        let p = parse_startup_body(&startup(&[("user", "a"), ("_pq_.x", "1")], 196610)).unwrap();
        let StartupPacket::Startup(s) = p else {
            panic!()
        };
        assert_eq!(s.minor, 2);
        assert_eq!(
            parse_startup_body(&SSL_REQUEST.to_be_bytes()).unwrap(),
            StartupPacket::SslRequest
        );
        let mut cancel = CANCEL_REQUEST.to_be_bytes().to_vec();
        cancel.extend_from_slice(&7i32.to_be_bytes());
        cancel.extend_from_slice(&9i32.to_be_bytes());
        assert_eq!(
            parse_startup_body(&cancel).unwrap(),
            StartupPacket::Cancel {
                pid: 7,
                secret: 9i32.to_be_bytes().to_vec()
            }
        );
    }

    #[test]
    fn bad_startup_packets_are_protocol_errors() {
        let bad: Vec<Vec<u8>> = vec![
            startup(&[("database", "db")], 196608), // no user
            startup(&[("user", "")], 196608),       // empty user
            startup(&[("user", "a")], 2 << 16),     // protocol 2
            {
                let mut b = startup(&[("user", "a")], 196608);
                b.pop(); // unterminated
                b
            },
            {
                let mut b = startup(&[("user", "a")], 196608);
                b.extend_from_slice(b"junk");
                b
            },
            vec![0, 0, 0],
            {
                let mut b = SSL_REQUEST.to_be_bytes().to_vec();
                b.push(1);
                b
            },
            startup(&[("user", "a"), ("replication", "true")], 196608),
        ];
        for b in bad {
            let e = parse_startup_body(&b).unwrap_err();
            assert_eq!(e.sqlstate(), "08P01", "{b:?}");
        }
    }

    #[test]
    fn frames() {
        let mut b = BytesMut::from(&b"Q\0\0\0\x09abcd\0X"[..]);
        assert_eq!(next_frame(&b, 1024).unwrap(), Some((b'Q', 10)));
        let _ = b.split_to(10);
        assert_eq!(next_frame(&b, 1024).unwrap(), None);
        let b = BytesMut::from(&b"Q\0\0\0\x02"[..]);
        assert!(next_frame(&b, 1024).is_err());
        let b = BytesMut::from(&b"Q\x7f\xff\xff\xff"[..]);
        assert!(next_frame(&b, 1024).is_err());
        // an unknown tag is refused before its length, let alone its body, has arrived
        for junk in [&b"\0"[..], b"Z\0\0\0\x05", b"p\0\0\x08\0"] {
            assert!(
                next_frame(&BytesMut::from(junk), 1 << 20).is_err(),
                "{junk:?}"
            );
        }
    }
}
