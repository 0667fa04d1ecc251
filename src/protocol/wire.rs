//! Shared low-level helpers: a bounds-checked reader and a length-patching message builder.

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::error::ProtocolError;
use crate::protocol::frame::Frame;

/// Cursor over an untrusted byte slice; every read is checked and borrows from the input.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let (head, tail) = self
            .buf
            .split_at_checked(n)
            .ok_or(ProtocolError::Malformed(what))?;
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        let (&b, tail) = self
            .buf
            .split_first()
            .ok_or(ProtocolError::Malformed(what))?;
        self.buf = tail;
        Ok(b)
    }

    #[cfg(test)]
    pub(crate) fn i16(&mut self, what: &'static str) -> Result<i16, ProtocolError> {
        let head = self.take(2, what)?;
        let arr: [u8; 2] = head
            .try_into()
            .map_err(|_| ProtocolError::Malformed(what))?;
        Ok(i16::from_be_bytes(arr))
    }

    /// An unsigned 16-bit field: the protocol's message counts (parameters, formats), which
    /// PostgreSQL reads unsigned, up to 65535.
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        let head = self.take(2, what)?;
        let arr: [u8; 2] = head
            .try_into()
            .map_err(|_| ProtocolError::Malformed(what))?;
        Ok(u16::from_be_bytes(arr))
    }

    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, ProtocolError> {
        let head = self.take(4, what)?;
        let arr: [u8; 4] = head
            .try_into()
            .map_err(|_| ProtocolError::Malformed(what))?;
        Ok(i32::from_be_bytes(arr))
    }

    /// NUL-terminated byte string without its terminator.
    pub(crate) fn cbytes(&mut self, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let nul = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(ProtocolError::Malformed(what))?;
        let s = self.take(nul, what)?;
        self.take(1, what)?;
        Ok(s)
    }

    /// NUL-terminated string that must be UTF-8 (the module exposes `&str` to callers).
    pub(crate) fn cstr(&mut self, what: &'static str) -> Result<&'a str, ProtocolError> {
        let raw = self.cbytes(what)?;
        std::str::from_utf8(raw).map_err(|_| ProtocolError::Malformed(what))
    }

    /// Everything not yet read.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Trailing bytes mean the peer and we disagree on the layout, so they are an error.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed(what))
        }
    }
}

/// Builds a message in one allocation and patches the length header at the end.
pub(crate) struct Builder {
    buf: BytesMut,
    /// Offset of the 4-byte length: 1 for tagged messages, 0 for the untagged startup family.
    len_at: usize,
}

impl Builder {
    pub(crate) fn tagged(tag: u8, capacity: usize) -> Self {
        let mut buf = BytesMut::with_capacity(capacity.saturating_add(5));
        buf.put_u8(tag);
        buf.put_i32(0);
        Builder { buf, len_at: 1 }
    }

    pub(crate) fn untagged(capacity: usize) -> Self {
        let mut buf = BytesMut::with_capacity(capacity.saturating_add(4));
        buf.put_i32(0);
        Builder { buf, len_at: 0 }
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.put_u8(v);
        self
    }

    pub(crate) fn i16(&mut self, v: i16) -> &mut Self {
        self.buf.put_i16(v);
        self
    }

    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.put_u16(v);
        self
    }

    pub(crate) fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.put_i32(v);
        self
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.put_slice(v);
        self
    }

    /// Writes `s` NUL-terminated (see [`put_cstr`]).
    pub(crate) fn cstr(&mut self, s: &str) -> &mut Self {
        put_cstr(&mut self.buf, s);
        self
    }

    /// i32 length prefix then the data: the encoding of Bind values, DataRow cells, SASL data.
    pub(crate) fn len_prefixed(&mut self, v: &[u8]) -> &mut Self {
        self.buf.put_i32(i32_len(v.len()));
        self.buf.put_slice(v);
        self
    }

    fn patch_len(&mut self) {
        let len = i32_len(self.buf.len().saturating_sub(self.len_at));
        if let Some(slot) = self.buf.get_mut(self.len_at..self.len_at + 4) {
            slot.copy_from_slice(&len.to_be_bytes());
        }
    }

    pub(crate) fn finish(mut self) -> Frame {
        self.patch_len();
        let tag = self.buf.first().copied().unwrap_or_default();
        Frame {
            tag,
            bytes: self.buf.freeze(),
        }
    }

    pub(crate) fn finish_untagged(mut self) -> Bytes {
        self.patch_len();
        self.buf.freeze()
    }
}

/// `s` up to any interior NUL: what [`put_cstr`] writes before its terminator.
fn cstr_bytes(s: &str) -> &[u8] {
    let raw = s.as_bytes();
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    raw.get(..end).unwrap_or_default()
}

/// Bytes [`put_cstr`] writes for `s`, terminator included.
pub(crate) fn cstr_len(s: &str) -> usize {
    cstr_bytes(s).len() + 1
}

/// Writes `s` NUL-terminated, cut at any interior NUL so caller text can never forge extra
/// fields or messages in the peer's parser.
pub(crate) fn put_cstr(dst: &mut BytesMut, s: &str) {
    dst.put_slice(cstr_bytes(s));
    dst.put_u8(0);
}

/// Lengths above i32::MAX cannot be expressed on the wire; such sizes are far beyond any limit
/// the proxy enforces, so saturating (rather than panicking) is the safe failure mode.
pub(crate) fn i32_len(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Converts a count to the i16 used by the protocol, saturating for the same reason as `i32_len`.
pub(crate) fn i16_count(n: usize) -> i16 {
    i16::try_from(n).unwrap_or(i16::MAX)
}

/// Converts a count to the unsigned 16 bits of a Parse or Bind count, saturating likewise.
pub(crate) fn u16_count(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_and_bounds_checks() {
        let data = [0u8, 1, 0, 0, 0, 2, b'h', b'i', 0, 9];
        let mut r = Reader::new(&data);
        assert_eq!(r.i16("a").unwrap(), 1);
        assert_eq!(Reader::new(&[0xff, 0xfe]).u16("u").unwrap(), 65534);
        assert!(Reader::new(&[0xff]).u16("u").is_err());
        assert_eq!(r.i32("b").unwrap(), 2);
        assert_eq!(r.cstr("c").unwrap(), "hi");
        assert_eq!(r.remaining(), 1);
        assert!(r.finish("d").is_err());
        assert_eq!(r.u8("e").unwrap(), 9);
        assert_eq!(r.remaining(), 0);
        assert!(r.u8("f").is_err());
        assert!(r.i16("g").is_err());
        assert!(r.i32("h").is_err());
        assert!(r.cstr("i").is_err());
        assert!(r.take(1, "j").is_err());
        r.finish("k").unwrap();
    }

    #[test]
    fn reader_rejects_bad_utf8_and_missing_nul() {
        assert!(Reader::new(&[0xff, 0]).cstr("x").is_err());
        assert!(Reader::new(b"abc").cstr("x").is_err());
        assert_eq!(Reader::new(&[0xff, 0]).cbytes("x").unwrap(), &[0xff]);
    }

    #[test]
    fn builder_patches_length_and_cuts_nul() {
        let mut b = Builder::tagged(b'Q', 0);
        b.cstr("a\0b");
        let f = b.finish();
        assert_eq!(&f.bytes[..], &[b'Q', 0, 0, 0, 6, b'a', 0]);
        let mut b = Builder::untagged(0);
        b.i32(7);
        assert_eq!(&b.finish_untagged()[..], &[0, 0, 0, 8, 0, 0, 0, 7]);
    }

    #[test]
    fn saturating_conversions() {
        assert_eq!(i32_len(usize::MAX), i32::MAX);
        assert_eq!(i16_count(100_000), i16::MAX);
        assert_eq!(i16_count(3), 3);
        assert_eq!(u16_count(40_000), 40_000);
        assert_eq!(u16_count(100_000), u16::MAX);
    }
}
