//! Client start-up: TLS refusal, cancel requests, protocol negotiation, authentication and
//! the greeting, up to the session (or the admin console) taking over.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Shared;
use crate::clients::ClientAddr;
use crate::config::ClientTls;
use crate::error::SessionError;
use crate::protocol::{self, StartupMessage, TxStatus};
use crate::session::Session;
use crate::stats::LoginFailure;
use crate::tls::Stream;
use crate::transport::Transport;
/// Client encodings the proxy accepts: it relays bytes and classifies them as UTF-8.
fn is_utf8_encoding(name: &str) -> bool {
    // asyncpg sends the value quoted ('utf-8'), which PostgreSQL accepts too.
    let n = name
        .trim()
        .trim_matches('\'')
        .to_ascii_lowercase()
        .replace(['-', '_'], "");
    n == "utf8" || n == "unicode"
}

/// Whether a `replication` startup parameter asks for a replication connection. PostgreSQL
/// reads it as a boolean or `database`; only its spellings of false (`parse_bool`: `false`,
/// `off`, `no`, `0` and their unambiguous prefixes, any case) leave an ordinary session.
fn wants_replication(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    let off = prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || v == "0";
    !off
}

/// Waits on the client before it has logged in: at most until the login deadline, and not
/// past the start of a shutdown, which a socket that has not logged in must not hold up.
async fn before_login<T>(
    shared: &Shared,
    deadline: tokio::time::Instant,
    step: impl Future<Output = T>,
) -> Result<T, SessionError> {
    tokio::select! {
        done = step => Ok(done),
        () = tokio::time::sleep_until(deadline) => Err(SessionError::LoginTimeout),
        () = shared.shutdown.cancelled() => Err(SessionError::Shutdown),
    }
}

async fn refuse(t: &mut Transport<Stream>, e: &SessionError) {
    t.queue(&protocol::error_response(
        "FATAL",
        e.sqlstate(),
        &e.to_string(),
    ));
    t.shutdown().await;
}

pub(super) async fn handle_client(
    stream: Stream,
    peer: ClientAddr,
    id: u64,
    shared: &Arc<Shared>,
) -> Result<(), SessionError> {
    let max_message = shared.cfg.load().server.max_message_bytes;
    // Waiting on the client is bounded until it has logged in: an idle socket must not hold a
    // slot of max_client_connections.
    let login_deadline = tokio::time::Instant::now()
        + std::time::Duration::from_millis(shared.cfg.load().server.login_timeout_ms);
    // TLS is offered over TCP only, as PostgreSQL does: a Unix socket does not leave the machine.
    let local = peer == ClientAddr::Local;
    // Until the client has logged in, no message may be longer than a password message:
    // a socket that never logs in cannot make the proxy hold `max_message_bytes`.
    let mut t = Transport::new(stream, crate::auth::MAX_PASSWORD_MESSAGE_BYTES);
    // Each encryption request is answered once, as PostgreSQL does: GSSAPI may follow a refused
    // SSLRequest and the other way round, but a repeated request is a protocol error.
    let (mut ssl_done, mut gss_done) = (false, false);
    let (minor, params) = loop {
        let startup = before_login(shared, login_deadline, t.read_startup()).await;
        // Like PostgreSQL before a startup packet: close without a word.
        let startup = startup?;
        // The request codes, read as protocol versions, are 1234.5679 and 1234.5680.
        let repeated = match startup {
            Ok(Some(StartupMessage::SslRequest)) => {
                std::mem::replace(&mut ssl_done, true).then_some(5679)
            }
            Ok(Some(StartupMessage::GssEncRequest)) => {
                std::mem::replace(&mut gss_done, true).then_some(5680)
            }
            _ => None,
        };
        if let Some(minor) = repeated {
            let e = SessionError::from(protocol::ProtocolError::UnsupportedProtocol {
                major: 1234,
                minor,
            });
            refuse(&mut t, &e).await;
            return Err(e);
        }
        let encryption = match startup {
            Ok(Some(StartupMessage::SslRequest)) => Some("SSL request"),
            Ok(Some(StartupMessage::GssEncRequest)) => Some("GSSAPI encryption request"),
            _ => None,
        };
        let acceptor = shared.tls.acceptor.clone().filter(|_| {
            matches!(startup, Ok(Some(StartupMessage::SslRequest)))
                && !t.get_ref().is_tls()
                && !local
        });
        if let Some(request) = encryption {
            t.queue_bytes(if acceptor.is_some() { b"S" } else { b"N" });
            t.flush().await.map_err(SessionError::ClientIo)?;
            if t.buffered_input() > 0 {
                // Sent before the answer, so not encrypted: anyone on the path could have
                // injected it. Refused as PostgreSQL refuses it, in plain text.
                let e = SessionError::from(protocol::ProtocolError::UnencryptedData(request));
                refuse(&mut t, &e).await;
                return Err(e);
            }
        }
        match startup {
            Ok(Some(StartupMessage::SslRequest | StartupMessage::GssEncRequest)) => {
                let Some(acceptor) = acceptor else {
                    continue;
                };
                let (stream, _) = t.into_inner();
                let Stream::Plain(tcp) = stream else {
                    return Ok(());
                };
                let tls = before_login(shared, login_deadline, acceptor.accept(tcp))
                    .await?
                    .map_err(SessionError::ClientIo)?;
                t = Transport::new(
                    Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))),
                    crate::auth::MAX_PASSWORD_MESSAGE_BYTES,
                );
                // Encrypted already: a GSSAPI request now is a protocol error too.
                gss_done = true;
            }
            Ok(Some(StartupMessage::Cancel { pid, secret })) => {
                shared.cancels.cancel((pid, secret)).await;
                return Ok(());
            }
            Ok(Some(StartupMessage::Startup { minor, params, .. })) => break (minor, params),
            Ok(None) => return Ok(()),
            Err(e) => {
                let e = SessionError::from(e);
                refuse(&mut t, &e).await;
                return Err(e);
            }
        }
    };
    if shared.tls.client_mode == ClientTls::Require && !t.get_ref().is_tls() && !local {
        let e = SessionError::AuthRejected(
            "SSL connection is required (tls.client_mode = \"require\")".into(),
        );
        let named = |k: &str| params.iter().find(|(n, _)| n == k).map_or("", |(_, v)| v);
        let (user, db) = (named("user"), named("database"));
        super::login_failed(shared, peer, user, db, LoginFailure::TlsRequired, &e);
        refuse(&mut t, &e).await;
        return Err(e);
    }
    let limit = shared.cfg.load().server.max_client_connections;
    if limit > 0 && shared.stats.clients_open.load(Ordering::Acquire) > limit as u64 {
        let e = SessionError::TooManyClients(format!(
            "server.max_client_connections ({limit}) reached"
        ));
        refuse(&mut t, &e).await;
        return Err(e);
    }
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = param("user").filter(|u| !u.is_empty()) else {
        let e = SessionError::AuthRejected(
            "no PostgreSQL user name specified in startup packet".into(),
        );
        let db = param("database").unwrap_or_default();
        super::login_failed(shared, peer, "", &db, LoginFailure::UnknownUser, &e);
        refuse(&mut t, &e).await;
        return Err(e);
    };
    let database = param("database").unwrap_or_else(|| user.clone());
    tracing::Span::current().record("user", user.as_str());
    tracing::Span::current().record("db", database.as_str());
    // As the server: a newer minor version asked for, or any `_pq_.` option (none is known).
    let unknown: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.as_str())
        .collect();
    if minor > 0 || !unknown.is_empty() {
        t.queue(&protocol::negotiate_protocol_version(0, &unknown));
    }
    if let Some(enc) = param("client_encoding")
        && !is_utf8_encoding(&enc)
    {
        let e = SessionError::Unsupported(format!(
            "client_encoding \"{enc}\" is not supported by the proxy; use UTF8"
        ));
        refuse(&mut t, &e).await;
        return Err(e);
    }
    if let Some(mode) = param("replication")
        && wants_replication(&mode)
    {
        // Streaming replication and logical decoding need the server itself: its WAL sender
        // speaks a protocol of its own, which a pooled connection cannot carry.
        let e = SessionError::Unsupported(
            "replication connections are not supported by the proxy; connect to the server directly"
                .into(),
        );
        refuse(&mut t, &e).await;
        return Err(e);
    }
    let authenticated = before_login(
        shared,
        login_deadline,
        shared.auth.authenticate(&mut t, &user),
    )
    .await;
    if let Err(e) = authenticated.and_then(|a| a) {
        if !e.is_client_gone() {
            super::auth_failed(shared, peer, &user, &database, &e);
            refuse(&mut t, &e).await;
        }
        return Err(e);
    }
    t.set_max_message(max_message);
    let registered = shared.clients.register(id, peer, &user, &database);
    if let Some(limit) = shared
        .cfg
        .load()
        .user(&user)
        .and_then(|u| u.max_connections)
        && shared.clients.count_user(&user) > limit
    {
        drop(registered);
        let e =
            SessionError::TooManyClients(format!("user \"{user}\" has max_connections = {limit}"));
        refuse(&mut t, &e).await;
        return Err(e);
    }
    if database == crate::admin::console::DATABASE {
        return admin_console(t, shared, peer, &user).await;
    }
    let server_params = match greeting_params(shared, &user, &database).await {
        Ok(p) => p,
        Err(e) => {
            refuse(&mut t, &e).await;
            return Err(e);
        }
    };
    if let Err(e) = crate::session::check_startup_settings(shared, &user, &database, &params).await
    {
        refuse(&mut t, &e).await;
        return Err(e);
    }
    // Drivers escape literals by the standard_conforming_strings they are told: told the
    // server's while the login asked for another, they would escape for the wrong one.
    let strings_asked = crate::session::startup_value(&params, STRINGS);
    let mut role_default = None;
    for (k, v) in &server_params {
        let value = match k.as_str() {
            "application_name" => param("application_name").unwrap_or_default(),
            "client_encoding" => "UTF8".to_string(),
            STRINGS => match &strings_asked {
                Some(asked) if crate::classify::values::spells_true(asked) => "on".to_string(),
                Some(_) => "off".to_string(),
                None => v.clone(),
            },
            _ => v.clone(),
        };
        if k == STRINGS && strings_asked.is_none() && value != "on" {
            // Off for this role or database on the server: the session starts with it off,
            // exactly as if it had asked (see `classify::values`).
            role_default = Some((STRINGS.to_string(), value.clone()));
        }
        t.queue(&protocol::parameter_status(k, &value));
    }
    let mut params = params;
    params.extend(role_default);
    let key = shared.cancels.register();
    t.queue(&protocol::backend_key_data(key.key.0, key.key.1));
    let classifier = shared.catalogs.classifier(&database, &user).await;
    t.queue(&protocol::ready_for_query(TxStatus::Idle));
    t.flush().await.map_err(SessionError::ClientIo)?;
    t.accept_only(protocol::session_message_limit);
    tracing::debug!("client ready");
    let session = Session::new(
        Arc::clone(shared),
        t,
        classifier,
        Arc::clone(&key.slot),
        &params,
        Arc::clone(&registered.info),
    );
    session.run().await
}

/// The setting whose value decides how the server splits string literals.
const STRINGS: &str = "standard_conforming_strings";

/// Opens the admin console for an admin user; anyone else is refused.
async fn admin_console(
    mut t: Transport<Stream>,
    shared: &Arc<Shared>,
    peer: ClientAddr,
    user: &str,
) -> Result<(), SessionError> {
    if !shared.cfg.load().admin.users.iter().any(|u| u == user) {
        let e = SessionError::AuthRejected(format!(
            "user \"{user}\" may not use the admin console (see admin.users)"
        ));
        let console = crate::admin::console::DATABASE;
        super::login_failed(shared, peer, user, console, LoginFailure::AdminConsole, &e);
        refuse(&mut t, &e).await;
        return Err(e);
    }
    for (k, v) in [
        ("server_version", "15.0 (causeway admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        t.queue(&protocol::parameter_status(k, v));
    }
    t.queue(&protocol::backend_key_data(0, 0));
    t.queue(&protocol::ready_for_query(TxStatus::Idle));
    t.flush().await.map_err(SessionError::ClientIo)?;
    tracing::info!(user, "admin console session");
    crate::admin::console::serve(t, Arc::clone(shared)).await
}

/// Server parameters to greet a client with: from the primary's pool, else any replica's.
async fn greeting_params(
    shared: &Arc<Shared>,
    user: &str,
    database: &str,
) -> Result<Vec<(String, String)>, SessionError> {
    let mut last = None;
    let login = crate::pool::login_key(user, database);
    for node in &shared.cluster.nodes() {
        let Some(pool) = shared.pools.get(node, &login) else {
            return Err(SessionError::AuthRejected(format!(
                "user \"{user}\" is not configured"
            )));
        };
        match pool.server_params().await {
            Ok(p) => return Ok(p),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => e.into(),
        None => SessionError::Unsupported("no servers configured".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_false_replication_is_an_ordinary_session() {
        for v in [
            "false", "FALSE", "f", "fal", "off", "of", "OFF", "no", "n", "0",
        ] {
            assert!(!wants_replication(v), "{v}");
        }
        for v in [
            "true", "on", "yes", "1", "database", "DATABASE", "o", "bogus", "", "falsey", "00",
        ] {
            assert!(wants_replication(v), "{v}");
        }
    }
}
