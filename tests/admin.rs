//! The admin endpoint and console against a real primary and two replicas: known traffic
//! shows up as exact counts in `/stats`, `/metrics` and `SHOW STATS`; draining a replica stops
//! its reads; the token rule; health and readiness.

mod common;

use std::net::SocketAddr;

use causeway::config::Config;
use causeway::launcher::ClusterOptions;
use common::http;
use serde_json::Value;

const N_READS: usize = 12;
const M_WRITES: usize = 5;

fn admin(env: &common::Env) -> SocketAddr {
    env.proxy.admin_addr.expect("admin endpoint enabled")
}

/// Polls `/ready` for up to ten seconds.
async fn wait_ready(addr: SocketAddr) -> bool {
    for _ in 0..200 {
        if http::get(addr, "/ready").await.status == 200 {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

async fn stats(addr: SocketAddr) -> Value {
    let r = http::get(addr, "/stats").await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn backend<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name} in {s}"))
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn reason(s: &Value, r: &str) -> u64 {
    num(&s["routing"]["by_reason"][r])
}

/// The value of one Prometheus sample, by its exact series text.
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{metrics}")) as u64
}

/// `SHOW STATS` on the admin console as a map.
async fn console_stats(env: &common::Env) -> std::collections::HashMap<String, String> {
    let console = common::connect(&format!(
        "host=127.0.0.1 port={} user=app password={} dbname=causeway",
        env.port(),
        common::PASSWORD
    ))
    .await;
    let mut map = std::collections::HashMap::new();
    for m in console.simple_query("SHOW STATS").await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            map.insert(
                r.get(0).unwrap().to_string(),
                r.get(1).unwrap_or("").to_string(),
            );
        }
    }
    map
}

#[tokio::test]
async fn known_traffic_shows_as_exact_counts_everywhere() {
    let env = common::start().await;
    let addr = admin(&env);
    let owner = env.owner().await;
    owner
        .batch_execute(
            "CREATE TABLE admin_t (id int PRIMARY KEY, v int); INSERT INTO admin_t VALUES (1, 0)",
        )
        .await
        .unwrap();
    env.caught_up().await;
    let before = stats(addr).await;

    // Separate sessions, so read-your-writes sends no reader to the primary.
    let reader = env.client().await;
    let writer = env.client().await;
    for _ in 0..N_READS {
        reader
            .simple_query("SELECT v FROM admin_t WHERE id = 1")
            .await
            .unwrap();
    }
    for i in 0..M_WRITES {
        // One of them in a transaction: its BEGIN and COMMIT are neither reads nor writes.
        let tx = i == 0;
        if tx {
            writer.simple_query("BEGIN").await.unwrap();
        }
        writer
            .simple_query("UPDATE admin_t SET v = v + 1 WHERE id = 1")
            .await
            .unwrap();
        if tx {
            writer.simple_query("SAVEPOINT s").await.unwrap();
            writer.simple_query("COMMIT").await.unwrap();
        }
    }
    // A forced fallback: a read pinned to the primary by a hint.
    reader
        .simple_query("/* causeway:primary */ SELECT v FROM admin_t WHERE id = 1")
        .await
        .unwrap();

    let after = stats(addr).await;
    let delta = |f: &dyn Fn(&Value) -> u64| f(&after) - f(&before);
    let replica_reads =
        |s: &Value| num(&backend(s, "replica1")["reads"]) + num(&backend(s, "replica2")["reads"]);
    assert_eq!(delta(&replica_reads), N_READS as u64);
    assert_eq!(
        delta(&|s| num(&backend(s, "primary")["writes"])),
        M_WRITES as u64
    );
    assert_eq!(delta(&|s| num(&backend(s, "primary")["reads"])), 1);
    assert_eq!(
        delta(&|s| num(&backend(s, "primary")["queries"])),
        M_WRITES as u64 + 3,
        "the UPDATEs, the hinted read, SAVEPOINT and COMMIT"
    );
    assert_eq!(delta(&|s| reason(s, "classified_read")), N_READS as u64);
    assert_eq!(delta(&|s| reason(s, "classified_write")), M_WRITES as u64);
    assert_eq!(delta(&|s| reason(s, "hint")), 1);
    assert_eq!(delta(&|s| num(&s["routing"]["writes"])), M_WRITES as u64);
    assert_eq!(after["version"], 1);
    assert!(num(&after["clients"]["connected"]) >= 2, "{after}");
    assert!(after["routing"]["read_write_ratio"].as_f64().unwrap() > 0.0);
    assert!(num(&after["classifier"]["cache_hits"]) >= (N_READS - 1) as u64);
    assert!(num(&after["consistency"]["tokens"]) >= M_WRITES as u64);
    let primary = backend(&after, "primary");
    assert_eq!(primary["role"], "primary");
    assert_eq!(primary["healthy"], true);
    assert!(primary["lsn"].as_str().unwrap().contains('/'));
    let r1 = backend(&after, "replica1");
    assert!(r1["lag_bytes"].is_u64() && r1["lag_ms"].is_u64(), "{r1}");
    let pool = &primary["pools"][0];
    assert_eq!(
        (pool["user"].as_str(), pool["database"].as_str()),
        (Some("app"), Some("app"))
    );
    assert!(num(&pool["open"]) >= 1);
    // Latency: every write was timed in the commit class (autocommit writes commit alone).
    let commit = &after["latency"]["by_class"]["commit"];
    assert!(num(&commit["count"]) >= M_WRITES as u64, "{commit}");
    let (p50, p99) = (
        commit["p50_ms"].as_f64().unwrap(),
        commit["p99_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99, "{commit}");
    assert_eq!(
        num(&after["latency"]["by_backend"]["primary"]["count"]),
        num(&primary["latency"]["count"])
    );

    // The same numbers in Prometheus form.
    let m = http::get(addr, "/metrics").await;
    assert_eq!(m.status, 200);
    assert!(
        m.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = m.body;
    assert_eq!(
        sample(
            &text,
            "causeway_queries_total{backend=\"primary\",route=\"write\"}"
        ),
        num(&primary["writes"])
    );
    assert_eq!(
        sample(
            &text,
            "causeway_queries_total{backend=\"replica1\",route=\"read\"}"
        ) + sample(
            &text,
            "causeway_queries_total{backend=\"replica2\",route=\"read\"}"
        ),
        replica_reads(&after)
    );
    assert_eq!(
        sample(&text, "causeway_routing_decisions_total{reason=\"hint\"}"),
        reason(&after, "hint")
    );
    assert!(
        text.contains("causeway_request_duration_seconds_bucket{le=\"+Inf\",backend=\"primary\",class=\"commit\"}")
            || text.contains("causeway_request_duration_seconds_bucket{backend=\"primary\",class=\"commit\",le=\"+Inf\"}"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"));

    // And on the console.
    let c = console_stats(&env).await;
    assert_eq!(
        c["routing.by_reason.classified_read"],
        reason(&after, "classified_read").to_string()
    );
    assert_eq!(
        c["backends.primary.writes"],
        num(&primary["writes"]).to_string()
    );
    assert_eq!(c["backends.replica1.role"], "replica");
}

#[tokio::test]
async fn a_drained_replica_gets_no_reads_until_undrained() {
    let env = common::start().await;
    let addr = admin(&env);
    let r = http::post(addr, "/replicas/replica2/drain").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["drained"], true);
    let s = stats(addr).await;
    let r2 = backend(&s, "replica2");
    assert_eq!(
        (r2["drained"].clone(), r2["healthy"].clone()),
        (Value::Bool(true), Value::Bool(false))
    );
    let before = num(&r2["reads"]);
    let before_r1 = num(&backend(&s, "replica1")["reads"]);

    let reader = env.client().await;
    for _ in 0..10 {
        reader.simple_query("SELECT 1").await.unwrap();
    }
    let s = stats(addr).await;
    assert_eq!(
        num(&backend(&s, "replica2")["reads"]),
        before,
        "drained replica read"
    );
    assert_eq!(num(&backend(&s, "replica1")["reads"]), before_r1 + 10);

    assert_eq!(
        http::post(addr, "/replicas/replica2/undrain").await.status,
        200
    );
    assert_eq!(backend(&stats(addr).await, "replica2")["drained"], false);
    for _ in 0..10 {
        reader.simple_query("SELECT 1").await.unwrap();
    }
    assert!(num(&backend(&stats(addr).await, "replica2")["reads"]) > before);

    assert_eq!(http::post(addr, "/replicas/nope/drain").await.status, 404);
    assert_eq!(
        http::post(addr, "/replicas/primary/drain").await.status,
        404
    );
    // The console drains too, and /stats shows it.
    let console = common::connect(&format!(
        "host=127.0.0.1 port={} user=app password={} dbname=causeway",
        env.port(),
        common::PASSWORD
    ))
    .await;
    console.simple_query("DRAIN replica1").await.unwrap();
    assert_eq!(backend(&stats(addr).await, "replica1")["drained"], true);
    console.simple_query("undrain replica1;").await.unwrap();
    assert_eq!(backend(&stats(addr).await, "replica1")["drained"], false);
}

async fn one_replica() -> common::Env {
    let opts = ClusterOptions {
        replicas: 1,
        ..Default::default()
    };
    common::start_with(opts, |_| {}).await
}

fn drained(s: &Value) -> &Value {
    &backend(s, "replica1")["drained"]
}

/// A page in the operator's browser may POST to the endpoint without a preflight; its
/// `Origin` or `Sec-Fetch-Site` gives it away, and nothing changes. Tools that send no
/// `Origin`, and the endpoint's own origin, still drain.
#[tokio::test]
async fn a_post_from_another_origin_changes_nothing() {
    let env = one_replica().await;
    let addr = admin(&env);
    let attacker = [("Origin", "http://attacker.example")];
    let cross_site = [
        ("Origin", "http://attacker.example"),
        ("Sec-Fetch-Site", "cross-site"),
    ];
    let fetch_site_only = [("Sec-Fetch-Site", "cross-site")];
    // Another web app on this machine is another origin too.
    let next_door = [
        ("Origin", "http://127.0.0.1:8080"),
        ("Sec-Fetch-Site", "same-site"),
    ];
    for headers in [&attacker[..], &cross_site, &fetch_site_only, &next_door] {
        for path in ["/replicas/replica1/drain", "/reload"] {
            let r = http::request_with(addr, "POST", path, headers).await;
            assert_eq!(r.status, 403, "POST {path} with {headers:?}: {}", r.body);
        }
        assert_eq!(drained(&stats(addr).await), false, "{headers:?}");
    }

    let own = format!("http://{addr}");
    let same_origin = [("Origin", own.as_str()), ("Sec-Fetch-Site", "same-origin")];
    let r = http::request_with(addr, "POST", "/replicas/replica1/drain", &same_origin).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(drained(&stats(addr).await), true);
    let r = http::post(addr, "/replicas/replica1/undrain").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(drained(&stats(addr).await), false);
}

/// A DNS-rebound page reaches the endpoint under the attacker's host name and is refused;
/// the dashboard opened at 127.0.0.1 or localhost loads, and so do its own fetches.
#[tokio::test]
async fn a_foreign_host_is_refused_and_the_dashboard_still_loads() {
    let env = one_replica().await;
    let addr = admin(&env);
    let port = addr.port();
    for host in [
        "attacker.example".to_string(),
        format!("attacker.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
    ] {
        for path in ["/stats", "/", "/history", "/metrics"] {
            let r = http::request_with(addr, "GET", path, &[("Host", &host)]).await;
            assert_eq!(r.status, 403, "GET {path} for Host {host}: {}", r.body);
        }
    }

    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        // What Chromium sends when the page is opened, then with the page's fetches.
        let opened = [
            ("Host", host.as_str()),
            ("Sec-Fetch-Site", "none"),
            ("Sec-Fetch-Mode", "navigate"),
        ];
        let page = http::request_with(addr, "GET", "/", &opened).await;
        assert_eq!(page.status, 200, "page at {host}: {}", page.body);
        assert!(page.body.contains("<title>Causeway</title>"), "{host}");
        let referer = format!("http://{host}/");
        let fetched = [
            ("Host", host.as_str()),
            ("Sec-Fetch-Site", "same-origin"),
            ("Sec-Fetch-Mode", "cors"),
            ("Referer", referer.as_str()),
        ];
        for path in ["/stats", "/history"] {
            let r = http::request_with(addr, "GET", path, &fetched).await;
            assert_eq!(r.status, 200, "{path} from the page at {host}: {}", r.body);
            r.json();
        }
    }
}

#[tokio::test]
async fn the_token_guards_everything_but_health() {
    let env = common::start_with(ClusterOptions::default(), |c| {
        c.push_str("\n[admin]\ntoken = \"s3cret\"\nusers = [\"app\"]\n");
        *c = c.replacen("[admin]\nusers = [\"app\"]\n", "", 1);
    })
    .await;
    let addr = admin(&env);
    for path in ["/stats", "/metrics", "/"] {
        let r = http::get(addr, path).await;
        assert_eq!(r.status, 401, "{path} without a token");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(
            http::request(addr, "GET", path, Some("wrong")).await.status,
            401
        );
        assert_eq!(
            http::request(addr, "GET", path, Some("s3cret"))
                .await
                .status,
            200,
            "{path}"
        );
    }
    assert_eq!(
        http::post(addr, "/replicas/replica1/drain").await.status,
        401
    );
    assert_eq!(http::get(addr, "/?token=s3cret").await.status, 200);
    assert_eq!(
        http::get(addr, "/stats?token=s3cret").await.status,
        401,
        "token in a URL only for the page"
    );
    assert_eq!(http::get(addr, "/health").await.status, 200);
    assert!(wait_ready(addr).await, "never ready");
    // Authenticated requests may come under any name (a proxy in front, a DNS name).
    let named = [
        ("Host", "admin.example.com"),
        ("Authorization", "Bearer s3cret"),
    ];
    let r = http::request_with(addr, "GET", "/stats", &named).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // A non-loopback admin address needs a token, and start-up says so.
    let open = env.config.replace(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"0.0.0.0:0\"",
    );
    let without = open.replace("token = \"s3cret\"", "");
    let err = Config::from_toml(&without).unwrap_err().to_string();
    assert!(
        err.contains("server.admin_listen") && err.contains("admin.token"),
        "{err}"
    );
    assert!(Config::from_toml(&open).is_ok());
}

#[tokio::test]
async fn ready_only_while_the_primary_is_reachable() {
    let env = common::start().await;
    let addr = admin(&env);
    assert!(wait_ready(addr).await, "never ready");
    // A proxy whose primary is nowhere is alive but not ready.
    let dead = common::proxy_for(&env.config.replacen(
        &format!("port = {}", env.cluster.primary.port),
        "port = 9",
        1,
    ))
    .await;
    let dead_admin = dead.admin_addr.unwrap();
    assert_eq!(http::get(dead_admin, "/health").await.status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let r = http::get(dead_admin, "/ready").await;
    assert_eq!(r.status, 503, "{}", r.body);
    dead.stop().await;
}

#[tokio::test]
async fn console_is_for_admin_users_and_answers_show_commands() {
    let env = common::start().await;
    let console_info = format!(
        "host=127.0.0.1 port={} user=app password={} dbname=causeway",
        env.port(),
        common::PASSWORD
    );
    let console = common::connect(&console_info).await;
    let app = env.client().await;
    app.simple_query("SELECT 1").await.unwrap();

    let rows =
        |msgs: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<tokio_postgres::SimpleQueryRow> {
            msgs.into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                    _ => None,
                })
                .collect()
        };
    let pools = rows(console.simple_query("SHOW POOLS").await.unwrap());
    assert!(
        pools
            .iter()
            .any(|r| r.get("backend") == Some("replica1") || r.get("backend") == Some("replica2"))
    );
    assert_eq!(pools.len() % 5, 0, "one row per pool and class");
    let replicas = rows(console.simple_query("show replicas;").await.unwrap());
    let names: Vec<_> = replicas
        .iter()
        .map(|r| r.get("name").unwrap().to_string())
        .collect();
    assert_eq!(names, ["primary", "replica1", "replica2"]);
    let clients = rows(console.simple_query("SHOW CLIENTS").await.unwrap());
    let dbs: Vec<_> = clients
        .iter()
        .map(|r| r.get("database").unwrap().to_string())
        .collect();
    assert!(
        dbs.contains(&"app".to_string()) && dbs.contains(&"causeway".to_string()),
        "{dbs:?}"
    );
    let config = rows(console.simple_query("SHOW CONFIG").await.unwrap());
    let get = |k: &str| {
        config
            .iter()
            .find(|r| r.get("key") == Some(k))
            .and_then(|r| r.get("value"))
            .map(str::to_string)
    };
    assert_eq!(get("pool.primary_max").as_deref(), Some("20"));
    assert_eq!(get("users.app.password").as_deref(), Some("<redacted>"));

    // The session's own views answer on the console as on a data connection.
    for (name, first) in [("stats", "stat"), ("pools", "pool")] {
        let sql = format!("SHOW causeway.{name}");
        let here = rows(console.simple_query(&sql).await.unwrap());
        let there = rows(app.simple_query(&sql).await.unwrap());
        assert!(!here.is_empty(), "{sql}");
        assert_eq!(here[0].columns().len(), there[0].columns().len(), "{sql}");
        assert_eq!(here[0].columns()[0].name(), first, "{sql}");
    }
    let err = console
        .simple_query("SHOW causeway.nothing")
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42704");
    let err = console.simple_query("SHOW NOTHING").await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42704");
    let err = console.simple_query("DROP TABLE x").await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42601");
    let err = console.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "0A000");
    // Still usable after the refused extended query.
    assert!(!rows(console.simple_query("SHOW HELP").await.unwrap()).is_empty());

    // Not an admin user: refused at login.
    let env2 = common::start_with(ClusterOptions::default(), |c| {
        *c = c.replacen("users = [\"app\"]", "users = []", 1);
    })
    .await;
    let err = common::connect_err(&format!(
        "host=127.0.0.1 port={} user=app password={} dbname=causeway",
        env2.port(),
        common::PASSWORD
    ))
    .await;
    assert_eq!(err.code().unwrap().code(), "28000", "{err}");
}

#[tokio::test]
async fn an_idle_console_does_not_hold_up_shutdown() {
    let mut env = common::start().await;
    let proxy = std::mem::replace(&mut env.proxy, common::proxy_for(&env.config).await);
    let console = common::connect(&format!(
        "host=127.0.0.1 port={} user=app password={} dbname=causeway",
        proxy.addr.port(),
        common::PASSWORD
    ))
    .await;
    console.simple_query("SHOW POOLS").await.unwrap();
    let t = std::time::Instant::now();
    proxy.shutdown(std::time::Duration::from_secs(20)).await;
    assert!(
        t.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );
    assert!(console.simple_query("SHOW POOLS").await.is_err());
}

/// Whether the proxy closes `s` (EOF or reset) within `wait`, whatever it sends first.
async fn closed_by_proxy(mut s: tokio::net::TcpStream, wait: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 256];
    let read = tokio::time::timeout(wait, async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    read.await.is_ok()
}

/// `GET /health` on a new connection: its status, or `None` when the connection is closed
/// without an answer or none comes within `wait`.
async fn health_within(addr: SocketAddr, wait: std::time::Duration) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw);
        text.lines().next()?.split(' ').nth(1)?.parse().ok()
    };
    tokio::time::timeout(wait, ask).await.ok().flatten()
}

/// Sockets on the admin port cannot linger: one that never sends a whole request head, or
/// sits idle after a response, is closed after the header timeout, while the database port
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_are_bounded() {
    use tokio::io::AsyncWriteExt;
    let env = common::start().await;
    let addr = admin(&env);
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let kept = kept_alive(addr).await;
    let c = env.client().await;
    c.simple_query("SELECT 1").await.unwrap();
    let wait = std::time::Duration::from_secs(15);
    let closed =
        futures_util::future::join_all([half, silent, kept].map(|s| closed_by_proxy(s, wait)))
            .await;
    assert_eq!(
        closed, [true; 3],
        "closed by the header timeout: half-sent head, silent, kept alive"
    );
    assert_eq!(http::get(addr, "/health").await.status, 200);
}

/// A keep-alive connection that has had its answer to `GET /health` and waits for more.
async fn kept_alive(addr: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\nok\n") {
        let mut b = [0u8; 512];
        let n = s.read(&mut b).await.unwrap();
        assert_ne!(n, 0, "keep-alive answer cut short");
        answer.extend_from_slice(&b[..n]);
    }
    s
}

/// Idle sockets cannot lock the probes out. Past the connection cap a new connection takes
/// the place of the one idle longest (silent since it connected, holding half a request head,
/// or waiting between requests), so `/health` answers at once however many are opened, time
/// after time, and the cap still holds: the connections that made room are closed by the
/// proxy, oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_make_room_for_probes() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    const CAP: usize = 64;
    let env = common::start().await;
    let addr = admin(&env);
    // Every socket opened, named, in the order it went idle.
    let mut idle: Vec<(String, TcpStream)> = Vec::new();
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    idle.push(("half-sent head".into(), half));
    for i in 0..CAP / 2 - 1 {
        idle.push((
            format!("silent {i}"),
            TcpStream::connect(addr).await.unwrap(),
        ));
    }
    // A keep-alive connection goes idle when its answer is written.
    idle.push(("kept alive".into(), kept_alive(addr).await));
    for i in CAP / 2 - 1..CAP - 2 {
        idle.push((
            format!("silent {i}"),
            TcpStream::connect(addr).await.unwrap(),
        ));
    }
    assert_eq!(idle.len(), CAP);
    assert_eq!(
        health_within(addr, Duration::from_secs(2)).await,
        Some(200),
        "/health unanswered with {CAP} idle sockets open"
    );
    // Each round fills the cap again and more, as a peer reopening its sockets would.
    for round in 0..5 {
        for i in 0..10 {
            let s = TcpStream::connect(addr).await.unwrap();
            idle.push((format!("round {round} silent {i}"), s));
        }
        assert_eq!(
            health_within(addr, Duration::from_secs(2)).await,
            Some(200),
            "round {round}: /health unanswered with {} idle sockets opened",
            idle.len()
        );
    }
    let c = env.client().await;
    c.simple_query("SELECT 1").await.unwrap();

    let names: Vec<String> = idle.iter().map(|(n, _)| n.clone()).collect();
    let closed = futures_util::future::join_all(
        idle.into_iter()
            .map(|(_, s)| closed_by_proxy(s, Duration::from_secs(1))),
    )
    .await;
    let open: Vec<&str> = names
        .iter()
        .zip(&closed)
        .filter(|(_, c)| !**c)
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(
        open.len() <= CAP,
        "{} of {} idle connections still open",
        open.len(),
        names.len()
    );
    let first_open = closed.iter().position(|c| !c).unwrap_or(closed.len());
    assert!(
        closed[first_open..].iter().all(|c| !c),
        "not closed oldest first; still open: {open:?}"
    );
}

/// Refused logins are counted by reason in `/stats`, `/metrics`, `SHOW STATS` and
/// `SHOW causeway.stats`: wrong passwords, unknown users and a non-admin user at the console.
#[tokio::test]
async fn failed_logins_are_counted_by_reason() {
    let env = common::start_with(ClusterOptions::default(), |c| {
        c.push_str("\n[[users]]\nname = \"other\"\npassword = \"other-secret\"\n");
    })
    .await;
    let addr = admin(&env);
    let login = |user: &str, password: &str, db: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
            env.port()
        )
    };
    for _ in 0..3 {
        let err = common::connect_err(&login("app", "wrong", "app")).await;
        assert_eq!(err.code().unwrap().code(), "28P01", "{err}");
    }
    let err = common::connect_err(&login("nobody", "wrong", "app")).await;
    assert_eq!(err.code().unwrap().code(), "28P01", "{err}");
    let err = common::connect_err(&login("other", "other-secret", "causeway")).await;
    assert_eq!(err.code().unwrap().code(), "28000", "{err}");
    // A startup packet without a user name is refused as the server refuses it, and counted.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", env.port()))
        .await
        .unwrap();
    let reply =
        common::raw::roundtrip(&mut raw, &common::raw::startup(&[("database", "app")])).await;
    let refusal = reply
        .iter()
        .find(|(tag, _)| *tag == b'E')
        .expect("an error");
    assert_eq!(common::raw::error_code(&refusal.1), "28000");
    // A good login counts nothing.
    env.client().await.simple_query("SELECT 1").await.unwrap();

    let s = stats(addr).await;
    let failed = &s["clients"]["logins_failed"];
    assert_eq!(num(&failed["password"]), 3, "{failed}");
    assert_eq!(num(&failed["unknown_user"]), 2, "{failed}");
    assert_eq!(num(&failed["admin_console"]), 1, "{failed}");
    assert_eq!(num(&failed["tls_required"]), 0, "{failed}");
    let metrics = http::get(addr, "/metrics").await.body;
    assert_eq!(
        sample(
            &metrics,
            "causeway_logins_failed_total{reason=\"password\"}"
        ),
        3
    );
    let console = console_stats(&env).await;
    assert_eq!(
        console
            .get("clients.logins_failed.password")
            .map(String::as_str),
        Some("3")
    );
    let shown = env
        .client()
        .await
        .simple_query("SHOW causeway.stats")
        .await
        .unwrap();
    let row = shown.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r)
            if r.get(0) == Some("logins_failed.password") =>
        {
            r.get(1).map(str::to_string)
        }
        _ => None,
    });
    assert_eq!(row.as_deref(), Some("3"));
}
