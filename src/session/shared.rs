//! What every session shares: configuration, upstreams, pools, credentials, the shutdown
//! signal. Built once by `Proxy::start`.

use std::sync::Arc;

use super::lane::Lanes;
use super::reported::ReportedValues;
use crate::auth::Auth;
use crate::backend::conn::Upstream;
use crate::backend::health::PrimaryProbe;
use crate::backend::pool::Pool;
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::consistency::watcher::Watcher;
use crate::metrics::Metrics;
use crate::region::RegionRole;
use crate::role::Role;
use crate::router::cache::ClassifyCache;
use crate::shutdown::Shutdown;
use crate::spin::Spinner;

/// What every session shares: configuration, upstreams, credentials, and the shutdown signal.
pub struct Shared {
    pub config: Config,
    /// Where this pgnear runs, from `config.regions`.
    pub region: RegionRole,
    pub primary: Arc<Upstream>,
    pub replica: Option<Arc<Upstream>>,
    pub primary_pool: Arc<Pool>,
    pub replica_pool: Option<Arc<Pool>>,
    /// Shared replica connections for pipelined reads (`pool.pipeline`, transaction mode).
    pub lanes: Option<Arc<Lanes>>,
    /// Busy polling (`proxy.busy_poll`): sessions and lanes report activity to it.
    pub spinner: Arc<Spinner>,
    /// The replica's replay position and health (present when a replica is configured).
    pub watcher: Option<Arc<Watcher>>,
    pub probe: Arc<PrimaryProbe>,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub cancels: Arc<CancelRegistry>,
    pub classifier: ClassifyCache,
    /// How servers report the parameter values clients give at startup.
    pub reported: ReportedValues,
    pub shutdown: Shutdown,
}

impl Shared {
    /// The pool for `role`'s server connections (the primary's when no replica is configured).
    pub fn pool(&self, role: Role) -> &Arc<Pool> {
        match (role, &self.replica_pool) {
            (Role::Replica, Some(p)) => p,
            _ => &self.primary_pool,
        }
    }

    /// The upstream for `role` (the primary when no replica is configured).
    pub fn upstream(&self, role: Role) -> &Arc<Upstream> {
        match (role, &self.replica) {
            (Role::Replica, Some(u)) => u,
            _ => &self.primary,
        }
    }
}
