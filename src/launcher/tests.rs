//! Integration tests: real PostgreSQL servers via psql.

use super::*;

/// psql as an arbitrary user with a password, over TCP; returns (success, stdout+stderr).
fn login(node: &NodeInfo, user: &str, password: &str, db: &str) -> (bool, String) {
    let mut cmd = Command::new("psql");
    for var in PG_ENV {
        cmd.env_remove(var);
    }
    let out = cmd
        .env("PGPASSWORD", password)
        .args([
            "-XAtw",
            "-h",
            &node.host,
            "-p",
            &node.port.to_string(),
            "-U",
            user,
            "-d",
            db,
        ])
        .args(["-c", "SELECT current_user"])
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Waits up to 5 s for the process to end: the postmaster removes
/// postmaster.pid just before it exits.
fn process_gone(pid: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
    true
}

fn postmaster_pid(node: &NodeInfo) -> String {
    let text = fs::read_to_string(node.data_dir.join("postmaster.pid")).expect("postmaster.pid");
    text.lines().next().expect("pid line").trim().to_string()
}

#[test]
fn cluster_replicates_restarts_authenticates_and_cleans_up() {
    let t = Instant::now();
    let cluster = LocalCluster::start(ClusterOptions::default()).expect("start cluster");
    eprintln!("LocalCluster::start with 2 replicas took {:?}", t.elapsed());
    assert_eq!(cluster.replicas.len(), 2);
    let mut ports: Vec<u16> = cluster.replicas.iter().map(|r| r.port).collect();
    ports.push(cluster.primary.port);
    assert!(
        ports.iter().all(|p| (PORT_MIN..PORT_MAX).contains(p)),
        "{ports:?}"
    );

    cluster
        .psql(
            &cluster.primary,
            "CREATE TABLE t (id int, v text); INSERT INTO t VALUES (1, 'one');",
        )
        .expect("create table");
    cluster
        .wait_replicas_caught_up(Duration::from_secs(30))
        .expect("caught up");
    for replica in &cluster.replicas {
        assert_eq!(
            cluster
                .psql(replica, "SELECT v FROM t WHERE id = 1")
                .expect("select"),
            "one"
        );
        assert_eq!(
            cluster
                .psql(replica, "SELECT pg_is_in_recovery()")
                .expect("recovery"),
            "t"
        );
    }
    assert_eq!(
        cluster
            .psql(&cluster.primary, "SELECT pg_is_in_recovery()")
            .expect("recovery"),
        "f"
    );
    assert!(cluster.psql(&cluster.primary, "SELECT nope").is_err());
    assert!(
        cluster
            .superuser_conninfo(&cluster.primary)
            .ends_with("user=postgres dbname=app")
    );

    // Stop a replica (both modes), write meanwhile, start it again: it catches up.
    let r1 = cluster.replicas[0].clone();
    cluster.stop_node(&r1, StopMode::Fast).expect("stop fast");
    assert!(cluster.psql(&r1, "SELECT 1").is_err());
    cluster
        .psql(&cluster.primary, "INSERT INTO t VALUES (2, 'two')")
        .expect("insert");
    cluster.start_node(&r1).expect("start again");
    cluster
        .stop_node(&r1, StopMode::Immediate)
        .expect("stop immediate");
    cluster.start_node(&r1).expect("start after crash");
    cluster
        .wait_replicas_caught_up(Duration::from_secs(30))
        .expect("caught up again");
    assert_eq!(
        cluster.psql(&r1, "SELECT count(*) FROM t").expect("count"),
        "2"
    );

    // Password authentication for the scram user, on the primary and a replica.
    for node in [&cluster.primary, &cluster.replicas[1]] {
        let (ok, out) = login(node, "app", "app-secret", "app");
        assert!(ok && out.trim() == "app", "{out}");
        let (ok, out) = login(node, "app", "wrong", "app");
        assert!(
            !ok && out.contains("password authentication failed"),
            "{out}"
        );
    }
    let stored = cluster.psql(
        &cluster.primary,
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'",
    );
    assert!(stored.expect("rolpassword").starts_with("SCRAM-SHA-256$"));

    // Drop stops every server and removes the temp dir.
    let dir = cluster.inner.dir.path().to_path_buf();
    let pids: Vec<String> = std::iter::once(&cluster.primary)
        .chain(&cluster.replicas)
        .map(postmaster_pid)
        .collect();
    drop(cluster);
    assert!(!dir.exists(), "{} still exists", dir.display());
    for pid in pids {
        assert!(process_gone(&pid), "postmaster {pid} still running");
    }
}

#[test]
fn md5_trust_users_custom_conf_and_no_replicas() {
    let opts = ClusterOptions {
        replicas: 1,
        users: vec![
            UserSpec {
                name: "owner".into(),
                password: "o'pw".into(),
                auth: HbaAuth::Md5,
            },
            UserSpec {
                name: "trusted".into(),
                password: "x".into(),
                auth: HbaAuth::Trust,
            },
        ],
        database: "shop".into(),
        primary_conf: vec![("work_mem".into(), "'8MB'".into())],
        replica_conf: vec![("recovery_min_apply_delay".into(), "10ms".into())],
        bin_dir: None,
    };
    let cluster = LocalCluster::start(opts).expect("start");
    let owner = cluster.psql(
        &cluster.primary,
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'shop'",
    );
    assert_eq!(owner.expect("owner"), "owner");
    let stored = cluster.psql(
        &cluster.primary,
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'owner'",
    );
    assert!(stored.expect("rolpassword").starts_with("md5"));
    assert!(login(&cluster.primary, "owner", "o'pw", "shop").0);
    assert!(!login(&cluster.primary, "owner", "bad", "shop").0);
    assert!(login(&cluster.primary, "trusted", "anything", "shop").0);
    assert!(!login(&cluster.primary, "stranger", "x", "shop").0);
    let replica = &cluster.replicas[0];
    assert_eq!(cluster.psql(replica, "SHOW work_mem").expect("show"), "8MB");
    assert_eq!(
        cluster
            .psql(replica, "SHOW recovery_min_apply_delay")
            .expect("show"),
        "10ms"
    );
    assert_eq!(
        cluster
            .psql(replica, "SHOW hot_standby_feedback")
            .expect("show"),
        "on"
    );

    // A port taken between pick_port and the server's bind: start retries elsewhere.
    cluster.stop_node(replica, StopMode::Fast).expect("stop");
    let squatter = TcpListener::bind((HOST, replica.port)).expect("squat on the port");
    let mut moved = replica.clone();
    let mut rng = Rng::new();
    (cluster.inner.start_server(&mut moved, true, Some(&mut rng))).expect("restart");
    assert_ne!(moved.port, replica.port);
    assert_eq!(
        cluster
            .psql(&moved, "SELECT pg_is_in_recovery()")
            .expect("psql"),
        "t"
    );
    drop(squatter);
    cluster.stop();

    let solo = LocalCluster::start(ClusterOptions {
        replicas: 0,
        ..Default::default()
    })
    .expect("solo");
    assert!(solo.replicas.is_empty());
    solo.wait_replicas_caught_up(Duration::from_secs(1))
        .expect("nothing to wait for");
}

#[test]
fn bad_options_fail_cleanly() {
    let opts = ClusterOptions {
        bin_dir: Some("/nonexistent".into()),
        ..Default::default()
    };
    assert!(matches!(
        LocalCluster::start(opts),
        Err(LauncherError::BinariesNotFound(_))
    ));
    let opts = ClusterOptions {
        primary_conf: vec![("no_such_setting".into(), "1".into())],
        ..Default::default()
    };
    let err = LocalCluster::start(opts).err().expect("must fail");
    let text = err.to_string();
    assert!(text.contains("no_such_setting"), "{text}");
}

#[test]
fn cleanup_stale_kills_servers_of_dead_owners() {
    let cluster = LocalCluster::start(ClusterOptions {
        replicas: 1,
        ..Default::default()
    })
    .expect("start");
    let dir = cluster.inner.dir.path().to_path_buf();
    let pids: Vec<String> = std::iter::once(&cluster.primary)
        .chain(&cluster.replicas)
        .map(postmaster_pid)
        .collect();
    // Pretend the owning process crashed: leak the cluster, point owner.pid at a dead pid.
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead = child.id();
    child.wait().expect("wait true");
    fs::write(dir.join("owner.pid"), dead.to_string()).expect("owner.pid");
    std::mem::forget(cluster);
    cleanup_stale();
    assert!(!dir.exists(), "{} still exists", dir.display());
    for pid in pids {
        assert!(process_gone(&pid), "postmaster {pid} still running");
    }
}

#[test]
fn failure_after_primary_started_cleans_up() {
    let opts = ClusterOptions {
        replica_conf: vec![("bogus_replica_setting".into(), "1".into())],
        ..Default::default()
    };
    let text = LocalCluster::start(opts)
        .err()
        .expect("must fail")
        .to_string();
    assert!(text.contains("bogus_replica_setting"), "{text}");
    // The message names the cluster dir; it must be gone, with no server left in it.
    let start = text.find("causeway-pg-").expect("dir in message");
    let end = start + text[start..].find('/').expect("dir end");
    let name = &text[start..end];
    assert!(!base_dir().join(name).exists(), "{name} left behind");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running = fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter(|e| pid_alive(&e.file_name().to_string_lossy()))
            .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
            .any(|cmd| String::from_utf8_lossy(&cmd).contains(name));
        if !running {
            break;
        }
        assert!(Instant::now() < deadline, "a server of {name} still runs");
        thread::sleep(Duration::from_millis(50));
    }
}
