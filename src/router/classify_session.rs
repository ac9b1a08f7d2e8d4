//! The classifier's session-state and transaction statements: SHOW, BEGIN and its modes,
//! COMMIT/ROLLBACK (AND CHAIN), SET, RESET, CREATE TEMP, and pgnear's own settings.

use super::lex::{ident_body, unquote_str, T};
use super::{is_pg_temp, ok, Cur, Kind};

pub(super) fn show(c: &mut Cur) -> Kind {
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

pub(super) fn begin(c: &mut Cur) -> Kind {
    tx_modes(c).map_or(Kind::Write, |m| Kind::Begin {
        read_only: m.replica_read_only().unwrap_or(false),
    })
}

/// `[WORK|TRANSACTION] [AND [NO] CHAIN]` to the end.
pub(super) fn chain_tail(c: &mut Cur, k: Kind) -> Kind {
    let _ = c.eat("work") || c.eat("transaction");
    if c.eat("and") {
        c.eat("no");
        if !c.eat("chain") {
            return Kind::Write;
        }
    }
    ok(c.done(), k)
}

pub(super) fn one_string(c: &Cur, k: Kind) -> Kind {
    ok(c.t(c.i) == Some(T::Str) && c.i + 1 == c.toks.len(), k)
}

pub(super) fn create_temp(c: &mut Cur) -> bool {
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

pub(super) fn set(c: &mut Cur) -> Kind {
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

pub(super) fn reset(c: &mut Cur) -> Kind {
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
