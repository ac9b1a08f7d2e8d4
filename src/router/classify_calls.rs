//! The classifier's scan of a statement's tokens for function calls and write markers
//! (`nextval`, session advisory locks, `SELECT ... INTO`, locking clauses, data-modifying CTEs).

use super::lex::{ident_body, text, T};
use super::{Cur, Kind, DML};

/// Function calls and write markers found in a statement.
#[derive(Default)]
pub(super) struct Scan {
    write: bool,
    lock: bool,
    unlock_all: bool,
    /// `SELECT ... INTO TEMP t`: creates a temporary table.
    into_temp: bool,
}

impl Scan {
    pub(super) fn kind(&self, otherwise: Kind) -> Kind {
        match (self.lock, self.unlock_all, self.into_temp, self.write) {
            (true, ..) => Kind::AdvisoryLock,
            (_, true, ..) => Kind::AdvisoryUnlockAll,
            (_, _, true, _) => Kind::CreateTemp,
            (.., true) => Kind::Write,
            _ => otherwise,
        }
    }
}

/// Session-level advisory lock functions.
const SESSION_LOCKS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// Built-in functions with effects a replica cannot have (or that are bound to one session).
#[rustfmt::skip]
const WRITE_FUNCTIONS: &[&str] = &[
    "nextval", "setval", "lastval", "txid_current", "txid_current_if_assigned",
    "pg_current_xact_id", "pg_current_xact_id_if_assigned", "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared", "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared", "pg_advisory_unlock", "pg_advisory_unlock_shared",
    "pg_notify", "set_config", "pg_switch_wal", "pg_create_restore_point", "pg_terminate_backend",
    "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_logical_emit_message",
    "pg_create_physical_replication_slot", "pg_create_logical_replication_slot",
    "pg_drop_replication_slot", "pg_stat_reset", "pg_stat_reset_shared", "pg_promote",
    "pg_wal_replay_pause", "pg_wal_replay_resume", "lo_create", "lo_creat", "lo_import",
    "lo_export", "lo_unlink", "lo_open", "lo_write", "lowrite", "lo_put", "lo_from_bytea",
    "lo_truncate", "lo_truncate64", "dblink_exec",
];

/// Scans all tokens for calls of known functions; with `query` also for locking clauses,
/// `INTO` and data-modifying statements nested in a query.
pub(super) fn scan(c: &Cur, wf: &[String], query: bool) -> Scan {
    let (src, toks) = (c.src, c.toks);
    let mut sc = Scan::default();
    for (i, t) in toks.iter().enumerate() {
        if !matches!(t.t, T::Word | T::QIdent) {
            continue;
        }
        if c.t(i + 1) == Some(T::LParen) {
            let qual = match i.checked_sub(2).map(|q| toks[q]) {
                Some(q) if toks[i - 1].t == T::Dot && matches!(q.t, T::Word | T::QIdent) => {
                    Some(ident_body(src, q))
                }
                _ => None,
            };
            call(ident_body(src, *t), qual, wf, &mut sc);
        }
        if !query || t.t != T::Word {
            continue;
        }
        let w = text(src, *t);
        if w.eq_ignore_ascii_case("for") {
            sc.write |= c.kw_in(i + 1, &["update", "share"])
                || (c.kw_at(i + 1, "no") && c.kw_at(i + 2, "key"))
                || (c.kw_at(i + 1, "key") && c.kw_at(i + 2, "share"));
        } else if w.eq_ignore_ascii_case("into") {
            sc.write = true;
            let at = i + 1 + usize::from(c.kw_in(i + 1, &["local", "global"]));
            sc.into_temp |= c.kw_in(at, &["temp", "temporary"]);
        } else if c.kw_in(i, DML) {
            sc.write |= i > 0 && matches!(toks[i - 1].t, T::LParen | T::RParen);
        }
    }
    sc
}

fn call(name: &str, qual: Option<&str>, wf: &[String], sc: &mut Scan) {
    let is = |list: &[&str]| list.iter().any(|f| f.eq_ignore_ascii_case(name));
    if is(SESSION_LOCKS) {
        sc.lock = true;
    } else if name.eq_ignore_ascii_case("pg_advisory_unlock_all") {
        sc.unlock_all = true;
    } else if is(WRITE_FUNCTIONS) || wf.iter().any(|f| user_fn_matches(f, name, qual)) {
        sc.write = true;
    }
}

fn user_fn_matches(entry: &str, name: &str, qual: Option<&str>) -> bool {
    let same = |a: &str, b: &str| a.trim().trim_matches('"').eq_ignore_ascii_case(b);
    match entry.trim().rsplit_once('.') {
        Some((schema, f)) => same(f, name) && qual.is_none_or(|q| same(schema, q)),
        None => same(entry, name),
    }
}
