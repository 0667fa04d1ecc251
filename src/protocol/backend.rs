//! Views of the few backend messages the proxy inspects (parsed from `Frame::body()`).

use crate::protocol::error::ProtocolError;
use crate::protocol::wire::Reader;

/// Transaction status carried by ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxStatus {
    /// `b'I'`: not in a transaction block.
    Idle,
    /// `b'T'`: inside a transaction block.
    InTransaction,
    /// `b'E'`: inside a failed transaction block (queries rejected until it ends).
    Failed,
}

impl TxStatus {
    /// The status byte used on the wire.
    pub fn as_byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }

    /// Decodes a wire status byte.
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }
}

/// Parses a ReadyForQuery body (exactly one status byte).
pub fn parse_ready_for_query(body: &[u8]) -> Result<TxStatus, ProtocolError> {
    match body {
        [b] => TxStatus::from_byte(*b).ok_or(ProtocolError::Malformed(
            "ReadyForQuery: unknown transaction status",
        )),
        _ => Err(ProtocolError::Malformed(
            "ReadyForQuery: body must be one byte",
        )),
    }
}

/// The fields of an ErrorResponse or NoticeResponse the proxy cares about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorFields {
    /// Non-localized severity (`V`) when present, else the localized one (`S`).
    pub severity: String,
    /// SQLSTATE (`C`).
    pub code: String,
    /// Primary message (`M`).
    pub message: String,
    /// Detail (`D`), if any.
    pub detail: Option<String>,
    /// Hint (`H`), if any.
    pub hint: Option<String>,
}

/// Parses an ErrorResponse or NoticeResponse body; missing fields become empty strings.
///
/// Field text is decoded lossily because the server writes it in the session's client_encoding,
/// which need not be UTF-8, and a log line is better than a dropped error.
pub fn parse_error_fields(body: &[u8]) -> Result<ErrorFields, ProtocolError> {
    let mut r = Reader::new(body);
    let mut out = ErrorFields::default();
    let mut localized_severity = None;
    loop {
        let field = r.u8("ErrorResponse: missing terminator")?;
        if field == 0 {
            r.finish("ErrorResponse: data after terminator")?;
            break;
        }
        let value = String::from_utf8_lossy(r.cbytes("ErrorResponse: unterminated field")?);
        match field {
            b'S' => localized_severity = Some(value.into_owned()),
            b'V' => out.severity = value.into_owned(),
            b'C' => out.code = value.into_owned(),
            b'M' => out.message = value.into_owned(),
            b'D' => out.detail = Some(value.into_owned()),
            b'H' => out.hint = Some(value.into_owned()),
            _ => {} // Other fields (position, context, schema...) are only forwarded.
        }
    }
    if out.severity.is_empty() {
        out.severity = localized_severity.unwrap_or_default();
    }
    Ok(out)
}

/// Parses a CommandComplete body into its command tag (e.g. `"INSERT 0 1"`).
pub fn parse_command_complete(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut r = Reader::new(body);
    let tag = r.cstr("CommandComplete: command tag")?;
    r.finish("CommandComplete: trailing bytes")?;
    Ok(tag)
}

/// Parses a ParameterStatus body into (name, value).
pub fn parse_parameter_status(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    let mut r = Reader::new(body);
    let name = r.cstr("ParameterStatus: name")?;
    let value = r.cstr("ParameterStatus: value")?;
    r.finish("ParameterStatus: trailing bytes")?;
    Ok((name, value))
}

/// Parses BackendKeyData into (pid, secret); only protocol 3.0's 4-byte secret is accepted.
pub fn parse_backend_key_data(body: &[u8]) -> Result<(i32, i32), ProtocolError> {
    let mut r = Reader::new(body);
    let pid = r.i32("BackendKeyData: pid")?;
    let secret = r.i32("BackendKeyData: secret")?;
    // A longer key means protocol 3.2, which the proxy never requests from backends.
    r.finish("BackendKeyData: secret key longer than 4 bytes")?;
    Ok((pid, secret))
}

/// An Authentication request from the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthRequest<'a> {
    /// AuthenticationOk (0).
    Ok,
    /// AuthenticationCleartextPassword (3).
    CleartextPassword,
    /// AuthenticationMD5Password (5) with its salt.
    Md5 {
        /// Salt to hash the password with.
        salt: [u8; 4],
    },
    /// AuthenticationSASL (10) with the offered mechanisms.
    Sasl {
        /// Mechanism names, e.g. `SCRAM-SHA-256`.
        mechanisms: Vec<&'a str>,
    },
    /// AuthenticationSASLContinue (11) with server-first data.
    SaslContinue(&'a [u8]),
    /// AuthenticationSASLFinal (12) with server-final data.
    SaslFinal(&'a [u8]),
    /// Any other method (Kerberos, GSSAPI, SSPI...), by code.
    Unsupported(i32),
}

/// Parses an Authentication (`R`) body.
pub fn parse_authentication(body: &[u8]) -> Result<AuthRequest<'_>, ProtocolError> {
    let mut r = Reader::new(body);
    let code = r.i32("Authentication: request code")?;
    let req = match code {
        0 => AuthRequest::Ok,
        3 => AuthRequest::CleartextPassword,
        5 => {
            let salt = r.take(4, "AuthenticationMD5Password: salt")?;
            let salt: [u8; 4] = salt
                .try_into()
                .map_err(|_| ProtocolError::Malformed("AuthenticationMD5Password: salt"))?;
            AuthRequest::Md5 { salt }
        }
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.cstr("AuthenticationSASL: mechanism list")?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(r.rest()),
        12 => AuthRequest::SaslFinal(r.rest()),
        // Unknown methods may carry data we do not understand; the caller only needs the code.
        other => return Ok(AuthRequest::Unsupported(other)),
    };
    r.finish("Authentication: trailing bytes")?;
    Ok(req)
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
    use crate::protocol::build;
    use crate::protocol::testutil::Rng;

    #[test]
    fn ready_for_query_round_trip() {
        for s in [TxStatus::Idle, TxStatus::InTransaction, TxStatus::Failed] {
            let f = build::ready_for_query(s);
            assert_eq!(f.tag, b'Z');
            assert_eq!(parse_ready_for_query(f.body()).unwrap(), s);
            assert_eq!(TxStatus::from_byte(s.as_byte()), Some(s));
        }
        assert!(parse_ready_for_query(b"").is_err());
        assert!(parse_ready_for_query(b"X").is_err());
        assert!(parse_ready_for_query(b"II").is_err());
    }

    #[test]
    fn error_fields_round_trip() {
        let f = build::error_response("FATAL", "28P01", "password authentication failed");
        assert_eq!(f.tag, b'E');
        let e = parse_error_fields(f.body()).unwrap();
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.code, "28P01");
        assert_eq!(e.message, "password authentication failed");
        assert_eq!((e.detail, e.hint), (None, None));
        let n = build::notice_response("01000", "hello");
        assert_eq!(n.tag, b'N');
        let e = parse_error_fields(n.body()).unwrap();
        assert_eq!((e.severity.as_str(), e.code.as_str()), ("NOTICE", "01000"));
    }

    #[test]
    fn error_fields_prefers_nonlocalized_and_reads_extras() {
        let body = b"SFEHLER\0VERROR\0C42P01\0Mrelation missing\0Dsome detail\0Htry x\0P12\0\0";
        let e = parse_error_fields(body).unwrap();
        assert_eq!(e.severity, "ERROR");
        assert_eq!(e.code, "42P01");
        assert_eq!(e.detail.as_deref(), Some("some detail"));
        assert_eq!(e.hint.as_deref(), Some("try x"));
        // Old servers only send S; non-UTF-8 text is tolerated.
        let e = parse_error_fields(b"SERROR\0M\xe9t\xe9\0\0").unwrap();
        assert_eq!(e.severity, "ERROR");
        assert_eq!(e.message, "\u{fffd}t\u{fffd}");
        assert!(parse_error_fields(b"SERROR\0").is_err());
        assert!(parse_error_fields(b"SERROR").is_err());
        assert!(parse_error_fields(b"\0x").is_err());
        assert_eq!(parse_error_fields(b"\0").unwrap(), ErrorFields::default());
    }

    #[test]
    fn command_complete_round_trip() {
        let f = build::command_complete("INSERT 0 5");
        assert_eq!(parse_command_complete(f.body()).unwrap(), "INSERT 0 5");
        assert!(parse_command_complete(b"SELECT 1").is_err());
        assert!(parse_command_complete(b"SELECT 1\0x").is_err());
    }

    #[test]
    fn parameter_status_round_trip() {
        let f = build::parameter_status("TimeZone", "UTC");
        assert_eq!(f.tag, b'S');
        assert_eq!(
            parse_parameter_status(f.body()).unwrap(),
            ("TimeZone", "UTC")
        );
        assert!(parse_parameter_status(b"a\0").is_err());
        assert!(parse_parameter_status(b"a\0b\0c").is_err());
    }

    #[test]
    fn backend_key_data_round_trip() {
        let f = build::backend_key_data(1234, -99);
        assert_eq!(f.tag, b'K');
        assert_eq!(parse_backend_key_data(f.body()).unwrap(), (1234, -99));
        assert!(parse_backend_key_data(&[0; 7]).is_err());
        assert!(parse_backend_key_data(&[0; 12]).is_err());
    }

    #[test]
    fn authentication_round_trips() {
        let cases = [
            (build::auth_ok(), AuthRequest::Ok),
            (build::auth_cleartext(), AuthRequest::CleartextPassword),
            (
                build::auth_md5([1, 2, 3, 4]),
                AuthRequest::Md5 { salt: [1, 2, 3, 4] },
            ),
            (
                build::auth_sasl(&["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]),
                AuthRequest::Sasl {
                    mechanisms: vec!["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"],
                },
            ),
            (
                build::auth_sasl_continue(b"r=abc,s=xyz,i=4096"),
                AuthRequest::SaslContinue(b"r=abc,s=xyz,i=4096"),
            ),
            (
                build::auth_sasl_final(b"v=sig"),
                AuthRequest::SaslFinal(b"v=sig"),
            ),
        ];
        for (frame, want) in cases {
            assert_eq!(frame.tag, b'R');
            assert_eq!(parse_authentication(frame.body()).unwrap(), want);
        }
        assert_eq!(
            parse_authentication(&7i32.to_be_bytes()).unwrap(),
            AuthRequest::Unsupported(7)
        );
    }

    #[test]
    fn authentication_rejects_malformed() {
        assert!(parse_authentication(b"").is_err());
        assert!(parse_authentication(b"\0\0\0").is_err());
        assert!(parse_authentication(b"\0\0\0\0x").is_err()); // Ok with trailing data
        assert!(parse_authentication(b"\0\0\0\x05\x01\x02\x03").is_err()); // short salt
        assert!(parse_authentication(b"\0\0\0\x05\x01\x02\x03\x04\x05").is_err());
        assert!(parse_authentication(b"\0\0\0\x0aSCRAM\0").is_err()); // no list terminator
        assert!(parse_authentication(b"\0\0\0\x0aSCRAM\0\0x").is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng::new(0xfeed_face);
        let valid = [
            build::error_response("ERROR", "42601", "syntax error"),
            build::auth_sasl(&["SCRAM-SHA-256"]),
            build::auth_md5([9, 9, 9, 9]),
            build::parameter_status("a", "b"),
            build::backend_key_data(1, 2),
            build::command_complete("SELECT 1"),
        ];
        for i in 0..20_000 {
            let data = if i % 2 == 0 {
                rng.garbage(48)
            } else {
                {
                    let k = rng.below(valid.len());
                    rng.mutate(valid[k].body())
                }
            };
            let _ = parse_ready_for_query(&data);
            let _ = parse_error_fields(&data);
            let _ = parse_command_complete(&data);
            let _ = parse_parameter_status(&data);
            let _ = parse_backend_key_data(&data);
            let _ = parse_authentication(&data);
        }
    }
}
