//! TLS: clients with psql and psycopg (`sslmode=require` and `verify-full`, plaintext refused
//! under `client_mode = "require"`, both accepted under `allow`), and the proxy's own
//! connections to servers that run with `ssl = on` (`backend_mode = "verify-full"`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use causeway::launcher::ClusterOptions;
use common::process::{bounded, output, pg_tool, python_with, text};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A CA and a certificate for localhost/127.0.0.1 signed by it, as PEM files.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        // PostgreSQL (running as postgres) reads the server files from here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "causeway test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        let c = Certs { dir };
        std::fs::write(c.path("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(c.path("server.pem"), cert.pem()).unwrap();
        std::fs::write(c.path("server.key"), key.serialize_pem()).unwrap();
        for f in ["ca.pem", "server.pem"] {
            std::fs::set_permissions(c.path(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        // PostgreSQL wants its key private to its own user.
        let key_path = c.path("server.key");
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let uid = postgres_uid();
        std::os::unix::fs::chown(&key_path, Some(uid), Some(uid)).unwrap();
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn toml(&self, mode: &str) -> String {
        format!(
            "\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_mode = \"{mode}\"\n",
            self.path("server.pem").display(),
            self.path("server.key").display()
        )
    }
}

fn postgres_uid() -> u32 {
    let out = std::process::Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// psql with `conninfo` running `sql`; (success, stdout + stderr).
async fn psql(conninfo: &str, sql: &str) -> (bool, String) {
    let mut cmd = bounded(20, pg_tool("psql"));
    cmd.args(["-X", "-At", "-d", conninfo, "-c", sql])
        .env("PGPASSWORD", common::PASSWORD);
    let out = output(cmd).await;
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

fn conninfo(port: u16, extra: &str) -> String {
    format!(
        "host=localhost hostaddr=127.0.0.1 port={port} user=app dbname=app connect_timeout=5 {extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_use_tls_and_plaintext_is_refused_when_required() {
    let certs = Certs::new();
    let sockets = certs.path("");
    let env = common::start_with(ClusterOptions::default(), |c| {
        c.push_str(&certs.toml("require"));
        *c = c.replacen(
            "\nlisten = \"127.0.0.1:0\"",
            &format!(
                "\nlisten = \"127.0.0.1:0\"\nlisten_unix = \"{}\"",
                sockets.display()
            ),
            1,
        );
    })
    .await;
    let port = env.port();
    let ca = certs.path("ca.pem");

    // verify-full: the proxy's certificate checks out against the CA and the host name.
    let (ok, out) = psql(
        &conninfo(
            port,
            &format!("sslmode=verify-full sslrootcert={}", ca.display()),
        ),
        "SELECT 1",
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "1");
    let (ok, out) = psql(
        &conninfo(
            port,
            &format!("sslmode=verify-full sslrootcert={}", ca.display()),
        ),
        "\\conninfo",
    )
    .await;
    assert!(ok && out.contains("SSL connection"), "{out}");
    // require: encrypted, certificate not checked; a read still lands on a replica.
    let (ok, out) = psql(
        &conninfo(port, "sslmode=require"),
        "SELECT inet_server_port()",
    )
    .await;
    assert!(ok, "{out}");
    assert_ne!(
        out.trim(),
        env.node_port(0).to_string(),
        "read went to the primary"
    );
    // Plaintext is refused with a clear message.
    let (ok, out) = psql(&conninfo(port, "sslmode=disable"), "SELECT 1").await;
    assert!(!ok, "plaintext accepted: {out}");
    assert!(out.contains("SSL connection is required"), "{out}");
    // Except on the Unix socket, as with PostgreSQL: it does not leave the machine.
    let local = format!(
        "host={} port={port} user=app dbname=app connect_timeout=5",
        sockets.display()
    );
    let (ok, out) = psql(&local, "SELECT 1").await;
    assert!(ok && out.trim() == "1", "{out}");
    // A CA that did not sign the proxy's certificate: verify-full fails.
    let other = Certs::new();
    let (ok, out) = psql(
        &conninfo(
            port,
            &format!(
                "sslmode=verify-full sslrootcert={}",
                other.path("ca.pem").display()
            ),
        ),
        "SELECT 1",
    )
    .await;
    assert!(!ok, "a foreign CA was accepted: {out}");

    // psycopg, verify-full.
    let python = python_with("psycopg");
    let script = format!(
        "import psycopg\n\
         c = psycopg.connect({info:?}, password={pw:?})\n\
         print(c.pgconn.ssl_in_use, c.execute('SELECT 40 + 2').fetchone()[0])\n",
        info = conninfo(
            port,
            &format!("sslmode=verify-full sslrootcert={}", ca.display())
        ),
        pw = common::PASSWORD,
    );
    let mut cmd = bounded(30, python);
    cmd.args(["-c", &script]);
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "True 42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_mode_takes_both() {
    let certs = Certs::new();
    let env = common::start_with(ClusterOptions::default(), |c| {
        c.push_str(&certs.toml("allow"));
    })
    .await;
    for mode in ["sslmode=require", "sslmode=disable"] {
        let (ok, out) = psql(&conninfo(env.port(), mode), "SELECT 1").await;
        assert!(ok, "{mode}: {out}");
    }
    // tokio-postgres (no TLS) is a plaintext client too.
    env.client().await.simple_query("SELECT 1").await.unwrap();
}

fn ssl_conf(certs: &Certs) -> Vec<(String, String)> {
    vec![
        ("ssl".into(), "on".into()),
        (
            "ssl_cert_file".into(),
            format!("'{}'", certs.path("server.pem").display()),
        ),
        (
            "ssl_key_file".into(),
            format!("'{}'", certs.path("server.key").display()),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_reaches_servers_over_verified_tls() {
    let certs = Certs::new();
    let opts = ClusterOptions {
        primary_conf: ssl_conf(&certs),
        ..ClusterOptions::default()
    };
    let ca = certs.path("ca.pem");
    let env = common::start_with(opts, |c| {
        c.push_str(&format!(
            "\n[tls]\nbackend_mode = \"verify-full\"\nbackend_ca_file = \"{}\"\n",
            ca.display()
        ));
        // The certificate names localhost and 127.0.0.1; connect by name.
        *c = c.replace("host = \"127.0.0.1\"", "host = \"localhost\"");
    })
    .await;
    let c = env.client().await;
    let ssl_of = |sql: &'static str| {
        let c = &c;
        async move {
            let rows = c.simple_query(sql).await.unwrap();
            match &rows[1] {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_string(),
                other => panic!("{other:?}"),
            }
        }
    };
    // A read on a replica and a hinted read on the primary both travel encrypted.
    let q = "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    assert_eq!(ssl_of(q).await, "true");
    assert_eq!(
        ssl_of(
            "/* causeway:primary */ SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .await,
        "true"
    );
    // So do the health monitor's connections.
    let admin = env.primary_admin().await;
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'causeway-monitor' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n >= 1, "monitor connections are not encrypted");

    // A CA that did not sign the servers' certificate: nothing connects.
    let other = Certs::new();
    let bad_config = env.config.replace(
        &ca.display().to_string(),
        &other.path("ca.pem").display().to_string(),
    );
    let bad = common::proxy_for(&bad_config).await;
    let err = common::connect_err(&format!(
        "host=127.0.0.1 port={} user=app password={} dbname=app",
        bad.addr.port(),
        common::PASSWORD
    ))
    .await;
    let msg = err
        .as_db_error()
        .map_or_else(|| err.to_string(), |d| d.message().to_string());
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");
    bad.stop().await;
}
