//! Configuration: TOML file, then `PGNEAR_<SECTION>_<KEY>` and the named variables of DESIGN.md on
//! top, then `validate()`. Every key has a default, so an empty file is a valid config.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::upstream_url::UpstreamUrl;

mod validate;

/// A configuration problem, worded for the operator: which key, which value, what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid value for {key}: {value:?} ({allowed})")]
    Invalid {
        key: String,
        value: String,
        allowed: String,
    },
}

fn invalid(key: &str, value: impl fmt::Display, allowed: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        allowed: allowed.to_string(),
    }
}

/// The longest duration any setting takes (deadlines are computed as now + the setting).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 24 * 3600);

/// A duration written as a human string ("250ms", "2s", "1m", "1h"), at most 100 days.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Option<Duration> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
        let (num, unit) = s.split_at(split);
        let n: f64 = num.parse().ok()?;
        let secs = match unit.trim() {
            "us" | "µs" => n / 1e6,
            "ms" => n / 1e3,
            "s" => n,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            _ => return None,
        };
        // A number too big for a Duration (hundreds of digits) is invalid, not a panic; so is
        // anything past MAX_DURATION, which pgnear adds to the current time.
        Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| *d <= MAX_DURATION)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms % 1000 == 0 && ms > 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map(HumanDuration).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} (allowed: a number with a unit: us, ms, s, m, h, at most 100 days; e.g. \"250ms\")"
            ))
        })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

fn ms(n: u64) -> HumanDuration {
    HumanDuration(Duration::from_millis(n))
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub regions: RegionsConfig,
    pub upstream: UpstreamConfig,
    pub routing: RoutingConfig,
    pub consistency: ConsistencyConfig,
    pub pool: PoolConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    pub listen: String,
    pub admin_listen: String,
    pub max_client_connections: usize,
    pub max_message_size: usize,
    pub startup_timeout: HumanDuration,
    pub shutdown_grace: HumanDuration,
    /// Record per-statement metrics (counters, latency histograms, bytes).
    pub metrics: bool,
    /// Threads running sessions (the `pgnear run` process).
    pub worker_threads: usize,
    /// After activity, keep polling the sockets this long instead of sleeping (0: off).
    pub busy_poll: HumanDuration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "127.0.0.1:6432".into(),
            admin_listen: "127.0.0.1:9930".into(),
            max_client_connections: 10_000,
            max_message_size: 64 * 1024 * 1024,
            startup_timeout: ms(10_000),
            shutdown_grace: ms(30_000),
            metrics: true,
            worker_threads: 1,
            busy_poll: ms(0),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegionsConfig {
    pub current: String,
    pub primary: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    pub primary_url: String,
    pub replica_url: String,
    pub replica_order: ReplicaOrder,
    pub nameserver: String,
    pub connect_timeout: HumanDuration,
}

/// Which replica of the list serves reads: the first that can (`listed`), or the one with the
/// lowest measured round trip (`latency`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaOrder {
    #[default]
    Listed,
    Latency,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            primary_url: String::new(),
            replica_url: String::new(),
            replica_order: ReplicaOrder::Listed,
            nameserver: String::new(),
            connect_timeout: ms(5_000),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    Forward,
    Replay,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    pub write_mode: WriteMode,
    #[serde(deserialize_with = "list_or_csv")]
    pub write_functions: Vec<String>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            write_mode: WriteMode::Forward,
            write_functions: Vec::new(),
        }
    }
}

/// Accepts a TOML array of strings, or one comma-separated string (how it arrives from the env).
fn list_or_csv<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(v) => v,
        Either::Csv(s) => s
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsistencyMode {
    Session,
    Eventual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    Primary,
    Error,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistencyConfig {
    pub mode: ConsistencyMode,
    pub wait_timeout: HumanDuration,
    pub on_timeout: OnTimeout,
    pub max_replica_lag: HumanDuration,
    pub report_write_lsn: bool,
}

impl Default for ConsistencyConfig {
    fn default() -> Self {
        ConsistencyConfig {
            mode: ConsistencyMode::Session,
            wait_timeout: ms(500),
            on_timeout: OnTimeout::Primary,
            max_replica_lag: ms(10_000),
            report_write_lsn: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Session,
    Transaction,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    pub mode: PoolMode,
    pub primary_size: usize,
    pub replica_size: usize,
    pub min_idle: usize,
    pub acquire_timeout: HumanDuration,
    pub idle_timeout: HumanDuration,
    pub max_lifetime: HumanDuration,
    pub pipeline: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Session,
            primary_size: 20,
            replica_size: 20,
            min_idle: 0,
            acquire_timeout: ms(5_000),
            idle_timeout: ms(600_000),
            max_lifetime: ms(3_600_000),
            pipeline: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

/// Which roles clients may log in as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthUsers {
    /// Only the primary URL's role: any other is refused (28000).
    #[default]
    Url,
    /// Any role the primary knows: its verifier is looked up there with `auth.query`.
    Query,
}

/// The default verifier lookup: the role's password verifier, when it may log in now.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolpassword FROM pg_catalog.pg_authid \
     WHERE rolname = $1 AND rolcanlogin \
     AND (rolvaliduntil IS NULL OR rolvaliduntil > pg_catalog.now())";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Unset: SCRAM-SHA-256, or trust when the upstream URL has no password and the
    /// listener is on loopback.
    pub method: Option<AuthMethod>,
    pub users: AuthUsers,
    /// With `users = "query"`: run on the primary as the URL's role, `$1` the role name; its
    /// first column is the role's verifier (no row, or NULL: the role cannot log in).
    pub query: String,
    /// How long a looked-up verifier (or its absence) is used before it is looked up again.
    pub cache_ttl: HumanDuration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            method: None,
            users: AuthUsers::Url,
            query: DEFAULT_AUTH_QUERY.to_string(),
            cache_ttl: HumanDuration(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

const SECTIONS: &[&str] = &[
    "proxy",
    "regions",
    "upstream",
    "routing",
    "consistency",
    "pool",
    "auth",
    "tls",
    "log",
];

/// Named variables of DESIGN.md and the (section, key) each one sets.
const NAMED_VARS: &[(&str, &str, &str)] = &[
    ("DATABASE_URL", "upstream", "primary_url"),
    ("PGNEAR_REPLICA_URL", "upstream", "replica_url"),
    ("FLY_REGION", "regions", "current"),
    ("PRIMARY_REGION", "regions", "primary"),
    ("PGNEAR_LISTEN", "proxy", "listen"),
    ("PGNEAR_ADMIN_LISTEN", "proxy", "admin_listen"),
    ("PGNEAR_WRITE_MODE", "routing", "write_mode"),
];

impl Config {
    /// Loads `path` (if any), applies the environment, validates.
    pub fn load(
        path: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        let origin = path.map_or("config".to_string(), |p| p.display().to_string());
        Self::from_toml_and_env(&text, &origin, env)
    }

    pub fn from_toml_and_env(
        text: &str,
        origin: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: origin.to_string(),
                    message: e.message().to_string(),
                })?;
        // File first, then the generic PGNEAR_<SECTION>_<KEY>, then the named variables, which win.
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("PGNEAR_") else {
                continue;
            };
            let Some((section, key)) = rest.split_once('_') else {
                continue;
            };
            let section = section.to_ascii_lowercase();
            if SECTIONS.contains(&section.as_str()) {
                set_key(&mut table, &section, &key.to_ascii_lowercase(), value);
            }
        }
        for (var, section, key) in NAMED_VARS {
            if let Some(value) = env.get(*var) {
                set_key(&mut table, section, key, value);
            }
        }
        let config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
                origin: format!("{origin} (with environment)"),
                message: e.message().to_string(),
            })?;
        let mut config = config;
        config.derive_replica();
        config.validate()?;
        Ok(config)
    }

    /// Without a replica URL, outside the primary region, on Fly's private network (`.internal`
    /// hosts): the nearest replica, the fly_postgres way (`top1.nearest.of.<host>`, port 5433).
    fn derive_replica(&mut self) {
        let r = &self.regions;
        if !self.upstream.replica_url.is_empty() || r.current.is_empty() || r.current == r.primary {
            return;
        }
        let Ok(mut url) = UpstreamUrl::parse(&self.upstream.primary_url) else {
            return;
        };
        let [host] = url.hosts.as_mut_slice() else {
            return;
        };
        if !host.name.ends_with(".internal") {
            return;
        }
        host.name = format!("top1.nearest.of.{}", host.name);
        host.port = 5433;
        self.upstream.replica_url = url.to_url_with_password();
    }

    /// The primary upstream (validated).
    pub fn primary(&self) -> UpstreamUrl {
        UpstreamUrl::parse(&self.upstream.primary_url).expect("validated")
    }

    /// `upstream.nameserver` as an address; `None` when empty (the system's nameservers).
    pub fn nameserver(&self) -> Option<SocketAddr> {
        crate::discovery::parse_nameserver(&self.upstream.nameserver)
    }

    /// The client auth method in force, following DESIGN.md's default rule.
    pub fn auth_method(&self) -> AuthMethod {
        match self.auth.method {
            Some(m) => m,
            None if self.primary().password.is_none() && self.listens_on_loopback() => {
                AuthMethod::Trust
            }
            None => AuthMethod::ScramSha256,
        }
    }

    pub fn listens_on_loopback(&self) -> bool {
        self.proxy
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
    }

    /// The effective config as TOML, with passwords masked.
    pub fn render_masked(&self) -> String {
        let mut shown = self.clone();
        shown.upstream.primary_url = mask_url(&shown.upstream.primary_url);
        shown.upstream.replica_url = mask_url(&shown.upstream.replica_url);
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Replaces the password of a postgres:// URL with `****`.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:****@{host}"),
        None => url.to_string(),
    }
}

fn set_key(table: &mut toml::Table, section: &str, key: &str, raw: &str) {
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = entry {
        t.insert(key.to_string(), env_value(raw));
    }
}

/// An env value as TOML: integers and booleans keep their type, everything else is a string.
fn env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const URL: &[(&str, &str)] = &[("DATABASE_URL", "postgres://app:secret@127.0.0.1:5432/app")];

    #[test]
    fn documented_example_parses_and_matches_defaults() {
        let text = include_str!("../config/pgnear.toml");
        let cfg = Config::from_toml_and_env(text, "config/pgnear.toml", &env(URL)).unwrap();
        let def = Config::from_toml_and_env("", "empty", &env(URL)).unwrap();
        // The example documents the defaults: rendering both must agree.
        assert_eq!(cfg.render_masked(), def.render_masked());
    }

    #[test]
    fn env_overrides_file_and_named_vars_win() {
        let text = "[pool]\nmode = \"session\"\n[consistency]\nwait_timeout = \"1s\"\n";
        let e = env(&[
            ("DATABASE_URL", "postgres://app:secret@db:5432/app"),
            ("PGNEAR_POOL_MODE", "transaction"),
            ("PGNEAR_CONSISTENCY_WAIT_TIMEOUT", "250ms"),
            ("PGNEAR_POOL_PRIMARY_SIZE", "7"),
            ("PGNEAR_ROUTING_WRITE_MODE", "forward"),
            ("PGNEAR_WRITE_MODE", "replay"),
            ("PGNEAR_ROUTING_WRITE_FUNCTIONS", "a.f, g"),
            ("FLY_REGION", "syd"),
            ("PRIMARY_REGION", "iad"),
            ("PGNEAR_LISTEN", "127.0.0.1:7000"),
            ("PGNEAR_UPSTREAM_REPLICA_ORDER", "latency"),
        ]);
        let c = Config::from_toml_and_env(text, "t", &e).unwrap();
        assert_eq!(c.pool.mode, PoolMode::Transaction);
        assert_eq!(c.consistency.wait_timeout.0, Duration::from_millis(250));
        assert_eq!(c.pool.primary_size, 7);
        assert_eq!(c.routing.write_mode, WriteMode::Replay);
        assert_eq!(c.routing.write_functions, vec!["a.f", "g"]);
        assert_eq!(c.regions.current, "syd");
        assert_eq!(c.proxy.listen, "127.0.0.1:7000");
        assert_eq!(c.upstream.replica_order, ReplicaOrder::Latency);
    }

    #[test]
    fn bad_values_name_key_value_and_allowed() {
        let cases: &[(&str, &[&str])] = &[
            (
                "[pool]\nmode = \"sometimes\"",
                &["sometimes", "session", "transaction"],
            ),
            (
                "[proxy]\nlisten = \"nowhere\"",
                &["proxy.listen", "nowhere"],
            ),
            ("[consistency]\nwait_timeout = \"soon\"", &["soon", "ms"]),
            (
                "[pool]\nprimary_size = 0",
                &["pool.primary_size", "at least 1"],
            ),
            ("[pool]\nbogus = 1", &["bogus"]),
            (
                "[upstream]\nreplica_order = \"nearest\"",
                &["nearest", "listed", "latency"],
            ),
            ("[auth]\nmethod = \"plain\"", &["plain", "scram-sha-256"]),
            (
                "[upstream]\nprimary_url = \"mysql://x\"",
                &["upstream.primary_url"],
            ),
            (
                "[upstream]\nnameserver = \"dns.internal:53\"",
                &[
                    "upstream.nameserver",
                    "dns.internal:53",
                    "an IP address with an optional port",
                ],
            ),
            (
                "[upstream]\nnameserver = \"127.0.0.1:99999\"",
                &["upstream.nameserver", "127.0.0.1:99999"],
            ),
        ];
        for (text, needles) in cases {
            let mut e = env(&[]);
            if !text.contains("primary_url") {
                e = env(URL);
            }
            let err = Config::from_toml_and_env(text, "t", &e)
                .unwrap_err()
                .to_string();
            for n in *needles {
                assert!(err.contains(n), "{text:?}: {err:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn replica_derived_the_fly_postgres_way() {
        let fly = |extra: &[(&str, &str)]| {
            let mut e = env(&[
                (
                    "DATABASE_URL",
                    "postgres://app:s%40cret@my-db.internal:5432/app?sslmode=disable",
                ),
                ("FLY_REGION", "syd"),
                ("PRIMARY_REGION", "iad"),
            ]);
            e.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            Config::from_toml_and_env("", "t", &e)
                .unwrap()
                .upstream
                .replica_url
        };
        assert_eq!(
            fly(&[]),
            "postgres://app:s%40cret@top1.nearest.of.my-db.internal:5433/app?sslmode=disable"
        );
        assert_eq!(
            fly(&[("FLY_REGION", "iad")]),
            "",
            "no replica in the primary region"
        );
        assert_eq!(
            fly(&[("PGNEAR_REPLICA_URL", "postgres://a@b/c")]),
            "postgres://a@b/c"
        );
        assert_eq!(
            fly(&[("DATABASE_URL", "postgres://a@db.example.com/c")]),
            "",
            "not a .internal host"
        );
    }

    #[test]
    fn missing_upstream_is_reported() {
        let err = Config::from_toml_and_env("", "t", &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn masks_passwords() {
        let c = Config::from_toml_and_env("", "t", &env(URL)).unwrap();
        let shown = c.render_masked();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("app:****@127.0.0.1"), "{shown}");
    }

    #[test]
    fn durations() {
        assert_eq!(
            HumanDuration::parse("250ms"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(HumanDuration::parse("2s"), Some(Duration::from_secs(2)));
        assert_eq!(
            HumanDuration::parse("1.5s"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(HumanDuration::parse("1m"), Some(Duration::from_secs(60)));
        assert_eq!(HumanDuration::parse("10"), None);
        assert_eq!(HumanDuration::parse("ms"), None);
        assert_eq!(HumanDuration::parse("-1s"), None);
        // Found by fuzzing: a number too big for a Duration panicked in from_secs_f64.
        let huge = format!("{}h", "9".repeat(400));
        assert_eq!(HumanDuration::parse(&huge), None);
        assert_eq!(HumanDuration::parse("99999999999999999999999h"), None);
        // Valid for a Duration but would overflow now + duration (shutdown_grace, timeouts).
        assert_eq!(HumanDuration::parse("99999999999999h"), None);
        assert_eq!(HumanDuration::parse("2400h"), Some(MAX_DURATION));
    }

    #[test]
    fn default_auth_rule() {
        let c =
            Config::from_toml_and_env("", "t", &env(&[("DATABASE_URL", "postgres://app@h/db")]))
                .unwrap();
        assert_eq!(c.auth_method(), AuthMethod::Trust);
        let c = Config::from_toml_and_env("", "t", &env(URL)).unwrap();
        assert_eq!(c.auth_method(), AuthMethod::ScramSha256);
    }
}
