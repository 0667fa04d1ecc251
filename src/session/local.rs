//! Requests the proxy answers itself: `causeway.*` commands, statement housekeeping outside a
//! transaction, and session commands whose state the proxy keeps (DEALLOCATE, DISCARD ALL).
//! Answers are queued as synthetic replies, so they stay in order with anything in flight.

use super::{Effect, Expect, Request, Session};
use crate::classify::{ProxyCommand, RouteMode, SessionCommand};
use crate::cluster::lsn;
use crate::pool::queue::{Class, ClassStats};
use crate::protocol::{self, Frame, TxStatus, tag};
use crate::server::Shared;
use std::sync::atomic::Ordering;

/// SQLSTATE for an unknown `causeway.*` setting, as PostgreSQL reports unknown parameters.
const UNDEFINED_OBJECT: &str = "42704";
/// SQLSTATE for a malformed value (an LSN token, a routing mode).
const INVALID_PARAMETER_VALUE: &str = "22023";
/// SQLSTATE for DEALLOCATE of a statement that does not exist.
const INVALID_STATEMENT_NAME: &str = "26000";

/// A command tag and, for SHOW, the rows to return.
pub(super) type LocalAnswer = (&'static str, Option<Table>);

/// A small result set the proxy produces itself (text columns).
#[derive(Debug, Clone)]
pub(super) struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// One column, one row: the answer to `SHOW causeway.<name>`.
    fn value(name: &str, value: String) -> Option<Table> {
        Some(Table {
            columns: vec![format!("causeway.{name}")],
            rows: vec![vec![value]],
        })
    }
}

/// A local answer or an error (SQLSTATE, message).
pub(super) type LocalOutcome = Result<LocalAnswer, (&'static str, String)>;

/// How a session command is served.
pub(super) enum SessionAction {
    /// Answered by the proxy.
    Answered,
    /// Sent to the backend; the effect is recorded once it succeeds.
    Forward(Option<Effect>),
}

/// `SHOW causeway.pools`: each pool's connections and its waiters per priority class.
fn pools_table(shared: &Shared) -> Table {
    let mut rows = Vec::new();
    for pool in shared.pools.all() {
        let stats = pool.queue().stats();
        for class in Class::ALL {
            let mut row = vec![
                pool.name.clone(),
                class.as_str().to_string(),
                pool.max().to_string(),
                pool.open.load(Ordering::Relaxed).to_string(),
                pool.idle_count().to_string(),
            ];
            row.extend(wait_cells(stats.class(class)));
            rows.push(row);
        }
    }
    // A server's execution slots queue like a pool: `size` and `open` are `max_active`,
    // `idle` the slots no statement holds.
    for node in shared.cluster.nodes() {
        let Some(slots) = &node.slots else {
            continue;
        };
        let stats = slots.stats();
        for class in Class::ALL {
            let mut row = vec![
                format!("{} execution slots", node.name),
                class.as_str().to_string(),
                stats.permits.to_string(),
                stats.permits.to_string(),
                stats.permits.saturating_sub(stats.in_use).to_string(),
            ];
            row.extend(wait_cells(stats.class(class)));
            rows.push(row);
        }
    }
    Table {
        columns: [
            "pool",
            "class",
            "size",
            "open",
            "idle",
            "waiting",
            "max_wait_ms",
            "wait_p50_ms",
            "wait_p99_ms",
            "refusals",
            "timeouts",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    }
}

/// `SHOW causeway.stats`: routing decisions by reason, read-your-writes counters and refused
/// logins by reason.
fn stats_table(shared: &Shared) -> Table {
    let s = &shared.stats;
    let mut rows: Vec<Vec<String>> = s
        .routes()
        .into_iter()
        .map(|(reason, n)| vec![format!("routed.{reason}"), n.to_string()])
        .collect();
    for node in &shared.cluster.nodes() {
        rows.push(vec![
            format!("transactions.{}", node.name),
            node.transactions.load(Ordering::Relaxed).to_string(),
        ]);
    }
    for (name, v) in [
        ("causal_waits", &s.causal_waits),
        ("causal_wait_us", &s.causal_wait_us),
        ("causal_wait_hits", &s.causal_wait_hits),
        ("tokens", &s.tokens),
        ("retried_reads", &s.retried_reads),
        ("pins", &s.pins),
    ] {
        rows.push(vec![
            name.to_string(),
            v.load(Ordering::Relaxed).to_string(),
        ]);
    }
    for (reason, n) in s.logins_failed() {
        rows.push(vec![format!("logins_failed.{reason}"), n.to_string()]);
    }
    Table {
        columns: vec!["stat".into(), "value".into()],
        rows,
    }
}

/// The tables of `SHOW causeway.pools` and `SHOW causeway.stats` as (columns, rows), for the
/// admin console, where these commands answer as on any other connection.
pub(crate) fn shared_table(shared: &Shared, name: &str) -> Option<(Vec<String>, Vec<Vec<String>>)> {
    let table = match name {
        "pools" => pools_table(shared),
        "stats" => stats_table(shared),
        _ => return None,
    };
    Some((table.columns, table.rows))
}

impl Session {
    /// Closes and Syncs outside a transaction: statement names are the proxy's to forget, and
    /// portals do not outlive a transaction.
    pub(super) fn answer_housekeeping(&mut self, req: &Request) {
        for f in req.frames.iter() {
            match f.tag {
                tag::FE_CLOSE => {
                    if let Ok(c) = protocol::parse_close(f.body())
                        && c.kind == b'S'
                    {
                        if c.name.is_empty() {
                            self.unnamed = None;
                        } else {
                            self.statements.remove(c.name);
                        }
                    }
                    self.client.queue(&protocol::close_complete());
                }
                tag::FE_SYNC => self.client.queue(&protocol::ready_for_query(self.status)),
                _ => {}
            }
        }
    }

    /// The answer to a `causeway.*` command.
    pub(super) fn proxy_command(&mut self, cmd: &ProxyCommand) -> LocalOutcome {
        match cmd {
            ProxyCommand::SetRoute(mode) => {
                self.route_mode = *mode;
                Ok(("SET", None))
            }
            ProxyCommand::Show { name } if name == "route" => {
                let v = match self.route_mode {
                    RouteMode::Primary => "primary",
                    RouteMode::Replica => "replica",
                    RouteMode::Auto => "auto",
                };
                Ok(("SHOW", Table::value(name, v.to_string())))
            }
            ProxyCommand::SetVar {
                name,
                value: Some(value),
            } if name == "route" => Err((
                INVALID_PARAMETER_VALUE,
                format!("invalid value for parameter \"causeway.route\": \"{value}\""),
            )),
            ProxyCommand::Reset { name } => {
                let default = if name == "route" {
                    ProxyCommand::SetRoute(RouteMode::Auto)
                } else {
                    ProxyCommand::SetVar {
                        name: name.clone(),
                        value: None,
                    }
                };
                self.proxy_command(&default)
                    .map(|(_, rows)| ("RESET", rows))
            }
            ProxyCommand::SetVar { name, value } if name == "consistency_key" => {
                self.tokens.key = value.clone().filter(|v| !v.is_empty());
                Ok(("SET", None))
            }
            ProxyCommand::SetVar { name, value } if name == "min_lsn" => {
                self.tokens.presented = match value.as_deref() {
                    None | Some("") => 0,
                    Some(v) => {
                        lsn::parse(v).map_err(|e| (INVALID_PARAMETER_VALUE, e.to_string()))?
                    }
                };
                Ok(("SET", None))
            }
            ProxyCommand::Show { name } if name == "last_write_lsn" => {
                Ok(("SHOW", Table::value(name, lsn::format(self.tokens.own))))
            }
            ProxyCommand::Show { name } if name == "min_lsn" => Ok((
                "SHOW",
                Table::value(name, lsn::format(self.tokens.presented)),
            )),
            ProxyCommand::Show { name } if name == "consistency_key" => Ok((
                "SHOW",
                Table::value(name, self.tokens.key.clone().unwrap_or_default()),
            )),
            ProxyCommand::Show { name } if name == "pools" => {
                Ok(("SHOW", Some(pools_table(&self.shared))))
            }
            ProxyCommand::Show { name } if name == "stats" => {
                Ok(("SHOW", Some(stats_table(&self.shared))))
            }
            ProxyCommand::Misplaced => Err((
                crate::error::sqlstate::FEATURE_NOT_SUPPORTED,
                "SET, RESET and SHOW of causeway.* settings must be sent as a statement of their \
                 own, not among others in one string"
                    .to_string(),
            )),
            ProxyCommand::SetVar { name, .. } | ProxyCommand::Show { name } => Err((
                UNDEFINED_OBJECT,
                format!("unrecognized configuration parameter \"causeway.{name}\""),
            )),
        }
    }

    /// The text of the statement a request runs: its own, or that of the prepared statement
    /// it binds (an Execute of a statement prepared earlier carries no text).
    fn statement_text(&self, req: &Request) -> String {
        if let Some(sql) = req.sql_texts().next() {
            return sql.to_string();
        }
        let bound = req.frames.iter().find_map(|f| {
            let b = (f.tag == tag::FE_BIND)
                .then(|| protocol::parse_bind(f.body()).ok())
                .flatten()?;
            let key = if b.statement.is_empty() {
                self.unnamed.as_ref()
            } else {
                self.statements.get(b.statement).map(|s| &s.key)
            };
            key.and_then(super::translate::split_key)
                .map(|(sql, _)| sql.to_string())
        });
        bound.unwrap_or_default()
    }

    /// Decides whether a session command is answered here or sent on.
    pub(super) fn session_command(
        &mut self,
        req: &Request,
        cmd: &SessionCommand,
    ) -> (SessionAction, Option<LocalOutcome>) {
        let sql = self.statement_text(req);
        let forward = |cmd: &SessionCommand| {
            (
                SessionAction::Forward(Some(Effect {
                    cmd: cmd.clone(),
                    sql: sql.clone(),
                })),
                None,
            )
        };
        let outside_tx =
            self.lease.is_none() && self.deferred_tx.is_none() && self.status == TxStatus::Idle;
        match cmd {
            SessionCommand::Set { .. }
            | SessionCommand::Reset { .. }
            | SessionCommand::ResetAll
            | SessionCommand::Resets(_) => forward(cmd),
            SessionCommand::DiscardAll if outside_tx && !self.pinned => {
                self.settings.apply(cmd, &sql);
                self.statements.clear();
                self.unnamed = None;
                self.route_mode = RouteMode::Auto;
                self.tokens.key = None;
                self.tokens.presented = 0;
                (SessionAction::Answered, Some(Ok(("DISCARD ALL", None))))
            }
            SessionCommand::DiscardAll => forward(cmd),
            SessionCommand::Deallocate { name: Some(name) } => {
                if self.statements.remove(name).is_some() {
                    (SessionAction::Answered, Some(Ok(("DEALLOCATE", None))))
                } else if self.pinned {
                    // Possibly an SQL-level PREPARE, which lives on the pinned backend.
                    (SessionAction::Forward(None), None)
                } else {
                    let msg = format!("prepared statement \"{name}\" does not exist");
                    (
                        SessionAction::Answered,
                        Some(Err((INVALID_STATEMENT_NAME, msg))),
                    )
                }
            }
            SessionCommand::Deallocate { name: None } => {
                self.statements.clear();
                if self.pinned {
                    forward(cmd)
                } else {
                    (SessionAction::Answered, Some(Ok(("DEALLOCATE ALL", None))))
                }
            }
        }
    }

    /// Records the statements a request answered by the proxy prepares, so a later Bind of
    /// them is answered too. A name already in use is refused as the server refuses it: the
    /// error to send, with nothing recorded.
    pub(super) fn prepare_locally(&mut self, req: &Request) -> Option<Frame> {
        let parses = req.frames.iter().filter(|f| f.tag == tag::FE_PARSE);
        let limit = self.cfg.server.max_prepared_bytes;
        let mut bytes = self.statements.bytes();
        for f in parses.clone() {
            let p = protocol::parse_parse(f.body()).ok()?;
            if !p.name.is_empty() && self.statements.contains_key(p.name) {
                return Some(protocol::error_response(
                    "ERROR",
                    crate::error::sqlstate::DUPLICATE_PREPARED_STATEMENT,
                    &format!("prepared statement \"{}\" already exists", p.name),
                ));
            }
            if !p.name.is_empty() {
                let key_len = f.len().saturating_sub(5 + p.name.len() + 1);
                bytes += super::names::cost(p.name, key_len);
                if bytes > limit {
                    return Some(super::translate::prepared_over_limit(limit));
                }
            }
        }
        for f in parses {
            let Ok(p) = protocol::parse_parse(f.body()) else {
                continue;
            };
            let key = f.bytes.slice(5 + p.name.len() + 1..);
            if p.name.is_empty() {
                self.unnamed = Some(key);
            } else {
                self.statements.insert(
                    p.name.to_string(),
                    super::ClientStatement { key, shape: None },
                );
            }
        }
        None
    }

    /// What a request that only prepares or describes a `causeway.*` command is told: a SHOW's
    /// column, without anything being set.
    pub(super) fn describe_proxy_command(&mut self, cmd: &ProxyCommand) -> LocalOutcome {
        match cmd {
            ProxyCommand::Show { .. } => self.proxy_command(cmd),
            _ => Ok(("SET", None)),
        }
    }

    /// Queues the replies a server would send for this request, given the outcome.
    pub(super) fn answer_locally(&mut self, req: &Request, outcome: LocalOutcome) {
        let mut failed = false;
        for f in req.frames.iter() {
            let reply: Vec<Frame> = match (f.tag, &outcome) {
                (_, Err(_)) if failed => {
                    if f.tag == tag::FE_SYNC {
                        failed = false;
                        vec![protocol::ready_for_query(self.status)]
                    } else {
                        vec![]
                    }
                }
                (tag::FE_QUERY | tag::FE_EXECUTE, Err((code, msg))) => {
                    failed = f.tag == tag::FE_EXECUTE;
                    let mut v = vec![protocol::error_response("ERROR", code, msg)];
                    if f.tag == tag::FE_QUERY {
                        v.push(protocol::ready_for_query(self.status));
                    }
                    v
                }
                (tag::FE_QUERY, Ok((cmd_tag, row))) => {
                    let mut v = row_frames(row.as_ref());
                    v.push(protocol::command_complete(cmd_tag));
                    v.push(protocol::ready_for_query(self.status));
                    v
                }
                (tag::FE_PARSE, _) => vec![protocol::parse_complete()],
                (tag::FE_BIND, _) => vec![protocol::bind_complete()],
                (tag::FE_CLOSE, _) => vec![protocol::close_complete()],
                (tag::FE_DESCRIBE, outcome) => {
                    // A statement's description starts with its parameters: none here.
                    let statement = f.body().first() == Some(&b'S');
                    let mut v: Vec<Frame> = statement
                        .then(protocol::no_parameters)
                        .into_iter()
                        .collect();
                    v.push(match outcome {
                        Ok((_, Some(t))) => {
                            let cols: Vec<&str> = t.columns.iter().map(String::as_str).collect();
                            protocol::row_description_text(&cols)
                        }
                        _ => protocol::no_data(),
                    });
                    v
                }
                (tag::FE_EXECUTE, Ok((cmd_tag, row))) => {
                    let mut v: Vec<Frame> = row_frames(row.as_ref()).into_iter().skip(1).collect();
                    v.push(protocol::command_complete(cmd_tag));
                    v
                }
                (tag::FE_SYNC, _) => vec![protocol::ready_for_query(self.status)],
                _ => vec![],
            };
            for r in reply {
                self.replies.push_back(Expect::Synthetic(r));
            }
        }
        self.emit_synthetic();
    }
}

/// `SHOW causeway.pools` cells of one class's waits, from `waiting` to `timeouts`.
fn wait_cells(c: &ClassStats) -> [String; 6] {
    let ms = |us: u64| format!("{:.3}", us as f64 / 1000.0);
    let pct = |q: f64| c.wait_percentile_us(q).map_or_else(String::new, ms);
    [
        c.waiting.to_string(),
        ms(c.max_wait_us),
        pct(0.5),
        pct(0.99),
        c.refusals.to_string(),
        c.timeouts.to_string(),
    ]
}

fn row_frames(table: Option<&Table>) -> Vec<Frame> {
    let Some(t) = table else {
        return vec![];
    };
    let cols: Vec<&str> = t.columns.iter().map(String::as_str).collect();
    let mut out = vec![protocol::row_description_text(&cols)];
    for row in &t.rows {
        let values: Vec<Option<&str>> = row.iter().map(|v| Some(v.as_str())).collect();
        out.push(protocol::data_row_text(&values));
    }
    out
}
