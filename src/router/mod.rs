//! Where statements go: the SQL classifier, its cache, and the routing policy.

pub mod cache;
pub mod classify;
pub mod route;
