//! Result shapes of prepared statements. When the proxy prepares a client's statement again on
//! another backend (after DDL, say) the result columns may differ from what the client was
//! told at its own Describe; a server would refuse with "cached plan must not change result
//! type", and so does the proxy, instead of sending rows the client cannot decode.

use super::{Expect, Request, Session};
use crate::error::SessionError;
use crate::pool::statements::StatementKey;
use crate::protocol::{self, Frame, tag};

/// Column names, types and type modifiers of a RowDescription (NoData: empty), ignoring table
/// OIDs and column numbers, which change when a table is rebuilt without changing the result.
pub(super) fn of(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    if frame.tag != tag::BE_ROW_DESCRIPTION {
        return out;
    }
    let body = frame.body();
    let mut i = 2;
    while i < body.len() {
        let Some(nul) = body.get(i..).and_then(|b| b.iter().position(|c| *c == 0)) else {
            break;
        };
        out.extend_from_slice(body.get(i..i + nul + 1).unwrap_or_default());
        // table oid (4), attnum (2), type oid (4), typlen (2), typmod (4), format (2)
        let fields = i + nul + 1;
        out.extend_from_slice(body.get(fields + 6..fields + 10).unwrap_or_default());
        out.extend_from_slice(body.get(fields + 12..fields + 16).unwrap_or_default());
        i = fields + 18;
    }
    out
}

impl Session {
    /// Prepares, ahead of the request, each statement it binds that this backend lacks and
    /// whose shape the client knows, and checks the shape. `Ok(false)`: a shape changed and
    /// the client has been told, as a server would tell it.
    pub(super) async fn verify_shapes(&mut self, req: &Request) -> Result<bool, SessionError> {
        let mut todo: Vec<(StatementKey, Vec<u8>)> = Vec::new();
        for f in req.frames.iter() {
            if f.tag != tag::FE_BIND {
                continue;
            }
            let Ok(b) = protocol::parse_bind(f.body()) else {
                continue;
            };
            let described_here = req.frames.iter().any(|g| match g.tag {
                tag::FE_PARSE => {
                    protocol::parse_parse(g.body()).is_ok_and(|p| p.name == b.statement)
                }
                tag::FE_DESCRIBE => protocol::parse_describe(g.body())
                    .is_ok_and(|d| d.kind == b'S' && d.name == b.statement),
                _ => false,
            });
            if b.statement.is_empty() || described_here {
                continue;
            }
            if let Some(s) = self.statements.get(b.statement)
                && let Some(shape) = &s.shape
            {
                todo.push((s.key.clone(), shape.clone()));
            }
        }
        // The check talks to the backend directly, so only replies the proxy itself is owed
        // (the settings replay) may be outstanding; otherwise skip it.
        if todo.is_empty()
            || !self
                .replies
                .iter()
                .all(|e| matches!(e, Expect::Settings { .. }))
        {
            return Ok(true);
        }
        for (key, expected) in todo {
            let Some(lease) = self.lease.as_mut() else {
                return Ok(true);
            };
            let conn = lease.conn();
            let prepared = conn.statements.get(&key);
            let stale = match prepared {
                Some(name) => match conn.statements.shape(&key) {
                    Some(known) if known == expected.as_slice() => continue,
                    // Prepared here before a change the client may already have seen (it
                    // prepared again after DDL): prepare it afresh, and compare that.
                    Some(_) => Some(name),
                    // Prepared here by someone who never asked: describe it.
                    None => None,
                },
                None => None,
            };
            let name = match (prepared, stale) {
                (Some(name), None) => name,
                (_, stale) => {
                    let Some((sql, types)) = super::translate::split_key(&key) else {
                        continue;
                    };
                    if let Some(old) = stale {
                        conn.statements.remove(&key);
                        conn.transport.queue(&protocol::encode_close(b'S', &old));
                    }
                    let (name, evicted) = conn.statements.insert(key.clone());
                    if let Some(old) = evicted {
                        conn.transport.queue(&protocol::encode_close(b'S', &old));
                    }
                    conn.transport
                        .queue(&protocol::encode_parse(&name, sql, types));
                    name
                }
            };
            // Replies still owed (the settings replay) arrive first; they are consumed here.
            let mut skip = self.replies.len();
            self.replies.clear();
            let Some(lease) = self.lease.as_mut() else {
                return Ok(true);
            };
            let conn = lease.conn();
            conn.transport
                .queue(&protocol::encode_describe(b'S', &name));
            conn.transport.queue(&protocol::encode_sync());
            let mut shape = None;
            let mut failed = false;
            let mut settings_error = None;
            let exchange = async {
                conn.transport.flush().await?;
                loop {
                    let frame = conn.transport.reply_frame().await?;
                    match frame.tag {
                        tag::BE_READY_FOR_QUERY if skip > 0 => skip -= 1,
                        tag::BE_READY_FOR_QUERY => return Ok(()),
                        tag::BE_ERROR_RESPONSE if skip > 0 => {
                            settings_error.get_or_insert(frame);
                        }
                        _ if skip > 0 => {}
                        tag::BE_ROW_DESCRIPTION | tag::BE_NO_DATA => shape = Some(of(&frame)),
                        tag::BE_ERROR_RESPONSE => failed = true,
                        _ => {}
                    }
                }
            };
            if let Err(e) = exchange.await {
                return self.backend_failed(Some(e)).await.map(|_| false);
            }
            if let Some(error) = settings_error {
                self.refuse_after_failed_replay(req, &error);
                return Ok(false);
            }
            if failed {
                // Let the client's own Bind meet the server's error.
                if let Some(l) = self.lease.as_mut() {
                    l.conn().statements.remove(&key);
                }
                continue;
            }
            if let (Some(l), Some(described)) = (self.lease.as_mut(), &shape) {
                l.conn().statements.set_shape(&key, described.clone());
            }
            if shape.as_ref() != Some(&expected) {
                self.abort_server_transaction().await?;
                self.fail_request(req, &SessionError::PlanChanged);
                self.release_if_idle();
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_description(cols: &[(&str, u32, i32, u32)]) -> Frame {
        let mut body = (cols.len() as i16).to_be_bytes().to_vec();
        for (name, table, typ, typmod) in cols {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(&table.to_be_bytes());
            body.extend_from_slice(&1i16.to_be_bytes());
            body.extend_from_slice(&typ.to_be_bytes());
            body.extend_from_slice(&4i16.to_be_bytes());
            body.extend_from_slice(&typmod.to_be_bytes());
            body.extend_from_slice(&0i16.to_be_bytes());
        }
        Frame::new(tag::BE_ROW_DESCRIPTION, &body)
    }

    #[test]
    fn shape_ignores_table_identity_but_not_columns() {
        let a = of(&row_description(&[("id", 100, 23, u32::MAX)]));
        let rebuilt = of(&row_description(&[("id", 200, 23, u32::MAX)]));
        let retyped = of(&row_description(&[("id", 100, 20, u32::MAX)]));
        let wider = of(&row_description(&[
            ("id", 100, 23, u32::MAX),
            ("n", 100, 23, 0),
        ]));
        assert_eq!(a, rebuilt);
        assert_ne!(a, retyped);
        assert_ne!(a, wider);
        assert!(of(&protocol::no_data()).is_empty());
    }
}
