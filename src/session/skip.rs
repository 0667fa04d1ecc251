//! After an error in an extended batch: what the server skips up to the next Sync, the
//! session skips too, keeping its expected replies and the client's names in step; and the
//! server's errors name statements as the client does.

use super::{Expect, Request, Session};
use crate::protocol::{self, Frame, tag};

/// Where the Sync that ends a skip goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SyncEnds {
    /// The proxy failed the batch (or lost its server): it answers the Sync itself.
    Here,
    /// The server failed the batch and skips to its next Sync too: the client's goes to it,
    /// and its ReadyForQuery tells the transaction's state.
    Server,
}

impl Session {
    /// After an error in a batch with no Sync yet, does what a server does: drops everything
    /// the client sent up to its next Sync, batched, queued or still to come; that Sync ends
    /// the skip where `ends` says.
    pub(super) fn skip_to_sync(&mut self, ends: SyncEnds) {
        self.batch.clear();
        self.batch_bytes = 0;
        while let Some(req) = self.queue.pop_front() {
            self.queued_bytes = self.queued_bytes.saturating_sub(req.size());
            if let Some(sync) = req.frames.iter().find(|f| f.tag == tag::FE_SYNC) {
                self.end_skip(ends, sync.clone());
                return;
            }
        }
        self.skip_until_sync = Some(ends);
    }

    /// The client's Sync that ends a skip.
    pub(super) fn end_skip(&mut self, ends: SyncEnds, sync: Frame) {
        match ends {
            SyncEnds::Here => self.client.queue(&protocol::ready_for_query(self.status)),
            SyncEnds::Server => self.requeue_front(Request::extended(vec![sync])),
        }
    }

    /// A server error that names a statement by the proxy's name for it (a Bind with the wrong
    /// number of parameters, say) names it as the client does.
    pub(super) fn name_client_statement(&mut self, frame: Frame) -> Frame {
        const PREFIX: &str = "\"causeway_";
        let Ok(fields) = protocol::parse_error_fields(frame.body()) else {
            return frame;
        };
        let Some(start) = fields.message.find(PREFIX) else {
            return frame;
        };
        let quoted = &fields.message[start + 1..];
        let Some(end) = quoted.find('"') else {
            return frame;
        };
        let backend = &quoted[..end];
        let Some(lease) = self.lease.as_mut() else {
            return frame;
        };
        let client = lease
            .conn()
            .statements
            .key_of(backend)
            .and_then(|key| self.statements.name_of(key));
        let Some(client) = client else {
            return frame;
        };
        let message = format!(
            "{}\"{client}\"{}",
            &fields.message[..start],
            &quoted[end + 1..]
        );
        protocol::with_message(&frame, &message).unwrap_or(frame)
    }

    /// After an ErrorResponse the server skips to the next Sync: drop what it will not answer.
    /// `refused`: the failed message was a stand-in already taken off the replies, so the
    /// front one was skipped rather than failed.
    pub(super) fn on_error_reply(&mut self, refused: bool) -> bool {
        match self.replies.front() {
            // Errors of statements the proxy injected are shown too: hiding them could hide
            // that the client's transaction never began.
            Some(Expect::Query { .. }) => return true,
            Some(Expect::Settings { shown }) => {
                let shown = *shown;
                self.settings_failed();
                return shown;
            }
            Some(Expect::Token { .. }) => {
                self.token_failed();
                return false;
            }
            // The abort the proxy asked for: the client has its own error already.
            Some(Expect::Abort) => return false,
            Some(Expect::Sync { .. }) | None => return true,
            _ => {}
        }
        let mut failed = !refused;
        // The client's unnamed statement once the server is done with the batch, if it changes.
        let mut unnamed = None;
        // Statements the client closed in a part of the batch the server skips.
        let mut reopened = Vec::new();
        while let Some(entry) = self.replies.pop_front() {
            match entry {
                Expect::Sync { .. }
                | Expect::Query {
                    in_batch: false, ..
                }
                | Expect::Settings { .. } => {
                    self.replies.push_front(entry);
                    break;
                }
                Expect::ParseUnnamed { before } => {
                    if unnamed.is_none() {
                        unnamed = Some(if failed { None } else { before });
                    }
                    if let Some(l) = self.lease.as_mut() {
                        l.conn().statements.unnamed = None;
                    }
                }
                Expect::CloseHeld { name, statement } => reopened.push((name, statement)),
                Expect::Parse { key, name, .. } => {
                    if let Some(n) = name {
                        self.statements.remove(&n);
                    }
                    if let Some(l) = self.lease.as_mut() {
                        let conn = l.conn();
                        match key {
                            Some(k) => conn.statements.remove(&k),
                            None => conn.statements.unnamed = None,
                        }
                    }
                }
                Expect::ParseHeld { name } => {
                    self.statements.remove(&name);
                }
                _ => {}
            }
            failed = false;
        }
        if let Some(u) = unnamed {
            self.unnamed = u;
        }
        // After the names the skipped Parses created are gone: one may have reused a name.
        for (name, statement) in reopened {
            self.statements.insert(name, statement);
        }
        if self.replies.is_empty() {
            // The batch reached the server without its Sync (ended with Flush, or a COPY took
            // it): the server skips whatever comes next up to a Sync, and no COPY waits for it.
            self.copy_sync_owed = false;
            self.skip_to_sync(SyncEnds::Server);
        }
        true
    }
}
