//! Error kinds: each one is what the client is told (SQLSTATE) and a metric label.

use std::fmt;

/// What went wrong, as far as the client and the metrics are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed or oversized protocol message, bad startup.
    Protocol,
    /// Client authentication failed.
    Auth,
    /// An upstream is unreachable or was lost.
    Upstream,
    /// Too many client connections, or no server connection in time.
    Capacity,
    /// A write refused in replay mode.
    Replay,
    /// A read that could not be made consistent.
    Consistency,
    /// pgnear is shutting down.
    Shutdown,
    /// A bug or an unexpected condition in pgnear.
    Internal,
}

impl ErrorKind {
    /// Every kind, in the order of `index`.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Protocol,
        ErrorKind::Auth,
        ErrorKind::Upstream,
        ErrorKind::Capacity,
        ErrorKind::Replay,
        ErrorKind::Consistency,
        ErrorKind::Shutdown,
        ErrorKind::Internal,
    ];

    /// A dense index, for tables with one entry per kind.
    pub fn index(self) -> usize {
        match self {
            ErrorKind::Protocol => 0,
            ErrorKind::Auth => 1,
            ErrorKind::Upstream => 2,
            ErrorKind::Capacity => 3,
            ErrorKind::Replay => 4,
            ErrorKind::Consistency => 5,
            ErrorKind::Shutdown => 6,
            ErrorKind::Internal => 7,
        }
    }

    pub fn sqlstate(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "08P01",
            ErrorKind::Auth => "28P01",
            ErrorKind::Upstream => "08006",
            ErrorKind::Capacity => "53300",
            ErrorKind::Replay => "25006",
            ErrorKind::Consistency => "40001",
            ErrorKind::Shutdown => "57P01",
            ErrorKind::Internal => "XX000",
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::Auth => "auth",
            ErrorKind::Upstream => "upstream",
            ErrorKind::Capacity => "capacity",
            ErrorKind::Replay => "replay",
            ErrorKind::Consistency => "consistency",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::Internal => "internal",
        }
    }
}

/// An error pgnear reports to a client itself. Its text is user-facing: no secrets.
#[derive(Clone, Debug)]
pub struct PgError {
    pub kind: ErrorKind,
    pub fatal: bool,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// Overrides the kind's SQLSTATE (e.g. an upstream's own auth failure passed on).
    pub code: Option<String>,
    /// Postgres closes the connection without a word here (a startup packet it cannot read):
    /// so does pgnear, and the error is only logged and counted.
    pub silent: bool,
}

impl PgError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> PgError {
        PgError {
            kind,
            fatal: true,
            message: message.into(),
            detail: None,
            hint: None,
            code: None,
            silent: false,
        }
    }

    /// A startup-phase failure Postgres answers by closing the connection silently.
    pub fn silent(mut self) -> PgError {
        self.silent = true;
        self
    }

    pub fn protocol(message: impl Into<String>) -> PgError {
        PgError::new(ErrorKind::Protocol, message)
    }

    pub fn upstream(message: impl Into<String>) -> PgError {
        PgError::new(ErrorKind::Upstream, message)
    }

    pub fn non_fatal(mut self) -> PgError {
        self.fatal = false;
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> PgError {
        self.detail = Some(detail.into());
        self
    }

    /// A SQLSTATE more precise than its kind's (e.g. 28000 beside the auth kind's 28P01).
    pub fn with_code(mut self, code: &str) -> PgError {
        self.code = Some(code.to_string());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> PgError {
        self.hint = Some(hint.into());
        self
    }

    pub fn sqlstate(&self) -> &str {
        self.code.as_deref().unwrap_or(self.kind.sqlstate())
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.sqlstate())
    }
}

impl std::error::Error for PgError {}
