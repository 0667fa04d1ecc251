//! Splitting a byte stream into typed protocol messages (everything after the startup packet).

use bytes::{Buf, Bytes, BytesMut};

use crate::protocol::error::ProtocolError;
use crate::protocol::wire::Builder;

/// Default cap on one message's length field; large enough for big COPY rows and Bind values.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Size of the tag byte plus the 4-byte length field.
const HEADER_LEN: usize = 5;

/// One typed protocol message: tag byte + the whole original message bytes (tag, 4-byte length, body).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Message type byte (see [`crate::protocol::tag`]).
    pub tag: u8,
    /// Complete wire bytes, so the frame can be forwarded unchanged.
    pub bytes: Bytes,
}

impl Frame {
    /// Bytes after the 5-byte header.
    pub fn body(&self) -> &[u8] {
        self.bytes.get(HEADER_LEN..).unwrap_or_default()
    }

    /// Builds a frame from a tag and a body (bodies over 2 GiB cannot be represented and saturate).
    pub fn new(tag: u8, body: &[u8]) -> Frame {
        let mut b = Builder::tagged(tag, body.len());
        b.bytes(body);
        b.finish()
    }

    /// Total wire length (header included).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false for frames from this module (pairs with `len` for clippy).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Consumes the frame, returning the wire bytes for forwarding.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

impl From<Frame> for Bytes {
    fn from(f: Frame) -> Bytes {
        f.bytes
    }
}

/// Several whole messages sharing one contiguous buffer, so a relay can forward them in one write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameBatch {
    /// All the messages back to back, exactly as received.
    pub bytes: Bytes,
    /// The individual messages; each `Frame::bytes` is a zero-copy slice of `bytes`.
    pub frames: Vec<Frame>,
}

/// Reads and validates the header at `offset`; returns the total message size if it is complete.
///
/// The length is validated before any body bytes are required, so an absurd header fails at once
/// instead of making the caller buffer up to 2 GiB first.
fn peek_frame(buf: &[u8], offset: usize, max_len: usize) -> Result<Option<usize>, ProtocolError> {
    let Some(header) = buf.get(offset..offset.saturating_add(HEADER_LEN)) else {
        return Ok(None);
    };
    let len_bytes: [u8; 4] = header
        .get(1..HEADER_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(ProtocolError::Malformed("frame header"))?;
    let len = i32::from_be_bytes(len_bytes);
    if len < 4 {
        return Err(ProtocolError::InvalidLength(i64::from(len)));
    }
    let len = usize::try_from(len).map_err(|_| ProtocolError::InvalidLength(i64::from(len)))?;
    if len > max_len {
        return Err(ProtocolError::MessageTooLarge { len, max: max_len });
    }
    let total = len + 1;
    if buf.len().saturating_sub(offset) < total {
        return Ok(None);
    }
    Ok(Some(total))
}

/// Split one message off the front of `buf` (advancing it) if complete. Ok(None) = need more bytes.
///
/// Length < 4 or > `max_len` (the length field, which counts itself but not the tag) is an error
/// as soon as the 5-byte header is present. On `Ok(None)` capacity for the rest of the message is
/// reserved so the next read can fill it.
pub fn decode_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    match peek_frame(buf, 0, max_len)? {
        Some(total) => {
            let bytes = buf.split_to(total).freeze();
            let tag = bytes.first().copied().unwrap_or_default();
            Ok(Some(Frame { tag, bytes }))
        }
        None => {
            reserve_for_pending(buf, max_len);
            Ok(None)
        }
    }
}

/// Like [`decode_frame`] but splits off every complete message present, in order.
///
/// Frames share one contiguous allocation. If a bad header follows some good messages, the good
/// ones are returned and the bad header stays at the front, so the error surfaces on the next call
/// and no valid message is lost. An empty vector means more bytes are needed.
pub fn decode_frames(buf: &mut BytesMut, max_len: usize) -> Result<Vec<Frame>, ProtocolError> {
    Ok(decode_batch(buf, max_len)?
        .map(|b| b.frames)
        .unwrap_or_default())
}

/// Whether the complete messages at the front of `buf` include one tagged `tag`, judged by
/// their headers alone; nothing is consumed. A malformed header ends the search.
pub fn holds_frame(buf: &[u8], tag: u8, max_len: usize) -> bool {
    let mut offset = 0usize;
    while let Ok(Some(total)) = peek_frame(buf, offset, max_len) {
        if buf.get(offset) == Some(&tag) {
            return true;
        }
        offset += total;
    }
    false
}

/// Like [`decode_frames`] but also hands back the contiguous bytes of the whole batch.
pub fn decode_batch(
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Option<FrameBatch>, ProtocolError> {
    let mut ends = Vec::new();
    let mut offset = 0usize;
    loop {
        match peek_frame(buf, offset, max_len) {
            Ok(Some(total)) => {
                offset += total;
                ends.push(offset);
            }
            Ok(None) => break,
            Err(e) if ends.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    if ends.is_empty() {
        reserve_for_pending(buf, max_len);
        return Ok(None);
    }
    let bytes = buf.split_to(offset).freeze();
    let mut frames = Vec::with_capacity(ends.len());
    let mut start = 0usize;
    for end in ends {
        let slice = bytes.slice(start..end);
        let tag = slice.first().copied().unwrap_or_default();
        frames.push(Frame { tag, bytes: slice });
        start = end;
    }
    Ok(Some(FrameBatch { bytes, frames }))
}

/// Most room reserved ahead of bytes actually received: a header may announce up to the size
/// limit, but memory follows the data, so a peer that sends headers and stalls costs little.
const MAX_RESERVE_AHEAD: usize = 1 << 20;

/// Reserves room for the rest of a partially received message whose header is already valid.
fn reserve_for_pending(buf: &mut BytesMut, max_len: usize) {
    if let Ok(Some(_)) | Err(_) = peek_frame(buf, 0, max_len) {
        return;
    }
    if let Some(len_bytes) = buf
        .get(1..HEADER_LEN)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
    {
        let total = usize::try_from(i32::from_be_bytes(len_bytes))
            .unwrap_or_default()
            .saturating_add(1);
        buf.reserve(total.saturating_sub(buf.remaining()).min(MAX_RESERVE_AHEAD));
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod tests {
    use super::*;
    use crate::protocol::testutil::Rng;

    fn wire(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn new_and_body_round_trip() {
        let f = Frame::new(b'Q', b"select 1\0");
        assert_eq!(f.tag, b'Q');
        assert_eq!(f.body(), b"select 1\0");
        assert_eq!(&f.bytes[..], &wire(b'Q', b"select 1\0")[..]);
        assert_eq!(f.len(), 14);
        assert!(!f.is_empty());
        let empty = Frame::new(b'S', b"");
        assert_eq!(&empty.bytes[..], &[b'S', 0, 0, 0, 4]);
        assert_eq!(empty.body(), b"");
        assert_eq!(Bytes::from(empty.clone()), empty.into_bytes());
    }

    #[test]
    fn decodes_complete_frame_and_leaves_rest() {
        let mut buf = BytesMut::from(&wire(b'Q', b"x\0")[..]);
        buf.extend_from_slice(b"Zrest");
        let f = decode_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(f.body(), b"x\0");
        assert_eq!(&buf[..], b"Zrest");
    }

    #[test]
    fn holds_frame_reads_headers_only() {
        let mut buf = wire(b'd', b"X\0\0\0\x04");
        buf.extend(wire(b'Q', b"x\0"));
        assert!(holds_frame(&buf, b'Q', 1024));
        assert!(
            !holds_frame(&buf, b'X', 1024),
            "a tag inside a body is not a message"
        );
        let terminate = wire(b'X', b"");
        buf.extend(&terminate[..3]);
        assert!(!holds_frame(&buf, b'X', 1024), "incomplete");
        buf.extend(&terminate[3..]);
        assert!(holds_frame(&buf, b'X', 1024));
        assert!(!holds_frame(&[b'Q', 0, 0, 0, 1], b'Q', 1024), "malformed");
    }

    #[test]
    fn partial_buffers_need_more() {
        let full = wire(b'P', b"abc\0def\0\0\0");
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(decode_frame(&mut buf, 1024).unwrap(), None, "cut {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed");
            assert!(decode_frames(&mut buf, 1024).unwrap().is_empty());
        }
        let mut buf = BytesMut::from(&full[..]);
        assert!(decode_frame(&mut buf, 1024).unwrap().is_some());
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_header_fails_with_only_five_bytes() {
        let mut buf = BytesMut::from(&[b'Q', 0x40, 0, 0, 0][..]); // 1 GiB
        let err = decode_frame(&mut buf, DEFAULT_MAX_MESSAGE_BYTES).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::MessageTooLarge {
                len: 1 << 30,
                max: DEFAULT_MAX_MESSAGE_BYTES
            }
        );
        assert_eq!(err.sqlstate(), "08P01");
        let mut buf = BytesMut::from(&[b'Q', 0x40, 0, 0, 0][..]);
        assert!(decode_frames(&mut buf, DEFAULT_MAX_MESSAGE_BYTES).is_err());
    }

    #[test]
    fn limit_is_inclusive() {
        let mut buf = BytesMut::from(&wire(b'd', &[7; 6])[..]); // length field = 10
        assert!(decode_frame(&mut buf.clone(), 9).is_err());
        assert!(decode_frame(&mut buf, 10).unwrap().is_some());
    }

    #[test]
    fn short_and_negative_lengths_fail() {
        for len in [0i32, 1, 2, 3, -1, i32::MIN] {
            let mut buf = BytesMut::from(&[b'Q'][..]);
            buf.extend_from_slice(&len.to_be_bytes());
            assert_eq!(
                decode_frame(&mut buf, 1024).unwrap_err(),
                ProtocolError::InvalidLength(i64::from(len))
            );
        }
    }

    #[test]
    fn decode_frames_splits_all_and_shares_buffer() {
        let mut data = wire(b'P', b"s\0q\0\0\0");
        data.extend(wire(b'B', b"\0s\0\0\0\0\0\0\0"));
        data.extend(wire(b'S', b""));
        let total = data.len();
        data.extend(&wire(b'Q', b"partial\0")[..4]);
        let mut buf = BytesMut::from(&data[..]);
        let batch = decode_batch(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(batch.bytes.len(), total);
        let tags: Vec<u8> = batch.frames.iter().map(|f| f.tag).collect();
        assert_eq!(tags, b"PBS");
        assert_eq!(batch.frames[2].body(), b"");
        assert_eq!(buf.len(), 4);
        let base = batch.bytes.as_ptr() as usize;
        let p = batch.frames[1].bytes.as_ptr() as usize;
        assert!(p >= base && p < base + total, "frames slice the batch");
    }

    #[test]
    fn decode_frames_returns_good_prefix_before_error() {
        let mut data = wire(b'Q', b"a\0");
        data.extend_from_slice(&[b'Q', 0, 0, 0, 1]);
        let mut buf = BytesMut::from(&data[..]);
        let frames = decode_frames(&mut buf, 1024).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(
            decode_frames(&mut buf, 1024).unwrap_err(),
            ProtocolError::InvalidLength(1)
        );
    }

    #[test]
    fn a_huge_announced_length_reserves_only_a_step() {
        let mut buf = BytesMut::with_capacity(8);
        // 'd' with a 60 MiB length, under a 64 MiB limit, and no body yet.
        buf.extend_from_slice(&[b'd', 0x03, 0xC0, 0, 0]);
        assert_eq!(decode_frame(&mut buf, 64 << 20).unwrap(), None);
        assert!(
            buf.capacity() <= 2 * MAX_RESERVE_AHEAD,
            "{}",
            buf.capacity()
        );
    }

    #[test]
    fn pending_frame_reserves_capacity() {
        let mut buf = BytesMut::with_capacity(8);
        buf.extend_from_slice(&[b'd', 0, 0, 4, 4]);
        assert_eq!(decode_frame(&mut buf, 1 << 20).unwrap(), None);
        assert!(buf.capacity() >= 1029);
    }

    #[test]
    fn garbage_never_panics_and_never_over_reads() {
        let mut rng = Rng::new(0x5eed_f00d);
        for _ in 0..5000 {
            let data = rng.garbage(40);
            let max = rng.below(64);
            let mut buf = BytesMut::from(&data[..]);
            let mut consumed = 0;
            while let Ok(Some(f)) = decode_frame(&mut buf, max) {
                consumed += f.len();
                assert!(f.len() >= 5 && f.len() <= max + 1);
            }
            assert_eq!(consumed + buf.len(), data.len());
            let mut buf = BytesMut::from(&data[..]);
            if let Ok(frames) = decode_frames(&mut buf, max) {
                let n: usize = frames.iter().map(Frame::len).sum();
                assert_eq!(n + buf.len(), data.len());
            }
        }
    }
}
