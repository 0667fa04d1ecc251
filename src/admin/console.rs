//! The admin console: a client connecting to the virtual database `causeway` as one of
//! `admin.users` gets a PgBouncer-style command set over the simple query protocol:
//! `SHOW POOLS | REPLICAS | STATS | CLIENTS | CONFIG | HELP`, `DRAIN name`, `UNDRAIN name`,
//! and `SHOW causeway.pools | causeway.stats` as on any connection.
//! Every number comes from the same [`Snapshot`] as `GET /stats`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::tls::Stream;
use serde_json::Value;

use super::snapshot::{Snapshot, Waits};
use crate::error::SessionError;
use crate::protocol::{self, TxStatus, tag};
use crate::server::Shared;
use crate::transport::Transport;

/// Name of the virtual database that opens the console.
pub const DATABASE: &str = "causeway";

/// A result set of text columns; `None` is SQL NULL.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Option<String>>>,
}

const SYNTAX_ERROR: &str = "42601";
const UNDEFINED_OBJECT: &str = "42704";
const FEATURE_NOT_SUPPORTED: &str = "0A000";

const HELP: &str = "SHOW POOLS | SHOW REPLICAS | SHOW STATS | SHOW CLIENTS | SHOW CONFIG | \
                    SHOW HELP | DRAIN <replica> | UNDRAIN <replica>";

/// Serves console commands until the client leaves.
pub async fn serve(mut t: Transport<Stream>, shared: Arc<Shared>) -> Result<(), SessionError> {
    let mut skip_until_sync = false;
    let shutdown = shared.shutdown.clone();
    loop {
        // An idle console does not hold up a shutdown.
        let read = tokio::select! {
            r = t.read_frame() => r,
            _ = shutdown.cancelled() => {
                let e = SessionError::Shutdown;
                t.queue(&protocol::error_response("FATAL", e.sqlstate(), &e.to_string()));
                t.shutdown().await;
                return Ok(());
            }
        };
        let Some(frame) = read? else {
            return Ok(());
        };
        match frame.tag {
            tag::FE_TERMINATE => return Ok(()),
            tag::FE_QUERY => {
                let sql = protocol::parse_query(frame.body())?.sql.to_string();
                for f in answer(&shared, &sql) {
                    t.queue(&f);
                }
                t.queue(&protocol::ready_for_query(TxStatus::Idle));
            }
            tag::FE_SYNC => {
                skip_until_sync = false;
                t.queue(&protocol::ready_for_query(TxStatus::Idle));
            }
            tag::FE_FLUSH => {}
            _ if skip_until_sync => {}
            tag::FE_PARSE | tag::FE_BIND | tag::FE_DESCRIBE | tag::FE_EXECUTE | tag::FE_CLOSE => {
                skip_until_sync = true;
                t.queue(&protocol::error_response(
                    "ERROR",
                    FEATURE_NOT_SUPPORTED,
                    "the admin console speaks the simple query protocol only",
                ));
            }
            other => {
                return Err(SessionError::ClientProtocol(
                    protocol::ProtocolError::UnexpectedMessage(other),
                ));
            }
        }
        t.flush().await.map_err(SessionError::ClientIo)?;
    }
}

/// The replies to one console command line (without ReadyForQuery).
fn answer(shared: &Shared, sql: &str) -> Vec<protocol::Frame> {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if words.is_empty() {
        return vec![protocol::empty_query_response()];
    }
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let outcome = match upper
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["SHOW", what] if what.starts_with("CAUSEWAY.") => {
            return session_show(shared, &what["CAUSEWAY.".len()..]);
        }
        ["SHOW", what] => show(shared, what).map(|t| (t, "SHOW")),
        ["DRAIN", _] => drain(shared, &words[1], true),
        ["UNDRAIN", _] => drain(shared, &words[1], false),
        _ => Err((
            SYNTAX_ERROR,
            format!("unknown admin console command; try one of: {HELP}"),
        )),
    };
    match outcome {
        Ok((table, command)) => {
            let cols: Vec<&str> = table.columns.clone();
            let mut out = vec![protocol::row_description_text(&cols)];
            for row in &table.rows {
                let values: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
                out.push(protocol::data_row_text(&values));
            }
            let tag = if command == "SHOW" {
                format!("SHOW {}", table.rows.len())
            } else {
                command.to_string()
            };
            out.push(protocol::command_complete(&tag));
            out
        }
        Err((code, message)) => vec![protocol::error_response("ERROR", code, &message)],
    }
}

/// `SHOW causeway.pools` and `SHOW causeway.stats`, answered here as on a data connection,
/// so a script that reads them works on any connection.
fn session_show(shared: &Shared, name: &str) -> Vec<protocol::Frame> {
    let name = name.to_ascii_lowercase();
    let Some((columns, rows)) = crate::session::shared_table(shared, &name) else {
        return vec![protocol::error_response(
            "ERROR",
            UNDEFINED_OBJECT,
            &format!(
                "unrecognized configuration parameter \"causeway.{name}\" on the admin console \
                 (causeway.pools and causeway.stats answer here); try one of: {HELP}"
            ),
        )];
    };
    let cols: Vec<&str> = columns.iter().map(String::as_str).collect();
    let mut out = vec![protocol::row_description_text(&cols)];
    for row in &rows {
        let values: Vec<Option<&str>> = row.iter().map(|v| Some(v.as_str())).collect();
        out.push(protocol::data_row_text(&values));
    }
    out.push(protocol::command_complete(&format!("SHOW {}", rows.len())));
    out
}

type Outcome = Result<(Table, &'static str), (&'static str, String)>;

fn show(shared: &Shared, what: &str) -> Result<Table, (&'static str, String)> {
    let snap = || Snapshot::collect(shared);
    Ok(match what {
        "POOLS" => pools_table(&snap()),
        "REPLICAS" | "SERVERS" | "BACKENDS" => replicas_table(&snap()),
        "STATS" => stats_table(&snap()),
        "CLIENTS" => clients_table(shared),
        "CONFIG" => config_table(shared),
        "HELP" => Table {
            columns: vec!["command"],
            rows: HELP
                .split(" | ")
                .map(|c| vec![Some(c.to_string())])
                .collect(),
        },
        other => {
            return Err((
                UNDEFINED_OBJECT,
                format!("unknown SHOW {other}; try one of: {HELP}"),
            ));
        }
    })
}

fn drain(shared: &Shared, name: &str, drained: bool) -> Outcome {
    let node = shared
        .cluster
        .replicas()
        .iter()
        .find(|n| n.name == name)
        .cloned()
        .ok_or_else(|| (UNDEFINED_OBJECT, format!("no replica named {name:?}")))?;
    node.drained.store(drained, Ordering::Release);
    tracing::info!(replica = %name, drained, "replica drain changed from the admin console");
    Ok((
        Table {
            columns: vec!["replica", "drained"],
            rows: vec![vec![Some(name.to_string()), Some(drained.to_string())]],
        },
        if drained { "DRAIN" } else { "UNDRAIN" },
    ))
}

fn text(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

fn opt<T: ToString>(v: Option<T>) -> Option<String> {
    v.map(|v| v.to_string())
}

/// `SHOW POOLS`: one row per pool and priority class, as PgBouncer lists pools, then one per
/// server with execution slots and class, with no user or database (its size is `max_active`).
pub fn pools_table(s: &Snapshot) -> Table {
    let mut rows = Vec::new();
    for b in &s.backends {
        for p in &b.pools {
            for q in s
                .queues
                .iter()
                .filter(|q| q.backend == b.name && q.user == p.user && q.database == p.database)
            {
                let mut row = vec![
                    text(&b.name),
                    text(&p.user),
                    text(&p.database),
                    text(q.class),
                    text(p.size),
                    text(p.open),
                    text(p.in_use),
                    text(p.idle),
                ];
                row.extend(wait_cells(&q.waits));
                rows.push(row);
            }
        }
    }
    for b in &s.backends {
        let Some(slots) = &b.slots else {
            continue;
        };
        for q in s.slot_queues.iter().filter(|q| q.backend == b.name) {
            let mut row = vec![
                text(&b.name),
                None,
                None,
                text(q.class),
                text(slots.max_active),
                None,
                text(slots.in_use),
                None,
            ];
            row.extend(wait_cells(&q.waits));
            rows.push(row);
        }
    }
    Table {
        columns: vec![
            "backend",
            "user",
            "database",
            "class",
            "size",
            "open",
            "in_use",
            "idle",
            "waiting",
            "acquired",
            "max_wait_ms",
            "wait_p50_ms",
            "wait_p99_ms",
            "refusals",
            "timeouts",
        ],
        rows,
    }
}

fn wait_cells(w: &Waits) -> [Option<String>; 7] {
    [
        text(w.waiting),
        text(w.acquired),
        text(w.max_wait_ms),
        opt(w.wait_p50_ms),
        opt(w.wait_p99_ms),
        text(w.refusals),
        text(w.timeouts),
    ]
}

/// `SHOW REPLICAS`: every server (the primary first) with health, lag and counts.
pub fn replicas_table(s: &Snapshot) -> Table {
    let rows = s
        .backends
        .iter()
        .map(|b| {
            vec![
                text(&b.name),
                text(b.role),
                text(&b.address),
                text(b.healthy),
                text(b.banned),
                b.ban_reason.clone(),
                text(b.drained),
                b.lsn.clone(),
                opt(b.lag_bytes),
                opt(b.lag_ms),
                text(b.transactions),
                text(b.queries),
                text(b.reads),
                text(b.writes),
                text(b.errors),
                text(b.connections_in_use),
            ]
        })
        .collect();
    Table {
        columns: vec![
            "name",
            "role",
            "address",
            "healthy",
            "banned",
            "ban_reason",
            "drained",
            "lsn",
            "lag_bytes",
            "lag_ms",
            "transactions",
            "queries",
            "reads",
            "writes",
            "errors",
            "connections_in_use",
        ],
        rows,
    }
}

/// `SHOW STATS`: every scalar of the snapshot as (stat, value), named by its JSON path with
/// backends by name (`backends.replica1.reads`, `routing.by_reason.hint`, ...). Pools and
/// queues, execution slots' included, are in `SHOW POOLS`.
pub fn stats_table(s: &Snapshot) -> Table {
    let mut rows = Vec::new();
    let value = serde_json::to_value(s).unwrap_or(Value::Null);
    flatten("", &value, &mut rows);
    Table {
        columns: vec!["stat", "value"],
        rows: rows.into_iter().map(|(k, v)| vec![Some(k), v]).collect(),
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Option<String>)>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                if matches!(k.as_str(), "queues" | "slot_queues" | "pools") {
                    continue;
                }
                flatten(&join(k), v, out);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let key = item
                    .get("name")
                    .and_then(Value::as_str)
                    .map_or_else(|| i.to_string(), str::to_string);
                flatten(&join(&key), item, out);
            }
        }
        Value::Null => out.push((prefix.to_string(), None)),
        Value::String(s) => out.push((prefix.to_string(), Some(s.clone()))),
        other => out.push((prefix.to_string(), Some(other.to_string()))),
    }
}

/// `SHOW CLIENTS`: every connected client.
pub fn clients_table(shared: &Shared) -> Table {
    let rows = shared
        .clients
        .list()
        .iter()
        .map(|c| {
            vec![
                text(c.id),
                text(c.addr),
                text(&c.user),
                text(&c.database),
                text(c.state().as_str()),
                c.node()
                    .and_then(|id| shared.cluster.node(id))
                    .map(|n| n.name.clone()),
                text(c.connected_at_ms),
                text(c.requests.load(Ordering::Relaxed)),
            ]
        })
        .collect();
    Table {
        columns: vec![
            "id",
            "address",
            "user",
            "database",
            "state",
            "backend",
            "connected_at_ms",
            "requests",
        ],
        rows,
    }
}

/// `SHOW CONFIG`: the effective configuration as (key, value), secrets redacted.
pub fn config_table(shared: &Shared) -> Table {
    let mut rows = Vec::new();
    let parsed: Value = toml::from_str::<toml::Value>(&shared.cfg.load().effective_toml())
        .ok()
        .and_then(|t| serde_json::to_value(t).ok())
        .unwrap_or(Value::Null);
    flatten("", &parsed, &mut rows);
    Table {
        columns: vec!["key", "value"],
        rows: rows.into_iter().map(|(k, v)| vec![Some(k), v]).collect(),
    }
}
