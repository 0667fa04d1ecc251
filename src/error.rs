//! Errors per layer, each knowing which side failed and which SQLSTATE the client sees.

use crate::pool::queue::AcquireError;
use crate::protocol::ProtocolError;
use crate::transport::TransportError;

/// SQLSTATE codes the proxy sends on its own behalf.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CONNECTION_EXCEPTION: &str = "08000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    pub const READ_ONLY_TRANSACTION: &str = "25006";
    pub const QUERY_CANCELED: &str = "57014";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    pub const OBJECT_IN_USE: &str = "55006";
    pub const SERIALIZATION_FAILURE: &str = "40001";
    pub const DEADLOCK_DETECTED: &str = "40P01";
}

/// Failures talking to a PostgreSQL server.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {node}: {source}")]
    Connect {
        node: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to {node}")]
    ConnectTimeout { node: String },
    #[error("{node} rejected the login: {message} ({code})")]
    Login {
        node: String,
        code: String,
        message: String,
    },
    #[error("{node} asked for an unsupported authentication method ({method})")]
    UnsupportedAuth { node: String, method: String },
    /// The server's authentication messages came out of order, so it may not be the server:
    /// it ended SCRAM without proving it knows the password, say.
    #[error("{node} broke the authentication exchange ({what}); login refused")]
    AuthOutOfOrder { node: String, what: &'static str },
    #[error("connection to {node} lost: {source}")]
    Lost {
        node: String,
        source: TransportError,
    },
    #[error("{node} sent an unexpected message ({tag:?}) during {during}")]
    Unexpected {
        node: String,
        tag: char,
        during: &'static str,
    },
    /// Replies no longer match what the proxy sent: the connection cannot be trusted.
    #[error("replies from {node} are out of step with the requests: {what}")]
    Desync { node: String, what: String },
}

impl BackendError {
    /// Whether the failure happened before any statement reached the server (safe to go elsewhere).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            BackendError::Connect { .. } | BackendError::ConnectTimeout { .. }
        )
    }

    /// Whether the server refused this login for reasons of the login alone (its database or
    /// role missing, its password or its `CONNECT` privilege), not because the server is
    /// unusable: other logins there work. On a replica this is usually a database or role
    /// created on the primary that the replica has not replayed yet.
    pub fn is_login_refusal(&self) -> bool {
        let BackendError::Login { code, .. } = self else {
            return false;
        };
        matches!(
            code.as_str(),
            // invalid_catalog_name: the database does not exist.
            "3D000"
            // invalid_authorization_specification: the role does not exist, or no hba entry.
            | "28000"
            // invalid_password: also what password auth says of a role it does not know.
            | "28P01"
            // insufficient_privilege: no CONNECT privilege, or a role that may not log in.
            | "42501"
            // object_not_in_prerequisite_state: the database does not accept connections.
            | "55000"
        )
    }
}

/// Failures to obtain a backend connection from a pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out after {waited_ms} ms waiting for a connection from pool {pool}")]
    Timeout { pool: String, waited_ms: u64 },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("pool {pool} is closed")]
    Closed { pool: String },
    #[error("too many clients waiting for pool {pool}; try again")]
    Refused { pool: String },
}

/// Failures to obtain an execution slot on a server that bounds `max_active`.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("timed out after {waited_ms} ms waiting for an execution slot on server {server}")]
    Timeout { server: String, waited_ms: u64 },
    #[error("too many clients waiting for an execution slot on server {server}; try again")]
    Refused { server: String },
    #[error("execution slots of server {server} are closed")]
    Closed { server: String },
}

impl SlotError {
    /// Why a wait for an execution slot on `server` failed, after at most `waited_ms`.
    pub fn from_acquire(e: AcquireError, server: String, waited_ms: u64) -> Self {
        match e {
            AcquireError::Timeout => SlotError::Timeout { server, waited_ms },
            AcquireError::Refused => SlotError::Refused { server },
            AcquireError::Closed => SlotError::Closed { server },
        }
    }
}

/// Everything that can end or interrupt a client session, mapped to a deliberate SQLSTATE.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client protocol violation: {0}")]
    ClientProtocol(#[from] ProtocolError),
    #[error("client connection failed: {0}")]
    ClientIo(std::io::Error),
    #[error("password authentication failed for user \"{0}\"")]
    AuthFailed(String),
    #[error("{0}")]
    AuthRejected(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("no replica is available for reads and routing.fallback is \"error\"")]
    NoReplica,
    /// Every replica this read could use refused it (its login, or the connection), and
    /// `routing.fallback` is `error`: the causes, one per replica.
    #[error("no replica could serve this read and routing.fallback is \"error\": {0}")]
    ReplicasRefused(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("the proxy is shutting down")]
    Shutdown,
    #[error("terminating connection due to idle-in-transaction timeout")]
    IdleInTransactionTimeout,
    #[error("too many client connections: {0}")]
    TooManyClients(String),
    /// A value the client gave the proxy is malformed (an LSN, say).
    #[error("{0}")]
    InvalidParameter(String),
    /// A statement prepared again on another backend now returns different columns.
    #[error("cached plan must not change result type")]
    PlanChanged,
    /// The client did not finish its startup and authentication in `server.login_timeout_ms`.
    #[error("canceling authentication due to timeout")]
    LoginTimeout,
    /// The client cancelled its query while it waited for a server connection.
    #[error("canceling statement due to user request")]
    QueryCanceled,
    /// A statement that needs the primary (a write, a lock, session state) inside a read-only
    /// transaction that a replica runs.
    #[error(
        "cannot execute {0} in a read-only transaction served by a replica; begin the \
         transaction with it, or with /* causeway:primary */, to run it on the primary"
    )]
    NeedsPrimary(&'static str),
    /// The primary did not tell the position of the session's last write in time.
    #[error(
        "the position of this session's last write is not known yet: the primary did not answer"
    )]
    TokenPending,
    /// Extended-protocol messages held for routing until their Sync outgrew the bound.
    #[error("more than {limit} bytes of extended-protocol messages without a Sync")]
    BatchTooLarge { limit: usize },
}

impl SessionError {
    /// The SQLSTATE the client is told.
    pub fn sqlstate(&self) -> &str {
        use sqlstate::*;
        match self {
            SessionError::ClientProtocol(e) => e.sqlstate(),
            SessionError::ClientIo(_) => CONNECTION_FAILURE,
            SessionError::AuthFailed(_) => INVALID_PASSWORD,
            SessionError::AuthRejected(_) => INVALID_AUTHORIZATION,
            SessionError::Pool(PoolError::Timeout { .. } | PoolError::Refused { .. }) => {
                TOO_MANY_CONNECTIONS
            }
            SessionError::Pool(PoolError::Closed { .. }) => CANNOT_CONNECT_NOW,
            SessionError::Slot(SlotError::Timeout { .. } | SlotError::Refused { .. }) => {
                TOO_MANY_CONNECTIONS
            }
            SessionError::Slot(SlotError::Closed { .. }) => CANNOT_CONNECT_NOW,
            SessionError::Pool(PoolError::Backend(e)) | SessionError::Backend(e) => {
                backend_sqlstate(e)
            }
            SessionError::NoReplica | SessionError::ReplicasRefused(_) => CANNOT_CONNECT_NOW,
            SessionError::Unsupported(_) => FEATURE_NOT_SUPPORTED,
            SessionError::Shutdown => ADMIN_SHUTDOWN,
            SessionError::IdleInTransactionTimeout => IDLE_IN_TRANSACTION_TIMEOUT,
            SessionError::TooManyClients(_) => TOO_MANY_CONNECTIONS,
            SessionError::PlanChanged => FEATURE_NOT_SUPPORTED,
            SessionError::BatchTooLarge { .. } => PROGRAM_LIMIT_EXCEEDED,
            SessionError::LoginTimeout | SessionError::QueryCanceled => QUERY_CANCELED,
            SessionError::InvalidParameter(_) => INVALID_PARAMETER_VALUE,
            SessionError::NeedsPrimary(_) => READ_ONLY_SQL_TRANSACTION,
            SessionError::TokenPending => CANNOT_CONNECT_NOW,
        }
    }

    /// The server routine PostgreSQL names (field R) when it raises the same error, where
    /// drivers depend on it.
    pub fn routine(&self) -> Option<&'static str> {
        match self {
            SessionError::PlanChanged => Some("RevalidateCachedQuery"),
            _ => None,
        }
    }

    /// Whether the client connection is unusable afterwards (so no reply can be sent).
    pub fn is_client_gone(&self) -> bool {
        matches!(self, SessionError::ClientIo(_))
    }
}

fn backend_sqlstate(e: &BackendError) -> &str {
    match e {
        // The server's own verdict (missing database, too many connections...) passes through.
        BackendError::Login { code, .. } if code.len() == 5 => code,
        BackendError::Login { .. }
        | BackendError::UnsupportedAuth { .. }
        | BackendError::AuthOutOfOrder { .. } => sqlstate::CONNECTION_EXCEPTION,
        _ => sqlstate::CONNECTION_FAILURE,
    }
}

impl From<TransportError> for SessionError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Protocol(p) => SessionError::ClientProtocol(p),
            TransportError::Io(io) => SessionError::ClientIo(io),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(code: &str) -> BackendError {
        BackendError::Login {
            node: "replica1".into(),
            code: code.into(),
            message: "refused".into(),
        }
    }

    #[test]
    fn only_refusals_of_one_login_spare_the_server() {
        // A database or role the replica lacks, a password or privilege: that login only.
        for code in ["3D000", "28000", "28P01", "42501", "55000"] {
            assert!(login(code).is_login_refusal(), "{code}");
        }
        // Starting up, shutting down, full, or out of step: the server itself.
        for code in ["57P03", "57P01", "53300", "08P01", "XX000", ""] {
            assert!(!login(code).is_login_refusal(), "{code}");
        }
        let down = BackendError::ConnectTimeout {
            node: "replica1".into(),
        };
        assert!(!down.is_login_refusal());
    }

    #[test]
    fn each_error_has_a_deliberate_sqlstate() {
        let timeout = SessionError::Pool(PoolError::Timeout {
            pool: "primary/app/app".into(),
            waited_ms: 5,
        });
        assert_eq!(timeout.sqlstate(), "53300");
        assert!(timeout.to_string().contains("primary/app/app"));
        assert_eq!(SessionError::AuthFailed("x".into()).sqlstate(), "28P01");
        assert_eq!(SessionError::Shutdown.sqlstate(), "57P01");
        let lost = SessionError::Backend(BackendError::ConnectTimeout { node: "r".into() });
        assert_eq!(lost.sqlstate(), "08006");
        assert_eq!(SessionError::NoReplica.sqlstate(), "57P03");
        assert_eq!(
            SessionError::ReplicasRefused("x".into()).sqlstate(),
            "57P03"
        );
        let slot = SessionError::Slot(SlotError::Timeout {
            server: "primary".into(),
            waited_ms: 5,
        });
        assert_eq!(slot.sqlstate(), "53300");
        assert!(
            slot.to_string()
                .contains("execution slot on server primary")
        );
    }
}
