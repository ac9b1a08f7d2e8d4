//! Operators' view: the admin HTTP endpoints (health, status, metrics).

pub mod http;
