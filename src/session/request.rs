//! A unit of client work: one simple Query (or FunctionCall), or an extended-protocol batch
//! up to and including its Sync or Flush.

use std::sync::Arc;

use crate::protocol::{self, Frame, tag};
use crate::route::Reason;

/// One client request, kept as the client's original frames. Cheap to clone: a request that
/// may have to run again (a read on a replica) is kept while it runs.
#[derive(Debug, Clone)]
pub struct Request {
    pub frames: Arc<[Frame]>,
    /// COPY data the client pipelined after the request, before the server asked for it.
    pub trailing: Vec<Frame>,
    /// Times this request was already re-run after a backend failure.
    pub attempt: u8,
    /// Run on the primary whatever the classification says, and why: a replica refused it as
    /// a write ([`Reason::ReadOnlyRetry`]) or cancelled it for a conflict with recovery
    /// ([`Reason::RecoveryConflict`]).
    pub force_primary: Option<Reason>,
}

impl Request {
    /// A simple Query or FunctionCall.
    pub fn single(frame: Frame) -> Self {
        Self::with(Arc::new([frame]))
    }

    /// An extended-protocol batch.
    pub fn extended(frames: Vec<Frame>) -> Self {
        Self::with(frames.into())
    }

    fn with(frames: Arc<[Frame]>) -> Self {
        Self {
            frames,
            trailing: Vec::new(),
            attempt: 0,
            force_primary: None,
        }
    }

    /// Bytes held, for the client input bound.
    pub fn size(&self) -> usize {
        self.frames
            .iter()
            .chain(&self.trailing)
            .map(|f| f.bytes.len())
            .sum()
    }

    /// Whether the request ends with a message the server answers with ReadyForQuery.
    pub fn ends_with_ready(&self) -> bool {
        self.frames
            .last()
            .is_some_and(|f| matches!(f.tag, tag::FE_QUERY | tag::FE_SYNC | tag::FE_FUNCTION_CALL))
    }

    /// Whether the request runs nothing: only Close, Flush and Sync messages, which the proxy
    /// can answer without a backend outside a transaction.
    pub fn is_housekeeping(&self) -> bool {
        self.frames
            .iter()
            .all(|f| matches!(f.tag, tag::FE_CLOSE | tag::FE_SYNC | tag::FE_FLUSH))
    }

    /// Whether the request runs something (not only prepares or describes).
    pub fn executes(&self) -> bool {
        self.frames.iter().any(|f| {
            matches!(
                f.tag,
                tag::FE_EXECUTE | tag::FE_QUERY | tag::FE_FUNCTION_CALL
            )
        })
    }

    /// Whether it executes a portal bound by an earlier request, so what runs is not in it.
    pub fn executes_earlier_portal(&self) -> bool {
        self.frames.iter().any(|f| f.tag == tag::FE_EXECUTE)
            && !self.frames.iter().any(|f| f.tag == tag::FE_BIND)
    }

    /// Whether this is one simple Query message.
    pub fn is_simple_query(&self) -> bool {
        self.frames.len() == 1 && self.frames.first().is_some_and(|f| f.tag == tag::FE_QUERY)
    }

    /// Whether this is a FunctionCall (fast-path), which the proxy cannot classify.
    pub fn is_function_call(&self) -> bool {
        self.frames
            .first()
            .is_some_and(|f| f.tag == tag::FE_FUNCTION_CALL)
    }

    /// The SQL texts this request runs: Query text, and Parse texts. Statements bound by name
    /// are resolved by the caller.
    pub fn sql_texts(&self) -> impl Iterator<Item = &str> {
        self.frames.iter().filter_map(|f| match f.tag {
            tag::FE_QUERY => protocol::parse_query(f.body()).ok().map(|q| q.sql),
            tag::FE_PARSE => protocol::parse_parse(f.body()).ok().map(|p| p.sql),
            _ => None,
        })
    }
}
