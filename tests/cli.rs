//! The `causeway` command line: `check` validates and prints the effective configuration; a
//! bad configuration stops start-up with exit code 2 and names the key.

use std::process::Command;

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
            format!("{GOOD}\n[pool]\nprimary_max = \"many\"\n"),
            "primary_max",
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
fn shipped_proxy_toml_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml")).unwrap();
    let (code, out, err) = run(&text, &["check"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replica2"), "{out}");
}
