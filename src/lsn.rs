//! A WAL position (`pg_lsn`): parsed from and printed as `X/Y`, ordered, subtractable. A leaf:
//! it uses nothing of pgnear's, so health checks and read-your-writes both can.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Bytes from `earlier` to `self` (0 when `earlier` is ahead).
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct BadLsn;

impl fmt::Display for BadLsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an LSN looks like 16/B374D848 (two hexadecimal numbers separated by a slash)")
    }
}

impl FromStr for Lsn {
    type Err = BadLsn;

    fn from_str(s: &str) -> Result<Lsn, BadLsn> {
        let (hi, lo) = s.trim().split_once('/').ok_or(BadLsn)?;
        let valid =
            |p: &str| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid(hi) || !valid(lo) {
            return Err(BadLsn);
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| BadLsn)?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| BadLsn)?;
        Ok(Lsn((hi << 32) | lo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_print_order_diff() {
        let a: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(a.0, 0x16_B374_D848);
        assert_eq!(a.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
        let b: Lsn = "17/0".parse().unwrap();
        assert!(b > a);
        assert_eq!(b.bytes_since(a), 0x17_0000_0000 - 0x16_B374_D848);
        assert_eq!(a.bytes_since(b), 0);
        for bad in [
            "",
            "1",
            "/1",
            "1/",
            "g/1",
            "1/2/3",
            "123456789/0",
            " / ",
            "-1/0",
            "+1/0",
        ] {
            assert_eq!(bad.parse::<Lsn>(), Err(BadLsn), "{bad:?}");
        }
    }
}
