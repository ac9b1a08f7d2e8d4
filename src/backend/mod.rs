//! The server side: connections to upstreams (startup, auth, TLS), their pools, health probes
//! and cancel forwarding.

pub mod conn;
pub mod control;
pub mod health;
pub mod login;
pub mod pool;
