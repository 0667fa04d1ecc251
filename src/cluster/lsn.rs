//! WAL positions and replica lag, on one tested type so the arithmetic cannot be turned around.

use std::collections::VecDeque;
use std::str::FromStr;

use tokio_postgres::types::PgLsn;

/// A WAL position as a plain number (`X/Y` is `X << 32 | Y`); 0 means unknown.
pub type Lsn = u64;

/// An LSN that is not of the `X/Y` hexadecimal form PostgreSQL prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected the form 16/B374D848")]
pub struct InvalidLsn(pub String);

/// Parses PostgreSQL's text form of a pg_lsn.
pub fn parse(text: &str) -> Result<Lsn, InvalidLsn> {
    let t = text.trim();
    let (hi, lo) = t.split_once('/').ok_or_else(|| InvalidLsn(text.into()))?;
    let ok = |s: &str| !s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok(hi) || !ok(lo) {
        return Err(InvalidLsn(text.into()));
    }
    PgLsn::from_str(t)
        .map(u64::from)
        .map_err(|_| InvalidLsn(text.into()))
}

/// A WAL page's header: 24 bytes, 40 on the first page of a segment.
const PAGE_HEADER: u64 = 24;
const SEGMENT_HEADER: u64 = 40;

/// The WAL page and segment sizes of a cluster (`wal_block_size`, `wal_segment_size`), read
/// from the primary; zero while unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WalGeometry {
    pub page: u64,
    pub segment: u64,
}

/// Where the last record before `insert` ended. `pg_current_wal_insert_lsn()` taken right after
/// a commit whose record ended exactly at a page boundary points past the next page's header,
/// where nothing is written yet; a replica's replay position stops at the boundary, and would
/// not reach such a token until more WAL followed. Such a position is moved back to the
/// boundary; any other is the end of the last record already.
pub fn record_end(insert: Lsn, wal: WalGeometry) -> Lsn {
    if wal.page == 0 || wal.segment == 0 || insert < wal.page {
        return insert;
    }
    if insert % wal.segment == SEGMENT_HEADER {
        insert - SEGMENT_HEADER
    } else if insert % wal.page == PAGE_HEADER {
        insert - PAGE_HEADER
    } else {
        insert
    }
}

/// PostgreSQL's text form of a pg_lsn.
pub fn format(lsn: Lsn) -> String {
    PgLsn::from(lsn).to_string()
}

/// How far a replica is behind the primary, from one pair of monitor readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The primary's `pg_current_wal_lsn()`.
    pub primary: Lsn,
    /// The replica's `pg_last_wal_replay_lsn()`.
    pub replayed: Lsn,
    /// The replica's `pg_last_xact_replay_timestamp()` in µs since the epoch, if any.
    pub replayed_at_us: Option<i64>,
}

impl Progress {
    /// WAL bytes the replica has still to replay (never negative: a replica read after the
    /// primary may already be ahead of that reading).
    pub fn lag_bytes(&self) -> u64 {
        self.primary.saturating_sub(self.replayed)
    }

    /// How long ago, in ms, the primary was at the position this replica has replayed, given
    /// where that position falls in the primary's history (`now_ms` on the history's clock);
    /// 0 when it is caught up.
    ///
    /// The age of the last replayed commit (`now_us`, wall clock) is an upper bound of that lag
    /// (the primary wrote the commit before reaching any later position) but no estimate of
    /// it: during a long transaction it grows while the replica keeps up. It is used only where
    /// the history cannot place the replica: none yet, or a position older than all of it.
    pub fn lag_ms(&self, behind: Behind, now_ms: u64, now_us: i64) -> u64 {
        if self.lag_bytes() == 0 {
            return 0;
        }
        match behind {
            Behind::No => 0,
            Behind::Since(at_ms) => now_ms.saturating_sub(at_ms),
            Behind::BeforeSpan(oldest_ms) => now_ms
                .saturating_sub(oldest_ms)
                .max(self.commit_age_ms(now_us)),
            Behind::Unknown => self.commit_age_ms(now_us),
        }
    }

    /// Milliseconds since the last transaction the replica replayed was committed; 0 if none.
    fn commit_age_ms(&self, now_us: i64) -> u64 {
        self.replayed_at_us.map_or(0, |at| {
            u64::try_from((now_us - at).max(0) / 1000).unwrap_or(0)
        })
    }
}

/// Where a replay position falls in the primary's [`History`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behind {
    /// No reading of the primary yet.
    Unknown,
    /// Not behind: no reading is past the position.
    No,
    /// The primary first got past the position at this time.
    Since(u64),
    /// The primary was past the position already at its oldest reading, taken at this time:
    /// behind for at least that long.
    BeforeSpan(u64),
}

/// Readings of the primary's WAL position over time, one per change of position, so that a
/// replica's replay position can be placed in time. Bounded: past `capacity` readings the
/// oldest are dropped.
#[derive(Debug)]
pub struct History {
    /// (ms on the caller's clock, position), oldest first; both only grow.
    readings: VecDeque<(u64, Lsn)>,
    capacity: usize,
}

impl History {
    /// An empty history of at most `capacity` readings, allocated now so that recording never
    /// allocates.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            readings: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Records that the primary was at `lsn` at `at_ms`. An unchanged position adds nothing; a
    /// position below the last one is another server's WAL (a new primary), so what was
    /// recorded before is forgotten.
    pub fn record(&mut self, at_ms: u64, lsn: Lsn) {
        if lsn == 0 {
            return;
        }
        match self.readings.back() {
            Some(&(_, last)) if lsn == last => return,
            Some(&(_, last)) if lsn < last => self.readings.clear(),
            _ => {}
        }
        if self.readings.len() == self.capacity {
            self.readings.pop_front();
        }
        self.readings.push_back((at_ms, lsn));
    }

    /// Forgets every reading (the primary changed).
    pub fn clear(&mut self) {
        self.readings.clear();
    }

    /// Where `replayed` falls: when the primary was first seen past it. A binary search; no
    /// allocation.
    pub fn behind(&self, replayed: Lsn) -> Behind {
        let first_past = self.readings.partition_point(|&(_, lsn)| lsn <= replayed);
        match self.readings.get(first_past) {
            None if self.readings.is_empty() => Behind::Unknown,
            None => Behind::No,
            Some(&(at_ms, _)) if first_past == 0 => Behind::BeforeSpan(at_ms),
            Some(&(at_ms, _)) => Behind::Since(at_ms),
        }
    }
}

/// Readings of the primary's WAL position by the time each poll was sent, so that a write
/// acknowledged without a token of its own can be given one: any poll sent after the write
/// was acknowledged ran after its commit, so its reading is at or past the commit record (a
/// "derived token"). Consecutive polls that found the same position share one entry.
/// Bounded: past `capacity` entries the oldest are dropped, which only makes the derived
/// token of an older write later than it could be, never earlier.
#[derive(Debug)]
pub struct Fences {
    /// (first poll sent, last poll sent, position), oldest first; times in µs on the caller's
    /// clock; every field only grows.
    entries: VecDeque<(u64, u64, Lsn)>,
    capacity: usize,
}

impl Fences {
    /// An empty list of at most `capacity` entries, allocated now.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            entries: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Records that a poll sent at `sent_us` found the primary at `lsn`. A lower position than
    /// the last is another server's WAL (a new primary): what was kept before is forgotten.
    pub fn record(&mut self, sent_us: u64, lsn: Lsn) {
        if lsn == 0 {
            return;
        }
        match self.entries.back_mut() {
            Some(e) if e.2 == lsn => {
                e.1 = e.1.max(sent_us);
                return;
            }
            Some(e) if lsn < e.2 => self.entries.clear(),
            _ => {}
        }
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back((sent_us, sent_us, lsn));
    }

    /// Forgets every reading (the primary changed).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The reading of the first poll sent strictly after `after_us`, if one has answered: a
    /// position at or past everything committed by then.
    pub fn first_after(&self, after_us: u64) -> Option<Lsn> {
        let i = self
            .entries
            .partition_point(|&(_, last, _)| last <= after_us);
        self.entries.get(i).map(|&(_, _, lsn)| lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_past_a_fresh_page_header_moves_back_to_the_boundary() {
        let wal = WalGeometry {
            page: 8192,
            segment: 16 << 20,
        };
        // Mid-page: the end of the last record already.
        assert_eq!(record_end(0x3000060, wal), 0x3000060);
        // Right after a page header: the boundary.
        assert_eq!(record_end(0x3002018, wal), 0x3002000);
        // Right after a segment's first (long) page header.
        assert_eq!(record_end(0x4000028, wal), 0x4000000);
        // Unknown geometry: as given.
        assert_eq!(record_end(0x3002018, WalGeometry::default()), 0x3002018);
        // Other page sizes.
        let big = WalGeometry {
            page: 32768,
            segment: 64 << 20,
        };
        assert_eq!(record_end(0x8018, big), 0x8000);
        assert_eq!(record_end(0x2018, big), 0x2018);
    }

    #[test]
    fn parse_and_format_round_trip() {
        assert_eq!(parse("0/3000060"), Ok(0x3000060));
        assert_eq!(parse("16/B374D848"), Ok((0x16 << 32) | 0xB374D848));
        assert_eq!(format(0x3000060), "0/3000060");
        assert_eq!(format(parse("16/B374D848").unwrap()), "16/B374D848");
        for bad in ["", "3000060", "0/", "/1", "x/1", "0/123456789", "1/2/3"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lag_is_primary_minus_replayed_never_the_reverse() {
        let behind = Progress {
            primary: 1000,
            replayed: 400,
            replayed_at_us: Some(1_000_000),
        };
        assert_eq!(behind.lag_bytes(), 600);
        assert_eq!(behind.lag_ms(Behind::Since(5_000), 5_250, 0), 250);
        let ahead = Progress {
            primary: 400,
            replayed: 1000,
            replayed_at_us: Some(1_000_000),
        };
        assert_eq!(ahead.lag_bytes(), 0);
        assert_eq!(
            ahead.lag_ms(Behind::BeforeSpan(0), 9_000, 9_000_000),
            0,
            "caught up means no lag, however old"
        );
    }

    #[test]
    fn lag_is_the_age_of_the_primary_reading_first_past_the_replica() {
        let p = Progress {
            primary: 1000,
            replayed: 400,
            // The last commit is 60 s old: a long transaction is being replayed.
            replayed_at_us: Some(1_000_000),
        };
        let now_us = 61_000_000;
        assert_eq!(p.lag_ms(Behind::No, 10_000, now_us), 0);
        assert_eq!(p.lag_ms(Behind::Since(9_990), 10_000, now_us), 10);
        // Older than all the history: at least its span, and the commit's age bounds it above.
        assert_eq!(p.lag_ms(Behind::BeforeSpan(2_000), 10_000, now_us), 60_000);
        assert_eq!(
            p.lag_ms(Behind::BeforeSpan(2_000), 10_000, 5_000_000),
            8_000
        );
        // No history: the commit's age, as before there was one.
        assert_eq!(p.lag_ms(Behind::Unknown, 10_000, now_us), 60_000);
        let never = Progress {
            primary: 10,
            replayed: 0,
            replayed_at_us: None,
        };
        assert_eq!(never.lag_ms(Behind::Unknown, 5, 5), 0);
        assert_eq!(never.lag_ms(Behind::BeforeSpan(1), 5, 5), 4);
    }

    #[test]
    fn history_places_a_replay_position_in_time() {
        let mut h = History::new(16);
        assert_eq!(h.behind(100), Behind::Unknown, "empty");
        for (at, lsn) in [(10, 100), (20, 200), (30, 300), (40, 400)] {
            h.record(at, lsn);
        }
        // At or ahead of the latest reading.
        assert_eq!(h.behind(400), Behind::No);
        assert_eq!(h.behind(450), Behind::No);
        // Behind by some readings: the first reading past the position.
        assert_eq!(h.behind(399), Behind::Since(40));
        assert_eq!(h.behind(300), Behind::Since(40));
        assert_eq!(h.behind(250), Behind::Since(30));
        assert_eq!(h.behind(100), Behind::Since(20));
        // Behind the whole history.
        assert_eq!(h.behind(99), Behind::BeforeSpan(10));
        assert_eq!(h.behind(0), Behind::BeforeSpan(10));
    }

    #[test]
    fn history_keeps_changes_only_and_restarts_on_a_lower_position() {
        let mut h = History::new(16);
        h.record(10, 100);
        h.record(20, 100);
        h.record(25, 0);
        assert_eq!(
            h.behind(99),
            Behind::BeforeSpan(10),
            "the first time at 100 counts"
        );
        h.record(30, 200);
        // A new primary whose WAL ends below the old one's.
        h.record(40, 150);
        assert_eq!(h.behind(120), Behind::BeforeSpan(40));
        assert_eq!(h.behind(150), Behind::No);
        h.clear();
        assert_eq!(h.behind(150), Behind::Unknown);
    }

    #[test]
    fn history_drops_its_oldest_readings_when_full() {
        let mut h = History::new(4);
        let allocated = h.readings.capacity();
        for i in 1..=10u64 {
            h.record(i * 10, i * 100);
        }
        // Readings 7..=10 are left, stored across the end of the ring.
        assert_eq!(h.readings.len(), 4);
        assert_eq!(h.behind(1000), Behind::No);
        assert_eq!(h.behind(950), Behind::Since(100));
        assert_eq!(h.behind(800), Behind::Since(90));
        assert_eq!(h.behind(700), Behind::Since(80));
        assert_eq!(h.behind(699), Behind::BeforeSpan(70));
        assert_eq!(h.behind(100), Behind::BeforeSpan(70));
        let (front, back) = h.readings.as_slices();
        assert!(!front.is_empty() && !back.is_empty(), "wrapped");
        assert_eq!(
            h.readings.capacity(),
            allocated,
            "no allocation after new()"
        );
    }

    #[test]
    fn a_derived_token_is_the_first_poll_sent_after_the_write() {
        let mut f = Fences::new(3);
        assert_eq!(f.first_after(0), None, "no poll yet");
        f.record(10, 100);
        f.record(20, 100);
        f.record(30, 200);
        // Acknowledged at 15: the poll sent at 20 found 100.
        assert_eq!(f.first_after(15), Some(100));
        // At 20 exactly: only a poll sent later counts.
        assert_eq!(f.first_after(20), Some(200));
        assert_eq!(f.first_after(5), Some(100));
        assert_eq!(f.first_after(30), None, "no poll sent after it yet");
        // An unchanged position extends its entry: a later poll still answers.
        f.record(40, 200);
        assert_eq!(f.first_after(30), Some(200));
        // Full: the oldest goes; a write older than all kept gets the oldest kept, later than
        // needed but never earlier.
        f.record(50, 300);
        f.record(60, 400);
        assert_eq!(f.first_after(5), Some(200));
        // A lower position: a new primary, the rest is forgotten.
        f.record(70, 50);
        assert_eq!(f.first_after(5), Some(50));
        assert_eq!(f.first_after(70), None);
        f.record(80, 0);
        assert_eq!(
            f.first_after(70),
            None,
            "unknown positions are not readings"
        );
    }
}
