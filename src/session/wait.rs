//! Waiting for a server connection or an execution slot while the client may go away, cancel,
//! or send more.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Expect, MAX_QUEUED_BYTES, Request, Session};
use crate::cancel::CancelTarget;
use crate::classify::{Classification, PinReason};
use crate::cluster::Node;
use crate::config::{Fallback, PoolMode};
use crate::error::{PoolError, SessionError, SlotError};
use crate::pool::Applied;
use crate::pool::queue::Class;
use crate::protocol::tag;
use crate::route::{Decision, Reason, Target};

impl Session {
    /// Runs `wait` (for a connection or an execution slot) while watching the client. A cancel
    /// ends it with [`SessionError::QueryCanceled`]; a client that goes away ends it at once
    /// with an error for which `is_client_gone` holds, and dropping the wait takes the request
    /// out of its queue. What the client sends meanwhile is kept unframed, up to the bound on
    /// queued input, for the session's loop to read once the wait is over.
    /// The wait is pinned by the caller and borrowed here, so the (large) wait future is not
    /// moved on its way in.
    pub(super) async fn wait_watching<F: Future>(
        &mut self,
        wait: std::pin::Pin<&mut F>,
    ) -> Result<F::Output, SessionError> {
        let cancel = Arc::clone(&self.cancel);
        let wait = cancel.unless_cancelled(wait);
        tokio::pin!(wait);
        // After Terminate nothing more is read and what came before it runs, as on a server,
        // even once the client has closed its end.
        let mut watch = !self.terminating;
        loop {
            let room = watch && self.client.buffered_input() + self.queued_bytes < MAX_QUEUED_BYTES;
            tokio::select! {
                biased;
                out = &mut wait => return out.ok_or(SessionError::QueryCanceled),
                r = self.client.fill(), if room => match r {
                    Ok(0) if self.client.buffered_holds(tag::FE_TERMINATE) => watch = false,
                    Ok(0) => {
                        return Err(SessionError::ClientIo(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "client left while its request waited",
                        )));
                    }
                    Ok(_) => self.unread_input = true,
                    Err(e) => return Err(SessionError::ClientIo(e)),
                },
            }
        }
    }

    /// The client left while its request waited for an execution slot. What the proxy queued
    /// on the backend ahead of that request (a settings replay, a deferred BEGIN) was never
    /// sent, so it is dropped and the connection can go back to its pool instead of being
    /// closed. Its settings are then unknown, so the next client's replay resets them.
    pub(super) fn drop_unsent(&mut self) {
        let Some(lease) = self.lease.as_mut() else {
            return;
        };
        let conn = lease.conn();
        // Before its request goes out, the replies owed are those of the proxy's own queries
        // queued with it, not yet flushed (the shape check answers any it flushes). Anything
        // else means something was sent, and the connection is busy.
        let unsent = !self.replies.is_empty()
            && conn.transport.pending_write() > 0
            && self.replies.iter().all(|e| {
                matches!(
                    e,
                    Expect::Query { forward: false, .. } | Expect::Settings { .. }
                )
            });
        if !unsent {
            return;
        }
        conn.transport.truncate_write(0);
        conn.set_applied(Applied::UNKNOWN);
        self.replies.clear();
    }

    /// Waits for an execution slot on the backend's server when it bounds `max_active`; the
    /// slot is held until the request's ReadyForQuery. `Ok(false)`: refused, timed out or
    /// cancelled, and the client has been told (inside a transaction, which the failure
    /// aborts).
    pub(super) async fn take_slot(
        &mut self,
        prio: Class,
        req: &Request,
    ) -> Result<bool, SessionError> {
        let Some(slots) = self.lease.as_ref().and_then(|l| l.node().slots.clone()) else {
            return Ok(true);
        };
        if self.slot.is_some() {
            return Ok(true);
        }
        let timeout = self.cfg.class_timeouts()[prio as usize];
        let name = self
            .lease
            .as_ref()
            .map(|l| l.node().name.clone())
            .unwrap_or_default();
        let acquire = std::pin::pin!(slots.acquire(prio, timeout));
        let err = match self.wait_watching(acquire).await {
            Ok(Ok(permit)) => {
                self.slot = Some(permit);
                return Ok(true);
            }
            Ok(Err(e)) => SlotError::from_acquire(e, name, timeout.as_millis() as u64).into(),
            Err(e) if e.is_client_gone() => {
                self.drop_unsent();
                return Err(e);
            }
            Err(e) => e,
        };
        self.abort_server_transaction().await?;
        self.fail_request(req, &err);
        self.release_if_idle();
        Ok(false)
    }

    /// Routes and takes a backend. A replica that cannot be reached is banned and another
    /// tried; one that refuses this login alone (a database or role it has not replayed yet)
    /// is left out for this login, not banned, until it has caught up. When none is left the
    /// read takes the primary, or with `routing.fallback = "error"` fails naming the causes.
    pub(super) async fn acquire_for(
        &mut self,
        class: &Classification,
        force_primary: Option<Reason>,
        prio: Class,
        now: std::time::Instant,
    ) -> Result<(), SessionError> {
        let shared = Arc::clone(&self.shared);
        let cluster = &shared.cluster;
        let mut replicas = cluster.replicas_owned();
        // The replicas this read may still use: all of them until one fails it.
        let mut candidates = Arc::clone(&replicas);
        // Replicas that failed this read (node id, why), left out of the next decisions.
        let mut refused: Vec<(usize, String)> = Vec::new();
        // Settings the session started with (or the server reported) that keep it on one
        // backend: the primary, taken now, before anything is read wrongly elsewhere.
        let state_pin = self.state_pin();
        // Each failed replica leaves the candidates, so this bound is only reached when
        // reloads keep changing the replicas under the read.
        let bound = replicas.len() + 2;
        for attempt in 0..=bound {
            let decision = if let Some(reason) = force_primary {
                Decision {
                    target: Target::Primary,
                    reason,
                }
            } else if self.cfg.pool.mode == PoolMode::Session || state_pin.is_some() {
                // One backend for the whole session, as a server would be: the primary.
                Decision {
                    target: Target::Primary,
                    reason: Reason::SessionPin,
                }
            } else if attempt == bound {
                if self.cfg.routing.fallback == Fallback::Error {
                    return Err(no_replica(&refused));
                }
                Decision {
                    target: Target::Primary,
                    reason: Reason::NoReplica,
                }
            } else {
                match self.decide(class, now, &candidates).await {
                    Err(SessionError::NoReplica) => return Err(no_replica(&refused)),
                    d => d?,
                }
            };
            let node = match decision.target {
                Target::Primary => cluster.primary(),
                Target::Replica(i) => match candidates.get(i) {
                    Some(n) => n,
                    None => cluster.primary(),
                },
            };
            if node.retired.load(Ordering::Acquire) {
                // A reload removed it (or it was promoted) while this read was routed: route
                // again over the servers in force now.
                replicas = cluster.replicas_owned();
                candidates = without(&replicas, &refused);
                continue;
            }
            let Some(pool) = shared.pools.get(node, &self.login) else {
                if node.retired.load(Ordering::Acquire) {
                    replicas = cluster.replicas_owned();
                    candidates = without(&replicas, &refused);
                    continue;
                }
                return Err(SessionError::AuthRejected(format!(
                    "user \"{}\" is not configured",
                    self.user
                )));
            };
            if decision.target != Target::Primary
                && let Some(why) = pool.refused(cluster)
            {
                // It refused this login lately and has not replayed enough since to know it.
                refused.push((node.id, why));
                candidates = without(&replicas, &refused);
                continue;
            }
            self.info.set_waiting();
            let acquired = self
                .wait_watching(std::pin::pin!(pool.acquire(prio)))
                .await
                .inspect_err(|_| self.info.set_idle())?;
            if acquired.is_err() {
                self.info.set_idle();
            }
            match acquired {
                Ok(mut lease) => {
                    self.info.set_active(node.id);
                    shared.stats.count_route(decision.reason);
                    node.transactions.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        target_node = %node.name,
                        reason = decision.reason.as_str(),
                        class = class.reason,
                        "routed"
                    );
                    let conn = lease.conn();
                    self.cancel.set(CancelTarget {
                        endpoint: node.endpoint(),
                        pid: conn.pid,
                        secret: conn.secret,
                        cancelled: false,
                    });
                    self.lease = Some(lease);
                    self.pin_here(state_pin);
                    self.replay_settings();
                    return Ok(());
                }
                Err(PoolError::Backend(e)) if decision.target != Target::Primary => {
                    if e.is_login_refusal() {
                        // Other logins there work: the replica stays in use for them.
                        pool.note_refusal(cluster, &e);
                        tracing::info!(
                            node = %node.name,
                            error = %e,
                            "replica refused this login; its reads go elsewhere until it catches up"
                        );
                    } else {
                        node.errors.fetch_add(1, Ordering::Relaxed);
                        node.ban(e.to_string());
                    }
                    refused.push((node.id, e.to_string()));
                    candidates = without(&replicas, &refused);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(no_replica(&refused))
    }
}

/// The replicas less those that failed this read.
fn without(replicas: &Arc<Vec<Arc<Node>>>, refused: &[(usize, String)]) -> Arc<Vec<Arc<Node>>> {
    if refused.is_empty() {
        return Arc::clone(replicas);
    }
    let left = replicas
        .iter()
        .filter(|n| refused.iter().all(|(id, _)| *id != n.id))
        .cloned()
        .collect();
    Arc::new(left)
}

/// A read no replica can serve under `routing.fallback = "error"`, with what the replicas
/// that failed it said.
fn no_replica(refused: &[(usize, String)]) -> SessionError {
    if refused.is_empty() {
        return SessionError::NoReplica;
    }
    let causes: Vec<&str> = refused.iter().map(|(_, why)| why.as_str()).collect();
    SessionError::ReplicasRefused(causes.join("; "))
}

impl Session {
    /// Why the session's own settings keep it on one backend whatever it runs next.
    fn state_pin(&self) -> Option<PinReason> {
        if self.strings_off {
            return Some(PinReason::NonStandardStrings);
        }
        self.settings.pin()
    }

    /// Pins the session to its current backend for `reason`, if there is one (transaction
    /// pooling only: in session pooling every client keeps its backend anyway).
    pub(super) fn pin_here(&mut self, reason: Option<PinReason>) {
        if reason.is_none()
            || self.pinned
            || self.cfg.pool.mode != PoolMode::Transaction
            || self.lease.is_none()
        {
            return;
        }
        self.pinned = true;
        self.shared.stats.pins.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(?reason, "session pinned to its backend");
    }
}
