//! pgnear's own BackendKeyData per client, and where a CancelRequest for it must go.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rand::Rng;
use subtle::ConstantTimeEq;

/// The server-side key of the connection currently running a client's query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: Vec<u8>,
}

pub type CancelSlot = Arc<Mutex<Option<CancelTarget>>>;

#[derive(Default)]
pub struct CancelRegistry {
    entries: Mutex<HashMap<i32, (i32, CancelSlot)>>,
}

/// Removes the client's key from the registry when the session ends.
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
    pub slot: CancelSlot,
    registry: Arc<CancelRegistry>,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        if let Ok(mut e) = self.registry.entries.lock() {
            e.remove(&self.pid);
        }
    }
}

impl CancelRegistry {
    /// Issues a fresh (pid, secret) for a client.
    pub fn register(self: &Arc<Self>) -> CancelKey {
        let mut rng = rand::rng();
        let slot: CancelSlot = Arc::default();
        let mut entries = self.entries.lock().expect("cancel registry poisoned");
        let pid = loop {
            let pid = rng.random_range(1..i32::MAX);
            if !entries.contains_key(&pid) {
                break pid;
            }
        };
        let secret = rng.random::<i32>();
        entries.insert(pid, (secret, slot.clone()));
        CancelKey {
            pid,
            secret,
            slot,
            registry: self.clone(),
        }
    }

    /// The pid pgnear gave the client whose session holds the server connection `pid` at
    /// `addr`, if one does (notifications name their sender by it, as a direct connection's
    /// `pg_backend_pid()` and BackendKeyData agree).
    pub fn client_pid(&self, addr: SocketAddr, pid: i32) -> Option<i32> {
        let entries = self.entries.lock().ok()?;
        entries.iter().find_map(|(client, (_, slot))| {
            let slot = slot.lock().ok()?;
            slot.as_ref()
                .filter(|t| t.pid == pid && t.addr == addr)
                .map(|_| *client)
        })
    }

    /// Where to send a cancel for (pid, secret), if the key is valid and a query may be running.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<CancelTarget> {
        let entries = self.entries.lock().ok()?;
        let (expected, slot) = entries.get(&pid)?;
        // In constant time: how long the comparison takes says nothing about the secret.
        if !bool::from(secret.ct_eq(&expected.to_be_bytes())) {
            return None;
        }
        let target = slot.lock().ok()?.clone();
        target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_lookup_and_drop() {
        let reg = Arc::new(CancelRegistry::default());
        let key = reg.register();
        assert_eq!(reg.lookup(key.pid, &key.secret.to_be_bytes()), None);
        let target = CancelTarget {
            addr: "127.0.0.1:5432".parse().unwrap(),
            pid: 42,
            secret: vec![1, 2, 3, 4],
        };
        *key.slot.lock().unwrap() = Some(target.clone());
        assert_eq!(
            reg.lookup(key.pid, &key.secret.to_be_bytes()),
            Some(target.clone())
        );
        assert_eq!(reg.client_pid(target.addr, 42), Some(key.pid));
        assert_eq!(reg.client_pid(target.addr, 43), None);
        assert_eq!(reg.client_pid("127.0.0.1:5433".parse().unwrap(), 42), None);
        assert_eq!(
            reg.lookup(key.pid, &key.secret.wrapping_add(1).to_be_bytes()),
            None
        );
        // A secret of another length (a client's malformed packet) never matches.
        assert_eq!(reg.lookup(key.pid, &key.secret.to_be_bytes()[..3]), None);
        assert_eq!(reg.lookup(key.pid, &[]), None);
        let pid = key.pid;
        drop(key);
        assert!(reg.entries.lock().unwrap().get(&pid).is_none());
    }
}
