//! Shared harness for the fuzz targets: replays a byte stream the way `Transport` receives it
//! (appending socket reads to one buffer and framing after each read) and checks the framer's
//! invariants on every result.
//!
//! Every input starts with one control byte that picks the read size, so the fuzzer also explores
//! how TCP happens to split the stream; the decoded events must not depend on that split.

use bytes::BytesMut;
use causeway::protocol::{self, Frame, MAX_STARTUP_PACKET_BYTES, ProtocolError, StartupMessage};

/// Limit on client messages: what `server::handle_client` passes to its `Transport`.
pub fn client_max_message() -> usize {
    causeway::config::ServerConfig::default().max_message_bytes
}

/// Limit on backend messages: mirrors the private `pool::BACKEND_MAX_MESSAGE` rule
/// (`max(server.max_message_bytes, 1 GiB + 64)`), since a DataRow can hold a 1 GiB value.
pub fn backend_max_message() -> usize {
    client_max_message().max((1 << 30) + 64)
}

/// Splits an input into (read size, stream); `None` for the empty input.
pub fn split_input(data: &[u8]) -> Option<(usize, &[u8])> {
    let (&ctl, stream) = data.split_first()?;
    // 0 = everything in one read; otherwise 1..=255-byte reads, small ones being the interesting.
    let chunk = if ctl == 0 {
        usize::MAX
    } else {
        usize::from(ctl)
    };
    Some((chunk, stream))
}

/// What the decoder produced, owned so runs with different read sizes can be compared.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A startup-family packet and the exact bytes it consumed.
    Startup(StartupMessage, Vec<u8>),
    /// A regular message.
    Frame(Frame),
    /// The decoder refused the stream; the connection would be closed here.
    Error(ProtocolError),
    /// The stream ended with this many undecoded bytes (a partial message, or none).
    End(usize),
}

/// The read buffer of one connection, refilled from `stream` `chunk` bytes at a time.
///
/// It also remembers how much of the stream has been decoded, so every decoded packet can be
/// checked against the exact input bytes it came from without copying the buffer on each call.
pub struct Feed<'a> {
    /// Bytes received and not yet decoded (the `Transport::rbuf` equivalent).
    pub buf: BytesMut,
    stream: &'a [u8],
    received: usize,
    consumed: usize,
    chunk: usize,
}

impl<'a> Feed<'a> {
    /// A connection that has received nothing yet.
    pub fn new(stream: &'a [u8], chunk: usize) -> Self {
        Feed {
            buf: BytesMut::new(),
            stream,
            received: 0,
            consumed: 0,
            chunk,
        }
    }

    /// Bytes the peer has sent that have not been read yet.
    pub fn unread(&self) -> &'a [u8] {
        &self.stream[self.received..]
    }

    /// Appends the next read; false when the peer has nothing more (EOF).
    pub fn fill(&mut self) -> bool {
        let n = self.chunk.min(self.stream.len() - self.received);
        if n == 0 {
            return false;
        }
        self.buf
            .extend_from_slice(&self.stream[self.received..self.received + n]);
        self.received += n;
        true
    }

    /// Records that the decoder took `n` bytes off the buffer; returns those input bytes.
    fn consume(&mut self, n: usize) -> &'a [u8] {
        let taken = &self.stream[self.consumed..self.consumed + n];
        self.consumed += n;
        assert!(
            self.consumed <= self.received,
            "decoded bytes that were never received"
        );
        taken
    }

    /// The buffer must hold exactly the received bytes nothing has decoded yet (O(buffer)).
    pub fn check_buffer(&self) {
        assert_eq!(&self.buf[..], &self.stream[self.consumed..self.received]);
    }
}

/// One `decode_startup` call, checked: a result either consumes nothing or exactly one packet
/// whose header, limit and re-encoding agree with the input bytes it came from.
pub fn next_startup(
    feed: &mut Feed<'_>,
    max: usize,
) -> Result<Option<(StartupMessage, Vec<u8>)>, ProtocolError> {
    let before = feed.buf.len();
    let res = protocol::decode_startup(&mut feed.buf, max);
    let used = before - feed.buf.len();
    match res {
        Ok(None) => {
            assert_eq!(used, 0, "Ok(None) must not consume input");
            Ok(None)
        }
        Err(e) => {
            assert_eq!(used, 0, "an error must not consume input");
            check_error(&e);
            Err(e)
        }
        Ok(Some(msg)) => {
            let packet = feed.consume(used);
            assert!(used >= 8, "startup packets are at least 8 bytes");
            assert!(used <= max.min(MAX_STARTUP_PACKET_BYTES), "over the limit");
            let declared = i32::from_be_bytes(packet[..4].try_into().unwrap());
            assert_eq!(usize::try_from(declared).ok(), Some(used));
            check_startup_message(&msg, packet);
            Ok(Some((msg, packet.to_vec())))
        }
    }
}

/// Re-encodes a decoded startup packet and checks it reproduces the received bytes.
fn check_startup_message(msg: &StartupMessage, packet: &[u8]) {
    let special = |code: i32| [&8i32.to_be_bytes()[..], &code.to_be_bytes()].concat();
    match msg {
        StartupMessage::SslRequest => assert_eq!(packet, special(protocol::SSL_REQUEST_CODE)),
        StartupMessage::GssEncRequest => {
            assert_eq!(packet, special(protocol::GSSENC_REQUEST_CODE));
        }
        StartupMessage::Cancel { pid, secret } => {
            assert_eq!(&protocol::encode_cancel_request(*pid, *secret)[..], packet);
        }
        StartupMessage::Startup {
            major,
            minor,
            params,
        } => {
            assert_eq!(*major, 3);
            assert!(params.len() <= protocol::MAX_STARTUP_PARAMETERS);
            let pairs: Vec<(&str, &str)> = params
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            for (k, v) in &pairs {
                assert!(!k.is_empty() && !k.contains('\0') && !v.contains('\0'));
            }
            // encode_startup always writes 3.0, so compare everything but the minor version.
            let again = protocol::encode_startup(&pairs);
            assert_eq!(again.len(), packet.len());
            assert_eq!(&again[..6], &packet[..6]);
            assert_eq!(&again[8..], &packet[8..]);
            assert_eq!(u16::from_be_bytes([packet[6], packet[7]]), *minor);
            if let Some((k, v)) = pairs.first() {
                assert_eq!(msg.param(k), Some(*v));
            }
        }
    }
}

/// Error values must map to the SQLSTATEs the proxy reports and render a message.
pub fn check_error(e: &ProtocolError) {
    assert!(matches!(e.sqlstate(), "08P01" | "0A000"));
    assert!(!e.to_string().is_empty());
}

/// One `decode_frame` call, checked: a frame is exactly the next bytes of the input, with a
/// consistent header and within the limit; anything else consumes nothing.
pub fn next_frame(feed: &mut Feed<'_>, max: usize) -> Result<Option<Frame>, ProtocolError> {
    let before = feed.buf.len();
    let res = protocol::decode_frame(&mut feed.buf, max);
    let used = before - feed.buf.len();
    match &res {
        Ok(None) => assert_eq!(used, 0, "Ok(None) must not consume input"),
        Err(e) => {
            assert_eq!(used, 0, "an error must not consume input");
            check_error(e);
        }
        Ok(Some(f)) => {
            assert!(f.len() <= before, "frame longer than the input");
            assert_eq!(f.len(), used);
            assert_eq!(&f.bytes[..], feed.consume(used));
            check_frame(f, max);
        }
    }
    res
}

/// Header, tag and body of a frame agree with each other and with the limit.
fn check_frame(f: &Frame, max: usize) {
    assert!(f.len() >= 5 && !f.is_empty());
    assert!(f.len() <= max + 1, "frame over the configured limit");
    assert_eq!(f.tag, f.bytes[0]);
    let declared = i32::from_be_bytes(f.bytes[1..5].try_into().unwrap());
    assert_eq!(usize::try_from(declared).ok(), Some(f.len() - 1));
    assert_eq!(f.body(), &f.bytes[5..]);
    assert_eq!(
        &Frame::new(f.tag, f.body()),
        f,
        "Frame::new must rebuild the same bytes"
    );
}

/// Replays the post-startup part of a stream: frames after each read until EOF or an error.
pub fn run_frames(feed: &mut Feed<'_>, max: usize, events: &mut Vec<Event>) {
    loop {
        match next_frame(feed, max) {
            Ok(Some(f)) => events.push(Event::Frame(f)),
            Ok(None) => {
                if !feed.fill() {
                    feed.check_buffer();
                    events.push(Event::End(feed.buf.len()));
                    return;
                }
            }
            Err(e) => {
                feed.check_buffer();
                events.push(Event::Error(e));
                return;
            }
        }
    }
}

/// `decode_frames` and `decode_batch` must agree with repeated `decode_frame` on the same bytes.
pub fn check_batch_decoders(bytes: &[u8], max: usize) {
    let mut one = BytesMut::from(bytes);
    let mut singles = Vec::new();
    let single_err = loop {
        match protocol::decode_frame(&mut one, max) {
            Ok(Some(f)) => singles.push(f),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };

    let mut buf = BytesMut::from(bytes);
    let mut batched = Vec::new();
    let batch_err = loop {
        match protocol::decode_batch(&mut buf, max) {
            Ok(Some(batch)) => {
                assert!(!batch.frames.is_empty());
                let joined: Vec<u8> = batch.frames.iter().flat_map(|f| f.bytes.to_vec()).collect();
                assert_eq!(&batch.bytes[..], &joined[..]);
                batched.extend(batch.frames);
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    assert_eq!(singles, batched);
    assert_eq!(single_err, batch_err);
    assert_eq!(one, buf);

    let mut buf = BytesMut::from(bytes);
    let mut listed = Vec::new();
    let list_err = loop {
        match protocol::decode_frames(&mut buf, max) {
            Ok(v) if v.is_empty() => break None,
            Ok(v) => listed.extend(v),
            Err(e) => break Some(e),
        }
    };
    assert_eq!(singles, listed);
    assert_eq!(single_err, list_err);
}
