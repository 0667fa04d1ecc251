//! Session parameters a client set (by SET, or in its startup packet). Under transaction
//! pooling they are replayed on whichever backend serves the client's next transaction, and a
//! backend carrying another client's settings is reset first, so nothing leaks between clients.
//! A RESET returns a setting to the client's startup value, as on a server of its own.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use std::sync::Arc;

use super::{Expect, Request};
use crate::classify::{PinReason, SessionCommand};
use crate::error::{BackendError, SessionError};
use crate::pool::Applied;
use crate::pool::queue::Class;
use crate::protocol::{self, tag};
use crate::server::Shared;

/// Startup parameters that are not session settings.
const NOT_SETTINGS: &[&str] = &[
    "user",
    "database",
    "replication",
    "options",
    "client_encoding",
];

/// The setting that, as `serializable`, makes a standby refuse every transaction.
const DEFAULT_ISOLATION: &str = "default_transaction_isolation";

/// One setting as a backend is given it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Entry {
    /// Lower-cased name.
    name: String,
    /// The statement that sets it.
    sql: String,
    /// Its value, when known (`SET … FROM CURRENT` keeps the one before).
    value: Option<String>,
}

/// The client's settings: those in force, and the startup values RESET returns to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Settings {
    /// In force, in the order first set.
    entries: Vec<Entry>,
    /// The startup parameters: what `RESET`, `RESET ALL` and `DISCARD ALL` go back to, as on a
    /// server (a setting not among them goes back to the server's default).
    startup: Vec<Entry>,
    fingerprint: u64,
    /// `default_transaction_isolation` is serializable.
    serializable: bool,
    /// A setting in force keeps the session on one backend (see `classify::values`).
    pin: Option<PinReason>,
}

impl Settings {
    /// Settings from a startup packet: ordinary parameters and `options=-c name=value`.
    pub fn from_startup(params: &[(String, String)]) -> Self {
        let mut s = Settings::default();
        for (name, value) in params {
            let lower = name.to_ascii_lowercase();
            if lower == "options" {
                for (n, v) in parse_options(value) {
                    s.set_value(&n, &v);
                }
            } else if !NOT_SETTINGS.contains(&lower.as_str()) && !lower.starts_with("_pq_.") {
                s.set_value(name, value);
            }
        }
        s.startup = s.entries.clone();
        s.refresh();
        s
    }

    fn set_value(&mut self, name: &str, value: &str) {
        if !is_identifier(name) {
            return;
        }
        // set_config parses the value as the server parses startup options (list-valued
        // settings such as search_path included), which a quoted SET would not.
        let sql = format!(
            "SELECT pg_catalog.set_config('{name}', '{}', false)",
            value.replace('\'', "''")
        );
        self.put(Entry {
            name: name.to_ascii_lowercase(),
            sql,
            value: Some(value.to_string()),
        });
    }

    fn put(&mut self, entry: Entry) {
        match self.entries.iter_mut().find(|e| e.name == entry.name) {
            Some(e) => {
                let value = entry.value.or_else(|| e.value.take());
                *e = Entry { value, ..entry };
            }
            None => self.entries.push(entry),
        }
    }

    /// Records a statement that succeeded outside a transaction (or in one that committed).
    pub fn apply(&mut self, cmd: &SessionCommand, sql: &str) {
        match cmd {
            SessionCommand::Set { name, value } => {
                let mut sql = sql.trim().to_string();
                // A text that may end in a `--` comment gets the line break that ends it, or
                // the comment would swallow the settings (a `SET ROLE`) replayed after it.
                if sql.contains("--") {
                    sql.push('\n');
                }
                self.put(Entry {
                    name: name.clone(),
                    sql,
                    value: value.clone(),
                })
            }
            SessionCommand::Reset { name } => self.reset(name),
            SessionCommand::ResetAll => self.reset_all(),
            SessionCommand::Resets(names) => {
                for name in names {
                    match name {
                        Some(name) => self.reset(name),
                        None => self.reset_all(),
                    }
                }
            }
            SessionCommand::DiscardAll => {
                // DISCARD ALL also resets the role (SET SESSION AUTHORIZATION DEFAULT).
                self.entries = self.startup_except_role().cloned().collect();
            }
            SessionCommand::Deallocate { .. } => {}
        }
        self.refresh();
    }

    /// `RESET name`: back to its startup value, or to the server's default.
    fn reset(&mut self, name: &str) {
        match self.startup.iter().find(|e| e.name == name) {
            Some(e) => {
                let e = e.clone();
                self.put(e);
            }
            None => self.entries.retain(|e| e.name != name),
        }
    }

    /// `RESET ALL` leaves the role alone, as PostgreSQL does.
    fn reset_all(&mut self) {
        let role = self.entries.iter().find(|e| e.name == "role").cloned();
        self.entries = self.startup_except_role().cloned().collect();
        self.entries.extend(role);
    }

    fn startup_except_role(&self) -> impl Iterator<Item = &Entry> {
        self.startup.iter().filter(|e| e.name != "role")
    }

    fn refresh(&mut self) {
        self.fingerprint = if self.entries.is_empty() {
            0
        } else {
            let mut h = DefaultHasher::new();
            self.entries.hash(&mut h);
            h.finish().max(1)
        };
        self.serializable = self.entries.iter().any(|e| {
            e.name == DEFAULT_ISOLATION
                && e.value
                    .as_deref()
                    .is_some_and(|v| v.eq_ignore_ascii_case("serializable"))
        });
        self.pin = self
            .entries
            .iter()
            .find_map(|e| crate::classify::values::pin_for_setting(&e.name, e.value.as_deref()?));
    }

    /// Why these settings keep the session on one primary backend, if they do: they came at
    /// startup (a SET of them pins by itself), so the session's first request takes the pin.
    pub fn pin(&self) -> Option<PinReason> {
        self.pin
    }

    /// Whether a standby would refuse every transaction of this session: its default isolation
    /// is serializable, now or once `pending` (a session command on its way) has run.
    pub fn needs_primary(&self, pending: Option<&SessionCommand>) -> bool {
        self.serializable
            || pending.is_some_and(|cmd| {
                let mut next = self.clone();
                next.apply(cmd, "");
                next.serializable
            })
    }

    /// What a backend carries once these settings are replayed on it.
    pub fn applied(&self) -> Applied {
        Applied {
            fingerprint: self.fingerprint,
            role: self.entries.iter().any(|e| e.name == "role"),
        }
    }

    /// What a backend carrying `current` needs first: another client's settings reset. It is
    /// sent on its own, so that nothing those settings do (a serializable default on a
    /// standby, a short statement_timeout) can undo it.
    pub fn reset_sql(&self, current: Applied) -> Option<&'static str> {
        if current.fingerprint == self.fingerprint || current.fingerprint == 0 {
            return None;
        }
        Some(if current.role {
            "RESET ALL;RESET ROLE;"
        } else {
            "RESET ALL;"
        })
    }

    /// The statements that bring a backend from `current`, once reset, to these settings;
    /// `None` when it already has them or there are none.
    pub fn replay_sql(&self, current: Applied) -> Option<String> {
        if current.fingerprint == self.fingerprint || self.entries.is_empty() {
            return None;
        }
        let mut sql = String::new();
        for e in &self.entries {
            sql.push_str(&e.sql);
            sql.push(';');
        }
        Some(sql)
    }

    /// After `cmd` ran on a backend carrying these settings, the statement that puts back the
    /// startup values it reset there (the backend's own RESET goes to the server's defaults);
    /// `None` when it reset none. Only settings the reset reached are touched: the client's own
    /// values are the session's (source `session`), a reset one is the server's again. So a
    /// statement that failed, and its reset with it, is left as it is.
    pub fn restore_sql(&self, cmd: &SessionCommand) -> Option<String> {
        let all = || self.startup_except_role().map(|e| e.name.as_str());
        let names: Vec<&str> = match cmd {
            SessionCommand::Reset { name } => vec![name.as_str()],
            SessionCommand::ResetAll | SessionCommand::DiscardAll => all().collect(),
            SessionCommand::Resets(names) => {
                let mut out = Vec::new();
                for name in names {
                    match name {
                        Some(name) => out.push(name.as_str()),
                        None => out.extend(all()),
                    }
                }
                out
            }
            SessionCommand::Set { .. } | SessionCommand::Deallocate { .. } => return None,
        };
        let mut values = String::new();
        for e in self
            .startup
            .iter()
            .filter(|e| names.contains(&e.name.as_str()))
        {
            let Some(value) = &e.value else {
                continue;
            };
            if !values.is_empty() {
                values.push_str(", ");
            }
            values.push_str(&format!("('{}', '{}')", e.name, value.replace('\'', "''")));
        }
        (!values.is_empty()).then(|| {
            format!(
                "SELECT pg_catalog.set_config(s.name, v.value, false) \
                 FROM pg_catalog.pg_settings s JOIN (VALUES {values}) AS v(name, value) \
                 ON lower(s.name) = v.name WHERE s.source <> 'session'"
            )
        })
    }
}

impl super::Session {
    /// Brings a freshly taken backend to the client's settings (resetting another client's),
    /// pipelined ahead of the request; its output is not shown to the client, its errors are.
    pub(super) fn replay_settings(&mut self) {
        let Some(lease) = self.lease.as_mut() else {
            return;
        };
        let conn = lease.conn();
        let current = conn.applied;
        if current.fingerprint == self.settings.fingerprint {
            // The common case: the backend carries these settings already.
            return;
        }
        // Statements the request prepares belong to these settings already; should the
        // replay fail, the connection is closed with them.
        conn.set_applied(self.settings.applied());
        let reset = self.settings.reset_sql(current).map(str::to_string);
        for sql in [reset, self.settings.replay_sql(current)]
            .into_iter()
            .flatten()
        {
            self.queue_settings(&sql, true);
        }
    }

    /// Waits for the settings replay ahead of `req` when it sets a role, before the request
    /// goes out: a request that ran without its role, should the server refuse it (the role
    /// revoked since `SET ROLE`), would run with the login's privileges. `Ok(false)`: refused;
    /// the client has the server's error and its request did not run. Other replays travel
    /// with the request, in the same round trip.
    pub(super) async fn confirm_role_replay(
        &mut self,
        req: &Request,
    ) -> Result<bool, SessionError> {
        let replaying = !self.replies.is_empty()
            && self
                .replies
                .iter()
                .all(|e| matches!(e, Expect::Settings { .. }));
        if !replaying || !self.settings.applied().role {
            return Ok(true);
        }
        let Some(lease) = self.lease.as_mut() else {
            return Ok(true);
        };
        let conn = lease.conn();
        let mut owed = self.replies.len();
        let mut error = None;
        let exchange = async {
            conn.transport.flush().await?;
            while owed > 0 {
                let frame = conn.transport.reply_frame().await?;
                match frame.tag {
                    tag::BE_READY_FOR_QUERY => owed -= 1,
                    tag::BE_ERROR_RESPONSE => {
                        error.get_or_insert(frame);
                    }
                    _ => {}
                }
            }
            Ok(())
        };
        if let Err(e) = exchange.await {
            return self.backend_failed(Some(e)).await.map(|_| false);
        }
        self.replies.clear();
        let Some(error) = error else {
            return Ok(true);
        };
        self.refuse_after_failed_replay(req, &error);
        Ok(false)
    }

    /// The client's settings could not be put in place on this connection: `req` does not run
    /// here, the client gets the server's `error`, and the connection is never reused.
    pub(super) fn refuse_after_failed_replay(&mut self, req: &Request, error: &protocol::Frame) {
        self.settings_failed();
        self.fail_request_with(req, error);
        self.release_if_idle();
    }

    /// The proxy's reset, replay or restore of settings failed: what the connection carries
    /// is unknown, so it is never reused.
    pub(super) fn settings_failed(&mut self) {
        if let Some(l) = self.lease.as_mut() {
            let conn = l.conn();
            conn.broken = true;
            conn.set_applied(Applied::UNKNOWN);
        }
    }

    /// Queues one of the proxy's own settings statements on the backend (see
    /// [`Expect::Settings`]).
    pub(super) fn queue_settings(&mut self, sql: &str, shown: bool) {
        if let Some(lease) = self.lease.as_mut() {
            let conn = lease.conn();
            conn.transport.queue(&protocol::encode_query(sql));
            // A simple query ends the unnamed statement.
            conn.statements.unnamed = None;
            self.replies.push_back(Expect::Settings { shown });
        }
    }
}

/// Most (login, settings) pairs remembered as accepted; past it the memory starts over.
const MAX_CHECKED: usize = 10_000;

/// Startup parameters are replayed with `set_config` on every server connection the client is
/// given, after its login. One the server refuses would fail there, on the client's first
/// statement, and leave the parameters after it unset (a `search_path` among them). So each
/// login's set of startup parameters is tried once, in a transaction that is rolled back, and
/// a refusal refuses the login with the server's error, as the server itself would. Without
/// any server to try them on, the login goes ahead.
pub async fn check_startup_settings(
    shared: &Arc<Shared>,
    user: &str,
    database: &str,
    startup: &[(String, String)],
) -> Result<(), SessionError> {
    let settings = Settings::from_startup(startup);
    let Some(sql) = settings.replay_sql(Applied::default()) else {
        return Ok(());
    };
    let login = crate::pool::login_key(user, database);
    let key = (login, settings.fingerprint);
    if shared.checked_settings.contains(&key) {
        return Ok(());
    }
    // A server that stops answering holds the login no longer than it would hold a connection
    // attempt; the next server is asked instead.
    let limit = std::time::Duration::from_millis(shared.cfg.load().server.connect_timeout_ms);
    for node in &shared.cluster.nodes() {
        let Some(pool) = shared.pools.get(node, &key.0) else {
            continue;
        };
        let Ok(mut lease) = pool.acquire(Class::Write).await else {
            continue;
        };
        let conn = lease.conn();
        // A simple query ends the unnamed statement.
        conn.statements.unnamed = None;
        let exchange = async {
            let tried = conn.simple_query(&format!("BEGIN;{sql}")).await;
            (tried, conn.simple_query("ROLLBACK").await.is_ok())
        };
        let Ok((tried, rolled_back)) = tokio::time::timeout(limit, exchange).await else {
            // Its replies may still come: the connection is not handed to anyone.
            lease.conn().broken = true;
            tracing::warn!(node = %node.name, "no answer to the login's settings check; asking the next server");
            continue;
        };
        let conn = lease.conn();
        if !rolled_back {
            conn.broken = true;
        }
        match tried {
            Ok(()) => {
                if shared.checked_settings.len() >= MAX_CHECKED {
                    shared.checked_settings.clear();
                }
                shared.checked_settings.insert(key);
                return Ok(());
            }
            Err(e @ BackendError::Login { .. }) => return Err(e.into()),
            Err(_) => conn.broken = true,
        }
    }
    Ok(())
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// The value a login asked for `name` in its startup packet (a parameter, or `options=-c`).
pub fn startup_value(params: &[(String, String)], name: &str) -> Option<String> {
    Settings::from_startup(params)
        .entries
        .into_iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value)
}

/// Parses libpq's `options`: `-c name=value`, `-cname=value`, `--name=value`, with backslash
/// escaping spaces.
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let assignment = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("-c") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("--").map(str::to_string)
        };
        if let Some((n, v)) = assignment.as_deref().and_then(|a| a.split_once('=')) {
            out.push((n.replace('-', "_"), v.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn startup_parameters_become_settings() {
        let s = Settings::from_startup(&params(&[
            ("user", "app"),
            ("database", "app"),
            ("client_encoding", "UTF8"),
            ("application_name", "it's me"),
            (
                "options",
                "-c search_path=a,b -cstatement_timeout=5s --work-mem=64MB",
            ),
            ("_pq_.x", "y"),
        ]));
        let sql = s.replay_sql(Applied::default()).unwrap();
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config('application_name', 'it''s me', false);\
             SELECT pg_catalog.set_config('search_path', 'a,b', false);\
             SELECT pg_catalog.set_config('statement_timeout', '5s', false);\
             SELECT pg_catalog.set_config('work_mem', '64MB', false);"
        );
    }

    #[test]
    fn set_reset_and_replay() {
        let mut s = Settings::default();
        assert!(s.replay_sql(Applied::default()).is_none());
        let set = |n: &str| SessionCommand::Set {
            name: n.into(),
            value: None,
        };
        s.apply(&set("search_path"), "SET search_path = x");
        s.apply(&set("role"), "SET ROLE bob");
        s.apply(&set("search_path"), " SET search_path = y ");
        let a = s.applied();
        assert!(a.role && a.fingerprint != 0);
        assert_eq!(
            s.replay_sql(Applied::default()).unwrap(),
            "SET search_path = y;SET ROLE bob;"
        );
        assert!(s.reset_sql(Applied::default()).is_none());
        assert!(
            s.replay_sql(a).is_none() && s.reset_sql(a).is_none(),
            "a backend that has them needs nothing"
        );
        // Another client's backend is reset first, role included, by a statement of its own.
        let other = Applied {
            fingerprint: 42,
            role: true,
        };
        assert_eq!(s.reset_sql(other), Some("RESET ALL;RESET ROLE;"));
        assert_eq!(
            s.replay_sql(other).unwrap(),
            "SET search_path = y;SET ROLE bob;"
        );
        // A line comment at the end of a client's text ends with its line.
        s.apply(&set("search_path"), "SET search_path = z -- by the ORM");
        assert_eq!(
            s.replay_sql(other).unwrap(),
            "SET search_path = z -- by the ORM\n;SET ROLE bob;"
        );
        s.apply(&SessionCommand::ResetAll, "RESET ALL");
        assert_eq!(s.replay_sql(Applied::default()).unwrap(), "SET ROLE bob;");
        s.apply(
            &SessionCommand::Reset {
                name: "role".into(),
            },
            "RESET ROLE",
        );
        assert!(s.replay_sql(Applied::default()).is_none());
        // Back to defaults: a dirty backend only needs the reset.
        assert_eq!(s.reset_sql(other), Some("RESET ALL;RESET ROLE;"));
        assert!(s.replay_sql(other).is_none());
        let no_role = Applied {
            fingerprint: 42,
            role: false,
        };
        assert_eq!(s.reset_sql(no_role), Some("RESET ALL;"));
    }

    /// RESET, RESET ALL and DISCARD ALL return to the startup values, as on a server; a
    /// setting not given at startup returns to the server's default.
    #[test]
    fn resets_return_to_startup_values() {
        let startup = Settings::from_startup(&params(&[
            ("application_name", "myapp"),
            (
                "options",
                "-c search_path=s1,public -c statement_timeout=1234",
            ),
        ]));
        let set = |n: &str, v: &str| SessionCommand::Set {
            name: n.into(),
            value: Some(v.into()),
        };
        let reset = |n: &str| SessionCommand::Reset { name: n.into() };
        let mut s = startup.clone();
        s.apply(&set("search_path", "x"), "SET search_path = x");
        s.apply(&set("work_mem", "7MB"), "SET work_mem = '7MB'");
        s.apply(&set("role", "bob"), "SET ROLE bob");
        assert_ne!(s.applied(), startup.applied());

        let mut r = s.clone();
        r.apply(&reset("search_path"), "RESET search_path");
        r.apply(&reset("work_mem"), "RESET work_mem");
        r.apply(&reset("role"), "RESET ROLE");
        assert_eq!(r.applied(), startup.applied(), "RESET of each");

        let mut r = s.clone();
        r.apply(&SessionCommand::ResetAll, "RESET ALL");
        assert_eq!(
            r.replay_sql(Applied::default()).unwrap(),
            "SELECT pg_catalog.set_config('application_name', 'myapp', false);\
             SELECT pg_catalog.set_config('search_path', 's1,public', false);\
             SELECT pg_catalog.set_config('statement_timeout', '1234', false);\
             SET ROLE bob;",
            "RESET ALL keeps the role"
        );

        for cmd in [
            SessionCommand::DiscardAll,
            SessionCommand::Resets(vec![Some("role".into()), None]),
        ] {
            let mut r = s.clone();
            r.apply(&cmd, "");
            assert_eq!(r.applied(), startup.applied(), "{cmd:?}");
        }

        // What a backend needs after running the client's reset itself, which goes to the
        // server's defaults: the startup values, where the reset reached.
        let restore = s.restore_sql(&SessionCommand::ResetAll).unwrap();
        assert!(
            restore.contains(
                "(VALUES ('application_name', 'myapp'), ('search_path', 's1,public'), \
                 ('statement_timeout', '1234'))"
            ) && restore.contains("source <> 'session'"),
            "{restore}"
        );
        let restore = s.restore_sql(&reset("search_path")).unwrap();
        assert!(
            restore.contains("(VALUES ('search_path', 's1,public'))"),
            "{restore}"
        );
        assert!(s.restore_sql(&reset("work_mem")).is_none());
        let resets =
            SessionCommand::Resets(vec![Some("work_mem".into()), Some("search_path".into())]);
        let restore = s.restore_sql(&resets).unwrap();
        assert!(
            restore.contains("(VALUES ('search_path', 's1,public'))"),
            "{restore}"
        );
        assert!(s.restore_sql(&set("search_path", "y")).is_none());
        assert!(
            Settings::default()
                .restore_sql(&SessionCommand::ResetAll)
                .is_none()
        );
    }

    /// A standby cannot start a transaction of a session whose default isolation is
    /// serializable, however it was spelled or set.
    #[test]
    fn serializable_default_needs_the_primary() {
        let dti = "default_transaction_isolation";
        let set = |v: &str| SessionCommand::Set {
            name: dti.into(),
            value: Some(v.into()),
        };
        let reset = SessionCommand::Reset { name: dti.into() };
        let plain = Settings::default();
        assert!(!plain.needs_primary(None));
        assert!(plain.needs_primary(Some(&set("SERIALIZABLE"))));
        assert!(!plain.needs_primary(Some(&set("repeatable read"))));
        let mut s = plain.clone();
        s.apply(&set("Serializable"), "");
        assert!(s.needs_primary(None));
        // The command that leaves serializable still runs where the session's did.
        assert!(s.needs_primary(Some(&set("read committed"))));
        s.apply(&set("read committed"), "");
        assert!(!s.needs_primary(None));
        // FROM CURRENT keeps the value.
        s.apply(&set("serializable"), "");
        s.apply(
            &SessionCommand::Set {
                name: dti.into(),
                value: None,
            },
            "SET default_transaction_isolation FROM CURRENT",
        );
        assert!(s.needs_primary(None));
        s.apply(&SessionCommand::ResetAll, "RESET ALL");
        assert!(!s.needs_primary(None));

        for options in [
            "-c default_transaction_isolation=serializable",
            "--default-transaction-isolation=SERIALIZABLE",
        ] {
            let mut s = Settings::from_startup(&params(&[("options", options)]));
            assert!(s.needs_primary(None), "{options}");
            s.apply(&set("read committed"), "");
            assert!(!s.needs_primary(None));
            assert!(
                s.needs_primary(Some(&reset)),
                "RESET returns to the startup value"
            );
            s.apply(&SessionCommand::DiscardAll, "DISCARD ALL");
            assert!(s.needs_primary(None));
        }
        let s = Settings::from_startup(&params(&[(dti, "serializable")]));
        assert!(s.needs_primary(None));
    }

    /// Startup settings the proxy cannot follow across backends pin the session, and still do
    /// after RESET ALL or DISCARD ALL, which return to them.
    #[test]
    fn startup_settings_that_pin() {
        let scs = "standard_conforming_strings";
        for (startup, pin) in [
            (
                vec![("search_path", "pg_temp,public")],
                Some(PinReason::TempTable),
            ),
            (
                vec![("options", "-c search_path=public,pg_temp")],
                Some(PinReason::TempTable),
            ),
            (vec![(scs, "off")], Some(PinReason::NonStandardStrings)),
            (
                vec![("options", "-c standard_conforming_strings=false")],
                Some(PinReason::NonStandardStrings),
            ),
            (vec![(scs, "on"), ("search_path", "public")], None),
            (vec![], None),
        ] {
            let mut s = Settings::from_startup(&params(&startup));
            assert_eq!(s.pin(), pin, "{startup:?}");
            s.apply(&SessionCommand::ResetAll, "RESET ALL");
            assert_eq!(s.pin(), pin, "{startup:?} after RESET ALL");
            s.apply(&SessionCommand::DiscardAll, "DISCARD ALL");
            assert_eq!(s.pin(), pin, "{startup:?} after DISCARD ALL");
        }
        assert_eq!(
            startup_value(
                &params(&[("options", "-c standard_conforming_strings=off")]),
                scs
            ),
            Some("off".to_string())
        );
        assert_eq!(
            startup_value(&params(&[("application_name", "x")]), scs),
            None
        );
    }
}
