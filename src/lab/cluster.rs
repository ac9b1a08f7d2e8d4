//! The local multi-region cluster: a primary in the first region, a streaming hot standby in
//! every other region, and in front of the primary one latency relay per non-primary region.
//! A replica's replication stream goes through its region's relay, and so should everything
//! else that region sends to the primary ([`Cluster::primary_addr_from`]).
//!
//! Teardown: [`Cluster::shutdown`] (fast stop) or `Drop` (immediate stop), and, for owners that
//! never run either (a cluster in a `static`, a killed process), a detached watchdog shell that
//! polls the owner's pid every second and, once it is gone, stops every node and removes the
//! directory.

use std::fmt;
use std::future::Future;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use super::cleanup::Cleanup;
use super::postgres::{io_err, parse_lsn, LabError, PgBin, PgNode};
use super::relay::Relay;
use crate::upstream_url::percent_encode as pct;

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Region names; the first one holds the primary, every other one a replica.
    pub regions: Vec<String>,
    /// One-way delay between a non-primary region and the primary.
    pub one_way_delay: Duration,
    /// Application role (LOGIN, password auth), owner of `database`.
    pub app_user: String,
    /// Its password.
    pub app_password: String,
    /// Application database.
    pub database: String,
}

impl Default for ClusterOptions {
    /// Regions `iad` (primary) and `syd`, no delay, `app`/`secret`, database `app`.
    fn default() -> Self {
        ClusterOptions {
            regions: vec!["iad".into(), "syd".into()],
            one_way_delay: Duration::ZERO,
            app_user: "app".into(),
            app_password: "secret".into(),
            database: "app".into(),
        }
    }
}

/// A non-primary region: its hot standby and its relay to the primary.
#[derive(Debug)]
pub struct Replica {
    /// Region name.
    pub region: String,
    /// The region's streaming hot standby.
    pub node: PgNode,
    /// The region's path to the primary (carries the replication stream too).
    pub relay: Relay,
}

/// A running lab cluster; see the module docs.
pub struct Cluster {
    opts: ClusterOptions,
    superuser_password: String,
    primary: PgNode,
    replicas: Vec<Replica>,
    cleanup: Cleanup,
}

impl Cluster {
    /// Creates and starts everything in a new temporary directory; returns once every replica
    /// is streaming. On error, whatever was started is stopped and removed.
    pub async fn start(opts: ClusterOptions) -> Result<Cluster, LabError> {
        validate(&opts)?;
        let began = Instant::now();
        let bin = Arc::new(PgBin::locate()?);
        let cleanup = Cleanup::new(bin.clone())?;
        let password = random_token()?;
        let primary_region = opts.regions[0].clone();
        let primary =
            PgNode::create_primary(bin.clone(), &cleanup.base, &primary_region, &password).await?;
        create_app(&primary, &opts).await?;

        let mut relays = Vec::new();
        for region in &opts.regions[1..] {
            let relay = Relay::start(primary.addr(), opts.one_way_delay)
                .await
                .map_err(io_err(format!("starting the relay for {region}")))?;
            relays.push(relay);
        }
        let stream_timeout = Duration::from_secs(60) + opts.one_way_delay * 40;
        let creating: Vec<_> = opts.regions[1..]
            .iter()
            .zip(&relays)
            .map(|(region, relay)| {
                let (bin, base, password) = (bin.clone(), &cleanup.base, &password);
                async move {
                    let node =
                        PgNode::create_replica(bin, base, region, relay.addr(), password).await?;
                    wait_streaming(&node, stream_timeout).await?;
                    Ok::<PgNode, LabError>(node)
                }
            })
            .collect();
        let nodes = join_all(creating).await;
        let mut replicas = Vec::new();
        for ((region, relay), node) in opts.regions[1..].iter().zip(relays).zip(nodes) {
            replicas.push(Replica {
                region: region.clone(),
                node: node?,
                relay,
            });
        }
        tracing::info!(
            dir = %cleanup.base.display(),
            version = %bin.version(),
            regions = ?opts.regions,
            elapsed = ?began.elapsed(),
            "lab: cluster up"
        );
        Ok(Cluster {
            opts,
            superuser_password: password,
            primary,
            replicas,
            cleanup,
        })
    }

    /// The primary node.
    pub fn primary(&self) -> &PgNode {
        &self.primary
    }

    /// The primary's region (the first of `regions`).
    pub fn primary_region(&self) -> &str {
        &self.opts.regions[0]
    }

    /// One entry per non-primary region, in `regions` order.
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// The replica of `region` (none for the primary region or an unknown one).
    pub fn replica(&self, region: &str) -> Option<&Replica> {
        self.replicas.iter().find(|r| r.region == region)
    }

    /// Address of the primary as seen from `region`: the primary itself in the primary region
    /// (and for an unknown region), the region's relay elsewhere.
    pub fn primary_addr_from(&self, region: &str) -> SocketAddr {
        match self.replica(region) {
            Some(r) => r.relay.addr(),
            None => self.primary.addr(),
        }
    }

    /// The options the cluster was started with.
    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    /// Password of the superuser `postgres` (random per cluster).
    pub fn superuser_password(&self) -> &str {
        &self.superuser_password
    }

    /// `postgres://app_user:app_password@<primary_addr_from(region)>/database?sslmode=disable`.
    pub fn primary_url_from(&self, region: &str) -> String {
        self.app_url(self.primary_addr_from(region))
    }

    /// The same URL to `region`'s replica (direct, it is local to its region).
    pub fn replica_url(&self, region: &str) -> Option<String> {
        self.replica(region).map(|r| self.app_url(r.node.addr()))
    }

    /// The cluster's temporary directory (one subdirectory per node).
    pub fn dir(&self) -> &Path {
        &self.cleanup.base
    }

    fn app_url(&self, addr: SocketAddr) -> String {
        self.app_url_at(&[addr])
    }

    /// The app's URL listing `hosts` (a multi-host URL when there are several).
    pub fn app_url_at(&self, hosts: &[SocketAddr]) -> String {
        let hosts: Vec<String> = hosts.iter().map(SocketAddr::to_string).collect();
        format!(
            "postgres://{}:{}@{}/{}?sslmode=disable",
            pct(&self.opts.app_user),
            pct(&self.opts.app_password),
            hosts.join(","),
            pct(&self.opts.database)
        )
    }

    /// Waits until every replica has replayed the primary's current WAL position
    /// (`pg_current_wal_lsn()` vs `pg_last_wal_replay_lsn()`).
    pub async fn wait_replicas_caught_up(&self) -> Result<(), LabError> {
        let p = &self.primary;
        let client = p.control_client().await?;
        let row = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| p.sql_error(e))?;
        let text: String = row.get(0);
        let target = parse_lsn(&text)
            .ok_or_else(|| LabError::Setup(format!("unparsable LSN from the primary: {text}")))?;
        let timeout = Duration::from_secs(30) + self.opts.one_way_delay * 20;
        let waits: Vec<_> = self
            .replicas
            .iter()
            .map(|r| wait_replayed(&r.node, target, timeout))
            .collect();
        join_all(waits).await.into_iter().collect()
    }

    /// Stops every node (fast), ends the watchdog, removes the directory. Whatever fails to stop
    /// is stopped the immediate way; `Drop` afterwards does nothing.
    pub async fn shutdown(mut self) {
        // Replicas first, so the primary's shutdown does not wait on far-away standbys.
        let stops: Vec<_> = self.replicas.iter().map(|r| r.node.stop()).collect();
        for (r, result) in self.replicas.iter().zip(join_all(stops).await) {
            if let Err(e) = result {
                tracing::warn!(node = %r.node.name, "lab: fast stop failed: {e}");
            }
        }
        if let Err(e) = self.primary.stop().await {
            tracing::warn!(node = %self.primary.name, "lab: fast stop failed: {e}");
        }
        for r in &self.replicas {
            r.relay.cut();
        }
        self.cleanup.run();
    }
}

impl Drop for Cluster {
    /// Best effort, synchronous: `pg_ctl stop -m immediate` on every node, remove the directory.
    fn drop(&mut self) {
        self.cleanup.run();
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.cleanup.base)
            .field("primary_region", &self.primary_region())
            .field("primary", &self.primary)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

fn validate(opts: &ClusterOptions) -> Result<(), LabError> {
    let bad = |m: String| Err(LabError::Setup(m));
    if opts.regions.is_empty() {
        return bad("at least one region is needed (the first holds the primary)".into());
    }
    for (i, r) in opts.regions.iter().enumerate() {
        let ok_chars = r
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if r.is_empty() || r.len() > 40 || !ok_chars {
            return bad(format!("region name {r:?}: use 1-40 of [A-Za-z0-9_-]"));
        }
        if opts.regions[..i].contains(r) {
            return bad(format!("region {r:?} appears twice"));
        }
    }
    if opts.app_user.is_empty() || opts.database.is_empty() {
        return bad("app_user and database must not be empty".into());
    }
    if opts.app_user == "postgres" {
        return bad("app_user must not be the superuser `postgres`".into());
    }
    Ok(())
}

fn random_token() -> Result<String, LabError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_err("reading /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The lab's extra login roles: name, password, how the password is stored.
pub const LAB_ROLES: [(&str, &str, &str); 2] = [
    ("reporter", "reporter-secret", "scram-sha-256"),
    ("legacy", "legacy-secret", "md5"),
];

async fn create_app(primary: &PgNode, opts: &ClusterOptions) -> Result<(), LabError> {
    let client = primary.control_client().await?;
    let sql = |e| primary.sql_error(e);
    // The app's role, and roles of their own for trying `auth.users = "query"`: one with a
    // SCRAM verifier, one with an md5 verifier (its pg_hba.conf line asks for md5). Neither may
    // read the app's tables until granted.
    let app = (
        opts.app_user.as_str(),
        opts.app_password.as_str(),
        "scram-sha-256",
    );
    for (role, password, encryption) in std::iter::once(app).chain(LAB_ROLES) {
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await
            .map_err(sql)?
            .is_some();
        let verb = if exists { "ALTER" } else { "CREATE" };
        client
            .batch_execute(&format!(
                "SET password_encryption = '{encryption}'; {verb} ROLE {} LOGIN PASSWORD {}; \
                 RESET password_encryption",
                quote_ident(role),
                quote_literal(password)
            ))
            .await
            .map_err(sql)?;
    }
    let db_exists = client
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&opts.database],
        )
        .await
        .map_err(sql)?
        .is_some();
    if !db_exists {
        client
            .batch_execute(&format!(
                "CREATE DATABASE {} OWNER {}",
                quote_ident(&opts.database),
                quote_ident(&opts.app_user)
            ))
            .await
            .map_err(sql)?;
    }
    // The app's role is no superuser: it reads verifiers through this function (see
    // `VERIFIER_QUERY`).
    let app = primary.superuser_client(&opts.database).await?;
    app.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS pgnear_auth; \
         CREATE OR REPLACE FUNCTION pgnear_auth.verifier(role text) RETURNS text \
         LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$ \
         SELECT rolpassword FROM pg_authid WHERE rolname = role AND rolcanlogin \
         AND (rolvaliduntil IS NULL OR rolvaliduntil > now()) $$; \
         REVOKE ALL ON FUNCTION pgnear_auth.verifier(text) FROM PUBLIC; \
         GRANT USAGE ON SCHEMA pgnear_auth TO {app_user}; \
         GRANT EXECUTE ON FUNCTION pgnear_auth.verifier(text) TO {app_user}",
        app_user = quote_ident(&opts.app_user)
    ))
    .await
    .map_err(sql)?;
    Ok(())
}

/// `auth.query` for the lab's app role, which is no superuser: a `SECURITY DEFINER` function
/// owned by the superuser reads `pg_authid` for it.
pub const VERIFIER_QUERY: &str = "SELECT pgnear_auth.verifier($1)";

/// Polls `check` on a control connection to `node` every `every` until it returns true.
async fn poll_node<F, Fut>(
    node: &PgNode,
    what: String,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Result<(), LabError>
where
    F: FnMut(tokio_postgres::Client) -> Fut,
    Fut: Future<Output = Result<(bool, tokio_postgres::Client), LabError>>,
{
    let deadline = Instant::now() + timeout;
    let mut client = None;
    let mut last_error = String::new();
    loop {
        if client.is_none() {
            match node.control_client().await {
                Ok(c) => client = Some(c),
                Err(e) => last_error = e.to_string(),
            }
        }
        if let Some(c) = client.take() {
            match check(c).await {
                Ok((true, _)) => return Ok(()),
                Ok((false, c)) => client = Some(c),
                Err(e) => last_error = e.to_string(),
            }
        }
        if Instant::now() >= deadline {
            let last = if last_error.is_empty() {
                String::new()
            } else {
                format!("; last error: {last_error}")
            };
            return Err(LabError::Timeout {
                what: format!("{what} (log: {}{last})", node.log_path().display()),
                after: timeout,
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until `node` is in recovery and its WAL receiver is streaming.
async fn wait_streaming(node: &PgNode, timeout: Duration) -> Result<(), LabError> {
    let what = format!("replica {} to stream from the primary", node.name);
    poll_node(
        node,
        what,
        timeout,
        Duration::from_millis(25),
        |c| async move {
            let row = c
                .query_one(
                    "SELECT pg_is_in_recovery(), \
                     coalesce((SELECT status FROM pg_stat_wal_receiver LIMIT 1), '')",
                    &[],
                )
                .await
                .map_err(|e| node.sql_error(e))?;
            let streaming = row.get::<_, bool>(0) && row.get::<_, String>(1) == "streaming";
            Ok((streaming, c))
        },
    )
    .await
}

/// Waits until `node` has replayed WAL up to `target`.
async fn wait_replayed(node: &PgNode, target: u64, timeout: Duration) -> Result<(), LabError> {
    let what = format!(
        "replica {} to replay the primary's WAL up to {:X}/{:X}",
        node.name,
        target >> 32,
        target & 0xFFFF_FFFF
    );
    poll_node(
        node,
        what,
        timeout,
        Duration::from_millis(10),
        |c| async move {
            let row = c
                .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
                .await
                .map_err(|e| node.sql_error(e))?;
            let replayed = row
                .get::<_, Option<String>>(0)
                .as_deref()
                .and_then(parse_lsn);
            Ok((replayed.is_some_and(|lsn| lsn >= target), c))
        },
    )
    .await
}

/// Runs futures concurrently on the current task and returns their outputs in order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_validated() {
        let mut o = ClusterOptions::default();
        assert!(validate(&o).is_ok());
        o.regions = vec!["iad".into(), "iad".into()];
        assert!(validate(&o).is_err());
        o.regions = vec!["../x".into()];
        assert!(validate(&o).is_err());
        o.regions = vec![];
        assert!(validate(&o).is_err());
        o.regions = vec!["iad".into()];
        o.app_user = "postgres".into();
        assert!(validate(&o).is_err());
    }

    #[test]
    fn quoting_and_urls() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(pct("p@ss:w/rd"), "p%40ss%3Aw%2Frd");
        assert_eq!(pct("app_1.x~-"), "app_1.x~-");
    }
}
