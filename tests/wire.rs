//! Raw wire-level behaviour: SSL negotiation, the greeting a driver sees, and hostile input
//! (garbage, huge length headers, too many startup parameters) answered with an error while
//! the proxy keeps serving others.

mod common;

use std::time::Duration;

use common::raw::{error_code, login, query, read_until_ready, startup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn trust_env() -> (common::Env, causeway::server::Running) {
    let env = common::start().await;
    let proxy = common::trust_proxy(&env).await;
    (env, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_refused_then_greeting_like_a_server() {
    let (_env, proxy) = trust_env().await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // SSLRequest is answered 'N'; the client goes on in plain text.
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"N");
    s.write_all(&startup(&[
        ("user", "app"),
        ("database", "app"),
        ("application_name", "wire"),
    ]))
    .await
    .unwrap();
    let msgs = read_until_ready(&mut s).await;
    let params: Vec<(String, String)> = msgs
        .iter()
        .filter(|(t, _)| *t == b'S')
        .map(|(_, b)| {
            let mut parts = b
                .split(|c| *c == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned());
            (parts.next().unwrap(), parts.next().unwrap())
        })
        .collect();
    for name in [
        "server_version",
        "server_encoding",
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "integer_datetimes",
        "standard_conforming_strings",
    ] {
        assert!(
            params.iter().any(|(k, _)| k == name),
            "missing {name}: {params:?}"
        );
    }
    assert!(params.contains(&("application_name".into(), "wire".into())));
    assert!(params.contains(&("client_encoding".into(), "UTF8".into())));
    assert!(msgs.iter().any(|(t, b)| *t == b'K' && b.len() == 8));
    assert_eq!(msgs.last().map(|(t, _)| *t), Some(b'Z'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_an_error_and_the_proxy_stays_up() {
    let (env, proxy) = trust_env().await;
    let addr = proxy.addr;
    // Garbage instead of a startup packet.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let msgs = read_until_ready(&mut s).await;
    assert!(matches!(msgs.last(), Some((b'E', _))), "{msgs:?}");
    // A startup length header of 1 GiB is refused at once.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0x40, 0, 0, 0, 0, 3, 0, 0]).await.unwrap();
    let msgs = read_until_ready(&mut s).await;
    assert!(matches!(msgs.last(), Some((b'E', _))), "{msgs:?}");
    // A startup packet with 10,000 parameters.
    let many: Vec<(String, String)> = (0..10_000)
        .map(|i| (format!("p{i}"), "v".to_string()))
        .collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(&startup(&refs)).await;
    let msgs = read_until_ready(&mut s).await;
    assert!(matches!(msgs.last(), Some((b'E', _))), "{msgs:?}");
    // After login: a message claiming 1 GiB, and an unknown message type.
    for bad in [vec![b'Q', 0x40, 0, 0, 0], vec![b'~', 0, 0, 0, 4]] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&startup(&[("user", "app"), ("database", "app")]))
            .await
            .unwrap();
        read_until_ready(&mut s).await;
        s.write_all(&bad).await.unwrap();
        let msgs = read_until_ready(&mut s).await;
        let (tag, body) = msgs.last().expect("an error reply");
        assert_eq!(*tag, b'E');
        assert_eq!(error_code(body), "08P01");
    }
    // A client encoding the proxy cannot classify is refused clearly.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&startup(&[("user", "app"), ("client_encoding", "LATIN1")]))
        .await
        .unwrap();
    let msgs = read_until_ready(&mut s).await;
    assert_eq!(error_code(&msgs.last().unwrap().1), "0A000");
    // Everyone else is still served.
    let c = env.client().await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

/// Connects as `user` and waits for the proxy's authentication request (SCRAM or md5).
async fn asked_for_a_password(addr: std::net::SocketAddr, user: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&startup(&[("user", user), ("database", "app")]))
        .await
        .unwrap();
    let asked = common::raw::read_until(&mut s, |_| true).await;
    assert!(
        matches!(asked.as_slice(), [(b'R', body)] if body[3] == 10 || body[3] == 5),
        "{asked:?}"
    );
    s
}

/// A password message (`p`) whose length field says `len`, with `body` of its bytes sent.
fn password_message(len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = vec![b'p'];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The SQLSTATE and text of the answer to an authentication message, and whether the proxy
/// closed the connection then.
async fn answer_then_closed(s: &mut TcpStream) -> (String, String, bool) {
    let msgs = common::raw::read_until(s, |_| true).await;
    let (code, text) = match msgs.as_slice() {
        [(b'E', body)] => (error_code(body), String::from_utf8_lossy(body).into_owned()),
        other => panic!("expected an error: {other:?}"),
    };
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .is_ok_and(|r| r.is_err() || rest.is_empty());
    (code, text, closed)
}

/// Before login the proxy takes no larger a message than PostgreSQL does: a SASL message over
/// 1024 bytes, or a password message over 65535, is refused from its length header with 08P01
/// and the connection closed, whether the user exists or not, so sockets that never log in
/// cannot make the proxy buffer `server.max_message_bytes` each. Messages up to the limits are
/// read and judged as usual, and logins carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_messages_are_bounded_as_on_the_server() {
    let env = common::start().await;
    let md5 = common::proxy_for(
        &env.config
            .replace("method = \"scram-sha-256\"", "method = \"md5\""),
    )
    .await;
    // A 1 MiB SASLInitialResponse or password message: only its header and a few bytes come.
    for (addr, user) in [
        (env.proxy.addr, "app"),
        (env.proxy.addr, "nobody"),
        (md5.addr, "app"),
    ] {
        let mut s = asked_for_a_password(addr, user).await;
        s.write_all(&password_message((1 << 20) + 4, b"SCRAM"))
            .await
            .unwrap();
        let (code, text, closed) = answer_then_closed(&mut s).await;
        assert_eq!(code, "08P01", "{user} at {addr}: {text}");
        assert!(text.contains("invalid message length"), "{text}");
        assert!(closed, "{user} at {addr}: the connection stays open");
    }
    // The limits themselves: a whole message of exactly the limit is read and refused as a
    // wrong password; one byte more is refused from its header.
    let sasl = |len: usize| {
        let mut body = common::raw::cstrs(&["SCRAM-SHA-256"]);
        let data = len - 4 - body.len() - 4;
        body.extend_from_slice(&(data as i32).to_be_bytes());
        body.resize(len - 4, b'x');
        common::raw::msg(b'p', &body)
    };
    let password = |len: usize| {
        let mut body = vec![b'x'; len - 5];
        body.push(0);
        common::raw::msg(b'p', &body)
    };
    for (addr, limit, message) in [
        (env.proxy.addr, 1024, &sasl as &dyn Fn(usize) -> Vec<u8>),
        (md5.addr, 65535, &password),
    ] {
        let mut s = asked_for_a_password(addr, "app").await;
        s.write_all(&message(limit)).await.unwrap();
        let (code, text, _) = answer_then_closed(&mut s).await;
        assert_eq!(code, "28P01", "{limit}: {text}");
        let mut s = asked_for_a_password(addr, "app").await;
        let over = message(limit + 1);
        s.write_all(&over[..9]).await.unwrap();
        let (code, text, closed) = answer_then_closed(&mut s).await;
        assert_eq!(code, "08P01", "{limit} + 1: {text}");
        assert!(closed, "{limit} + 1: the connection stays open");
    }
    // Many sockets that announce 60 MiB and send 1 MiB of it hold none of it.
    let before = rss_kib();
    let mut held = Vec::new();
    for i in 0..32 {
        let addr = if i % 2 == 0 { env.proxy.addr } else { md5.addr };
        let mut s = asked_for_a_password(addr, "nobody").await;
        let mut bytes = password_message((60 << 20) + 4, &[]);
        bytes.resize(5 + (1 << 20), b'x');
        // The proxy may have closed before all of it was written.
        let _ = s.write_all(&bytes).await;
        held.push(s);
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "proxy memory grew by {grown} KiB for 32 sockets that never logged in"
    );
    drop(held);
    // Logins carry on, with either method.
    for addr in [env.proxy.addr, md5.addr] {
        let c = common::connect(&format!(
            "host=127.0.0.1 port={} user=app password={} dbname=app",
            addr.port(),
            common::PASSWORD
        ))
        .await;
        assert_eq!(
            c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
            1
        );
    }
}

/// Resident memory of this process (the proxy runs in it), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_cannot_grow_the_proxy() {
    let (env, proxy) = trust_env().await;
    let before = rss_kib();
    // About 2 GB of result, never read by the client.
    let mut s = login(proxy.addr).await;
    s.write_all(&query(
        "SELECT repeat('x', 1000) FROM generate_series(1, 2000000)",
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "proxy memory grew by {grown} KiB while its client did not read"
    );
    // Everyone else is still served meanwhile.
    let c = env.client_via(&proxy).await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    // When the stalled client goes away, its server connection is dropped, not left streaming.
    drop(s);
    let node = proxy.shared.cluster.nodes();
    let leased = || {
        node.iter()
            .map(|n| n.in_use.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<usize>()
    };
    assert!(
        common::eventually(10, || leased() == 0).await,
        "the stalled client's server connection is still leased"
    );
}

/// Reads replies through the next ReadyForQuery without keeping them (a row may be huge);
/// returns the bytes read and the SQLSTATE of an error among them, if any.
async fn skim_until_ready(s: &mut TcpStream) -> (usize, Option<String>) {
    let mut total = 0;
    let mut error = None;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.unwrap();
        let mut left = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
        total += left + 5;
        if head[0] == b'E' {
            let mut body = vec![0u8; left];
            s.read_exact(&mut body).await.unwrap();
            error = Some(error_code(&body));
            continue;
        }
        while left > 0 {
            let n = left.min(chunk.len());
            s.read_exact(&mut chunk[..n]).await.unwrap();
            left -= n;
        }
        if head[0] == b'Z' {
            return (total, error);
        }
    }
}

/// A connection that carried a huge message gives the memory back once it went through: the
/// client's session and the pooled server connection keep buffers of ordinary size, in
/// either direction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffers_shrink_after_a_huge_message() {
    let (_env, proxy) = trust_env().await;
    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(login(proxy.addr).await);
    }
    let before = rss_kib();
    // Results: one 64 MiB row per client, read while both stay connected.
    for s in &mut clients {
        s.write_all(&query("SELECT repeat('x', 64 << 20)"))
            .await
            .unwrap();
        let (n, error) = skim_until_ready(s).await;
        assert_eq!(error, None);
        assert!(n > 64 << 20, "{n}");
    }
    // Requests: a 48 MiB query text.
    let big = query(&format!("SELECT length('{}')", "x".repeat(48 << 20)));
    clients[0].write_all(&big).await.unwrap();
    drop(big);
    let (_, error) = skim_until_ready(&mut clients[0]).await;
    assert_eq!(error, None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 48 * 1024,
        "proxy memory stayed {grown} KiB above where it was after the huge messages went through"
    );
}

/// Counts are unsigned 16-bit fields: a statement may have up to 65535 parameters, as on
/// PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_thousand_parameters_run_as_on_the_server() {
    let (_env, proxy) = trust_env().await;
    let n: u16 = 40_000;
    let mut s = login(proxy.addr).await;
    let mut body = common::raw::cstrs(&["", "SELECT $1::int + $40000::int"]);
    body.extend_from_slice(&n.to_be_bytes());
    for _ in 0..n {
        body.extend_from_slice(&23u32.to_be_bytes());
    }
    let mut batch = common::raw::msg(b'P', &body);
    let mut body = common::raw::cstrs(&["", ""]);
    body.extend_from_slice(&0u16.to_be_bytes());
    body.extend_from_slice(&n.to_be_bytes());
    for _ in 0..n {
        body.extend_from_slice(&1u32.to_be_bytes());
        body.push(b'1');
    }
    body.extend_from_slice(&0u16.to_be_bytes());
    batch.extend(common::raw::msg(b'B', &body));
    batch.extend(common::raw::execute());
    batch.extend(common::raw::sync());
    let msgs = common::raw::roundtrip(&mut s, &batch).await;
    let tags: Vec<char> = msgs.iter().map(|m| m.0 as char).collect();
    assert_eq!(tags, ['1', '2', 'D', 'C', 'Z'], "{msgs:?}");
    assert_eq!(common::raw::first_value(&msgs).as_deref(), Some("2"));
}

/// Replication connections (physical or logical) are refused with a clear error at login;
/// `replication=false` and its spellings are ordinary sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connections_are_refused_clearly() {
    let (_env, proxy) = trust_env().await;
    for mode in ["database", "true", "on", "1", "bogus"] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&startup(&[("user", "app"), ("replication", mode)]))
            .await
            .unwrap();
        let msgs = read_until_ready(&mut s).await;
        let (tag, body) = msgs.last().unwrap();
        assert_eq!(*tag, b'E', "{mode}: {msgs:?}");
        assert_eq!(error_code(body), "0A000", "{mode}");
        let text = String::from_utf8_lossy(body);
        assert!(
            text.contains("replication connections are not supported by the proxy"),
            "{text}"
        );
    }
    for mode in ["false", "off", "0", "no"] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&startup(&[("user", "app"), ("replication", mode)]))
            .await
            .unwrap();
        let msgs = read_until_ready(&mut s).await;
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "{mode}: {msgs:?}");
        let msgs = common::raw::roundtrip(&mut s, &query("SELECT 1")).await;
        assert_eq!(
            common::raw::first_value(&msgs).as_deref(),
            Some("1"),
            "{mode}"
        );
    }
}

/// A message type no client may send is refused from its type byte, as PostgreSQL does,
/// without waiting for (or reserving memory for) the body its header announces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_message_type_is_refused_at_once() {
    let (env, proxy) = trust_env().await;
    let mut s = login(proxy.addr).await;
    // A 60 MB message of type 'Y' (a stray startup packet looks the same), of which only the
    // header and a few bytes ever come.
    let mut head = vec![b'Y'];
    head.extend_from_slice(&(60u32 << 20).to_be_bytes());
    head.extend_from_slice(b"xxxx");
    s.write_all(&head).await.unwrap();
    let msgs = read_until_ready(&mut s).await;
    let (tag, body) = msgs.last().expect("an error reply");
    assert_eq!(
        (*tag, error_code(body).as_str()),
        (b'E', "08P01"),
        "{msgs:?}"
    );
    let c = env.client().await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

/// A Close of neither a statement nor a portal gets 08P01 as on the server, also outside a
/// transaction, where the proxy answers a Close itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_of_an_unknown_kind_is_refused() {
    let (_env, proxy) = trust_env().await;
    for setup in [None, Some("BEGIN")] {
        let mut s = login(proxy.addr).await;
        if let Some(sql) = setup {
            common::raw::roundtrip(&mut s, &query(sql)).await;
        }
        let mut close = common::raw::msg(b'C', b"Xnope\0");
        close.extend(common::raw::sync());
        s.write_all(&close).await.unwrap();
        let msgs = read_until_ready(&mut s).await;
        let (tag, body) = msgs.last().expect("an error reply");
        assert_eq!(
            (*tag, error_code(body).as_str()),
            (b'E', "08P01"),
            "{setup:?}: {msgs:?}"
        );
    }
}

/// Extended-protocol messages are held until their Sync decides where the batch runs; a client
/// that never sends one is refused with 54000 at a bound instead of growing the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_messages_without_sync_cannot_grow_the_proxy() {
    let env = common::start().await;
    let proxy = common::proxy_for(
        &env.config
            .replace("method = \"scram-sha-256\"", "method = \"trust\"")
            .replacen(
                "\nlisten = \"127.0.0.1:0\"",
                "\nlisten = \"127.0.0.1:0\"\nmax_message_bytes = 4194304",
                1,
            ),
    )
    .await;
    let parse = common::raw::parse("", &format!("SELECT '{}'", "x".repeat(1 << 20)));
    // Just past the bound (4 MiB): the client is told why, then the connection closes.
    let mut s = login(proxy.addr).await;
    for _ in 0..4 {
        s.write_all(&parse).await.unwrap();
    }
    let msgs = read_until_ready(&mut s).await;
    let (tag, body) = msgs.last().expect("an error reply");
    assert_eq!(*tag, b'E');
    assert_eq!(error_code(body), "54000");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection stayed open");
    // Far past it: memory stays bounded.
    let before = rss_kib();
    let mut s = login(proxy.addr).await;
    for _ in 0..200 {
        if s.write_all(&parse).await.is_err() {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 32 * 1024, "proxy memory grew by {grown} KiB");
    // A batch whose one message is large but allowed still runs.
    let mut s = login(proxy.addr).await;
    let mut bytes = common::raw::parse("", &format!("SELECT length('{}')", "x".repeat(3 << 20)));
    bytes.extend(common::raw::bind(""));
    bytes.extend(common::raw::execute());
    bytes.extend(common::raw::sync());
    let msgs = common::raw::roundtrip(&mut s, &bytes).await;
    assert!(msgs.iter().any(|m| m.0 == b'D'), "{msgs:?}");
}

/// `server.listen_unix`: clients on this machine connect through `<dir>/.s.PGSQL.<port>`, log
/// in with SCRAM as over TCP, are listed as `[local]`, and the file goes when the proxy stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_listener_serves_local_clients() {
    let env = common::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = env.config.replacen(
        "\nlisten = \"127.0.0.1:0\"",
        &format!(
            "\nlisten = \"127.0.0.1:0\"\nlisten_unix = \"{}\"",
            dir.path().display()
        ),
        1,
    );
    let proxy = common::proxy_for(&config).await;
    let path = dir.path().join(format!(".s.PGSQL.{}", proxy.addr.port()));
    assert_eq!(proxy.unix_path.as_deref(), Some(path.as_path()));

    let local = format!(
        "host={} port={} user=app password={} dbname=app",
        dir.path().display(),
        proxy.addr.port(),
        common::PASSWORD
    );
    let c = common::connect(&local).await;
    // A write and a read, routed as for any client.
    c.batch_execute("CREATE TABLE local_t (id int); INSERT INTO local_t VALUES (1)")
        .await
        .unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM local_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let addrs: Vec<String> = proxy
        .shared
        .clients
        .list()
        .iter()
        .map(|i| i.addr.to_string())
        .collect();
    assert_eq!(addrs, ["[local]"]);
    // Wrong password: refused as over TCP.
    let e = common::connect_err(&local.replace(common::PASSWORD, "nope")).await;
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{e:?}"
    );
    // TCP clients are served alongside.
    let tcp = env.client_via(&proxy).await;
    tcp.simple_query("SELECT 1").await.unwrap();

    drop(c);
    drop(tcp);
    proxy.stop().await;
    assert!(!path.exists(), "socket file left behind");
}

/// A socket directory that cannot be used stops start-up with the key named, and leaves no
/// listener behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_socket_directory_stops_start_up() {
    let config = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = ""
listen_unix = "/nonexistent/causeway-sockets"

[[users]]
name = "app"
password = "pw"

[primary]
host = "127.0.0.1"
port = 1
"#;
    let cfg = causeway::config::Config::from_toml(config).unwrap();
    let err = match causeway::server::start(std::sync::Arc::new(cfg)).await {
        Ok(_) => panic!("started without its socket directory"),
        Err(e) => e,
    };
    assert!(
        err.to_string()
            .contains("server.listen_unix /nonexistent/causeway-sockets"),
        "{err}"
    );
}

/// What a server answers: message tags, with an ErrorResponse's SQLSTATE and a DataRow's
/// first value, through the next ReadyForQuery (and its status).
/// ParameterStatus is left out: a server may send it at any time, and the proxy reports its
/// read-your-writes token so.
fn summary(msgs: &[(u8, Vec<u8>)]) -> Vec<String> {
    msgs.iter()
        .filter(|(tag, _)| *tag != b'S')
        .map(|(tag, body)| match tag {
            b'E' => format!("E{}", error_code(body)),
            b'D' => format!(
                "D{}",
                common::raw::first_value(&[(*tag, body.clone())]).unwrap_or_default()
            ),
            b'Z' => format!("Z{}", body.first().map_or('?', |b| *b as char)),
            other => (*other as char).to_string(),
        })
        .collect()
}

/// Sends each step to the primary directly and through the proxy at `proxy` (after `setup`
/// there, if any), and expects the same answers.
async fn answers_as_the_server(
    env: &common::Env,
    proxy: std::net::SocketAddr,
    setup: &[u8],
    steps: &[Vec<u8>],
) {
    let steps: Vec<(Vec<u8>, u8)> = steps.iter().map(|s| (s.clone(), b'Z')).collect();
    answers_as_the_server_until(env, proxy, setup, &steps).await;
}

/// [`answers_as_the_server`] with steps read up to a message of their own (a step ended by
/// Flush gets no ReadyForQuery).
async fn answers_as_the_server_until(
    env: &common::Env,
    proxy: std::net::SocketAddr,
    setup: &[u8],
    steps: &[(Vec<u8>, u8)],
) {
    let mut direct = TcpStream::connect(("127.0.0.1", env.node_port(0)))
        .await
        .unwrap();
    direct
        .write_all(&startup(&[("user", "postgres"), ("database", "app")]))
        .await
        .unwrap();
    read_until_ready(&mut direct).await;
    let mut proxied = login(proxy).await;
    if !setup.is_empty() {
        common::raw::roundtrip(&mut proxied, setup).await;
    }
    for (i, (step, until)) in steps.iter().enumerate() {
        let mut answers = Vec::new();
        for s in [&mut direct, &mut proxied] {
            s.write_all(step).await.unwrap();
            answers.push(summary(&common::raw::read_until(s, |t| t == *until).await));
        }
        assert_eq!(answers[1], answers[0], "step {i}");
    }
}

/// Errors and COPY in extended batches keep the protocol in step as on the server: after an
/// error in a batch ended by Flush, the server skips to the next Sync; a COPY whose batch
/// ended with Flush, or got a Sync among its data, completes at the Sync after CopyDone; a
/// Sync inside simple-query COPY data is ignored; a Close skipped after an error closes
/// nothing; a failed unnamed Parse, or any simple Query, leaves no unnamed statement;
/// proxy-made replies keep their place among the server's; bad format codes get the server's
/// error, the session going on; and errors name statements as the client does. Each exchange
/// would hang, desynchronise or differ without its fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_errors_and_copy_keep_the_protocol_in_step() {
    use common::raw::{bind, describe_statement, execute, flush, msg, parse, sync};
    let (env, proxy) = trust_env().await;
    let admin = env.client().await;
    admin
        .batch_execute("CREATE TABLE copied (v int); GRANT ALL ON copied TO PUBLIC")
        .await
        .unwrap();
    let cat = |parts: &[Vec<u8>]| parts.concat();
    let close_statement = |name: &str| {
        let mut body = vec![b'S'];
        body.extend_from_slice(&common::raw::cstrs(&[name]));
        msg(b'C', &body)
    };
    let copy_data = |row: &str| msg(b'd', row.as_bytes());
    let copy_done = || msg(b'c', &[]);
    // Bind of the unnamed statement with one text parameter and the given format codes.
    let bind_formats = |param_formats: &[i16], result_formats: &[i16]| {
        let mut body = common::raw::cstrs(&["", ""]);
        body.extend_from_slice(&(param_formats.len() as i16).to_be_bytes());
        for f in param_formats {
            body.extend_from_slice(&f.to_be_bytes());
        }
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1i32.to_be_bytes());
        body.push(b'7');
        body.extend_from_slice(&(result_formats.len() as i16).to_be_bytes());
        for f in result_formats {
            body.extend_from_slice(&f.to_be_bytes());
        }
        msg(b'B', &body)
    };
    let copy_from = || cat(&[parse("", "COPY copied FROM STDIN"), bind(""), execute()]);
    let steps: Vec<(Vec<u8>, u8)> = vec![
        // An error in a batch ended by Flush; the next batch is skipped up to its Sync.
        (
            cat(&[parse("", "SELECT 1/0"), bind(""), execute(), flush()]),
            b'E',
        ),
        (
            cat(&[parse("", "SELECT 2"), bind(""), execute(), sync()]),
            b'Z',
        ),
        (query("SELECT 3"), b'Z'),
        // Extended COPY ended by Flush: the result comes with the Sync after CopyDone.
        (cat(&[copy_from(), flush()]), b'G'),
        (cat(&[copy_data("1\n"), copy_done(), sync()]), b'Z'),
        (query("SELECT 4"), b'Z'),
        // A Sync among extended COPY data is ignored.
        (cat(&[copy_from(), sync()]), b'G'),
        (
            cat(&[
                copy_data("2\n"),
                sync(),
                copy_data("3\n"),
                copy_done(),
                sync(),
            ]),
            b'Z',
        ),
        (query("SELECT 5"), b'Z'),
        // So is one among simple-query COPY data: one ReadyForQuery, not two.
        (query("COPY copied FROM STDIN"), b'G'),
        (
            cat(&[copy_data("4\n"), sync(), copy_data("5\n"), copy_done()]),
            b'Z',
        ),
        (query("SELECT 6"), b'Z'),
        // A Close skipped after an error leaves the statement in place.
        (cat(&[parse("kept", "SELECT 7"), sync()]), b'Z'),
        (
            cat(&[
                parse("", "SELECT 1/0"),
                bind(""),
                execute(),
                close_statement("kept"),
                sync(),
            ]),
            b'Z',
        ),
        (cat(&[bind("kept"), execute(), sync()]), b'Z'),
        // A failed unnamed Parse leaves no unnamed statement to bind.
        (
            cat(&[parse("", "SELECT * FROM no_such_table"), sync()]),
            b'Z',
        ),
        (cat(&[bind(""), execute(), sync()]), b'Z'),
        // One skipped after an error leaves the one before it in place.
        (cat(&[parse("", "SELECT 10"), sync()]), b'Z'),
        (
            cat(&[bind("no_such_statement"), parse("", "SELECT 11"), sync()]),
            b'Z',
        ),
        (cat(&[bind(""), execute(), sync()]), b'Z'),
        // A simple Query ends the unnamed statement, whether it runs on a server, is answered
        // by the proxy (a deferred BEGIN) or fails.
        (cat(&[parse("", "SELECT 14"), sync()]), b'Z'),
        (query("SELECT 15"), b'Z'),
        (cat(&[bind(""), execute(), sync()]), b'Z'),
        (cat(&[parse("", "SELECT 16"), sync()]), b'Z'),
        (query("BEGIN"), b'Z'),
        (cat(&[bind(""), execute(), sync()]), b'Z'),
        (query("ROLLBACK"), b'Z'),
        (cat(&[parse("", "SELECT 17"), sync()]), b'Z'),
        (query("SELECT * FROM no_such_table"), b'Z'),
        (cat(&[bind(""), execute(), sync()]), b'Z'),
        // Bad data in an extended COPY: the server skips what follows up to the next Sync.
        (cat(&[copy_from(), sync()]), b'G'),
        (cat(&[copy_data("x\n"), copy_done()]), b'E'),
        (
            cat(&[parse("", "SELECT 12"), bind(""), execute(), sync()]),
            b'Z',
        ),
        (query("SELECT 13"), b'Z'),
        // Replies the proxy makes itself (CloseComplete) keep their place in a read batch.
        (
            cat(&[
                parse("shut", "SELECT 8"),
                describe_statement("shut"),
                close_statement("shut"),
                sync(),
            ]),
            b'Z',
        ),
        // Bad format codes and counts: the server's errors, and the session goes on.
        (
            cat(&[
                parse("", "SELECT $1::text"),
                bind_formats(&[5], &[]),
                execute(),
                sync(),
            ]),
            b'Z',
        ),
        (
            cat(&[
                parse("", "SELECT $1::text"),
                bind_formats(&[0, 0], &[]),
                execute(),
                sync(),
            ]),
            b'Z',
        ),
        (
            cat(&[
                parse("", "SELECT $1::text"),
                bind_formats(&[0], &[7]),
                execute(),
                sync(),
            ]),
            b'Z',
        ),
        (query("SELECT 9"), b'Z'),
        // The server's error names the statement as the client named it.
        (cat(&[parse("named", "SELECT $1::int"), sync()]), b'Z'),
        (cat(&[bind("named"), execute(), sync()]), b'Z'),
    ];
    answers_as_the_server_until(&env, proxy.addr, &[], &steps).await;
    // The server's error names the statement as the client named it, not as the proxy did.
    let mut s = common::raw::login(proxy.addr).await;
    common::raw::roundtrip(&mut s, &cat(&[parse("mine", "SELECT $1::int"), sync()])).await;
    let reply = common::raw::roundtrip(&mut s, &cat(&[bind("mine"), execute(), sync()])).await;
    let (_, body) = reply.iter().find(|(t, _)| *t == b'E').expect("an error");
    let message = body
        .split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default();
    assert!(message.contains("\"mine\""), "{message}");
    // Both sides copied the same rows, and nothing is left holding the table.
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM copied", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 10);
    admin
        .batch_execute("SET lock_timeout = '5s'; TRUNCATE copied")
        .await
        .unwrap();
}

/// Named statements keep PostgreSQL's rules: a second Parse of a name in use is refused with
/// 42P05 (the first statement stays), a failed Parse leaves the name free, a Parse skipped
/// after an earlier error in its batch creates nothing, and the refusal aborts a transaction.
/// The same exchanges run against the primary directly and through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_names_follow_the_servers_rules() {
    use common::raw::{bind, execute, parse, sync};
    let (env, proxy) = trust_env().await;
    let cat = |parts: &[Vec<u8>]| parts.concat();
    let steps: Vec<Vec<u8>> = vec![
        cat(&[parse("s1", "SELECT 1"), sync()]),
        cat(&[parse("s1", "SELECT 2"), bind("s1"), execute(), sync()]),
        cat(&[bind("s1"), execute(), sync()]),
        cat(&[parse("s2", "SELEC 2"), sync()]),
        cat(&[parse("s2", "SELECT 2"), bind("s2"), execute(), sync()]),
        cat(&[bind("nope"), parse("s3", "SELECT 3"), sync()]),
        cat(&[parse("s3", "SELECT 3"), bind("s3"), execute(), sync()]),
        query("BEGIN"),
        cat(&[bind("s1"), execute(), parse("s1", "SELECT 4"), sync()]),
        query("SELECT 5"),
        query("ROLLBACK"),
        cat(&[bind("s1"), execute(), sync()]),
    ];
    answers_as_the_server(&env, proxy.addr, &[], &steps).await;
}

/// Before login the proxy answers as the server does: a repeated SSLRequest is a protocol
/// error (GSSAPI may still follow a refused SSLRequest), bytes sent behind an SSLRequest before
/// its answer are refused, and so is an empty user name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_mistakes_are_refused_as_on_the_server() {
    const SSL: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    const GSS: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    let (env, proxy) = trust_env().await;
    let direct = std::net::SocketAddr::from(([127, 0, 0, 1], env.node_port(0)));
    let login = startup(&[("user", "postgres"), ("database", "app")]);
    let pipelined = [SSL.as_slice(), &login].concat();
    let nameless = startup(&[("user", ""), ("database", "app")]);
    let app = startup(&[("user", "app"), ("database", "app")]);
    // Each case: what is sent, each part once the answer to the one before has arrived.
    let cases: [(&str, Vec<&[u8]>); 4] = [
        // A server built with GSSAPI answers 'G' where the proxy, which has none, says 'N'.
        (
            "GSSENCRequest after a refused SSLRequest",
            vec![&SSL, &GSS, &app],
        ),
        ("SSLRequest twice", vec![&SSL, &SSL]),
        (
            "a startup packet sent behind an SSLRequest",
            vec![&pipelined],
        ),
        ("empty user", vec![&nameless]),
    ];
    for (i, (what, parts)) in cases.into_iter().enumerate() {
        let mut answers = Vec::new();
        let peers = if i == 0 {
            vec![proxy.addr]
        } else {
            vec![direct, proxy.addr]
        };
        for addr in peers {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            for part in &parts {
                s.write_all(part).await.unwrap();
                // A one-byte answer to an encryption request, else the first message.
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).await.is_err() {
                    got.push("closed".to_string());
                    break;
                }
                if b[0] == b'N' {
                    got.push("N".to_string());
                    if part.len() == 8 {
                        continue;
                    }
                    s.read_exact(&mut b).await.unwrap();
                }
                let mut head = [0u8; 4];
                s.read_exact(&mut head).await.unwrap();
                let mut body = vec![0u8; u32::from_be_bytes(head) as usize - 4];
                s.read_exact(&mut body).await.unwrap();
                got.push(match b[0] {
                    b'E' => format!("E{}", error_code(&body)),
                    other => (other as char).to_string(),
                });
            }
            answers.push(got);
        }
        match answers.as_slice() {
            [proxy] => assert_eq!(proxy, &["N", "N", "R"], "{what}"),
            [server, proxy] => assert_eq!(proxy, server, "{what}: proxy vs server"),
            _ => unreachable!(),
        }
    }
}

/// A startup packet asking for a newer minor version or carrying `_pq_.` protocol options gets
/// NegotiateProtocolVersion first, naming the options not understood, as on the server, and
/// the login goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_options_are_negotiated_as_on_the_server() {
    use common::raw::startup_minor;
    let (env, proxy) = trust_env().await;
    let direct = std::net::SocketAddr::from(([127, 0, 0, 1], env.node_port(0)));
    let user = [("user", "app"), ("database", "app")];
    let with_options = [
        user[0],
        user[1],
        ("_pq_.compression", "on"),
        ("_pq_.x", "1"),
    ];
    let cases: [(&str, Vec<u8>); 3] = [
        ("3.0 with _pq_ options", startup_minor(0, &with_options)),
        ("3.2", startup_minor(2, &user)),
        ("3.2 with _pq_ options", startup_minor(2, &with_options)),
    ];
    for (what, packet) in cases {
        let mut answers = Vec::new();
        for addr in [direct, proxy.addr] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&packet).await.unwrap();
            let mut messages = Vec::new();
            // The server's first message; through the proxy, every one up to ReadyForQuery,
            // as the login must go on after the negotiation.
            loop {
                let mut tag = [0u8; 1];
                s.read_exact(&mut tag).await.unwrap();
                let mut head = [0u8; 4];
                s.read_exact(&mut head).await.unwrap();
                let mut body = vec![0u8; u32::from_be_bytes(head) as usize - 4];
                s.read_exact(&mut body).await.unwrap();
                messages.push((tag[0], body));
                if addr == direct || tag[0] == b'Z' || tag[0] == b'E' {
                    break;
                }
            }
            if addr == proxy.addr {
                let tags: Vec<char> = messages.iter().map(|(t, _)| *t as char).collect();
                assert_eq!(
                    tags.last(),
                    Some(&'Z'),
                    "{what}: the login goes on: {tags:?}"
                );
            }
            answers.push(messages.swap_remove(0));
        }
        assert_eq!(answers[0].0, b'v', "{what}: the server negotiates");
        assert_eq!(
            answers[1], answers[0],
            "{what}: first message, proxy vs server"
        );
    }
}

/// A message that carries no statement (Execute, Describe, Close, Sync, …) longer than the
/// 10,000 bytes PostgreSQL reads for it is refused by the proxy: a server would drop the
/// connection, and the proxy would take that for the server failing, ban it and run the
/// request again on the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_small_messages_are_refused_before_a_server_sees_them() {
    use common::raw::{cstrs, msg, parse, sync};
    let (_env, proxy) = trust_env().await;
    // Execute's length field counts itself, the name, its NUL and the row limit: 10,001.
    let portal = "p".repeat(10_001 - 4 - 1 - 4);
    let bind = {
        let mut body = cstrs(&[&portal, ""]);
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        msg(b'B', &body)
    };
    let execute = {
        let mut body = cstrs(&[&portal]);
        body.extend_from_slice(&0i32.to_be_bytes());
        msg(b'E', &body)
    };
    for _ in 0..3 {
        let mut s = login(proxy.addr).await;
        let batch = [parse("", "SELECT 1"), bind.clone(), execute.clone(), sync()].concat();
        s.write_all(&batch).await.unwrap();
        let got = read_until_ready(&mut s).await;
        let last = got.last().expect("an answer");
        assert_eq!(
            (last.0, error_code(&last.1)),
            (b'E', "08P01".to_string()),
            "{got:?}"
        );
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(0))),
            "the client is closed: {closed:?}"
        );
    }
    for n in proxy.shared.cluster.replicas().iter() {
        assert!(n.is_usable(), "{} banned: {:?}", n.name, n.ban_reason());
        assert_eq!(
            n.errors.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{}",
            n.name
        );
    }
    // The largest such message the server reads still goes through.
    let mut s = login(proxy.addr).await;
    let name = "q".repeat(10_000 - 4 - 1 - 4);
    let mut body = cstrs(&[&name]);
    body.extend_from_slice(&0i32.to_be_bytes());
    let batch = [
        parse("", "SELECT 1"),
        msg(
            b'B',
            &[cstrs(&[&name, ""]), vec![0, 0, 0, 0, 0, 0]].concat(),
        ),
        msg(b'E', &body),
        sync(),
    ]
    .concat();
    s.write_all(&batch).await.unwrap();
    let got = read_until_ready(&mut s).await;
    let tags: Vec<char> = got.iter().map(|m| m.0 as char).collect();
    assert_eq!(tags, ['1', '2', 'D', 'C', 'Z'], "{got:?}");
}

/// A simple Query sent inside an unsynced extended batch runs after the batch's messages, as
/// on the server (pgjdbc's `autosave=always` sends `BEGIN` through the extended protocol, then
/// `SAVEPOINT` as a simple Query), and after an error in the batch it is skipped with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simple_query_inside_a_batch_runs_in_order() {
    use common::raw::{bind, execute, parse, sync};
    let (env, proxy) = trust_env().await;
    let steps: Vec<Vec<u8>> = vec![
        [
            parse("", "BEGIN"),
            bind(""),
            execute(),
            query("SAVEPOINT a"),
        ]
        .concat(),
        [
            parse("", "INSERT INTO t VALUES (42)"),
            bind(""),
            execute(),
            query("ROLLBACK TO SAVEPOINT a"),
        ]
        .concat(),
        query("COMMIT"),
        [bind("nope"), query("SELECT 1"), sync()].concat(),
        query("SELECT count(*) FROM t WHERE id = 42"),
    ];
    let setup = query("CREATE TABLE t (id int)");
    answers_as_the_server(&env, proxy.addr, &setup, &steps).await;
}
