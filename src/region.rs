//! Which region this pgnear runs in, relative to the primary's. A leaf: it uses nothing of
//! pgnear's; the proxy computes it once from the config (`regions.current`/`regions.primary`).

/// Where this pgnear runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionRole {
    /// No regions configured.
    Single,
    /// In the primary's region: writes run here.
    Primary,
    /// In another region: writes are forwarded (or, in replay mode, refused with a hint).
    Replica,
}

impl RegionRole {
    pub fn of(current: &str, primary: &str) -> RegionRole {
        match (current, primary) {
            ("", _) | (_, "") => RegionRole::Single,
            (c, p) if c == p => RegionRole::Primary,
            _ => RegionRole::Replica,
        }
    }

    /// As `/status` shows it.
    pub fn label(self) -> &'static str {
        match self {
            RegionRole::Single => "single-region",
            RegionRole::Primary => "primary-region",
            RegionRole::Replica => "replica-region",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_the_two_names() {
        assert_eq!(RegionRole::of("", ""), RegionRole::Single);
        assert_eq!(RegionRole::of("iad", "iad"), RegionRole::Primary);
        assert_eq!(RegionRole::of("syd", "iad"), RegionRole::Replica);
    }
}
