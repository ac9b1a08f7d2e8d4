//! Every metric pgnear exports, in one registry per running proxy. Hot-path counters are
//! resolved to their label values once, so recording is an atomic add.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::error::ErrorKind;
use crate::role::Role;
use crate::router::route::Reason;

pub struct Metrics {
    pub registry: Registry,
    /// `proxy.metrics`: when false the per-statement series are not recorded (for measuring
    /// what recording costs; gauges and rare events still are).
    per_statement: bool,
    pub clients: IntGauge,
    pub clients_accepted: IntCounter,
    rejected: IntCounterVec,
    statements: [[IntCounter; Reason::ALL.len()]; Role::ALL.len()],
    durations: [Histogram; Role::ALL.len()],
    bytes_in: IntCounter,
    bytes_out: IntCounter,
    pub lsn_waits: IntCounter,
    pub lsn_wait_seconds: Histogram,
    pub lsn_wait_timeouts: IntCounter,
    pub replica_retries: IntCounter,
    pub replay_refusals: IntCounter,
    pub primary_changes: IntCounter,
    pub replica_lag_bytes: Gauge,
    pub replica_lag_seconds: Gauge,
    pub replica_replay_lsn: IntGauge,
    upstream_up: IntGaugeVec,
    errors: [IntCounter; ErrorKind::ALL.len()],
    dns_changes: [IntCounter; Role::ALL.len()],
    dns_failures: [IntCounter; Role::ALL.len()],
    pools: [PoolMetrics; Role::ALL.len()],
    role_clients: IntGaugeVec,
}

/// Counts a client of a role while it is connected (`Metrics::role_client`).
pub struct RoleClient(IntGauge);

impl Drop for RoleClient {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A role's use of one pool.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoleFigures {
    pub role: String,
    /// Server connections open.
    pub open: usize,
    /// Times one of its sessions waited for a connection.
    pub waits: u64,
}

/// One upstream's pool series (labelled `upstream="primary|replica"`): all a pool records.
#[derive(Clone)]
pub struct PoolMetrics {
    upstream: &'static str,
    /// Server connections open (idle or in use).
    pub open: IntGauge,
    pub idle: IntGauge,
    /// Time a session waited for a server connection (0 when one was idle).
    pub acquire_seconds: Histogram,
    pub acquire_timeouts: IntCounter,
    /// Server connections opened.
    pub connects: IntCounter,
    /// `DISCARD ALL` run before a connection went back to the pool.
    pub resets: IntCounter,
    /// Reads run on a shared (pipelined) connection.
    pub pipelined: IntCounter,
    role_connections: IntGaugeVec,
    role_waits: IntCounterVec,
}

impl PoolMetrics {
    /// Publishes the pool's per-role figures (connections open, waits so far).
    pub fn roles(&self, roles: &[RoleFigures]) {
        for r in roles {
            let labels = [self.upstream, r.role.as_str()];
            self.role_connections
                .with_label_values(&labels)
                .set(r.open as i64);
            let waits = self.role_waits.with_label_values(&labels);
            waits.inc_by(r.waits.saturating_sub(waits.get()));
        }
    }
}

impl Metrics {
    pub fn new(per_statement: bool) -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| registered(&registry, IntCounter::new(name, help));
        let gauge = |name: &str, help: &str| registered(&registry, IntGauge::new(name, help));
        let counter_vec = |name: &str, help: &str, label: &[&str]| {
            registered(&registry, IntCounterVec::new(Opts::new(name, help), label))
        };
        let latency = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ];
        let histogram_vec = |name: &str, help: &str, label: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(latency.clone());
            registered(&registry, prometheus::HistogramVec::new(opts, label))
        };

        let statements_vec = counter_vec(
            "pgnear_statements_total",
            "Client requests (queries and batches that execute) by route and reason",
            &["route", "reason"],
        );
        let statements = Role::ALL.map(|role| {
            Reason::ALL
                .map(|reason| statements_vec.with_label_values(&[role.name(), reason.label()]))
        });
        let durations_vec = histogram_vec(
            "pgnear_statement_duration_seconds",
            "Time from sending a request to its ReadyForQuery, by route",
            &["route"],
        );
        let durations = Role::ALL.map(|r| durations_vec.with_label_values(&[r.name()]));
        let errors_vec = counter_vec(
            "pgnear_errors_total",
            "Errors pgnear reported to clients, by kind",
            &["kind"],
        );
        let errors = ErrorKind::ALL.map(|k| errors_vec.with_label_values(&[k.label()]));
        let lsn_wait_seconds = registered(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "pgnear_lsn_wait_duration_seconds",
                    "Time reads waited for the replica",
                )
                .buckets(latency.clone()),
            ),
        );
        let pool_vec = |name: &str, help: &str| {
            registered(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), &["upstream"]),
            )
        };
        let pool_open = pool_vec(
            "pgnear_pool_connections",
            "Server connections open (idle or in use), by upstream",
        );
        let pool_idle = pool_vec(
            "pgnear_pool_idle_connections",
            "Server connections idle in the pool, by upstream",
        );
        let pool_acquire = histogram_vec(
            "pgnear_pool_acquire_duration_seconds",
            "Time sessions waited for a server connection, by upstream",
            &["upstream"],
        );
        let pool_timeouts = counter_vec(
            "pgnear_pool_acquire_timeouts_total",
            "Sessions that got no server connection within pool.acquire_timeout (53300)",
            &["upstream"],
        );
        let pool_connects = counter_vec(
            "pgnear_pool_server_connects_total",
            "Server connections opened, by upstream",
            &["upstream"],
        );
        let pool_resets = counter_vec(
            "pgnear_pool_resets_total",
            "DISCARD ALL run before a server connection went back to the pool, by upstream",
            &["upstream"],
        );
        let pool_pipelined = counter_vec(
            "pgnear_pool_pipelined_reads_total",
            "Reads run on a server connection shared by sessions (pool.pipeline), by upstream",
            &["upstream"],
        );
        let role_connections = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "pgnear_pool_role_connections",
                    "Server connections open, by upstream and role",
                ),
                &["upstream", "role"],
            ),
        );
        let role_waits = counter_vec(
            "pgnear_pool_role_waits_total",
            "Times a session waited for a server connection, by upstream and role",
            &["upstream", "role"],
        );
        let pools = Role::ALL.map(|r| {
            let l = [r.name()];
            PoolMetrics {
                upstream: r.name(),
                role_connections: role_connections.clone(),
                role_waits: role_waits.clone(),
                open: pool_open.with_label_values(&l),
                idle: pool_idle.with_label_values(&l),
                acquire_seconds: pool_acquire.with_label_values(&l),
                acquire_timeouts: pool_timeouts.with_label_values(&l),
                connects: pool_connects.with_label_values(&l),
                resets: pool_resets.with_label_values(&l),
                pipelined: pool_pipelined.with_label_values(&l),
            }
        });
        let by_upstream = |name: &str, help: &str| {
            let vec = counter_vec(name, help, &["upstream"]);
            Role::ALL.map(|r| vec.with_label_values(&[r.name()]))
        };
        let dns_changes = by_upstream(
            "pgnear_dns_changes_total",
            "Times an upstream host's DNS answer changed (a different set of addresses)",
        );
        let dns_failures = by_upstream(
            "pgnear_dns_failures_total",
            "Failed DNS lookups of an upstream host (the last good addresses stay in use)",
        );
        let replica_lag_seconds = registered(
            &registry,
            Gauge::new(
                "pgnear_replica_lag_seconds",
                "Replica replay lag in seconds (NaN while unknown: the replica is down)",
            ),
        );
        let replica_lag_bytes = registered(
            &registry,
            Gauge::new(
                "pgnear_replica_lag_bytes",
                "Replica replay lag in bytes of WAL (NaN while unknown: the replica is down)",
            ),
        );
        Metrics {
            per_statement,
            clients: gauge("pgnear_client_connections", "Client connections open now"),
            clients_accepted: counter(
                "pgnear_client_connections_accepted_total",
                "Client connections accepted",
            ),
            rejected: counter_vec(
                "pgnear_client_connections_rejected_total",
                "Client connections refused, by reason",
                &["reason"],
            ),
            statements,
            durations,
            bytes_in: counter(
                "pgnear_client_bytes_received_total",
                "Bytes received from clients",
            ),
            bytes_out: counter("pgnear_client_bytes_sent_total", "Bytes sent to clients"),
            lsn_waits: counter(
                "pgnear_lsn_waits_total",
                "Reads that waited for the replica to replay a session's writes",
            ),
            lsn_wait_seconds,
            lsn_wait_timeouts: counter(
                "pgnear_lsn_wait_timeouts_total",
                "Waits that ran past consistency.wait_timeout",
            ),
            replica_retries: counter(
                "pgnear_replica_retries_total",
                "Queries the replica refused as writes (25006), run again on the primary",
            ),
            replay_refusals: counter(
                "pgnear_replay_refusals_total",
                "Writes refused in replay mode (SQLSTATE 25006 with a fly-replay hint)",
            ),
            primary_changes: counter(
                "pgnear_primary_changes_total",
                "Changes of the address that takes the primary's connections (found, moved, lost, split brain)",
            ),
            replica_lag_bytes,
            replica_lag_seconds,
            replica_replay_lsn: gauge(
                "pgnear_replica_replay_lsn",
                "Replica replay position (pg_lsn as a number)",
            ),
            upstream_up: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "pgnear_upstream_up",
                        "1 when the upstream answers, by upstream",
                    ),
                    &["upstream"],
                ),
            ),
            errors,
            pools,
            role_clients: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new("pgnear_role_clients", "Clients connected, by role"),
                    &["role"],
                ),
            ),
            dns_changes,
            dns_failures,
            registry,
        }
    }

    /// Counts a client of `user` until the guard is dropped.
    pub fn role_client(&self, user: &str) -> RoleClient {
        let gauge = self.role_clients.with_label_values(&[user]);
        gauge.inc();
        RoleClient(gauge)
    }

    /// Clients of `user` connected now.
    pub fn role_clients(&self, user: &str) -> i64 {
        self.role_clients.with_label_values(&[user]).get()
    }

    pub fn pool(&self, role: Role) -> &PoolMetrics {
        &self.pools[role.index()]
    }

    pub fn statement(&self, role: Role, reason: Reason) {
        if !self.per_statement {
            return;
        }
        self.statements[role.index()][reason.index()].inc();
    }

    pub fn duration(&self, role: Role, seconds: f64) {
        if !self.per_statement {
            return;
        }
        self.durations[role.index()].observe(seconds);
    }

    pub fn bytes_in(&self, n: usize) {
        if self.per_statement {
            self.bytes_in.inc_by(n as u64);
        }
    }

    pub fn bytes_out(&self, n: usize) {
        if self.per_statement {
            self.bytes_out.inc_by(n as u64);
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind.index()].inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    pub fn upstream_up(&self, role: Role, up: bool) {
        self.upstream_up
            .with_label_values(&[role.name()])
            .set(i64::from(up));
    }

    pub fn dns_change(&self, role: Role) {
        self.dns_changes[role.index()].inc();
    }

    pub fn dns_failure(&self, role: Role) {
        self.dns_failures[role.index()].inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(true)
    }
}

/// Registers a metric built from a static definition. A failure is a bug in this file (the
/// unit test builds them all), never something input can cause.
fn registered<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    made: prometheus::Result<C>,
) -> C {
    let metric = made.expect("a valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric names");
    metric
}

/// Counts a client connection while it lives (the gauge cannot be forgotten on any path).
pub struct ClientGuard<'a>(&'a Metrics);

impl<'a> ClientGuard<'a> {
    pub fn new(m: &'a Metrics) -> ClientGuard<'a> {
        m.clients.inc();
        m.clients_accepted.inc();
        ClientGuard(m)
    }
}

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.0.clients.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_has_its_own_slot() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i, "{k:?}");
        }
        for (i, r) in Role::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
    }

    #[test]
    fn renders_every_family_with_the_prefix() {
        let m = Metrics::new(true);
        m.statement(Role::Replica, Reason::Read);
        m.error(ErrorKind::Auth);
        m.upstream_up(Role::Primary, true);
        m.dns_change(Role::Replica);
        {
            let _g = ClientGuard::new(&m);
            assert_eq!(m.clients.get(), 1);
        }
        assert_eq!(m.clients.get(), 0);
        let text = m.render();
        assert!(
            text.contains("pgnear_statements_total{reason=\"read\",route=\"replica\"} 1"),
            "{text}"
        );
        assert!(text.contains("pgnear_errors_total{kind=\"auth\"} 1"));
        assert!(text.contains("pgnear_upstream_up{upstream=\"primary\"} 1"));
        assert!(text.contains("pgnear_dns_changes_total{upstream=\"replica\"} 1"));
        assert!(text.contains("pgnear_dns_failures_total{upstream=\"primary\"} 0"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("pgnear_"), "{line}");
        }
    }
}
