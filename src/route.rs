//! Routing: classification + session state + cluster view -> a target and the reason. Pure.

use crate::classify::{Access, Classification, RouteHint, RouteMode, TxEffect};
use crate::config::{Fallback, ReplicaStrategy};

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    /// Index into the replica list (0-based, configuration order).
    Replica(usize),
}

/// Why the router chose a target; counted in stats and logged at debug level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    ClassifiedRead,
    ClassifiedWrite,
    Transaction,
    ReadOnlyTransaction,
    Hint,
    SessionPin,
    NoReplica,
    ReadOnlyRetry,
    /// A replica cancelled the read for a conflict with recovery; the primary ran it again.
    RecoveryConflict,
    /// No usable replica had replayed the session's token yet.
    ReadYourWrites,
    /// A recent write keeps the session's reads on the primary.
    StickyWindow,
    /// The session's default isolation is serializable, which a standby refuses.
    Serializable,
}

impl Reason {
    /// Stable name used in stats and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ClassifiedRead => "classified_read",
            Reason::ClassifiedWrite => "classified_write",
            Reason::Transaction => "transaction",
            Reason::ReadOnlyTransaction => "read_only_transaction",
            Reason::Hint => "hint",
            Reason::SessionPin => "session_pin",
            Reason::NoReplica => "no_replica",
            Reason::ReadOnlyRetry => "read_only_retry",
            Reason::RecoveryConflict => "recovery_conflict",
            Reason::ReadYourWrites => "read_your_writes",
            Reason::StickyWindow => "sticky_window",
            Reason::Serializable => "serializable",
        }
    }
}

/// The router's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub target: Target,
    pub reason: Reason,
}

/// What the router needs to know about one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaView {
    pub usable: bool,
    pub in_use: usize,
    pub weight: u32,
    /// Replay position (0 = unknown).
    pub replayed: u64,
    /// Past the configured lag limit.
    pub lagging: bool,
}

/// Session-level routing inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionView {
    /// `SET causeway.route`.
    pub route_mode: RouteMode,
    /// Replicas must have replayed at least this far (read-your-writes token).
    pub min_lsn: u64,
    /// Reads go to the primary (sticky window after a write).
    pub sticky: bool,
    /// `default_transaction_isolation` is serializable: a standby cannot start any of the
    /// session's transactions.
    pub serializable: bool,
}

/// Operator policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub strategy: ReplicaStrategy,
    pub fallback: Fallback,
}

/// Reads that cannot be placed because no replica is usable and the fallback is `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoReplica;

/// Decides where a request outside any transaction runs. `pick` is a fresh counter or random
/// value used by the round-robin and weighted-random strategies.
pub fn route(
    c: &Classification,
    session: SessionView,
    replicas: &[ReplicaView],
    policy: Policy,
    pick: u64,
) -> Result<Decision, NoReplica> {
    let primary = |reason| {
        Ok(Decision {
            target: Target::Primary,
            reason,
        })
    };
    // A write never goes to a replica, whatever a hint says.
    if c.access == Access::Write {
        return primary(Reason::ClassifiedWrite);
    }
    let read_reason = match c.tx {
        TxEffect::Begin {
            read_only: false, ..
        } => return primary(Reason::Transaction),
        TxEffect::Begin {
            read_only: true, ..
        } => Reason::ReadOnlyTransaction,
        _ => Reason::ClassifiedRead,
    };
    if c.pin.is_some() {
        return primary(Reason::SessionPin);
    }
    if session.serializable {
        return primary(Reason::Serializable);
    }
    match (c.hints.route, session.route_mode) {
        (Some(RouteHint::Primary), _) => return primary(Reason::Hint),
        (None, RouteMode::Primary) => return primary(Reason::Hint),
        _ => {}
    }
    let hinted =
        c.hints.route == Some(RouteHint::Replica) || session.route_mode == RouteMode::Replica;
    if session.sticky {
        return primary(Reason::StickyWindow);
    }
    let healthy = |r: &ReplicaView| r.usable && !r.lagging;
    let caught_up = |r: &ReplicaView| healthy(r) && r.replayed >= session.min_lsn;
    if session.min_lsn > 0 && replicas.iter().any(healthy) && !replicas.iter().any(caught_up) {
        return primary(Reason::ReadYourWrites);
    }
    match pick_replica(replicas, caught_up, policy.strategy, pick) {
        Some(i) => Ok(Decision {
            target: Target::Replica(i),
            reason: if hinted { Reason::Hint } else { read_reason },
        }),
        None => match policy.fallback {
            Fallback::Primary => primary(Reason::NoReplica),
            Fallback::Error => Err(NoReplica),
        },
    }
}

/// Picks a usable replica by strategy; `None` when none is usable.
pub fn choose_replica(
    replicas: &[ReplicaView],
    strategy: ReplicaStrategy,
    pick: u64,
) -> Option<usize> {
    pick_replica(replicas, |r| r.usable, strategy, pick)
}

/// Picks one of the replicas `eligible` accepts, by strategy. Allocates nothing: it runs for
/// every read.
fn pick_replica(
    replicas: &[ReplicaView],
    eligible: impl Fn(&ReplicaView) -> bool,
    strategy: ReplicaStrategy,
    pick: u64,
) -> Option<usize> {
    let usable = replicas.iter().enumerate().filter(|(_, r)| eligible(r));
    match strategy {
        ReplicaStrategy::LeastConnections => {
            // Ties rotate by `pick` so equal replicas share the load.
            let n = replicas.len().max(1);
            let start = (pick % n as u64) as usize;
            usable
                .min_by_key(|(i, r)| (r.in_use, (i + n - start) % n))
                .map(|(i, _)| i)
        }
        ReplicaStrategy::RoundRobin => {
            let count = usable.clone().count();
            if count == 0 {
                return None;
            }
            usable.map(|(i, _)| i).nth((pick % count as u64) as usize)
        }
        ReplicaStrategy::WeightedRandom => {
            let total: u64 = usable.clone().map(|(_, r)| u64::from(r.weight)).sum();
            if total == 0 {
                return None;
            }
            let mut point = pick % total;
            for (i, r) in usable {
                let w = u64::from(r.weight);
                if point < w {
                    return Some(i);
                }
                point -= w;
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Hints, PinReason};

    fn class(access: Access, tx: TxEffect) -> Classification {
        Classification {
            access,
            tx,
            last_tx: if tx.bounds_block() {
                tx
            } else {
                TxEffect::None
            },
            copy_from: false,
            by_value: false,
            chain: false,
            pin: None,
            hints: Hints::default(),
            proxy: None,
            session: None,
            statements: 1,
            parse_error: false,
            reason: "test",
            text: crate::classify::TextTraits::default(),
        }
    }

    fn up(n: usize) -> Vec<ReplicaView> {
        vec![
            ReplicaView {
                usable: true,
                in_use: 0,
                weight: 1,
                replayed: 100,
                lagging: false,
            };
            n
        ]
    }

    const AUTO: SessionView = SessionView {
        route_mode: RouteMode::Auto,
        min_lsn: 0,
        sticky: false,
        serializable: false,
    };
    const POLICY: Policy = Policy {
        strategy: ReplicaStrategy::RoundRobin,
        fallback: Fallback::Primary,
    };

    #[test]
    fn table() {
        let read = class(Access::Read, TxEffect::None);
        let write = class(Access::Write, TxEffect::None);
        let begin = class(
            Access::Read,
            TxEffect::Begin {
                read_only: false,
                serializable: false,
            },
        );
        let begin_ro = class(
            Access::Read,
            TxEffect::Begin {
                read_only: true,
                serializable: false,
            },
        );
        let mut pinned = read.clone();
        pinned.pin = Some(PinReason::SessionSet);
        let mut hint_primary = read.clone();
        hint_primary.hints.route = Some(RouteHint::Primary);
        let mut write_hint_replica = write.clone();
        write_hint_replica.hints.route = Some(RouteHint::Replica);
        let primary_mode = SessionView {
            route_mode: RouteMode::Primary,
            ..AUTO
        };
        let serializable = SessionView {
            serializable: true,
            ..AUTO
        };
        let mut read_hint_replica = read.clone();
        read_hint_replica.hints.route = Some(RouteHint::Replica);
        let cases: Vec<(&Classification, SessionView, Target, Reason)> = vec![
            (&read, AUTO, Target::Replica(0), Reason::ClassifiedRead),
            (&write, AUTO, Target::Primary, Reason::ClassifiedWrite),
            (&begin, AUTO, Target::Primary, Reason::Transaction),
            (
                &begin_ro,
                AUTO,
                Target::Replica(0),
                Reason::ReadOnlyTransaction,
            ),
            (&pinned, AUTO, Target::Primary, Reason::SessionPin),
            (&hint_primary, AUTO, Target::Primary, Reason::Hint),
            (&read, primary_mode, Target::Primary, Reason::Hint),
            (&read, serializable, Target::Primary, Reason::Serializable),
            (
                &begin_ro,
                serializable,
                Target::Primary,
                Reason::Serializable,
            ),
            (
                &read_hint_replica,
                serializable,
                Target::Primary,
                Reason::Serializable,
            ),
            (
                &write_hint_replica,
                AUTO,
                Target::Primary,
                Reason::ClassifiedWrite,
            ),
        ];
        for (c, s, target, reason) in cases {
            let d = route(c, s, &up(2), POLICY, 0).unwrap();
            assert_eq!((d.target, d.reason), (target, reason), "{c:?} {s:?}");
        }
    }

    #[test]
    fn tokens_lag_and_sticky_windows() {
        let read = class(Access::Read, TxEffect::None);
        let mut rs = up(2);
        rs[0].replayed = 50;
        rs[1].replayed = 150;
        let wants = |min_lsn| SessionView { min_lsn, ..AUTO };
        // Only a replica that replayed the token serves the read.
        for pick in 0..10 {
            let d = route(&read, wants(120), &rs, POLICY, pick).unwrap();
            assert_eq!(d.target, Target::Replica(1));
        }
        // None has: the primary, for that reason (the session may wait first).
        let d = route(&read, wants(200), &rs, POLICY, 0).unwrap();
        assert_eq!(
            (d.target, d.reason),
            (Target::Primary, Reason::ReadYourWrites)
        );
        // A lagging replica is not used even without a token.
        rs[1].lagging = true;
        for pick in 0..10 {
            assert_eq!(
                route(&read, AUTO, &rs, POLICY, pick).unwrap().target,
                Target::Replica(0)
            );
        }
        let sticky = SessionView {
            sticky: true,
            ..AUTO
        };
        let d = route(&read, sticky, &rs, POLICY, 0).unwrap();
        assert_eq!(
            (d.target, d.reason),
            (Target::Primary, Reason::StickyWindow)
        );
        // A BEGIN READ ONLY waits for the token like any read.
        let ro = class(
            Access::Read,
            TxEffect::Begin {
                read_only: true,
                serializable: false,
            },
        );
        let d = route(&ro, wants(200), &up(2), POLICY, 0).unwrap();
        assert_eq!(d.reason, Reason::ReadYourWrites);
    }

    #[test]
    fn no_usable_replica_falls_back_or_errors() {
        let read = class(Access::Read, TxEffect::None);
        let mut down = up(2);
        down[0].usable = false;
        down[1].usable = false;
        let d = route(&read, AUTO, &down, POLICY, 0).unwrap();
        assert_eq!((d.target, d.reason), (Target::Primary, Reason::NoReplica));
        let strict = Policy {
            fallback: Fallback::Error,
            ..POLICY
        };
        assert_eq!(route(&read, AUTO, &down, strict, 0), Err(NoReplica));
        assert_eq!(route(&read, AUTO, &[], strict, 0), Err(NoReplica));
    }

    #[test]
    fn strategies_skip_banned_replicas() {
        let mut rs = up(3);
        rs[1].usable = false;
        for s in [
            ReplicaStrategy::LeastConnections,
            ReplicaStrategy::RoundRobin,
            ReplicaStrategy::WeightedRandom,
        ] {
            for pick in 0..20 {
                assert_ne!(choose_replica(&rs, s, pick), Some(1), "{s:?}");
                assert!(choose_replica(&rs, s, pick).is_some());
            }
        }
    }

    #[test]
    fn least_connections_prefers_idle_and_rotates_ties() {
        let mut rs = up(2);
        rs[0].in_use = 3;
        assert_eq!(
            choose_replica(&rs, ReplicaStrategy::LeastConnections, 0),
            Some(1)
        );
        rs[0].in_use = 0;
        let a = choose_replica(&rs, ReplicaStrategy::LeastConnections, 0);
        let b = choose_replica(&rs, ReplicaStrategy::LeastConnections, 1);
        assert_ne!(a, b);
    }

    #[test]
    fn round_robin_cycles_and_weights_bias() {
        let rs = up(2);
        let picks: Vec<_> = (0..4)
            .map(|p| choose_replica(&rs, ReplicaStrategy::RoundRobin, p))
            .collect();
        assert_eq!(picks, vec![Some(0), Some(1), Some(0), Some(1)]);
        let mut weighted = up(2);
        weighted[1].weight = 3;
        let ones = (0..400)
            .filter(|p| choose_replica(&weighted, ReplicaStrategy::WeightedRandom, *p) == Some(1))
            .count();
        assert_eq!(ones, 300);
    }
}
