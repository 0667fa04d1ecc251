//! One logged-in connection to a PostgreSQL server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};

use crate::tls::{Stream, Tls};

use super::statements::StatementCache;
use crate::cluster::Node;
use crate::error::BackendError;
use crate::protocol::{self, AuthRequest, Frame, TxStatus, tag};
use crate::transport::Transport;

/// Statements kept prepared per backend connection before the least recently used is closed.
pub const STATEMENT_CACHE_CAPACITY: usize = 512;

/// Login details for one pool.
#[derive(Clone, Debug)]
pub struct Login {
    pub user: String,
    pub password: String,
    pub database: String,
}

/// A backend connection after startup, ready for queries.
pub struct BackendConn {
    pub transport: Transport<Stream>,
    pub node: Arc<Node>,
    /// BackendKeyData, for forwarding cancel requests.
    pub pid: i32,
    pub secret: i32,
    /// ParameterStatus values reported at login.
    pub params: Vec<(String, String)>,
    pub created: Instant,
    pub last_used: Instant,
    /// Transaction status from the last ReadyForQuery.
    pub status: TxStatus,
    /// Set when the connection can no longer be trusted (I/O error, protocol desync).
    pub broken: bool,
    /// An extended-protocol message went out since the last ReadyForQuery: the server may hold
    /// an implicit transaction that only a Sync ends, which `status` does not show.
    pub unsynced: bool,
    /// Given up while the server may still be running a request: a backend notices a closed
    /// socket only when it next reads or writes, so closing it alone would leave the statement
    /// running (holding its locks). Closing it cancels that request first.
    pub running: bool,
    /// Statements prepared on this connection by the proxy.
    pub statements: StatementCache,
    /// Client settings last replayed on this connection.
    pub applied: Applied,
    /// The node's endpoint generation when this connection was opened.
    pub generation: u64,
}

/// What session settings a backend connection carries, as far as the proxy knows.
/// `Applied::UNKNOWN` marks a connection whose settings changed in ways the proxy has not
/// confirmed yet; it matches no client, so it is reset before anyone else uses it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Fingerprint of the settings last replayed there; 0 = connection defaults.
    pub fingerprint: u64,
    /// A role was set (RESET ALL does not undo SET ROLE).
    pub role: bool,
}

impl Applied {
    /// Settings in flux: reset before reuse, role included.
    pub const UNKNOWN: Applied = Applied {
        fingerprint: u64::MAX,
        role: true,
    };
}

impl BackendConn {
    /// Connects and logs in, answering whatever authentication the server asks for.
    pub async fn connect(
        node: &Arc<Node>,
        login: &Login,
        timeout: Duration,
        max_message: usize,
        tls: &Tls,
    ) -> Result<BackendConn, BackendError> {
        let name = node.name.clone();
        let generation = node.generation.load(std::sync::atomic::Ordering::Acquire);
        let endpoint = node.endpoint();
        let open = tls.connect_server(&endpoint.0, endpoint.1);
        let stream = match tokio::time::timeout(timeout, open).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(BackendError::Connect { node: name, source }),
            Err(_) => return Err(BackendError::ConnectTimeout { node: name }),
        };
        let transport = Transport::new(stream, max_message);
        match tokio::time::timeout(timeout, login_on(transport, node, login)).await {
            Ok(r) => r.map(|mut c| {
                c.generation = generation;
                c
            }),
            Err(_) => Err(BackendError::ConnectTimeout { node: name }),
        }
    }

    /// Sends one simple query and waits for ReadyForQuery; an ErrorResponse becomes an error.
    pub async fn simple_query(&mut self, sql: &str) -> Result<(), BackendError> {
        let node = self.node.name.clone();
        let lost = |source| BackendError::Lost {
            node: node.clone(),
            source,
        };
        self.transport
            .send(&protocol::encode_query(sql))
            .await
            .map_err(|e| lost(e.into()))?;
        let mut failure = None;
        loop {
            let frame = self.read(&node).await?;
            match frame.tag {
                tag::BE_ERROR_RESPONSE => {
                    let fields = protocol::parse_error_fields(frame.body()).ok();
                    failure = Some(BackendError::Login {
                        node: node.clone(),
                        code: fields.as_ref().map(|f| f.code.clone()).unwrap_or_default(),
                        message: fields.map(|f| f.message).unwrap_or_default(),
                    });
                }
                tag::BE_READY_FOR_QUERY => {
                    self.status = protocol::parse_ready_for_query(frame.body())
                        .map_err(|e| lost(e.into()))?;
                    return match failure {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                _ => {}
            }
        }
    }

    async fn read(&mut self, node: &str) -> Result<Frame, BackendError> {
        match self.transport.read_frame().await {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(BackendError::Lost {
                node: node.to_string(),
                source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into(),
            }),
            Err(source) => Err(BackendError::Lost {
                node: node.to_string(),
                source,
            }),
        }
    }

    /// Records what session settings the connection now carries.
    pub fn set_applied(&mut self, applied: Applied) {
        self.applied = applied;
        self.statements.set_scope(applied.fingerprint);
    }

    /// Whether the server closed the connection or sent something unprompted while idle.
    pub fn is_stale(&self) -> bool {
        let mut probe = [0u8; 1];
        !matches!(
            self.transport.get_ref().try_read_raw(&mut probe),
            Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }
}

async fn login_on(
    mut transport: Transport<Stream>,
    node: &Arc<Node>,
    login: &Login,
) -> Result<BackendConn, BackendError> {
    let name = node.name.clone();
    let lost = |source| BackendError::Lost {
        node: name.clone(),
        source,
    };
    let startup = protocol::encode_startup(&[
        ("user", &login.user),
        ("database", &login.database),
        ("application_name", "causeway"),
        ("client_encoding", "UTF8"),
    ]);
    transport.queue_bytes(&startup);
    transport.flush().await.map_err(|e| lost(e.into()))?;
    let mut scram: Option<ScramSha256> = None;
    let mut phase = AuthPhase::Pending;
    let mut params = Vec::new();
    let mut key = (0, 0);
    loop {
        let frame = match transport.read_frame().await {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Err(lost(
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into(),
                ));
            }
            Err(e) => return Err(lost(e)),
        };
        match frame.tag {
            tag::BE_AUTHENTICATION => {
                let req =
                    protocol::parse_authentication(frame.body()).map_err(|e| lost(e.into()))?;
                let next = phase
                    .after(&req)
                    .map_err(|what| out_of_order(&name, what))?;
                let reply = match req {
                    AuthRequest::Ok => None,
                    AuthRequest::CleartextPassword => {
                        Some(protocol::encode_password(login.password.as_bytes()))
                    }
                    AuthRequest::Md5 { salt } => {
                        let hash = md5_hash(login.user.as_bytes(), login.password.as_bytes(), salt);
                        Some(protocol::encode_password(hash.as_bytes()))
                    }
                    AuthRequest::Sasl { mechanisms } => {
                        if !mechanisms.contains(&SCRAM_SHA_256) {
                            return Err(BackendError::UnsupportedAuth {
                                node: name.clone(),
                                method: mechanisms.join(","),
                            });
                        }
                        let s = ScramSha256::new(
                            login.password.as_bytes(),
                            ChannelBinding::unsupported(),
                        );
                        let f = protocol::encode_sasl_initial(SCRAM_SHA_256, s.message());
                        scram = Some(s);
                        Some(f)
                    }
                    AuthRequest::SaslContinue(data) => {
                        let mut s = scram.take().ok_or(BackendError::Unexpected {
                            node: name.clone(),
                            tag: 'R',
                            during: "SCRAM exchange",
                        })?;
                        // Deriving the key is 4096 rounds of HMAC, about a millisecond of CPU:
                        // on the blocking pool, so the threads relaying everyone else's
                        // traffic (one, on a small machine) do not stall while a pool grows.
                        let data = data.to_vec();
                        let (s, derived) = tokio::task::spawn_blocking(move || {
                            let r = s.update(&data);
                            (s, r)
                        })
                        .await
                        .map_err(|e| lost(std::io::Error::other(e).into()))?;
                        derived.map_err(|e| scram_failed(&name, e))?;
                        let f = protocol::encode_sasl_response(s.message());
                        scram = Some(s);
                        Some(f)
                    }
                    AuthRequest::SaslFinal(data) => {
                        let s = scram.as_mut().ok_or(BackendError::Unexpected {
                            node: name.clone(),
                            tag: 'R',
                            during: "SCRAM exchange",
                        })?;
                        s.finish(data).map_err(|e| scram_failed(&name, e))?;
                        None
                    }
                    AuthRequest::Unsupported(code) => {
                        return Err(BackendError::UnsupportedAuth {
                            node: name.clone(),
                            method: format!("authentication request {code}"),
                        });
                    }
                };
                if let Some(f) = reply {
                    transport.send(&f).await.map_err(|e| lost(e.into()))?;
                }
                // Only now: a SASLFinal moves on once its signature verified, not before.
                phase = next;
            }
            tag::BE_PARAMETER_STATUS => {
                if let Ok((k, v)) = protocol::parse_parameter_status(frame.body()) {
                    params.push((k.to_string(), v.to_string()));
                }
            }
            tag::BE_BACKEND_KEY_DATA => {
                key = protocol::parse_backend_key_data(frame.body()).map_err(|e| lost(e.into()))?;
            }
            tag::BE_ERROR_RESPONSE => {
                let fields =
                    protocol::parse_error_fields(frame.body()).map_err(|e| lost(e.into()))?;
                return Err(BackendError::Login {
                    node: name.clone(),
                    code: fields.code,
                    message: fields.message,
                });
            }
            tag::BE_NOTICE_RESPONSE => {}
            tag::BE_READY_FOR_QUERY => {
                phase.ready().map_err(|what| out_of_order(&name, what))?;
                let now = Instant::now();
                return Ok(BackendConn {
                    transport,
                    node: Arc::clone(node),
                    pid: key.0,
                    secret: key.1,
                    params,
                    created: now,
                    last_used: now,
                    status: TxStatus::Idle,
                    broken: false,
                    unsynced: false,
                    running: false,
                    statements: StatementCache::new(STATEMENT_CACHE_CAPACITY),
                    applied: Applied::default(),
                    generation: 0,
                });
            }
            other => {
                return Err(BackendError::Unexpected {
                    node: name.clone(),
                    tag: other as char,
                    during: "login",
                });
            }
        }
    }
}

/// Where a login stands in authentication, which decides what the server may send next.
/// A server that has not proved it knows the password (SCRAM's server signature) must not be
/// able to end the exchange early: that is how an impostor on the path would log us in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthPhase {
    /// No SASL yet: the first request, or a password sent and the verdict awaited. Trust,
    /// password and md5 logins go straight from here to AuthenticationOk.
    Pending,
    /// SCRAM started: AuthenticationOk now needs a verified SASLFinal first.
    Scram,
    /// The server's SCRAM signature verified.
    ScramVerified,
    /// AuthenticationOk received: parameters, key data and ReadyForQuery follow.
    Authenticated,
}

impl AuthPhase {
    /// The phase after the authentication message `req`, or why `req` is out of order.
    fn after(self, req: &AuthRequest) -> Result<AuthPhase, &'static str> {
        use AuthPhase::*;
        match (self, req) {
            (Authenticated, _) => Err("authentication request after AuthenticationOk"),
            (_, AuthRequest::Unsupported(_)) => Ok(self),
            (Pending, AuthRequest::Ok) | (ScramVerified, AuthRequest::Ok) => Ok(Authenticated),
            (Pending, AuthRequest::CleartextPassword | AuthRequest::Md5 { .. }) => Ok(Pending),
            (Pending, AuthRequest::Sasl { .. }) => Ok(Scram),
            (Pending, AuthRequest::SaslContinue(_) | AuthRequest::SaslFinal(_)) => {
                Err("SASL continuation before SASL started")
            }
            (Scram, AuthRequest::SaslContinue(_)) => Ok(Scram),
            (Scram, AuthRequest::SaslFinal(_)) => Ok(ScramVerified),
            (Scram, AuthRequest::Ok) => Err("AuthenticationOk before SASL final"),
            (Scram, _) => Err("new authentication request before SASL final"),
            (ScramVerified, _) => Err("authentication request after SASL final"),
        }
    }

    /// Whether ReadyForQuery may end the login now.
    fn ready(self) -> Result<(), &'static str> {
        match self {
            AuthPhase::Authenticated => Ok(()),
            AuthPhase::Scram => Err("ReadyForQuery before SASL final"),
            AuthPhase::Pending | AuthPhase::ScramVerified => {
                Err("ReadyForQuery before AuthenticationOk")
            }
        }
    }
}

fn out_of_order(node: &str, what: &'static str) -> BackendError {
    BackendError::AuthOutOfOrder {
        node: node.to_string(),
        what,
    }
}

fn scram_failed(node: &str, e: std::io::Error) -> BackendError {
    BackendError::Login {
        node: node.to_string(),
        code: "28P01".into(),
        message: format!("SCRAM exchange failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::AuthPhase::{self, *};
    use crate::protocol::AuthRequest;

    fn sasl() -> AuthRequest<'static> {
        AuthRequest::Sasl {
            mechanisms: vec!["SCRAM-SHA-256"],
        }
    }

    #[test]
    fn authentication_ok_needs_a_verified_sasl_final_once_sasl_started() {
        let cases: [(AuthPhase, AuthRequest, Option<AuthPhase>); 16] = [
            // Trust, password and md5: AuthenticationOk right away stays legitimate.
            (Pending, AuthRequest::Ok, Some(Authenticated)),
            (Pending, AuthRequest::CleartextPassword, Some(Pending)),
            (Pending, AuthRequest::Md5 { salt: [0; 4] }, Some(Pending)),
            (Pending, sasl(), Some(Scram)),
            (Pending, AuthRequest::SaslContinue(b""), None),
            (Pending, AuthRequest::SaslFinal(b""), None),
            // SCRAM: only the exchange itself until SASLFinal.
            (Scram, AuthRequest::SaslContinue(b""), Some(Scram)),
            (Scram, AuthRequest::SaslFinal(b""), Some(ScramVerified)),
            (Scram, AuthRequest::Ok, None),
            (Scram, AuthRequest::CleartextPassword, None),
            (Scram, sasl(), None),
            (ScramVerified, AuthRequest::Ok, Some(Authenticated)),
            (ScramVerified, AuthRequest::SaslContinue(b""), None),
            (ScramVerified, AuthRequest::CleartextPassword, None),
            // Nothing more to answer once in.
            (Authenticated, AuthRequest::CleartextPassword, None),
            (Authenticated, AuthRequest::Ok, None),
        ];
        for (phase, req, want) in cases {
            assert_eq!(phase.after(&req).ok(), want, "{phase:?} then {req:?}");
        }
    }

    #[test]
    fn ready_for_query_only_after_authentication_ok() {
        assert!(Authenticated.ready().is_ok());
        for phase in [Pending, Scram, ScramVerified] {
            assert!(phase.ready().is_err(), "{phase:?}");
        }
    }
}
