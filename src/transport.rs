//! The only owner of a socket and its buffers: it speaks in whole protocol frames.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{self, Frame, ProtocolError, StartupMessage};

/// Read buffer growth step; large enough for a typical batch of result rows.
const READ_CHUNK: usize = 16 * 1024;

/// A buffer that grew past this for one message is given back once that message has gone
/// through, so a connection that once carried a huge row does not keep its memory for life.
/// Ordinary traffic stays below it and keeps reusing its buffers.
const SHRINK_AFTER: usize = 1024 * 1024;

/// A failure while reading frames: the peer broke the protocol or the socket failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A framed PostgreSQL connection (client- or backend-facing).
pub struct Transport<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    max_message: usize,
    /// Message types this peer may send, each with the longest it may be (as the length field
    /// counts); another type is refused from its type byte alone.
    accept: Option<fn(u8) -> Option<usize>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Transport<S> {
    /// Wraps a connected stream; messages longer than `max_message` are refused.
    pub fn new(stream: S, max_message: usize) -> Self {
        Self {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(READ_CHUNK),
            max_message,
            accept: None,
        }
    }

    /// The underlying stream (for socket options).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The stream back, and how many bytes were read past the last frame (which a protocol
    /// switch such as TLS must not lose).
    pub fn into_inner(self) -> (S, usize) {
        (self.stream, self.rbuf.len())
    }

    /// From now on, refuses a message whose type `accept` rejects (`None`) as soon as its type
    /// byte arrives, and one longer than `accept` allows its type as soon as its length does,
    /// before any of the body it announces is awaited or reserved for.
    pub fn accept_only(&mut self, accept: fn(u8) -> Option<usize>) {
        self.accept = Some(accept);
    }

    /// From now on, refuses messages longer than `max_message` (from their length header).
    pub fn set_max_message(&mut self, max_message: usize) {
        self.max_message = max_message;
    }

    /// Splits one complete frame off the read buffer without touching the socket.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        self.try_frame_within(self.max_message)
    }

    /// As [`Self::try_frame`], with messages longer than `max` refused.
    fn try_frame_within(&mut self, max: usize) -> Result<Option<Frame>, ProtocolError> {
        let mut max = max;
        if let (Some(accept), Some(&tag)) = (self.accept, self.rbuf.first()) {
            match accept(tag) {
                Some(limit) => max = max.min(limit),
                None => return Err(ProtocolError::UnexpectedMessage(tag)),
            }
        }
        let frame = protocol::decode_frame(&mut self.rbuf, max)?;
        if let Some(f) = &frame
            && f.len() >= SHRINK_AFTER
        {
            // The frame shares the buffer's allocation: once the read buffer lets go of it,
            // the memory goes when the frame does. What arrived behind it moves over.
            let mut fresh = BytesMut::with_capacity(READ_CHUNK.max(self.rbuf.len()));
            fresh.extend_from_slice(&self.rbuf);
            self.rbuf = fresh;
        }
        Ok(frame)
    }

    /// Reads more bytes into the read buffer; `Ok(0)` means the peer closed. Cancel-safe.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        self.stream.read_buf(&mut self.rbuf).await
    }

    /// The next frame of a reply still owed: a peer that closes first, or breaks the
    /// protocol, is an I/O error.
    pub async fn reply_frame(&mut self) -> io::Result<Frame> {
        self.read_frame()
            .await
            .map_err(io::Error::other)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
    }

    /// Reads the next frame; `Ok(None)` on a clean end of stream between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, TransportError> {
        self.read_frame_within(self.max_message).await
    }

    /// As [`Self::read_frame`], with a message longer than `max` refused from its length
    /// header, before any of its body is awaited or reserved for.
    pub async fn read_frame_within(&mut self, max: usize) -> Result<Option<Frame>, TransportError> {
        loop {
            if let Some(frame) = self.try_frame_within(max)? {
                return Ok(Some(frame));
            }
            if self.fill().await? == 0 {
                if self.rbuf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a message",
                )
                .into());
            }
        }
    }

    /// Reads the untyped first packet of a client connection.
    pub async fn read_startup(&mut self) -> Result<Option<StartupMessage>, TransportError> {
        loop {
            if let Some(msg) = protocol::decode_startup(&mut self.rbuf, self.max_message)? {
                return Ok(Some(msg));
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Whether bytes that arrived are still waiting to be framed.
    pub fn has_buffered_input(&self) -> bool {
        !self.rbuf.is_empty()
    }

    /// Bytes that arrived and are still waiting to be framed.
    pub fn buffered_input(&self) -> usize {
        self.rbuf.len()
    }

    /// Whether the bytes waiting to be framed hold a whole message tagged `tag`.
    pub fn buffered_holds(&self, tag: u8) -> bool {
        protocol::holds_frame(&self.rbuf, tag, self.max_message)
    }

    /// Queues a frame for the next flush.
    pub fn queue(&mut self, frame: &Frame) {
        self.wbuf.extend_from_slice(&frame.bytes);
    }

    /// Queues raw protocol bytes for the next flush.
    pub fn queue_bytes(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    /// The buffer of bytes queued for the next flush, for encoders that write in place.
    pub fn write_buffer(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Bytes queued and not yet flushed.
    pub fn pending_write(&self) -> usize {
        self.wbuf.len()
    }

    /// Drops queued bytes past `mark` (a value from `pending_write`), so a reply can be retracted
    /// before it reached the peer.
    pub fn truncate_write(&mut self, mark: usize) {
        self.wbuf.truncate(mark);
    }

    /// Writes everything queued in as few system calls as the kernel allows.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
            if self.wbuf.capacity() > SHRINK_AFTER {
                self.wbuf = BytesMut::with_capacity(READ_CHUNK);
            }
        }
        self.stream.flush().await
    }

    /// Queues and flushes one frame.
    pub async fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.queue(frame);
        self.flush().await
    }

    /// Reads and drops whatever the peer still sends until it closes the connection (or the
    /// socket fails), for a connection being taken down.
    pub async fn drain(&mut self) {
        loop {
            self.rbuf.clear();
            if !matches!(self.fill().await, Ok(n) if n > 0) {
                return;
            }
        }
    }

    /// Shuts the write side down after flushing.
    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn message(tag: u8, body_len: usize) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&u32::try_from(body_len + 4).unwrap().to_be_bytes());
        m.resize(5 + body_len, b'x');
        m
    }

    #[tokio::test]
    async fn an_unaccepted_type_is_refused_before_its_body() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut t = Transport::new(near, 64 << 20);
        t.accept_only(|tag| (tag == b'Q').then_some(usize::MAX));
        // A 60 MB message of an unknown type: only its first bytes ever arrive.
        far.write_all(&[b'Y', 0x03, 0xC0, 0, 0, b'x'])
            .await
            .unwrap();
        let read = tokio::time::timeout(std::time::Duration::from_secs(2), t.read_frame());
        let err = read.await.expect("refused at once").unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Protocol(ProtocolError::UnexpectedMessage(b'Y'))
            ),
            "{err}"
        );
        assert!(t.rbuf.capacity() < 1 << 20, "{}", t.rbuf.capacity());
    }

    #[tokio::test]
    async fn buffers_give_back_a_large_message_and_keep_small_ones_cheap() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut t = Transport::new(near, 64 << 20);
        let big = message(b'D', 8 << 20);
        let small = message(b'C', 10);
        let writer = tokio::spawn(async move {
            far.write_all(&big).await.unwrap();
            far.write_all(&small).await.unwrap();
            let mut echoed = vec![0u8; (8 << 20) + 5 + 15];
            far.read_exact(&mut echoed).await.unwrap();
        });
        let frame = t.read_frame().await.unwrap().unwrap();
        assert_eq!(frame.len(), (8 << 20) + 5);
        t.queue(&frame);
        assert!(t.wbuf.capacity() >= 8 << 20);
        drop(frame);
        t.flush().await.unwrap();
        assert!(t.wbuf.capacity() <= READ_CHUNK, "{}", t.wbuf.capacity());
        assert!(t.rbuf.capacity() < SHRINK_AFTER, "{}", t.rbuf.capacity());
        // What arrived behind the large message is kept.
        let next = t.read_frame().await.unwrap().unwrap();
        assert_eq!((next.tag, next.len()), (b'C', 15));
        // Ordinary traffic keeps its buffer: no allocation per message.
        let before = t.wbuf.as_ptr();
        t.queue(&next);
        t.flush().await.unwrap();
        assert_eq!(t.wbuf.as_ptr(), before);
        writer.await.unwrap();
    }
}
