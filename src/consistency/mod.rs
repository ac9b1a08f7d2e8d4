//! Read-your-writes: the shared replica watcher, and the gate that decides whether a read may
//! use the replica now. (WAL positions themselves are the leaf `crate::lsn`.)

pub mod gate;
pub mod watcher;
