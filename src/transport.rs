//! The only owner of a socket and its buffers: it speaks in whole protocol frames.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{self, Frame, ProtocolError, StartupMessage};

/// Read buffer growth step; large enough for a typical batch of result rows.
const READ_CHUNK: usize = 16 * 1024;

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
}

impl<S: AsyncRead + AsyncWrite + Unpin> Transport<S> {
    /// Wraps a connected stream; messages longer than `max_message` are refused.
    pub fn new(stream: S, max_message: usize) -> Self {
        Self {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(READ_CHUNK),
            max_message,
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

    /// Splits one complete frame off the read buffer without touching the socket.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        protocol::decode_frame(&mut self.rbuf, self.max_message)
    }

    /// Reads more bytes into the read buffer; `Ok(0)` means the peer closed. Cancel-safe.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        self.stream.read_buf(&mut self.rbuf).await
    }

    /// Reads the next frame; `Ok(None)` on a clean end of stream between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, TransportError> {
        loop {
            if let Some(frame) = self.try_frame()? {
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
        }
        self.stream.flush().await
    }

    /// Queues and flushes one frame.
    pub async fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.queue(frame);
        self.flush().await
    }

    /// Shuts the write side down after flushing.
    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}
