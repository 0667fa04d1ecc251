//! Read-your-writes. After a write commits, the session holds a token: a WAL position at or
//! past its commit record. A read may use a replica only once that replica has replayed the
//! token; keyed tokens let sessions that name the same key see each other's writes, and
//! presented tokens carry a position between connections or proxies.

use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::cluster::lsn::Lsn;
use crate::config::{ConsistencyMode, ConsistencyScope};

/// Keyed tokens shared by every session: key -> (highest commit token, expiry).
pub struct Keys {
    map: DashMap<String, (Lsn, Instant)>,
    ttl: Duration,
    max: usize,
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
        if self.map.len() >= self.max && !self.map.contains_key(key) {
            self.map.retain(|_, (_, expires)| *expires > now);
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
        self.map
            .entry(key.to_string())
            .and_modify(|(l, e)| {
                *l = (*l).max(lsn);
                *e = expires;
            })
            .or_insert((lsn, expires));
    }

    /// `key`'s token, 0 when unknown or expired.
    pub fn get(&self, key: &str, now: Instant) -> Lsn {
        self.map
            .get(key)
            .filter(|e| e.value().1 > now)
            .map_or(0, |e| e.value().0)
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
    /// The highest token seen through this proxy.
    pub global_token: Lsn,
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
    let unconfirmed = within(i.session.unconfirmed_write);
    let tokens = || {
        let mut t = i.session.own.max(i.key_token);
        if i.scope == ConsistencyScope::Global {
            t = t.max(i.global_token);
        }
        t
    };
    match i.mode {
        // Tokens a client presents are honoured in every mode: it asked for them.
        ConsistencyMode::None => Requirement {
            min_lsn: presented,
            primary: false,
        },
        ConsistencyMode::Sticky => Requirement {
            min_lsn: presented,
            primary: recent_write,
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
            global_token: 0,
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
    fn keys_expire_raise_and_stay_bounded() {
        let now = Instant::now();
        let k = Keys::new(Duration::from_millis(100), 2);
        k.record("a", 5, now);
        k.record("a", 3, now);
        assert_eq!(k.get("a", now), 5, "a token never goes down");
        assert_eq!(k.get("a", now + Duration::from_millis(150)), 0, "expired");
        k.record("b", 7, now);
        k.record("c", 9, now + Duration::from_millis(10));
        assert!(k.len() <= 2);
        assert_eq!(k.get("c", now + Duration::from_millis(10)), 9);
        assert_eq!(k.get("zzz", now), 0);
    }
}
