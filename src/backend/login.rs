//! How pgnear proves a role to the servers: the URL's password, or the keys of the role's SCRAM
//! or md5 verifier learnt from the client's own login (`auth`), and the client side of those
//! exchanges.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// How pgnear logs in upstream as a role.
pub struct Login {
    pub user: String,
    pub secret: Secret,
    /// The URL's role: each upstream logs in with its own URL's credentials instead.
    pub url: bool,
}

impl Login {
    /// The login of an upstream URL's role.
    pub fn of_url(url: &crate::upstream_url::UpstreamUrl) -> Login {
        Login {
            user: url.user.clone(),
            secret: url.password.clone().map_or(Secret::None, Secret::Password),
            url: true,
        }
    }
}

/// What proves a role to the servers.
pub enum Secret {
    /// Nothing: the servers must trust the role.
    None,
    /// The URL's password.
    Password(String),
    /// The keys of the role's SCRAM verifier: ClientKey (from the client's proof) proves the
    /// role, ServerKey checks the server.
    Scram {
        client_key: Vec<u8>,
        server_key: Vec<u8>,
    },
    /// The role's md5 verifier (`md5` + hex), which is all an md5 exchange needs.
    Md5(String),
}

impl std::fmt::Debug for Login {
    /// The role only: never a secret in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Login({})", self.user)
    }
}

/// The answer to an md5 challenge with `salt`, from the role's md5 verifier.
pub fn md5_answer(verifier: &str, salt: [u8; 4]) -> String {
    use md5::Digest;
    let mut h = md5::Md5::new();
    h.update(verifier.strip_prefix("md5").unwrap_or(verifier).as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The client side of an exchange with the keys of a verifier: ClientKey proves the role,
/// ServerKey checks the server. (With a cleartext password, postgres-protocol's `ScramSha256`
/// is used instead.)
pub struct KeyClient {
    client_key: Vec<u8>,
    server_key: Vec<u8>,
    nonce: String,
    /// The client-first-message-bare.
    bare: String,
    /// The AuthMessage, once the server answered.
    auth_message: String,
}

impl KeyClient {
    pub fn new(client_key: &[u8], server_key: &[u8]) -> KeyClient {
        let nonce = fresh_nonce();
        KeyClient {
            client_key: client_key.to_vec(),
            server_key: server_key.to_vec(),
            bare: format!("n=,r={nonce}"),
            auth_message: String::new(),
            nonce,
        }
    }

    /// The client-first-message.
    pub fn first(&self) -> String {
        format!("n,,{}", self.bare)
    }

    /// Answers the server-first-message with the client-final-message.
    pub fn answer(&mut self, server_first: &[u8]) -> Result<String, String> {
        let server_first = std::str::from_utf8(server_first).map_err(|_| "not UTF-8")?;
        let nonce = server_first
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or("no nonce")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err("the server's nonce does not extend pgnear's".into());
        }
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{server_first},{without_proof}", self.bare);
        let stored_key = Sha256::digest(&self.client_key);
        let signature = hmac(&stored_key, self.auth_message.as_bytes());
        let proof = xor(&self.client_key, &signature);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message's signature.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(server_final).map_err(|_| "not UTF-8")?;
        let given = text
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or("no server signature")?;
        let expected = hmac(&self.server_key, self.auth_message.as_bytes());
        if bool::from(given.ct_eq(&expected)) {
            Ok(())
        } else {
            Err("the server's signature does not match the role's verifier".into())
        }
    }
}

pub fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

/// 18 random bytes, base64: a nonce's own part.
pub fn fresh_nonce() -> String {
    let mut raw = [0u8; 18];
    rand::rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

pub fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}
