//! Role verifiers looked up on the primary (`auth.users = "query"`): `auth.query` runs there as
//! the URL's role on a connection of its own, and each answer (a verifier, or none) is cached for
//! `auth.cache_ttl`. Unknown roles are cached too, so that they cost what known ones cost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::scram::ScramSecret;
use crate::backend::conn::Upstream;
use crate::backend::control::ControlConn;
use crate::error::PgError;

/// Most roles whose answers are cached at once.
const MAX_CACHED: usize = 10_000;

/// A role's password verifier, as `pg_authid.rolpassword` holds it.
#[derive(Clone)]
pub enum Verifier {
    Scram(ScramSecret),
    /// `md5` followed by the hex MD5 of password and role name.
    Md5(String),
}

impl Verifier {
    pub fn parse(text: &str) -> Option<Verifier> {
        if let Some(secret) = ScramSecret::parse(text) {
            return Some(Verifier::Scram(secret));
        }
        let hex = text.strip_prefix("md5")?;
        (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Verifier::Md5(text.to_string()))
    }
}

/// Per role: when it was looked up, and what was found.
type Cache = HashMap<String, (Instant, Option<Arc<Verifier>>)>;

pub struct Verifiers {
    primary: Arc<Upstream>,
    query: String,
    ttl: Duration,
    cache: Mutex<Cache>,
    /// The lookup connection, opened on first use and after a failure.
    conn: tokio::sync::Mutex<Option<ControlConn>>,
}

impl Verifiers {
    pub fn new(primary: Arc<Upstream>, query: String, ttl: Duration) -> Verifiers {
        Verifiers {
            primary,
            query,
            ttl,
            cache: Mutex::default(),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Opens the lookup connection ahead of the first login (which then pays one round trip
    /// to the primary, not a connection set-up); a failure is retried at that login.
    pub async fn connect(&self) {
        let mut conn = self.conn.lock().await;
        if conn.is_none() {
            match ControlConn::connect(&self.primary, self.primary.connect_timeout).await {
                Ok(c) => *conn = Some(c),
                Err(e) => tracing::debug!(error = %e, "verifier lookup connection not opened yet"),
            }
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // Nothing under this lock can panic half-way through an update.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The verifier of `role` (`None`: it does not exist, cannot log in, expired, or has no
    /// password). An error when the primary cannot be asked.
    pub async fn get(&self, role: &str) -> Result<Option<Arc<Verifier>>, PgError> {
        if let Some(v) = self.cached(role) {
            return Ok(v);
        }
        let mut conn = self.conn.lock().await;
        // Another login may have looked it up while this one waited.
        if let Some(v) = self.cached(role) {
            return Ok(v);
        }
        let deadline = self.primary.connect_timeout;
        let sql = self.query.replace("$1", &quote(role));
        let answer = async {
            if conn.is_none() {
                *conn = Some(ControlConn::connect(&self.primary, deadline).await?);
            }
            let c = conn.as_mut().expect("connected above");
            c.query_first_within(&sql, deadline).await
        }
        .await;
        let row = match answer {
            Ok(row) => row,
            Err(e) => {
                *conn = None;
                return Err(PgError::upstream(format!(
                    "cannot look up role \"{role}\" on the primary: {e}"
                )));
            }
        };
        let verifier = row
            .and_then(|r| r.into_iter().next().flatten())
            .and_then(|text| Verifier::parse(&text))
            .map(Arc::new);
        let mut cache = self.cache();
        if cache.len() >= MAX_CACHED {
            let ttl = self.ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(role.to_string(), (Instant::now(), verifier.clone()));
        Ok(verifier)
    }

    fn cached(&self, role: &str) -> Option<Option<Arc<Verifier>>> {
        let cache = self.cache();
        let (at, v) = cache.get(role)?;
        (at.elapsed() < self.ttl).then(|| v.clone())
    }

    /// Drops what is cached for `role` (a login failed with it: the verifier may have changed).
    pub fn forget(&self, role: &str) {
        self.cache().remove(role);
    }
}

/// `text` as an SQL string literal, whatever `standard_conforming_strings` says.
fn quote(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifiers_and_literals() {
        assert!(matches!(
            Verifier::parse(
                "md5 0123456789abcdef0123456789abcdef"
                    .replace(' ', "")
                    .as_str()
            ),
            Some(Verifier::Md5(_))
        ));
        assert!(Verifier::parse("md5xyz").is_none());
        assert!(Verifier::parse("plain-text").is_none());
        let scram = postgres_protocol::password::scram_sha_256(b"pw");
        assert!(matches!(Verifier::parse(&scram), Some(Verifier::Scram(_))));
        assert_eq!(quote("o'brien\\x"), "E'o''brien\\\\x'");
    }
}
