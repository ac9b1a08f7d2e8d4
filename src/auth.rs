//! Client authentication (pgnear as the server): SCRAM-SHA-256, md5 and trust, checked against the
//! credentials of the primary upstream URL.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Buf, BytesMut};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::AuthMethod;
use crate::error::{ErrorKind, PgError};
use crate::protocol::{cstr, tag, write};
use crate::tls::Stream;

/// The credentials clients must present, with the SCRAM secret derived once at startup.
pub struct Credentials {
    pub user: String,
    password: Option<String>,
    scram: Option<ScramSecret>,
}

struct ScramSecret {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl ScramSecret {
    /// Derives a secret with a fresh salt (the expensive PBKDF2 runs once per process).
    fn derive(password: &str) -> Option<ScramSecret> {
        // Format: SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        let rest = verifier.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramSecret {
            iterations: iterations.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?,
            server_key: B64.decode(server).ok()?,
        })
    }
}

impl Credentials {
    pub fn new(user: &str, password: Option<&str>) -> Credentials {
        Credentials {
            user: user.to_string(),
            password: password.map(str::to_string),
            scram: password.and_then(ScramSecret::derive),
        }
    }
}

fn failed(user: &str) -> PgError {
    PgError::new(
        ErrorKind::Auth,
        format!("password authentication failed for user \"{user}\""),
    )
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Runs the authentication exchange and sends AuthenticationOk on success.
/// Not cancel-safe (it owns a multi-step exchange); callers bound it with a timeout.
pub async fn authenticate(
    stream: &mut Stream,
    method: AuthMethod,
    creds: &Credentials,
    user: &str,
) -> Result<(), PgError> {
    let mut out = BytesMut::new();
    let mut buf = BytesMut::new();
    match method {
        AuthMethod::Trust => {}
        AuthMethod::Md5 => {
            let password = creds.password.as_deref().ok_or_else(|| failed(user))?;
            let mut salt = [0u8; 4];
            rand::rng().fill_bytes(&mut salt);
            write::auth_md5(&mut out, salt);
            send(stream, &mut out).await?;
            let body = read_password_frame(stream, &mut buf).await?;
            let (given, _) =
                cstr(&body).ok_or_else(|| PgError::protocol("invalid password packet"))?;
            let expected = postgres_protocol::authentication::md5_hash(
                user.as_bytes(),
                password.as_bytes(),
                salt,
            );
            if user != creds.user || !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
                return Err(failed(user));
            }
        }
        AuthMethod::ScramSha256 => {
            let secret = creds.scram.as_ref().ok_or_else(|| failed(user))?;
            scram(stream, &mut out, &mut buf, secret, user).await?;
            if user != creds.user {
                return Err(failed(user));
            }
        }
    }
    write::auth_ok(&mut out);
    send(stream, &mut out).await
}

async fn scram(
    stream: &mut Stream,
    out: &mut BytesMut,
    buf: &mut BytesMut,
    secret: &ScramSecret,
    user: &str,
) -> Result<(), PgError> {
    write::auth_sasl(out);
    send(stream, out).await?;

    // SASLInitialResponse: mechanism, length, client-first-message.
    let body = read_password_frame(stream, buf).await?;
    let ClientFirst {
        gs2_header,
        bare,
        nonce: client_nonce,
    } = parse_client_first(&body)?;

    let mut raw = [0u8; 18];
    rand::rng().fill_bytes(&mut raw);
    let nonce = format!("{client_nonce}{}", B64.encode(raw));
    let server_first = format!(
        "r={nonce},s={},i={}",
        B64.encode(&secret.salt),
        secret.iterations
    );
    write::auth_sasl_continue(out, server_first.as_bytes());
    send(stream, out).await?;

    // SASLResponse: client-final-message "c=...,r=...,p=...".
    let body = read_password_frame(stream, buf).await?;
    let ClientFinal {
        without_proof,
        channel,
        nonce: final_nonce,
        proof,
    } = parse_client_final(&body)?;
    if channel != Some(B64.encode(gs2_header).as_str()) || final_nonce != Some(nonce.as_str()) {
        return Err(failed(user));
    }
    let proof = B64.decode(proof).map_err(|_| malformed())?;
    let auth_message = format!("{bare},{server_first},{without_proof}");
    let client_signature = hmac(&secret.stored_key, auth_message.as_bytes());
    if proof.len() != client_signature.len() {
        return Err(failed(user));
    }
    let client_key: Vec<u8> = proof
        .iter()
        .zip(&client_signature)
        .map(|(a, b)| a ^ b)
        .collect();
    if !constant_time_eq(&Sha256::digest(&client_key), &secret.stored_key) {
        return Err(failed(user));
    }
    let server_signature = hmac(&secret.server_key, auth_message.as_bytes());
    write::auth_sasl_final(
        out,
        format!("v={}", B64.encode(server_signature)).as_bytes(),
    );
    // Sent with AuthenticationOk by the caller.
    Ok(())
}

fn malformed() -> PgError {
    PgError::protocol("malformed SASL message")
}

/// What pgnear uses of a SASLInitialResponse body (mechanism, length, client-first-message).
#[derive(Debug, PartialEq, Eq)]
pub struct ClientFirst<'a> {
    /// "n,," or "y,," with an optional authzid.
    pub gs2_header: &'a str,
    /// client-first-message-bare.
    pub bare: &'a str,
    /// The client's nonce (not empty).
    pub nonce: &'a str,
}

/// Parses a SASLInitialResponse body.
pub fn parse_client_first(body: &[u8]) -> Result<ClientFirst<'_>, PgError> {
    let (mechanism, used) = cstr(body).ok_or_else(malformed)?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(PgError::protocol(format!(
            "SASL mechanism {mechanism:?} is not supported (pgnear offers SCRAM-SHA-256)"
        )));
    }
    let mut rest = &body[used..];
    if rest.len() < 4 {
        return Err(malformed());
    }
    let len = rest.get_i32();
    if len < 0 || len as usize != rest.len() {
        return Err(malformed());
    }
    let client_first = std::str::from_utf8(rest).map_err(|_| malformed())?;
    // gs2 header: "n,," or "y,," (client could bind, we did not offer); "p=" needs -PLUS.
    let (cbind, after) = client_first.split_once(',').ok_or_else(malformed)?;
    if !matches!(cbind, "n" | "y") {
        return Err(PgError::protocol(
            "SCRAM channel binding was not offered by pgnear",
        ));
    }
    let (_authzid, bare) = after.split_once(',').ok_or_else(malformed)?;
    let gs2_header = &client_first[..client_first.len() - bare.len()];
    let nonce = bare
        .split(',')
        .find_map(|a| a.strip_prefix("r="))
        .filter(|n| !n.is_empty())
        .ok_or_else(malformed)?;
    Ok(ClientFirst {
        gs2_header,
        bare,
        nonce,
    })
}

/// What pgnear uses of a SASLResponse body (client-final-message "c=...,r=...,p=...").
#[derive(Debug, PartialEq, Eq)]
pub struct ClientFinal<'a> {
    /// client-final-message-without-proof.
    pub without_proof: &'a str,
    /// The channel binding attribute (base64 of the gs2 header).
    pub channel: Option<&'a str>,
    pub nonce: Option<&'a str>,
    /// The proof, base64.
    pub proof: &'a str,
}

/// Parses a SASLResponse body.
pub fn parse_client_final(body: &[u8]) -> Result<ClientFinal<'_>, PgError> {
    let client_final = std::str::from_utf8(body).map_err(|_| malformed())?;
    let (without_proof, proof) = client_final.rsplit_once(",p=").ok_or_else(malformed)?;
    let mut channel = None;
    let mut nonce = None;
    for attr in without_proof.split(',') {
        if let Some(c) = attr.strip_prefix("c=") {
            channel = Some(c);
        } else if let Some(r) = attr.strip_prefix("r=") {
            nonce = Some(r);
        }
    }
    Ok(ClientFinal {
        without_proof,
        channel,
        nonce,
        proof,
    })
}

async fn send(stream: &mut Stream, out: &mut BytesMut) -> Result<(), PgError> {
    stream.write_all(out).await.map_err(|e| {
        PgError::protocol(format!("client connection lost during authentication: {e}"))
    })?;
    out.clear();
    Ok(())
}

/// Reads one PasswordMessage-family frame ('p'), capped at 8 KB.
async fn read_password_frame(stream: &mut Stream, buf: &mut BytesMut) -> Result<BytesMut, PgError> {
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
    use super::*;

    fn initial(message: &str) -> Vec<u8> {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&(message.len() as i32).to_be_bytes());
        body.extend_from_slice(message.as_bytes());
        body
    }

    #[test]
    fn client_first() {
        let body = initial("n,,n=,r=rOprNGfwEbeRWgbNEkqO");
        let f = parse_client_first(&body).unwrap();
        assert_eq!(
            f,
            ClientFirst {
                gs2_header: "n,,",
                bare: "n=,r=rOprNGfwEbeRWgbNEkqO",
                nonce: "rOprNGfwEbeRWgbNEkqO",
            }
        );
        for bad in [
            initial("p=tls-server-end-point,,n=,r=abc"),
            initial("n,,n=,r="),
            b"SCRAM-SHA-256-PLUS\0\0\0\0\x01x".to_vec(),
            b"SCRAM-SHA-256\0\0\0\0\x09n,,r=abc".to_vec(),
            b"SCRAM-SHA-256\0\0\0".to_vec(),
            b"SCRAM-SHA-256".to_vec(),
        ] {
            assert!(parse_client_first(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn client_final() {
        let f = parse_client_final(b"c=biws,r=abcdef,p=dGVzdA==").unwrap();
        assert_eq!(
            f,
            ClientFinal {
                without_proof: "c=biws,r=abcdef",
                channel: Some("biws"),
                nonce: Some("abcdef"),
                proof: "dGVzdA==",
            }
        );
        assert!(parse_client_final(b"c=biws,r=abcdef").is_err());
        assert!(parse_client_final(b"c=biws,r=abc\xff,p=").is_err());
    }
}
