//! pgnear: a Postgres wire-protocol sidecar for multi-region apps. Reads go to the local replica,
//! writes to the primary region, and LSN tracking keeps every session reading its own writes.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cancel;
pub mod config;
pub mod consistency;
pub mod discovery;
pub mod error;
pub mod lab;
pub mod listener;
pub mod lsn;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod region;
pub mod role;
pub mod router;
pub mod session;
pub mod shutdown;
pub mod spin;
pub mod tls;
pub mod upstream_url;

pub use proxy::{check_report, Proxy, StartError};
