//! Counters shared by every session: lock-free atomics, read as snapshots.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::route::Reason;

const REASONS: [Reason; 12] = [
    Reason::ClassifiedRead,
    Reason::ClassifiedWrite,
    Reason::Transaction,
    Reason::ReadOnlyTransaction,
    Reason::Hint,
    Reason::SessionPin,
    Reason::NoReplica,
    Reason::ReadOnlyRetry,
    Reason::RecoveryConflict,
    Reason::ReadYourWrites,
    Reason::StickyWindow,
    Reason::Serializable,
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
    /// Client logins refused, by [`LoginFailure`].
    logins_failed: [AtomicU64; LoginFailure::ALL.len()],
}

/// Why a client's login was refused, as counted in `logins_failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    /// A wrong password for a configured user.
    Password,
    /// A user not in `[[users]]` (the client is told the same as for a wrong password).
    UnknownUser,
    /// A plaintext client under `tls.client_mode = "require"`.
    TlsRequired,
    /// A user not in `admin.users` asking for the admin console.
    AdminConsole,
    /// The exchange did not finish within `server.login_timeout_ms`.
    Timeout,
    /// The client broke the exchange (an unknown SASL mechanism, a message out of place).
    Protocol,
}

impl LoginFailure {
    /// Every reason, in the order stats list them.
    pub const ALL: [LoginFailure; 6] = [
        LoginFailure::Password,
        LoginFailure::UnknownUser,
        LoginFailure::TlsRequired,
        LoginFailure::AdminConsole,
        LoginFailure::Timeout,
        LoginFailure::Protocol,
    ];

    /// The name stats and logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            LoginFailure::Password => "password",
            LoginFailure::UnknownUser => "unknown_user",
            LoginFailure::TlsRequired => "tls_required",
            LoginFailure::AdminConsole => "admin_console",
            LoginFailure::Timeout => "timeout",
            LoginFailure::Protocol => "protocol",
        }
    }
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

    /// Counts one refused login.
    pub fn count_login_failure(&self, reason: LoginFailure) {
        if let Some(c) = self.logins_failed.get(reason as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refused logins by reason, every reason listed.
    pub fn logins_failed(&self) -> Vec<(&'static str, u64)> {
        LoginFailure::ALL
            .iter()
            .map(|r| {
                let n = self.logins_failed.get(*r as usize);
                (r.as_str(), n.map_or(0, |c| c.load(Ordering::Relaxed)))
            })
            .collect()
    }

    /// Every reason with its count.
    pub fn routes(&self) -> Vec<(&'static str, u64)> {
        REASONS
            .iter()
            .map(|r| (r.as_str(), self.routed(*r)))
            .collect()
    }
}

/// Index of the bucket holding quantile `q` (0.0..=1.0) of bucketed counts, or `None` when
/// there are none. The rank is 1-based, so q = 1 is the largest value and q = 0 the smallest.
pub(crate) fn quantile_bucket(buckets: &[u64], q: f64) -> Option<usize> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    buckets.iter().position(|n| {
        seen += n;
        seen >= rank
    })
}

/// Sub-buckets per power of two in a [`LatencyHistogram`]: percentiles within 25%.
const SUB: usize = 4;
/// Powers of two covered: values up to 2^36 µs (19 hours) land in their own bucket.
const OCTAVES: usize = 36;
/// Buckets of a [`LatencyHistogram`].
const LATENCY_BUCKETS: usize = SUB + (OCTAVES - 2) * SUB;

/// Latencies in log-linear buckets of microseconds: values under 4 µs each have a bucket, and
/// every power of two above is split in four. Recording is one relaxed atomic add per counter,
/// so every session can record into a shared histogram without a lock.
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_us: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.snapshot().count())
            .finish()
    }
}

/// Bucket of a value in µs.
fn bucket_of(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let octave = (u64::BITS - 1 - us.leading_zeros()) as usize; // ≥ 2
    let sub = ((us >> (octave - 2)) & (SUB as u64 - 1)) as usize;
    (SUB + (octave - 2) * SUB + sub).min(LATENCY_BUCKETS - 1)
}

/// Smallest value in µs that lands in bucket `i` (the next bucket's lower bound is this one's
/// exclusive upper bound).
fn bucket_floor(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let octave = (i - SUB) / SUB + 2;
    let sub = ((i - SUB) % SUB) as u64;
    (SUB as u64 + sub) << (octave - 2)
}

impl LatencyHistogram {
    /// Counts one latency.
    pub fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// A point-in-time copy of a [`LatencyHistogram`], which can be merged and queried.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    buckets: Vec<u64>,
    sum_us: u64,
}

impl LatencySnapshot {
    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Sum of every latency recorded, in µs.
    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &LatencySnapshot) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }

    /// Quantile `q` (0.0..=1.0) in µs: the upper bound of the bucket holding it, so never
    /// below the true value and at most 25% above. `None` when empty.
    pub fn percentile_us(&self, q: f64) -> Option<u64> {
        quantile_bucket(&self.buckets, q)
            .map(|i| bucket_floor(i + 1).saturating_sub(1).max(bucket_floor(i)))
    }

    /// Latencies under `bound_us`, for cumulative (Prometheus `le`) buckets. Exact when
    /// `bound_us` is a power of two, as bucket bounds then coincide.
    pub fn count_below(&self, bound_us: u64) -> u64 {
        self.buckets
            .iter()
            .enumerate()
            .take_while(|(i, _)| bucket_floor(i + 1) <= bound_us)
            .map(|(_, n)| n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_contiguous_and_ordered() {
        for i in 0..LATENCY_BUCKETS - 1 {
            assert!(bucket_floor(i) < bucket_floor(i + 1), "bucket {i}");
            assert_eq!(bucket_of(bucket_floor(i)), i, "floor of {i}");
            assert_eq!(bucket_of(bucket_floor(i + 1) - 1), i, "top of {i}");
        }
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn latency_percentiles_and_cumulative_counts() {
        let h = LatencyHistogram::default();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert_eq!(s.sum_us(), (1..=100u64).sum::<u64>() * 1000);
        for (q, exact) in [(0.5, 50_000u64), (0.9, 90_000), (0.99, 99_000)] {
            let p = s.percentile_us(q).unwrap();
            assert!(p >= exact && p as f64 <= exact as f64 * 1.25, "p{q}: {p}");
        }
        // 2^16 µs = 65.536 ms: exactly the 65 values of 1..=65 ms lie below it.
        assert_eq!(s.count_below(1 << 16), 65);
        assert_eq!(s.count_below(1 << 30), 100);
        assert_eq!(s.count_below(1), 0);
        let mut m = s.clone();
        m.merge(&s);
        assert_eq!(m.count(), 200);
        assert_eq!(LatencySnapshot::default().percentile_us(0.5), None);
    }

    #[test]
    fn counts_by_reason() {
        let s = Stats::default();
        s.count_route(Reason::Hint);
        s.count_route(Reason::Hint);
        s.count_route(Reason::ReadOnlyRetry);
        assert_eq!(s.routed(Reason::Hint), 2);
        assert_eq!(s.routed(Reason::ReadOnlyRetry), 1);
        assert_eq!(s.routed(Reason::ClassifiedRead), 0);
        assert_eq!(s.routes().len(), 12);
    }
}
