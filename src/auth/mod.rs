//! Client authentication (pgnear as the server): SCRAM-SHA-256, md5 and trust. With
//! `auth.users = "url"` the one role served is the primary URL's, checked against its password;
//! with `"query"` any role the primary knows, checked against the verifier looked up there
//! (`verifiers`). Either way the client is the role it logged in as: the `Login` it ends with is
//! how pgnear logs in upstream as that role.

pub mod scram;
pub mod verifiers;

use std::sync::Arc;

use bytes::BytesMut;
use rand::RngCore;
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;

use self::scram::ScramSecret;
use self::verifiers::{Verifier, Verifiers};
use crate::backend::conn::Upstream;
use crate::backend::login::{hex, md5_answer, Login, Secret};
use crate::config::{AuthMethod, AuthUsers, Config};
use crate::error::{ErrorKind, PgError};
use crate::protocol::{cstr, tag, write};
use crate::tls::Stream;

/// Client authentication as configured.
pub struct Auth {
    method: AuthMethod,
    users: AuthUsers,
    /// The URL's role.
    url: Credentials,
    url_login: Arc<Login>,
    /// With `users = "query"` and a method that checks passwords.
    verifiers: Option<Verifiers>,
    /// Derives the salt of the mock exchange for a role that cannot log in.
    mock_key: [u8; 32],
}

impl Auth {
    pub fn new(config: &Config, primary: &Arc<Upstream>) -> Auth {
        let url = &primary.url;
        let method = config.auth_method();
        let users = config.auth.users;
        let verifiers = (users == AuthUsers::Query && method != AuthMethod::Trust).then(|| {
            Verifiers::new(
                primary.clone(),
                config.auth.query.clone(),
                config.auth.cache_ttl.0,
            )
        });
        let mut mock_key = [0u8; 32];
        rand::rng().fill_bytes(&mut mock_key);
        Auth {
            method,
            users,
            url: Credentials::new(&url.user, url.password.as_deref()),
            url_login: primary.login.clone(),
            verifiers,
            mock_key,
        }
    }

    /// Gets ready for logins (the verifier lookup connection, with `users = "query"`).
    pub async fn prepare(&self) {
        if let Some(v) = &self.verifiers {
            v.connect().await;
        }
    }

    /// How pgnear logs in as the URL's role (control connections, warm pool connections).
    pub fn url_login(&self) -> &Arc<Login> {
        &self.url_login
    }

    /// Runs the authentication exchange for `user` and sends AuthenticationOk on success.
    /// Not cancel-safe (it owns a multi-step exchange); callers bound it with a timeout.
    pub async fn authenticate(
        &self,
        stream: &mut Stream,
        user: &str,
    ) -> Result<Arc<Login>, PgError> {
        let mut out = BytesMut::new();
        let mut buf = BytesMut::new();
        let login = if user == self.url.user {
            self.url
                .check(stream, &mut out, &mut buf, self.method)
                .await?;
            self.url_login.clone()
        } else if self.users == AuthUsers::Url {
            return Err(PgError::new(
                ErrorKind::Auth,
                format!("pgnear serves role \"{}\" only", self.url.user),
            )
            .with_code("28000")
            .with_hint("Connect as that role, or set auth.users = \"query\" to serve every role the primary knows."));
        } else if let Some(verifiers) = &self.verifiers {
            let verifier = verifiers.get(user).await?;
            let checked = self
                .check(stream, &mut out, &mut buf, verifier.as_deref(), user)
                .await;
            match checked {
                Ok(secret) => Arc::new(Login {
                    user: user.to_string(),
                    secret,
                    url: false,
                }),
                Err(e) => {
                    verifiers.forget(user);
                    return Err(e);
                }
            }
        } else {
            // Trust: the servers decide whether the role may log in.
            Arc::new(Login {
                user: user.to_string(),
                secret: Secret::None,
                url: false,
            })
        };
        write::auth_ok(&mut out);
        send(stream, &mut out).await?;
        Ok(login)
    }

    /// Checks a client against a looked-up verifier: SCRAM for a SCRAM verifier, md5 for an
    /// md5 one when the method is md5. A role without a usable verifier goes through a mock
    /// SCRAM exchange that fails like a wrong password, so that it cannot be told apart.
    async fn check(
        &self,
        stream: &mut Stream,
        out: &mut BytesMut,
        buf: &mut BytesMut,
        verifier: Option<&Verifier>,
        user: &str,
    ) -> Result<Secret, PgError> {
        match verifier {
            Some(Verifier::Scram(secret)) => {
                let client_key = scram::serve(stream, out, buf, secret, user).await?;
                Ok(Secret::Scram {
                    client_key,
                    server_key: secret.server_key.clone(),
                })
            }
            Some(Verifier::Md5(hash)) if self.method == AuthMethod::Md5 => {
                md5_exchange(stream, out, buf, hash, user).await?;
                Ok(Secret::Md5(hash.clone()))
            }
            _ => {
                let mock = ScramSecret::mock(&self.mock_key, user);
                scram::serve(stream, out, buf, &mock, user).await?;
                Err(failed(user))
            }
        }
    }
}

/// The URL role's credentials, with its SCRAM secret derived once at startup.
struct Credentials {
    user: String,
    /// The md5 verifier of its password.
    md5: Option<String>,
    scram: Option<ScramSecret>,
}

impl Credentials {
    fn new(user: &str, password: Option<&str>) -> Credentials {
        Credentials {
            user: user.to_string(),
            md5: password.map(|p| md5_verifier(user, p)),
            scram: password.and_then(ScramSecret::derive),
        }
    }

    async fn check(
        &self,
        stream: &mut Stream,
        out: &mut BytesMut,
        buf: &mut BytesMut,
        method: AuthMethod,
    ) -> Result<(), PgError> {
        let user = &self.user;
        match method {
            AuthMethod::Trust => Ok(()),
            AuthMethod::Md5 => {
                let hash = self.md5.as_deref().ok_or_else(|| failed(user))?;
                md5_exchange(stream, out, buf, hash, user).await
            }
            AuthMethod::ScramSha256 => {
                let secret = self.scram.as_ref().ok_or_else(|| failed(user))?;
                scram::serve(stream, out, buf, secret, user).await.map(drop)
            }
        }
    }
}

/// `md5` + hex MD5 of password and role name: what Postgres stores for an md5 role.
fn md5_verifier(user: &str, password: &str) -> String {
    use md5::Digest;
    let mut h = md5::Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{}", hex(&h.finalize()))
}

/// Challenges the client with a fresh salt and checks its answer against an md5 verifier.
async fn md5_exchange(
    stream: &mut Stream,
    out: &mut BytesMut,
    buf: &mut BytesMut,
    verifier: &str,
    user: &str,
) -> Result<(), PgError> {
    let mut salt = [0u8; 4];
    rand::rng().fill_bytes(&mut salt);
    write::auth_md5(out, salt);
    send(stream, out).await?;
    let body = read_password_frame(stream, buf).await?;
    let (given, _) = cstr(&body).ok_or_else(|| PgError::protocol("invalid password packet"))?;
    let expected = md5_answer(verifier, salt);
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(failed(user))
    }
}

pub(super) fn failed(user: &str) -> PgError {
    PgError::new(
        ErrorKind::Auth,
        format!("password authentication failed for user \"{user}\""),
    )
}

pub(super) async fn send(stream: &mut Stream, out: &mut BytesMut) -> Result<(), PgError> {
    stream.write_all(out).await.map_err(|e| {
        PgError::protocol(format!("client connection lost during authentication: {e}"))
    })?;
    out.clear();
    Ok(())
}

/// Reads one PasswordMessage-family frame ('p'), capped at 8 KB.
pub(super) async fn read_password_frame(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<BytesMut, PgError> {
    let (t, body) = crate::protocol::read_frame(stream, buf, 8193)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                PgError::protocol("client closed the connection during authentication")
            }
            std::io::ErrorKind::InvalidData => {
                PgError::protocol(format!("invalid password message: {e}"))
            }
            _ => PgError::protocol(format!("client connection lost during authentication: {e}")),
        })?;
    if t != tag::PASSWORD {
        return Err(PgError::protocol(format!(
            "expected password response, got message type {t}"
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use crate::backend::login::md5_answer;

    #[test]
    fn md5_answers_match_postgres_protocol() {
        let salt = [1, 2, 3, 4];
        let verifier = super::md5_verifier("bob", "secret");
        assert_eq!(
            md5_answer(&verifier, salt),
            postgres_protocol::authentication::md5_hash(b"bob", b"secret", salt)
        );
    }
}
