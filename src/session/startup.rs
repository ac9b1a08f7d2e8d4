//! The client handshake: SSL/GSSENC negotiation, cancel requests, the startup packet, protocol
//! version negotiation and authentication. Ends with an authenticated client and its parameters.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::backend::conn::send_cancel;
use crate::error::PgError;
use crate::protocol::frontend::{read_startup_packet, Startup, StartupPacket};
use crate::protocol::write;
use crate::session::Shared;
use crate::tls::Stream;

/// What the handshake ended with.
pub enum Handshake {
    /// An authenticated client, ready for its server connection, and how pgnear logs in
    /// upstream as its role.
    Ready(Startup, std::sync::Arc<crate::backend::login::Login>),
    /// A cancel request was handled, or the client left before finishing startup.
    Done,
}

/// Runs the handshake on `slot` (the stream is replaced when TLS is negotiated).
/// Not cancel-safe; the caller bounds it with `startup_timeout`.
///
/// `read_startup` turns true once the startup packet has been read (a timeout before that is
/// silent, as in Postgres; after it, during authentication, the client is told).
pub async fn handshake(
    shared: &Shared,
    slot: &mut Option<Stream>,
    read_startup: &mut bool,
) -> Result<Handshake, PgError> {
    let mut ssl_done = false;
    let mut gss_done = false;
    loop {
        let stream = slot.as_mut().expect("stream present during handshake");
        let Some(packet) = read_startup_packet(stream).await? else {
            return Ok(Handshake::Done);
        };
        match packet {
            StartupPacket::SslRequest if !ssl_done => {
                ssl_done = true;
                let Some(tls) = shared.tls.clone() else {
                    reply(stream, b"N").await?;
                    continue;
                };
                reply(stream, b"S").await?;
                let Some(Stream::Plain(tcp)) = slot.take() else {
                    return Err(PgError::protocol("SSLRequest on an encrypted connection"));
                };
                let accepted = tokio_rustls::TlsAcceptor::from(tls)
                    .accept(tcp)
                    .await
                    .map_err(|e| PgError::protocol(format!("TLS handshake failed: {e}")))?;
                *slot = Some(Stream::Server(Box::new(accepted)));
            }
            StartupPacket::GssEncRequest if !gss_done => {
                gss_done = true;
                reply(stream, b"N").await?;
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                return Err(PgError::protocol("encryption negotiation requested twice"));
            }
            StartupPacket::Cancel { pid, secret } => {
                forward_cancel(shared, pid, &secret).await;
                // Close as Postgres does: over TLS with close_notify. libpq 17+ sends cancels
                // over TLS and reports a bare EOF as a failed cancel.
                let _ = stream.shutdown().await;
                return Ok(Handshake::Done);
            }
            StartupPacket::Startup(startup) => {
                *read_startup = true;
                let mut out = BytesMut::new();
                let unsupported: Vec<String> = startup
                    .params
                    .iter()
                    .filter(|(k, _)| k.starts_with("_pq_."))
                    .map(|(k, _)| k.clone())
                    .collect();
                if startup.minor > 0 || !unsupported.is_empty() {
                    write::negotiate_protocol_version(&mut out, unsupported);
                    stream
                        .write_all(&out)
                        .await
                        .map_err(|e| PgError::protocol(format!("client connection lost: {e}")))?;
                }
                let user = startup.get("user").unwrap_or_default().to_string();
                let login = shared.auth.authenticate(stream, &user).await?;
                return Ok(Handshake::Ready(startup, login));
            }
        }
    }
}

/// Sends a client's CancelRequest on to the server running its query, if the key is valid.
pub async fn forward_cancel(shared: &Shared, pid: i32, secret: &[u8]) {
    match shared.cancels.lookup(pid, secret) {
        Some(t) => {
            tracing::debug!(server = %t.addr, "forwarding cancel request");
            send_cancel(
                t.addr,
                t.pid,
                &t.secret,
                shared.config.upstream.connect_timeout.0,
            )
            .await;
        }
        None => tracing::debug!("cancel request for an unknown or idle key ignored"),
    }
}

async fn reply(stream: &mut Stream, byte: &[u8]) -> Result<(), PgError> {
    stream
        .write_all(byte)
        .await
        .map_err(|e| PgError::protocol(format!("client connection lost: {e}")))
}
