//! The accept loop: connection limit, per-client task with its tracing span, startup timeout,
//! and graceful shutdown (stop accepting, let sessions finish, wait for them).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::error::{ErrorKind, PgError};
use crate::protocol::frontend::{read_startup_packet, StartupPacket};
use crate::protocol::write;
use crate::session::startup::{forward_cancel, handshake, Handshake};
use crate::session::Session;
use crate::session::Shared;
use crate::tls::Stream;

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// How long a client over the connection limit has to send its first packet.
const OVER_LIMIT_WAIT: Duration = Duration::from_secs(1);

/// Pause after a failed accept (out of file descriptors and the like), instead of spinning.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts clients until shutdown, then waits for every session to end.
pub async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(shared.config.proxy.max_client_connections));
    let mut sessions = JoinSet::new();
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                tcp.set_nodelay(true).ok();
                let shared = shared.clone();
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tokio::spawn(over_limit(shared, tcp));
                    continue;
                };
                let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
                let span = tracing::info_span!("session", id, %peer, user = tracing::field::Empty, database = tracing::field::Empty, application_name = tracing::field::Empty);
                sessions.spawn(async move {
                    let _permit = permit;
                    serve(shared, tcp, peer).await;
                }.instrument(span));
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = shutdown.stopped() => break,
        }
    }
    drop(listener);
    tracing::info!(
        sessions = sessions.len(),
        "stopped accepting; waiting for sessions to finish"
    );
    while sessions.join_next().await.is_some() {}
}

/// A client over `proxy.max_client_connections`: no TLS, no authentication, no session. Its
/// first packet is read (within `OVER_LIMIT_WAIT`), so that a plain CancelRequest still
/// works, and so that the socket does not close with the client's bytes unread (that would
/// reset the connection, and the client could lose the refusal); whatever it was (SSLRequest
/// or startup packet), the answer is 53300, which libpq reports in both cases.
async fn over_limit(shared: Arc<Shared>, tcp: TcpStream) {
    let mut stream = Stream::Plain(tcp);
    let first = tokio::time::timeout(OVER_LIMIT_WAIT, read_startup_packet(&mut stream)).await;
    if let Ok(Ok(Some(StartupPacket::Cancel { pid, secret }))) = first {
        forward_cancel(&shared, pid, &secret).await;
        return;
    }
    let e = PgError::new(ErrorKind::Capacity, "sorry, too many clients already")
        .with_detail("proxy.max_client_connections reached");
    refuse(&shared, Some(stream), e).await;
}

async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let metrics = shared.metrics.clone();
    let _counted = crate::metrics::ClientGuard::new(&metrics);
    let mut slot = Some(Stream::Plain(tcp));
    let timeout = shared.config.proxy.startup_timeout.0;
    // Startup and the session's first steps are boxed: they run once, and unboxed their
    // futures would enlarge every idle session's task for its whole life.
    let mut read_startup = false;
    let handshake = handshake(&shared, &mut slot, &mut read_startup);
    let outcome = Box::pin(tokio::time::timeout(timeout, handshake)).await;
    let (startup, login) = match outcome {
        Ok(Ok(Handshake::Ready(startup, login))) => (startup, login),
        Ok(Ok(Handshake::Done)) => return,
        Ok(Err(e)) => return Box::pin(refuse(&shared, slot, e)).await,
        Err(_) => {
            let e = PgError::protocol("startup timed out (proxy.startup_timeout)");
            let e = if read_startup { e } else { e.silent() };
            return Box::pin(refuse(&shared, slot, e)).await;
        }
    };
    let span = tracing::Span::current();
    span.record("user", startup.get("user").unwrap_or_default());
    span.record("database", startup.get("database").unwrap_or_default());
    span.record(
        "application_name",
        startup.get("application_name").unwrap_or_default(),
    );
    let stream = slot.expect("stream present after a successful handshake");
    let _role = metrics.role_client(&login.user);
    tracing::debug!(%peer, "client authenticated");
    match Box::pin(Session::establish(shared.clone(), stream, startup, login)).await {
        Ok(session) => session.run().await,
        Err((stream, e)) => Box::pin(refuse(&shared, Some(stream), e)).await,
    }
}

/// Tells the client why it cannot continue and closes the connection.
async fn refuse(shared: &Shared, slot: Option<Stream>, e: PgError) {
    tracing::info!(error = %e, kind = e.kind.label(), "client refused");
    shared.metrics.error(e.kind);
    shared.metrics.rejected(e.kind.label());
    if let Some(mut stream) = slot {
        if e.silent {
            return;
        }
        let mut out = BytesMut::new();
        write::error_response(&mut out, &e);
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    }
}
