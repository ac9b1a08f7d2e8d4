//! One server connection: TCP (+ TLS per `sslmode`), startup, authentication
//! (trust, cleartext, md5, SCRAM-SHA-256), then the server's parameters and key.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::login::KeyClient;
use super::login::{Login, Secret};
use crate::discovery::Discovery;
use crate::error::{ErrorKind, PgError};
use crate::protocol::backend::{self as be, error_fields};
use crate::role::Role;
use crate::tls::Stream;
use crate::upstream_url::{SslMode, UpstreamUrl};

/// Everything needed to open server connections to one upstream.
pub struct Upstream {
    pub role: Role,
    pub url: UpstreamUrl,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    /// How pgnear logs in as the URL's role.
    pub login: Arc<Login>,
    /// Where each host of the URL is now (DNS discovery; fixed for an IP literal), in the
    /// URL's order.
    pub dns: Vec<Arc<Discovery>>,
    /// Which of the hosts' addresses takes this upstream's connections (for the primary: the
    /// one not in recovery, as the probe found it; see `health`).
    pub chosen: Mutex<Chosen>,
    /// Woken when a connect fails: the probe checks the hosts' roles at once.
    pub recheck: tokio::sync::Notify,
}

/// Which addresses a new connection may go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// The chosen one (or all in order while none is): a session's connection.
    Chosen,
    /// All in order, whatever is chosen: the replica watcher looking for a replica.
    Any,
    /// This one only: the probe asking one host what it is.
    Only(SocketAddr),
}

/// Which address of an upstream's hosts its connections go to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Chosen {
    /// Not known yet: the addresses are tried in order.
    #[default]
    Unknown,
    At(SocketAddr),
    /// Every host that answered is in recovery: no primary.
    Nowhere,
    /// Two hosts claim to be the primary and nothing tells them apart (split brain).
    Conflict(SocketAddr, SocketAddr),
}

/// The client side of a SCRAM exchange: with the URL's password, or with a verifier's keys.
enum Scram {
    Password(ScramSha256),
    Keys(KeyClient),
}

/// An authenticated server connection, ready for queries.
pub struct ServerConn {
    pub stream: Stream,
    pub addr: SocketAddr,
    /// ParameterStatus values the server sent during startup, in order.
    pub params: Vec<(String, String)>,
    pub pid: i32,
    pub secret: Vec<u8>,
}

impl Upstream {
    pub fn new(
        role: Role,
        url: UpstreamUrl,
        tls: Option<Arc<rustls::ClientConfig>>,
        connect_timeout: Duration,
        dns: Vec<Arc<Discovery>>,
    ) -> Upstream {
        Upstream {
            role,
            login: Arc::new(Login::of_url(&url)),
            url,
            tls,
            connect_timeout,
            dns,
            chosen: Mutex::new(Chosen::Unknown),
            recheck: tokio::sync::Notify::new(),
        }
    }

    fn fail(&self, what: impl std::fmt::Display) -> PgError {
        PgError::upstream(format!(
            "{} upstream {} unavailable: {what}",
            self.role.name(),
            self.url.host_list()
        ))
    }

    pub fn chosen(&self) -> Chosen {
        *self.chosen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records which address takes the upstream's connections; the previous choice.
    pub fn choose(&self, chosen: Chosen) -> Chosen {
        std::mem::replace(
            &mut *self.chosen.lock().unwrap_or_else(|p| p.into_inner()),
            chosen,
        )
    }

    /// Whether `addr` is still in a host's DNS answer: a long-lived connection to an address
    /// that left it talks to a server that no longer is this upstream.
    pub fn in_dns(&self, addr: SocketAddr) -> bool {
        self.dns.iter().any(|d| d.is_current(addr))
    }

    /// Whether a connection to `addr` may serve this upstream's sessions: in DNS, and the
    /// chosen address when one is (a standby among the primary's hosts gets no writes).
    pub fn takes(&self, addr: SocketAddr) -> bool {
        self.in_dns(addr)
            && match self.chosen() {
                Chosen::Unknown => true,
                Chosen::At(a) => a == addr,
                Chosen::Nowhere | Chosen::Conflict(..) => false,
            }
    }

    /// The current DNS answers of every host, in the URL's order (empty before the first).
    pub fn current_addrs(&self) -> Vec<SocketAddr> {
        self.dns.iter().flat_map(|d| d.current()).collect()
    }

    /// Every host's addresses, in the URL's order, each with its host's index. A host that
    /// cannot be resolved is left out while another can.
    pub async fn resolve(&self) -> Result<Vec<(usize, SocketAddr)>, PgError> {
        let mut addrs = Vec::new();
        let mut errors = Vec::new();
        for (i, dns) in self.dns.iter().enumerate() {
            match dns.addrs().await {
                Ok(a) => addrs.extend(a.iter().map(|&a| (i, a))),
                Err(e) => errors.push(format!("{}: {e}", self.url.hosts[i])),
            }
        }
        if addrs.is_empty() {
            return Err(self.fail(format!("cannot resolve host: {}", errors.join("; "))));
        }
        Ok(addrs)
    }

    /// The addresses a session's connection may go to: the chosen one, or all in order.
    async fn candidates(&self) -> Result<Vec<(usize, SocketAddr)>, PgError> {
        let addrs = self.resolve().await?;
        match self.chosen() {
            Chosen::Unknown => Ok(addrs),
            Chosen::At(a) => Ok(addrs.into_iter().filter(|&(_, x)| x == a).collect()),
            Chosen::Nowhere => Err(self
                .fail("no host is a primary: every one that answers is in recovery")
                .with_detail("Writes wait for a primary among the hosts (a promotion).")),
            Chosen::Conflict(a, b) => Err(self
                .fail(format!(
                    "{a} and {b} both claim to be the primary on the same timeline (split brain)"
                ))
                .with_detail("Writes are refused until one of them is no longer a primary.")),
        }
    }

    /// Opens a TCP connection to the first address `pick` allows that answers
    /// within `connect_timeout`. A failed address makes discovery look its host up again, and
    /// the addresses that brings are tried too (discovery rate-limits lookups, so this is at
    /// most one more round). Returns the host's index too (its name is the TLS server name).
    async fn tcp(&self, pick: Pick) -> Result<(TcpStream, SocketAddr, usize), PgError> {
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        for round in 0..2 {
            let addrs = match pick {
                Pick::Only(addr) => self
                    .resolve()
                    .await
                    .map(|all| all.into_iter().filter(|&(_, a)| a == addr).collect()),
                Pick::Any => self.resolve().await,
                Pick::Chosen => self.candidates().await,
            };
            let addrs = match addrs {
                Ok(addrs) => addrs,
                Err(e) if round == 0 => return Err(e),
                Err(_) => break,
            };
            let untried: Vec<(usize, SocketAddr)> = addrs
                .into_iter()
                .filter(|(_, a)| !tried.contains(a))
                .collect();
            if untried.is_empty() {
                break;
            }
            for (host, addr) in untried {
                tried.push(addr);
                match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(s)) => {
                        s.set_nodelay(true).ok();
                        give_up_on_silent_paths(&s, self.connect_timeout);
                        return Ok((s, addr, host));
                    }
                    Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
                    Err(_) => failures.push(format!(
                        "{addr}: connect timed out after {:?}",
                        self.connect_timeout
                    )),
                }
                self.dns[host].connect_failed(addr);
            }
        }
        if pick == Pick::Chosen {
            // Maybe another host is the primary now.
            self.recheck.notify_one();
        }
        Err(self.fail(if failures.is_empty() {
            "no address".to_string()
        } else {
            failures.join("; ")
        }))
    }

    /// Connects and authenticates as `login`. `params` are startup parameters to pass on
    /// (application_name, options, client_encoding, ...).
    pub async fn connect(
        &self,
        login: &Login,
        database: &str,
        params: &[(String, String)],
    ) -> Result<ServerConn, PgError> {
        self.connect_to(Pick::Chosen, login, database, params).await
    }

    /// `connect`, to the addresses `pick` allows.
    pub async fn connect_to(
        &self,
        pick: Pick,
        login: &Login,
        database: &str,
        params: &[(String, String)],
    ) -> Result<ServerConn, PgError> {
        let (tcp, addr, host) = self.tcp(pick).await?;
        let handshake = async {
            let stream = self.negotiate_tls(tcp, &self.url.hosts[host].name).await?;
            self.startup(stream, addr, login, database, params).await
        };
        tokio::time::timeout(self.connect_timeout * 2, handshake)
            .await
            .map_err(|_| self.fail("startup and authentication timed out"))?
    }

    async fn negotiate_tls(&self, mut tcp: TcpStream, host: &str) -> Result<Stream, PgError> {
        let Some(config) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let mut req = BytesMut::new();
        frontend::ssl_request(&mut req);
        tcp.write_all(&req).await.map_err(|e| self.fail(e))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| self.fail(e))?;
        if answer[0] != b'S' {
            if self.url.sslmode == SslMode::Prefer {
                return Ok(Stream::Plain(tcp));
            }
            return Err(self.fail(format!(
                "server does not support TLS (sslmode={:?})",
                self.url.sslmode
            )));
        }
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| self.fail("host is not a valid TLS server name"))?;
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| self.fail(format!("TLS handshake: {e}")))?;
        Ok(Stream::Client(Box::new(tls)))
    }

    async fn startup(
        &self,
        mut stream: Stream,
        addr: SocketAddr,
        login: &Login,
        database: &str,
        params: &[(String, String)],
    ) -> Result<ServerConn, PgError> {
        let mut out = BytesMut::new();
        let mut startup: Vec<(&str, &str)> = vec![("user", &login.user), ("database", database)];
        startup.extend(
            params
                .iter()
                .filter(|(k, _)| k != "user" && k != "database" && !k.starts_with("_pq_."))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        frontend::startup_message(startup, &mut out).map_err(|e| self.fail(e))?;
        stream.write_all(&out).await.map_err(|e| self.fail(e))?;

        let mut buf = BytesMut::with_capacity(1024);
        let mut scram: Option<Scram> = None;
        let mut conn = ServerConn {
            stream,
            addr,
            params: Vec::new(),
            pid: 0,
            secret: Vec::new(),
        };
        loop {
            let (tag, body) = self.read_frame(&mut conn.stream, &mut buf).await?;
            match tag {
                be::AUTHENTICATION => {
                    if body.len() < 4 {
                        return Err(self.fail("malformed authentication request"));
                    }
                    let code = u32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
                    out.clear();
                    match code {
                        0 => continue,
                        3 => frontend::password_message(self.password(login)?.as_bytes(), &mut out)
                            .map_err(|e| self.fail(e))?,
                        5 => {
                            let salt: [u8; 4] = body
                                .get(4..8)
                                .and_then(|s| s.try_into().ok())
                                .ok_or_else(|| self.fail("malformed md5 request"))?;
                            let hash = match &login.secret {
                                Secret::Md5(verifier) => super::login::md5_answer(verifier, salt),
                                _ => postgres_protocol::authentication::md5_hash(
                                    login.user.as_bytes(),
                                    self.password(login)?.as_bytes(),
                                    salt,
                                ),
                            };
                            frontend::password_message(hash.as_bytes(), &mut out)
                                .map_err(|e| self.fail(e))?;
                        }
                        10 => {
                            let mechanisms = &body[4..];
                            if !mechanisms.split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256") {
                                return Err(
                                    self.fail("server offers no SASL mechanism pgnear supports")
                                );
                            }
                            let s = match &login.secret {
                                Secret::Scram {
                                    client_key,
                                    server_key,
                                } => Scram::Keys(KeyClient::new(client_key, server_key)),
                                _ => Scram::Password(ScramSha256::new(
                                    self.password(login)?.as_bytes(),
                                    ChannelBinding::unsupported(),
                                )),
                            };
                            let first = match &s {
                                Scram::Keys(k) => k.first().into_bytes(),
                                Scram::Password(p) => p.message().to_vec(),
                            };
                            frontend::sasl_initial_response("SCRAM-SHA-256", &first, &mut out)
                                .map_err(|e| self.fail(e))?;
                            scram = Some(s);
                        }
                        11 => {
                            let answer = match scram.as_mut() {
                                Some(Scram::Keys(k)) => {
                                    k.answer(&body[4..]).map(String::into_bytes)
                                }
                                Some(Scram::Password(p)) => p
                                    .update(&body[4..])
                                    .map(|()| p.message().to_vec())
                                    .map_err(|e| e.to_string()),
                                None => return Err(self.fail("unexpected SASL continue")),
                            }
                            .map_err(|e| self.fail(format!("SCRAM: {e}")))?;
                            frontend::sasl_response(&answer, &mut out).map_err(|e| self.fail(e))?;
                        }
                        12 => {
                            match scram.as_mut() {
                                Some(Scram::Keys(k)) => k.finish(&body[4..]),
                                Some(Scram::Password(p)) => {
                                    p.finish(&body[4..]).map_err(|e| e.to_string())
                                }
                                None => return Err(self.fail("unexpected SASL final")),
                            }
                            .map_err(|e| self.fail(format!("SCRAM server signature: {e}")))?;
                            continue;
                        }
                        other => {
                            return Err(
                                self.fail(format!("unsupported authentication method {other}"))
                            )
                        }
                    }
                    conn.stream
                        .write_all(&out)
                        .await
                        .map_err(|e| self.fail(e))?;
                }
                be::PARAMETER_STATUS => {
                    if let Some((k, v)) = be::parameter_status(&body) {
                        conn.params.push((k.to_string(), v.to_string()));
                    }
                }
                be::BACKEND_KEY_DATA if body.len() >= 8 => {
                    conn.pid = i32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
                    conn.secret = body[4..].to_vec();
                }
                be::READY_FOR_QUERY => return Ok(conn),
                be::ERROR_RESPONSE => {
                    let f = error_fields(&body);
                    let mut e = PgError::new(
                        if f.code.starts_with("28") {
                            ErrorKind::Auth
                        } else {
                            ErrorKind::Upstream
                        },
                        format!(
                            "{} upstream refused the connection: {}",
                            self.role.name(),
                            f.message
                        ),
                    );
                    if f.code.starts_with("28") || f.code == "3D000" || f.code.starts_with("53") {
                        e.code = Some(f.code);
                    }
                    return Err(e);
                }
                be::NOTICE_RESPONSE | be::NEGOTIATE_PROTOCOL => {}
                other => {
                    return Err(self.fail(format!(
                        "unexpected message {:?} during startup",
                        other as char
                    )))
                }
            }
        }
    }

    fn password<'a>(&self, login: &'a Login) -> Result<&'a str, PgError> {
        match &login.secret {
            Secret::Password(p) => Ok(p),
            Secret::None => Err(PgError::new(
                ErrorKind::Auth,
                format!(
                    "{} upstream asks role \"{}\" for a password and pgnear has none for it",
                    self.role.name(),
                    login.user
                ),
            )),
            Secret::Scram { .. } | Secret::Md5(_) => Err(PgError::new(
                ErrorKind::Auth,
                format!(
                    "{} upstream asks role \"{}\" for its password in a way pgnear cannot answer from the role's verifier",
                    self.role.name(),
                    login.user
                ),
            )
            .with_hint("Let the servers' pg_hba.conf ask for scram-sha-256 (or md5 for an md5 verifier).")),
        }
    }

    async fn read_frame(
        &self,
        stream: &mut Stream,
        buf: &mut BytesMut,
    ) -> Result<(u8, BytesMut), PgError> {
        crate::protocol::read_frame(stream, buf, 1 << 20)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    self.fail("server closed the connection during startup")
                }
                std::io::ErrorKind::InvalidData => self.fail("malformed message during startup"),
                _ => self.fail(e),
            })
    }
}

/// Keepalive probes after `connect_timeout` of quiet, then every second, three of them; and
/// `TCP_USER_TIMEOUT` of `connect_timeout` (Linux): the kernel drops the connection once data
/// (or keepalive probes) it sent stay unacknowledged that long, so a path that swallows
/// packets ends the connection instead of leaving it open for the 15 minutes of TCP's
/// retransmissions. A server that is alive but busy still acknowledges at once, so long
/// queries are not affected. Best effort: a socket that refuses an option keeps its defaults.
fn give_up_on_silent_paths(s: &TcpStream, connect_timeout: Duration) {
    let sock = socket2::SockRef::from(s);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(connect_timeout.max(Duration::from_secs(1)))
        .with_interval(Duration::from_secs(1));
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    let keepalive = keepalive.with_retries(3);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "setting TCP keepalive failed");
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = sock.set_tcp_user_timeout(Some(connect_timeout)) {
        tracing::debug!(error = %e, "setting TCP_USER_TIMEOUT failed");
    }
}

/// Sends a CancelRequest for (pid, secret) to a server. Best effort, as in Postgres.
pub async fn send_cancel(addr: SocketAddr, pid: i32, secret: &[u8], timeout: Duration) {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut msg = BytesMut::new();
        let len = 12 + secret.len() as u32;
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(&crate::protocol::frontend::CANCEL_REQUEST.to_be_bytes());
        msg.extend_from_slice(&pid.to_be_bytes());
        msg.extend_from_slice(secret);
        s.write_all(&msg).await?;
        // The server closes the socket once it has read the request.
        let mut sink = [0u8; 1];
        let _ = s.read(&mut sink).await;
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(%addr, error = %e, "forwarding cancel request failed"),
        Err(_) => tracing::warn!(%addr, "forwarding cancel request timed out"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[tokio::test]
    async fn server_sockets_give_up_on_silent_paths() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        super::give_up_on_silent_paths(&s, Duration::from_secs(5));
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(5));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(1)
        );
        #[cfg(target_os = "linux")]
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(5))
        );
    }
}
