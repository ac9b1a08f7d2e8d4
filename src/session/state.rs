//! Session state pgnear keeps so that several server connections look like one: the log of
//! SET/RESET/DISCARD to replay on a server that joins later, pins, named prepared statements.

use std::collections::HashMap;

use bytes::Bytes;

use crate::router::classify::{Classified, Kind};
use crate::router::route::RouteSetting;

/// Why the session must stay on the primary.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pins {
    pub listen: bool,
    pub temp: bool,
    pub advisory: bool,
    pub sql_prepare: bool,
    /// Session state changed through the extended protocol (not replayed: kept on one server).
    pub extended_state: bool,
}

impl Pins {
    pub fn any(&self) -> bool {
        self.listen || self.temp || self.advisory || self.sql_prepare || self.extended_state
    }
}

/// One statement of the replay log.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    /// GUC name, or `None` for statements that reset everything (RESET ALL, DISCARD ALL).
    name: Option<String>,
    sql: String,
}

#[derive(Debug)]
pub struct SessionState {
    pub setting: RouteSetting,
    pub pins: Pins,
    /// `default_transaction_read_only` as the client set it.
    pub read_only_default: bool,
    log: Vec<Entry>,
    seq: u64,
    /// Named prepared statements: name -> the client's Parse frame, to re-prepare elsewhere.
    pub statements: HashMap<String, Bytes>,
    /// The last unnamed Parse, which travels with a Bind that reaches another server.
    pub unnamed: Option<Bytes>,
}

impl Default for SessionState {
    fn default() -> Self {
        SessionState {
            setting: RouteSetting::Auto,
            pins: Pins::default(),
            read_only_default: false,
            log: Vec::new(),
            seq: 0,
            statements: HashMap::new(),
            unnamed: None,
        }
    }
}

/// A state change a simple query makes, recorded once the server has accepted it.
#[derive(Debug, Clone)]
pub struct PendingState {
    sql: String,
    names: Vec<Option<String>>,
    effects: Vec<Kind>,
}

impl PendingState {
    /// Adds the change of a later statement (one Sync of the extended protocol ends both).
    pub fn extend(&mut self, later: PendingState) {
        self.sql = format!("{}; {}", self.sql, later.sql);
        self.names.extend(later.names);
        self.effects.extend(later.effects);
    }
}

impl SessionState {
    /// The sequence number a freshly synced server is at.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// What must run on a server synced up to `seq` to catch up, as one query string.
    pub fn replay_since(&self, seq: u64) -> Option<String> {
        let parts: Vec<&str> = self
            .log
            .iter()
            .filter(|e| e.seq > seq)
            .map(|e| e.sql.as_str())
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// Looks at a simple query before it is sent: returns the state change to record if it
    /// succeeds (`None`: it changes nothing pgnear replays).
    pub fn prepare_change(&self, sql: &str, c: &Classified) -> Option<PendingState> {
        let mut names = Vec::new();
        let mut effects = Vec::new();
        for s in &c.statements {
            match &s.kind {
                Kind::Set {
                    name, local: false, ..
                } => names.push(Some(name.clone())),
                Kind::Reset { name } => names.push(name.clone()),
                Kind::Discard { all: true } => names.push(None),
                Kind::SetSessionCharacteristics { .. } => {
                    names.push(Some("default_transaction_read_only".into()))
                }
                _ => {}
            }
            if matches!(
                s.kind,
                Kind::Listen
                    | Kind::Unlisten { .. }
                    | Kind::CreateTemp
                    | Kind::AdvisoryLock
                    | Kind::AdvisoryUnlockAll
                    | Kind::Prepare { .. }
                    | Kind::Deallocate { .. }
                    | Kind::Discard { .. }
                    | Kind::Set { .. }
                    | Kind::Reset { .. }
                    | Kind::SetSessionCharacteristics { .. }
            ) {
                effects.push(s.kind.clone());
            }
        }
        (!effects.is_empty()).then(|| PendingState {
            sql: sql.to_string(),
            names,
            effects,
        })
    }

    /// Pins take effect as soon as the statement is sent (pipelined statements must follow it).
    pub fn apply_pins(&mut self, p: &PendingState) {
        for k in &p.effects {
            match k {
                Kind::Listen => self.pins.listen = true,
                Kind::CreateTemp => self.pins.temp = true,
                Kind::AdvisoryLock => self.pins.advisory = true,
                Kind::Prepare { .. } => self.pins.sql_prepare = true,
                _ => {}
            }
        }
    }

    /// Records a state change the server accepted; returns the new sequence number (the server
    /// that ran it is synced to it).
    pub fn commit_change(&mut self, p: PendingState) -> u64 {
        for k in &p.effects {
            match k {
                Kind::Unlisten { all: true } => self.pins.listen = false,
                Kind::AdvisoryUnlockAll => self.pins.advisory = false,
                Kind::Deallocate { name: None } => self.pins.sql_prepare = false,
                Kind::Discard { all } => {
                    self.pins.temp = false;
                    if *all {
                        self.pins = Pins::default();
                        self.statements.clear();
                        self.unnamed = None;
                        self.read_only_default = false;
                        self.setting = RouteSetting::Auto;
                    }
                }
                Kind::Reset { name: None } => self.read_only_default = false,
                Kind::Reset { name: Some(n) } if n == "default_transaction_read_only" => {
                    self.read_only_default = false
                }
                Kind::Set {
                    name,
                    value,
                    local: false,
                } if name == "default_transaction_read_only" => {
                    self.read_only_default = is_true(value);
                }
                Kind::SetSessionCharacteristics {
                    read_only: Some(ro),
                } => self.read_only_default = *ro,
                _ => {}
            }
        }
        if p.names.is_empty() {
            return self.seq;
        }
        // Later entries for the same name supersede earlier ones; a full reset supersedes all.
        for name in &p.names {
            match name {
                None => self.log.clear(),
                Some(n) => self.log.retain(|e| e.name.as_deref() != Some(n.as_str())),
            }
        }
        self.seq += 1;
        let name = if p.names.len() == 1 {
            p.names[0].clone()
        } else {
            None
        };
        self.log.push(Entry {
            seq: self.seq,
            name,
            sql: p.sql,
        });
        self.seq
    }
}

fn is_true(v: &str) -> bool {
    let v = v.trim().trim_matches('\'').to_ascii_lowercase();
    matches!(v.as_str(), "on" | "true" | "yes" | "1" | "t" | "y")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::classify::classify;

    fn run(state: &mut SessionState, sql: &str) -> u64 {
        let c = classify(sql, &[]);
        match state.prepare_change(sql, &c) {
            Some(p) => {
                state.apply_pins(&p);
                state.commit_change(p)
            }
            None => state.seq(),
        }
    }

    #[test]
    fn replay_log_keeps_latest_per_name() {
        let mut s = SessionState::default();
        run(&mut s, "SET search_path = a");
        let after_first = s.seq();
        run(&mut s, "SET statement_timeout = '5s'");
        run(&mut s, "SET search_path = b");
        assert_eq!(
            s.replay_since(0).unwrap(),
            "SET statement_timeout = '5s'; SET search_path = b"
        );
        assert_eq!(
            s.replay_since(after_first).unwrap(),
            "SET statement_timeout = '5s'; SET search_path = b"
        );
        run(&mut s, "RESET ALL");
        assert_eq!(s.replay_since(0).unwrap(), "RESET ALL");
        assert_eq!(s.replay_since(s.seq()), None);
        run(&mut s, "SELECT 1");
        assert_eq!(s.replay_since(s.seq()), None);
    }

    #[test]
    fn pins_and_releases() {
        let mut s = SessionState::default();
        run(&mut s, "LISTEN jobs");
        assert!(s.pins.listen && s.pins.any());
        run(&mut s, "UNLISTEN *");
        assert!(!s.pins.any());
        run(&mut s, "CREATE TEMP TABLE x (a int)");
        run(&mut s, "SELECT pg_advisory_lock(1)");
        assert!(s.pins.temp && s.pins.advisory);
        run(&mut s, "DISCARD ALL");
        assert!(!s.pins.any());
        run(&mut s, "SET default_transaction_read_only = on");
        assert!(s.read_only_default);
        run(&mut s, "RESET default_transaction_read_only");
        assert!(!s.read_only_default);
    }
}
