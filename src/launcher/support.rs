//! Process, file, template and port helpers for the launcher.

use super::*;

/// Where cluster temp dirs and templates live: $CAUSEWAY_PG_TMPDIR if set, else
/// /dev/shm when it has at least 2 GiB free, else `std::env::temp_dir()`.
pub fn base_dir() -> PathBuf {
    static BASE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        if let Some(dir) = std::env::var_os("CAUSEWAY_PG_TMPDIR").filter(|v| !v.is_empty()) {
            return PathBuf::from(dir);
        }
        let shm = Path::new("/dev/shm");
        let free_kib = Command::new("df")
            .arg("-Pk")
            .arg(shm)
            .stderr(Stdio::null())
            .output()
            .ok()
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.lines()
                    .nth(1)?
                    .split_whitespace()
                    .nth(3)?
                    .parse::<u64>()
                    .ok()
            });
        if shm.is_dir() && free_kib.is_some_and(|k| k >= 2 * 1024 * 1024) {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    })
    .clone()
}

pub(super) fn validate(opts: &ClusterOptions) -> Result<()> {
    let bad = |s: &str| s.is_empty() || s.chars().any(|c| c == '"' || c == '\0' || c.is_control());
    if bad(&opts.database) {
        return Err(LauncherError::InvalidOptions(format!(
            "database name {:?}",
            opts.database
        )));
    }
    for user in &opts.users {
        if bad(&user.name) || user.password.contains('\0') {
            return Err(LauncherError::InvalidOptions(format!(
                "user {:?}",
                user.name
            )));
        }
    }
    for (key, _) in opts.primary_conf.iter().chain(&opts.replica_conf) {
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err(LauncherError::InvalidOptions(format!(
                "setting name {key:?}"
            )));
        }
    }
    Ok(())
}

pub(super) fn hba_conf(users: &[UserSpec]) -> String {
    let mut text = format!(
        "# written by causeway's launcher\n\
         local all {SUPERUSER} trust\n\
         host all {SUPERUSER} {HOST}/32 trust\n\
         host replication all {HOST}/32 trust\n"
    );
    // The Unix socket asks the same as TCP, so a proxy reaching the servers through it logs in
    // the same way.
    for user in users {
        let (name, method) = (&user.name, user.auth.method());
        text.push_str(&format!("local all \"{name}\" {method}\n"));
        text.push_str(&format!("host all \"{name}\" {HOST}/32 {method}\n"));
    }
    text.push_str("local all all scram-sha-256\n");
    text.push_str(&format!("host all all {HOST}/32 scram-sha-256\n"));
    text
}

pub(super) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub(super) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub(super) fn conninfo_value(s: &str) -> String {
    if !s.is_empty() && !s.contains([' ', '\'', '\\']) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

pub(super) fn log_path(node: &NodeInfo) -> PathBuf {
    node.data_dir.join("server.log")
}

pub(super) fn tool_command(
    bin: &Path,
    name: &str,
    run_as: Option<(u32, u32)>,
    cwd: &Path,
) -> Command {
    let mut cmd = Command::new(bin.join(name));
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid).env("HOME", cwd);
    }
    for var in PG_ENV {
        cmd.env_remove(var);
    }
    cmd.current_dir(cwd);
    cmd
}

pub(super) fn write_owned(path: &Path, contents: &str, run_as: Option<(u32, u32)>) -> Result<()> {
    let context = format!("writing {}", path.display());
    fs::write(path, contents).map_err(io_err(context.clone()))?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io_err(context))?;
    }
    Ok(())
}

pub(super) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

pub(super) fn check(cmd: &Command, out: Output, log: Option<&Path>) -> Result<Output> {
    if out.status.success() {
        return Ok(out);
    }
    Err(LauncherError::Command {
        command: describe(cmd),
        status: out.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ),
        log_tail: log.map(log_tail).unwrap_or_default(),
    })
}

pub(super) fn run(cmd: &mut Command, log: Option<&Path>) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("running `{}`", describe(cmd))))?;
    check(cmd, out, log)
}

pub(super) fn run_with_stdin(cmd: &mut Command, input: &str, log: Option<&Path>) -> Result<Output> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(io_err(format!("running `{}`", describe(cmd))))?;
    let stdin = child.stdin.take();
    let out = thread::scope(|s| {
        s.spawn(move || {
            if let Some(mut stdin) = stdin {
                let _ = stdin.write_all(input.as_bytes());
            }
        });
        child.wait_with_output()
    })
    .map_err(io_err(format!("waiting for `{}`", describe(cmd))))?;
    check(cmd, out, log)
}

/// Last lines of a server log, formatted for an error message ("" if none).
pub(super) fn log_tail(path: &Path) -> String {
    let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let text = read_from(path, len.saturating_sub(4000));
    if text.trim().is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(25)..].join("\n");
    format!("\n--- tail of {} ---\n{tail}", path.display())
}

pub(super) fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Polls `ready` every 50 ms until it returns true; errors from it are retried
/// and reported if the timeout passes.
pub(super) fn poll(
    what: &str,
    timeout: Duration,
    log: Option<&Path>,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let last = match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => String::new(),
            Err(e) => format!(" (last error: {e})"),
        };
        if start.elapsed() >= timeout {
            return Err(LauncherError::Timeout {
                what: format!("{what}{last}"),
                waited: start.elapsed(),
                log_tail: log.map(log_tail).unwrap_or_default(),
            });
        }
        thread::sleep(Duration::from_millis(50));
    }
}

pub(super) fn resolve_bin_dir(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let has_initdb = |p: &Path| p.join("initdb").is_file() && p.join("pg_ctl").is_file();
    let from_env = std::env::var_os("CAUSEWAY_PG_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    if let Some(dir) = explicit.or(from_env) {
        return if has_initdb(&dir) {
            Ok(dir)
        } else {
            Err(LauncherError::BinariesNotFound(format!(
                "no initdb/pg_ctl in {}",
                dir.display()
            )))
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_initdb(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_initdb(&dir) {
            return Ok(dir);
        }
    }
    Err(LauncherError::BinariesNotFound(
        "set CAUSEWAY_PG_BIN, or install PostgreSQL (/usr/lib/postgresql/<N>/bin or pg_config --bindir)".into(),
    ))
}

/// Some(postgres uid, gid) when running as root, None otherwise.
pub(super) fn run_as_ids() -> Result<Option<(u32, u32)>> {
    let status =
        fs::read_to_string("/proc/self/status").map_err(io_err("reading /proc/self/status"))?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse::<u32>().ok())
        .ok_or_else(|| LauncherError::User("no Uid line in /proc/self/status".into()))?;
    if euid != 0 {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").map_err(io_err("reading /etc/passwd"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == "postgres")
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .map(Some)
        .ok_or_else(|| {
            LauncherError::User(
                "running as root but there is no `postgres` user in /etc/passwd".into(),
            )
        })
}

pub(super) fn initdb(
    bin: &Path,
    run_as: Option<(u32, u32)>,
    cwd: &Path,
    dest: &Path,
) -> Result<()> {
    let mut cmd = tool_command(bin, "initdb", run_as, cwd);
    cmd.arg("-D").arg(dest);
    cmd.args([
        "-U",
        SUPERUSER,
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
        "--no-instructions",
    ]);
    run(&mut cmd, None)?;
    let conf = dest.join("postgresql.conf");
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .map_err(io_err(format!("opening {}", conf.display())))?;
    file.write_all(b"\ninclude_if_exists = 'causeway.conf'\n")
        .map_err(io_err(format!("writing {}", conf.display())))
}

/// Returns the shared template data dir, creating it under a lock file if
/// needed; None if another process held the lock for too long.
pub(super) fn ensure_template(bin: &Path, run_as: Option<(u32, u32)>) -> Result<Option<PathBuf>> {
    let version = run(Command::new(bin.join("postgres")).arg("--version"), None)?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let major: String = version
        .split(") ")
        .nth(1)
        .unwrap_or("")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    // Keyed by the effective uid too: another user could not copy this one's files.
    let euid = std::os::unix::fs::MetadataExt::uid(
        &fs::metadata("/proc/self").map_err(io_err("reading /proc/self"))?,
    );
    let key = format!("{TEMPLATE_RECIPE}|{version}|{}|{euid}", bin.display());
    let name = format!(
        "causeway-pg-template-{major}-{:016x}",
        fnv1a(key.as_bytes())
    );
    let tmp = base_dir();
    let (home, lock) = (tmp.join(&name), tmp.join(format!("{name}.lock")));
    let (data, ready) = (home.join("data"), home.join("ready"));
    let deadline = Instant::now() + Duration::from_secs(180);
    while !ready.exists() {
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => {
                let result = build_template(bin, run_as, &tmp, &home, &name);
                let _ = fs::remove_file(&lock);
                result?;
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let age = fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .map(|t| t.elapsed().unwrap_or_default());
                if age.is_ok_and(|a| a > Duration::from_secs(120)) {
                    let _ = fs::remove_file(&lock); // left by a crashed process
                } else if Instant::now() > deadline {
                    return Ok(None);
                } else {
                    thread::sleep(Duration::from_millis(100));
                }
            }
            Err(e) => return Err(io_err(format!("creating {}", lock.display()))(e)),
        }
    }
    Ok(Some(data))
}

/// initdb into a staging dir, then rename it into place (atomic for readers).
pub(super) fn build_template(
    bin: &Path,
    run_as: Option<(u32, u32)>,
    tmp: &Path,
    home: &Path,
    name: &str,
) -> Result<()> {
    if home.join("ready").exists() {
        return Ok(());
    }
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let staging = tmp.join(format!("{name}.tmp-{}-{stamp}", std::process::id()));
    let result = (|| {
        fs::create_dir(&staging).map_err(io_err(format!("creating {}", staging.display())))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&staging, Some(uid), Some(gid))
                .map_err(io_err("chowning the template dir"))?;
        }
        initdb(bin, run_as, &staging, &staging.join("data"))?;
        fs::write(staging.join("ready"), "").map_err(io_err("marking the template ready"))?;
        let _ = fs::remove_dir_all(home); // a half-made one from a crashed run
        fs::rename(&staging, home).map_err(io_err(format!(
            "renaming the template to {}",
            home.display()
        )))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// xorshift64*, seeded from pid, time and a per-process counter.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new() -> Rng {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let seed = fnv1a(format!("{}-{nanos}-{count}", std::process::id()).as_bytes());
        Rng(seed | 1)
    }

    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A port in 15000..32000 that 127.0.0.1 can bind right now (races with other
/// processes are handled by retrying the server start).
pub(super) fn pick_port(rng: &mut Rng, avoid: &[u16]) -> Result<u16> {
    for _ in 0..500 {
        let port = PORT_MIN + (rng.next() % u64::from(PORT_MAX - PORT_MIN)) as u16;
        if !avoid.contains(&port) && TcpListener::bind((HOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(LauncherError::NoFreePort)
}

/// Kills servers left by crashed runs: for each `<base_dir or temp_dir>/causeway-pg-*`
/// cluster dir whose owner process is gone (or, lacking owner.pid, older than
/// five minutes), SIGQUITs (then SIGKILLs) each postmaster and removes the dir.
/// Template dirs are kept.
pub fn cleanup_stale() {
    let mut bases = vec![base_dir(), std::env::temp_dir()];
    bases.dedup();
    let dirs = bases.iter().flat_map(fs::read_dir).flatten().flatten();
    for dir in dirs.map(|e| e.path()) {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.starts_with("causeway-pg-")
            || name.starts_with("causeway-pg-template-")
            || !dir.is_dir()
        {
            continue;
        }
        let owner_alive = match fs::read_to_string(dir.join("owner.pid")) {
            Ok(pid) => pid_alive(pid.trim()),
            Err(_) => fs::metadata(&dir)
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(300))
                .unwrap_or(false),
        };
        if owner_alive {
            continue;
        }
        for node in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let pid = fs::read_to_string(node.path().join("postmaster.pid")).unwrap_or_default();
            let Some(pid) = pid
                .lines()
                .next()
                .map(str::trim)
                .filter(|p| p.parse::<u32>().is_ok())
            else {
                continue;
            };
            let _ = Command::new("kill")
                .args(["-QUIT", pid])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_alive(pid) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = Command::new("kill")
                .args(["-KILL", pid])
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// True while /proc/<pid> exists and is not a zombie.
pub(super) fn pid_alive(pid: &str) -> bool {
    let stat = fs::read_to_string(Path::new("/proc").join(pid).join("stat"));
    let state = stat
        .as_deref()
        .ok()
        .and_then(|s| s.rsplit(") ").next()?.chars().next());
    !matches!(state, None | Some('Z'))
}
