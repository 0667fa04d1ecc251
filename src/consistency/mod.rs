//! Read-your-writes. After a write commits, the session holds a token: a WAL position at or
//! past its commit record. A read may use a replica only once that replica has replayed the
//! token; keyed tokens let sessions that name the same key see each other's writes, and
//! presented tokens carry a position between connections or proxies.

use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::cluster::lsn::Lsn;
use crate::config::{ConsistencyMode, ConsistencyScope};

/// Keyed tokens shared by every session: key -> (highest commit token, expiry, when a write
/// under it last lost its token).
pub struct Keys {
    map: DashMap<String, (Lsn, Instant, Option<Instant>)>,
    ttl: Duration,
    max: usize,
}

/// What a key requires of a read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyToken {
    /// The highest commit token recorded under the key (0 for none).
    pub lsn: Lsn,
    /// When a write under the key was acknowledged without a token.
    pub unconfirmed: Option<Instant>,
}

impl Keys {
    /// An empty registry whose entries expire `ttl` after their last write.
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            map: DashMap::new(),
            ttl,
            max: max.max(1),
        }
    }

    /// Raises `key`'s token to `lsn`.
    pub fn record(&self, key: &str, lsn: Lsn, now: Instant) {
        self.upsert(key, now, |l, _| *l = (*l).max(lsn));
    }

    /// Notes a write under `key` whose token was lost: reads under the key keep to the primary
    /// for the sticky window.
    pub fn record_unconfirmed(&self, key: &str, now: Instant) {
        self.upsert(key, now, |_, u| *u = Some(now));
    }

    fn upsert(&self, key: &str, now: Instant, update: impl Fn(&mut Lsn, &mut Option<Instant>)) {
        if self.map.len() >= self.max && !self.map.contains_key(key) {
            self.map.retain(|_, (_, expires, _)| *expires > now);
            if self.map.len() >= self.max {
                // Still full of live keys: forget the one expiring soonest.
                let oldest = self
                    .map
                    .iter()
                    .min_by_key(|e| e.value().1)
                    .map(|e| e.key().clone());
                if let Some(k) = oldest {
                    self.map.remove(&k);
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

    /// `key`'s requirement; nothing when unknown or expired.
    pub fn get(&self, key: &str, now: Instant) -> KeyToken {
        self.map
            .get(key)
            .filter(|e| e.value().1 > now)
            .map_or(KeyToken::default(), |e| KeyToken {
                lsn: e.value().0,
                unconfirmed: e.value().2,
            })
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
    /// Token of the session's last write.
    pub own: Lsn,
    /// When the session last wrote (sticky windows).
    pub last_write: Option<Instant>,
    /// `SET causeway.consistency_key`.
    pub key: Option<String>,
    /// `SET causeway.min_lsn`.
    pub presented: Lsn,
    /// A write whose token could not be taken (its backend failed right after it).
    pub unconfirmed_write: Option<Instant>,
}

/// What the next read needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    /// Replicas must have replayed at least this far.
    pub min_lsn: Lsn,
    /// Go to the primary (sticky window).
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
    /// When a write under that key last lost its token.
    pub key_unconfirmed: Option<Instant>,
    /// The highest token seen through this proxy.
    pub global_token: Lsn,
    /// When a write through this proxy last lost its token (global scope).
    pub global_unconfirmed: Option<Instant>,
    /// A `causeway:min_lsn` hint on the statement.
    pub hinted: Lsn,
    /// Whether the monitor's replica positions are recent.
    pub lsn_fresh: bool,
    pub sticky_window: Duration,
    pub now: Instant,
}

/// Decides what a read must wait for. Pure.
pub fn requirement(i: Inputs<'_>) -> Requirement {
    let presented = i.session.presented.max(i.hinted);
    let within = |t: Option<Instant>| t.is_some_and(|t| i.now.duration_since(t) < i.sticky_window);
    let recent_write = within(i.session.last_write);
    // Without a token for a write, only the primary is sure to have it.
    let unconfirmed = within(i.session.unconfirmed_write)
        || within(i.key_unconfirmed)
        || (i.scope == ConsistencyScope::Global && within(i.global_unconfirmed));
    let global = || {
        if i.scope == ConsistencyScope::Global {
            i.global_token
        } else {
            0
        }
    };
    let tokens = || i.session.own.max(i.key_token).max(global());
    match i.mode {
        // Tokens a client presents are honoured in every mode: it asked for them.
        ConsistencyMode::None => Requirement {
            min_lsn: presented,
            primary: false,
        },
        // The session's own writes keep its reads on the primary for the window; writes under
        // its key or, in global scope, anyone's are known by their tokens, as in `lsn`.
        ConsistencyMode::Sticky => Requirement {
            min_lsn: i.key_token.max(global()).max(presented),
            primary: recent_write || unconfirmed,
        },
        ConsistencyMode::Lsn => Requirement {
            min_lsn: tokens().max(presented),
            primary: unconfirmed,
        },
        ConsistencyMode::LsnSticky => Requirement {
            min_lsn: tokens().max(presented),
            primary: unconfirmed || (!i.lsn_fresh && recent_write),
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
            key_unconfirmed: None,
            global_token: 0,
            global_unconfirmed: None,
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
                min_lsn: 0,
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
        // The window closes.
        let later = now + Duration::from_millis(2500);
        assert!(!requirement(inputs(Sticky, &wrote, later)).primary);
        // A write whose token was lost keeps reads on the primary for the window.
        let lost = SessionTokens {
            unconfirmed_write: Some(now),
            ..Default::default()
        };
        assert!(requirement(inputs(Lsn, &lost, now)).primary);
        assert!(!requirement(inputs(Lsn, &lost, later)).primary);
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
        i.key_unconfirmed = Some(now);
        assert!(requirement(i).primary);
        let lost = SessionTokens {
            unconfirmed_write: Some(now),
            ..Default::default()
        };
        assert!(requirement(inputs(ConsistencyMode::Sticky, &lost, now)).primary);
    }

    #[test]
    fn keys_expire_raise_and_stay_bounded() {
        let now = Instant::now();
        let k = Keys::new(Duration::from_millis(100), 2);
        k.record("a", 5, now);
        k.record("a", 3, now);
        assert_eq!(k.get("a", now).lsn, 5, "a token never goes down");
        assert_eq!(
            k.get("a", now + Duration::from_millis(150)),
            KeyToken::default(),
            "expired"
        );
        k.record("b", 7, now);
        k.record("c", 9, now + Duration::from_millis(10));
        assert!(k.len() <= 2);
        assert_eq!(k.get("c", now + Duration::from_millis(10)).lsn, 9);
        assert_eq!(k.get("zzz", now), KeyToken::default());
        // A lost token marks the key, and keeps the token it had.
        k.record_unconfirmed("c", now + Duration::from_millis(20));
        let c = k.get("c", now + Duration::from_millis(20));
        assert_eq!(c.lsn, 9);
        assert_eq!(c.unconfirmed, Some(now + Duration::from_millis(20)));
    }

    #[test]
    fn a_lost_key_or_global_token_keeps_reads_on_the_primary() {
        let now = Instant::now();
        let idle = SessionTokens::default();
        let mut i = inputs(ConsistencyMode::Lsn, &idle, now);
        i.key_unconfirmed = Some(now);
        assert!(requirement(i).primary, "key");
        let mut i = inputs(ConsistencyMode::Lsn, &idle, now);
        i.global_unconfirmed = Some(now);
        assert!(
            !requirement(i).primary,
            "global marks count only in global scope"
        );
        i.scope = ConsistencyScope::Global;
        assert!(requirement(i).primary, "global");
        let later = now + Duration::from_millis(2500);
        let mut i = inputs(ConsistencyMode::Lsn, &idle, later);
        i.key_unconfirmed = Some(now);
        assert!(!requirement(i).primary, "the window closes");
    }
}
