//! Operators' view: the metrics registry and the admin HTTP endpoints.

pub mod http;
pub mod metrics;
