//! `postgres://user:pass@host:port/db?sslmode=...` as pgnear needs it for an upstream.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" | "allow" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

/// A parsed upstream URL. The password never appears in `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub user: String,
    pub password: Option<String>,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<String>,
}

impl fmt::Debug for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(
            f,
            "postgres://{}@{}:{}/{}",
            self.user, host, self.port, self.database
        )
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("bad percent-encoding")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoding is not UTF-8".to_string())
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl UpstreamUrl {
    /// The URL again, password included (for deriving one upstream from another).
    pub fn to_url_with_password(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let password = self
            .password
            .as_deref()
            .map(|p| format!(":{}", percent_encode(p)))
            .unwrap_or_default();
        let mode = match self.sslmode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        };
        let root = self
            .sslrootcert
            .as_deref()
            .map(|r| format!("&sslrootcert={}", percent_encode(r)))
            .unwrap_or_default();
        format!(
            "postgres://{}{password}@{host}:{}/{}?sslmode={mode}{root}",
            percent_encode(&self.user),
            self.port,
            percent_encode(&self.database)
        )
    }

    /// Parses a URL; the error says what is allowed (it never echoes the password).
    pub fn parse(url: &str) -> Result<UpstreamUrl, String> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or("a URL starting with postgres:// or postgresql://")?;
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = main.split_once('/').unwrap_or((main, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((u, p)) => (percent_decode(u)?, Some(percent_decode(p)?)),
                None => (percent_decode(u)?, None),
            },
            None => (String::new(), None),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("an IPv6 host in [brackets]")?;
            let port = match after {
                "" => "",
                _ => after
                    .strip_prefix(':')
                    .ok_or("an IPv6 host in [brackets], then nothing or :port")?,
            };
            (h.to_string(), port)
        } else {
            let (h, p) = hostport.rsplit_once(':').unwrap_or((hostport, ""));
            if h.contains(':') {
                return Err("an IPv6 host in [brackets]".into());
            }
            (h.to_string(), p)
        };
        if host.is_empty() {
            return Err("a host name or address after @".into());
        }
        if host.contains(['[', ']']) {
            return Err("an IPv6 host in [brackets]".into());
        }
        let port = if port.is_empty() {
            5432
        } else {
            port.parse().map_err(|_| "a port number from 1 to 65535")?
        };
        let user = if user.is_empty() {
            "postgres".to_string()
        } else {
            user
        };
        let database = if path.is_empty() {
            user.clone()
        } else {
            percent_decode(path)?
        };
        let mut parsed = UpstreamUrl {
            user,
            password,
            host,
            port,
            database,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v)?;
            match k {
                "sslmode" => {
                    parsed.sslmode = SslMode::parse(&v).ok_or(
                        "sslmode one of disable, allow, prefer, require, verify-ca, verify-full",
                    )?
                }
                "sslrootcert" => parsed.sslrootcert = Some(v),
                // Accepted and ignored: they describe the client side, not the upstream.
                "application_name"
                | "connect_timeout"
                | "target_session_attrs"
                | "channel_binding" => {}
                other => return Err(format!("known URL parameters only (not {other:?})")),
            }
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        let u = UpstreamUrl::parse("postgres://app:s%40cret@db.internal:5433/app?sslmode=require")
            .unwrap();
        assert_eq!(u.user, "app");
        assert_eq!(u.password.as_deref(), Some("s@cret"));
        assert_eq!(u.host, "db.internal");
        assert_eq!(u.port, 5433);
        assert_eq!(u.database, "app");
        assert_eq!(u.sslmode, SslMode::Require);
        assert!(!format!("{u:?}").contains("cret"));

        let u = UpstreamUrl::parse("postgresql://bob@[fdaa::3]/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.database.as_str()),
            ("fdaa::3", 5432, "bob")
        );
        assert_eq!(u.sslmode, SslMode::Prefer);
    }

    #[test]
    fn round_trips_with_password() {
        let text = "postgres://app:s%40c%3Aret@[fdaa::3]:5433/my%20db?sslmode=verify-full&sslrootcert=/ca.pem";
        let u = UpstreamUrl::parse(text).unwrap();
        assert_eq!(UpstreamUrl::parse(&u.to_url_with_password()).unwrap(), u);
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "mysql://a@b/c",
            "postgres://a@:5432/c",
            "postgres://a@h:99999/c",
            "postgres://a@h/c?sslmode=maybe",
            "postgres://a@h/c?weird=1",
            "postgres://a@h/%zz",
            // Found by fuzzing: anything after "]" but ":port" was ignored (the port with it),
            // and an unbracketed host with ":" came back from `to_url_with_password` as a
            // different URL.
            "postgres://a@[fdaa::3]5433/c",
            "postgres://a@[fdaa::3]]:5433/c",
            "postgres://app:pw\u{164}fdaa::3]:5433/db",
            "postgres://a@fdaa::3/c",
            // Found by fuzzing: a host with a bracket inside came back as a different URL.
            "postgres://npp:$pw@[[upstream]",
            "postgres://a@x]y:5432/c",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
