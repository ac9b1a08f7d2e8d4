//! Session state pgnear keeps so that several server connections look like one: the log of
//! SET/RESET/DISCARD to replay on a server that joins later, pins, named prepared statements.

use std::collections::HashMap;
use std::sync::Arc;

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

/// A session's settings as (name, SQL) in the order applied, shared (see `applied_shared`).
pub type Applied = Arc<[(Option<String>, String)]>;

#[derive(Debug)]
pub struct SessionState {
    pub setting: RouteSetting,
    pub pins: Pins,
    /// `default_transaction_read_only` as the client set it.
    pub read_only_default: bool,
    /// The session may have declared a cursor WITH HOLD: a named portal may outlive its
    /// transaction.
    pub hold_cursors: bool,
    /// `default_transaction_isolation` is `serializable` as the client set it: a hot standby
    /// refuses every statement then.
    pub serializable_default: bool,
    log: Vec<Entry>,
    seq: u64,
    /// `applied()` as last computed (`None` once the log changed), shared with pipelined reads.
    snapshot: Option<Applied>,
    /// Named prepared statements: name -> the client's Parse frame, to re-prepare elsewhere.
    pub statements: HashMap<String, Bytes>,
    /// The last unnamed Parse, which travels with a Bind that reaches another server.
    pub unnamed: Option<Bytes>,
    /// Transaction mode: the client's statement names -> the shared server-side names.
    pub names: HashMap<String, String>,
    /// The client's startup settings as (name, SQL): what RESET returns them to on a direct
    /// connection (pgnear's server connections are opened without them).
    startup: Vec<(String, String)>,
    /// The settings made inside the open transaction block, with its savepoints, in order:
    /// the session's once the block commits, gone when it (or the savepoint they follow)
    /// rolls back, as Postgres undoes a SET with the transaction it ran in.
    block: Vec<Step>,
}

impl Default for SessionState {
    fn default() -> Self {
        SessionState {
            setting: RouteSetting::Auto,
            pins: Pins::default(),
            read_only_default: false,
            hold_cursors: false,
            serializable_default: false,
            log: Vec::new(),
            seq: 0,
            snapshot: None,
            statements: HashMap::new(),
            unnamed: None,
            names: HashMap::new(),
            startup: Vec::new(),
            block: Vec::new(),
        }
    }
}

/// A state change a simple query makes, recorded once the server has accepted it.
#[derive(Debug, Clone, Default)]
pub struct PendingState {
    /// What it does to the session's settings and to the transaction block they are made in,
    /// in statement order.
    steps: Vec<Step>,
    /// Its other effects (pins, DEALLOCATE, DISCARD): a rollback does not undo them.
    effects: Vec<Kind>,
}

/// A statement's settings: (GUC name, or `None` for a full reset; the statement's own text),
/// to replay on other servers without the statements around them.
type Settings = Vec<(Option<String>, String)>;

#[derive(Debug, Clone)]
enum Step {
    /// A statement's settings, and its kind.
    Set(Settings, Kind),
    /// SAVEPOINT, RELEASE, ROLLBACK TO, COMMIT (or PREPARE TRANSACTION), ROLLBACK.
    Block(Kind),
}

/// The transaction status a request left, for the settings made in the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockEnd {
    /// Still in a transaction block: its settings wait for its end.
    Open,
    /// Idle: the block (an implicit one too) committed, or there was none.
    Committed,
    /// Idle after a rollback (or a failure) of the block.
    RolledBack,
}

/// Returns a connection's settings to the server's defaults.
const FULL_RESET: &str = "SET SESSION AUTHORIZATION DEFAULT; RESET ALL";

/// A server's `synced` value when what it has applied is known only from its `Carry`
/// (a connection fresh from the pool).
pub const FROM_POOL: u64 = u64::MAX;

/// Startup parameters that are not settings to apply with SET.
const NOT_SETTINGS: [&str; 4] = ["user", "database", "replication", "options"];

impl PendingState {
    /// Whether it pins the session to its server (see `SessionState::apply_pins`).
    pub fn pins(&self) -> bool {
        self.effects.iter().any(|k| {
            matches!(
                k,
                Kind::Listen | Kind::CreateTemp | Kind::AdvisoryLock | Kind::Prepare { .. }
            )
        })
    }

    /// Whether it changes session state (a setting, a pin, …), not only ends a transaction.
    pub fn changes_state(&self) -> bool {
        !self.effects.is_empty() || self.steps.iter().any(|s| matches!(s, Step::Set(..)))
    }

    /// The statements that make its settings, in order, one statement each.
    pub fn setting_statements(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for step in &self.steps {
            if let Step::Set(settings, _) = step {
                let mut last = None;
                for (_, sql) in settings {
                    if last == Some(sql) {
                        continue;
                    }
                    last = Some(sql);
                    match sql.as_str() {
                        FULL_RESET => out.extend(FULL_RESET.split("; ")),
                        sql => out.push(sql),
                    }
                }
            }
        }
        out
    }

    /// Adds the change of a later statement (one Sync of the extended protocol ends both).
    pub fn extend(&mut self, later: PendingState) {
        self.steps.extend(later.steps);
        self.effects.extend(later.effects);
    }

    /// What holds of a request that failed after running the transaction ends `ends` (in
    /// order, each `true` for COMMIT or PREPARE TRANSACTION, `false` for ROLLBACK, as their
    /// CommandComplete said): its steps up to the last of them, which committed or rolled back
    /// there; the failure rolled back the rest. `None`: nothing.
    pub fn settled(mut self, ends: &[bool]) -> Option<PendingState> {
        let mut seen = 0;
        let mut keep = 0;
        for (i, step) in self.steps.iter_mut().enumerate() {
            if seen == ends.len() {
                break;
            }
            if let Step::Block(kind) = step {
                if is_end(kind) {
                    // A COMMIT of a failed block is answered ROLLBACK: it rolled back.
                    if !ends[seen] && *kind != Kind::RollbackTo {
                        *kind = Kind::Rollback;
                    }
                    seen += 1;
                    keep = i + 1;
                }
            }
        }
        if keep == 0 {
            return None;
        }
        self.steps.truncate(keep);
        self.effects.clear();
        Some(self)
    }

    /// Splits off what the transaction ends among its steps settled (see `settled`), when all
    /// of them ran: (that, the rest after the last one).
    pub fn split_settled(self) -> (Option<PendingState>, Option<PendingState>) {
        let Some(last) = self
            .steps
            .iter()
            .rposition(|s| matches!(s, Step::Block(k) if is_end(k)))
        else {
            return (None, Some(self));
        };
        let mut settled = self;
        let rest = PendingState {
            steps: settled.steps.split_off(last + 1),
            effects: std::mem::take(&mut settled.effects),
        };
        (Some(settled), Some(rest))
    }

    /// `changes` in order, as one change (none when there are none).
    pub fn all(changes: impl IntoIterator<Item = PendingState>) -> Option<PendingState> {
        changes.into_iter().reduce(|mut all, c| {
            all.extend(c);
            all
        })
    }

    /// `first` then `then`, as one change (either may be none).
    pub fn join(first: Option<PendingState>, then: Option<PendingState>) -> Option<PendingState> {
        PendingState::all(first.into_iter().chain(then))
    }
}

impl SessionState {
    /// The session's initial state: the client's startup parameters (and `-c name=value` /
    /// `--name=value` items of `options`), applied with SET on every server connection it
    /// uses, since pooled connections are opened without them.
    pub fn from_startup(params: &[(String, String)]) -> Result<SessionState, String> {
        let mut state = SessionState::default();
        let mut settings: Vec<(String, String)> = Vec::new();
        for (k, v) in params {
            if k == "options" {
                settings.extend(parse_options(v)?);
            } else if !NOT_SETTINGS.contains(&k.as_str()) && !k.starts_with("_pq_.") {
                settings.push((k.clone(), v.clone()));
            }
        }
        for (name, value) in settings {
            let name = name.to_ascii_lowercase();
            let sql = format!("SET {} TO {}", quote_name(&name), quote_literal(&value));
            if name == "default_transaction_read_only" {
                state.read_only_default = is_true(&value);
            }
            if name == "default_transaction_isolation" {
                state.serializable_default = is_serializable(&value);
            }
            state
                .log
                .retain(|e| e.name.as_deref() != Some(name.as_str()));
            state.startup.retain(|(n, _)| *n != name);
            state.startup.push((name.clone(), sql.clone()));
            state.seq += 1;
            state.log.push(Entry {
                seq: state.seq,
                name: Some(name),
                sql,
            });
        }
        Ok(state)
    }

    /// The startup settings that statements `kinds` (in order) return to the server's
    /// defaults and do not set again: RESET ALL, DISCARD ALL, RESET of one of them.
    fn reset_startup<'a>(&self, kinds: impl Iterator<Item = &'a Kind>) -> Vec<&(String, String)> {
        let mut reset: Vec<&(String, String)> = Vec::new();
        for k in kinds {
            match k {
                Kind::Reset { name: None } | Kind::Discard { all: true } => {
                    reset = self.startup.iter().collect();
                }
                Kind::Reset { name: Some(n) } => {
                    if let Some(entry) = self.startup.iter().find(|(s, _)| s == n) {
                        reset.retain(|(s, _)| s != n);
                        reset.push(entry);
                    }
                }
                Kind::Set {
                    name, local: false, ..
                } => reset.retain(|(s, _)| s != name),
                _ => {}
            }
        }
        reset
    }

    /// What applies the client's startup settings again after `c`, when it resets them (see
    /// `Purpose::Restore`).
    pub fn restore_after(&self, c: &Classified) -> Option<String> {
        let reset = self.reset_startup(c.statements.iter().map(|s| &s.kind));
        (!reset.is_empty()).then(|| {
            reset
                .iter()
                .map(|(_, sql)| sql.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// The SQL that set `name`, if the session set it (or a reset or multi-setting statement
    /// that may have).
    pub fn setting_sql(&self, name: &str) -> Option<&str> {
        self.log
            .iter()
            .rev()
            .find(|e| e.name.as_deref().is_none_or(|n| n == name))
            .map(|e| e.sql.as_str())
    }

    /// The settings as a server that is in sync has them (kept with the connection).
    pub fn applied(&self) -> Vec<(Option<String>, String)> {
        self.log
            .iter()
            .map(|e| (e.name.clone(), e.sql.clone()))
            .collect()
    }

    /// `applied()`, computed once per change of the settings.
    pub fn applied_shared(&mut self) -> Applied {
        match &self.snapshot {
            Some(s) => s.clone(),
            None => {
                let s: Applied = self.applied().into();
                self.snapshot = Some(s.clone());
                s
            }
        }
    }

    /// What brings a connection that has `applied` (from another session, or from this one
    /// earlier) to this session's settings: nothing when they match, the missing tail when
    /// it has a prefix of them, else a reset and all of them.
    pub fn sync_from(&self, applied: &[(Option<String>, String)]) -> Option<String> {
        sync_steps(applied, self.log.iter().map(|e| (&e.name, e.sql.as_str())))
    }

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
    /// succeeds (`None`: it changes nothing pgnear replays). Savepoints and transaction ends
    /// are part of it when they can undo or keep a setting: behind one of its own, or while
    /// the open block holds some. (Pipelined behind a SET still unanswered, a SAVEPOINT is
    /// not seen to follow it: a ROLLBACK TO it then undoes that SET too.)
    pub fn prepare_change(&self, sql: &str, c: &Classified) -> Option<PendingState> {
        let mut p = PendingState::default();
        for s in &c.statements {
            let mut names = Vec::new();
            match &s.kind {
                Kind::Set {
                    name, local: false, ..
                } => names.push(Some(name.clone())),
                Kind::Reset { name } => names.push(name.clone()),
                Kind::Discard { all: true } => names.push(None),
                Kind::SetSessionCharacteristics {
                    read_only,
                    serializable,
                } => {
                    if read_only.is_some() {
                        names.push(Some("default_transaction_read_only".into()));
                    }
                    if serializable.is_some() {
                        names.push(Some("default_transaction_isolation".into()));
                    }
                    if read_only.is_none() && serializable.is_none() {
                        names.push(Some("default_transaction_deferrable".into()));
                    }
                }
                // A transaction end is always one: a failure after it keeps what it settled
                // (see `PendingState::settled`, which counts them).
                k if is_end(k) => p.steps.push(Step::Block(s.kind.clone())),
                Kind::Savepoint | Kind::Release
                    if !self.block.is_empty() || !p.steps.is_empty() =>
                {
                    p.steps.push(Step::Block(s.kind.clone()));
                }
                _ => {}
            }
            if !names.is_empty() {
                // A statement classified from elsewhere (no text) replays the whole query.
                // DISCARD ALL cannot run inside the transaction block a replayed
                // multi-statement string is: elsewhere, its settings part is what the
                // session has.
                let text = match s.kind {
                    Kind::Discard { all: true } => FULL_RESET,
                    _ => Some(s.text(sql)).filter(|t| !t.is_empty()).unwrap_or(sql),
                };
                let settings = names.into_iter().map(|n| (n, text.to_string())).collect();
                p.steps.push(Step::Set(settings, s.kind.clone()));
            }
            let setting_kind = matches!(
                s.kind,
                Kind::Set { .. } | Kind::Reset { .. } | Kind::SetSessionCharacteristics { .. }
            );
            if is_tracked(&s.kind) && !setting_kind {
                p.effects.push(s.kind.clone());
            }
        }
        (!p.steps.is_empty() || !p.effects.is_empty()).then_some(p)
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

    /// A client's Parse of statement `name` (its name on the server) created nothing: the
    /// client does not have it. In transaction mode `client` is the client's name for it, which
    /// no longer means it; other names for the same text keep the statement.
    pub fn forget_failed_parse(&mut self, name: &str, client: Option<&str>) {
        if let Some(client) = client {
            if self.names.get(client).is_some_and(|n| n == name) {
                self.names.remove(client);
            }
            if self.names.values().any(|n| n == name) {
                return;
            }
        }
        self.statements.remove(name);
    }

    /// Whether `p` drops every prepared statement of the server that runs it (`DEALLOCATE ALL`,
    /// `DISCARD ALL`): pgnear's own and other sessions' shared ones included.
    pub fn drops_statements(p: &PendingState) -> bool {
        p.effects.iter().any(|k| {
            matches!(
                k,
                Kind::Deallocate { name: None } | Kind::Discard { all: true }
            )
        })
    }

    /// The protocol-level statements `p` deallocates by name (`DEALLOCATE name`, session mode:
    /// in transaction mode the client's names are not the server's).
    pub fn deallocated(p: &PendingState) -> Vec<String> {
        p.effects
            .iter()
            .filter_map(|k| match k {
                Kind::Deallocate { name: Some(n) } => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    /// Records a state change the server accepted (`p`; empty for a request that changed
    /// nothing or failed) and how it left the transaction block (`end`); returns the sequence
    /// number the server that ran it is synced to.
    pub fn commit_change(&mut self, p: PendingState, end: BlockEnd) -> u64 {
        for k in &p.effects {
            self.apply_effect(k);
        }
        let committed = self.resolve_block(p.steps, end);
        let mut settings = Vec::new();
        let mut kinds = Vec::new();
        for (s, kind) in committed {
            self.apply_setting(&kind);
            settings.extend(s);
            kinds.push(kind);
        }
        if settings.is_empty() {
            return self.seq;
        }
        self.snapshot = None;
        self.seq += 1;
        for (name, sql) in settings {
            // A later entry for the same name supersedes an earlier one; a full reset, all.
            match &name {
                None => self.log.clear(),
                Some(n) => self.log.retain(|e| e.name.as_deref() != Some(n.as_str())),
            }
            // One statement setting two names is kept once.
            if self
                .log
                .last()
                .is_some_and(|e| e.seq == self.seq && e.sql == sql)
            {
                continue;
            }
            self.log.push(Entry {
                seq: self.seq,
                name,
                sql,
            });
        }
        // The startup settings a reset returned to the server's defaults were applied again
        // behind it (`restore_after`): they are the session's again.
        let restored: Vec<(String, String)> = self
            .reset_startup(kinds.iter().chain(&p.effects))
            .into_iter()
            .cloned()
            .collect();
        for (name, sql) in restored {
            self.log
                .retain(|e| e.name.as_deref() != Some(name.as_str()));
            self.log.push(Entry {
                seq: self.seq,
                name: Some(name),
                sql,
            });
        }
        self.seq
    }

    /// Whether settings made in the open transaction block wait for its end.
    pub fn holds_block(&self) -> bool {
        !self.block.is_empty()
    }

    /// Runs `steps` against the open block (see `block`), then ends it as `end` says: returns
    /// the settings committed, in order. A COMMIT the server answered with ROLLBACK (the block
    /// had failed) rolls back.
    fn resolve_block(&mut self, steps: Vec<Step>, end: BlockEnd) -> Vec<(Settings, Kind)> {
        let is_savepoint = |s: &Step| matches!(s, Step::Block(Kind::Savepoint));
        let last_end = steps.iter().rposition(|s| {
            matches!(
                s,
                Step::Block(Kind::Commit | Kind::Rollback | Kind::PrepareTransaction)
            )
        });
        let mut committed = Vec::new();
        for (i, step) in steps.into_iter().enumerate() {
            match step {
                Step::Set(..) | Step::Block(Kind::Savepoint) => self.block.push(step),
                Step::Block(Kind::Release) => {
                    if let Some(at) = self.block.iter().rposition(is_savepoint) {
                        self.block.remove(at);
                    }
                }
                Step::Block(Kind::RollbackTo) => {
                    let keep = self
                        .block
                        .iter()
                        .rposition(is_savepoint)
                        .map_or(0, |at| at + 1);
                    self.block.truncate(keep);
                }
                Step::Block(Kind::Rollback) => self.block.clear(),
                Step::Block(_) if end == BlockEnd::RolledBack && last_end == Some(i) => {
                    self.block.clear()
                }
                Step::Block(_) => committed.extend(self.take_block()),
            }
        }
        match end {
            BlockEnd::Open => {}
            BlockEnd::Committed => committed.extend(self.take_block()),
            BlockEnd::RolledBack => self.block.clear(),
        }
        committed
    }

    /// The settings of the open block, which ends.
    fn take_block(&mut self) -> Vec<(Settings, Kind)> {
        self.block
            .drain(..)
            .filter_map(|s| match s {
                Step::Set(settings, kind) => Some((settings, kind)),
                Step::Block(_) => None,
            })
            .collect()
    }

    /// What a tracked statement other than a setting does, once it ran.
    fn apply_effect(&mut self, k: &Kind) {
        match k {
            Kind::Unlisten { all: true } => self.pins.listen = false,
            Kind::AdvisoryUnlockAll => self.pins.advisory = false,
            Kind::Deallocate { name: None } => {
                // Protocol-level statements too: the client has none left.
                self.pins.sql_prepare = false;
                self.statements.clear();
                self.names.clear();
            }
            Kind::Discard { all } => {
                self.pins.temp = false;
                if *all {
                    self.pins = Pins::default();
                    self.statements.clear();
                    self.names.clear();
                    self.unnamed = None;
                    self.read_only_default = false;
                    self.serializable_default = false;
                    self.setting = RouteSetting::Auto;
                }
            }
            _ => {}
        }
    }

    /// What a committed setting changes in routing (read-only and serializable defaults; a
    /// DISCARD ALL, never in a block, did so as an effect).
    fn apply_setting(&mut self, k: &Kind) {
        match k {
            Kind::Reset { name: None } => {
                self.read_only_default = false;
                self.serializable_default = false;
            }
            Kind::Reset { name: Some(n) } if n == "default_transaction_read_only" => {
                self.read_only_default = false
            }
            Kind::Reset { name: Some(n) } if n == "default_transaction_isolation" => {
                self.serializable_default = false
            }
            Kind::Set {
                name,
                value,
                local: false,
            } if name == "default_transaction_read_only" => {
                self.read_only_default = is_true(value);
            }
            Kind::Set {
                name,
                value,
                local: false,
            } if name == "default_transaction_isolation" => {
                self.serializable_default = is_serializable(value);
            }
            Kind::SetSessionCharacteristics {
                read_only,
                serializable,
            } => {
                if let Some(ro) = read_only {
                    self.read_only_default = *ro;
                }
                if let Some(s) = serializable {
                    self.serializable_default = *s;
                }
            }
            _ => {}
        }
    }
}

/// Statements whose effect on the session pgnear tracks: settings it replays, pins it holds
/// until released.
/// A statement whose CommandComplete says COMMIT, ROLLBACK or PREPARE TRANSACTION (ROLLBACK TO
/// is answered ROLLBACK too).
pub fn is_end(kind: &Kind) -> bool {
    matches!(
        kind,
        Kind::Commit | Kind::Rollback | Kind::RollbackTo | Kind::PrepareTransaction
    )
}

pub fn is_tracked(kind: &Kind) -> bool {
    matches!(
        kind,
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
    )
}

/// Splits a startup `options` value (`-c a=b -c c=d`, `--a=b`, backslash escapes a space).
fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let item = if w == "-c" {
            words.next().ok_or("\"-c\" without a setting")?
        } else if let Some(rest) = w.strip_prefix("-c").or_else(|| w.strip_prefix("--")) {
            rest.to_string()
        } else {
            return Err(format!(
                "unsupported item {w:?} (pgnear accepts -c name=value and --name=value)"
            ));
        };
        let (name, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not name=value"))?;
        out.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(out)
}

pub fn quote_name(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

pub fn quote_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

fn is_serializable(v: &str) -> bool {
    v.trim()
        .trim_matches(|c| c == '\'' || c == '"')
        .eq_ignore_ascii_case("serializable")
}

fn is_true(v: &str) -> bool {
    let v = v.trim().trim_matches('\'').to_ascii_lowercase();
    matches!(v.as_str(), "on" | "true" | "yes" | "1" | "t" | "y")
}

/// What brings a connection that has `have` applied to the settings `want` (both as
/// `SessionState::applied` gives them): see `SessionState::sync_from`.
pub fn sync_sql(
    have: &[(Option<String>, String)],
    want: &[(Option<String>, String)],
) -> Option<String> {
    sync_steps(have, want.iter().map(|(n, sql)| (n, sql.as_str())))
}

fn sync_steps<'a>(
    have: &[(Option<String>, String)],
    want: impl Iterator<Item = (&'a Option<String>, &'a str)> + Clone,
) -> Option<String> {
    let common = have
        .iter()
        .zip(want.clone())
        .take_while(|((n, sql), (wn, wsql))| n == *wn && sql == wsql)
        .count();
    let mut parts: Vec<&str> = Vec::new();
    if common < have.len() {
        parts.push(FULL_RESET);
        parts.extend(want.map(|(_, sql)| sql));
    } else {
        parts.extend(want.skip(common).map(|(_, sql)| sql));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::classify::classify;

    fn run(state: &mut SessionState, sql: &str) -> u64 {
        run_ending(state, sql, BlockEnd::Committed)
    }

    /// Runs `sql` as one request that leaves the transaction status `end`.
    fn run_ending(state: &mut SessionState, sql: &str, end: BlockEnd) -> u64 {
        let c = classify(sql, &[]);
        let p = state.prepare_change(sql, &c).unwrap_or_default();
        state.apply_pins(&p);
        state.commit_change(p, end)
    }

    /// A script mixing settings with other statements replays its settings alone (asyncpg's
    /// own tests create roles and grant between SET SESSION AUTHORIZATIONs: replaying the whole
    /// script on the replica failed).
    #[test]
    fn replay_takes_only_the_settings_of_a_script() {
        let mut s = SessionState::default();
        run(
            &mut s,
            "CREATE ROLE u1; SET SESSION AUTHORIZATION u1; GRANT SELECT ON a TO u2; \
             SET search_path = x; INSERT INTO t VALUES (1); RESET SESSION AUTHORIZATION",
        );
        assert_eq!(
            s.replay_since(0).unwrap(),
            "SET search_path = x; RESET SESSION AUTHORIZATION"
        );
        run(
            &mut s,
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY",
        );
        assert!(s.serializable_default && s.read_only_default);
        assert_eq!(
            s.replay_since(0).unwrap(),
            "SET search_path = x; RESET SESSION AUTHORIZATION; \
             SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY"
        );
        run(&mut s, "RESET default_transaction_isolation");
        assert!(!s.serializable_default);
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
    fn startup_parameters_become_settings() {
        let params: Vec<(String, String)> = [
            ("user", "app"),
            ("database", "db"),
            ("application_name", "it's"),
            ("DateStyle", "ISO"),
            ("options", "-c search_path=a\\ b --statement-timeout=5s"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = SessionState::from_startup(&params).unwrap();
        assert_eq!(
            s.sync_from(&[]).unwrap(),
            "SET \"application_name\" TO E'it''s'; SET \"datestyle\" TO E'ISO'; \
             SET \"search_path\" TO E'a b'; SET \"statement_timeout\" TO E'5s'"
        );
        assert_eq!(s.sync_from(&s.applied()), None);
        let mut more = SessionState::from_startup(&params).unwrap();
        run(&mut more, "SET work_mem = '8MB'");
        assert_eq!(
            more.sync_from(&s.applied()).unwrap(),
            "SET work_mem = '8MB'"
        );
        assert!(s
            .sync_from(&more.applied())
            .unwrap()
            .starts_with("SET SESSION AUTHORIZATION DEFAULT; RESET ALL; SET \"application_name\""));
        assert!(SessionState::from_startup(&[("options".into(), "-x".into())]).is_err());
        // A shared connection is brought from one session's settings to another's the same way;
        // the snapshot follows each change.
        let (mut a, b) = (more, s);
        let before = a.applied_shared();
        assert_eq!(sync_sql(&b.applied(), &before), a.sync_from(&b.applied()));
        assert_eq!(sync_sql(&before, &b.applied()), b.sync_from(&before));
        assert_eq!(sync_sql(&before, &before), None);
        run(&mut a, "SET work_mem = '16MB'");
        assert_ne!(a.applied_shared(), before);
        assert_eq!(a.applied_shared()[..], a.applied()[..]);
    }

    /// Postgres undoes a SET with the transaction or savepoint it ran in.
    #[test]
    fn settings_follow_the_block_they_ran_in() {
        let open = BlockEnd::Open;
        let mut s = SessionState::default();
        run_ending(&mut s, "BEGIN", open);
        run_ending(&mut s, "SET a.x = 1", open);
        run_ending(&mut s, "SAVEPOINT p", open);
        run_ending(&mut s, "SET a.y = 1", open);
        run_ending(&mut s, "SAVEPOINT q", open);
        run_ending(&mut s, "SET a.z = 1", open);
        run_ending(&mut s, "RELEASE q", open);
        assert_eq!(
            s.replay_since(0),
            None,
            "nothing is the session's before COMMIT"
        );
        run_ending(&mut s, "ROLLBACK TO p", open);
        run_ending(&mut s, "COMMIT", BlockEnd::Committed);
        assert_eq!(s.replay_since(0).unwrap(), "SET a.x = 1");
        // The implicit block of a multi-statement query; a COMMIT answered with ROLLBACK.
        run_ending(
            &mut s,
            "SET a.y = 2; COMMIT; SET a.z = 2; ROLLBACK",
            BlockEnd::RolledBack,
        );
        assert_eq!(s.replay_since(0).unwrap(), "SET a.x = 1; SET a.y = 2");
        run_ending(&mut s, "BEGIN; SET a.z = 3", open);
        run_ending(&mut s, "COMMIT", BlockEnd::RolledBack);
        assert_eq!(s.replay_since(0).unwrap(), "SET a.x = 1; SET a.y = 2");
        assert!(!s.holds_block());
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

    fn change(state: &SessionState, sql: &str) -> PendingState {
        state.prepare_change(sql, &classify(sql, &[])).unwrap()
    }

    #[test]
    fn a_failure_keeps_what_an_end_before_it_settled() {
        let mut s = SessionState::default();
        let sql = "SET a.x = '1'; COMMIT; SET a.y = '2'; SELECT 1/0";
        let p = change(&s, sql);
        // No end ran: nothing holds.
        assert!(p.clone().settled(&[]).is_none());
        let kept = p.clone().settled(&[true]).unwrap();
        assert_eq!(kept.setting_statements(), ["SET a.x = '1'"]);
        s.commit_change(kept, BlockEnd::Committed);
        assert_eq!(s.setting_sql("a.x"), Some("SET a.x = '1'"));
        assert_eq!(s.setting_sql("a.y"), None);
        // A COMMIT answered ROLLBACK (its block had failed) rolled back.
        let mut s = SessionState::default();
        s.commit_change(p.settled(&[false]).unwrap(), BlockEnd::Committed);
        assert_eq!(s.setting_sql("a.x"), None);
    }

    #[test]
    fn an_exchange_splits_at_its_last_end() {
        let s = SessionState::default();
        let (settled, rest) = change(&s, "SET a.x = '1'; COMMIT; SET a.y = '2'").split_settled();
        assert_eq!(settled.unwrap().setting_statements(), ["SET a.x = '1'"]);
        assert_eq!(rest.unwrap().setting_statements(), ["SET a.y = '2'"]);
        let (settled, rest) = change(&s, "SET a.z = '3'").split_settled();
        assert!(settled.is_none());
        assert_eq!(rest.unwrap().setting_statements(), ["SET a.z = '3'"]);
        // DISCARD ALL runs elsewhere as its two statements.
        assert_eq!(
            change(&s, "DISCARD ALL").setting_statements(),
            ["SET SESSION AUTHORIZATION DEFAULT", "RESET ALL"]
        );
    }
}
