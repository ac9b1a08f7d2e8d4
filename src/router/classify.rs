//! SQL statement classifier: a hand-written lexer plus a shallow recogniser that tells the router
//! whether a query string may run on a replica.
//!
//! The lexer lives in `classify_lex.rs`. Pure (no I/O), never panics, allocation-light: one `Vec`
//! of 12-byte tokens per call, and `String`s only for names carried in the result (SET, PREPARE,
//! ...). Everything it does not understand is [`Kind::Write`] (fail closed).
//!
//! Deliberate limitations:
//! - A user-defined function that writes is only seen if it is in `write_functions`; a
//!   `SELECT f()` of an unknown function is a read (the proxy retries on SQLSTATE 25006).
//! - Functions reached indirectly (casts to `regproc`, `EXECUTE` inside a DO body, views,
//!   triggers) are invisible.
//! - `INSERT`/`UPDATE`/`DELETE`/`MERGE` right after `(` or `)` in a query, any `INTO`, and
//!   `FOR UPDATE|SHARE|NO KEY|KEY SHARE` anywhere make it a write, even where the word is really
//!   an unquoted column name (false positives only go to the primary).
//! - `SET CONSTRAINTS` is a plain `Write` (transaction-scoped, never session state).

#[path = "classify_lex.rs"]
mod lex;

use lex::{ident_body, lex, text, unquote_str, Tok, T};

/// A routing hint found in a comment: `/* pgnear:primary */` or `/* pgnear:replica */`.
/// When both appear, `Primary` wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Primary,
    Replica,
}

/// What one statement is, as far as routing and session state are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Empty statement, or only comments / semicolons.
    Empty,
    /// Replica-eligible.
    Read,
    /// Must go to the primary; also anything not understood.
    Write,
    Begin {
        read_only: bool,
    },
    Commit,
    Rollback,
    Savepoint,
    Release,
    RollbackTo,
    PrepareTransaction,
    CommitPrepared,
    RollbackPrepared,
    SetTransaction {
        read_only: Option<bool>,
    },
    /// `SET SESSION CHARACTERISTICS AS TRANSACTION ...`: the READ ONLY/WRITE and whether the
    /// isolation level set is SERIALIZABLE (`None`: not set).
    SetSessionCharacteristics {
        read_only: Option<bool>,
        serializable: Option<bool>,
    },
    /// `SET [SESSION|LOCAL] name {TO|=} value`; `name` lowercased unless quoted, `value` is the
    /// trimmed source text.
    Set {
        name: String,
        value: String,
        local: bool,
    },
    /// `RESET name`; `None` for `RESET ALL`.
    Reset {
        name: Option<String>,
    },
    Discard {
        all: bool,
    },
    Listen,
    Unlisten {
        all: bool,
    },
    CreateTemp,
    /// Calls a session-level advisory lock function (takes precedence over Read/Write).
    AdvisoryLock,
    /// Calls `pg_advisory_unlock_all()`.
    AdvisoryUnlockAll,
    Prepare {
        name: String,
    },
    Execute {
        name: String,
    },
    Deallocate {
        name: Option<String>,
    },
    /// `SET pgnear.<name> = value` (name without the prefix, lowercased; value unquoted).
    PgnearSet {
        name: String,
        value: String,
    },
    PgnearShow {
        name: String,
    },
    /// `RESET pgnear.<name>`; the classifier never produces `None` (`RESET ALL` is `Reset`).
    PgnearReset {
        name: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub kind: Kind,
    /// Where its text lies in the query string (byte offsets, on char boundaries): a session
    /// setting is replayed elsewhere as this text alone, not with the statements around it.
    pub span: (u32, u32),
}

impl Statement {
    /// A statement of `kind` with no known text.
    pub fn of(kind: Kind) -> Statement {
        Statement { kind, span: (0, 0) }
    }

    /// The statement's text within `sql`, the query string it was classified from.
    pub fn text<'a>(&self, sql: &'a str) -> &'a str {
        sql.get(self.span.0 as usize..self.span.1 as usize)
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// One entry per non-empty statement; a single `Empty` when there are none.
    pub statements: Vec<Statement>,
    pub hint: Option<Hint>,
}

impl Classified {
    /// True when every statement is `Read` or `Empty` (an empty string is a read).
    pub fn is_read(&self) -> bool {
        self.statements
            .iter()
            .all(|s| matches!(s.kind, Kind::Read | Kind::Empty))
    }
}

/// Classifies a (possibly multi-statement) query string.
/// `write_functions` are extra function names that write: `name` matches any schema,
/// `schema.name` matches calls qualified with that schema or not qualified at all.
pub fn classify(sql: &str, write_functions: &[String]) -> Classified {
    if sql.len() > u32::MAX as usize {
        let statements = vec![Statement::of(Kind::Write)];
        return Classified {
            statements,
            hint: None,
        };
    }
    let (toks, hint) = lex(sql);
    let mut statements = Vec::new();
    let mut push = |toks: &[Tok]| {
        if !toks.is_empty() {
            let kind = statement(&Cur::new(sql, toks), write_functions);
            let span = (toks[0].s, toks[toks.len() - 1].e);
            statements.push(Statement { kind, span });
        }
    };
    let (mut start, mut depth, mut atomic) = (0usize, 0i64, 0u32);
    for (i, t) in toks.iter().enumerate() {
        match t.t {
            T::LParen => depth += 1,
            T::RParen => depth -= 1,
            T::Semi if depth <= 0 && atomic == 0 => {
                push(&toks[start..i]);
                (start, depth) = (i + 1, 0);
            }
            // `CREATE FUNCTION ... BEGIN ATOMIC ...; ...; END` keeps its semicolons; CASE also
            // ends with END.
            T::Word if depth == 0 => {
                let w = text(sql, *t);
                let opens = (w.eq_ignore_ascii_case("begin") && kw(sql, toks.get(i + 1), "atomic"))
                    || (atomic > 0 && w.eq_ignore_ascii_case("case"));
                if opens {
                    atomic += 1;
                } else if atomic > 0 && w.eq_ignore_ascii_case("end") {
                    atomic -= 1;
                }
            }
            _ => {}
        }
    }
    push(&toks[start..]);
    if statements.is_empty() {
        statements.push(Statement::of(Kind::Empty));
    }
    let hint = if needs_primary(sql, &toks) {
        Some(Hint::Primary)
    } else {
        hint
    };
    Classified { statements, hint }
}

/// Settings a hot standby shows differently from the primary: read on the replica, they would
/// reveal it (libpq's `target_session_attrs=read-write` probes `transaction_read_only`).
const STANDBY_REVEALING: &[&str] = &[
    "transaction_read_only",
    "default_transaction_read_only",
    "in_hot_standby",
];

/// Whether a statement must read on the primary even though it is a read: it names a setting
/// in [`STANDBY_REVEALING`] (as a word or a string, e.g. in `current_setting('...')`), or an
/// object in the session's temporary schema (`pg_temp.x`), which exists only there.
fn needs_primary(sql: &str, toks: &[Tok]) -> bool {
    toks.iter().enumerate().any(|(i, t)| {
        let name = match t.t {
            T::Word | T::QIdent => ident_body(sql, *t),
            T::Str => {
                let s = text(sql, *t);
                s.strip_prefix('\'')
                    .and_then(|s| s.strip_suffix('\''))
                    .unwrap_or("")
            }
            _ => return false,
        };
        STANDBY_REVEALING
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
            || (is_pg_temp(name) && toks.get(i + 1).is_some_and(|d| d.t == T::Dot))
    })
}

/// `pg_temp`, or a backend's own `pg_temp_N`.
fn is_pg_temp(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 7
        && b[..7].eq_ignore_ascii_case(b"pg_temp")
        && (b.len() == 7 || (b[7] == b'_' && b[8..].iter().all(u8::is_ascii_digit)))
}

/// The database a `DROP DATABASE`, `ALTER DATABASE ... RENAME` or `CREATE DATABASE ...
/// TEMPLATE` acts on: Postgres refuses them while any other session is connected to it.
pub fn database_lifecycle(sql: &str) -> Option<String> {
    let first = sql.trim_start().get(..6)?;
    if !["drop", "alter", "create"]
        .iter()
        .any(|w| first.len() >= w.len() && first[..w.len()].eq_ignore_ascii_case(w))
    {
        return None;
    }
    let (toks, _) = lex(sql);
    let mut c = Cur::new(sql, &toks);
    if c.eat("drop") && c.eat("database") {
        if c.is("if") && c.kw_at(c.i + 1, "exists") {
            c.i += 2;
        }
        return c.name();
    }
    if c.eat("alter") && c.eat("database") {
        let name = c.name()?;
        return c.is("rename").then_some(name);
    }
    if c.eat("create") && c.eat("database") {
        let at = (c.i..toks.len()).find(|&i| c.kw_at(i, "template"))?;
        c.i = at + 1;
        if c.toks.get(c.i).is_some_and(|t| text(sql, *t) == "=") {
            c.i += 1;
        }
        return c.name();
    }
    None
}

fn kw(src: &str, t: Option<&Tok>, word: &str) -> bool {
    t.is_some_and(|t| t.t == T::Word && text(src, *t).eq_ignore_ascii_case(word))
}

/// `k` if `ok`, else `Write`.
fn ok(ok: bool, k: Kind) -> Kind {
    if ok {
        k
    } else {
        Kind::Write
    }
}

const QUERY_START: &[&str] = &["select", "values", "table", "with"];
const DML: &[&str] = &["insert", "update", "delete", "merge"];

/// A cursor over the tokens of one statement.
struct Cur<'a> {
    src: &'a str,
    toks: &'a [Tok],
    i: usize,
}

impl<'a> Cur<'a> {
    fn new(src: &'a str, toks: &'a [Tok]) -> Self {
        Cur { src, toks, i: 0 }
    }
    fn sub(&self, from: usize, to: usize) -> Cur<'a> {
        let toks = &self.toks[from..to];
        Cur {
            toks,
            i: 0,
            ..*self
        }
    }
    fn t(&self, i: usize) -> Option<T> {
        self.toks.get(i).map(|t| t.t)
    }
    fn kw_at(&self, i: usize, word: &str) -> bool {
        kw(self.src, self.toks.get(i), word)
    }
    fn kw_in(&self, i: usize, words: &[&str]) -> bool {
        words.iter().any(|w| self.kw_at(i, w))
    }
    fn is(&self, word: &str) -> bool {
        self.kw_at(self.i, word)
    }
    fn eat(&mut self, word: &str) -> bool {
        let hit = self.is(word);
        self.i += usize::from(hit);
        hit
    }
    fn done(&self) -> bool {
        self.i >= self.toks.len()
    }
    fn is_assign(&self, i: usize) -> bool {
        let eq = |t: &Tok| t.t == T::Op && text(self.src, *t) == "=";
        self.kw_at(i, "to") || self.toks.get(i).is_some_and(eq)
    }
    /// Skips a parenthesised group if one starts here.
    fn skip_parens(&mut self) {
        if self.t(self.i) == Some(T::LParen) {
            self.i = self.close(self.i) + 1;
        }
    }
    /// Index of the first token after any leading `(`.
    fn after_parens(&self) -> usize {
        self.toks.iter().take_while(|t| t.t == T::LParen).count()
    }
    /// One identifier token as a name: unquoted lowercased, quoted as written.
    fn name(&mut self) -> Option<String> {
        let t = *self.toks.get(self.i)?;
        let name = match t.t {
            T::Word => text(self.src, t).to_ascii_lowercase(),
            T::QIdent => ident_body(self.src, t).replace("\"\"", "\""),
            _ => return None,
        };
        self.i += 1;
        Some(name)
    }
    /// `a.b.c` with each part as in [`Cur::name`].
    fn dotted_name(&mut self) -> Option<String> {
        let mut name = self.name()?;
        while self.t(self.i) == Some(T::Dot) {
            self.i += 1;
            name.push('.');
            name.push_str(&self.name()?);
        }
        Some(name)
    }
    /// A single name that ends the statement.
    fn last_name(&mut self) -> Option<String> {
        self.name().filter(|_| self.done())
    }
    /// Index of the `)` matching the `(` at `open` (parentheses are known to be balanced).
    fn close(&self, open: usize) -> usize {
        let mut depth = 0i64;
        for (k, t) in self.toks.iter().enumerate().skip(open) {
            match t.t {
                T::LParen => depth += 1,
                T::RParen if depth == 1 => return k,
                T::RParen => depth -= 1,
                _ => {}
            }
        }
        self.toks.len()
    }
}

fn statement(c: &Cur, wf: &[String]) -> Kind {
    let mut depth = 0i64;
    for t in c.toks {
        match t.t {
            T::LParen => depth += 1,
            T::RParen => depth -= 1,
            T::Error | T::Semi => return Kind::Write, // `;` inside parentheses or BEGIN ATOMIC
            _ => {}
        }
        if depth < 0 {
            return Kind::Write;
        }
    }
    let first = c.toks[0];
    if depth != 0 || !matches!(first.t, T::Word | T::LParen) {
        return Kind::Write;
    }
    if first.t == T::LParen {
        return query(c, wf);
    }
    let mut buf = [0u8; 12];
    let w = text(c.src, first).as_bytes();
    let w = buf.get_mut(..w.len()).map_or(&b""[..], |dst| {
        dst.copy_from_slice(w);
        dst.make_ascii_lowercase();
        dst
    });
    let mut c = Cur { i: 1, ..*c };
    match w {
        b"select" | b"values" | b"table" | b"with" => query(&c, wf),
        b"show" => show(&mut c),
        b"explain" => explain(&c, wf),
        b"copy" => copy(&c, wf),
        b"begin" => {
            let _ = c.eat("work") || c.eat("transaction");
            begin(&mut c)
        }
        b"start" if c.eat("transaction") => begin(&mut c),
        b"commit" if c.eat("prepared") => one_string(&c, Kind::CommitPrepared),
        b"commit" | b"end" => chain_tail(&mut c, Kind::Commit),
        b"rollback" if c.eat("prepared") => one_string(&c, Kind::RollbackPrepared),
        b"rollback" => {
            let _ = c.eat("work") || c.eat("transaction");
            if c.eat("to") {
                c.eat("savepoint");
                ok(c.last_name().is_some(), Kind::RollbackTo)
            } else {
                chain_tail(&mut c, Kind::Rollback)
            }
        }
        b"abort" => chain_tail(&mut c, Kind::Rollback),
        b"savepoint" => ok(c.last_name().is_some(), Kind::Savepoint),
        b"release" => {
            c.eat("savepoint");
            ok(c.last_name().is_some(), Kind::Release)
        }
        b"prepare" if c.eat("transaction") => one_string(&c, Kind::PrepareTransaction),
        b"prepare" => match c.name() {
            Some(name) => {
                c.skip_parens();
                ok(c.eat("as") && !c.done(), Kind::Prepare { name })
            }
            None => Kind::Write,
        },
        b"execute" => match c.name() {
            Some(name) => {
                c.skip_parens();
                ok(c.done(), Kind::Execute { name })
            }
            None => Kind::Write,
        },
        b"deallocate" => {
            c.eat("prepare");
            if c.eat("all") {
                ok(c.done(), Kind::Deallocate { name: None })
            } else {
                c.last_name()
                    .map_or(Kind::Write, |n| Kind::Deallocate { name: Some(n) })
            }
        }
        b"set" => set(&mut c),
        b"reset" => reset(&mut c),
        b"discard" => {
            let known = c.kw_in(1, &["all", "plans", "sequences", "temp", "temporary"]);
            let all = c.is("all");
            ok(known && c.toks.len() == 2, Kind::Discard { all })
        }
        b"listen" => ok(c.last_name().is_some(), Kind::Listen),
        b"unlisten" if c.toks.len() == 2 && text(c.src, c.toks[1]) == "*" => {
            Kind::Unlisten { all: true }
        }
        b"unlisten" => ok(c.last_name().is_some(), Kind::Unlisten { all: false }),
        b"create" if create_temp(&mut c) => Kind::CreateTemp,
        _ => scan(&c, wf, false).kind(Kind::Write),
    }
}

/// Function calls and write markers found in a statement.
#[derive(Default)]
struct Scan {
    write: bool,
    lock: bool,
    unlock_all: bool,
    /// `SELECT ... INTO TEMP t`: creates a temporary table.
    into_temp: bool,
}

impl Scan {
    fn kind(&self, otherwise: Kind) -> Kind {
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
fn scan(c: &Cur, wf: &[String], query: bool) -> Scan {
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

/// SELECT / VALUES / TABLE / WITH / parenthesised query.
fn query(c: &Cur, wf: &[String]) -> Kind {
    let j = c.after_parens();
    if !c.kw_in(j, QUERY_START) {
        return Kind::Write;
    }
    if c.kw_at(j, "with") {
        // The main statement must be a query at the depth of WITH (DML is caught by `scan`).
        let mut depth = 0;
        let main = c.toks.iter().enumerate().skip(j + 1).any(|(k, t)| {
            match t.t {
                T::LParen => depth += 1,
                T::RParen => depth -= 1,
                _ => {}
            }
            depth == 0 && c.kw_in(k, &QUERY_START[..3])
        });
        if !main {
            return Kind::Write;
        }
    }
    scan(c, wf, true).kind(Kind::Read)
}

/// What EXPLAIN ANALYZE or COPY (...) TO runs: a read stays a read, a session advisory lock
/// stays visible, anything else (including statements they cannot wrap) is a write.
fn wrapped(c: &Cur, wf: &[String]) -> Kind {
    let k = if c.kw_in(c.after_parens(), QUERY_START) {
        query(c, wf)
    } else if c.kw_in(0, DML) {
        scan(c, wf, false).kind(Kind::Write)
    } else {
        Kind::Write
    };
    match k {
        Kind::Read | Kind::AdvisoryLock | Kind::AdvisoryUnlockAll => k,
        _ => Kind::Write,
    }
}

fn explain(c: &Cur, wf: &[String]) -> Kind {
    let mut i = 1;
    let mut analyze = false;
    let is_analyze = |i: usize| c.kw_in(i, &["analyze", "analyse"]);
    let rest = c.sub(1, c.toks.len());
    if c.t(1) == Some(T::LParen) && !rest.kw_in(rest.after_parens(), QUERY_START) {
        // EXPLAIN ( option [value] [, ...] ) statement
        i = 2;
        loop {
            if c.t(i) != Some(T::Word) {
                return Kind::Write;
            }
            let (name, v) = (i, i + 1);
            i = v;
            while !matches!(c.t(i), None | Some(T::Comma | T::RParen)) {
                i += 1;
            }
            if is_analyze(name) {
                let value = || text(c.src, c.toks[v]);
                let mut off = ["false", "off", "no", "0"].iter();
                analyze = !(i == v + 1 && off.any(|f| value().eq_ignore_ascii_case(f)));
            }
            i += 1;
            match c.t(i - 1) {
                Some(T::Comma) => {}
                Some(T::RParen) => break,
                _ => return Kind::Write,
            }
        }
    } else {
        // EXPLAIN [ANALYZE] [VERBOSE] statement
        while is_analyze(i) || c.kw_at(i, "verbose") {
            analyze |= is_analyze(i);
            i += 1;
        }
    }
    let inner = c.sub(i, c.toks.len());
    if !(c.kw_in(i + inner.after_parens(), QUERY_START) || c.kw_in(i, DML)) {
        Kind::Write
    } else if analyze {
        wrapped(&inner, wf)
    } else {
        Kind::Read
    }
}

fn copy(c: &Cur, wf: &[String]) -> Kind {
    let mut i = 1;
    let mut inner = None;
    if c.t(1) == Some(T::LParen) {
        i = c.close(1) + 1;
        inner = Some(c.sub(2, i - 1));
    } else {
        // table [ ( columns ) ]
        while matches!(c.t(i), Some(T::Word | T::QIdent)) && c.t(i + 1) == Some(T::Dot) {
            i += 2;
        }
        if !matches!(c.t(i), Some(T::Word | T::QIdent)) {
            return Kind::Write;
        }
        i += 1;
        if c.t(i) == Some(T::LParen) {
            i = c.close(i) + 1;
        }
    }
    if !(c.kw_at(i, "to") && c.kw_at(i + 1, "stdout")) {
        return Kind::Write;
    }
    inner.map_or(Kind::Read, |q| wrapped(&q, wf))
}

fn show(c: &mut Cur) -> Kind {
    if c.done() {
        return Kind::Write;
    }
    match c.dotted_name().as_deref().and_then(pgnear_name) {
        Some(name) if c.done() => Kind::PgnearShow { name },
        _ => Kind::Read,
    }
}

/// `pgnear.x` (any case) -> `Some("x")` lowercased.
fn pgnear_name(name: &str) -> Option<String> {
    let b = name.as_bytes();
    let pgnear = b.len() > 7 && b[..7].eq_ignore_ascii_case(b"pgnear.");
    pgnear
        .then(|| name.get(7..))
        .flatten()
        .map(str::to_ascii_lowercase)
}

/// Transaction modes of BEGIN / START TRANSACTION / SET TRANSACTION.
struct TxModes {
    /// The last READ ONLY / READ WRITE seen.
    read_only: Option<bool>,
    /// The isolation level given is SERIALIZABLE (`None`: none given).
    serializable: Option<bool>,
}

impl TxModes {
    /// READ ONLY, and not SERIALIZABLE, which a hot standby refuses: a transaction a replica
    /// may serve (`Some(false)` for one it may not, `None` when nothing was said).
    fn replica_read_only(&self) -> Option<bool> {
        if self.serializable == Some(true) {
            Some(false)
        } else {
            self.read_only
        }
    }
}

/// Transaction modes; `None` if not understood.
fn tx_modes(c: &mut Cur) -> Option<TxModes> {
    let mut ro = None;
    let mut serializable = None;
    while !c.done() {
        let understood = if c.t(c.i) == Some(T::Comma) {
            c.i += 1;
            true
        } else if c.eat("isolation") {
            let level = c.eat("level");
            serializable = Some(c.is("serializable"));
            level
                && (c.eat("serializable")
                    || (c.eat("repeatable") && c.eat("read"))
                    || (c.eat("read") && (c.eat("committed") || c.eat("uncommitted"))))
        } else if c.eat("read") {
            ro = Some(c.is("only"));
            c.eat("only") || c.eat("write")
        } else {
            c.eat("deferrable") || (c.eat("not") && c.eat("deferrable"))
        };
        if !understood {
            return None;
        }
    }
    Some(TxModes {
        read_only: ro,
        serializable,
    })
}

fn begin(c: &mut Cur) -> Kind {
    tx_modes(c).map_or(Kind::Write, |m| Kind::Begin {
        read_only: m.replica_read_only().unwrap_or(false),
    })
}

/// `[WORK|TRANSACTION] [AND [NO] CHAIN]` to the end.
fn chain_tail(c: &mut Cur, k: Kind) -> Kind {
    let _ = c.eat("work") || c.eat("transaction");
    if c.eat("and") {
        c.eat("no");
        if !c.eat("chain") {
            return Kind::Write;
        }
    }
    ok(c.done(), k)
}

fn one_string(c: &Cur, k: Kind) -> Kind {
    ok(c.t(c.i) == Some(T::Str) && c.i + 1 == c.toks.len(), k)
}

fn create_temp(c: &mut Cur) -> bool {
    if c.eat("or") && !c.eat("replace") {
        return false;
    }
    let _ = c.eat("global") || c.eat("local");
    if (c.eat("temp") || c.eat("temporary"))
        && c.kw_in(c.i, &["table", "view", "sequence", "recursive"])
    {
        return true;
    }
    // Any object created in (or on an object of) the session's temporary schema.
    (c.i..c.toks.len()).any(|i| {
        matches!(c.t(i), Some(T::Word | T::QIdent))
            && is_pg_temp(ident_body(c.src, c.toks[i]))
            && c.t(i + 1) == Some(T::Dot)
    })
}

fn set(c: &mut Cur) -> Kind {
    if c.eat("transaction") {
        if c.eat("snapshot") {
            return one_string(c, Kind::SetTransaction { read_only: None });
        }
        let modes = if c.done() { None } else { tx_modes(c) };
        return modes.map_or(Kind::Write, |m| Kind::SetTransaction {
            read_only: m.replica_read_only(),
        });
    }
    if c.is("session") && c.kw_at(2, "characteristics") {
        c.i = 3;
        let as_tx = c.eat("as") && c.eat("transaction") && !c.done();
        let modes = if as_tx { tx_modes(c) } else { None };
        return modes.map_or(Kind::Write, |m| Kind::SetSessionCharacteristics {
            read_only: m.read_only,
            serializable: m.serializable,
        });
    }
    let local = c.eat("local");
    if !local && c.is("session") && !c.kw_at(c.i + 1, "authorization") {
        c.i += 1;
    }
    let (i, assign) = (c.i, c.is_assign(c.i + 1));
    let special = if c.is("time") && c.kw_at(i + 1, "zone") {
        Some(("timezone", 2))
    } else if c.is("session") && c.kw_at(i + 1, "authorization") {
        Some(("session_authorization", 2))
    } else if c.is("xml") && c.kw_at(i + 1, "option") {
        Some(("xmloption", 2))
    } else if assign {
        None
    } else if c.is("role") {
        Some(("role", 1))
    } else if c.is("schema") {
        Some(("search_path", 1))
    } else if c.is("names") {
        Some(("client_encoding", 1))
    } else {
        None
    };
    let name = match special {
        Some((name, len)) => {
            c.i += len;
            name.to_owned()
        }
        None if c.is("constraints") => return Kind::Write,
        None => match c.dotted_name() {
            Some(name) if c.is_assign(c.i) => {
                c.i += 1;
                name
            }
            _ => return Kind::Write,
        },
    };
    let (Some(first), Some(last)) = (c.toks.get(c.i), c.toks.last()) else {
        return Kind::Write;
    };
    let value = c.src[first.s as usize..last.e as usize].trim();
    match pgnear_name(&name) {
        // One string literal unquoted, one bare word lowercased, anything else as written.
        Some(name) => Kind::PgnearSet {
            name,
            value: match (c.toks.len() - c.i, first.t) {
                (1, T::Word) => value.to_ascii_lowercase(),
                (1, T::Str) => unquote_str(value),
                _ => value.to_owned(),
            },
        },
        None => Kind::Set {
            name,
            value: value.to_owned(),
            local,
        },
    }
}

fn reset(c: &mut Cur) -> Kind {
    let i = c.i;
    let name = if c.eat("all") {
        None
    } else if c.is("time") && c.kw_at(i + 1, "zone") {
        c.i += 2;
        Some("timezone".to_owned())
    } else if c.is("session") && c.kw_at(i + 1, "authorization") {
        c.i += 2;
        Some("session_authorization".to_owned())
    } else if c.is("transaction") && c.kw_at(i + 1, "isolation") && c.kw_at(i + 2, "level") {
        c.i += 3;
        Some("transaction_isolation".to_owned())
    } else {
        match c.dotted_name() {
            Some(n) => Some(n),
            None => return Kind::Write,
        }
    };
    if !c.done() {
        return Kind::Write;
    }
    match name.as_deref().and_then(pgnear_name) {
        Some(n) => Kind::PgnearReset { name: Some(n) },
        None => Kind::Reset { name },
    }
}

#[cfg(test)]
#[path = "classify_tests.rs"]
mod tests;
