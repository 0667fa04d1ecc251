//! Accepting and serving admin connections. At most [`MAX_CONNECTIONS`] are open at once, and
//! when all are taken a new one takes the place of the one idle longest, so sockets that send
//! nothing (or stop halfway through a request head) cannot keep `/health` and `/ready` from
//! answering, while the endpoint still never holds more descriptors than the cap.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::Service as _;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Admin connections open at once, so however many sockets a peer opens, the database port
/// keeps its file descriptors.
const MAX_CONNECTIONS: u32 = 64;

/// Time a connection gets to send a whole request head, counted from when the server starts
/// waiting for it: a silent socket, a trickled head or an idle keep-alive is closed after it.
/// The first request gets no shorter deadline than later ones: idle connections make room
/// when the cap is reached (see [`Conns::admit`]), so the probes do not depend on the deadline,
/// which only gives back the descriptors of abandoned sockets; a shorter one would cut off
/// honest clients on a slow link (a lost packet costs a second's retransmission) and gain
/// nothing against a peer that can simply open more sockets.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest the accept loop waits for a connection it closed to make room to let go of its
/// slot. An idle one lets go at once; this only matters when a request started on it just as
/// it was chosen, and that request is allowed to finish.
const MAKE_ROOM_WAIT: Duration = Duration::from_secs(1);

/// Accepts admin connections until shutdown, each bounded by [`HEADER_READ_TIMEOUT`] and all
/// together by [`MAX_CONNECTIONS`]; at shutdown, requests under way finish first.
pub(super) async fn serve(listener: TcpListener, app: Router, stop: CancellationToken) {
    let conns = Arc::new(Conns::new(MAX_CONNECTIONS as usize));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    // Out of descriptors, say: give the process a moment to release some.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = conns.admit(stop.child_token()).await else {
            tracing::debug!(%peer, "admin connection refused: {MAX_CONNECTIONS} connections, none idle");
            continue;
        };
        let inner = hyper_util::service::TowerToHyperService::new(app.clone());
        let tracked = Arc::clone(&slot.conn);
        let service = hyper::service::service_fn(move |req: axum::http::Request<Incoming>| {
            let held = UnderWay::start(Arc::clone(&tracked));
            let answer = inner.call(req);
            async move {
                let response = answer.await?;
                Ok::<_, Infallible>(response.map(|body| Holding { body, _held: held }))
            }
        });
        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                () = slot.conn.close.cancelled() => {
                    // hyper closes at once a connection that has sent nothing or waits between
                    // requests (after writing out what it holds); a request under way finishes.
                    conn.as_mut().graceful_shutdown();
                    match std::future::poll_fn(|cx| Poll::Ready(conn.as_mut().poll(cx))).await {
                        Poll::Ready(ended) => ended,
                        Poll::Pending if slot.conn.in_request() => conn.await,
                        // Part of a first request head, which hyper would wait for, or a finished
                        // answer the peer is not reading: idle either way, so closed now.
                        Poll::Pending => Ok(()),
                    }
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "admin connection ended");
            }
            drop(slot);
        });
    }
    // Requests under way finish; the other connections close now (their tokens are children
    // of `stop`). Every slot back means every connection is gone.
    if tokio::time::timeout(
        HEADER_READ_TIMEOUT,
        conns.slots.acquire_many(MAX_CONNECTIONS),
    )
    .await
    .is_err()
    {
        tracing::warn!("admin endpoint stopped with requests still open");
    }
}

/// The open connections and their slots.
struct Conns {
    slots: Arc<Semaphore>,
    /// The open connections, oldest first.
    open: Mutex<Vec<Arc<Tracked>>>,
    /// What `Tracked::idle_since` counts from.
    epoch: Instant,
}

impl Conns {
    fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            open: Mutex::new(Vec::with_capacity(max)),
            epoch: Instant::now(),
        }
    }

    fn open(&self) -> MutexGuard<'_, Vec<Arc<Tracked>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection that `close` will close: a free one, or else the slot of
    /// the connection idle longest, closed to make room. `None` when every connection has a
    /// request under way (or the one closed did not let go in time).
    async fn admit(self: &Arc<Self>, close: CancellationToken) -> Option<Slot> {
        let permit = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if !self.close_idlest() {
                    return None;
                }
                let freed = Arc::clone(&self.slots).acquire_owned();
                tokio::time::timeout(MAKE_ROOM_WAIT, freed)
                    .await
                    .ok()?
                    .ok()?
            }
        };
        let conn = Arc::new(Tracked {
            in_request: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            close,
            epoch: self.epoch,
        });
        conn.mark_idle();
        self.open().push(Arc::clone(&conn));
        Some(Slot {
            conns: Arc::clone(self),
            conn,
            _permit: permit,
        })
    }

    /// Tells the connection idle longest to close; false when there is none.
    fn close_idlest(&self) -> bool {
        let open = self.open();
        match idlest(open.iter().map(|c| c.activity())) {
            Some(i) => {
                tracing::debug!("admin connections all taken: closing the one idle longest");
                open[i].close.cancel();
                true
            }
            None => false,
        }
    }
}

/// A connection's place among the open ones; dropping it gives the place back.
struct Slot {
    conns: Arc<Conns>,
    conn: Arc<Tracked>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.open().retain(|c| !Arc::ptr_eq(c, &self.conn));
    }
}

/// What choosing a connection to close sees of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activity {
    /// A request head has arrived and hyper has not yet taken its whole response.
    InRequest,
    /// Already told to close.
    Closing,
    /// No request under way since this instant (nanoseconds from `Conns::epoch`): accepted
    /// then and silent or part way through a head since, or answered then.
    IdleSince(u64),
}

/// The connection to close to make room: the one idle longest, the earliest opened of equals.
/// Never one with a request under way, which may be a probe being answered.
fn idlest(conns: impl IntoIterator<Item = Activity>) -> Option<usize> {
    conns
        .into_iter()
        .enumerate()
        .filter_map(|(i, a)| match a {
            Activity::IdleSince(t) => Some((i, t)),
            Activity::InRequest | Activity::Closing => None,
        })
        .min_by_key(|&(_, t)| t)
        .map(|(i, _)| i)
}

/// One open connection as the accept loop sees it.
struct Tracked {
    /// Requests whose head has arrived and whose response hyper has not yet taken whole.
    in_request: AtomicUsize,
    /// When it last went idle, in nanoseconds from `epoch`.
    idle_since: AtomicU64,
    /// Cancelled to close the connection.
    close: CancellationToken,
    epoch: Instant,
}

impl Tracked {
    fn in_request(&self) -> bool {
        self.in_request.load(Ordering::Acquire) > 0
    }

    fn mark_idle(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.idle_since.store(now, Ordering::Release);
    }

    fn activity(&self) -> Activity {
        if self.close.is_cancelled() {
            Activity::Closing
        } else if self.in_request() {
            Activity::InRequest
        } else {
            Activity::IdleSince(self.idle_since.load(Ordering::Acquire))
        }
    }
}

/// Marks its connection as in a request from the request head's arrival until hyper drops
/// the response body, which it does once it has taken the whole body (or given up on it).
struct UnderWay(Arc<Tracked>);

impl UnderWay {
    fn start(conn: Arc<Tracked>) -> Self {
        conn.in_request.fetch_add(1, Ordering::AcqRel);
        Self(conn)
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        // The time first, so whoever sees the count at zero sees when it got there.
        self.0.mark_idle();
        self.0.in_request.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body holding its request's [`UnderWay`].
struct Holding {
    body: Body,
    _held: UnderWay,
}

impl hyper::body::Body for Holding {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::Activity::{Closing, IdleSince, InRequest};
    use super::idlest;

    #[test]
    fn the_connection_idle_longest_makes_room() {
        let cases: &[(&[super::Activity], Option<usize>)] = &[
            (&[], None),
            (&[IdleSince(5)], Some(0)),
            (&[IdleSince(9), IdleSince(3), IdleSince(7)], Some(1)),
            // Equals: the one opened first.
            (&[IdleSince(4), IdleSince(4)], Some(0)),
            // A request under way is never cut, however old the connection.
            (&[InRequest, IdleSince(8), IdleSince(6)], Some(2)),
            (&[InRequest, InRequest], None),
            // One already closing is not counted twice.
            (&[Closing, IdleSince(10)], Some(1)),
            (&[Closing, InRequest], None),
        ];
        for (conns, want) in cases {
            assert_eq!(idlest(conns.iter().copied()), *want, "{conns:?}");
        }
    }
}
