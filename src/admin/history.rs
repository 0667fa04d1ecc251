//! The last minutes of per-second samples, for the dashboard's charts: each replica's lag and
//! each server's request rate. A background task samples once a second into a ring.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

use crate::cluster::Role;
use crate::server::Shared;

/// Samples kept: ten minutes at one a second.
pub const CAPACITY: usize = 600;

/// One second of one server.
#[derive(Debug, Clone, Serialize)]
pub struct BackendSample {
    pub name: String,
    /// Replicas: ms since the last replayed transaction while behind; `null` for the primary.
    pub lag_ms: Option<u64>,
    pub lag_bytes: Option<u64>,
    /// Requests run here during the second.
    pub reads: u64,
    pub writes: u64,
}

/// One second.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub backends: Vec<BackendSample>,
}

/// The ring of samples.
#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Every sample kept, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        let s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        s.iter().cloned().collect()
    }

    fn push(&self, sample: Sample) {
        let mut s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        if s.len() == CAPACITY {
            s.pop_front();
        }
        s.push_back(sample);
    }

    /// Samples `shared` every second until the proxy shuts down.
    pub fn spawn_sampler(self: &Arc<Self>, shared: Arc<Shared>) {
        let history = Arc::clone(self);
        tokio::spawn(async move {
            // Each server's counters at the last sample, by node: a reload that adds or removes
            // a replica shifts the others' positions in the list.
            let mut last: HashMap<usize, (u64, u64)> = HashMap::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now_us = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
                let nodes = &shared.cluster.nodes();
                let mut now = HashMap::with_capacity(nodes.len());
                let mut backends = Vec::with_capacity(nodes.len());
                for node in nodes {
                    let reads = node.reads.load(Ordering::Relaxed);
                    let writes = node.writes.load(Ordering::Relaxed);
                    // A node new since the last sample counts from zero, as its counters did.
                    let prev = last.get(&node.id).copied().unwrap_or((0, 0));
                    let (lag_ms, lag_bytes) = match node.role {
                        Role::Replica if node.lsn.load(Ordering::Acquire) != 0 => {
                            let p = shared.cluster.progress(node);
                            (Some(shared.cluster.lag_ms(&p)), Some(p.lag_bytes()))
                        }
                        _ => (None, None),
                    };
                    backends.push(BackendSample {
                        name: node.name.clone(),
                        lag_ms,
                        lag_bytes,
                        reads: reads.saturating_sub(prev.0),
                        writes: writes.saturating_sub(prev.1),
                    });
                    now.insert(node.id, (reads, writes));
                }
                last = now;
                history.push(Sample {
                    at_ms: u64::try_from(now_us / 1000).unwrap_or(0),
                    backends,
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest() {
        let h = History::default();
        for i in 0..CAPACITY as u64 + 5 {
            h.push(Sample {
                at_ms: i,
                backends: Vec::new(),
            });
        }
        let s = h.samples();
        assert_eq!(s.len(), CAPACITY);
        assert_eq!(s[0].at_ms, 5);
        assert_eq!(s[CAPACITY - 1].at_ms, CAPACITY as u64 + 4);
    }
}
