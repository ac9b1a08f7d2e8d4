//! A running pgnear: `Proxy::start` builds the shared state, starts the listener, the admin
//! endpoints and the background tasks; `Proxy::shutdown` stops them.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::backend::conn::Upstream;
use crate::config::{AuthMethod, Config};
use crate::region::RegionRole;
use crate::role::Role;
use crate::session::Shared;
use crate::shutdown;
use crate::{
    admin, auth, backend, config, consistency, discovery, listener, metrics, router, session, spin,
    tls, upstream_url,
};

/// Distinct statement texts whose classification is cached.
const CLASSIFY_CACHE_ENTRIES: usize = 16 * 1024;

/// Why pgnear could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("refusing to listen on {0} without client authentication: set auth.method to scram-sha-256 or md5 and put a password in the upstream URL")]
    OpenWithoutAuth(String),
    #[error("auth.method {0:?} needs a password in the primary upstream URL")]
    NoPassword(AuthMethod),
    #[error("cannot set up DNS for the {role} upstream {host}: {source}")]
    Dns {
        role: &'static str,
        host: String,
        source: Box<hickory_resolver::net::NetError>,
    },
}

/// Binds a listener (port 0 picks a free port) and returns it with its actual address.
async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Listen {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(failed)?;
    let local = listener.local_addr().map_err(failed)?;
    Ok((listener, local))
}

/// A running pgnear: its listening address and the handle to stop it.
pub struct Proxy {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: shutdown::Stop,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Binds the listener (port 0 picks a free port) and starts serving.
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        let auth_method = config.auth_method();
        if auth_method == AuthMethod::Trust && !config.listens_on_loopback() {
            return Err(StartError::OpenWithoutAuth(config.proxy.listen.clone()));
        }
        let primary_url = config.primary();
        if auth_method != AuthMethod::Trust && primary_url.password.is_none() {
            return Err(StartError::NoPassword(auth_method));
        }
        let tls = if config.tls.cert.is_empty() {
            None
        } else {
            Some(tls::server_config(&config.tls.cert, &config.tls.key)?)
        };
        let connect_timeout = config.upstream.connect_timeout.0;
        let metrics = Arc::new(metrics::Metrics::new(config.proxy.metrics));
        let (stop, shutdown) = crate::shutdown::channel();
        let nameservers = discovery::Nameservers::read(config.nameserver());
        let upstream =
            |role: Role, url: upstream_url::UpstreamUrl| -> Result<Upstream, StartError> {
                let tls = tls::client_config(url.sslmode, url.sslrootcert.as_deref())?;
                // A lookup is part of connecting: it gets the connect timeout.
                let dns = url
                    .hosts
                    .iter()
                    .map(|host| {
                        discovery::Discovery::start(
                            role,
                            &host.name,
                            host.port,
                            &nameservers,
                            connect_timeout,
                            metrics.clone(),
                            shutdown.clone(),
                        )
                        .map_err(|source| StartError::Dns {
                            role: role.name(),
                            host: host.name.clone(),
                            source: Box::new(source),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Upstream::new(role, url, tls, connect_timeout, dns))
            };
        let replica = if config.upstream.replica_url.is_empty() {
            None
        } else {
            let url =
                upstream_url::UpstreamUrl::parse(&config.upstream.replica_url).expect("validated");
            Some(Arc::new(upstream(Role::Replica, url)?))
        };
        let (listener, addr) = bind(&config.proxy.listen).await?;
        let (admin, admin_addr) = bind(&config.proxy.admin_listen).await?;
        let primary = Arc::new(upstream(Role::Primary, primary_url)?);
        let auth = auth::Auth::new(&config, &primary);
        let probe = backend::health::PrimaryProbe::spawn(
            primary.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        let watcher = replica.as_ref().map(|r| {
            consistency::watcher::Watcher::spawn(
                r.clone(),
                probe.clone(),
                metrics.clone(),
                (
                    config.consistency.max_replica_lag.0,
                    config.upstream.replica_order,
                ),
                shutdown.clone(),
            )
        });
        probe.first_contact(connect_timeout).await;
        if let Some(w) = &watcher {
            w.first_contact(connect_timeout).await;
        }
        let pool = |upstream: &Arc<Upstream>| {
            backend::pool::Pool::spawn(
                upstream.clone(),
                auth.url_login().clone(),
                config.pool.clone(),
                metrics.pool(upstream.role).clone(),
                shutdown.clone(),
            )
        };
        let primary_pool = pool(&primary);
        let replica_pool = replica.as_ref().map(pool);
        let pipelines =
            config.pool.mode == config::PoolMode::Transaction && config.pool.pipeline > 0;
        let spinner = Arc::new(spin::Spinner::new(config.proxy.busy_poll.0));
        if !config.proxy.busy_poll.0.is_zero() {
            tokio::spawn(spinner.clone().run(shutdown.clone()));
        }
        let lanes = replica_pool.as_ref().filter(|_| pipelines).map(|p| {
            Arc::new(session::lane::Lanes::new(
                p.clone(),
                config.pool.clone(),
                connect_timeout,
                watcher.clone(),
                shutdown.clone(),
                spinner.clone(),
            ))
        });
        let shared = Arc::new(Shared {
            spinner,
            lanes,
            primary,
            replica,
            primary_pool,
            replica_pool,
            watcher,
            probe,
            metrics,
            auth,
            tls,
            cancels: Arc::default(),
            reported: Default::default(),
            classifier: router::cache::ClassifyCache::new(
                CLASSIFY_CACHE_ENTRIES,
                config.routing.write_functions.clone(),
            ),
            shutdown,
            region: RegionRole::of(&config.regions.current, &config.regions.primary),
            config,
        });
        tracing::info!(%addr, %admin_addr, auth = ?auth_method, "pgnear listening");
        let admin_task = tokio::spawn(admin::http::serve(admin, shared.clone()));
        let ready = shared.clone();
        tokio::spawn(async move { ready.auth.prepare().await });
        let task = tokio::spawn(async move {
            listener::accept_loop(shared, listener).await;
            let _ = admin_task.await;
        });
        Ok(Proxy {
            addr,
            admin_addr,
            stop,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics`, `/healthz`, `/readyz` and `/status` are served.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Stops accepting, lets running transactions finish within `shutdown_grace`, closes the
    /// remaining clients with 57P01, and returns when every session has ended.
    pub async fn shutdown(self) {
        self.stop.stop();
        let _ = self.task.await;
    }
}

/// `pgnear check`: the effective config (secrets masked) and what pgnear derived from it.
pub fn check_report(config: &Config) -> String {
    let primary = config.primary();
    let replica = if config.upstream.replica_url.is_empty() {
        "none (all statements go to the primary)".to_string()
    } else {
        config::mask_url(&config.upstream.replica_url)
    };
    let (c, p) = (&config.regions.current, &config.regions.primary);
    let role = match RegionRole::of(c, p) {
        RegionRole::Single => "single region (no FLY_REGION/PRIMARY_REGION)".to_string(),
        RegionRole::Primary => format!("primary region {c}"),
        RegionRole::Replica => format!("replica region {c} (primary region {p})"),
    };
    let nameservers = discovery::Nameservers::read(config.nameserver());
    let users = match config.auth.users {
        config::AuthUsers::Url => format!("role \"{}\" only (auth.users = \"url\")", primary.user),
        config::AuthUsers::Query => format!(
            "any role the primary knows (auth.users = \"query\"): verifiers looked up with auth.query, cached for {:?}",
            config.auth.cache_ttl.0
        ),
    };
    format!(
        "# pgnear check: configuration is valid\n# role: {role}\n# primary upstream: {primary} (sslmode {:?})\n# replica upstream: {replica}\n# nameserver: {nameservers}; /etc/hosts first\n# client auth: {:?}; {users}\n\n{}",
        primary.sslmode,
        config.auth_method(),
        config.render_masked()
    )
}
