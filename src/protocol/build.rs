//! Messages the proxy itself sends to clients, all returned as ready-to-write [`Frame`]s.

use crate::protocol::backend::TxStatus;
use crate::protocol::frame::Frame;
use crate::protocol::tag;
use crate::protocol::wire::{Builder, i16_count, i32_len};

/// Client-side password parsers live in `frontend`; re-exported here next to the auth builders.
pub use crate::protocol::frontend::{parse_password, parse_sasl_initial};

/// OID of the `text` type, used for every column of locally answered `SHOW` results.
const TEXT_OID: i32 = 25;

/// Builds the shared ErrorResponse/NoticeResponse layout.
fn error_like(
    tag: u8,
    severity: &str,
    sqlstate: &str,
    message: &str,
    routine: Option<&str>,
) -> Frame {
    let extra = routine.map_or(0, |r| r.len() + 2);
    let mut b = Builder::tagged(
        tag,
        severity.len() * 2 + sqlstate.len() + message.len() + 9 + extra,
    );
    // S is the localized severity, V the fixed one; we never localize, so both are equal.
    b.u8(b'S').cstr(severity);
    b.u8(b'V').cstr(severity);
    b.u8(b'C').cstr(sqlstate);
    b.u8(b'M').cstr(message);
    if let Some(r) = routine {
        b.u8(b'R').cstr(r);
    }
    b.u8(0);
    b.finish()
}

/// ErrorResponse with fields S, V, C and M; `severity` is `"ERROR"` or `"FATAL"`.
pub fn error_response(severity: &str, sqlstate: &str, message: &str) -> Frame {
    error_like(tag::BE_ERROR_RESPONSE, severity, sqlstate, message, None)
}

/// ErrorResponse that also names the server routine (field R) PostgreSQL reports for the same
/// error. Some drivers recognise an error by it: asyncpg re-prepares a statement on 0A000 only
/// when the routine is `RevalidateCachedQuery`.
pub fn error_response_from(severity: &str, sqlstate: &str, message: &str, routine: &str) -> Frame {
    error_like(
        tag::BE_ERROR_RESPONSE,
        severity,
        sqlstate,
        message,
        Some(routine),
    )
}

/// The ErrorResponse or NoticeResponse `frame` with its primary message (field `M`) replaced
/// and every other field kept as the server sent it; `None` if the body is malformed.
pub fn with_message(frame: &Frame, message: &str) -> Option<Frame> {
    let mut b = Builder::tagged(frame.tag, frame.body().len() + message.len());
    let mut rest = frame.body();
    loop {
        let (&field, after) = rest.split_first()?;
        if field == 0 {
            if !after.is_empty() {
                return None;
            }
            break;
        }
        let end = after.iter().position(|&c| c == 0)?;
        let value = after.get(..end)?;
        b.u8(field);
        if field == b'M' {
            b.cstr(message);
        } else {
            b.bytes(value).u8(0);
        }
        rest = after.get(end + 1..)?;
    }
    b.u8(0);
    Some(b.finish())
}

/// NoticeResponse with severity NOTICE.
pub fn notice_response(sqlstate: &str, message: &str) -> Frame {
    error_like(tag::BE_NOTICE_RESPONSE, "NOTICE", sqlstate, message, None)
}

/// ReadyForQuery with the given transaction status.
pub fn ready_for_query(status: TxStatus) -> Frame {
    Frame::new(tag::BE_READY_FOR_QUERY, &[status.as_byte()])
}

/// Authentication message with a request code and optional payload.
fn auth(code: i32, payload: &[u8]) -> Frame {
    let mut b = Builder::tagged(tag::BE_AUTHENTICATION, payload.len() + 4);
    b.i32(code).bytes(payload);
    b.finish()
}

/// AuthenticationOk.
pub fn auth_ok() -> Frame {
    auth(0, &[])
}

/// AuthenticationCleartextPassword.
pub fn auth_cleartext() -> Frame {
    auth(3, &[])
}

/// AuthenticationMD5Password with `salt`.
pub fn auth_md5(salt: [u8; 4]) -> Frame {
    auth(5, &salt)
}

/// AuthenticationSASL listing `mechanisms`.
pub fn auth_sasl(mechanisms: &[&str]) -> Frame {
    let mut b = Builder::tagged(tag::BE_AUTHENTICATION, 32);
    b.i32(10);
    for m in mechanisms {
        b.cstr(m);
    }
    b.u8(0);
    b.finish()
}

/// AuthenticationSASLContinue with server-first data.
pub fn auth_sasl_continue(data: &[u8]) -> Frame {
    auth(11, data)
}

/// AuthenticationSASLFinal with server-final data.
pub fn auth_sasl_final(data: &[u8]) -> Frame {
    auth(12, data)
}

/// ParameterStatus.
pub fn parameter_status(name: &str, value: &str) -> Frame {
    let mut b = Builder::tagged(tag::BE_PARAMETER_STATUS, name.len() + value.len() + 2);
    b.cstr(name).cstr(value);
    b.finish()
}

/// BackendKeyData (protocol 3.0, 4-byte secret).
pub fn backend_key_data(pid: i32, secret: i32) -> Frame {
    let mut b = Builder::tagged(tag::BE_BACKEND_KEY_DATA, 8);
    b.i32(pid).i32(secret);
    b.finish()
}

/// NegotiateProtocolVersion: the newest version supported (3.`minor`) plus the `_pq_.` options
/// we did not recognise. The version goes out whole (major in the high 16 bits), as the server
/// sends it and as libpq reads it: a bare minor would read as a downgrade to protocol 0.
pub fn negotiate_protocol_version(minor: u16, unsupported_options: &[&str]) -> Frame {
    let mut b = Builder::tagged(tag::BE_NEGOTIATE_PROTOCOL_VERSION, 32);
    let version = (3 << 16) | i32::from(minor);
    b.i32(version).i32(i32_len(unsupported_options.len()));
    for o in unsupported_options {
        b.cstr(o);
    }
    b.finish()
}

/// CommandComplete with a command tag such as `"SHOW"` or `"SELECT 1"`.
pub fn command_complete(tag: &str) -> Frame {
    let mut b = Builder::tagged(tag::BE_COMMAND_COMPLETE, tag.len() + 1);
    b.cstr(tag);
    b.finish()
}

/// EmptyQueryResponse.
pub fn empty_query_response() -> Frame {
    Frame::new(tag::BE_EMPTY_QUERY_RESPONSE, &[])
}

/// ParseComplete.
pub fn parse_complete() -> Frame {
    Frame::new(tag::BE_PARSE_COMPLETE, &[])
}

/// BindComplete.
pub fn bind_complete() -> Frame {
    Frame::new(tag::BE_BIND_COMPLETE, &[])
}

/// CloseComplete.
pub fn close_complete() -> Frame {
    Frame::new(tag::BE_CLOSE_COMPLETE, &[])
}

/// ParameterDescription of a statement without parameters.
pub fn no_parameters() -> Frame {
    Frame::new(tag::BE_PARAMETER_DESCRIPTION, &0i16.to_be_bytes())
}

/// NoData.
pub fn no_data() -> Frame {
    Frame::new(tag::BE_NO_DATA, &[])
}

/// RowDescription of text-format `text` columns, for answering `SHOW causeway.x` locally.
pub fn row_description_text(columns: &[&str]) -> Frame {
    let mut b = Builder::tagged(tag::BE_ROW_DESCRIPTION, 2 + columns.len() * 24);
    b.i16(i16_count(columns.len()));
    for c in columns {
        b.cstr(c)
            .i32(0) // not a table column
            .i16(0) // no attribute number
            .i32(TEXT_OID)
            .i16(-1) // varlena
            .i32(-1) // no typmod
            .i16(0); // text format
    }
    b.finish()
}

/// DataRow of text values; `None` is SQL NULL.
pub fn data_row_text(values: &[Option<&str>]) -> Frame {
    let cap = 2 + values
        .iter()
        .map(|v| 4 + v.map_or(0, str::len))
        .sum::<usize>();
    let mut b = Builder::tagged(tag::BE_DATA_ROW, cap);
    b.i16(i16_count(values.len()));
    for v in values {
        match v {
            Some(s) => b.len_prefixed(s.as_bytes()),
            None => b.i32(-1),
        };
    }
    b.finish()
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
    use crate::protocol::backend::parse_error_fields;
    use crate::protocol::frame::decode_frames;
    use crate::protocol::testutil::Rng;
    use crate::protocol::wire::Reader;
    use bytes::BytesMut;

    #[test]
    fn with_message_replaces_only_the_message() {
        let original =
            error_response_from("ERROR", "57014", "canceling statement", "ProcessInterrupts");
        let out = with_message(&original, "longer message instead").unwrap();
        let f = parse_error_fields(out.body()).unwrap();
        assert_eq!(f.code, "57014");
        assert_eq!(f.severity, "ERROR");
        assert_eq!(f.message, "longer message instead");
        assert!(out.body().windows(19).any(|w| w == b"RProcessInterrupts\0"));
        let frames = decode_frames(&mut BytesMut::from(&out.bytes[..]), 1 << 20).unwrap();
        assert_eq!(frames.len(), 1);
        for bad in [&b"Mno terminator"[..], b"", b"Mx\0\0extra"] {
            assert!(
                with_message(&Frame::new(b'E', bad), "m").is_none(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn fixed_messages_have_exact_bytes() {
        assert_eq!(&auth_ok().bytes[..], b"R\0\0\0\x08\0\0\0\0");
        assert_eq!(&auth_cleartext().bytes[..], b"R\0\0\0\x08\0\0\0\x03");
        assert_eq!(&auth_md5(*b"salt").bytes[..], b"R\0\0\0\x0c\0\0\0\x05salt");
        assert_eq!(&ready_for_query(TxStatus::Idle).bytes[..], b"Z\0\0\0\x05I");
        assert_eq!(&empty_query_response().bytes[..], b"I\0\0\0\x04");
        assert_eq!(&parse_complete().bytes[..], b"1\0\0\0\x04");
        assert_eq!(&bind_complete().bytes[..], b"2\0\0\0\x04");
        assert_eq!(&close_complete().bytes[..], b"3\0\0\0\x04");
        assert_eq!(&no_data().bytes[..], b"n\0\0\0\x04");
        assert_eq!(&command_complete("SHOW").bytes[..], b"C\0\0\0\x09SHOW\0");
        assert_eq!(
            &backend_key_data(1, 2).bytes[..],
            b"K\0\0\0\x0c\0\0\0\x01\0\0\0\x02"
        );
    }

    #[test]
    fn error_response_layout() {
        let f = error_response("ERROR", "08P01", "bad");
        assert_eq!(f.body(), b"SERROR\0VERROR\0C08P01\0Mbad\0\0");
        // Interior NUL in caller text cannot inject extra fields.
        let f = error_response("ERROR", "XX000", "a\0Cevil");
        let e = parse_error_fields(f.body()).unwrap();
        assert_eq!((e.code.as_str(), e.message.as_str()), ("XX000", "a"));
    }

    #[test]
    fn negotiate_protocol_version_layout() {
        let f = negotiate_protocol_version(0, &["_pq_.foo", "_pq_.bar"]);
        assert_eq!(f.tag, b'v');
        let mut r = Reader::new(f.body());
        assert_eq!(r.i32("version").unwrap(), 3 << 16);
        assert_eq!(r.i32("n").unwrap(), 2);
        assert_eq!(r.cstr("a").unwrap(), "_pq_.foo");
        assert_eq!(r.cstr("b").unwrap(), "_pq_.bar");
        r.finish("end").unwrap();
    }

    #[test]
    fn row_description_and_data_row_layout() {
        let f = row_description_text(&["name", "setting"]);
        assert_eq!(f.tag, b'T');
        let mut r = Reader::new(f.body());
        assert_eq!(r.i16("n").unwrap(), 2);
        for want in ["name", "setting"] {
            assert_eq!(r.cstr("c").unwrap(), want);
            assert_eq!(r.i32("table").unwrap(), 0);
            assert_eq!(r.i16("attnum").unwrap(), 0);
            assert_eq!(r.i32("oid").unwrap(), 25);
            assert_eq!(r.i16("typlen").unwrap(), -1);
            assert_eq!(r.i32("typmod").unwrap(), -1);
            assert_eq!(r.i16("format").unwrap(), 0);
        }
        r.finish("end").unwrap();

        let f = data_row_text(&[Some("on"), None, Some("")]);
        assert_eq!(f.tag, b'D');
        assert_eq!(f.body(), b"\0\x03\0\0\0\x02on\xff\xff\xff\xff\0\0\0\0");
    }

    #[test]
    fn show_reply_is_one_framable_stream() {
        let mut buf = BytesMut::new();
        for f in [
            row_description_text(&["pool_mode"]),
            data_row_text(&[Some("transaction")]),
            command_complete("SHOW"),
            ready_for_query(TxStatus::Idle),
        ] {
            buf.extend_from_slice(&f.bytes);
        }
        let frames = decode_frames(&mut buf, 1024).unwrap();
        let tags: Vec<u8> = frames.iter().map(|f| f.tag).collect();
        assert_eq!(tags, b"TDCZ");
        assert!(buf.is_empty());
    }

    #[test]
    fn reexported_client_parsers_work() {
        assert_eq!(parse_password(b"pw\0").unwrap(), "pw");
        assert_eq!(
            parse_sasl_initial(b"SCRAM-SHA-256\0\0\0\0\x01x").unwrap(),
            ("SCRAM-SHA-256", &b"x"[..])
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng::new(0xabad_1dea);
        for i in 0..10_000 {
            let data = if i % 2 == 0 {
                rng.garbage(40)
            } else {
                rng.mutate(b"SCRAM-SHA-256\0\0\0\0\x04abcd")
            };
            let _ = parse_password(&data);
            let _ = parse_sasl_initial(&data);
        }
    }
}
