//! A priority permit queue: bounded, fair, class-ordered admission to a fixed number of permits.
//!
//! It replaces a plain semaphore in front of a pool so that under overload commits and writes
//! keep flowing while analytic reads wait and, once the queue is full, are refused first.
//! Waiters are ordered by class, promoted one class per `aging` of waiting so nothing starves,
//! then FIFO by arrival. A returned permit is handed straight to the best waiter under the queue
//! lock: one wakeup per permit (no thundering herd), and no window in which a newcomer can barge
//! past the queue.
//!
//! Every state change of a waiter happens under the one lock, exactly once, which is what makes
//! cancellation safe: whoever takes the lock second sees what the first did (a waiter dropped
//! just after being granted finds `Granted` and passes the permit on).

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
// tokio's clock, so tests (and a paused runtime) move aging and timeouts together.
use tokio::time::Instant;

const CLASSES: usize = 5;

/// Priority classes, most urgent first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Ends a transaction and frees what it holds, so it goes first.
    Commit = 0,
    /// Writes, on the primary.
    Write = 1,
    /// Cheap, latency-sensitive reads by key.
    PointRead = 2,
    /// Other reads.
    Read = 3,
    /// Scans and reports: first to wait, first to be refused.
    Analytic = 4,
}

impl Class {
    /// Every class, most urgent first.
    pub const ALL: [Class; CLASSES] = [
        Class::Commit,
        Class::Write,
        Class::PointRead,
        Class::Read,
        Class::Analytic,
    ];

    /// Stable name for stats and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Commit => "commit",
            Class::Write => "write",
            Class::PointRead => "point_read",
            Class::Read => "read",
            Class::Analytic => "analytic",
        }
    }

    /// One class more urgent; `Commit` stays.
    pub fn promoted(self) -> Class {
        Self::from_rank((self as u8).saturating_sub(1))
    }

    fn from_rank(rank: u8) -> Class {
        match rank {
            0 => Class::Commit,
            1 => Class::Write,
            2 => Class::PointRead,
            3 => Class::Read,
            _ => Class::Analytic,
        }
    }

    /// The class after waiting `waited`: promoted once per whole `aging`; zero disables aging.
    fn aged(self, waited: Duration, aging: Duration) -> Class {
        if aging.is_zero() {
            return self;
        }
        let steps = u8::try_from(waited.as_nanos() / aging.as_nanos()).unwrap_or(u8::MAX);
        Self::from_rank((self as u8).saturating_sub(steps))
    }
}

/// How a [`PermitQueue`] admits and orders waiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Permits out at once (the pool size).
    pub permits: usize,
    /// Order waiters by class; `false` is plain FIFO across classes.
    pub priority: bool,
    /// A waiter that has waited this long moves up one class, repeatedly; zero disables aging.
    pub aging: Duration,
    /// Most waiters queued at once; 0 means unbounded.
    pub max_waiters: usize,
}

/// Why [`PermitQueue::acquire`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    /// No permit within the timeout.
    #[error("timed out")]
    Timeout,
    /// The queue was full and this request had the lowest priority (or was evicted for a
    /// more urgent one).
    #[error("queue full")]
    Refused,
    /// The queue was closed.
    #[error("closed")]
    Closed,
}

/// Number of [`WaitHistogram`] buckets; 2^39 µs is about six days, plenty for a queue wait.
const BUCKETS: usize = 40;

/// Wait times in log2 buckets of microseconds: bucket 0 holds waits under 1 µs, bucket `i`
/// holds `[2^(i-1), 2^i)` µs. Percentiles are exact to within a factor of two, which is what
/// p50/p99 reporting needs, at a fixed 320 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitHistogram {
    buckets: [u64; BUCKETS],
}

impl Default for WaitHistogram {
    fn default() -> Self {
        Self {
            buckets: [0; BUCKETS],
        }
    }
}

impl WaitHistogram {
    /// Counts one wait of `us` microseconds.
    pub fn record(&mut self, us: u64) {
        let i = (u64::BITS - us.leading_zeros()) as usize;
        if let Some(b) = self.buckets.get_mut(i.min(BUCKETS - 1)) {
            *b += 1;
        }
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
        let total = self.count();
        if total == 0 {
            return None;
        }
        // Rank of the q-th wait, 1-based, so p100 is the largest and p0 the smallest.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(if i == 0 { 0 } else { (1u64 << i) - 1 });
            }
        }
        None
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
    /// Longest wait before a grant, in µs.
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
    fn record_wait(&mut self, waited: Duration) {
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.acquired += 1;
        self.queued += 1;
        self.max_wait_us = self.max_wait_us.max(us);
        self.wait_us.record(us);
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

/// Where a waiter stands. Moves out of `Waiting` exactly once, always under the queue lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Status {
    Waiting = 0,
    /// A permit is counted in `in_use` for this waiter; whoever sees this owns it.
    Granted = 1,
    Refused = 2,
    Closed = 3,
    /// Timed out or cancelled; already out of the queue.
    Left = 4,
}

/// Shared between a queued entry and its `acquire` future. The status is atomic so a woken
/// waiter picks up its grant without taking the lock again.
struct Slot {
    status: AtomicU8,
    notify: Notify,
}

impl Slot {
    fn status(&self) -> Status {
        match self.status.load(Ordering::Acquire) {
            0 => Status::Waiting,
            1 => Status::Granted,
            2 => Status::Refused,
            3 => Status::Closed,
            _ => Status::Left,
        }
    }

    /// Settles the waiter and wakes it. Caller holds the queue lock and has just taken the
    /// entry out of the queue.
    fn settle(&self, status: Status) {
        self.status.store(status as u8, Ordering::Release);
        // notify_one stores a wakeup if the waiter is not parked yet, so none is lost.
        self.notify.notify_one();
    }
}

struct Entry {
    seq: u64,
    arrived: Instant,
    slot: Arc<Slot>,
}

/// What `enter` decided.
enum Admission {
    Ready,
    Queued { seq: u64, slot: Arc<Slot> },
}

struct State {
    cfg: QueueConfig,
    in_use: usize,
    waiting: usize,
    closed: bool,
    next_seq: u64,
    /// One FIFO per base class, each sorted by `seq`. The head of each is its best waiter (the
    /// oldest, so the most promoted) and the tail its worst, so choosing across classes only
    /// compares five entries.
    queues: [VecDeque<Entry>; CLASSES],
    stats: [ClassStats; CLASSES],
}

impl State {
    fn new(cfg: QueueConfig) -> Self {
        Self {
            cfg,
            in_use: 0,
            waiting: 0,
            closed: false,
            next_seq: 0,
            queues: Default::default(),
            stats: Default::default(),
        }
    }

    fn push(&mut self, class: Class, arrived: Instant) -> (u64, Arc<Slot>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let slot = Arc::new(Slot {
            status: AtomicU8::new(Status::Waiting as u8),
            notify: Notify::new(),
        });
        self.queues[class as usize].push_back(Entry {
            seq,
            arrived,
            slot: Arc::clone(&slot),
        });
        self.waiting += 1;
        (seq, slot)
    }

    /// Ordering key of an entry: lower is served first. FIFO mode ignores class altogether.
    fn key(&self, class: Class, e: &Entry, now: Instant) -> (Class, u64) {
        if !self.cfg.priority {
            return (Class::Commit, e.seq);
        }
        let waited = now.saturating_duration_since(e.arrived);
        (class.aged(waited, self.cfg.aging), e.seq)
    }

    /// The class whose head should be served next.
    fn best(&self, now: Instant) -> Option<Class> {
        let mut best: Option<(Class, (Class, u64))> = None;
        for (class, q) in Class::ALL.into_iter().zip(&self.queues) {
            let Some(e) = q.front() else { continue };
            let key = self.key(class, e, now);
            if best.is_none_or(|(_, b)| key < b) {
                best = Some((class, key));
            }
        }
        best.map(|(class, _)| class)
    }

    /// The class whose tail is the least urgent waiter (newest among the lowest effective
    /// class), with that effective class.
    fn worst(&self, now: Instant) -> Option<(Class, Class)> {
        let mut worst: Option<(Class, (Class, u64))> = None;
        for (class, q) in Class::ALL.into_iter().zip(&self.queues) {
            let Some(e) = q.back() else { continue };
            let key = self.key(class, e, now);
            if worst.is_none_or(|(_, w)| key > w) {
                worst = Some((class, key));
            }
        }
        worst.map(|(class, (effective, _))| (class, effective))
    }

    /// Hands free permits to the best waiters.
    fn grant(&mut self) {
        if self.waiting == 0 || self.in_use >= self.cfg.permits {
            return;
        }
        let now = Instant::now();
        while self.in_use < self.cfg.permits {
            let Some(class) = self.best(now) else { break };
            let Some(e) = self.queues[class as usize].pop_front() else {
                break;
            };
            self.waiting -= 1;
            self.in_use += 1;
            self.stats[class as usize].record_wait(now.saturating_duration_since(e.arrived));
            e.slot.settle(Status::Granted);
        }
    }

    /// A permit came back: pass it on, or let it lapse if the queue was shrunk below `in_use`.
    fn release(&mut self) {
        debug_assert!(self.in_use > 0, "permit released twice");
        self.in_use = self.in_use.saturating_sub(1);
        self.grant();
    }

    /// Takes a still-waiting entry out of its queue; `seq` order makes this a binary search.
    fn remove(&mut self, class: Class, seq: u64) -> Option<Entry> {
        let q = &mut self.queues[class as usize];
        let i = q.binary_search_by_key(&seq, |e| e.seq).ok()?;
        let e = q.remove(i)?;
        self.waiting -= 1;
        Some(e)
    }
}

/// Fair, bounded, priority-ordered permits. Cheap on the uncontended path: a permit available
/// and nobody waiting costs one short lock and no allocation.
pub struct PermitQueue {
    state: Mutex<State>,
}

impl PermitQueue {
    /// A queue with `cfg.permits` permits free.
    pub fn new(cfg: QueueConfig) -> Self {
        Self {
            state: Mutex::new(State::new(cfg)),
        }
    }

    /// No code panics while holding the lock, so a poisoned one still holds consistent state.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a permit up to `timeout`, served by class (aged) then arrival. When
    /// `max_waiters` are already queued, the request is admitted only by evicting a queued
    /// waiter of strictly lower effective priority (whose `acquire` returns
    /// [`AcquireError::Refused`]); otherwise it is refused at once. FIFO mode never evicts.
    pub async fn acquire(
        self: &Arc<Self>,
        class: Class,
        timeout: Duration,
    ) -> Result<Permit, AcquireError> {
        let (seq, slot) = match self.enter(class)? {
            Admission::Ready => return Ok(self.permit()),
            Admission::Queued { seq, slot } => (seq, slot),
        };
        let mut wait = Waiter {
            queue: self,
            class,
            seq,
            slot,
            settled: false,
        };
        // A timeout too large for the clock means no deadline.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            match wait.slot.status() {
                Status::Waiting => {}
                Status::Granted => {
                    wait.settled = true;
                    return Ok(self.permit());
                }
                Status::Refused => {
                    wait.settled = true;
                    return Err(AcquireError::Refused);
                }
                Status::Closed => {
                    wait.settled = true;
                    return Err(AcquireError::Closed);
                }
                Status::Left => {
                    wait.settled = true;
                    return Err(AcquireError::Timeout);
                }
            }
            let notified = wait.slot.notify.notified();
            let woken = match deadline {
                Some(d) => tokio::time::timeout_at(d, notified).await.is_ok(),
                None => {
                    notified.await;
                    true
                }
            };
            // A grant or refusal may have beaten the timer; then the loop picks it up.
            if !woken && self.leave(class, seq, &wait.slot, true) {
                wait.settled = true;
                return Err(AcquireError::Timeout);
            }
        }
    }

    /// Takes a permit only if one is free and no one is waiting, so it never jumps the queue.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut s = self.lock();
        if s.closed || s.waiting > 0 || s.in_use >= s.cfg.permits {
            return None;
        }
        s.in_use += 1;
        drop(s);
        Some(self.permit())
    }

    /// Changes the number of permits. Growing grants to waiters at once; shrinking takes effect
    /// as held permits come back.
    pub fn set_permits(&self, n: usize) {
        let mut s = self.lock();
        s.cfg.permits = n;
        s.grant();
    }

    /// Configured permits.
    pub fn permits(&self) -> usize {
        self.lock().cfg.permits
    }

    /// Permits free right now.
    pub fn available(&self) -> usize {
        let s = self.lock();
        s.cfg.permits.saturating_sub(s.in_use)
    }

    /// Waiters queued right now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// Refuses every waiter and every future `acquire` with [`AcquireError::Closed`]. Permits
    /// already out still come back normally.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        for q in &mut s.queues {
            for e in q.drain(..) {
                e.slot.settle(Status::Closed);
            }
        }
        s.waiting = 0;
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> QueueStats {
        let s = self.lock();
        let mut classes = s.stats.clone();
        for (c, q) in classes.iter_mut().zip(&s.queues) {
            c.waiting = q.len();
        }
        QueueStats {
            permits: s.cfg.permits,
            in_use: s.in_use,
            classes,
        }
    }

    fn permit(self: &Arc<Self>) -> Permit {
        Permit {
            queue: Arc::clone(self),
        }
    }

    /// Admits a request: a permit now, a place in the queue, or a refusal.
    fn enter(&self, class: Class) -> Result<Admission, AcquireError> {
        let mut s = self.lock();
        if s.closed {
            return Err(AcquireError::Closed);
        }
        if s.waiting == 0 && s.in_use < s.cfg.permits {
            s.in_use += 1;
            let stats = &mut s.stats[class as usize];
            stats.acquired += 1;
            stats.wait_us.record(0);
            return Ok(Admission::Ready);
        }
        let now = Instant::now();
        if s.cfg.max_waiters != 0 && s.waiting >= s.cfg.max_waiters {
            let victim = match s.worst(now) {
                Some((victim, effective)) if s.cfg.priority && effective > class => victim,
                _ => {
                    s.stats[class as usize].refusals += 1;
                    return Err(AcquireError::Refused);
                }
            };
            if let Some(e) = s.queues[victim as usize].pop_back() {
                s.waiting -= 1;
                let stats = &mut s.stats[victim as usize];
                stats.refusals += 1;
                stats.evictions += 1;
                e.slot.settle(Status::Refused);
            }
        }
        let (seq, slot) = s.push(class, now);
        Ok(Admission::Queued { seq, slot })
    }

    /// Takes a waiter out of the queue if it is still waiting (timeout or cancellation), or
    /// passes on a permit granted to it that it will never pick up. True if it was waiting.
    fn leave(&self, class: Class, seq: u64, slot: &Slot, timed_out: bool) -> bool {
        let mut s = self.lock();
        match slot.status() {
            Status::Waiting => {
                s.remove(class, seq);
                slot.status.store(Status::Left as u8, Ordering::Release);
                let stats = &mut s.stats[class as usize];
                if timed_out {
                    stats.timeouts += 1;
                } else {
                    stats.cancellations += 1;
                }
                true
            }
            Status::Granted if !timed_out => {
                slot.status.store(Status::Left as u8, Ordering::Release);
                s.release();
                false
            }
            _ => false,
        }
    }
}

impl fmt::Debug for PermitQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("PermitQueue")
            .field("permits", &s.cfg.permits)
            .field("in_use", &s.in_use)
            .field("waiting", &s.waiting)
            .finish()
    }
}

/// The queued part of an `acquire`; dropping it unsettled (the caller went away) leaves the
/// queue or passes on a permit that was granted in the meantime.
struct Waiter<'a> {
    queue: &'a PermitQueue,
    class: Class,
    seq: u64,
    slot: Arc<Slot>,
    settled: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.queue.leave(self.class, self.seq, &self.slot, false);
        }
    }
}

/// A held permit. Dropping it hands it directly to the best waiter, or frees it.
#[must_use = "dropping a Permit releases it at once"]
pub struct Permit {
    queue: Arc<PermitQueue>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.queue.lock().release();
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}
