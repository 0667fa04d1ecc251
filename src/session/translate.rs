//! Client statement names -> the names a backend knows: the proxy prepares each client
//! statement on whichever backend serves it, once per connection, under a name of its own.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{ClientStatement, Expect};
use crate::error::{SessionError, sqlstate};
use crate::pool::BackendConn;
use crate::pool::statements::{BackendName, StatementKey};
use crate::protocol::{self, Frame, tag};

/// The name of the Parse sent in place of one the proxy refuses; it fails, so it is never held.
const REFUSED_STATEMENT: &str = "causeway_refused";

/// The client's statement names, borrowed for translation.
pub(super) struct Names<'a> {
    pub(super) statements: &'a mut super::names::ClientStatements,
    /// `server.max_prepared_bytes`.
    pub(super) prepared_limit: usize,
    pub(super) unnamed: &'a mut Option<StatementKey>,
    /// Names the request's Parse messages created, to forget if it runs again.
    pub(super) created: Vec<String>,
}

/// The error for a Parse that would take the client's named statements past
/// `server.max_prepared_bytes`.
pub(super) fn prepared_over_limit(limit: usize) -> Frame {
    protocol::error_response(
        "ERROR",
        crate::error::sqlstate::PROGRAM_LIMIT_EXCEEDED,
        &format!(
            "prepared statements of this session would exceed server.max_prepared_bytes \
             ({limit} bytes); deallocate some first"
        ),
    )
}

/// Query text and raw parameter types inside a statement key.
pub(super) fn split_key(key: &StatementKey) -> Option<(&str, &[u8])> {
    let nul = key.iter().position(|b| *b == 0)?;
    let sql = std::str::from_utf8(key.get(..nul)?).ok()?;
    Some((sql, key.get(nul + 1..)?))
}

/// Makes sure the statement is prepared on this backend; returns its backend name.
pub(super) fn ensure_prepared(
    conn: &mut BackendConn,
    replies: &mut VecDeque<Expect>,
    key: &StatementKey,
) -> Option<BackendName> {
    if let Some(name) = conn.statements.get(key) {
        return Some(name);
    }
    let (sql, types) = split_key(key)?;
    let (name, evicted) = conn.statements.insert(key.clone());
    if let Some(old) = evicted {
        conn.transport.queue(&protocol::encode_close(b'S', &old));
        replies.push_back(Expect::Close { forward: false });
    }
    conn.transport
        .queue(&protocol::encode_parse(&name, sql, types));
    replies.push_back(Expect::Parse {
        forward: false,
        key: Some(key.clone()),
        name: None,
    });
    Some(name)
}

/// Re-parses the client's unnamed statement if this backend's unnamed slot holds another one.
/// A client without one gets the slot emptied first, so that its Bind or Describe fails as on
/// its own server instead of using a statement left there by another client.
fn ensure_unnamed(conn: &mut BackendConn, replies: &mut VecDeque<Expect>, names: &Names<'_>) {
    let Some(key) = names.unnamed.as_ref() else {
        conn.transport.queue(&protocol::encode_close(b'S', ""));
        replies.push_back(Expect::Close { forward: false });
        conn.statements.unnamed = None;
        return;
    };
    if conn.statements.unnamed.as_ref() == Some(key) {
        return;
    }
    if let Some((sql, types)) = split_key(key) {
        conn.transport
            .queue(&protocol::encode_parse("", sql, types));
        replies.push_back(Expect::Parse {
            forward: false,
            key: None,
            name: None,
        });
        conn.statements.unnamed = Some(key.clone());
    }
}

pub(super) fn translate(
    frame: &Frame,
    conn: &mut BackendConn,
    replies: &mut VecDeque<Expect>,
    names: &mut Names<'_>,
) -> Result<(), SessionError> {
    if matches!(
        frame.tag,
        tag::FE_PARSE | tag::FE_BIND | tag::FE_DESCRIBE | tag::FE_EXECUTE | tag::FE_CLOSE
    ) {
        conn.unsynced = true;
    }
    match frame.tag {
        tag::FE_QUERY | tag::FE_FUNCTION_CALL => {
            conn.transport.queue(frame);
            conn.statements.unnamed = None;
            replies.push_back(Expect::Query {
                forward: true,
                effect: None,
                in_batch: conn.unsynced,
            });
        }
        tag::FE_PARSE => {
            let p = protocol::parse_parse(frame.body())?;
            let key: Bytes = frame.bytes.slice(5 + p.name.len() + 1..);
            if p.name.is_empty() {
                conn.transport.queue(frame);
                conn.statements.unnamed = Some(key.clone());
                let before = names.unnamed.replace(key);
                replies.push_back(Expect::ParseUnnamed { before });
            } else if names.statements.contains_key(p.name) {
                // Refused as the server refuses it. The stand-in fails on any server, and a
                // named Parse that fails creates nothing.
                conn.transport.queue(&protocol::encode_parse(
                    REFUSED_STATEMENT,
                    "causeway: statement name already in use",
                    &[],
                ));
                replies.push_back(Expect::Refused(protocol::error_response(
                    "ERROR",
                    sqlstate::DUPLICATE_PREPARED_STATEMENT,
                    &format!("prepared statement \"{}\" already exists", p.name),
                )));
            } else if names.statements.bytes() + super::names::cost(p.name, key.len())
                > names.prepared_limit
            {
                conn.transport.queue(&protocol::encode_parse(
                    REFUSED_STATEMENT,
                    "causeway: prepared statements over their bound",
                    &[],
                ));
                replies.push_back(Expect::Refused(prepared_over_limit(names.prepared_limit)));
            } else {
                names.statements.insert(
                    p.name.to_string(),
                    ClientStatement {
                        key: key.clone(),
                        shape: None,
                    },
                );
                names.created.push(p.name.to_string());
                if conn.statements.get(&key).is_some() {
                    replies.push_back(Expect::ParseHeld {
                        name: p.name.to_string(),
                    });
                } else {
                    let (name, evicted) = conn.statements.insert(key.clone());
                    if let Some(old) = evicted {
                        conn.transport.queue(&protocol::encode_close(b'S', &old));
                        replies.push_back(Expect::Close { forward: false });
                    }
                    conn.transport
                        .queue(&protocol::encode_parse(&name, p.sql, p.param_types));
                    replies.push_back(Expect::Parse {
                        forward: true,
                        key: Some(key),
                        name: Some(p.name.to_string()),
                    });
                }
            }
        }
        tag::FE_BIND => {
            let b = protocol::parse_bind(frame.body())?;
            if b.statement.is_empty() {
                ensure_unnamed(conn, replies, names);
                conn.transport.queue(frame);
            } else {
                match names
                    .statements
                    .get(b.statement)
                    .and_then(|s| ensure_prepared(conn, replies, &s.key))
                {
                    Some(name) => {
                        protocol::put_bind_renamed(conn.transport.write_buffer(), &b, &name)
                    }
                    // Unknown to the proxy: let the server report it.
                    None => conn.transport.queue(frame),
                }
            }
            replies.push_back(Expect::Bind);
        }
        tag::FE_DESCRIBE => {
            let d = protocol::parse_describe(frame.body())?;
            if d.kind == b'S' && d.name.is_empty() {
                ensure_unnamed(conn, replies, names);
                conn.transport.queue(frame);
            } else if d.kind == b'S' {
                match names
                    .statements
                    .get(d.name)
                    .and_then(|s| ensure_prepared(conn, replies, &s.key))
                {
                    Some(name) => conn
                        .transport
                        .queue(&protocol::encode_describe(b'S', &name)),
                    None => conn.transport.queue(frame),
                }
            } else {
                conn.transport.queue(frame);
            }
            let statement = (d.kind == b'S' && !d.name.is_empty())
                .then(|| d.name.to_string())
                .and_then(|n| names.statements.get(&n).map(|s| (n, s.key.clone())));
            replies.push_back(Expect::Describe { statement });
        }
        tag::FE_EXECUTE => {
            conn.transport.queue(frame);
            replies.push_back(Expect::Execute);
        }
        tag::FE_CLOSE => {
            let c = protocol::parse_close(frame.body())?;
            if c.kind == b'S' && !c.name.is_empty() {
                // The backend copy may serve other clients; only the client's name goes away.
                match names.statements.remove(c.name) {
                    Some(statement) => replies.push_back(Expect::CloseHeld {
                        name: c.name.to_string(),
                        statement,
                    }),
                    None => replies.push_back(Expect::Synthetic(protocol::close_complete())),
                }
            } else {
                if c.kind == b'S' {
                    conn.statements.unnamed = None;
                    *names.unnamed = None;
                }
                conn.transport.queue(frame);
                replies.push_back(Expect::Close { forward: true });
            }
        }
        tag::FE_SYNC => {
            conn.transport.queue(frame);
            replies.push_back(Expect::Sync { effect: None });
        }
        _ => conn.transport.queue(frame),
    }
    Ok(())
}
