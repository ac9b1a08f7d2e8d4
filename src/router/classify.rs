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

#[path = "classify_calls.rs"]
mod calls;
#[path = "classify_lex.rs"]
mod lex;
#[path = "classify_session.rs"]
mod session;

use calls::scan;
use lex::{ident_body, lex, text, Tok, T};
use session::{begin, chain_tail, create_temp, one_string, reset, set, show};

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

#[cfg(test)]
#[path = "classify_tests.rs"]
mod tests;
