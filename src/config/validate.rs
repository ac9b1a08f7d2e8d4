//! `Config::validate`: every value checked together, each error naming its key, the value and
//! what is allowed.

use std::net::SocketAddr;
use std::time::Duration;

use super::{invalid, mask_url, AuthUsers, Config, ConfigError};
use crate::upstream_url::UpstreamUrl;

impl Config {
    /// Checks the whole configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.auth.users == AuthUsers::Query && !self.auth.query.contains("$1") {
            return Err(invalid(
                "auth.query",
                &self.auth.query,
                "a query that uses $1 for the role name",
            ));
        }
        for (key, value) in [
            ("proxy.listen", &self.proxy.listen),
            ("proxy.admin_listen", &self.proxy.admin_listen),
        ] {
            value
                .parse::<SocketAddr>()
                .map_err(|_| invalid(key, value, "an address like 127.0.0.1:6432 or [::1]:6432"))?;
        }
        if self.proxy.max_client_connections == 0 {
            return Err(invalid("proxy.max_client_connections", 0, "at least 1"));
        }
        if self.proxy.max_message_size < 1024 || self.proxy.max_message_size > (1 << 30) {
            return Err(invalid(
                "proxy.max_message_size",
                self.proxy.max_message_size,
                "between 1024 and 1073741824 bytes",
            ));
        }
        if self.upstream.primary_url.is_empty() {
            return Err(invalid(
                "upstream.primary_url",
                "",
                "a postgres:// URL; set DATABASE_URL or upstream.primary_url",
            ));
        }
        for (key, value) in [
            ("upstream.primary_url", &self.upstream.primary_url),
            ("upstream.replica_url", &self.upstream.replica_url),
        ] {
            if !value.is_empty() {
                UpstreamUrl::parse(value).map_err(|why| invalid(key, mask_url(value), &why))?;
            }
        }
        if !self.upstream.nameserver.is_empty() && self.nameserver().is_none() {
            return Err(invalid(
                "upstream.nameserver",
                &self.upstream.nameserver,
                "an IP address with an optional port, 53 by default: [fdaa::3]:53, fdaa::3, \
                 127.0.0.1:5353; or empty for the system's nameservers from /etc/resolv.conf",
            ));
        }
        for (key, size) in [
            ("pool.primary_size", self.pool.primary_size),
            ("pool.replica_size", self.pool.replica_size),
        ] {
            if size == 0 {
                return Err(invalid(key, size, "at least 1"));
            }
        }
        if self.pool.min_idle > self.pool.primary_size.min(self.pool.replica_size) {
            return Err(invalid(
                "pool.min_idle",
                self.pool.min_idle,
                "at most the smaller of pool.primary_size and pool.replica_size",
            ));
        }
        if !(1..=256).contains(&self.proxy.worker_threads) {
            return Err(invalid(
                "proxy.worker_threads",
                self.proxy.worker_threads,
                "1 to 256",
            ));
        }
        if self.proxy.busy_poll.0 > Duration::from_millis(10) {
            return Err(invalid(
                "proxy.busy_poll",
                self.proxy.busy_poll,
                "at most 10ms (0 turns it off)",
            ));
        }
        if self.pool.pipeline >= self.pool.replica_size {
            return Err(invalid(
                "pool.pipeline",
                self.pool.pipeline,
                "less than pool.replica_size (0 turns pipelining off)",
            ));
        }
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            return Err(invalid(
                "tls.cert/tls.key",
                "one of them empty",
                "both set (PEM files) or both empty",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                &self.log.level,
                "trace, debug, info, warn, error or a tracing filter like pgnear=debug",
            ));
        }
        if self.regions.current.is_empty() != self.regions.primary.is_empty() {
            return Err(invalid(
                "regions.current/regions.primary",
                "one of them empty",
                "both set (FLY_REGION and PRIMARY_REGION) or both empty",
            ));
        }
        Ok(())
    }
}
