//! The routing policy: a pure function from (what the request is, session state, upstream state)
//! to the server that runs it and why.

use super::classify::Hint;
use crate::role::Role;

/// Why a request went where it went (a bounded metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Read,
    Write,
    Transaction,
    Pin,
    Hint,
    Retry,
    /// A read sent to the primary because no replica can serve it.
    Fallback,
}

impl Reason {
    /// Every reason, in the order of `index`.
    pub const ALL: [Reason; 7] = [
        Reason::Read,
        Reason::Write,
        Reason::Transaction,
        Reason::Pin,
        Reason::Hint,
        Reason::Retry,
        Reason::Fallback,
    ];

    /// A dense index, for tables with one entry per reason (a new variant fails to compile
    /// here until it has one).
    pub fn index(self) -> usize {
        match self {
            Reason::Read => 0,
            Reason::Write => 1,
            Reason::Transaction => 2,
            Reason::Pin => 3,
            Reason::Hint => 4,
            Reason::Retry => 5,
            Reason::Fallback => 6,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Reason::Read => "read",
            Reason::Write => "write",
            Reason::Transaction => "transaction",
            Reason::Pin => "pin",
            Reason::Hint => "hint",
            Reason::Retry => "retry",
            Reason::Fallback => "fallback",
        }
    }
}

/// `SET pgnear.route`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteSetting {
    Auto,
    Primary,
    Replica,
}

impl RouteSetting {
    pub fn parse(s: &str) -> Option<RouteSetting> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "default" => Some(RouteSetting::Auto),
            "primary" => Some(RouteSetting::Primary),
            "replica" => Some(RouteSetting::Replica),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RouteSetting::Auto => "auto",
            RouteSetting::Primary => "primary",
            RouteSetting::Replica => "replica",
        }
    }
}

/// Session and upstream facts the policy needs.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// The server holding the session's open transaction, if any.
    pub in_transaction: Option<Role>,
    /// LISTEN, temp table, session advisory lock or SQL-level PREPARE.
    pub pinned: bool,
    /// The session's transactions are SERIALIZABLE (`default_transaction_isolation`), which a
    /// hot standby refuses.
    pub serializable: bool,
    pub setting: RouteSetting,
    /// A replica exists and may serve reads now (healthy, not lagging too far).
    pub replica_available: bool,
}

/// What the policy needs to know about a request (a query string or an extended-protocol batch).
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// Every statement is replica-eligible.
    pub read: bool,
    pub hint: Option<Hint>,
    /// The request opens a READ ONLY transaction.
    pub starts_read_only_tx: bool,
}

/// Decides where a request runs.
pub fn decide(r: Request, ctx: Context) -> (Role, Reason) {
    if let Some(role) = ctx.in_transaction {
        return (role, Reason::Transaction);
    }
    let starts_read_only_tx = r.starts_read_only_tx;
    let read = r.read || starts_read_only_tx;
    if !read {
        return (Role::Primary, Reason::Write);
    }
    if ctx.pinned || ctx.serializable || ctx.setting == RouteSetting::Primary {
        return (Role::Primary, Reason::Pin);
    }
    if r.hint == Some(Hint::Primary) {
        return (Role::Primary, Reason::Hint);
    }
    if !ctx.replica_available {
        return (Role::Primary, Reason::Fallback);
    }
    if r.hint == Some(Hint::Replica) || ctx.setting == RouteSetting::Replica {
        return (Role::Replica, Reason::Hint);
    }
    if starts_read_only_tx {
        (Role::Replica, Reason::Transaction)
    } else {
        (Role::Replica, Reason::Read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::classify::classify;

    const FREE: Context = Context {
        in_transaction: None,
        pinned: false,
        serializable: false,
        setting: RouteSetting::Auto,
        replica_available: true,
    };

    #[test]
    fn table() {
        let pinned = Context {
            pinned: true,
            ..FREE
        };
        let in_primary_tx = Context {
            in_transaction: Some(Role::Primary),
            ..FREE
        };
        let in_replica_tx = Context {
            in_transaction: Some(Role::Replica),
            ..FREE
        };
        let no_replica = Context {
            replica_available: false,
            ..FREE
        };
        let forced_primary = Context {
            setting: RouteSetting::Primary,
            ..FREE
        };
        let forced_replica = Context {
            setting: RouteSetting::Replica,
            ..FREE
        };
        let serializable = Context {
            serializable: true,
            ..FREE
        };
        let serializable_forced_replica = Context {
            serializable: true,
            ..forced_replica
        };
        let cases: &[(&str, bool, Context, Role, Reason)] = &[
            ("SELECT 1", false, FREE, Role::Replica, Reason::Read),
            // A hot standby refuses SERIALIZABLE, whatever the hints say.
            ("SELECT 1", false, serializable, Role::Primary, Reason::Pin),
            ("SELECT 1", true, serializable, Role::Primary, Reason::Pin),
            (
                "/* pgnear:replica */ SELECT 1",
                false,
                serializable_forced_replica,
                Role::Primary,
                Reason::Pin,
            ),
            (
                "SHOW transaction_read_only",
                false,
                FREE,
                Role::Primary,
                Reason::Hint,
            ),
            (
                "SHOW transaction_read_only",
                false,
                in_replica_tx,
                Role::Replica,
                Reason::Transaction,
            ),
            (
                "INSERT INTO t VALUES (1)",
                false,
                FREE,
                Role::Primary,
                Reason::Write,
            ),
            ("SELECT 1", false, pinned, Role::Primary, Reason::Pin),
            (
                "SELECT 1",
                false,
                in_primary_tx,
                Role::Primary,
                Reason::Transaction,
            ),
            (
                "INSERT INTO t VALUES (1)",
                false,
                in_replica_tx,
                Role::Replica,
                Reason::Transaction,
            ),
            (
                "SELECT 1",
                false,
                no_replica,
                Role::Primary,
                Reason::Fallback,
            ),
            (
                "SELECT 1",
                false,
                forced_primary,
                Role::Primary,
                Reason::Pin,
            ),
            (
                "SELECT 1",
                false,
                forced_replica,
                Role::Replica,
                Reason::Hint,
            ),
            (
                "INSERT INTO t VALUES (1)",
                false,
                forced_replica,
                Role::Primary,
                Reason::Write,
            ),
            (
                "/* pgnear:primary */ SELECT 1",
                false,
                FREE,
                Role::Primary,
                Reason::Hint,
            ),
            (
                "SELECT /* pgnear:replica */ 1",
                false,
                FREE,
                Role::Replica,
                Reason::Hint,
            ),
            (
                "/* pgnear:replica */ DELETE FROM t",
                false,
                FREE,
                Role::Primary,
                Reason::Write,
            ),
            (
                "BEGIN READ ONLY",
                true,
                FREE,
                Role::Replica,
                Reason::Transaction,
            ),
            (
                "BEGIN READ ONLY",
                true,
                no_replica,
                Role::Primary,
                Reason::Fallback,
            ),
            ("BEGIN", false, FREE, Role::Primary, Reason::Write),
            (
                "SELECT nextval('s')",
                false,
                FREE,
                Role::Primary,
                Reason::Write,
            ),
            (
                "SELECT * FROM t FOR UPDATE",
                false,
                FREE,
                Role::Primary,
                Reason::Write,
            ),
        ];
        for (sql, ro, ctx, role, reason) in cases {
            let c = classify(sql, &[]);
            let r = Request {
                read: c.is_read(),
                hint: c.hint,
                starts_read_only_tx: *ro,
            };
            assert_eq!(decide(r, *ctx), (*role, *reason), "{sql} {ctx:?}");
        }
    }
}
