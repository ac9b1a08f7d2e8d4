//! SCRAM-SHA-256 (RFC 5802, RFC 7677) both ways: pgnear as the server checking a client against
//! a verifier, and pgnear as the client logging in upstream with the keys of a verifier and the
//! ClientKey a client's proof revealed (pass-through: no cleartext password ever needed).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Buf, BytesMut};

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{failed, read_password_frame, send};
use crate::backend::login::{fresh_nonce, hmac, xor};
use crate::error::PgError;
use crate::protocol::{cstr, write};
use crate::tls::Stream;

/// Iterations of a mock secret (Postgres's default for new verifiers).
const MOCK_ITERATIONS: u32 = 4096;

/// A SCRAM-SHA-256 verifier: what Postgres stores in `pg_authid.rolpassword`.
#[derive(Clone)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl ScramSecret {
    /// Derives a secret with a fresh salt (the expensive PBKDF2 runs once per process).
    pub fn derive(password: &str) -> Option<ScramSecret> {
        ScramSecret::parse(&postgres_protocol::password::scram_sha_256(
            password.as_bytes(),
        ))
    }

    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(verifier: &str) -> Option<ScramSecret> {
        let rest = verifier.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let secret = ScramSecret {
            iterations: iterations.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?,
            server_key: B64.decode(server).ok()?,
        };
        (secret.stored_key.len() == 32 && secret.server_key.len() == 32).then_some(secret)
    }

    /// A secret no proof matches, for a role that cannot log in: its salt is derived from the
    /// role name with `key` (stable across attempts, as Postgres's mock salt is), so the
    /// exchange looks the same as for a real role.
    pub fn mock(key: &[u8], user: &str) -> ScramSecret {
        let mut stored_key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut stored_key);
        ScramSecret {
            iterations: MOCK_ITERATIONS,
            salt: hmac(key, user.as_bytes())[..16].to_vec(),
            stored_key,
            server_key: vec![0u8; 32],
        }
    }
}

/// Runs the server side of the exchange for `user` against `secret`. On success the
/// SASLFinal message is queued in `out` (sent with AuthenticationOk by the caller) and the
/// client's ClientKey is returned.
pub async fn serve(
    stream: &mut Stream,
    out: &mut BytesMut,
    buf: &mut BytesMut,
    secret: &ScramSecret,
    user: &str,
) -> Result<Vec<u8>, PgError> {
    write::auth_sasl(out);
    send(stream, out).await?;

    // SASLInitialResponse: mechanism, length, client-first-message.
    let body = read_password_frame(stream, buf).await?;
    let ClientFirst {
        gs2_header,
        bare,
        nonce: client_nonce,
    } = parse_client_first(&body)?;

    let nonce = format!("{client_nonce}{}", fresh_nonce());
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
    let client_key = xor(&proof, &client_signature);
    if !bool::from(Sha256::digest(&client_key).ct_eq(&secret.stored_key[..])) {
        return Err(failed(user));
    }
    let server_signature = hmac(&secret.server_key, auth_message.as_bytes());
    write::auth_sasl_final(
        out,
        format!("v={}", B64.encode(server_signature)).as_bytes(),
    );
    Ok(client_key)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::login::KeyClient;

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

    /// The key client's proof passes a server's check against a verifier made from a
    /// password, given only the ClientKey derived from that password; it checks the server's
    /// signature.
    #[test]
    fn key_client_proves_what_a_password_client_proves() {
        let secret = ScramSecret::derive("hunter2").unwrap();
        // SaltedPassword = Hi(password, salt, i), PBKDF2 with HMAC-SHA-256 (RFC 5802).
        let mut u = hmac(b"hunter2", &[&secret.salt[..], &[0, 0, 0, 1]].concat());
        let mut salted = u.clone();
        for _ in 1..secret.iterations {
            u = hmac(b"hunter2", &u);
            salted = xor(&salted, &u);
        }
        let client_key = hmac(&salted, b"Client Key");
        assert_eq!(Sha256::digest(&client_key)[..], secret.stored_key[..]);
        let mut keys = KeyClient::new(&client_key, &secret.server_key);
        let first_of = |bare: &str| {
            let nonce = bare.split("r=").nth(1).unwrap().to_string();
            format!(
                "r={nonce}srv,s={},i={}",
                B64.encode(&secret.salt),
                secret.iterations
            )
        };
        let server_first = first_of(&keys.first());
        let final_message = keys.answer(server_first.as_bytes()).unwrap();
        // Check the proof as a server would.
        let (without_proof, proof) = final_message.rsplit_once(",p=").unwrap();
        let auth = format!("{},{server_first},{without_proof}", &keys.first()[3..]);
        let signature = hmac(&secret.stored_key, auth.as_bytes());
        let key = xor(&B64.decode(proof).unwrap(), &signature);
        assert_eq!(Sha256::digest(&key)[..], secret.stored_key[..]);
        let v = hmac(&secret.server_key, auth.as_bytes());
        assert!(keys
            .finish(format!("v={}", B64.encode(&v)).as_bytes())
            .is_ok());
        assert!(keys.finish(b"v=AAAA").is_err());
        // A server nonce that does not extend ours is refused.
        let mut other = KeyClient::new(&client_key, &secret.server_key);
        assert!(other.answer(b"r=elsewhere,s=AAAA,i=4096").is_err());
    }

    #[test]
    fn verifiers_parse_and_mocks_are_stable() {
        let secret = ScramSecret::derive("x").unwrap();
        assert_eq!(secret.iterations, 4096);
        assert!(ScramSecret::parse("md5abc").is_none());
        assert!(ScramSecret::parse("SCRAM-SHA-256$4096:AAAA$AAAA:AAAA").is_none());
        let a = ScramSecret::mock(b"k", "bob");
        let b = ScramSecret::mock(b"k", "bob");
        assert_eq!(a.salt, b.salt);
        assert_ne!(a.salt, ScramSecret::mock(b"k", "eve").salt);
    }
}
