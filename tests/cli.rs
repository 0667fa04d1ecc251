//! The `causeway` command line: `check` validates and prints the effective configuration; a
//! bad configuration stops start-up with exit code 2 and names the key. Signals: SIGHUP reloads,
//! SIGTERM stops gracefully and a second one at once; the demo removes its cluster on SIGINT,
//! SIGTERM or SIGHUP.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"

[[users]]
name = "app"
password = "secret"

[primary]
host = "127.0.0.1"
port = 5432

[[replicas]]
name = "replica1"
host = "127.0.0.1"
port = 5433
"#;

fn run(config: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_causeway"));
    cmd.args(args).arg("--config").arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_effective_settings_without_passwords() {
    let (code, out, _) = run(GOOD, &["check"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("primary_max = 20"), "{out}");
    assert!(
        out.contains("replica_strategy = \"least_connections\""),
        "{out}"
    );
    assert!(!out.contains("secret"), "{out}");
}

#[test]
fn environment_overrides_keys() {
    let (code, out, _) = run(GOOD, &["check"], &[("CAUSEWAY__POOL__PRIMARY_MAX", "7")]);
    assert_eq!(code, 0);
    assert!(out.contains("primary_max = 7"), "{out}");
    let (code, _, err) = run(GOOD, &["check"], &[("CAUSEWAY__POOL__PRIMARY_MAXX", "7")]);
    assert_eq!(code, 2);
    assert!(err.contains("primary_maxx"), "{err}");
    // Strings that look like numbers stay strings: a token keeps its leading zero.
    let config = format!("{GOOD}\n[priority]\nenabled = true\n");
    let (code, out, err) = run(
        &config,
        &["check"],
        &[
            ("CAUSEWAY__ADMIN__TOKEN", "0123"),
            ("CAUSEWAY__SERVER__MONITOR_DATABASE", "0123"),
            ("CAUSEWAY__PRIORITY__ENABLED", "false"),
            ("CAUSEWAY__PRIORITY__BACKGROUND_SHARE", "0.25"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("enabled = false"), "{out}");
    assert!(out.contains("background_share = 0.25"), "{out}");
    assert!(out.contains("token = \"<redacted>\""), "{out}");
    assert!(out.contains("monitor_database = \"0123\""), "{out}");
}

#[test]
fn bad_configurations_exit_2_naming_the_key() {
    let cases = [
        (
            format!("{GOOD}\n[pool]\nmode = \"statement\"\n"),
            "statement",
        ),
        (
            format!("{GOOD}\n[routing]\nfallbak = \"primary\"\n"),
            "fallbak",
        ),
        (GOOD.replace("port = 5433", "port = 5432"), "replicas[0]"),
        (GOOD.replace("port = 5432", "port = 0"), "primary.port"),
        (
            GOOD.replace(
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:0\"\nworker_threads = 100000",
            ),
            "server.worker_threads",
        ),
        (
            GOOD.replace(
                "host = \"127.0.0.1\"\nport = 5433",
                "host = \"localhost\"\nport = 5432",
            ),
            "replicas[0]",
        ),
        (
            format!("{GOOD}\n[pool]\nprimary_max = \"many\"\n"),
            "primary_max",
        ),
        (
            GOOD.replace("[server]", "[server]\nadmin_listen = \"0.0.0.0:9930\""),
            "admin.token",
        ),
        (
            format!("{GOOD}\n[admin]\nusers = [\"nobody\"]\n"),
            "admin.users[0]",
        ),
        (format!("{GOOD}\n[logging]\nformat = \"xml\"\n"), "xml"),
        (
            format!("{GOOD}\n[logging]\nlevel = \"=[\"\n"),
            "logging.level",
        ),
        (
            format!("{GOOD}\n[priority.acquire_timeout_ms]\ncommit = 0\n"),
            "priority.acquire_timeout_ms.commit",
        ),
        // A typo is not a target name that would silence every log line.
        (
            format!("{GOOD}\n[logging]\nlevel = \"warning\"\n"),
            "logging.level",
        ),
        (
            format!("{GOOD}\n[logging]\nlevel = \"debg\"\n"),
            "logging.level",
        ),
        // A value of the wrong type is refused, never converted.
        (
            format!("{GOOD}\n[pool]\nprimary_max = 2.9\n"),
            "pool.primary_max",
        ),
        (
            format!("{GOOD}\n[pool]\nacquire_timeout_ms = 1e3\n"),
            "pool.acquire_timeout_ms",
        ),
        (
            format!("{GOOD}\n[pool]\nprimary_max = \"50\"\n"),
            "pool.primary_max",
        ),
        (
            format!("{GOOD}\n[routing]\nfollow_promotion = \"yes\"\n"),
            "routing.follow_promotion",
        ),
        (
            format!("{GOOD}\n[routing]\nfollow_promotion = 1\n"),
            "routing.follow_promotion",
        ),
        (
            format!("{GOOD}\n[priority]\nenabled = 0.5\n"),
            "priority.enabled",
        ),
        (format!("{GOOD}\n[logging]\nlevel = 5\n"), "logging.level"),
        (
            format!("{GOOD}\n[pool]\nreplica_max = 0.4\n"),
            "floating point",
        ),
        (
            format!("{GOOD}\n[[replicas]]\nname = \"r2\"\nhost = \"h\"\nport = \"1\"\n"),
            "replicas[1].port",
        ),
        // PostgreSQL never accepts an empty password; the proxy would, at its own login.
        (
            GOOD.replace("password = \"secret\"", "password = \"\""),
            "users[0].password",
        ),
    ];
    for (config, key) in cases {
        for args in [&["check"][..], &[][..]] {
            let (code, _, err) = run(&config, args, &[]);
            assert_eq!(code, 2, "{args:?} {key}: {err}");
            assert!(err.contains(key), "{args:?} expected {key} in: {err}");
        }
    }
}

#[test]
fn check_refuses_settings_that_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let missing = missing.display();
    let here = dir.path().display();
    let cases = [
        (
            GOOD.replace(
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:16432\"\nadmin_listen = \"127.0.0.1:16432\"",
            ),
            "server.admin_listen",
        ),
        (
            format!(
                "{GOOD}\n[tls]\nclient_mode = \"allow\"\ncert_file = \"{missing}\"\nkey_file = \"{missing}\"\n"
            ),
            "tls.cert_file",
        ),
        (
            format!(
                "{GOOD}\n[tls]\nbackend_mode = \"verify-full\"\nbackend_ca_file = \"{missing}\"\n"
            ),
            "tls.backend_ca_file",
        ),
        (
            GOOD.replace(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:0\"\nlisten_unix = \"{here}/nowhere\""),
            ),
            "server.listen_unix",
        ),
    ];
    for (config, key) in cases {
        let (code, _, err) = run(&config, &["check"], &[]);
        assert_eq!(code, 2, "{key}: {err}");
        assert!(err.contains(key), "expected {key} in: {err}");
    }
}

/// TLS files that are there but that start-up could not use (no certificate in the file, a
/// key that belongs to another certificate) are refused by `check` and by start-up alike,
/// with exit code 2 and the key and file named.
#[test]
fn unusable_tls_files_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let pair = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (
            write(&format!("{name}.crt"), &cert.pem()),
            write(&format!("{name}.key"), &key.serialize_pem()),
        )
    };
    let (cert, _) = pair("one");
    let (_, other_key) = pair("two");
    let garbage = write("bad.pem", "garbage\n");
    let tls = |c: &str, k: &str| {
        format!("{GOOD}\n[tls]\nclient_mode = \"allow\"\ncert_file = \"{c}\"\nkey_file = \"{k}\"\n")
    };
    for (config, key, file) in [
        (tls(&garbage, &garbage), "tls.cert_file", &garbage),
        (tls(&cert, &other_key), "tls.key_file", &other_key),
    ] {
        for args in [&["check"][..], &[][..]] {
            let (code, _, err) = run(&config, args, &[]);
            assert_eq!(code, 2, "{args:?} {key}: {err}");
            assert!(err.contains(key), "{args:?} expected {key} in: {err}");
            assert!(
                err.contains(file.as_str()),
                "{args:?} expected {file} in: {err}"
            );
        }
    }
}

/// A port out of range is described the same way whether it is 0 or past 65535, from the
/// file or from the environment.
#[test]
fn ports_out_of_range_get_one_message() {
    let zero = run(&GOOD.replace("port = 5432", "port = 0"), &["check"], &[]);
    let big = run(GOOD, &["check"], &[("CAUSEWAY__PRIMARY__PORT", "70000")]);
    for (code, _, err) in [zero, big] {
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("primary.port"), "{err}");
        assert!(err.contains("from 1 to 65535"), "{err}");
    }
}

#[test]
fn environment_values_must_parse_as_their_key_type() {
    for (var, value) in [
        ("CAUSEWAY__POOL__PRIMARY_MAX", "2.9"),
        ("CAUSEWAY__POOL__ACQUIRE_TIMEOUT_MS", "1e3"),
        ("CAUSEWAY__ROUTING__FOLLOW_PROMOTION", "yes"),
        ("CAUSEWAY__PRIORITY__ENABLED", "1"),
    ] {
        let (code, _, err) = run(GOOD, &["check"], &[(var, value)]);
        assert_eq!(code, 2, "{var}={value}: {err}");
        assert!(err.contains(var), "{var}={value}: {err}");
    }
}

#[test]
fn a_missing_configuration_file_is_called_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere.toml");
    for args in [&["check"][..], &[][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_causeway"))
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("does not exist"), "{err}");
        assert!(!err.contains("invalid configuration"), "{err}");
    }
}

#[test]
fn an_address_in_use_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let config = GOOD.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{addr}\"\nadmin_listen = \"\""),
    );
    let (code, _, err) = run(&config, &[], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("server.listen {addr}")), "{err}");
}

#[test]
fn shipped_proxy_toml_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml")).unwrap();
    let (code, out, err) = run(&text, &["check"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replica2"), "{out}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let config = GOOD.replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
    ) + "\n[logging]\nformat = \"json\"\n";
    std::fs::write(&path, &config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_causeway"))
        .arg("--config")
        .arg(&path)
        .env_remove("CAUSEWAY_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let mut seen = Vec::new();
    let listening = loop {
        let Some(Ok(line)) = lines.next() else {
            break None;
        };
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        seen.push(line);
        if v["fields"]["message"] == "listening" {
            break Some(v);
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let v = listening.unwrap_or_else(|| panic!("no 'listening' line in {seen:#?}"));
    assert_eq!(v["level"], "INFO");
    assert!(
        v["fields"]["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
}

#[test]
fn text_logs_off_a_terminal_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let config = GOOD.replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
    );
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_causeway"));
    cmd.arg("--config")
        .arg(&path)
        .env("CAUSEWAY_LOG", "info")
        .env_remove("NO_COLOR");
    let mut proxy = Spawned::spawn(cmd);
    let line = proxy.wait_for("listening", 15);
    proxy.signal("TERM");
    proxy.wait_for("shut down", 15);
    let line = line.unwrap_or_else(|| panic!("never listening: {:?}", proxy.seen));
    assert!(line.contains(" INFO causeway::"), "{line:?}");
    for line in &proxy.seen {
        assert!(!line.contains('\x1b'), "{line:?}");
    }
}

#[test]
fn sighup_reloads_an_invalid_file_is_rejected_and_sigterm_exits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let config = GOOD.replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"\"",
    );
    std::fs::write(&path, &config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_causeway"))
        .arg("--config")
        .arg(&path)
        .env("CAUSEWAY_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let wait_for = |needle: &str| -> Result<String, Vec<String>> {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        Err(seen)
    };
    let hup = |pid: u32| {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    let result = (|| {
        wait_for("listening").map_err(|s| format!("never listening: {s:#?}"))?;
        std::fs::write(&path, format!("{config}\n[pool]\nprimary_maxx = 3\n")).unwrap();
        hup(child.id());
        wait_for("reload rejected").map_err(|s| format!("bad file not rejected: {s:#?}"))?;
        // Users change only on restart, but a file that could not start is refused all the same.
        std::fs::write(
            &path,
            config.replace("password = \"secret\"", "password = \"\""),
        )
        .unwrap();
        hup(child.id());
        let line = wait_for("reload rejected")
            .map_err(|s| format!("empty password not rejected: {s:#?}"))?;
        if !line.contains("users[0].password") {
            return Err(format!("rejection does not name the key: {line}"));
        }
        std::fs::write(&path, format!("{config}\n[pool]\nprimary_max = 3\n")).unwrap();
        hup(child.id());
        let line = wait_for("configuration reloaded")
            .map_err(|s| format!("good file not applied: {s:#?}"))?;
        if !line.contains("pool.primary_max") {
            return Err(format!("reload line does not name the key: {line}"));
        }
        // SIGTERM: a clean exit, promptly (no clients, so no grace period to wait out).
        assert!(
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
        wait_for("shut down").map_err(|s| format!("no clean shutdown: {s:#?}"))?;
        Ok(())
    })();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        match child.try_wait().unwrap() {
            Some(status) => break Some(status),
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            None => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result.unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {status:?}"
    );
}

/// A `causeway` child (the demo, or the proxy); the lines it writes to stdout and stderr arrive
/// on a channel.
struct Spawned {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

/// A port nothing listens on just now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Spawned {
    fn demo() -> Spawned {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_causeway"));
        cmd.args(["demo", "--port", &free_port().to_string()])
            .env_remove("CAUSEWAY_LOG");
        Spawned::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Spawned {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        for pipe in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)) {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Spawned {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line containing `needle` within `secs`.
    fn wait_for(&mut self, needle: &str, secs: u64) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name}");
    }

    /// The exit status, if the demo ends within `secs`.
    fn wait_exit(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The directory of the demo's cluster: the launcher writes its owner's pid there.
    fn cluster_dir(&self) -> Option<PathBuf> {
        let pid = self.child.id().to_string();
        std::fs::read_dir(causeway::launcher::base_dir())
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|dir| {
                std::fs::read_to_string(dir.join("owner.pid")).is_ok_and(|p| p.trim() == pid)
            })
    }
}

impl Drop for Spawned {
    /// Ctrl-C first, so that a failing test leaves no servers behind.
    fn drop(&mut self) {
        if self.child.try_wait().is_ok_and(|s| s.is_none()) {
            self.signal("INT");
            if self.wait_exit(30).is_none() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

/// Pids of server processes whose command line names `dir` (a postmaster's `-D`).
fn servers_in(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn demo_takes_a_free_admin_port_when_9930_is_taken() {
    // Held here: another test's demo may hold it now, but only until that demo stops, and
    // the port must stay busy while this one starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    let _held = loop {
        match std::net::TcpListener::bind("127.0.0.1:9930") {
            Ok(l) => break Some(l),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            // Someone outside the tests keeps it: busy all the same.
            Err(_) => break None,
        }
    };
    let mut demo = Spawned::demo();
    let admin = demo.wait_for("admin     http", 120);
    let ready = demo.wait_for("Ctrl-C stops", 5);
    demo.signal("INT");
    let status = demo.wait_exit(60);
    let seen = demo.seen.join("\n");
    let admin = admin.unwrap_or_else(|| panic!("no admin line:\n{seen}"));
    assert!(ready.is_some(), "{seen}");
    assert!(admin.contains("http://127.0.0.1:"), "{seen}");
    assert!(!admin.contains(":9930"), "{seen}");
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{seen}");
}

/// Runs a demo, sends it `signal` once its cluster is up (`ready`) or as soon as the cluster
/// directory exists (while it is still starting), and checks that it exits cleanly, its
/// servers stopped and its directory removed.
fn demo_stops_cleanly(signal: &str, ready: bool) {
    let mut demo = Spawned::demo();
    let deadline = Instant::now() + Duration::from_secs(120);
    let dir = loop {
        if let Some(dir) = demo.cluster_dir() {
            break dir;
        }
        assert!(Instant::now() < deadline, "no cluster directory");
        std::thread::sleep(Duration::from_millis(5));
    };
    if ready {
        let up = demo.wait_for("Ctrl-C stops", 120);
        assert!(up.is_some(), "never ready:\n{}", demo.seen.join("\n"));
        assert!(!servers_in(&dir).is_empty(), "no servers found in {dir:?}");
    }
    demo.signal(signal);
    let status = demo.wait_exit(120);
    demo.wait_for("never printed", 1);
    let left = servers_in(&dir);
    let kept = dir.exists();
    if !left.is_empty() || kept {
        // Not the demo's own leftovers to keep: its owner is gone, so this removes them.
        causeway::launcher::cleanup_stale();
    }
    let seen = demo.seen.join("\n");
    assert!(
        left.is_empty(),
        "SIG{signal}: servers left running: {left:?}\n{seen}"
    );
    assert!(!kept, "SIG{signal}: {dir:?} left behind\n{seen}");
    assert!(
        status.is_some_and(|s| s.success()),
        "SIG{signal}: {status:?}\n{seen}"
    );
    // The signal did arrive mid-start.
    assert!(ready || !seen.contains("Ctrl-C stops"), "{seen}");
}

#[test]
fn demo_stops_and_removes_its_cluster_on_sigterm() {
    demo_stops_cleanly("TERM", true);
}

#[test]
fn demo_stops_and_removes_its_cluster_on_sighup() {
    demo_stops_cleanly("HUP", true);
}

#[test]
fn demo_stops_and_removes_its_cluster_on_sigint_while_starting() {
    demo_stops_cleanly("INT", false);
}

/// A second SIGTERM during the graceful shutdown closes the clients still in a transaction at
/// once instead of waiting out `shutdown_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_cuts_the_grace_period_short() {
    let cluster =
        tokio::task::spawn_blocking(|| causeway::launcher::LocalCluster::start(Default::default()))
            .await
            .unwrap()
            .unwrap();
    let port = free_port();
    let config = causeway::demo::config_for(&cluster, "127.0.0.1:0").replacen(
        "\nlisten = \"127.0.0.1:0\"",
        &format!("\nlisten = \"127.0.0.1:{port}\"\nshutdown_timeout_ms = 60000"),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_causeway"));
    cmd.arg("--config").arg(&path).env("CAUSEWAY_LOG", "info");
    let mut proxy = Spawned::spawn(cmd);
    assert!(
        proxy.wait_for("listening", 30).is_some(),
        "{:?}",
        proxy.seen
    );
    let conninfo = format!("host=127.0.0.1 port={port} user=app password=app-secret dbname=app");
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.batch_execute("BEGIN; SELECT 1").await.unwrap();

    proxy.signal("TERM");
    let draining = tokio::task::block_in_place(|| proxy.wait_for("shutting down", 10));
    assert!(draining.is_some(), "{:?}", proxy.seen);
    // The client's transaction holds the shutdown for its grace period...
    let early = tokio::task::block_in_place(|| proxy.wait_exit(1));
    assert!(
        early.is_none(),
        "exited with a transaction open: {:?}",
        proxy.seen
    );
    // ...until a second signal.
    proxy.signal("TERM");
    let status = tokio::task::block_in_place(|| proxy.wait_exit(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} {:?}",
        proxy.seen
    );
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.is_closed() || err.code().is_some(), "{err}");
}

/// The demo runs with the user's settings over its own: a file given with `-c` (after `demo`
/// here) and `CAUSEWAY__…` variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_applies_the_given_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.toml");
    std::fs::write(
        &path,
        "[server]\nadmin_listen = \"127.0.0.1:0\"\n\n[pool]\nprimary_max = 3\n\n\
         [routing]\nreplica_strategy = \"round_robin\"\n",
    )
    .unwrap();
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_causeway"));
    cmd.args(["demo", "--port", &port.to_string(), "-c"])
        .arg(&path)
        .env("CAUSEWAY__POOL__REPLICA_MAX", "4")
        .env_remove("CAUSEWAY_LOG");
    let mut demo = Spawned::spawn(cmd);
    let ready = tokio::task::block_in_place(|| demo.wait_for("Ctrl-C stops", 120));
    assert!(ready.is_some(), "never ready:\n{}", demo.seen.join("\n"));
    let conninfo =
        format!("host=127.0.0.1 port={port} user=app password=app-secret dbname=causeway");
    let (console, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = console.simple_query("SHOW CONFIG").await.unwrap();
    let setting = |key: &str| {
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(key) => {
                    r.get(1).map(str::to_string)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no {key} in SHOW CONFIG"))
    };
    assert_eq!(setting("pool.primary_max"), "3");
    assert_eq!(setting("pool.replica_max"), "4");
    assert_eq!(setting("routing.replica_strategy"), "round_robin");
    assert_eq!(setting("server.listen"), format!("127.0.0.1:{port}"));
    assert_eq!(setting("server.admin_listen"), "127.0.0.1:0");
}

/// What the demo cannot use is refused by name before any server starts: an unknown key, and
/// the keys it sets itself (its servers' addresses, its login, the endpoint `--port` names).
#[test]
fn demo_refuses_settings_it_cannot_use() {
    // (file, variables, what the message names)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case; 4] = [
        ("[pool]\nprimary_mx = 3\n", &[], &["pool.primary_mx"]),
        (
            "[primary]\nport = 5999\n\n[[replicas]]\nname = \"r\"\nhost = \"127.0.0.1\"\nport = 5998\n",
            &[],
            &["`primary`", "`replicas`", "demo"],
        ),
        (
            "[pool]\nprimary_max = 3\n",
            &[("CAUSEWAY__PRIMARY__HOST", "db.example")],
            &["CAUSEWAY__PRIMARY__HOST", "demo"],
        ),
        (
            "[server]\nlisten = \"127.0.0.1:7000\"\n",
            &[],
            &["`server.listen`", "--port"],
        ),
    ];
    for (text, env, named) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.toml");
        std::fs::write(&path, text).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_causeway"));
        cmd.arg("-c")
            .arg(&path)
            .args(["demo", "--port", &free_port().to_string()])
            .env_remove("CAUSEWAY_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut demo = Spawned::spawn(cmd);
        let status = demo.wait_exit(30);
        demo.wait_for("never printed", 1);
        let seen = demo.seen.join("\n");
        assert_eq!(status.and_then(|s| s.code()), Some(2), "{text}\n{seen}");
        for part in named {
            assert!(seen.contains(part), "{part} not named for {text}:\n{seen}");
        }
        assert!(!seen.contains("starting a PostgreSQL"), "{text}\n{seen}");
    }
}
