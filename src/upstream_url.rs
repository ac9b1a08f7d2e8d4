//! `postgres://user:pass@host:port,host:port/db?sslmode=...` as pgnear needs it for an upstream:
//! one host or several, libpq's syntax (a host without a port takes the last port given).

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

/// One host of an upstream URL: a name or an IP literal (IPv6 without brackets), and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub port: u16,
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.contains(':') {
            write!(f, "[{}]:{}", self.name, self.port)
        } else {
            write!(f, "{}:{}", self.name, self.port)
        }
    }
}

/// A parsed upstream URL. The password never appears in `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub user: String,
    pub password: Option<String>,
    /// At least one, in the URL's order.
    pub hosts: Vec<Host>,
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
        write!(
            f,
            "postgres://{}@{}/{}",
            self.user,
            self.host_list(),
            self.database
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
    /// The hosts as the URL writes them: `h1:5432,[fdaa::3]:5433`.
    pub fn host_list(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(Host::to_string).collect();
        hosts.join(",")
    }

    /// The URL again, password included (for deriving one upstream from another).
    pub fn to_url_with_password(&self) -> String {
        let hosts = self.host_list();
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
            "postgres://{}{password}@{hosts}/{}?sslmode={mode}{root}",
            percent_encode(&self.user),
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
        let hosts = parse_hosts(hostport)?;
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
            hosts,
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

/// The hosts of an authority (`h1:5432,h2,[fdaa::3]:5433`). A host without a port takes the
/// last port the URL gives, else 5432.
fn parse_hosts(hostport: &str) -> Result<Vec<Host>, String> {
    let mut hosts: Vec<(String, Option<u16>)> = Vec::new();
    for item in hostport.split(',') {
        let (host, port) = if let Some(v6) = item.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("an IPv6 host in [brackets]")?;
            let port = match after {
                "" => "",
                _ => after
                    .strip_prefix(':')
                    .ok_or("an IPv6 host in [brackets], then nothing or :port")?,
            };
            (h.to_string(), port)
        } else {
            let (h, p) = item.rsplit_once(':').unwrap_or((item, ""));
            if h.contains(':') {
                return Err("an IPv6 host in [brackets]".into());
            }
            (h.to_string(), p)
        };
        if host.is_empty() {
            return Err("a host name or address after @ (hosts separated by commas)".into());
        }
        if host.contains(['[', ']']) {
            return Err("an IPv6 host in [brackets]".into());
        }
        let port = if port.is_empty() {
            None
        } else {
            Some(port.parse().map_err(|_| "a port number from 1 to 65535")?)
        };
        hosts.push((host, port));
    }
    // A host without a port takes the last port the URL gives (`h1,h2:5433`: both 5433).
    let last = hosts.iter().rev().find_map(|(_, p)| *p).unwrap_or(5432);
    let out: Vec<Host> = hosts
        .into_iter()
        .map(|(name, port)| Host {
            name,
            port: port.unwrap_or(last),
        })
        .collect();
    Ok(out)
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
        assert_eq!(u.hosts, [host("db.internal", 5433)]);
        assert_eq!(u.database, "app");
        assert_eq!(u.sslmode, SslMode::Require);
        assert!(!format!("{u:?}").contains("cret"));

        let u = UpstreamUrl::parse("postgresql://bob@[fdaa::3]/").unwrap();
        assert_eq!(u.hosts, [host("fdaa::3", 5432)]);
        assert_eq!(u.database, "bob");
        assert_eq!(u.sslmode, SslMode::Prefer);
    }

    fn host(name: &str, port: u16) -> Host {
        Host {
            name: name.to_string(),
            port,
        }
    }

    #[test]
    fn several_hosts_libpq_style() {
        let u = UpstreamUrl::parse("postgres://app@h1:5433,h2,[fdaa::3]:5434,h4/app").unwrap();
        assert_eq!(
            u.hosts,
            [
                host("h1", 5433),
                host("h2", 5434),
                host("fdaa::3", 5434),
                host("h4", 5434)
            ]
        );
        assert_eq!(u.host_list(), "h1:5433,h2:5434,[fdaa::3]:5434,h4:5434");
        assert_eq!(UpstreamUrl::parse(&u.to_url_with_password()).unwrap(), u);
        for bad in [
            "postgres://a@h1,,h2/c",
            "postgres://a@h1,/c",
            "postgres://a@,h1/c",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
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
