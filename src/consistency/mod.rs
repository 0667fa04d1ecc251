//! Read-your-writes. After a write commits, the session holds a token: a WAL position at or
//! past its commit record. A read may use a replica only once that replica has replayed the
//! token; keyed tokens let sessions that name the same key see each other's writes, and
//! presented tokens carry a position between connections or proxies.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::cluster::lsn::Lsn;
use crate::config::{ConsistencyMode, ConsistencyScope};

/// Keyed tokens shared by every session: key -> (highest commit token, expiry, when a write
/// under it was acknowledged without a token whose derived token is not in yet).
///
/// A key forgotten (evicted at `max`, dropped after its expiry, or never seen by this process
/// because the proxy restarted) must not let a read under it see less than it did: its token
/// goes into a floor that reads under any key with nothing recorded wait for. At start the
/// floor is the primary's position at the first poll after start (writes before it are
/// unknown), so such reads stay on the primary until that poll has answered.
pub struct Keys {
    map: DashMap<String, (Lsn, Instant, Option<Instant>)>,
    ttl: Duration,
    max: usize,
    /// The highest token of a forgotten key.
    floor: AtomicU64,
    /// Set while `floor_unconfirmed` holds a time whose derived token is not in the floor.
    floor_pending: AtomicBool,
    /// The latest such time: the proxy's start, or a forgotten key's tokenless write.
    floor_unconfirmed: Mutex<Option<Instant>>,
}

/// What a key requires of a read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyToken {
    /// The highest commit token recorded under the key, or the floor when nothing is.
    pub lsn: Lsn,
    /// When a write under the key (or a forgotten one) was acknowledged without a token: its
    /// derived token is still to be found.
    pub unconfirmed: Option<Instant>,
}

impl Keys {
    /// An empty registry whose entries expire `ttl` after their last write; writes made before
    /// `started` (by an earlier process) are covered by the floor.
    pub fn new(ttl: Duration, max: usize, started: Instant) -> Self {
        Self {
            map: DashMap::new(),
            ttl,
            max: max.max(1),
            floor: AtomicU64::new(0),
            floor_pending: AtomicBool::new(true),
            floor_unconfirmed: Mutex::new(Some(started)),
        }
    }

    /// Raises `key`'s token to `lsn`.
    pub fn record(&self, key: &str, lsn: Lsn, now: Instant) {
        self.upsert(key, now, |l, _| *l = (*l).max(lsn));
    }

    /// Notes a write under `key` whose token was lost: reads under the key keep to the primary
    /// until its derived token is known, then wait for it.
    pub fn record_unconfirmed(&self, key: &str, now: Instant) {
        self.upsert(key, now, |_, u| *u = Some(now));
    }

    fn upsert(&self, key: &str, now: Instant, update: impl Fn(&mut Lsn, &mut Option<Instant>)) {
        if self.map.len() >= self.max && !self.map.contains_key(key) {
            self.map.retain(|_, e| {
                let keep = e.1 > now;
                if !keep {
                    self.forget(*e);
                }
                keep
            });
            if self.map.len() >= self.max {
                // Still full of live keys: forget the one expiring soonest.
                let oldest = self
                    .map
                    .iter()
                    .min_by_key(|e| e.value().1)
                    .map(|e| e.key().clone());
                if let Some((_, e)) = oldest.and_then(|k| self.map.remove(&k)) {
                    self.forget(e);
                }
            }
        }
        let expires = now + self.ttl;
        let mut entry = self
            .map
            .entry(key.to_string())
            .or_insert((0, expires, None));
        let (lsn, e, unconfirmed) = entry.value_mut();
        update(lsn, unconfirmed);
        *e = expires;
    }

    /// A key leaves the map: the floor takes what it required.
    fn forget(&self, (lsn, _, unconfirmed): (Lsn, Instant, Option<Instant>)) {
        self.floor.fetch_max(lsn, Ordering::AcqRel);
        if let Some(t) = unconfirmed {
            let mut u = self.floor_lock();
            *u = Some(u.map_or(t, |u| u.max(t)));
            self.floor_pending.store(true, Ordering::Release);
        }
    }

    fn floor_lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.floor_unconfirmed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `key`'s requirement. A key whose entry expired still has its token (the entry stays
    /// until the registry needs the room); one with nothing recorded has the floor.
    pub fn get(&self, key: &str) -> KeyToken {
        if let Some(e) = self.map.get(key) {
            return KeyToken {
                lsn: e.value().0,
                unconfirmed: e.value().2,
            };
        }
        KeyToken {
            lsn: self.floor.load(Ordering::Acquire),
            unconfirmed: if self.floor_pending.load(Ordering::Acquire) {
                *self.floor_lock()
            } else {
                None
            },
        }
    }

    /// The derived token `lsn` of a tokenless write acknowledged at `at`, as [`Keys::get`]
    /// reported it for `key`, is known: it replaces the mark.
    pub fn settle(&self, key: &str, at: Instant, lsn: Lsn) {
        if let Some(mut e) = self.map.get_mut(key) {
            let (token, _, unconfirmed) = e.value_mut();
            *token = (*token).max(lsn);
            if *unconfirmed == Some(at) {
                *unconfirmed = None;
            }
            return;
        }
        self.floor.fetch_max(lsn, Ordering::AcqRel);
        let mut u = self.floor_lock();
        if *u == Some(at) {
            *u = None;
            self.floor_pending.store(false, Ordering::Release);
        }
    }

    /// Keys held right now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// One session's read-your-writes state.
#[derive(Debug, Default, Clone)]
pub struct SessionTokens {
    /// Token of the session's last write: taken after its commit, or derived.
    pub own: Lsn,
    /// When the session last wrote (sticky windows).
    pub last_write: Option<Instant>,
    /// `SET causeway.consistency_key`.
    pub key: Option<String>,
    /// `SET causeway.min_lsn`.
    pub presented: Lsn,
    /// When the last write without a token of its own (sticky mode, or its token query failed)
    /// was acknowledged, until its derived token is in `own`.
    pub unresolved: Option<Instant>,
}

/// What the next read needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    /// Replicas must have replayed at least this far.
    pub min_lsn: Lsn,
    /// Go to the primary (sticky window, or a write whose position is not known yet).
    pub primary: bool,
}

/// Everything the rule looks at for one read.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub mode: ConsistencyMode,
    pub scope: ConsistencyScope,
    pub session: &'a SessionTokens,
    /// Token of the consistency key in force (session key or the statement's hint).
    pub key_token: Lsn,
    /// A write under that key has no known position yet.
    pub key_unresolved: bool,
    /// The highest token seen through this proxy.
    pub global_token: Lsn,
    /// A write through this proxy has no known position yet (global scope).
    pub global_unresolved: bool,
    /// A `causeway:min_lsn` hint on the statement.
    pub hinted: Lsn,
    /// Whether the monitor's replica positions are recent.
    pub lsn_fresh: bool,
    pub sticky_window: Duration,
    pub now: Instant,
}

/// Decides what a read must wait for. Pure.
///
/// Every write the proxy knows of has a position (its token, or the derived token of a write
/// that had none) or, until that is known, keeps reads on the primary. Modes differ only in
/// which writes a session follows and whether the sticky window sends reads to the primary
/// before the positions are consulted; whatever mode was in force when a write was made, its
/// position is honoured afterwards.
pub fn requirement(i: Inputs<'_>) -> Requirement {
    let presented = i.session.presented.max(i.hinted);
    let within = |t: Option<Instant>| t.is_some_and(|t| i.now.duration_since(t) < i.sticky_window);
    let recent_write = within(i.session.last_write);
    let global = i.scope == ConsistencyScope::Global;
    // A write with no known position yet: only the primary is sure to have it.
    let unresolved =
        i.session.unresolved.is_some() || i.key_unresolved || (global && i.global_unresolved);
    let tokens = i
        .session
        .own
        .max(i.key_token)
        .max(if global { i.global_token } else { 0 })
        .max(presented);
    match i.mode {
        // Tokens a client presents are honoured in every mode: it asked for them.
        ConsistencyMode::None => Requirement {
            min_lsn: presented,
            primary: false,
        },
        ConsistencyMode::Sticky => Requirement {
            min_lsn: tokens,
            primary: recent_write || unresolved,
        },
        ConsistencyMode::Lsn => Requirement {
            min_lsn: tokens,
            primary: unresolved,
        },
        ConsistencyMode::LsnSticky => Requirement {
            min_lsn: tokens,
            primary: unresolved || (!i.lsn_fresh && recent_write),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(mode: ConsistencyMode, s: &SessionTokens, now: Instant) -> Inputs<'_> {
        Inputs {
            mode,
            scope: ConsistencyScope::Session,
            session: s,
            key_token: 0,
            key_unresolved: false,
            global_token: 0,
            global_unresolved: false,
            hinted: 0,
            lsn_fresh: true,
            sticky_window: Duration::from_millis(2000),
            now,
        }
    }

    #[test]
    fn requirement_table() {
        let now = Instant::now();
        let wrote = SessionTokens {
            own: 100,
            last_write: Some(now),
            ..Default::default()
        };
        let idle = SessionTokens::default();
        use ConsistencyMode::*;
        let r = |mode, s| requirement(inputs(mode, s, now));
        assert_eq!(
            r(Lsn, &wrote),
            Requirement {
                min_lsn: 100,
                primary: false
            }
        );
        assert_eq!(
            r(Lsn, &idle),
            Requirement {
                min_lsn: 0,
                primary: false
            }
        );
        assert_eq!(
            r(Sticky, &wrote),
            Requirement {
                min_lsn: 100,
                primary: true
            }
        );
        assert_eq!(
            r(Sticky, &idle),
            Requirement {
                min_lsn: 0,
                primary: false
            }
        );
        assert_eq!(
            r(None, &wrote),
            Requirement {
                min_lsn: 0,
                primary: false
            }
        );
        assert_eq!(
            r(LsnSticky, &wrote),
            Requirement {
                min_lsn: 100,
                primary: false
            }
        );
        let mut stale = inputs(LsnSticky, &wrote, now);
        stale.lsn_fresh = false;
        assert!(requirement(stale).primary);
        // The window closes: the write's position still holds.
        let later = now + Duration::from_millis(2500);
        assert_eq!(
            requirement(inputs(Sticky, &wrote, later)),
            Requirement {
                min_lsn: 100,
                primary: false
            }
        );
        // A write with no known position keeps reads on the primary however long it takes,
        // in every mode but `none`.
        let lost = SessionTokens {
            unresolved: Some(now),
            ..Default::default()
        };
        for mode in [Lsn, LsnSticky, Sticky] {
            assert!(requirement(inputs(mode, &lost, later)).primary, "{mode:?}");
        }
        assert!(!requirement(inputs(None, &lost, later)).primary);
    }

    #[test]
    fn keys_globals_and_presented_tokens_raise_the_bar() {
        let now = Instant::now();
        let s = SessionTokens {
            own: 10,
            presented: 50,
            ..Default::default()
        };
        let mut i = inputs(ConsistencyMode::Lsn, &s, now);
        assert_eq!(requirement(i).min_lsn, 50);
        i.key_token = 70;
        assert_eq!(requirement(i).min_lsn, 70);
        i.global_token = 90;
        assert_eq!(
            requirement(i).min_lsn,
            70,
            "global tokens count only in global scope"
        );
        i.scope = ConsistencyScope::Global;
        assert_eq!(requirement(i).min_lsn, 90);
        i.hinted = 120;
        assert_eq!(requirement(i).min_lsn, 120);
        i.mode = ConsistencyMode::None;
        assert_eq!(
            requirement(i).min_lsn,
            120,
            "presented tokens hold in every mode"
        );
    }

    #[test]
    fn sticky_mode_follows_key_and_global_writes_by_their_tokens() {
        let now = Instant::now();
        let s = SessionTokens::default();
        let mut i = inputs(ConsistencyMode::Sticky, &s, now);
        assert_eq!(
            requirement(i),
            Requirement {
                min_lsn: 0,
                primary: false
            }
        );
        // Another session wrote under this session's key: its token holds here too.
        i.key_token = 70;
        assert_eq!(requirement(i).min_lsn, 70);
        i.scope = ConsistencyScope::Global;
        i.global_token = 90;
        assert_eq!(requirement(i).min_lsn, 90);
        // A write under the key lost its token: only the primary is sure to have it.
        i.key_unresolved = true;
        assert!(requirement(i).primary);
        let lost = SessionTokens {
            unresolved: Some(now),
            ..Default::default()
        };
        assert!(requirement(inputs(ConsistencyMode::Sticky, &lost, now)).primary);
    }

    #[test]
    fn keys_raise_and_stay_bounded_and_forgotten_keys_leave_a_floor() {
        let now = Instant::now();
        let k = Keys::new(Duration::from_millis(100), 2, now);
        // Before the first poll after start, a key with nothing recorded is unknown.
        assert_eq!(k.get("zzz").unconfirmed, Some(now));
        k.settle("zzz", now, 4);
        assert_eq!(
            k.get("zzz"),
            KeyToken {
                lsn: 4,
                unconfirmed: None
            },
            "the start floor"
        );
        k.record("a", 5, now);
        k.record("a", 3, now);
        assert_eq!(k.get("a").lsn, 5, "a token never goes down");
        k.record("b", 7, now);
        k.record("c", 9, now + Duration::from_millis(10));
        assert!(k.len() <= 2);
        assert_eq!(k.get("c").lsn, 9);
        assert_eq!(k.get("a").lsn, 5, "evicted: its token is the floor");
        // A lost token marks the key, and keeps the token it had.
        let t = now + Duration::from_millis(20);
        k.record_unconfirmed("c", t);
        assert_eq!(
            k.get("c"),
            KeyToken {
                lsn: 9,
                unconfirmed: Some(t)
            }
        );
        k.settle("c", t, 11);
        assert_eq!(
            k.get("c"),
            KeyToken {
                lsn: 11,
                unconfirmed: None
            }
        );
        // A key evicted with its mark still open hands the mark to the floor.
        k.record_unconfirmed("c", t);
        k.record("d", 12, t);
        k.record("e", 13, t + Duration::from_millis(150));
        assert_eq!(k.get("c").unconfirmed, Some(t));
        k.settle("c", t, 14);
        assert_eq!(
            k.get("c"),
            KeyToken {
                lsn: 14,
                unconfirmed: None
            }
        );
    }

    #[test]
    fn an_expired_key_keeps_its_token_until_the_room_is_needed() {
        let now = Instant::now();
        let k = Keys::new(Duration::from_millis(100), 2, now);
        k.record("a", 5, now);
        let later = now + Duration::from_millis(150);
        k.record("b", 6, later);
        assert_eq!(k.get("a").lsn, 5, "expired, still in the map");
        assert_eq!(k.get("other").lsn, 0, "so the floor has not taken it");
        k.record("c", 7, later + Duration::from_millis(10));
        assert_eq!(k.get("b").lsn, 6, "a live key stays");
        assert_eq!(
            k.get("other").lsn,
            5,
            "the expired key made room: the floor has it"
        );
        assert_eq!(k.get("a").lsn, 5);
    }

    #[test]
    fn a_lost_key_or_global_token_keeps_reads_on_the_primary() {
        let now = Instant::now();
        let idle = SessionTokens::default();
        let mut i = inputs(ConsistencyMode::Lsn, &idle, now);
        i.key_unresolved = true;
        assert!(requirement(i).primary, "key");
        let mut i = inputs(ConsistencyMode::Lsn, &idle, now);
        i.global_unresolved = true;
        assert!(
            !requirement(i).primary,
            "global marks count only in global scope"
        );
        i.scope = ConsistencyScope::Global;
        assert!(requirement(i).primary, "global");
    }
}
