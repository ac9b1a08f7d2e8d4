//! The server side: connections to upstreams (startup, auth, TLS) and cancel forwarding.

pub mod conn;
pub mod control;
pub mod health;
