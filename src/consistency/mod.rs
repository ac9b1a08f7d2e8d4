//! Read-your-writes: WAL positions, the shared replica watcher, and the gate that decides
//! whether a read may use the replica now.

pub mod gate;
pub mod lsn;
pub mod watcher;

pub use lsn::Lsn;
