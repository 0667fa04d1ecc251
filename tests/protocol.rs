//! Wire-protocol behaviour through the proxy: COPY, pipelining, errors and recovery, named
//! statements on any backend, authentication (the proxy's own login to a server included,
//! against a fake server), pool limits.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::connect;
use futures_util::{SinkExt, TryStreamExt};
use tokio_postgres::SimpleQueryMessage;

async fn with_table() -> common::Env {
    let env = common::start().await;
    let owner = env.owner().await;
    owner
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    env.caught_up().await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_out_and_fail() {
    let env = with_table().await;
    let c = env.client().await;
    // COPY FROM STDIN (extended protocol in tokio-postgres) lands on the primary.
    let sink = c.copy_in("COPY items FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..1000 {
        data.push_str(&format!("{i}\tname{i}\n"));
    }
    sink.send(Bytes::from(data)).await.unwrap();
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 1000);
    env.caught_up().await;
    // COPY TO STDOUT streams back every row.
    let stream = c.copy_out("COPY items TO STDOUT").await.unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let text: Vec<u8> = chunks.concat();
    assert_eq!(text.iter().filter(|b| **b == b'\n').count(), 1000);
    let stream = c
        .copy_out("COPY (SELECT inet_server_port()) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let port: u16 = String::from_utf8(chunks.concat())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(port, env.node_port(0), "COPY (SELECT) TO STDOUT is a read");
    // Bad COPY data: the error reaches the client, and the session carries on.
    let sink = c.copy_in("COPY items FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22P02"));
    // A query sent in the middle of COPY data ends the COPY with the server's error (it
    // closes that connection: protocol synchronization is lost), as without the proxy, and is
    // not run; the session carries on with another server connection.
    {
        use common::raw::{login, msg, query};
        use tokio::io::AsyncWriteExt;
        let proxy = common::trust_proxy(&env).await;
        let mut s = login(proxy.addr).await;
        s.write_all(&query("COPY items FROM STDIN")).await.unwrap();
        let started = common::raw::read_until(&mut s, |t| t == b'G' || t == b'Z').await;
        assert_eq!(started.last().map(|m| m.0), Some(b'G'));
        let mut bytes = msg(
            b'd',
            b"5000	copied
",
        );
        bytes.extend(query("INSERT INTO items VALUES (5001, 'not run')"));
        s.write_all(&bytes).await.unwrap();
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            common::raw::read_until(&mut s, |t| t == b'Z'),
        )
        .await
        .expect("the COPY ends instead of hanging");
        let err = got.iter().find(|m| m.0 == b'E').expect("an error");
        assert_eq!(common::raw::error_code(&err.1), "08P01");
        let after = common::raw::roundtrip(&mut s, &query("SELECT 1")).await;
        assert!(after.iter().any(|m| m.0 == b'D'), "{after:?}");
        let owner = env.owner().await;
        let n: i64 = owner
            .query_one("SELECT count(*) FROM items WHERE id >= 5000", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "neither the COPY nor the query ran");
    }
    // CopyFail: dropping the sink without finishing aborts the COPY.
    {
        let sink = c
            .copy_in::<_, Bytes>("COPY items FROM STDIN")
            .await
            .unwrap();
        drop(sink);
    }
    let rows = c.query("SELECT count(*) FROM items", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_errors_and_recovery() {
    let env = with_table().await;
    let c = env.client().await;
    // Many queries in flight at once on one connection.
    let futs: Vec<_> = (0..50i32)
        .map(|i| {
            let c = &c;
            async move {
                let r = c.query_one("SELECT $1::int + 1", &[&i]).await.unwrap();
                r.get::<_, i32>(0)
            }
        })
        .collect();
    let got = futures_util::future::join_all(futs).await;
    assert_eq!(got, (1..51).collect::<Vec<i32>>());
    // An error in the extended protocol, then the connection keeps working.
    let err = c.query("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"));
    assert_eq!(
        c.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0),
        2
    );
    // An error inside a transaction: aborted until ROLLBACK, then fine.
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO items VALUES (1, 'a')", &[])
        .await
        .unwrap();
    assert!(
        c.execute("INSERT INTO items VALUES (1, 'dup')", &[])
            .await
            .is_err()
    );
    let err = c.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"));
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        c.query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    // Multi-statement simple query, empty query, notices.
    let msgs = c.simple_query("SELECT 1; SELECT 2").await.unwrap();
    let rows = msgs
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(rows, 2);
    c.simple_query("").await.unwrap();
    c.batch_execute("DO $$BEGIN RAISE NOTICE 'hello'; END$$")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_follow_the_client_to_any_backend() {
    let env = with_table().await;
    let c = env.client().await;
    let read = c
        .prepare("SELECT inet_server_port(), $1::int * 2")
        .await
        .unwrap();
    let write = c
        .prepare("INSERT INTO items VALUES ($1, 'p') RETURNING inet_server_port()")
        .await
        .unwrap();
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..20i32 {
        let row = c.query_one(&read, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(1), i * 2);
        ports.insert(row.get::<_, i32>(0) as u16);
        let w = c.query_one(&write, &[&i]).await.unwrap();
        assert_eq!(w.get::<_, i32>(0) as u16, env.node_port(0));
    }
    // Prepared once, executed on both replicas (and on the primary when a read right after
    // this session's own write found no replica caught up yet). Once the replicas have
    // replayed every write, reads spread over both whatever the machine's load.
    env.caught_up().await;
    for i in 0..20i32 {
        let row = c.query_one(&read, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(1), i * 2);
        ports.insert(row.get::<_, i32>(0) as u16);
    }
    assert!(
        ports.contains(&env.node_port(1)) && ports.contains(&env.node_port(2)),
        "{ports:?}"
    );
    // A second client with the same statement text shares backend copies safely.
    let c2 = env.client().await;
    let read2 = c2
        .prepare("SELECT inet_server_port(), $1::int * 2")
        .await
        .unwrap();
    assert_eq!(
        c2.query_one(&read2, &[&5i32])
            .await
            .unwrap()
            .get::<_, i32>(1),
        10
    );
    drop(read);
    assert_eq!(
        c.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_methods_and_wrong_passwords() {
    let env = common::start().await;
    let bad = format!(
        "host=127.0.0.1 port={} user=app password=wrong dbname=app",
        env.port()
    );
    let err = common::connect_err(&bad).await;
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
    let unknown = format!(
        "host=127.0.0.1 port={} user=nobody password=x dbname=app",
        env.port()
    );
    let err = common::connect_err(&unknown).await;
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
    assert!(
        env.proxy.shared.pools.all().is_empty(),
        "a failed login must not touch a backend"
    );

    for method in ["md5", "trust"] {
        let cfg = env.config.replace(
            "method = \"scram-sha-256\"",
            &format!("method = \"{method}\""),
        );
        let proxy = common::proxy_for(&cfg).await;
        let port = proxy.addr.port();
        let ok = connect(&format!(
            "host=127.0.0.1 port={port} user=app password={} dbname=app",
            common::PASSWORD
        ))
        .await;
        assert_eq!(
            ok.query_one("SELECT 1", &[])
                .await
                .unwrap()
                .get::<_, i32>(0),
            1
        );
        if method == "md5" {
            let bad = format!("host=127.0.0.1 port={port} user=app password=wrong dbname=app");
            let err = common::connect_err(&bad).await;
            assert_eq!(err.code().map(|c| c.code()), Some("28P01"));
        }
        proxy.stop().await;
    }
}

/// The server-first-message of a SCRAM login as `user`, and its attributes.
async fn scram_server_first(addr: std::net::SocketAddr, user: &str) -> Vec<(char, String)> {
    use common::raw::{cstrs, msg, read_until, startup};
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&startup(&[("user", user), ("database", "app")]))
        .await
        .unwrap();
    let asked = read_until(&mut s, |_| true).await;
    assert!(
        matches!(asked.as_slice(), [(b'R', b)] if b[3] == 10),
        "{asked:?}"
    );
    // libpq's client-first-message: no channel binding, the user name left to the startup.
    let first = b"n,,n=,r=rOprNGfwEbeRWgbNEkqO";
    let mut body = cstrs(&["SCRAM-SHA-256"]);
    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
    body.extend_from_slice(first);
    s.write_all(&msg(b'p', &body)).await.unwrap();
    let reply = read_until(&mut s, |_| true).await;
    let [(b'R', body)] = reply.as_slice() else {
        panic!("{user}: {reply:?}");
    };
    assert_eq!(body[..4], 11i32.to_be_bytes(), "{user}: SASLContinue");
    std::str::from_utf8(&body[4..])
        .unwrap()
        .split(',')
        .map(|a| {
            let (k, v) = a.split_once('=').unwrap();
            (k.chars().next().unwrap(), v.to_string())
        })
        .collect()
}

/// A user name the proxy does not know cannot be told from a configured one by its SCRAM
/// exchange: its salt is the same on every attempt, as a configured user's is, differs from
/// other names' as theirs do, and the server-first-message has the same attributes, salt
/// length and iteration count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_get_a_salt_like_configured_ones() {
    let env = common::start().await;
    let addr = env.proxy.addr;
    let salt = |m: &[(char, String)]| m.iter().find(|a| a.0 == 's').unwrap().1.clone();
    let known = scram_server_first(addr, "app").await;
    let unknown = scram_server_first(addr, "nobody").await;
    assert_eq!(salt(&scram_server_first(addr, "app").await), salt(&known));
    assert_eq!(
        salt(&scram_server_first(addr, "nobody").await),
        salt(&unknown),
        "an unknown user's salt changes from one attempt to the next"
    );
    let other = scram_server_first(addr, "nobody2").await;
    assert_ne!(salt(&other), salt(&unknown));
    assert_ne!(salt(&known), salt(&unknown));
    // Same attributes in the same order, values of the same length (the nonce too), and the
    // same iteration count.
    let shape = |m: &[(char, String)]| {
        m.iter()
            .map(|(k, v)| {
                (
                    *k,
                    if *k == 'i' {
                        v.clone()
                    } else {
                        v.len().to_string()
                    },
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&unknown), shape(&known));
    assert_eq!(shape(&other), shape(&known));
    assert_eq!(
        known.iter().map(|a| a.0).collect::<String>(),
        "rsi",
        "{known:?}"
    );
}

/// The orders in which a server (or an impostor on the path) may answer the proxy's login.
#[derive(Clone, Copy, Debug)]
enum FakeLogin {
    /// AuthenticationOk at once, as under `trust`.
    Trust,
    /// The SCRAM exchange as PostgreSQL runs it.
    Scram,
    /// SCRAM asked for, then AuthenticationOk with no exchange at all.
    SaslThenOk,
    /// SCRAM asked for, then ReadyForQuery without even AuthenticationOk.
    SaslThenReady,
    /// SCRAM up to the client's proof, then AuthenticationOk instead of SASLFinal.
    OkBeforeFinal,
    /// The whole exchange, with a server signature that does not verify.
    ForgedFinal,
    /// The whole exchange, then ReadyForQuery without AuthenticationOk.
    FinalThenReady,
}

/// Serves one proxy login on a port of its own, answering as `script` says.
async fn fake_server(script: FakeLogin) -> (u16, tokio::task::JoinHandle<()>) {
    use causeway::protocol::parse_sasl_initial;
    use common::raw::msg;
    use pgwire::api::auth::sasl::scram::{ScramSecret, ScramServerAuth, gen_salted_password};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read(s: &mut tokio::net::TcpStream, tagged: bool) -> Vec<u8> {
        if tagged {
            assert_eq!(s.read_u8().await.unwrap(), b'p');
        }
        let len = s.read_u32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        body
    }
    let auth = |code: i32, data: &[u8]| msg(b'R', &[&code.to_be_bytes()[..], data].concat());
    let mut ready = auth(0, &[]);
    ready.extend(msg(
        b'K',
        &[7i32.to_be_bytes(), 9i32.to_be_bytes()].concat(),
    ));
    ready.extend(msg(b'Z', b"I"));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        read(&mut s, false).await;
        if let FakeLogin::Trust = script {
            let _ = s.write_all(&ready).await;
            return tokio::time::sleep(Duration::from_secs(5)).await;
        }
        s.write_all(&auth(10, b"SCRAM-SHA-256\0\0")).await.unwrap();
        let initial = read(&mut s, true).await;
        let reply = match script {
            FakeLogin::SaslThenOk => ready,
            FakeLogin::SaslThenReady => msg(b'Z', b"I"),
            _ => {
                let (_, first) = parse_sasl_initial(&initial).unwrap();
                let salt = b"fake-server-salt".to_vec();
                let secret = ScramSecret::SaltedPassword {
                    salted_password: gen_salted_password(common::PASSWORD, &salt, 4096),
                    salt,
                };
                let (server_first, waiting) = ScramServerAuth::new()
                    .on_client_first_message_with_secret(first, secret)
                    .unwrap();
                s.write_all(&auth(11, server_first.as_bytes()))
                    .await
                    .unwrap();
                let client_final = read(&mut s, true).await;
                // The client's proof checks out: this server does know the password.
                let mut server_final = waiting.on_client_final_message(&client_final).unwrap();
                if let FakeLogin::ForgedFinal = script {
                    let first = if server_final.as_bytes()[2] == b'A' {
                        "B"
                    } else {
                        "A"
                    };
                    server_final.replace_range(2..3, first);
                }
                let mut out = auth(12, server_final.as_bytes());
                match script {
                    FakeLogin::OkBeforeFinal => ready,
                    FakeLogin::FinalThenReady => {
                        out.extend(msg(b'Z', b"I"));
                        out
                    }
                    _ => {
                        out.extend(ready);
                        out
                    }
                }
            }
        };
        let _ = s.write_all(&reply).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    (port, server)
}

/// Once SCRAM starts, the proxy logs in only after the server's signature proved that it
/// knows the password; an impostor ending the exchange early is refused, naming the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_login_requires_the_servers_scram_proof() {
    use causeway::{cluster::Cluster, config::Config, pool, tls::Tls};
    use std::sync::Arc;
    for (script, accepted) in [
        (FakeLogin::Trust, true),
        (FakeLogin::Scram, true),
        (FakeLogin::SaslThenOk, false),
        (FakeLogin::SaslThenReady, false),
        (FakeLogin::OkBeforeFinal, false),
        (FakeLogin::ForgedFinal, false),
        (FakeLogin::FinalThenReady, false),
    ] {
        let (port, server) = fake_server(script).await;
        let cfg = Config::from_toml(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nmethod = \"trust\"\n\
             [[users]]\nname = \"app\"\npassword = \"{}\"\n\
             [primary]\nhost = \"127.0.0.1\"\nport = {port}\n",
            common::PASSWORD
        ))
        .unwrap();
        let tls = Arc::new(Tls::from_config(&cfg).unwrap());
        let cluster = Cluster::from_config(&cfg, Arc::clone(&tls));
        let login = pool::Login {
            user: "app".into(),
            password: common::PASSWORD.into(),
            database: "app".into(),
        };
        let node = cluster.primary();
        let r =
            pool::BackendConn::connect(node, &login, Duration::from_secs(5), 1 << 20, &tls).await;
        server.abort();
        match r {
            Ok(conn) => {
                assert!(accepted, "{script:?}: login accepted");
                assert_eq!((conn.pid, conn.secret), (7, 9));
            }
            Err(e) => {
                eprintln!("{script:?}: {e}");
                assert!(!accepted, "{script:?}: {e}");
                assert!(e.to_string().contains(&node.name), "{script:?}: {e}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_times_out_with_53300_naming_the_pool() {
    let env = with_table().await;
    let cfg = env.config.replace(
        "[primary]",
        "[pool]\nprimary_max = 1\nacquire_timeout_ms = 300\n\n[primary]",
    );
    let proxy = common::proxy_for(&cfg).await;
    let holder = env.client_via(&proxy).await;
    holder
        .batch_execute("BEGIN; INSERT INTO items VALUES (1, 'x')")
        .await
        .unwrap();
    let waiter = env.client_via(&proxy).await;
    let started = std::time::Instant::now();
    let err = waiter
        .execute("INSERT INTO items VALUES (2, 'y')", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("53300"));
    let msg = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(msg.contains("primary/app/app"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Reads still flow from the replicas, and the waiter works once the holder commits.
    assert_eq!(
        waiter
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    holder.batch_execute("COMMIT").await.unwrap();
    waiter
        .execute("INSERT INTO items VALUES (2, 'y')", &[])
        .await
        .unwrap();
}

/// Everything a client sent before Terminate runs, as on a server, even when the client closes
/// its socket at once and never reads a reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_before_terminate_all_run() {
    use common::raw::{bind, execute, login, msg, parse, query, sync};
    use tokio::io::AsyncWriteExt;
    let env = with_table().await;
    let owner = env.owner().await;
    let proxy = common::trust_proxy(&env).await;
    let mut s = login(proxy.addr).await;
    let mut bytes = query("INSERT INTO items VALUES (1, 'simple')");
    bytes.extend(query(
        "INSERT INTO items SELECT 2, 'slow' FROM pg_sleep(0.3)",
    ));
    bytes.extend(parse("", "INSERT INTO items VALUES (3, 'extended')"));
    bytes.extend(bind(""));
    bytes.extend(execute());
    bytes.extend(sync());
    bytes.extend(msg(b'X', &[]));
    // Anything after Terminate is not read, as by a server.
    bytes.extend(query("INSERT INTO items VALUES (4, 'after')"));
    s.write_all(&bytes).await.unwrap();
    drop(s);
    let count = "SELECT count(*) FROM items";
    let mut n = 0;
    for _ in 0..100 {
        n = owner.query_one(count, &[]).await.unwrap().get::<_, i64>(0);
        if n == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(n, 3, "requests queued before Terminate were dropped");
    let ids: Vec<i32> = owner
        .query("SELECT id FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    // Terminate in the middle of COPY data: the COPY fails, as on a server, and the session
    // ends instead of waiting for data that will never come.
    let mut s = login(proxy.addr).await;
    let mut bytes = query("COPY items (id, name) FROM STDIN");
    bytes.extend(msg(b'd', b"5\tcopied\n"));
    bytes.extend(msg(b'X', &[]));
    s.write_all(&bytes).await.unwrap();
    let got = common::raw::read_until(&mut s, |_| false).await;
    // (A ParameterStatus with the session's token may come before the ReadyForQuery.)
    let tags: String = got
        .iter()
        .map(|m| m.0 as char)
        .filter(|&t| t != 'S')
        .collect();
    assert_eq!(tags, "GEZ", "then the connection closes");
    let n: i64 = owner.query_one(count, &[]).await.unwrap().get(0);
    assert_eq!(n, 3);
}
