//! Zero-copy views of client messages (parsed from `Frame::body()`) and encoders for the
//! client-side messages the proxy itself sends to backends.

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::error::ProtocolError;
use crate::protocol::frame::Frame;
use crate::protocol::startup::{CANCEL_REQUEST_CODE, PROTOCOL_3_0};
use crate::protocol::tag;
use crate::protocol::wire::{Builder, Reader, cstr_len, i32_len, put_cstr, u16_count};

/// Simple-protocol Query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query<'a> {
    /// SQL text (may hold several statements).
    pub sql: &'a str,
}

/// Extended-protocol Parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parse<'a> {
    /// Prepared statement name; empty is the unnamed statement.
    pub name: &'a str,
    /// SQL text of the statement.
    pub sql: &'a str,
    /// Raw unsigned 16-bit count followed by that many i32 type OIDs, kept raw to forward
    /// unchanged.
    pub param_types: &'a [u8],
}

impl Parse<'_> {
    /// Number of parameter type OIDs in `param_types`.
    pub fn param_type_count(&self) -> usize {
        self.param_types.len().saturating_sub(2) / 4
    }
}

/// Extended-protocol Bind; everything after the statement name is validated but kept raw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bind<'a> {
    /// Destination portal; empty is the unnamed portal.
    pub portal: &'a str,
    /// Source prepared statement.
    pub statement: &'a str,
    /// Format codes, parameter values and result formats, exactly as received.
    pub rest: &'a [u8],
}

/// Describe of a statement (`b'S'`) or portal (`b'P'`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Describe<'a> {
    /// `b'S'` or `b'P'`.
    pub kind: u8,
    /// Statement or portal name.
    pub name: &'a str,
}

/// Execute of a portal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Execute<'a> {
    /// Portal name.
    pub portal: &'a str,
    /// Row limit; 0 means no limit.
    pub max_rows: i32,
}

/// Close of a statement (`b'S'`) or portal (`b'P'`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Close<'a> {
    /// `b'S'` or `b'P'`.
    pub kind: u8,
    /// Statement or portal name.
    pub name: &'a str,
}

/// The longest PostgreSQL reads a message that carries no statement or data (Describe,
/// Execute, Close, Sync, Flush, CopyDone, CopyFail, Terminate: `PQ_SMALL_MESSAGE_LIMIT`), as
/// its length field counts. Past it the server drops the connection, so such a message is
/// refused before it reaches one.
pub const SMALL_MESSAGE_LIMIT: usize = 10_000;

/// The longest a logged-in client's message of type `tag` may be, counted as its length field
/// counts (the body plus the field's own four bytes); `None` for a type such a client may not
/// send, which is refused as soon as its type byte arrives, as PostgreSQL does, without
/// waiting for a body it announces. The types that carry statements and data are bounded only
/// by `server.max_message_bytes`.
pub fn session_message_limit(tag: u8) -> Option<usize> {
    match tag {
        tag::FE_QUERY
        | tag::FE_PARSE
        | tag::FE_BIND
        | tag::FE_FUNCTION_CALL
        | tag::FE_COPY_DATA => Some(usize::MAX),
        tag::FE_DESCRIBE
        | tag::FE_EXECUTE
        | tag::FE_CLOSE
        | tag::FE_SYNC
        | tag::FE_FLUSH
        | tag::FE_COPY_DONE
        | tag::FE_COPY_FAIL
        | tag::FE_TERMINATE => Some(SMALL_MESSAGE_LIMIT),
        _ => None,
    }
}

/// Parses a Query body.
pub fn parse_query(body: &[u8]) -> Result<Query<'_>, ProtocolError> {
    let mut r = Reader::new(body);
    let sql = r.cstr("Query: query string")?;
    r.finish("Query: trailing bytes")?;
    Ok(Query { sql })
}

/// Parses a Parse body, checking the parameter-type count matches the remaining length.
pub fn parse_parse(body: &[u8]) -> Result<Parse<'_>, ProtocolError> {
    let mut r = Reader::new(body);
    let name = r.cstr("Parse: statement name")?;
    let sql = r.cstr("Parse: query string")?;
    let param_types = r.rest();
    let mut t = Reader::new(param_types);
    // Unsigned, as PostgreSQL reads it: up to 65535 parameters.
    let count = usize::from(t.u16("Parse: parameter type count")?);
    if t.remaining() != count * 4 {
        return Err(ProtocolError::Malformed(
            "Parse: parameter type count does not match length",
        ));
    }
    Ok(Parse {
        name,
        sql,
        param_types,
    })
}

/// Reads a count, unsigned as PostgreSQL reads it: up to 65535.
fn count(r: &mut Reader<'_>, what: &'static str) -> Result<usize, ProtocolError> {
    Ok(usize::from(r.u16(what)?))
}

/// Skips `n` format codes. Their values, like a format count that does not match the
/// parameters, are the server's to refuse: it answers with an error and the session goes on.
fn format_codes(r: &mut Reader<'_>, n: usize, what: &'static str) -> Result<(), ProtocolError> {
    r.take(n * 2, what)?;
    Ok(())
}

/// Parses a Bind body, validating the whole structure without copying any value.
pub fn parse_bind(body: &[u8]) -> Result<Bind<'_>, ProtocolError> {
    let mut r = Reader::new(body);
    let portal = r.cstr("Bind: portal name")?;
    let statement = r.cstr("Bind: statement name")?;
    let rest = r.rest();
    let mut r = Reader::new(rest);
    let nformats = count(&mut r, "Bind: parameter format count")?;
    format_codes(&mut r, nformats, "Bind: parameter format code")?;
    let nparams = count(&mut r, "Bind: parameter count")?;
    for _ in 0..nparams {
        let len = r.i32("Bind: parameter length")?;
        if len == -1 {
            continue; // NULL
        }
        let len =
            usize::try_from(len).map_err(|_| ProtocolError::Malformed("Bind: parameter length"))?;
        r.take(len, "Bind: parameter value truncated")?;
    }
    let nresults = count(&mut r, "Bind: result format count")?;
    format_codes(&mut r, nresults, "Bind: result format code")?;
    r.finish("Bind: trailing bytes")?;
    Ok(Bind {
        portal,
        statement,
        rest,
    })
}

/// Parses the shared `kind name\0` layout of Describe and Close.
fn kind_and_name<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a str), ProtocolError> {
    let mut r = Reader::new(body);
    let kind = r.u8(what)?;
    if kind != b'S' && kind != b'P' {
        return Err(ProtocolError::Malformed(what));
    }
    let name = r.cstr(what)?;
    r.finish(what)?;
    Ok((kind, name))
}

/// Parses a Describe body.
pub fn parse_describe(body: &[u8]) -> Result<Describe<'_>, ProtocolError> {
    let (kind, name) = kind_and_name(body, "Describe: expected S|P then a name")?;
    Ok(Describe { kind, name })
}

/// Parses an Execute body.
pub fn parse_execute(body: &[u8]) -> Result<Execute<'_>, ProtocolError> {
    let mut r = Reader::new(body);
    let portal = r.cstr("Execute: portal name")?;
    let max_rows = r.i32("Execute: row limit")?;
    r.finish("Execute: trailing bytes")?;
    Ok(Execute { portal, max_rows })
}

/// Parses a Close body.
pub fn parse_close(body: &[u8]) -> Result<Close<'_>, ProtocolError> {
    let (kind, name) = kind_and_name(body, "Close: expected S|P then a name")?;
    Ok(Close { kind, name })
}

/// Parses a PasswordMessage body: one NUL-terminated string and nothing after it.
pub fn parse_password(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut r = Reader::new(body);
    let pw = r.cstr("PasswordMessage: password")?;
    r.finish("PasswordMessage: trailing bytes")?;
    Ok(pw)
}

/// Parses SASLInitialResponse into (mechanism, data); a data length of -1 yields empty data.
pub fn parse_sasl_initial(body: &[u8]) -> Result<(&str, &[u8]), ProtocolError> {
    let mut r = Reader::new(body);
    let mechanism = r.cstr("SASLInitialResponse: mechanism")?;
    let len = r.i32("SASLInitialResponse: data length")?;
    let data = if len == -1 {
        &[][..]
    } else {
        let len = usize::try_from(len)
            .map_err(|_| ProtocolError::Malformed("SASLInitialResponse: data length"))?;
        r.take(len, "SASLInitialResponse: data truncated")?
    };
    r.finish("SASLInitialResponse: trailing bytes")?;
    Ok((mechanism, data))
}

/// Parse message; `param_types` is the raw count+OIDs block (an empty slice means no types).
pub fn encode_parse(name: &str, sql: &str, param_types: &[u8]) -> Frame {
    let mut b = Builder::tagged(
        tag::FE_PARSE,
        name.len() + sql.len() + param_types.len() + 4,
    );
    b.cstr(name).cstr(sql);
    if param_types.is_empty() {
        b.i16(0);
    } else {
        b.bytes(param_types);
    }
    b.finish()
}

/// Bind with the same portal and parameters as `bind` but a different statement name.
pub fn encode_bind_renamed(bind: &Bind<'_>, statement: &str) -> Frame {
    let mut buf = BytesMut::new();
    put_bind_renamed(&mut buf, bind, statement);
    Frame {
        tag: tag::FE_BIND,
        bytes: buf.freeze(),
    }
}

/// [`encode_bind_renamed`] written straight into `dst` (a connection's write buffer), so
/// executing a prepared statement costs no allocation of its own.
pub fn put_bind_renamed(dst: &mut BytesMut, bind: &Bind<'_>, statement: &str) {
    let body = cstr_len(bind.portal) + cstr_len(statement) + bind.rest.len();
    dst.reserve(body + 5);
    dst.put_u8(tag::FE_BIND);
    dst.put_i32(i32_len(body + 4));
    put_cstr(dst, bind.portal);
    put_cstr(dst, statement);
    dst.put_slice(bind.rest);
}

/// Describe of a statement (`b'S'`) or portal (`b'P'`).
pub fn encode_describe(kind: u8, name: &str) -> Frame {
    let mut b = Builder::tagged(tag::FE_DESCRIBE, name.len() + 2);
    b.u8(kind).cstr(name);
    b.finish()
}

/// Close of a statement (`b'S'`) or portal (`b'P'`).
pub fn encode_close(kind: u8, name: &str) -> Frame {
    let mut b = Builder::tagged(tag::FE_CLOSE, name.len() + 2);
    b.u8(kind).cstr(name);
    b.finish()
}

/// Execute of `portal` with a row limit (0 = all rows).
pub fn encode_execute(portal: &str, max_rows: i32) -> Frame {
    let mut b = Builder::tagged(tag::FE_EXECUTE, portal.len() + 5);
    b.cstr(portal).i32(max_rows);
    b.finish()
}

/// Simple-protocol Query.
pub fn encode_query(sql: &str) -> Frame {
    let mut b = Builder::tagged(tag::FE_QUERY, sql.len() + 1);
    b.cstr(sql);
    b.finish()
}

/// CopyFail with the reason the server reports.
pub fn encode_copy_fail(reason: &str) -> Frame {
    let mut b = Builder::tagged(tag::FE_COPY_FAIL, reason.len() + 1);
    b.cstr(reason);
    b.finish()
}

/// Sync.
pub fn encode_sync() -> Frame {
    Frame::new(tag::FE_SYNC, &[])
}

/// Flush.
pub fn encode_flush() -> Frame {
    Frame::new(tag::FE_FLUSH, &[])
}

/// Terminate.
pub fn encode_terminate() -> Frame {
    Frame::new(tag::FE_TERMINATE, &[])
}

/// Protocol 3.0 StartupMessage (untagged) with `params` in order and the closing NUL.
pub fn encode_startup(params: &[(&str, &str)]) -> Bytes {
    let cap = params
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .sum::<usize>()
        + 5;
    let mut b = Builder::untagged(cap);
    b.i32(PROTOCOL_3_0);
    for (k, v) in params {
        b.cstr(k).cstr(v);
    }
    b.u8(0);
    b.finish_untagged()
}

/// CancelRequest (untagged, 16 bytes).
pub fn encode_cancel_request(pid: i32, secret: i32) -> Bytes {
    let mut b = Builder::untagged(12);
    b.i32(CANCEL_REQUEST_CODE).i32(pid).i32(secret);
    b.finish_untagged()
}

/// SSLRequest (untagged, 8 bytes).
pub fn encode_ssl_request() -> Bytes {
    let mut b = Builder::untagged(4);
    b.i32(super::startup::SSL_REQUEST_CODE);
    b.finish_untagged()
}

/// PasswordMessage: `data` is sent as-is, plus a terminating NUL unless it already ends in one.
///
/// Accepting both forms lets callers pass a plain password or a forwarded NUL-terminated body;
/// cleartext and MD5 passwords can never contain NUL, so the rule is unambiguous for them.
pub fn encode_password(data: &[u8]) -> Frame {
    let mut b = Builder::tagged(tag::FE_PASSWORD, data.len() + 1);
    b.bytes(data);
    if data.last() != Some(&0) {
        b.u8(0);
    }
    b.finish()
}

/// SASLInitialResponse with the client-first data (its length is always sent, never -1).
pub fn encode_sasl_initial(mechanism: &str, data: &[u8]) -> Frame {
    let mut b = Builder::tagged(tag::FE_PASSWORD, mechanism.len() + data.len() + 5);
    b.cstr(mechanism).len_prefixed(data);
    b.finish()
}

/// SASLResponse: the body is the raw SASL data.
pub fn encode_sasl_response(data: &[u8]) -> Frame {
    Frame::new(tag::FE_PASSWORD, data)
}

/// Bind built from parts (for synthesized binds and tests); formats are not validated here.
pub fn encode_bind(
    portal: &str,
    statement: &str,
    param_formats: &[i16],
    params: &[Option<&[u8]>],
    result_formats: &[i16],
) -> Frame {
    let mut b = Builder::tagged(tag::FE_BIND, 64);
    b.cstr(portal).cstr(statement);
    b.u16(u16_count(param_formats.len()));
    for &f in param_formats {
        b.i16(f);
    }
    b.u16(u16_count(params.len()));
    for p in params {
        match p {
            Some(v) => b.len_prefixed(v),
            None => b.i32(-1),
        };
    }
    b.u16(u16_count(result_formats.len()));
    for &f in result_formats {
        b.i16(f);
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
    use crate::protocol::frame::decode_frame;
    use crate::protocol::testutil::Rng;
    use bytes::BytesMut;

    /// Every encoded frame must also survive our own framer, header included.
    fn reframe(f: &Frame) -> Frame {
        let mut buf = BytesMut::from(&f.bytes[..]);
        let g = decode_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(&g, f);
        g
    }

    #[test]
    fn query_round_trip() {
        let f = reframe(&encode_query("select 1; select 2"));
        assert_eq!(f.tag, b'Q');
        assert_eq!(parse_query(f.body()).unwrap().sql, "select 1; select 2");
        assert_eq!(parse_query(b"\0").unwrap().sql, "");
        assert!(parse_query(b"select").is_err());
        assert!(parse_query(b"a\0b").is_err());
        assert!(parse_query(b"\xff\0").is_err());
    }

    #[test]
    fn parse_round_trip() {
        let mut types = vec![0, 2];
        types.extend_from_slice(&23i32.to_be_bytes());
        types.extend_from_slice(&25i32.to_be_bytes());
        let f = reframe(&encode_parse("s1", "select $1, $2", &types));
        assert_eq!(f.tag, b'P');
        let p = parse_parse(f.body()).unwrap();
        assert_eq!(p.name, "s1");
        assert_eq!(p.sql, "select $1, $2");
        assert_eq!(p.param_types, &types[..]);
        assert_eq!(p.param_type_count(), 2);
        let f = encode_parse("", "select 1", &[]);
        let p = parse_parse(f.body()).unwrap();
        assert_eq!(
            (p.name, p.param_types, p.param_type_count()),
            ("", &[0u8, 0][..], 0)
        );
    }

    #[test]
    fn parse_rejects_bad_type_counts() {
        assert!(parse_parse(b"s\0q\0").is_err()); // count missing
        assert!(parse_parse(b"s\0q\0\0").is_err()); // half a count
        assert!(parse_parse(b"s\0q\0\0\x01").is_err()); // count 1, no OID
        assert!(parse_parse(b"s\0q\0\0\x01\0\0\0\x17\0").is_err()); // extra byte
        assert!(parse_parse(b"s\0q\0\xff\xff").is_err()); // 65535 announced, none there
        assert!(parse_parse(b"s\0q").is_err());
        assert!(parse_parse(b"s\0q\0\0\x01\0\0\0\x17").is_ok());
    }

    #[test]
    fn bind_round_trip_and_rename() {
        let f = reframe(&encode_bind(
            "p1",
            "s1",
            &[0, 1],
            &[Some(b"42"), None],
            &[1],
        ));
        assert_eq!(f.tag, b'B');
        let b = parse_bind(f.body()).unwrap();
        assert_eq!((b.portal, b.statement), ("p1", "s1"));
        let renamed = reframe(&encode_bind_renamed(&b, "causeway_7"));
        let r = parse_bind(renamed.body()).unwrap();
        assert_eq!(
            (r.portal, r.statement, r.rest),
            ("p1", "causeway_7", b.rest)
        );
        // Minimal bind: no formats, no params, no result formats.
        let f = encode_bind("", "", &[], &[], &[]);
        assert_eq!(f.body(), b"\0\0\0\0\0\0\0\0");
        assert!(parse_bind(f.body()).is_ok());
        // One format code applies to all parameters.
        let f = encode_bind("", "s", &[1], &[Some(b"a"), Some(b""), None], &[]);
        assert!(parse_bind(f.body()).is_ok());
    }

    #[test]
    fn bind_rejects_malformed_structures() {
        // Well formed, but refused by the server with an error the session survives: passed on.
        let servers: Vec<Frame> = vec![
            encode_bind("", "s", &[0, 1, 0], &[Some(b"a"), None], &[]), // 3 formats, 2 params
            encode_bind("", "s", &[2], &[Some(b"a")], &[]),             // bad format code
            encode_bind("", "s", &[], &[Some(b"a")], &[5]),             // bad result format
        ];
        for f in &servers {
            assert!(parse_bind(f.body()).is_ok(), "{:?}", f.body());
        }
        let good = encode_bind("p", "s", &[0], &[Some(b"abc"), None], &[0, 1]);
        let body = good.body();
        for cut in 0..body.len() {
            assert!(parse_bind(&body[..cut]).is_err(), "cut {cut}");
        }
        let mut extra = body.to_vec();
        extra.push(0);
        assert!(parse_bind(&extra).is_err());
        // Parameter length -2 and a length that overruns the body.
        assert!(parse_bind(b"\0s\0\0\0\0\x01\xff\xff\xff\xfe\0\0").is_err());
        assert!(parse_bind(b"\0s\0\0\0\0\x01\x7f\xff\xff\xff\0\0").is_err());
        // Counts past i16 (read unsigned) that the body does not hold.
        assert!(parse_bind(b"\0s\0\xff\xff\0\0\0\0").is_err());
        assert!(parse_bind(b"\0s\0\0\0\xff\xff\0\0").is_err());
        assert!(parse_bind(b"\0s\0\0\0\0\0\xff\xff").is_err());
    }

    #[test]
    fn counts_past_i16_are_unsigned_as_on_the_server() {
        // 40,000 and 65,535 parameters: PostgreSQL reads these counts as unsigned 16 bits.
        for n in [40_000usize, 65_535] {
            let mut types = u16::try_from(n).unwrap().to_be_bytes().to_vec();
            for _ in 0..n {
                types.extend_from_slice(&23i32.to_be_bytes());
            }
            let f = encode_parse("", "select", &types);
            let p = parse_parse(f.body()).unwrap();
            assert_eq!(p.param_type_count(), n);
            let values: Vec<Option<&[u8]>> = (0..n).map(|_| Some(&b"1"[..])).collect();
            let f = encode_bind("", "", &[1], &values, &[0; 3]);
            assert_eq!(&f.body()[2..4], &[0, 1]);
            assert_eq!(
                &f.body()[6..8],
                &u16::try_from(n).unwrap().to_be_bytes()[..]
            );
            let b = parse_bind(f.body()).unwrap();
            assert_eq!(
                encode_bind_renamed(&b, "x").body().len(),
                f.body().len() + 1
            );
            // One format code per parameter, past i16 too.
            let formats = vec![0i16; n];
            assert!(parse_bind(encode_bind("", "", &formats, &values, &[]).body()).is_ok());
        }
        // 65,536 cannot be said: the count field is 16 bits.
        assert_eq!(u16_count(65_536), u16::MAX);
    }

    #[test]
    fn describe_and_close_round_trip() {
        for kind in [b'S', b'P'] {
            let d = reframe(&encode_describe(kind, "x"));
            assert_eq!(d.tag, b'D');
            assert_eq!(
                parse_describe(d.body()).unwrap(),
                Describe { kind, name: "x" }
            );
            let c = reframe(&encode_close(kind, ""));
            assert_eq!(c.tag, b'C');
            assert_eq!(parse_close(c.body()).unwrap(), Close { kind, name: "" });
        }
        assert!(parse_describe(b"Xname\0").is_err());
        assert!(parse_describe(b"S").is_err());
        assert!(parse_describe(b"").is_err());
        assert!(parse_close(b"Sname").is_err());
        assert!(parse_close(b"Sa\0b\0").is_err());
    }

    #[test]
    fn execute_round_trip() {
        let f = reframe(&encode_execute("p", 100));
        assert_eq!(f.tag, b'E');
        assert_eq!(
            parse_execute(f.body()).unwrap(),
            Execute {
                portal: "p",
                max_rows: 100
            }
        );
        assert!(parse_execute(b"p\0\0\0\0").is_err());
        assert!(parse_execute(b"p\0\0\0\0\0\0").is_err());
    }

    #[test]
    fn session_messages_are_the_frontend_ones() {
        for t in *b"QPBFd" {
            assert_eq!(session_message_limit(t), Some(usize::MAX), "{}", t as char);
        }
        for t in *b"DECSHcfX" {
            assert_eq!(session_message_limit(t), Some(10_000), "{}", t as char);
        }
        // A password after login, a stray startup packet (length's first byte), a backend tag.
        for t in [b'p', 0, b'Y', b'Z', b'T', 0xff] {
            assert_eq!(session_message_limit(t), None, "{t}");
        }
    }

    #[test]
    fn simple_frames() {
        assert_eq!(&encode_sync().bytes[..], b"S\0\0\0\x04");
        assert_eq!(&encode_flush().bytes[..], b"H\0\0\0\x04");
        assert_eq!(&encode_terminate().bytes[..], b"X\0\0\0\x04");
    }

    #[test]
    fn startup_and_cancel_encoding() {
        let s = encode_startup(&[("user", "u")]);
        assert_eq!(&s[..], b"\0\0\0\x10\0\x03\0\0user\0u\0\0");
        let c = encode_cancel_request(1, 2);
        assert_eq!(&c[..], b"\0\0\0\x10\x04\xd2\x16\x2e\0\0\0\x01\0\0\0\x02");
    }

    #[test]
    fn password_round_trip() {
        let f = reframe(&encode_password(b"secret"));
        assert_eq!(f.tag, b'p');
        assert_eq!(parse_password(f.body()).unwrap(), "secret");
        // Already NUL-terminated input is not double-terminated.
        assert_eq!(encode_password(b"md5abc\0").body(), b"md5abc\0");
        assert!(parse_password(b"secret").is_err());
        assert!(parse_password(b"a\0b\0").is_err());
    }

    #[test]
    fn sasl_round_trip() {
        let f = reframe(&encode_sasl_initial("SCRAM-SHA-256", b"n,,n=,r=abc"));
        assert_eq!(f.tag, b'p');
        assert_eq!(
            parse_sasl_initial(f.body()).unwrap(),
            ("SCRAM-SHA-256", &b"n,,n=,r=abc"[..])
        );
        assert_eq!(
            parse_sasl_initial(b"M\0\xff\xff\xff\xff").unwrap(),
            ("M", &b""[..])
        );
        assert!(parse_sasl_initial(b"M\0\0\0\0\x05abc").is_err());
        assert!(parse_sasl_initial(b"M\0\0\0\0\x01ab").is_err());
        assert!(parse_sasl_initial(b"M\0\xff\xff\xff\xfe").is_err());
        assert!(parse_sasl_initial(b"M\0\0\0").is_err());
        let r = reframe(&encode_sasl_response(b"c=biws,r=x,p=y"));
        assert_eq!(r.body(), b"c=biws,r=x,p=y");
    }

    #[test]
    fn encoders_cut_interior_nul() {
        let f = encode_query("select 1\0; drop table x");
        assert_eq!(parse_query(f.body()).unwrap().sql, "select 1");
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng::new(0x0123_4567_89ab_cdef);
        let valid: Vec<Frame> = vec![
            encode_query("select 1"),
            encode_parse("s", "select $1", &[0, 1, 0, 0, 0, 23]),
            encode_bind("p", "s", &[0], &[Some(b"1"), None], &[1]),
            encode_describe(b'S', "s"),
            encode_execute("p", 0),
            encode_close(b'P', "p"),
            encode_password(b"pw"),
            encode_sasl_initial("SCRAM-SHA-256", b"data"),
        ];
        for i in 0..20_000 {
            let data = if i % 2 == 0 {
                rng.garbage(64)
            } else {
                let f = &valid[rng.below(valid.len())];
                rng.mutate(f.body())
            };
            let _ = parse_query(&data);
            let _ = parse_parse(&data);
            let _ = parse_bind(&data);
            let _ = parse_describe(&data);
            let _ = parse_execute(&data);
            let _ = parse_close(&data);
            let _ = parse_password(&data);
            let _ = parse_sasl_initial(&data);
            // Anything we accept must re-encode to the same bytes.
            if let Ok(b) = parse_bind(&data) {
                assert_eq!(encode_bind_renamed(&b, b.statement).body(), &data[..]);
            }
            if let Ok(p) = parse_parse(&data) {
                assert_eq!(encode_parse(p.name, p.sql, p.param_types).body(), &data[..]);
            }
        }
    }
}
