//! The admin HTTP server: `/metrics` (Prometheus text), `/healthz`, `/readyz`, `/status` (JSON).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::backend::conn::Chosen;
use crate::backend::health::HostRole;
use crate::role::Role;
use crate::session::Shared;

/// Serves admin requests until shutdown.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // As the client listener: back off instead of spinning.
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(crate::listener::ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let response = handle(&shared, req.method(), req.uri().path());
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
            _ = shutdown.stopped() => return,
        }
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

fn handle(shared: &Shared, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match path {
        "/metrics" => {
            for role in [Role::Primary, Role::Replica] {
                if role == Role::Primary || shared.replica_pool.is_some() {
                    shared.metrics.pool(role).roles(&shared.pool(role).roles());
                }
            }
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                shared.metrics.render(),
            )
        }
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match readiness(shared) {
            Ok(what) => respond(StatusCode::OK, "text/plain", format!("ready: {what}\n")),
            Err(why) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/status" => respond(
            StatusCode::OK,
            "application/json",
            status(shared).to_string(),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz, /readyz or /status\n".into(),
        ),
    }
}

/// Ready when reads can be served (replica or primary) and, without a replica, the primary is up.
fn readiness(shared: &Shared) -> Result<&'static str, &'static str> {
    let primary_up = shared.probe.current().up;
    let replica_up = shared.watcher.as_ref().is_some_and(|w| w.current().up);
    match (shared.watcher.is_some(), replica_up, primary_up) {
        (_, true, true) => Ok("replica and primary up"),
        (_, true, false) => Ok("reads from the replica; the primary is down"),
        (true, false, true) => Ok("reads and writes on the primary; the replica is down"),
        (false, _, true) => Ok("primary up"),
        (true, false, false) => Err("the replica and the primary are both down"),
        (false, _, false) => Err("the primary is down"),
    }
}

/// The upstream's current DNS answer, as strings.
fn addresses(upstream: &crate::backend::conn::Upstream) -> Vec<String> {
    upstream
        .current_addrs()
        .iter()
        .map(|a| a.to_string())
        .collect()
}

/// Where the primary's connections go: an address, or why none.
fn writes_to(chosen: Chosen) -> serde_json::Value {
    match chosen {
        Chosen::At(a) => a.to_string().into(),
        Chosen::Unknown => serde_json::Value::Null,
        Chosen::Nowhere => "none: every host that answers is in recovery".into(),
        Chosen::Conflict(a, b) => {
            format!("none: {a} and {b} both claim to be the primary (split brain)").into()
        }
    }
}

/// What each address of the primary's hosts answered at the last probe.
fn primary_hosts(hosts: &[(std::net::SocketAddr, HostRole)]) -> serde_json::Value {
    hosts
        .iter()
        .map(|(addr, role)| match role {
            HostRole::Primary { timeline, .. } => {
                serde_json::json!({ "address": addr.to_string(), "role": "primary", "timeline": timeline })
            }
            HostRole::Standby => serde_json::json!({ "address": addr.to_string(), "role": "standby" }),
            HostRole::Down => serde_json::json!({ "address": addr.to_string(), "role": "down" }),
        })
        .collect()
}

/// Per role: clients connected, and its server connections and waits per upstream.
fn roles(shared: &Shared) -> serde_json::Value {
    let mut roles = serde_json::Map::new();
    for role in [Role::Primary, Role::Replica] {
        if role == Role::Replica && shared.replica_pool.is_none() {
            continue;
        }
        for r in shared.pool(role).roles() {
            let entry = roles.entry(r.role.clone()).or_insert_with(
                || serde_json::json!({ "clients": shared.metrics.role_clients(&r.role) }),
            );
            entry[role.name()] = serde_json::json!({ "connections": r.open, "waits": r.waits });
        }
    }
    serde_json::Value::Object(roles)
}

fn status(shared: &Shared) -> serde_json::Value {
    let c = &shared.config;
    let role = shared.region.label();
    let primary = shared.probe.current();
    let mut upstreams = vec![serde_json::json!({
        "role": "primary",
        "url": shared.primary.url.to_string(),
        "addresses": addresses(&shared.primary),
        "up": primary.up,
        "wal_lsn": primary.lsn.map(|l| l.to_string()),
        "writes_to": writes_to(shared.primary.chosen()),
        "hosts": primary_hosts(&shared.probe.hosts()),
    })];
    if let (Some(r), Some(w)) = (&shared.replica, &shared.watcher) {
        let s = w.current();
        upstreams.push(serde_json::json!({
            "role": "replica",
            "url": r.url.to_string(),
            "addresses": addresses(r),
            "up": s.up,
            "in_recovery": s.in_recovery,
            "replay_lsn": s.replay.map(|l| l.to_string()),
            "lag_bytes": s.lag_bytes,
            "lag_seconds": s.lag_seconds,
        }));
    }
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "region": c.regions.current,
        "primary_region": c.regions.primary,
        "role": role,
        "write_mode": c.routing.write_mode,
        "consistency": c.consistency.mode,
        "pool_mode": c.pool.mode,
        "clients": shared.metrics.clients.get(),
        "upstreams": upstreams,
        "roles": roles(shared),
    })
}
