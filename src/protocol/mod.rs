//! PostgreSQL wire-protocol (v3) framing, parsing and encoding: bytes in, values out, no I/O.
//!
//! Everything here treats input as untrusted: parsers are length-checked and return
//! [`ProtocolError`] instead of panicking, so a hostile client can only get itself disconnected.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::unreachable,
    clippy::todo,
    clippy::unimplemented,
    missing_docs
)]

pub mod backend;
pub mod build;
pub mod error;
pub mod frame;
pub mod frontend;
pub mod startup;
mod wire;

pub use backend::*;
pub use build::*;
pub use error::*;
pub use frame::*;
pub use frontend::*;
pub use startup::*;

/// Message type bytes; `FE_*`/`BE_*` names exist for every message, plain names where unambiguous.
pub mod tag {
    // Frontend (client -> server).
    /// Bind (frontend).
    pub const FE_BIND: u8 = b'B';
    /// Close (frontend).
    pub const FE_CLOSE: u8 = b'C';
    /// CopyData (frontend).
    pub const FE_COPY_DATA: u8 = b'd';
    /// CopyDone (frontend).
    pub const FE_COPY_DONE: u8 = b'c';
    /// CopyFail (frontend).
    pub const FE_COPY_FAIL: u8 = b'f';
    /// Describe (frontend).
    pub const FE_DESCRIBE: u8 = b'D';
    /// Execute (frontend).
    pub const FE_EXECUTE: u8 = b'E';
    /// Flush (frontend).
    pub const FE_FLUSH: u8 = b'H';
    /// FunctionCall (frontend).
    pub const FE_FUNCTION_CALL: u8 = b'F';
    /// Parse (frontend).
    pub const FE_PARSE: u8 = b'P';
    /// PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse all share this tag.
    pub const FE_PASSWORD: u8 = b'p';
    /// Query (simple query protocol).
    pub const FE_QUERY: u8 = b'Q';
    /// Sync (frontend).
    pub const FE_SYNC: u8 = b'S';
    /// Terminate (frontend).
    pub const FE_TERMINATE: u8 = b'X';

    // Backend (server -> client).
    /// Authentication* family (backend).
    pub const BE_AUTHENTICATION: u8 = b'R';
    /// BackendKeyData (backend).
    pub const BE_BACKEND_KEY_DATA: u8 = b'K';
    /// BindComplete (backend).
    pub const BE_BIND_COMPLETE: u8 = b'2';
    /// CloseComplete (backend).
    pub const BE_CLOSE_COMPLETE: u8 = b'3';
    /// CommandComplete (backend).
    pub const BE_COMMAND_COMPLETE: u8 = b'C';
    /// CopyData (backend).
    pub const BE_COPY_DATA: u8 = b'd';
    /// CopyDone (backend).
    pub const BE_COPY_DONE: u8 = b'c';
    /// CopyInResponse (backend).
    pub const BE_COPY_IN_RESPONSE: u8 = b'G';
    /// CopyOutResponse (backend).
    pub const BE_COPY_OUT_RESPONSE: u8 = b'H';
    /// CopyBothResponse (backend, replication).
    pub const BE_COPY_BOTH_RESPONSE: u8 = b'W';
    /// DataRow (backend).
    pub const BE_DATA_ROW: u8 = b'D';
    /// EmptyQueryResponse (backend).
    pub const BE_EMPTY_QUERY_RESPONSE: u8 = b'I';
    /// ErrorResponse (backend).
    pub const BE_ERROR_RESPONSE: u8 = b'E';
    /// FunctionCallResponse (backend).
    pub const BE_FUNCTION_CALL_RESPONSE: u8 = b'V';
    /// NegotiateProtocolVersion (backend).
    pub const BE_NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    /// NoData (backend).
    pub const BE_NO_DATA: u8 = b'n';
    /// NoticeResponse (backend).
    pub const BE_NOTICE_RESPONSE: u8 = b'N';
    /// NotificationResponse (backend, LISTEN/NOTIFY).
    pub const BE_NOTIFICATION_RESPONSE: u8 = b'A';
    /// ParameterDescription (backend).
    pub const BE_PARAMETER_DESCRIPTION: u8 = b't';
    /// ParameterStatus (backend).
    pub const BE_PARAMETER_STATUS: u8 = b'S';
    /// ParseComplete (backend).
    pub const BE_PARSE_COMPLETE: u8 = b'1';
    /// PortalSuspended (backend).
    pub const BE_PORTAL_SUSPENDED: u8 = b's';
    /// ReadyForQuery (backend).
    pub const BE_READY_FOR_QUERY: u8 = b'Z';
    /// RowDescription (backend).
    pub const BE_ROW_DESCRIPTION: u8 = b'T';

    // Unprefixed aliases: every name below is unique across directions, so no prefix is needed.
    /// Alias of [`FE_BIND`].
    pub const BIND: u8 = FE_BIND;
    /// Alias of [`FE_CLOSE`].
    pub const CLOSE: u8 = FE_CLOSE;
    /// CopyData, same tag in both directions.
    pub const COPY_DATA: u8 = FE_COPY_DATA;
    /// CopyDone, same tag in both directions.
    pub const COPY_DONE: u8 = FE_COPY_DONE;
    /// Alias of [`FE_COPY_FAIL`].
    pub const COPY_FAIL: u8 = FE_COPY_FAIL;
    /// Alias of [`FE_DESCRIBE`].
    pub const DESCRIBE: u8 = FE_DESCRIBE;
    /// Alias of [`FE_EXECUTE`].
    pub const EXECUTE: u8 = FE_EXECUTE;
    /// Alias of [`FE_FLUSH`].
    pub const FLUSH: u8 = FE_FLUSH;
    /// Alias of [`FE_FUNCTION_CALL`].
    pub const FUNCTION_CALL: u8 = FE_FUNCTION_CALL;
    /// Alias of [`FE_PARSE`].
    pub const PARSE: u8 = FE_PARSE;
    /// Alias of [`FE_PASSWORD`].
    pub const PASSWORD: u8 = FE_PASSWORD;
    /// Alias of [`FE_QUERY`].
    pub const QUERY: u8 = FE_QUERY;
    /// Alias of [`FE_SYNC`].
    pub const SYNC: u8 = FE_SYNC;
    /// Alias of [`FE_TERMINATE`].
    pub const TERMINATE: u8 = FE_TERMINATE;
    /// Alias of [`BE_AUTHENTICATION`].
    pub const AUTHENTICATION: u8 = BE_AUTHENTICATION;
    /// Alias of [`BE_BACKEND_KEY_DATA`].
    pub const BACKEND_KEY_DATA: u8 = BE_BACKEND_KEY_DATA;
    /// Alias of [`BE_BIND_COMPLETE`].
    pub const BIND_COMPLETE: u8 = BE_BIND_COMPLETE;
    /// Alias of [`BE_CLOSE_COMPLETE`].
    pub const CLOSE_COMPLETE: u8 = BE_CLOSE_COMPLETE;
    /// Alias of [`BE_COMMAND_COMPLETE`].
    pub const COMMAND_COMPLETE: u8 = BE_COMMAND_COMPLETE;
    /// Alias of [`BE_COPY_IN_RESPONSE`].
    pub const COPY_IN_RESPONSE: u8 = BE_COPY_IN_RESPONSE;
    /// Alias of [`BE_COPY_OUT_RESPONSE`].
    pub const COPY_OUT_RESPONSE: u8 = BE_COPY_OUT_RESPONSE;
    /// Alias of [`BE_COPY_BOTH_RESPONSE`].
    pub const COPY_BOTH_RESPONSE: u8 = BE_COPY_BOTH_RESPONSE;
    /// Alias of [`BE_DATA_ROW`].
    pub const DATA_ROW: u8 = BE_DATA_ROW;
    /// Alias of [`BE_EMPTY_QUERY_RESPONSE`].
    pub const EMPTY_QUERY_RESPONSE: u8 = BE_EMPTY_QUERY_RESPONSE;
    /// Alias of [`BE_ERROR_RESPONSE`].
    pub const ERROR_RESPONSE: u8 = BE_ERROR_RESPONSE;
    /// Alias of [`BE_FUNCTION_CALL_RESPONSE`].
    pub const FUNCTION_CALL_RESPONSE: u8 = BE_FUNCTION_CALL_RESPONSE;
    /// Alias of [`BE_NEGOTIATE_PROTOCOL_VERSION`].
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = BE_NEGOTIATE_PROTOCOL_VERSION;
    /// Alias of [`BE_NO_DATA`].
    pub const NO_DATA: u8 = BE_NO_DATA;
    /// Alias of [`BE_NOTICE_RESPONSE`].
    pub const NOTICE_RESPONSE: u8 = BE_NOTICE_RESPONSE;
    /// Alias of [`BE_NOTIFICATION_RESPONSE`].
    pub const NOTIFICATION_RESPONSE: u8 = BE_NOTIFICATION_RESPONSE;
    /// Alias of [`BE_PARAMETER_DESCRIPTION`].
    pub const PARAMETER_DESCRIPTION: u8 = BE_PARAMETER_DESCRIPTION;
    /// Alias of [`BE_PARAMETER_STATUS`].
    pub const PARAMETER_STATUS: u8 = BE_PARAMETER_STATUS;
    /// Alias of [`BE_PARSE_COMPLETE`].
    pub const PARSE_COMPLETE: u8 = BE_PARSE_COMPLETE;
    /// Alias of [`BE_PORTAL_SUSPENDED`].
    pub const PORTAL_SUSPENDED: u8 = BE_PORTAL_SUSPENDED;
    /// Alias of [`BE_READY_FOR_QUERY`].
    pub const READY_FOR_QUERY: u8 = BE_READY_FOR_QUERY;
    /// Alias of [`BE_ROW_DESCRIPTION`].
    pub const ROW_DESCRIPTION: u8 = BE_ROW_DESCRIPTION;
}

/// Deterministic pseudo-random input for the never-panic tests (no extra dev-dependencies).
#[cfg(test)]
#[allow(clippy::indexing_slicing)]
pub(crate) mod testutil {
    /// xorshift64*: tiny, seedable and good enough to shake out missing bounds checks.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Rng(seed | 1)
        }

        pub(crate) fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % (n.max(1) as u64)) as usize
        }

        /// Random bytes biased towards NULs and small/negative lengths, which hit edge cases.
        pub(crate) fn garbage(&mut self, max_len: usize) -> Vec<u8> {
            let len = self.below(max_len + 1);
            (0..len)
                .map(|_| match self.below(8) {
                    0 | 1 => 0,
                    2 => 0xff,
                    3 => b'a',
                    _ => self.next_u64() as u8,
                })
                .collect()
        }

        /// Truncates or corrupts a valid encoding so parsers see almost-right input.
        pub(crate) fn mutate(&mut self, valid: &[u8]) -> Vec<u8> {
            let mut v = valid.to_vec();
            match self.below(4) {
                0 => v.truncate(self.below(valid.len() + 1)),
                1 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] = self.next_u64() as u8;
                }
                2 => v.push(self.next_u64() as u8),
                _ => {
                    for _ in 0..3 {
                        if !v.is_empty() {
                            let i = self.below(v.len());
                            v[i] = [0u8, 0xff, 0x7f, 1][self.below(4)];
                        }
                    }
                }
            }
            v
        }
    }
}
