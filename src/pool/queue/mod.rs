//! A priority permit queue: bounded, fair, class-ordered admission to a fixed number of permits.
//!
//! It replaces a plain semaphore in front of a pool so that under overload commits and writes
//! keep flowing while analytic reads wait and, once the queue is full, are refused first.
//! Waiters are ordered by class, promoted one class per `aging` of waiting so nothing starves
//! (reads and reports only up to `Read` while their background share keeps them moving), then
//! FIFO by arrival. A returned permit is handed straight to the best waiter under the queue
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

mod stats;

#[cfg(test)]
use stats::BUCKETS;
pub use stats::{ClassStats, QueueStats, WaitHistogram};

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

    /// Read and analytic work, which keeps a share of the permits while it waits.
    pub fn is_background(self) -> bool {
        self >= Class::Read
    }

    /// One class up; `Commit` stays.
    pub fn promoted(self) -> Class {
        Self::from_rank((self as u8).saturating_sub(1))
    }

    fn from_rank(rank: u8) -> Class {
        Class::ALL[usize::from(rank).min(CLASSES - 1)]
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
    /// With a background share and two permits or more, reads stop at `Read`.
    pub aging: Duration,
    /// Most waiters queued at once; 0 means unbounded.
    pub max_waiters: usize,
    /// Share of permit time, in thousandths, that read and analytic work keeps while it and
    /// more urgent work both wait; 0 gives plain class order (with aging).
    pub background_share: u16,
}

/// How long permit-time history counts when comparing the background share: occupancy is
/// an exponentially decayed integral with this time constant.
const SHARE_WINDOW: Duration = Duration::from_millis(50);

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
    /// Permits held by read and analytic work.
    background_in_use: usize,
    /// Decayed permit-seconds held by read and analytic work, and by everything else, up to
    /// `occupancy_at`.
    background_time: f64,
    foreground_time: f64,
    occupancy_at: Instant,
    /// Nobody waited at the last accounting: the integrals were not kept up meanwhile.
    occupancy_paused: bool,
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
            background_in_use: 0,
            background_time: 0.0,
            foreground_time: 0.0,
            occupancy_at: Instant::now(),
            occupancy_paused: true,
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
    /// Read and analytic work ages no further than `Read` while the background share keeps it
    /// moving: a backlog of reports aged into the write classes would take every permit, and
    /// the queue would serve like FIFO exactly when it matters.
    fn key(&self, class: Class, e: &Entry, now: Instant) -> (Class, u64) {
        if !self.cfg.priority {
            return (Class::Commit, e.seq);
        }
        let waited = now.saturating_duration_since(e.arrived);
        let aged = class.aged(waited, self.cfg.aging);
        if class.is_background() && self.share_serves_background() {
            return (aged.max(Class::Read), e.seq);
        }
        (aged, e.seq)
    }

    /// Whether the background share guarantees read and analytic work permits while more
    /// urgent work waits: it is on, and there is a permit besides the one always kept for
    /// urgent work. Otherwise aging alone keeps reads from starving, across every class.
    fn share_serves_background(&self) -> bool {
        self.cfg.background_share > 0 && self.cfg.permits >= 2
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

    /// Who makes room in a full queue: the newest waiter of the least urgent class queued.
    /// Classes as they arrived, not as aged: aging orders the grants so that nothing starves,
    /// it does not let a long-waiting report keep a commit out.
    fn eviction_candidate(&self) -> Option<Class> {
        Class::ALL
            .into_iter()
            .rev()
            .find(|&class| !self.queues[class as usize].is_empty())
    }

    /// The best waiting read or analytic class, if any.
    fn best_background(&self, now: Instant) -> Option<Class> {
        let mut best: Option<(Class, (Class, u64))> = None;
        for class in [Class::Read, Class::Analytic] {
            let Some(e) = self.queues[class as usize].front() else {
                continue;
            };
            let key = self.key(class, e, now);
            if best.is_none_or(|(_, b)| key < b) {
                best = Some((class, key));
            }
        }
        best.map(|(class, _)| class)
    }

    /// Brings the occupancy integrals up to now. Called before every change of `in_use`. The
    /// share only matters while requests wait, so without waiters this costs nothing (no clock
    /// read): the time until contention resumes only decays the history.
    fn account(&mut self) {
        if !self.cfg.priority || self.cfg.background_share == 0 {
            return;
        }
        if self.waiting == 0 {
            self.occupancy_paused = true;
            return;
        }
        let now = Instant::now();
        let dt = now
            .saturating_duration_since(self.occupancy_at)
            .as_secs_f64();
        self.occupancy_at = now;
        if std::mem::take(&mut self.occupancy_paused) {
            let decay = (-dt / SHARE_WINDOW.as_secs_f64()).exp();
            self.background_time *= decay;
            self.foreground_time *= decay;
            return;
        }
        if dt <= 0.0 {
            return;
        }
        let decay = (-dt / SHARE_WINDOW.as_secs_f64()).exp();
        let background = self.background_in_use as f64;
        let foreground = self.in_use.saturating_sub(self.background_in_use) as f64;
        self.background_time = self.background_time * decay + background * dt;
        self.foreground_time = self.foreground_time * decay + foreground * dt;
    }

    /// Whether read and analytic work is owed the next free permit. Its share of the permits
    /// (`background_share × permits`) is kept in whole permits; a fractional part is granted
    /// over time, as one more permit whenever its recent share of permit time is below target.
    fn background_owed(&self) -> bool {
        let share = f64::from(self.cfg.background_share) / 1000.0;
        let target = share * self.cfg.permits as f64;
        let held = self.background_in_use as f64;
        if held + 1.0 <= target {
            return true;
        }
        if held >= target.ceil() {
            return false;
        }
        let total = self.background_time + self.foreground_time;
        total > 0.0 && self.background_time / total < share
    }

    /// Hands free permits to the best waiters. Read and analytic work keeps a share of permit
    /// time (weighted fair queuing between urgent and background work): while both wait and
    /// it has held less than `background_share` of recent permit time, the next free permit
    /// goes to it, so a steady stream of commits speeds up without starving reports. It never
    /// takes the last permit that way, which stays for urgent work.
    fn grant(&mut self) {
        if self.waiting == 0 || self.in_use >= self.cfg.permits {
            return;
        }
        let now = Instant::now();
        self.account();
        while self.in_use < self.cfg.permits {
            let Some(mut class) = self.best(now) else {
                break;
            };
            if self.cfg.priority
                && !class.is_background()
                && self.background_in_use + 1 < self.cfg.permits
                && self.background_owed()
                && let Some(bg) = self.best_background(now)
            {
                class = bg;
            }
            let Some(e) = self.queues[class as usize].pop_front() else {
                break;
            };
            self.waiting -= 1;
            self.in_use += 1;
            if class.is_background() {
                self.background_in_use += 1;
            }
            self.stats[class as usize].record_wait(now.saturating_duration_since(e.arrived));
            e.slot.settle(Status::Granted);
        }
    }

    /// A permit came back: pass it on, or let it lapse if the queue was shrunk below `in_use`.
    fn release(&mut self, background: bool) {
        debug_assert!(self.in_use > 0, "permit released twice");
        self.account();
        self.in_use = self.in_use.saturating_sub(1);
        if background {
            self.background_in_use = self.background_in_use.saturating_sub(1);
        }
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

impl std::fmt::Debug for PermitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PermitQueue")
            .field("permits", &self.permits())
            .field("available", &self.available())
            .field("waiting", &self.waiting())
            .finish()
    }
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
            Admission::Ready => return Ok(self.permit(class.is_background())),
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
            let outcome = match wait.slot.status() {
                Status::Waiting => None,
                Status::Granted => Some(Ok(self.permit(class.is_background()))),
                Status::Refused => Some(Err(AcquireError::Refused)),
                Status::Closed => Some(Err(AcquireError::Closed)),
                Status::Left => Some(Err(AcquireError::Timeout)),
            };
            if let Some(outcome) = outcome {
                wait.settled = true;
                return outcome;
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
        s.account();
        s.in_use += 1;
        drop(s);
        Some(self.permit(false))
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

    fn permit(self: &Arc<Self>, background: bool) -> Permit {
        Permit {
            queue: Arc::clone(self),
            background,
        }
    }

    /// Admits a request: a permit now, a place in the queue, or a refusal.
    fn enter(&self, class: Class) -> Result<Admission, AcquireError> {
        let mut s = self.lock();
        if s.closed {
            return Err(AcquireError::Closed);
        }
        if s.waiting == 0 && s.in_use < s.cfg.permits {
            s.account();
            s.in_use += 1;
            if class.is_background() {
                s.background_in_use += 1;
            }
            let stats = &mut s.stats[class as usize];
            stats.acquired += 1;
            stats.wait_us.record(0);
            return Ok(Admission::Ready);
        }
        let now = Instant::now();
        if s.cfg.max_waiters != 0 && s.waiting >= s.cfg.max_waiters {
            // FIFO mode has no priorities to keep flowing, so a full queue refuses newcomers.
            let worst = if s.cfg.priority {
                s.eviction_candidate()
            } else {
                None
            };
            let victim = match worst {
                Some(victim) if victim > class => victim,
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
                let arrived = s.remove(class, seq).map(|e| e.arrived);
                slot.status.store(Status::Left as u8, Ordering::Release);
                let stats = &mut s.stats[class as usize];
                if timed_out {
                    let waited = arrived.map(|at| Instant::now().saturating_duration_since(at));
                    stats.record_timeout(waited.unwrap_or_default());
                } else {
                    stats.cancellations += 1;
                }
                true
            }
            Status::Granted if !timed_out => {
                slot.status.store(Status::Left as u8, Ordering::Release);
                s.release(class.is_background());
                false
            }
            _ => false,
        }
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
    /// Held by a read or analytic request (counts against the background share).
    background: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.queue.lock().release(self.background);
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::atomic::AtomicUsize;

    use futures_util::FutureExt;
    use rand::Rng;

    use super::*;

    const LONG: Duration = Duration::from_secs(30);

    fn queue(
        permits: usize,
        priority: bool,
        aging: Duration,
        max_waiters: usize,
    ) -> Arc<PermitQueue> {
        Arc::new(PermitQueue::new(QueueConfig {
            permits,
            priority,
            aging,
            max_waiters,
            background_share: 500,
        }))
    }

    /// Spawns a waiter that logs its label when served and releases at once. It is polled
    /// once before spawning, so it is queued (or refused) in call order.
    fn enqueue(
        q: &Arc<PermitQueue>,
        class: Class,
        label: &'static str,
        log: &Arc<Mutex<Vec<&'static str>>>,
    ) -> tokio::task::JoinHandle<Result<(), AcquireError>> {
        let (q, log) = (Arc::clone(q), Arc::clone(log));
        let mut task = Box::pin(async move {
            let p = q.acquire(class, LONG).await?;
            log.lock().unwrap().push(label);
            drop(p);
            Ok(())
        });
        assert!(task.as_mut().now_or_never().is_none(), "{label} not queued");
        tokio::spawn(task)
    }

    async fn served(
        q: &Arc<PermitQueue>,
        held: Permit,
        arrivals: &[(Class, &'static str)],
    ) -> Vec<&'static str> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for &(class, label) in arrivals {
            handles.push(enqueue(q, class, label, &log));
        }
        drop(held);
        for h in handles {
            h.await.unwrap().unwrap();
        }
        assert_eq!(q.available(), q.permits());
        Arc::try_unwrap(log).unwrap().into_inner().unwrap()
    }

    #[test]
    fn class_names_and_promotion() {
        let names: Vec<_> = Class::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names, ["commit", "write", "point_read", "read", "analytic"]);
        assert_eq!(Class::Analytic.promoted(), Class::Read);
        assert_eq!(Class::Write.promoted(), Class::Commit);
        assert_eq!(Class::Commit.promoted(), Class::Commit);
    }

    #[test]
    fn aged_class_table() {
        let ms = Duration::from_millis;
        let cases = [
            (Class::Analytic, ms(0), ms(100), Class::Analytic),
            (Class::Analytic, ms(99), ms(100), Class::Analytic),
            (Class::Analytic, ms(100), ms(100), Class::Read),
            (Class::Analytic, ms(250), ms(100), Class::PointRead),
            (Class::Analytic, ms(300), ms(100), Class::Write),
            (Class::Analytic, ms(10_000), ms(100), Class::Commit),
            (Class::Read, Duration::MAX, ms(1), Class::Commit),
            (Class::Read, ms(10_000), Duration::ZERO, Class::Read),
        ];
        for (class, waited, aging, want) in cases {
            assert_eq!(
                class.aged(waited, aging),
                want,
                "{class:?} {waited:?} {aging:?}"
            );
        }
    }

    /// Aging decided on explicit instants, so the boundaries are exact.
    #[test]
    fn aging_orders_by_effective_class() {
        let state = || {
            State::new(QueueConfig {
                permits: 0,
                priority: true,
                aging: Duration::from_millis(100),
                max_waiters: 0,
                background_share: 500,
            })
        };
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);

        // After one step the Analytic is a Read, and older than the newer Read.
        let mut s = state();
        s.push(Class::Analytic, t0);
        s.push(Class::Read, at(50));
        assert_eq!(s.best(at(99)), Some(Class::Read));
        assert_eq!(s.best(at(100)), Some(Class::Analytic));
        // Eviction goes by the class a waiter came with, however long it has waited.
        assert_eq!(s.eviction_candidate(), Some(Class::Analytic));

        // After three steps it is a Write, ahead of a newer Write.
        let mut s = state();
        s.push(Class::Analytic, t0);
        s.push(Class::Write, at(290));
        assert_eq!(s.best(at(299)), Some(Class::Write));
        assert_eq!(s.best(at(300)), Some(Class::Analytic));

        // With a background share over several permits, reads age up to Read and no further:
        // the share, not aging, keeps them moving. Urgent classes still age past each other.
        let shared = QueueConfig {
            permits: 4,
            ..state().cfg
        };
        let mut s = State::new(shared);
        s.push(Class::Analytic, t0);
        s.push(Class::Write, at(9_950));
        assert_eq!(s.best(at(10_000)), Some(Class::Write));
        s.push(Class::PointRead, at(100));
        assert_eq!(s.best(at(10_000)), Some(Class::PointRead));
        // Among themselves, an aged report still goes before a newer read.
        let mut s = State::new(shared);
        s.push(Class::Analytic, t0);
        s.push(Class::Read, at(50));
        assert_eq!(s.best(at(100)), Some(Class::Analytic));
        // No share, or a single permit (which the share never gives away): aging is all that
        // keeps reads from starving, so it goes all the way.
        for cfg in [
            QueueConfig {
                background_share: 0,
                ..shared
            },
            QueueConfig {
                permits: 1,
                ..shared
            },
        ] {
            let mut s = State::new(cfg);
            s.push(Class::Analytic, t0);
            s.push(Class::Write, at(290));
            assert_eq!(s.best(at(300)), Some(Class::Analytic), "{cfg:?}");
        }

        // FIFO mode: arrival only, whatever the class or age.
        let mut s = State::new(QueueConfig {
            priority: false,
            ..s.cfg
        });
        s.push(Class::Analytic, at(10));
        s.push(Class::Commit, t0);
        assert_eq!(s.best(at(1_000)), Some(Class::Analytic));
    }

    #[tokio::test]
    async fn serves_by_class() {
        let q = queue(1, true, Duration::ZERO, 0);
        let held = q.try_acquire().unwrap();
        let order = served(
            &q,
            held,
            &[
                (Class::Analytic, "analytic"),
                (Class::Read, "read"),
                (Class::PointRead, "point_read"),
                (Class::Write, "write"),
                (Class::Commit, "commit"),
            ],
        )
        .await;
        assert_eq!(order, ["commit", "write", "point_read", "read", "analytic"]);
    }

    #[tokio::test]
    async fn fifo_within_a_class() {
        let q = queue(1, true, Duration::ZERO, 0);
        let held = q.try_acquire().unwrap();
        let arrivals = [
            (Class::Read, "r1"),
            (Class::Read, "r2"),
            (Class::Write, "w"),
            (Class::Read, "r3"),
        ];
        let order = served(&q, held, &arrivals).await;
        assert_eq!(order, ["w", "r1", "r2", "r3"]);
    }

    #[tokio::test]
    async fn fifo_mode_ignores_classes() {
        let q = queue(1, false, Duration::from_millis(1), 0);
        let held = q.try_acquire().unwrap();
        let order = served(
            &q,
            held,
            &[
                (Class::Analytic, "a"),
                (Class::Commit, "c"),
                (Class::Read, "r"),
            ],
        )
        .await;
        assert_eq!(order, ["a", "c", "r"]);
    }

    /// End to end on the real clock; only "at least this long" matters, so it is not flaky.
    #[tokio::test]
    async fn aging_promotes_a_long_waiter() {
        let aging = Duration::from_millis(30);
        let q = queue(1, true, aging, 0);
        let log = Arc::new(Mutex::new(Vec::new()));

        let held = q.try_acquire().unwrap();
        let a = enqueue(&q, Class::Analytic, "analytic", &log);
        tokio::time::sleep(aging).await;
        let r = enqueue(&q, Class::Read, "read", &log);
        drop(held);
        a.await.unwrap().unwrap();
        r.await.unwrap().unwrap();
        assert_eq!(*log.lock().unwrap(), ["analytic", "read"]);

        log.lock().unwrap().clear();
        let held = q.try_acquire().unwrap();
        let a = enqueue(&q, Class::Analytic, "analytic", &log);
        tokio::time::sleep(aging * 3).await;
        let w = enqueue(&q, Class::Write, "write", &log);
        drop(held);
        a.await.unwrap().unwrap();
        w.await.unwrap().unwrap();
        assert_eq!(*log.lock().unwrap(), ["analytic", "write"]);
    }

    #[tokio::test]
    async fn full_queue_refuses_lowest_and_evicts_for_higher() {
        let q = queue(1, true, Duration::ZERO, 2);
        let held = q.try_acquire().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let r1 = enqueue(&q, Class::Read, "r1", &log);
        let r2 = enqueue(&q, Class::Read, "r2", &log);

        // Nobody queued is less urgent than these: refused without waiting.
        let refused = q.acquire(Class::Analytic, LONG).now_or_never();
        assert_eq!(refused.unwrap().unwrap_err(), AcquireError::Refused);
        let refused = q.acquire(Class::Read, LONG).now_or_never();
        assert_eq!(refused.unwrap().unwrap_err(), AcquireError::Refused);

        // A write gets in by evicting the newest read.
        let w = enqueue(&q, Class::Write, "w", &log);
        assert_eq!(r2.await.unwrap(), Err(AcquireError::Refused));
        assert_eq!(q.waiting(), 2);
        drop(held);
        w.await.unwrap().unwrap();
        r1.await.unwrap().unwrap();
        assert_eq!(*log.lock().unwrap(), ["w", "r1"]);

        let stats = q.stats();
        assert_eq!(stats.class(Class::Analytic).refusals, 1);
        assert_eq!(stats.class(Class::Read).refusals, 2);
        assert_eq!(stats.class(Class::Read).evictions, 1);
        assert_eq!(stats.total().refusals, 3);
    }

    /// Aging decides who is served first, not who keeps a place in a full queue: a report that
    /// has waited long enough to outrank writes is still the one a commit evicts.
    #[tokio::test(start_paused = true)]
    async fn a_full_queue_evicts_an_aged_report_for_a_commit() {
        let aging = Duration::from_millis(100);
        let q = queue(1, true, aging, 2);
        let held = q.try_acquire().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let a1 = enqueue(&q, Class::Analytic, "a1", &log);
        let a2 = enqueue(&q, Class::Analytic, "a2", &log);
        tokio::time::sleep(aging * 5).await;
        let c = enqueue(&q, Class::Commit, "c", &log);
        assert_eq!(a2.await.unwrap(), Err(AcquireError::Refused));
        drop(held);
        c.await.unwrap().unwrap();
        a1.await.unwrap().unwrap();
        // The older report, aged past commits, is served first.
        assert_eq!(*log.lock().unwrap(), ["a1", "c"]);
    }

    #[tokio::test]
    async fn fifo_mode_bound_refuses_newcomers() {
        let q = queue(1, false, Duration::ZERO, 1);
        let held = q.try_acquire().unwrap();
        let mut a = Box::pin(q.acquire(Class::Analytic, LONG));
        assert!(a.as_mut().now_or_never().is_none());
        let c = q.acquire(Class::Commit, LONG).now_or_never();
        assert_eq!(c.unwrap().unwrap_err(), AcquireError::Refused);
        drop(held);
        drop(a.await.unwrap());
        assert_eq!(q.available(), 1);
    }

    #[tokio::test]
    async fn timeout_frees_its_slot() {
        let q = queue(1, true, Duration::ZERO, 1);
        let held = q.try_acquire().unwrap();
        let err = q.acquire(Class::Read, Duration::from_millis(20)).await;
        assert_eq!(err.unwrap_err(), AcquireError::Timeout);
        assert_eq!(q.waiting(), 0);
        // The slot is free again: a new waiter fits under max_waiters = 1.
        let mut next = Box::pin(q.acquire(Class::Analytic, LONG));
        assert!(next.as_mut().now_or_never().is_none());
        drop(held);
        drop(next.await.unwrap());
        assert_eq!(q.available(), 1);
        let stats = q.stats();
        assert_eq!(stats.class(Class::Read).timeouts, 1);
        assert_eq!(stats.class(Class::Analytic).queued, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_wait_counts_toward_the_longest_wait() {
        let q = queue(1, true, Duration::ZERO, 0);
        let held = q.try_acquire().unwrap();
        let err = q.acquire(Class::Write, Duration::from_secs(3)).await;
        assert_eq!(err.unwrap_err(), AcquireError::Timeout);
        let write = q.stats().class(Class::Write).clone();
        assert_eq!((write.timeouts, write.acquired), (1, 0));
        assert!(write.max_wait_us >= 3_000_000, "{}", write.max_wait_us);
        // Percentiles are of granted waits only: none yet.
        assert_eq!(write.wait_percentile_us(0.99), None);
        drop(held);
    }

    #[tokio::test]
    async fn dropped_waiter_leaves_the_queue() {
        let q = queue(1, true, Duration::ZERO, 0);
        let held = q.try_acquire().unwrap();
        let mut w = Box::pin(q.acquire(Class::Read, LONG));
        assert!(w.as_mut().now_or_never().is_none());
        assert_eq!(q.waiting(), 1);
        drop(w);
        assert_eq!(q.waiting(), 0);
        drop(held);
        assert_eq!(q.available(), 1);
        assert_eq!(q.stats().class(Class::Read).cancellations, 1);
    }

    /// The race: a permit is granted to a waiter that is dropped before it picks it up.
    #[tokio::test]
    async fn permit_granted_to_a_dropped_waiter_goes_to_the_next() {
        let q = queue(1, true, Duration::ZERO, 0);
        let held = q.try_acquire().unwrap();
        let mut a = Box::pin(q.acquire(Class::Write, LONG));
        let mut b = Box::pin(q.acquire(Class::Read, LONG));
        assert!(a.as_mut().now_or_never().is_none());
        assert!(b.as_mut().now_or_never().is_none());
        drop(held); // granted to `a`, which is never polled again
        assert_eq!((q.available(), q.waiting()), (0, 1));
        drop(a);
        let p = b.as_mut().now_or_never().unwrap().unwrap();
        drop(p);
        assert_eq!(q.available(), 1);

        // Same race with nobody behind: the permit comes back.
        let held = q.try_acquire().unwrap();
        let mut c = Box::pin(q.acquire(Class::Read, LONG));
        assert!(c.as_mut().now_or_never().is_none());
        drop(held);
        drop(c);
        assert_eq!((q.available(), q.waiting()), (1, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stress_with_cancellation_never_leaks_or_oversubscribes() {
        const PERMITS: usize = 3;
        let q = queue(PERMITS, true, Duration::from_millis(2), 32);
        let held = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (q, held, peak) = (Arc::clone(&q), Arc::clone(&held), Arc::clone(&peak));
            tasks.push(tokio::spawn(async move {
                for _ in 0..200 {
                    let (class, timeout, cancel_after, hold) = {
                        let mut rng = rand::rng();
                        (
                            Class::ALL[rng.random_range(0..CLASSES)],
                            Duration::from_micros(rng.random_range(0..3000)),
                            Duration::from_micros(rng.random_range(0..3000)),
                            rng.random_bool(0.5),
                        )
                    };
                    tokio::select! {
                        r = q.acquire(class, timeout) => {
                            if let Ok(p) = r {
                                let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                                peak.fetch_max(now, Ordering::SeqCst);
                                if hold {
                                    tokio::time::sleep(Duration::from_micros(200)).await;
                                } else {
                                    tokio::task::yield_now().await;
                                }
                                held.fetch_sub(1, Ordering::SeqCst);
                                drop(p);
                            }
                        }
                        _ = tokio::time::sleep(cancel_after) => {}
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= PERMITS);
        assert_eq!(q.available(), PERMITS);
        assert_eq!(q.waiting(), 0);
        let total = q.stats().total();
        assert!(total.acquired > 0);
        assert_eq!(total.waiting, 0);
        // The run must have exercised every way out of the queue, not just the fast path.
        assert!(total.queued > 0 && total.timeouts > 0 && total.cancellations > 0);
        assert!(total.refusals > 0 && total.evictions > 0);
    }

    #[tokio::test]
    async fn set_permits_grows_and_shrinks() {
        let q = queue(1, true, Duration::ZERO, 0);
        let held = q.try_acquire().unwrap();
        let mut waiters: Vec<_> = (0..3)
            .map(|_| Box::pin(q.acquire(Class::Read, LONG)))
            .collect();
        for w in &mut waiters {
            assert!(w.as_mut().now_or_never().is_none());
        }
        q.set_permits(4);
        assert_eq!((q.available(), q.waiting()), (0, 0));
        let mut permits = vec![held];
        for w in waiters {
            permits.push(w.await.unwrap());
        }
        q.set_permits(1);
        let mut seen = Vec::new();
        while let Some(p) = permits.pop() {
            drop(p);
            seen.push(q.available());
        }
        assert_eq!(seen, [0, 0, 0, 1]);
        assert!(q.try_acquire().is_some());
    }

    #[tokio::test]
    async fn close_fails_waiters_and_newcomers() {
        let q = queue(1, true, Duration::ZERO, 0);
        let held = q.try_acquire().unwrap();
        let mut w = Box::pin(q.acquire(Class::Read, LONG));
        assert!(w.as_mut().now_or_never().is_none());
        q.close();
        assert_eq!(w.await.unwrap_err(), AcquireError::Closed);
        let late = q.acquire(Class::Commit, LONG).now_or_never();
        assert_eq!(late.unwrap().unwrap_err(), AcquireError::Closed);
        drop(held);
        assert_eq!(q.available(), 1);
    }

    #[tokio::test]
    async fn stats_record_waits() {
        let q = queue(1, true, Duration::ZERO, 0);
        drop(q.acquire(Class::Commit, LONG).await.unwrap());
        let held = q.try_acquire().unwrap();
        let (q2, wait) = (Arc::clone(&q), Duration::from_millis(5));
        let h = tokio::spawn(async move { q2.acquire(Class::Write, LONG).await.map(drop) });
        while q.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(q.stats().class(Class::Write).waiting, 1);
        tokio::time::sleep(wait).await;
        drop(held);
        h.await.unwrap().unwrap();

        let stats = q.stats();
        let commit = stats.class(Class::Commit);
        assert_eq!((commit.acquired, commit.queued), (1, 0));
        assert_eq!(commit.wait_us.percentile(0.99), Some(0));
        let write = stats.class(Class::Write);
        assert_eq!((write.acquired, write.queued, write.waiting), (1, 1, 0));
        assert!(write.max_wait_us >= 5_000, "{}", write.max_wait_us);
        assert!(write.wait_us.percentile(0.5).unwrap() >= 4_095);
        assert_eq!(stats.total().wait_us.count(), 2);
        assert_eq!((stats.permits, stats.in_use), (1, 0));
    }

    #[test]
    fn percentiles_never_exceed_the_longest_wait() {
        let mut c = ClassStats::default();
        // 2.964 s falls in the bucket [2^21, 2^22) µs, whose upper bound is 4.19 s.
        c.record_wait(Duration::from_millis(2_964));
        assert_eq!(c.wait_us.percentile(0.99), Some((1 << 22) - 1));
        assert_eq!(c.wait_percentile_us(0.99), Some(2_964_000));
        assert_eq!(c.wait_percentile_us(0.5), Some(2_964_000));
        c.record_wait(Duration::ZERO);
        c.record_wait(Duration::ZERO);
        assert_eq!(c.wait_percentile_us(0.5), Some(0));
    }

    #[test]
    fn histogram_percentiles() {
        let mut h = WaitHistogram::default();
        assert_eq!(h.percentile(0.5), None);
        for _ in 0..98 {
            h.record(0);
        }
        h.record(3);
        h.record(1_000);
        assert_eq!(h.count(), 100);
        assert_eq!(h.percentile(0.5), Some(0));
        assert_eq!(h.percentile(0.99), Some(3));
        assert_eq!(h.percentile(1.0), Some(1_023));
        h.record(u64::MAX);
        assert_eq!(h.buckets()[BUCKETS - 1], 1);
    }

    #[test]
    fn acquire_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let q = queue(1, true, Duration::ZERO, 0);
        let fut = q.acquire(Class::Read, LONG);
        assert_send(&fut);
    }

    /// Cost of the uncontended path; prints, never asserts (numbers belong in the README).
    /// `cargo test --release --lib pool::queue::tests::uncontended_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn uncontended_cost() {
        const N: u32 = 2_000_000;
        let q = queue(8, true, Duration::from_secs(1), 64);
        let start = std::time::Instant::now();
        for _ in 0..N {
            drop(std::hint::black_box(q.try_acquire()));
        }
        let try_ns = start.elapsed().as_nanos() / u128::from(N);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let acquire_ns = rt.block_on(async {
            let start = std::time::Instant::now();
            for _ in 0..N {
                drop(std::hint::black_box(
                    q.acquire(Class::Read, LONG).await.unwrap(),
                ));
            }
            start.elapsed().as_nanos() / u128::from(N)
        });
        println!("try_acquire+drop: {try_ns} ns; acquire().await+drop: {acquire_ns} ns");
    }

    /// A fractional share: 0.6 of four permits is two held back for reads, and a third granted
    /// whenever their recent share of permit time is below 0.6.
    #[tokio::test(start_paused = true)]
    async fn fractional_share_follows_permit_time() {
        let mut s = State::new(QueueConfig {
            permits: 4,
            priority: true,
            aging: Duration::from_secs(60),
            max_waiters: 0,
            background_share: 600,
        });
        let now = Instant::now();
        for _ in 0..8 {
            s.push(Class::Write, now);
            s.push(Class::Analytic, now);
        }
        s.grant();
        assert_eq!(
            (s.in_use, s.background_in_use),
            (4, 2),
            "two whole permits of 2.4"
        );

        // Half the permit time so far went to reads: below 0.6, so a freed write permit goes
        // to a read.
        tokio::time::advance(Duration::from_millis(100)).await;
        s.release(false);
        assert_eq!((s.in_use, s.background_in_use), (4, 3));

        // Reads held three of four for a while: above 0.6, so a freed read permit goes to a
        // write, and reads stay at two.
        tokio::time::advance(Duration::from_secs(2)).await;
        s.release(true);
        assert_eq!((s.in_use, s.background_in_use), (4, 2));
        s.release(true);
        assert_eq!(
            (s.in_use, s.background_in_use),
            (4, 2),
            "whole permits stay theirs"
        );

        // Never the last permit, whatever the share.
        let mut s = State::new(QueueConfig {
            background_share: 1000,
            ..s.cfg
        });
        for _ in 0..4 {
            s.push(Class::Write, now);
            s.push(Class::Analytic, now);
        }
        s.grant();
        assert_eq!((s.in_use, s.background_in_use), (4, 3));

        // Share 0: class order only.
        let mut s = State::new(QueueConfig {
            background_share: 0,
            ..s.cfg
        });
        for _ in 0..4 {
            s.push(Class::Write, now);
            s.push(Class::Analytic, now);
        }
        s.grant();
        assert_eq!((s.in_use, s.background_in_use), (4, 0));
    }

    /// A backlog of reports that has waited many agings still gets its share and no more:
    /// freed permits go to the writes queued after it.
    #[tokio::test(start_paused = true)]
    async fn an_aged_backlog_of_reports_keeps_its_share_only() {
        let mut s = State::new(QueueConfig {
            permits: 4,
            priority: true,
            aging: Duration::from_millis(100),
            max_waiters: 0,
            background_share: 350,
        });
        let t0 = Instant::now();
        s.in_use = 4;
        for _ in 0..8 {
            s.push(Class::Analytic, t0);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..8 {
            s.push(Class::Write, Instant::now());
        }
        for _ in 0..4 {
            s.release(false);
        }
        assert_eq!(
            (s.in_use, s.background_in_use),
            (4, 1),
            "one whole permit of 1.4"
        );
    }

    #[tokio::test]
    async fn reads_keep_half_the_permits_while_they_wait() {
        let q = Arc::new(PermitQueue::new(QueueConfig {
            permits: 4,
            priority: true,
            aging: Duration::from_secs(60),
            max_waiters: 0,
            background_share: 500,
        }));
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(
                q.acquire(Class::Write, Duration::from_secs(1))
                    .await
                    .unwrap(),
            );
        }
        // Writers and readers queue up; writers arrive first and are more urgent.
        let mut writers = Vec::new();
        for _ in 0..4 {
            let q = Arc::clone(&q);
            writers.push(tokio::spawn(async move {
                q.acquire(Class::Write, Duration::from_secs(5)).await
            }));
        }
        tokio::task::yield_now().await;
        let mut readers = Vec::new();
        for _ in 0..4 {
            let q = Arc::clone(&q);
            readers.push(tokio::spawn(async move {
                q.acquire(Class::Analytic, Duration::from_secs(5)).await
            }));
        }
        while q.waiting() < 8 {
            tokio::task::yield_now().await;
        }
        // Free all four: two go to readers (their share), two to writers.
        held.clear();
        while q.waiting() > 4 {
            tokio::task::yield_now().await;
        }
        let s = q.stats();
        assert_eq!(s.class(Class::Write).waiting, 2);
        assert_eq!(s.class(Class::Analytic).waiting, 2);
        for h in writers.into_iter().chain(readers) {
            h.abort();
        }
    }
}
