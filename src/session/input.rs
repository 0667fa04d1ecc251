//! Client -> session: framing what the client sends into requests, holding an extended
//! batch until its Sync, COPY data, Terminate.

use super::{Expect, MAX_QUEUED_BYTES, Request, Session};
use crate::error::SessionError;
use crate::protocol::{self, Frame, tag};

impl Session {
    /// Frames everything the client sent, up to a Terminate.
    pub(super) async fn on_client_input(&mut self) -> Result<(), SessionError> {
        while let Some(frame) = self.client.try_frame()? {
            tracing::trace!(tag = %(frame.tag as char), copy_in = self.copy_in, "client frame");
            // During COPY FROM STDIN the server takes every message but Sync and Flush, which
            // it ignores there, and Terminate, the session's to handle; one that is not COPY
            // data ends the COPY with the server's own error (08P01) and is not run.
            if self.copy_in && matches!(frame.tag, tag::FE_SYNC | tag::FE_FLUSH) {
                continue;
            }
            if self.copy_in && frame.tag != tag::FE_TERMINATE {
                if frame.tag != tag::FE_COPY_DATA {
                    self.copy_in = false;
                    self.restart_query_clock();
                }
                if let Some(lease) = self.lease.as_mut() {
                    lease.conn().transport.queue(&frame);
                }
                continue;
            }
            match frame.tag {
                // As on a server: skipped with the rest of a failed batch.
                tag::FE_QUERY | tag::FE_FUNCTION_CALL if self.skip_until_sync.is_some() => {}
                tag::FE_QUERY | tag::FE_FUNCTION_CALL if !self.batch.is_empty() => {
                    // Inside an unsynced batch it runs after the batch's messages, in one
                    // request with them: the server ends the batch's implicit transaction
                    // with it, and answers it with ReadyForQuery.
                    let mut frames = std::mem::take(&mut self.batch);
                    self.batch_bytes = 0;
                    frames.push(frame);
                    self.enqueue(Request::extended(frames));
                }
                tag::FE_QUERY | tag::FE_FUNCTION_CALL => self.enqueue(Request::single(frame)),
                tag::FE_PARSE
                | tag::FE_BIND
                | tag::FE_DESCRIBE
                | tag::FE_EXECUTE
                | tag::FE_CLOSE => {
                    if self.skip_until_sync.is_none() {
                        self.hold_in_batch(frame)?;
                    }
                }
                tag::FE_FLUSH | tag::FE_SYNC if self.copy_sync_owed && self.batch.is_empty() => {
                    // The server holds the COPY's result until one of these: it must not wait
                    // behind the queue.
                    if let Some(lease) = self.lease.as_mut() {
                        lease.conn().transport.queue(&frame);
                        if frame.tag == tag::FE_SYNC {
                            self.copy_sync_owed = false;
                            self.replies.push_back(Expect::Sync { effect: None });
                        }
                    }
                }
                tag::FE_FLUSH | tag::FE_SYNC => {
                    let sync = frame.tag == tag::FE_SYNC;
                    if let Some(ends) = self.skip_until_sync {
                        if sync {
                            self.skip_until_sync = None;
                            self.end_skip(ends, frame);
                        }
                        continue;
                    }
                    let mut frames = std::mem::take(&mut self.batch);
                    self.batch_bytes = 0;
                    frames.push(frame);
                    self.enqueue(Request::extended(frames));
                }
                tag::FE_TERMINATE => {
                    // As a server does: everything sent before it runs, nothing after is read.
                    self.terminating = true;
                    break;
                }
                tag::FE_COPY_DATA | tag::FE_COPY_DONE | tag::FE_COPY_FAIL => {
                    // Sent ahead of CopyInResponse: it follows its COPY in order. Otherwise
                    // copy mode already ended and, as PostgreSQL does, it is dropped.
                    if let Some(last) = self.queue.back_mut() {
                        self.queued_bytes += frame.bytes.len();
                        last.trailing.push(frame);
                    } else if !self.replies.is_empty()
                        && let Some(lease) = self.lease.as_mut()
                    {
                        lease.conn().transport.queue(&frame);
                    }
                }
                other => {
                    return Err(SessionError::ClientProtocol(
                        protocol::ProtocolError::UnexpectedMessage(other),
                    ));
                }
            }
        }
        if let Some(lease) = self.lease.as_mut()
            && lease.conn().transport.pending_write() > 0
        {
            tracing::trace!(n = lease.conn().transport.pending_write(), "to backend");
            let flushed = lease.conn().transport.flush().await;
            if let Err(e) = flushed {
                self.backend_failed(Some(e)).await?;
            }
        }
        Ok(())
    }

    /// Fails a COPY whose data the client will never finish (it said Terminate), so the server
    /// answers instead of waiting. A server that already had CopyDone ignores it.
    pub(super) fn abort_copy(&mut self) {
        self.copy_in = false;
        self.restart_query_clock();
        if let Some(lease) = self.lease.as_mut() {
            lease
                .conn()
                .transport
                .queue(&protocol::encode_copy_fail("client terminated during COPY"));
        }
    }

    /// Holds an extended-protocol message until its batch's Sync or Flush, which routing waits
    /// for. The batch cannot be sent before then, so past the bound (the larger of the queue
    /// bound and `server.max_message_bytes`, so one message of allowed size always fits) the
    /// client is refused rather than buffered without end.
    pub(super) fn hold_in_batch(&mut self, frame: Frame) -> Result<(), SessionError> {
        // Outside a transaction a Close is answered without a server, which would take any
        // kind byte: checked here, a kind other than statement or portal gets 08P01 wherever
        // the batch would run, before it takes a server connection.
        match frame.tag {
            tag::FE_CLOSE => {
                protocol::parse_close(frame.body())?;
            }
            tag::FE_DESCRIBE => {
                protocol::parse_describe(frame.body())?;
            }
            _ => {}
        }
        let limit = MAX_QUEUED_BYTES.max(self.cfg.server.max_message_bytes);
        self.batch_bytes += frame.bytes.len();
        if self.batch_bytes > limit {
            self.batch.clear();
            self.batch_bytes = 0;
            return Err(SessionError::BatchTooLarge { limit });
        }
        self.batch.push(frame);
        Ok(())
    }

    pub(super) fn enqueue(&mut self, req: Request) {
        self.queued_bytes += req.size();
        self.queue.push_back(req);
    }

    /// Puts a request back at the head of the queue, to run again or later.
    pub(super) fn requeue_front(&mut self, req: Request) {
        self.queued_bytes += req.size();
        self.queue.push_front(req);
    }
}
