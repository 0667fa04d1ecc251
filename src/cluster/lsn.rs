//! WAL positions and replica lag, on one tested type so the arithmetic cannot be turned around.

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

    /// Milliseconds since the last transaction the replica replayed, while it has WAL to
    /// replay; 0 when it is caught up.
    pub fn lag_ms(&self, now_us: i64) -> u64 {
        if self.lag_bytes() == 0 {
            return 0;
        }
        match self.replayed_at_us {
            Some(at) => u64::try_from((now_us - at).max(0) / 1000).unwrap_or(0),
            None => 0,
        }
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
        assert_eq!(behind.lag_ms(1_250_000), 250);
        let ahead = Progress {
            primary: 400,
            replayed: 1000,
            replayed_at_us: Some(1_000_000),
        };
        assert_eq!(ahead.lag_bytes(), 0);
        assert_eq!(
            ahead.lag_ms(9_000_000),
            0,
            "caught up means no lag, however old"
        );
        let never = Progress {
            primary: 10,
            replayed: 0,
            replayed_at_us: None,
        };
        assert_eq!(never.lag_bytes(), 10);
        assert_eq!(never.lag_ms(5), 0);
    }
}
