//! The dashboard page (`GET /`) in a real headless Chromium against a real primary and two
//! replicas: after known traffic, every number the page shows under a `data-stat` path equals
//! the same path in `GET /stats`, the lag chart has been drawn, and with `admin.token` set the
//! page renders when opened as `/?token=…` and shows its error banner when its fetches get 401.
//!
//! Chromium missing fails the test with a pointer to scripts/test, which installs it: a green
//! run always means the page was rendered.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use causeway::launcher::ClusterOptions;
use common::http;
use common::process::{bounded, output, text};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const N_READS: u64 = 9;
const M_WRITES: u64 = 4;
const TOKEN: &str = "s3cret";

/// Paths whose values move on their own while no client does anything.
const VOLATILE: [&str; 4] = ["uptime_seconds", "lag_ms", "lag_bytes", "lsn"];

// --- chromium --------------------------------------------------------------------------------

/// `/usr/bin/chromium`, else `chromium` or `chromium-browser` on PATH. Panics rather than skip.
fn chromium() -> String {
    let runs = |program: &str| {
        Command::new(program)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ["/usr/bin/chromium", "chromium", "chromium-browser"]
        .into_iter()
        .find(|p| runs(p))
        .unwrap_or_else(|| {
            panic!(
                "Chromium is not runnable (tried /usr/bin/chromium, and chromium and \
                 chromium-browser on PATH): run scripts/test, which installs the `chromium` package"
            )
        })
        .to_string()
}

/// Loads `url` in headless Chromium with a fresh profile, lets the page run for four seconds of
/// virtual time (four polls), and returns the DOM it then holds.
async fn dump_dom(url: &str) -> String {
    let profile = tempfile::tempdir().expect("chromium profile dir");
    let mut cmd = bounded(90, chromium());
    // Root in a container needs --no-sandbox; the rest keeps Chromium off the network.
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        "--virtual-time-budget=4000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg("--dump-dom")
    .arg(url);
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "chromium on {url}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

// --- reading the dumped DOM -------------------------------------------------------------------

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// The DOM without its scripts, whose source mentions `data-stat` too.
fn without_scripts(dom: &str) -> String {
    let mut out = String::new();
    let mut rest = dom;
    while let Some(i) = rest.find("<script") {
        out.push_str(&rest[..i]);
        rest = rest[i..]
            .find("</script>")
            .map_or("", |j| &rest[i + j + "</script>".len()..]);
    }
    out.push_str(rest);
    out
}

/// Every `data-stat` element: path → the text it shows. Such elements hold only text.
fn shown_stats(dom: &str) -> BTreeMap<String, String> {
    let dom = without_scripts(dom);
    let mut shown = BTreeMap::new();
    let mut rest = dom.as_str();
    while let Some(i) = rest.find("data-stat=\"") {
        rest = &rest[i + "data-stat=\"".len()..];
        let path = unescape(&rest[..rest.find('"').expect("attribute end")]);
        rest = &rest[rest.find('>').expect("tag end") + 1..];
        let value = unescape(rest[..rest.find('<').expect("element end")].trim());
        assert!(
            shown.insert(path.clone(), value).is_none(),
            "{path} shown twice"
        );
    }
    shown
}

/// The value of attribute `name` on the first tag that starts with `tag_start`.
fn attribute(dom: &str, tag_start: &str, name: &str) -> Option<String> {
    let i = dom.find(tag_start)?;
    let tag = &dom[i..i + dom[i..].find('>')?];
    let needle = format!(" {name}=\"");
    let j = tag.find(&needle)? + needle.len();
    Some(unescape(&tag[j..j + tag[j..].find('"')?]))
}

// --- what the page should show ----------------------------------------------------------------

/// The value at a dashboard path in `/stats`: object keys, backends by name and pools by
/// `user@database`.
fn lookup<'a>(stats: &'a Value, path: &str) -> Option<&'a Value> {
    let key = |item: &Value| match (item["name"].as_str(), item["user"].as_str()) {
        (Some(name), _) => Some(name.to_string()),
        (None, Some(user)) => Some(format!("{user}@{}", item["database"].as_str()?)),
        _ => None,
    };
    path.split('.').try_fold(stats, |v, seg| match v {
        Value::Object(m) => m.get(seg),
        Value::Array(items) => items.iter().find(|i| key(i).as_deref() == Some(seg)),
        _ => None,
    })
}

/// The values the page computes from `/stats` rather than copies.
fn derived(stats: &Value, path: &str) -> Option<Value> {
    let parts: Vec<&str> = path.split('.').collect();
    match parts.as_slice() {
        ["backends", name, "state"] => {
            let b = lookup(stats, &format!("backends.{name}"))?;
            let state = if b["banned"] == true {
                "banned"
            } else if b["drained"] == true {
                "drained"
            } else if b["healthy"] == true {
                "healthy"
            } else {
                "down"
            };
            Some(json!(state))
        }
        ["classifier", "hit_ratio"] => {
            let (h, m) = (
                stats["classifier"]["cache_hits"].as_f64()?,
                stats["classifier"]["cache_misses"].as_f64()?,
            );
            Some(if h + m > 0.0 {
                json!(100.0 * h / (h + m))
            } else {
                Value::Null
            })
        }
        ["queues", "by_class", class, field] => {
            let qs: Vec<&Value> = stats["queues"]
                .as_array()?
                .iter()
                .filter(|q| q["class"] == *class)
                .collect();
            Some(match *field {
                "max_wait_ms" => json!(
                    qs.iter()
                        .filter_map(|q| q[field].as_f64())
                        .fold(0.0, f64::max)
                ),
                "wait_p99_ms" => qs
                    .iter()
                    .filter_map(|q| q[field].as_f64())
                    .reduce(f64::max)
                    .map_or(Value::Null, |v| json!(v)),
                _ => json!(qs.iter().map(|q| q[field].as_u64()).sum::<Option<u64>>()?),
            })
        }
        _ => None,
    }
}

/// Asserts that `shown` is how the page formats `expected`: counts exactly, fractions rounded
/// to the digits shown, `null` as a dash.
fn assert_shows(path: &str, shown: &str, expected: &Value) {
    match expected {
        Value::Number(n) if n.is_u64() => assert_eq!(shown, n.to_string(), "{path}"),
        Value::Number(n) => {
            let digits = shown.trim_end_matches('%');
            let got: f64 = digits
                .parse()
                .unwrap_or_else(|_| panic!("{path} shows {shown:?}, not a number"));
            let decimals = digits.split_once('.').map_or(0, |(_, f)| f.len());
            let want = n.as_f64().expect("a number");
            let tolerance = 0.5 * 10f64.powi(-(decimals as i32)) + 1e-9;
            assert!(
                (got - want).abs() <= tolerance,
                "{path} shows {shown}, /stats says {want}"
            );
        }
        Value::Null => assert_eq!(shown, "–", "{path}"),
        Value::String(s) => assert_eq!(shown, s, "{path}"),
        other => panic!("{path}: the page shows {shown:?} for {other}"),
    }
}

/// Checks every stat on the page against `/stats` and returns how many were compared.
fn assert_page_matches(shown: &BTreeMap<String, String>, stats: &Value) -> usize {
    let mut compared = 0;
    for (path, text) in shown {
        let field = path.rsplit('.').next().unwrap_or(path);
        // Rates depend on when the browser polled; the rest must agree exactly.
        if VOLATILE.contains(&field) || path.starts_with("rates.") {
            continue;
        }
        let expected = lookup(stats, path)
            .cloned()
            .or_else(|| derived(stats, path))
            .unwrap_or_else(|| panic!("the page shows {path}, which /stats does not have"));
        assert_shows(path, text, &expected);
        compared += 1;
    }
    compared
}

// --- helpers ---------------------------------------------------------------------------------

async fn stats(addr: SocketAddr, token: Option<&str>) -> Value {
    let r = http::request(addr, "GET", "/stats", token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Reads and writes on separate sessions (so read-your-writes keeps the reads on replicas);
/// returns the two sessions, which stay connected.
async fn drive_traffic(env: &common::Env) -> [tokio_postgres::Client; 2] {
    let owner = env.owner().await;
    owner
        .batch_execute(
            "CREATE TABLE dash_t (id int PRIMARY KEY, v int); INSERT INTO dash_t VALUES (1, 0)",
        )
        .await
        .unwrap();
    env.caught_up().await;
    let reader = env.client().await;
    let writer = env.client().await;
    for _ in 0..N_READS {
        reader
            .simple_query("SELECT v FROM dash_t WHERE id = 1")
            .await
            .unwrap();
    }
    for _ in 0..M_WRITES {
        writer
            .simple_query("UPDATE dash_t SET v = v + 1 WHERE id = 1")
            .await
            .unwrap();
    }
    // A few seconds of history, so the lag chart has points to draw before the page loads.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    [reader, writer]
}

/// Asserts that the page rendered a snapshot without an error and drew the lag chart.
fn assert_rendered(dom: &str, after: &Value) {
    assert_eq!(
        attribute(dom, "<body", "data-error"),
        None,
        "the page shows an error:\n{dom}"
    );
    let updated: f64 = attribute(dom, "<body", "data-updated")
        .unwrap_or_else(|| panic!("no snapshot rendered:\n{dom}"))
        .parse()
        .expect("data-updated is the snapshot's uptime");
    assert!(updated > 0.0 && updated <= after["uptime_seconds"].as_f64().unwrap());
    let chart = |name| attribute(dom, "<canvas id=\"lag-chart\"", name);
    assert_eq!(
        chart("data-series").as_deref(),
        Some("2"),
        "one line per replica"
    );
    let points: usize = chart("data-points")
        .and_then(|p| p.parse().ok())
        .expect("lag chart data-points");
    assert!(points >= 4, "lag chart drew {points} points");
}

/// Serves the page itself to anyone and passes every other request to the admin endpoint with
/// whatever bearer token the page's script sent, so the script meets the endpoint's real 401.
async fn page_relay(admin: SocketAddr, page: String) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(relay_one(sock, admin, page.clone()));
        }
    });
    addr
}

async fn relay_one(mut sock: TcpStream, admin: SocketAddr, page: String) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_string();
    let token = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| v.trim().strip_prefix("Bearer ").map(str::to_string));
    let (status, content_type, body) = if target == "/" || target.starts_with("/?") {
        (200, "text/html; charset=utf-8".to_string(), page)
    } else {
        let r = http::request(admin, "GET", &target, token.as_deref()).await;
        let ct = r.header("content-type").unwrap_or("text/plain").to_string();
        (r.status, ct, r.body)
    };
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        _ => "Other",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(response.as_bytes()).await;
}

// --- tests -----------------------------------------------------------------------------------

#[tokio::test]
async fn the_page_shows_the_numbers_of_stats() {
    chromium();
    let env = common::start().await;
    let addr = env.proxy.admin_addr.expect("admin endpoint enabled");
    let _sessions = drive_traffic(&env).await;

    let dom = dump_dom(&format!("http://{addr}/")).await;
    let after = stats(addr, None).await;
    let shown = shown_stats(&dom);
    assert_rendered(&dom, &after);

    // The traffic, exactly, as the page shows it.
    let at = |path: &str| -> u64 {
        shown
            .get(path)
            .unwrap_or_else(|| panic!("the page does not show {path}"))
            .parse()
            .unwrap_or_else(|_| panic!("{path} is not a plain count: {:?}", shown[path]))
    };
    assert_eq!(
        at("backends.replica1.reads") + at("backends.replica2.reads"),
        N_READS
    );
    assert_eq!(at("backends.primary.writes"), M_WRITES);
    assert_eq!(at("backends.primary.reads"), 0);
    assert_eq!(
        at("backends.replica1.writes") + at("backends.replica2.writes"),
        0
    );
    assert_eq!(at("routing.by_reason.classified_read"), N_READS);
    assert_eq!(at("routing.by_reason.classified_write"), M_WRITES);
    assert_eq!(at("clients.connected"), 2);
    assert_eq!(at("latency.by_class.commit.count"), M_WRITES);
    assert!(at("backends.primary.pools.app@app.size") > 0);
    for name in ["primary", "replica1", "replica2"] {
        assert_eq!(shown[&format!("backends.{name}.state")], "healthy");
    }
    for path in [
        "clients.active",
        "clients.waiting",
        "clients.idle",
        "clients.accepted_total",
        "classifier.hit_ratio",
        "queues.by_class.commit.waiting",
        "latency.by_backend.primary.p99_ms",
        "latency.by_class.point_read.p50_ms",
        "uptime_seconds",
        "backends.replica1.lag_ms",
    ] {
        assert!(shown.contains_key(path), "the page does not show {path}");
    }

    // And every other stat on the page agrees with /stats.
    let compared = assert_page_matches(&shown, &after);
    assert!(compared >= 60, "only {compared} stats compared");
    assert_eq!(count(&after["routing"]["reads"]), N_READS);
}

#[tokio::test]
async fn with_a_token_the_page_renders_only_when_its_script_has_it() {
    chromium();
    let env = common::start_with(ClusterOptions::default(), |c| {
        c.push_str("\n[admin]\ntoken = \"s3cret\"\nusers = [\"app\"]\n");
        *c = c.replacen("[admin]\nusers = [\"app\"]\n", "", 1);
    })
    .await;
    let addr = env.proxy.admin_addr.expect("admin endpoint enabled");
    let _sessions = drive_traffic(&env).await;

    // Opened as /?token=…, the script sends the token as a header and renders.
    let dom = dump_dom(&format!("http://{addr}/?token={TOKEN}")).await;
    let after = stats(addr, Some(TOKEN)).await;
    let shown = shown_stats(&dom);
    assert_rendered(&dom, &after);
    assert_eq!(
        shown
            .get("routing.by_reason.classified_read")
            .map(String::as_str),
        Some(N_READS.to_string().as_str())
    );
    assert!(assert_page_matches(&shown, &after) >= 60);

    // Without the token the endpoint does not even serve the page.
    let dom = dump_dom(&format!("http://{addr}/")).await;
    assert!(dom.contains("admin token required"), "{dom}");
    assert!(shown_stats(&dom).is_empty());

    // The page served without the token: its fetches get 401 and it says so.
    let page = http::request(addr, "GET", "/", Some(TOKEN)).await;
    assert_eq!(page.status, 200);
    let relay = page_relay(addr, page.body).await;
    let dom = dump_dom(&format!("http://{relay}/")).await;
    let error =
        attribute(&dom, "<body", "data-error").unwrap_or_else(|| panic!("no error shown:\n{dom}"));
    assert!(error.contains("HTTP 401"), "{error}");
    assert_eq!(attribute(&dom, "<body", "data-updated"), None);
    let banner = &dom[dom.find("id=\"error\"").expect("error banner")..];
    let banner_tag = &banner[..banner.find('>').unwrap()];
    assert!(
        !banner_tag.contains("hidden"),
        "banner hidden: {banner_tag}"
    );
    assert!(banner.contains("HTTP 401"), "{banner}");
}
