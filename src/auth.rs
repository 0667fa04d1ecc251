//! Client-facing authentication: SCRAM-SHA-256 (pgwire's server state machine), md5, trust.
//! Nothing here touches a backend: a wrong password is refused before any pool is used.

use std::collections::HashMap;

use pgwire::api::auth::sasl::scram::{
    SCRAM_ITERATIONS, ScramSecret, ScramServerAuth, gen_salted_password,
};
use postgres_protocol::authentication::md5_hash;
use rand::Rng;
use ring::hmac;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{AuthMethod, Config};
use crate::error::SessionError;
use crate::protocol::{self, ProtocolError, tag};
use crate::transport::{Transport, TransportError};

const SCRAM_MECHANISM: &str = "SCRAM-SHA-256";

/// PostgreSQL's PG_MAX_SASL_MESSAGE_LENGTH: a longer SASL message is refused from its header.
pub const MAX_SASL_MESSAGE_BYTES: usize = 1024;
/// PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH: a longer password message is refused from its
/// header. No message before login may be longer.
pub const MAX_PASSWORD_MESSAGE_BYTES: usize = 65535;

/// Length of every SCRAM salt the proxy hands out, a configured user's or not.
const SALT_BYTES: usize = 16;

/// Per-user SCRAM material derived once at start-up (PBKDF2 is deliberately slow).
pub struct AuthSecrets {
    method: AuthMethod,
    scram: HashMap<String, (Vec<u8>, Vec<u8>)>,
    passwords: HashMap<String, String>,
    /// Keys the salts of names that are not configured, as PostgreSQL's `scram_mock_salt`
    /// does: chosen at start, so a name's salt is as stable as a configured user's and
    /// cannot be predicted from outside.
    mock_salt_key: hmac::Key,
    /// What names that are not configured are checked against: random, so no proof fits it.
    mock_salted_password: [u8; 32],
}

impl AuthSecrets {
    /// Derives salts and salted passwords for every configured user.
    pub fn new(cfg: &Config) -> Self {
        let mut scram = HashMap::new();
        let mut passwords = HashMap::new();
        for u in &cfg.users {
            if cfg.auth.method == AuthMethod::ScramSha256 {
                let salt: [u8; SALT_BYTES] = rand::rng().random();
                let salted = gen_salted_password(&u.password, &salt, SCRAM_ITERATIONS);
                scram.insert(u.name.clone(), (salt.to_vec(), salted));
            }
            passwords.insert(u.name.clone(), u.password.clone());
        }
        let mock_key: [u8; 32] = rand::rng().random();
        Self {
            method: cfg.auth.method,
            scram,
            passwords,
            mock_salt_key: hmac::Key::new(hmac::HMAC_SHA256, &mock_key),
            mock_salted_password: rand::rng().random(),
        }
    }

    /// The salt a name that is not configured gets: the same on every attempt and different
    /// for every name, as configured users' salts are, so the salt does not tell them apart.
    fn mock_salt(&self, user: &str) -> Vec<u8> {
        let tag = hmac::sign(&self.mock_salt_key, user.as_bytes());
        tag.as_ref().iter().copied().take(SALT_BYTES).collect()
    }

    /// Runs the authentication exchange for `user`; on success AuthenticationOk has been queued.
    pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        t: &mut Transport<S>,
        user: &str,
    ) -> Result<(), SessionError> {
        let failed = || SessionError::AuthFailed(user.to_string());
        match self.method {
            AuthMethod::Trust => {
                if !self.passwords.contains_key(user) {
                    return Err(SessionError::AuthRejected(format!(
                        "no such user \"{user}\" is configured in the proxy"
                    )));
                }
            }
            AuthMethod::Md5 => {
                let salt: [u8; 4] = rand::rng().random();
                t.send(&protocol::auth_md5(salt))
                    .await
                    .map_err(SessionError::ClientIo)?;
                let reply = read_password_frame(t, MAX_PASSWORD_MESSAGE_BYTES).await?;
                let given = protocol::parse_password(reply.body())?;
                let Some(password) = self.passwords.get(user) else {
                    return Err(failed());
                };
                let expected = md5_hash(user.as_bytes(), password.as_bytes(), salt);
                if !constant_time_eq(expected.as_bytes(), given.as_bytes()) {
                    return Err(failed());
                }
            }
            AuthMethod::ScramSha256 => self.scram(t, user).await?,
        }
        t.queue(&protocol::auth_ok());
        Ok(())
    }

    async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        t: &mut Transport<S>,
        user: &str,
    ) -> Result<(), SessionError> {
        let failed = || SessionError::AuthFailed(user.to_string());
        t.send(&protocol::auth_sasl(&[SCRAM_MECHANISM]))
            .await
            .map_err(SessionError::ClientIo)?;
        let first = read_password_frame(t, MAX_SASL_MESSAGE_BYTES).await?;
        let (mechanism, data) = protocol::parse_sasl_initial(first.body())?;
        if mechanism != SCRAM_MECHANISM {
            return Err(SessionError::AuthRejected(format!(
                "unsupported SASL mechanism {mechanism:?}"
            )));
        }
        // An unknown user runs the same exchange against a throwaway secret, with a salt as
        // stable as a real one, so the failure looks exactly like a wrong password.
        let (salt, salted) = match self.scram.get(user) {
            Some((s, p)) => (s.clone(), p.clone()),
            None => (self.mock_salt(user), self.mock_salted_password.to_vec()),
        };
        let mut server = ScramServerAuth::new();
        server.set_iterations(SCRAM_ITERATIONS);
        let secret = ScramSecret::SaltedPassword {
            salt,
            salted_password: salted,
        };
        let (server_first, waiting) = server
            .on_client_first_message_with_secret(data, secret)
            .map_err(|_| failed())?;
        t.send(&protocol::auth_sasl_continue(server_first.as_bytes()))
            .await
            .map_err(SessionError::ClientIo)?;
        let last = read_password_frame(t, MAX_SASL_MESSAGE_BYTES).await?;
        let server_final = waiting
            .on_client_final_message(last.body())
            .map_err(|_| failed())?;
        if !self.scram.contains_key(user) {
            return Err(failed());
        }
        t.queue(&protocol::auth_sasl_final(server_final.as_bytes()));
        Ok(())
    }
}

/// Reads a password or SASL message of at most `max` bytes: longer is refused from its length
/// header, as PostgreSQL does, so a client that has not logged in cannot make the proxy hold
/// more.
async fn read_password_frame<S: AsyncRead + AsyncWrite + Unpin>(
    t: &mut Transport<S>,
    max: usize,
) -> Result<protocol::Frame, SessionError> {
    let frame = t.read_frame_within(max).await.map_err(|e| match e {
        TransportError::Protocol(ProtocolError::MessageTooLarge { len, max }) => {
            ProtocolError::AuthMessageTooLarge { len, max }.into()
        }
        e => SessionError::from(e),
    })?;
    match frame {
        Some(f) if f.tag == tag::FE_PASSWORD => Ok(f),
        Some(_) => Err(SessionError::AuthRejected(
            "expected a password message during authentication".into(),
        )),
        None => Err(SessionError::ClientIo(std::io::Error::from(
            std::io::ErrorKind::UnexpectedEof,
        ))),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(users: &str) -> AuthSecrets {
        let cfg = Config::from_toml(&format!(
            "{users}\n[primary]\nhost = \"127.0.0.1\"\nport = 5432\n"
        ))
        .expect("config");
        AuthSecrets::new(&cfg)
    }

    #[test]
    fn unknown_names_get_stable_salts_of_a_configured_users_length() {
        let a = secrets("[[users]]\nname = \"app\"\npassword = \"pw\"\n");
        let real = &a.scram["app"].0;
        assert_eq!(a.mock_salt("nobody").len(), real.len());
        assert_eq!(a.mock_salt("nobody"), a.mock_salt("nobody"));
        assert_ne!(a.mock_salt("nobody"), a.mock_salt("nobody2"));
        // Another proxy (another start) salts the same name differently.
        let b = secrets("[[users]]\nname = \"app\"\npassword = \"pw\"\n");
        assert_ne!(a.mock_salt("nobody"), b.mock_salt("nobody"));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
