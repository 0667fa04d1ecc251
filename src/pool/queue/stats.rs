//! Counters and wait-time histograms of a [`super::PermitQueue`].

use std::time::Duration;

use super::{CLASSES, Class};

/// Number of [`WaitHistogram`] buckets; the last starts at 2^30 µs (about 18 minutes), far
/// beyond any acquire timeout, so nothing real is clipped.
pub(super) const BUCKETS: usize = 32;

/// Wait times in log2 buckets of microseconds: bucket 0 holds waits under 1 µs, bucket `i`
/// holds `[2^(i-1), 2^i)` µs (the last bucket also holds anything longer). Percentiles are
/// right to within a factor of two, which is what p50/p99 reporting needs, in a fixed 256 bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaitHistogram {
    buckets: [u64; BUCKETS],
}

impl WaitHistogram {
    /// Counts one wait of `us` microseconds.
    pub fn record(&mut self, us: u64) {
        let i = (u64::BITS - us.leading_zeros()) as usize;
        self.buckets[i.min(BUCKETS - 1)] += 1;
    }

    /// Waits recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Counts per bucket, see the type's docs for the bounds.
    pub fn buckets(&self) -> &[u64] {
        &self.buckets
    }

    /// Upper bound in µs of the bucket holding quantile `q` (0.0..=1.0, e.g. 0.99), or `None`
    /// when empty.
    pub fn percentile(&self, q: f64) -> Option<u64> {
        crate::stats::quantile_bucket(&self.buckets, q)
            .map(|i| if i == 0 { 0 } else { (1u64 << i) - 1 })
    }

    /// Adds another histogram's counts, to sum classes or pools.
    pub fn merge(&mut self, other: &WaitHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
    }
}

/// Counters for one class.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassStats {
    /// Waiting right now.
    pub waiting: usize,
    /// Successful `acquire`s, immediate ones included.
    pub acquired: u64,
    /// Of those, how many had to queue.
    pub queued: u64,
    /// Longest wait, in µs, of a request that was granted a permit or timed out.
    pub max_wait_us: u64,
    /// Requests refused because the queue was full, evictions included.
    pub refusals: u64,
    /// Queued waiters evicted for a more urgent newcomer.
    pub evictions: u64,
    /// Waits that hit their timeout.
    pub timeouts: u64,
    /// Waits abandoned by the caller (future dropped).
    pub cancellations: u64,
    /// Time from `acquire` to grant of every successful `acquire` (immediate ones as 0 µs), so
    /// percentiles are what callers saw.
    pub wait_us: WaitHistogram,
}

impl ClassStats {
    pub(super) fn record_wait(&mut self, waited: Duration) {
        let us = micros(waited);
        self.acquired += 1;
        self.queued += 1;
        self.max_wait_us = self.max_wait_us.max(us);
        self.wait_us.record(us);
    }

    /// A wait that hit its timeout: the longest waits are often these.
    pub(super) fn record_timeout(&mut self, waited: Duration) {
        self.timeouts += 1;
        self.max_wait_us = self.max_wait_us.max(micros(waited));
    }

    /// Quantile `q` of the granted waits in µs (see [`WaitHistogram::percentile`]), never more
    /// than the longest wait seen: a bucket's upper bound can be nearly twice its waits.
    pub fn wait_percentile_us(&self, q: f64) -> Option<u64> {
        self.wait_us
            .percentile(q)
            .map(|us| us.min(self.max_wait_us))
    }

    fn merge(&mut self, other: &ClassStats) {
        self.waiting += other.waiting;
        self.acquired += other.acquired;
        self.queued += other.queued;
        self.max_wait_us = self.max_wait_us.max(other.max_wait_us);
        self.refusals += other.refusals;
        self.evictions += other.evictions;
        self.timeouts += other.timeouts;
        self.cancellations += other.cancellations;
        self.wait_us.merge(&other.wait_us);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A snapshot of a queue's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Configured permits.
    pub permits: usize,
    /// Permits out (held, or granted and not yet picked up).
    pub in_use: usize,
    /// Per class, indexed by `Class as usize`; see [`QueueStats::class`].
    pub classes: [ClassStats; CLASSES],
}

impl QueueStats {
    /// The counters of one class.
    pub fn class(&self, class: Class) -> &ClassStats {
        &self.classes[class as usize]
    }

    /// All classes summed.
    pub fn total(&self) -> ClassStats {
        let mut sum = ClassStats::default();
        for c in &self.classes {
            sum.merge(c);
        }
        sum
    }
}
