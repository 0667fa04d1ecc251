//! The untyped first packet a client sends: StartupMessage, SSLRequest, GSSENCRequest, CancelRequest.

use bytes::BytesMut;

use crate::protocol::error::ProtocolError;
use crate::protocol::wire::Reader;

/// PostgreSQL's MAX_STARTUP_PACKET_LENGTH: startup packets larger than this are refused.
pub const MAX_STARTUP_PACKET_BYTES: usize = 10_000;
/// Most parameters accepted in one StartupMessage.
pub const MAX_STARTUP_PARAMETERS: usize = 256;
/// Request code of CancelRequest (1234.5678).
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// Request code of SSLRequest (1234.5679).
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// Request code of GSSENCRequest (1234.5680).
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// Protocol version 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 3 << 16;

/// A decoded first packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartupMessage {
    /// StartupMessage with protocol 3.`minor` and its parameters in wire order.
    Startup {
        /// Always 3 (other majors are rejected).
        major: u16,
        /// Requested minor version; above 0 the proxy should answer NegotiateProtocolVersion.
        minor: u16,
        /// Parameters in wire order, duplicates preserved for the caller to judge.
        params: Vec<(String, String)>,
    },
    /// Client asks to upgrade to TLS.
    SslRequest,
    /// Client asks to upgrade to GSSAPI encryption.
    GssEncRequest,
    /// Out-of-band cancel of the query running on backend `pid` (4-byte secret, protocol 3.0).
    Cancel {
        /// Backend process id from BackendKeyData.
        pid: i32,
        /// Secret key from BackendKeyData.
        secret: i32,
    },
}

impl StartupMessage {
    /// Value of the first parameter called `name`, if this is a StartupMessage carrying it.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            StartupMessage::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Decodes the first packet from the front of `buf` (advancing it); Ok(None) = need more bytes.
///
/// The length is checked against `min(max_len, 10_000)` as soon as its 4 bytes are present.
/// Protocol 3.x is accepted with its minor reported; other majors give `UnsupportedProtocol`.
pub fn decode_startup(
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Option<StartupMessage>, ProtocolError> {
    let Some(len_bytes) = buf.get(..4).and_then(|s| <[u8; 4]>::try_from(s).ok()) else {
        return Ok(None);
    };
    let raw_len = i32::from_be_bytes(len_bytes);
    // Length and request code are mandatory, so anything under 8 bytes cannot be a packet.
    if raw_len < 8 {
        return Err(ProtocolError::InvalidLength(i64::from(raw_len)));
    }
    let len = usize::try_from(raw_len).map_err(|_| ProtocolError::InvalidLength(raw_len.into()))?;
    let limit = max_len.min(MAX_STARTUP_PACKET_BYTES);
    if len > limit {
        return Err(ProtocolError::MessageTooLarge { len, max: limit });
    }
    let Some(packet) = buf.get(4..len) else {
        return Ok(None);
    };
    let msg = parse_packet(packet, len)?;
    let _ = buf.split_to(len);
    Ok(Some(msg))
}

/// Parses the bytes after the length field; `len` is the whole packet length for size checks.
fn parse_packet(packet: &[u8], len: usize) -> Result<StartupMessage, ProtocolError> {
    let mut r = Reader::new(packet);
    let code = r.i32("startup packet: request code")?;
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            if len != 8 {
                return Err(ProtocolError::Malformed(
                    "SSL/GSSENC request: length must be 8",
                ));
            }
            Ok(if code == SSL_REQUEST_CODE {
                StartupMessage::SslRequest
            } else {
                StartupMessage::GssEncRequest
            })
        }
        CANCEL_REQUEST_CODE => {
            // Protocol 3.2 allows longer keys, but we only ever negotiate 3.0 with clients.
            if len != 16 {
                return Err(ProtocolError::Malformed("CancelRequest: length must be 16"));
            }
            let pid = r.i32("CancelRequest: pid")?;
            let secret = r.i32("CancelRequest: secret")?;
            Ok(StartupMessage::Cancel { pid, secret })
        }
        _ => {
            let major = u16::try_from((code >> 16) & 0xffff).unwrap_or_default();
            let minor = u16::try_from(code & 0xffff).unwrap_or_default();
            if major != 3 {
                return Err(ProtocolError::UnsupportedProtocol { major, minor });
            }
            let params = parse_params(&mut r)?;
            Ok(StartupMessage::Startup {
                major,
                minor,
                params,
            })
        }
    }
}

/// Parses `name\0value\0 ... \0`; the list must end in an extra NUL that is the packet's last byte.
fn parse_params(r: &mut Reader<'_>) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut params = Vec::new();
    loop {
        let name = r.cstr("startup parameter name: missing NUL or not UTF-8")?;
        if name.is_empty() {
            r.finish("startup packet: data after the terminating NUL")?;
            return Ok(params);
        }
        if params.len() >= MAX_STARTUP_PARAMETERS {
            return Err(ProtocolError::TooManyParameters(params.len() + 1));
        }
        let value = r.cstr("startup parameter value: missing NUL or not UTF-8")?;
        params.push((name.to_owned(), value.to_owned()));
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod tests {
    use super::*;
    use crate::protocol::frontend::{encode_cancel_request, encode_startup};
    use crate::protocol::testutil::Rng;

    fn packet(code: i32, rest: &[u8]) -> BytesMut {
        let mut v = BytesMut::new();
        v.extend_from_slice(&((rest.len() + 8) as i32).to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn startup_round_trip() {
        let bytes = encode_startup(&[("user", "alice"), ("database", "db"), ("options", "")]);
        let mut buf = BytesMut::from(&bytes[..]);
        buf.extend_from_slice(b"next");
        let msg = decode_startup(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(
            msg,
            StartupMessage::Startup {
                major: 3,
                minor: 0,
                params: vec![
                    ("user".into(), "alice".into()),
                    ("database".into(), "db".into()),
                    ("options".into(), "".into()),
                ],
            }
        );
        assert_eq!(msg.param("database"), Some("db"));
        assert_eq!(msg.param("nope"), None);
        assert_eq!(&buf[..], b"next");
    }

    #[test]
    fn minor_versions_are_reported() {
        let mut buf = packet(PROTOCOL_3_0 | 2, b"user\0u\0\0");
        match decode_startup(&mut buf, 1 << 20).unwrap().unwrap() {
            StartupMessage::Startup { major, minor, .. } => assert_eq!((major, minor), (3, 2)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_majors_are_unsupported() {
        let mut buf = packet(2 << 16, b"user\0u\0\0");
        let err = decode_startup(&mut buf, 1 << 20).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::UnsupportedProtocol { major: 2, minor: 0 }
        );
        assert_eq!(err.sqlstate(), "0A000");
        let mut buf = packet((1234 << 16) | 9999, b"");
        assert!(matches!(
            decode_startup(&mut buf, 1 << 20),
            Err(ProtocolError::UnsupportedProtocol {
                major: 1234,
                minor: 9999
            })
        ));
    }

    #[test]
    fn special_request_codes() {
        assert_eq!(SSL_REQUEST_CODE, 80877103);
        assert_eq!(GSSENC_REQUEST_CODE, 80877104);
        assert_eq!(CANCEL_REQUEST_CODE, 80877102);
        let mut buf = packet(80877103, b"");
        assert_eq!(
            decode_startup(&mut buf, 1 << 20).unwrap(),
            Some(StartupMessage::SslRequest)
        );
        let mut buf = packet(80877104, b"");
        assert_eq!(
            decode_startup(&mut buf, 1 << 20).unwrap(),
            Some(StartupMessage::GssEncRequest)
        );
        let mut buf = BytesMut::from(&encode_cancel_request(42, -7)[..]);
        assert_eq!(
            decode_startup(&mut buf, 1 << 20).unwrap(),
            Some(StartupMessage::Cancel {
                pid: 42,
                secret: -7
            })
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn special_requests_with_wrong_length_fail() {
        assert!(decode_startup(&mut packet(SSL_REQUEST_CODE, b"x"), 1 << 20).is_err());
        assert!(decode_startup(&mut packet(GSSENC_REQUEST_CODE, b"xyzw"), 1 << 20).is_err());
        assert!(decode_startup(&mut packet(CANCEL_REQUEST_CODE, &[0; 4]), 1 << 20).is_err());
        assert!(decode_startup(&mut packet(CANCEL_REQUEST_CODE, &[0; 12]), 1 << 20).is_err());
    }

    #[test]
    fn partial_packets_need_more() {
        let full = encode_startup(&[("user", "bob")]);
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(
                decode_startup(&mut buf, 1 << 20).unwrap(),
                None,
                "cut {cut}"
            );
            assert_eq!(buf.len(), cut);
        }
    }

    #[test]
    fn bad_lengths_fail_immediately() {
        for len in [0i32, 4, 7, -1, i32::MIN] {
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            assert_eq!(
                decode_startup(&mut buf, 1 << 20).unwrap_err(),
                ProtocolError::InvalidLength(i64::from(len))
            );
        }
        // Just the 4-byte header of a 1 GiB packet is enough to refuse it.
        let mut buf = BytesMut::from(&(1i32 << 30).to_be_bytes()[..]);
        assert_eq!(
            decode_startup(&mut buf, DEFAULT_TEST_MAX).unwrap_err(),
            ProtocolError::MessageTooLarge {
                len: 1 << 30,
                max: 10_000
            }
        );
        // A caller limit below 10_000 wins.
        let mut buf = BytesMut::from(&(200i32).to_be_bytes()[..]);
        assert!(matches!(
            decode_startup(&mut buf, 100),
            Err(ProtocolError::MessageTooLarge { len: 200, max: 100 })
        ));
    }

    const DEFAULT_TEST_MAX: usize = crate::protocol::frame::DEFAULT_MAX_MESSAGE_BYTES;

    #[test]
    fn ten_thousand_parameters_rejected() {
        let names: Vec<String> = (0..10_000).map(|i| format!("p{i}")).collect();
        let params: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        let bytes = encode_startup(&params);
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(decode_startup(&mut buf, DEFAULT_TEST_MAX).is_err());
        // Within the size limit, the count limit still applies.
        let mut rest = Vec::new();
        for _ in 0..257 {
            rest.extend_from_slice(b"a\0\0");
        }
        rest.push(0);
        let mut buf = packet(PROTOCOL_3_0, &rest);
        assert_eq!(
            decode_startup(&mut buf, DEFAULT_TEST_MAX).unwrap_err(),
            ProtocolError::TooManyParameters(257)
        );
        let mut ok = Vec::new();
        for _ in 0..256 {
            ok.extend_from_slice(b"a\0\0");
        }
        ok.push(0);
        assert!(decode_startup(&mut packet(PROTOCOL_3_0, &ok), DEFAULT_TEST_MAX).is_ok());
    }

    #[test]
    fn malformed_parameter_lists() {
        for rest in [
            &b""[..],             // no terminator
            b"user\0",            // name without value
            b"user\0bob",         // value without NUL
            b"user\0bob\0",       // no final terminator
            b"user\0bob\0\0x",    // data after terminator
            b"us\xffer\0bob\0\0", // invalid UTF-8 name
            b"user\0b\xc3\0\0",   // invalid UTF-8 value
        ] {
            let mut buf = packet(PROTOCOL_3_0, rest);
            assert!(
                matches!(
                    decode_startup(&mut buf, 1 << 20),
                    Err(ProtocolError::Malformed(_))
                ),
                "{rest:?}"
            );
        }
        // The empty parameter list is well-formed; the proxy decides whether `user` is required.
        let mut buf = packet(PROTOCOL_3_0, b"\0");
        assert!(decode_startup(&mut buf, 1 << 20).unwrap().is_some());
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng::new(0xdead_beef);
        let valid = encode_startup(&[("user", "u"), ("database", "d")]);
        for i in 0..5000 {
            let mut data = if i % 2 == 0 {
                rng.garbage(48)
            } else {
                rng.mutate(&valid)
            };
            // Make some headers plausible so the body parser is actually reached.
            if i % 3 == 0 && data.len() >= 4 {
                let l = (data.len() as i32).to_be_bytes();
                data[..4].copy_from_slice(&l);
            }
            let mut buf = BytesMut::from(&data[..]);
            let _ = decode_startup(&mut buf, 1 << 20);
        }
    }
}
