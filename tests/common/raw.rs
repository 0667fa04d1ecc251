//! A minimal hand-driven protocol client, for what drivers never send.
#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A startup packet for protocol 3.0.
pub fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    startup_minor(0, params)
}

/// A startup packet for protocol 3.`minor`.
pub fn startup_minor(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = (3u32 << 16 | u32::from(minor)).to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// One typed message.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// NUL-terminated strings concatenated.
pub fn cstrs(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(p.as_bytes());
        out.push(0);
    }
    out
}

/// Parse(name, sql) with no parameter types.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = cstrs(&[name, sql]);
    body.extend_from_slice(&0i16.to_be_bytes());
    msg(b'P', &body)
}

/// Bind(portal "", statement) with no parameters and text results.
pub fn bind(statement: &str) -> Vec<u8> {
    let mut body = cstrs(&["", statement]);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    msg(b'B', &body)
}

/// Execute("" portal, all rows).
pub fn execute() -> Vec<u8> {
    let mut body = cstrs(&[""]);
    body.extend_from_slice(&0i32.to_be_bytes());
    msg(b'E', &body)
}

/// Describe of a prepared statement.
pub fn describe_statement(name: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    body.extend_from_slice(&cstrs(&[name]));
    msg(b'D', &body)
}

/// Flush.
pub fn flush() -> Vec<u8> {
    msg(b'H', &[])
}

/// Sync.
pub fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

/// A simple Query.
pub fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cstrs(&[sql]))
}

/// Reads messages until ReadyForQuery or an ErrorResponse; returns (tag, body) pairs.
pub async fn read_until_ready(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    read_until(s, |tag| tag == b'Z' || tag == b'E').await
}

/// Reads messages until one whose tag satisfies `stop` (inclusive).
pub async fn read_until(s: &mut TcpStream, stop: impl Fn(u8) -> bool) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut head = [0u8; 5];
        if tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
            .await
            .expect("no reply within 5 s")
            .is_err()
        {
            return out;
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await.unwrap();
        let tag = head[0];
        out.push((tag, body));
        if stop(tag) {
            return out;
        }
    }
}

/// The SQLSTATE of an ErrorResponse body.
pub fn error_code(body: &[u8]) -> String {
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let field = body[i];
        let end = i + 1 + body[i + 1..].iter().position(|b| *b == 0).unwrap();
        if field == b'C' {
            return String::from_utf8_lossy(&body[i + 1..end]).into_owned();
        }
        i = end + 1;
    }
    String::new()
}

/// Connects to a proxy that trusts its clients and waits for ReadyForQuery.
pub async fn login(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&startup(&[("user", "app"), ("database", "app")]))
        .await
        .unwrap();
    let msgs = read_until_ready(&mut s).await;
    assert_eq!(
        msgs.last().map(|m| m.0),
        Some(b'Z'),
        "login failed: {msgs:?}"
    );
    s
}

/// Sends bytes and collects replies through the next ReadyForQuery (errors included).
pub async fn roundtrip(s: &mut TcpStream, bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    s.write_all(bytes).await.unwrap();
    read_until(s, |tag| tag == b'Z').await
}

/// FunctionCall (fast path) of the function with `oid`, text arguments and a text result.
pub fn function_call(oid: u32, args: &[&[u8]]) -> Vec<u8> {
    let mut body = oid.to_be_bytes().to_vec();
    body.extend_from_slice(&0u16.to_be_bytes());
    body.extend_from_slice(&(args.len() as u16).to_be_bytes());
    for a in args {
        body.extend_from_slice(&(a.len() as i32).to_be_bytes());
        body.extend_from_slice(a);
    }
    body.extend_from_slice(&0u16.to_be_bytes());
    msg(b'F', &body)
}

/// The first column of the first DataRow among `msgs`, as text.
pub fn first_value(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    let (_, body) = msgs.iter().find(|m| m.0 == b'D')?;
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let value = body.get(6..6 + usize::try_from(len).ok()?)?;
    Some(String::from_utf8_lossy(value).into_owned())
}
