//! Which upstream a connection goes to. A leaf: it uses nothing of pgnear's.

/// Which upstream a connection goes to (used in messages and metric labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    /// Both roles, in the order of `index`.
    pub const ALL: [Role; 2] = [Role::Primary, Role::Replica];

    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }

    /// The other upstream.
    pub fn other(self) -> Role {
        match self {
            Role::Primary => Role::Replica,
            Role::Replica => Role::Primary,
        }
    }

    /// A dense index, for tables with one entry per role (a new variant fails to compile here
    /// until it has one).
    pub fn index(self) -> usize {
        match self {
            Role::Primary => 0,
            Role::Replica => 1,
        }
    }
}
