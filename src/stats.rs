//! Counters shared by every session: lock-free atomics, read as snapshots.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::route::Reason;

const REASONS: [Reason; 10] = [
    Reason::ClassifiedRead,
    Reason::ClassifiedWrite,
    Reason::Transaction,
    Reason::ReadOnlyTransaction,
    Reason::Hint,
    Reason::SessionPin,
    Reason::NoReplica,
    Reason::ReadOnlyRetry,
    Reason::ReadYourWrites,
    Reason::StickyWindow,
];

/// Proxy-wide counters.
#[derive(Default)]
pub struct Stats {
    by_reason: [AtomicU64; REASONS.len()],
    /// Client connections accepted and currently open.
    pub clients_total: AtomicU64,
    pub clients_open: AtomicU64,
    /// Reads re-run elsewhere because their backend failed before answering.
    pub retried_reads: AtomicU64,
    /// Sessions pinned to one backend by session state.
    pub pins: AtomicU64,
    /// Reads that waited for a replica to replay their token, the total wait, and how many
    /// of them then ran on a replica.
    pub causal_waits: AtomicU64,
    pub causal_wait_us: AtomicU64,
    pub causal_wait_hits: AtomicU64,
    /// Commit tokens recorded.
    pub tokens: AtomicU64,
}

impl Stats {
    /// Counts one routing decision.
    pub fn count_route(&self, reason: Reason) {
        if let Some(i) = REASONS.iter().position(|r| *r == reason)
            && let Some(c) = self.by_reason.get(i)
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Decisions made for `reason` so far.
    pub fn routed(&self, reason: Reason) -> u64 {
        REASONS
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.by_reason.get(i))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every reason with its count.
    pub fn routes(&self) -> Vec<(&'static str, u64)> {
        REASONS
            .iter()
            .map(|r| (r.as_str(), self.routed(*r)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason() {
        let s = Stats::default();
        s.count_route(Reason::Hint);
        s.count_route(Reason::Hint);
        s.count_route(Reason::ReadOnlyRetry);
        assert_eq!(s.routed(Reason::Hint), 2);
        assert_eq!(s.routed(Reason::ReadOnlyRetry), 1);
        assert_eq!(s.routed(Reason::ClassifiedRead), 0);
        assert_eq!(s.routes().len(), 10);
    }
}
