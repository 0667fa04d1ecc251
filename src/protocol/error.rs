//! The single error type of the protocol module.

/// Why bytes could not be framed, parsed or accepted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// A length header announced more bytes than the configured limit.
    #[error("message length {len} exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// Announced length (including the 4-byte length field itself).
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// Before login, a length header announced more than an authentication message may hold.
    #[error(
        "invalid message length {len} during authentication: at most {max} bytes are accepted \
         before login"
    )]
    AuthMessageTooLarge {
        /// Announced length (including the 4-byte length field itself).
        len: usize,
        /// Limit for this message.
        max: usize,
    },
    /// A length header was negative or too small to hold the fixed part of the message.
    #[error("invalid message length {0}")]
    InvalidLength(i64),
    /// The message body does not follow the documented layout.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// The client asked for a protocol major version other than 3.
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.x")]
    UnsupportedProtocol {
        /// Requested major version.
        major: u16,
        /// Requested minor version.
        minor: u16,
    },
    /// A startup packet carried more parameters than allowed (count at the point of rejection).
    #[error("too many startup parameters ({0})")]
    TooManyParameters(usize),
    /// Bytes arrived behind an SSLRequest or GSSENCRequest before its answer.
    #[error("received unencrypted data after {0}")]
    UnencryptedData(&'static str),
    /// A well-formed message arrived where the protocol state does not allow it.
    #[error("unexpected message type 0x{0:02x}")]
    UnexpectedMessage(u8),
}

impl ProtocolError {
    /// SQLSTATE to report to the peer for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // feature_not_supported, as PostgreSQL reports for unknown protocol versions.
            ProtocolError::UnsupportedProtocol { .. } => "0A000",
            // protocol_violation for everything that means the byte stream cannot be trusted.
            // An oversized length is treated the same way: PostgreSQL reports "invalid message
            // length" as a protocol violation, and the rest of the stream cannot be framed.
            ProtocolError::MessageTooLarge { .. }
            | ProtocolError::AuthMessageTooLarge { .. }
            | ProtocolError::InvalidLength(_)
            | ProtocolError::Malformed(_)
            | ProtocolError::TooManyParameters(_)
            | ProtocolError::UnencryptedData(_)
            | ProtocolError::UnexpectedMessage(_) => "08P01",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates() {
        assert_eq!(
            ProtocolError::MessageTooLarge { len: 10, max: 5 }.sqlstate(),
            "08P01"
        );
        assert_eq!(
            ProtocolError::UnsupportedProtocol { major: 2, minor: 0 }.sqlstate(),
            "0A000"
        );
        assert_eq!(
            ProtocolError::AuthMessageTooLarge {
                len: 2000,
                max: 1024
            }
            .sqlstate(),
            "08P01"
        );
        assert_eq!(ProtocolError::InvalidLength(-1).sqlstate(), "08P01");
        assert_eq!(ProtocolError::Malformed("x").sqlstate(), "08P01");
        assert_eq!(ProtocolError::TooManyParameters(300).sqlstate(), "08P01");
        assert_eq!(ProtocolError::UnexpectedMessage(b'Q').sqlstate(), "08P01");
    }

    #[test]
    fn display_is_informative() {
        let e = ProtocolError::MessageTooLarge { len: 10, max: 5 };
        assert_eq!(
            e.to_string(),
            "message length 10 exceeds the limit of 5 bytes"
        );
        assert_eq!(
            ProtocolError::UnexpectedMessage(b'Q').to_string(),
            "unexpected message type 0x51"
        );
        assert!(
            ProtocolError::UnsupportedProtocol { major: 2, minor: 0 }
                .to_string()
                .contains("2.0")
        );
    }
}
