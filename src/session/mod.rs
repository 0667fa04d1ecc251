//! One task per client: buffers requests, routes each transaction or autocommit statement, and
//! relays replies. It alone owns the client's state: transaction status, pins, named statements.

mod consistency;
mod deferred;
mod dispatch;
mod input;
mod local;
mod names;
mod relay;
mod request;
mod rerun;
mod settings;
mod shape;
mod skip;
mod timers;
mod translate;
mod wait;

pub(crate) use local::shared_table;
pub use request::Request;
pub use settings::{check_startup_settings, startup_value};
use skip::SyncEnds;

use std::collections::VecDeque;
use std::sync::Arc;

use crate::tls::Stream;
use tokio::time::Instant;

use crate::cancel::CancelSlot;
use crate::classify::{Classifier, RouteMode, SessionCommand};
use crate::clients::Stop;
use crate::config::PoolMode;
use crate::error::SessionError;
use crate::pool::Lease;
use crate::pool::statements::StatementKey;
use crate::protocol::{self, Frame, TxStatus};
use crate::server::Shared;
use crate::transport::Transport;

/// Client bytes buffered (queued requests) before the session stops reading from the client.
const MAX_QUEUED_BYTES: usize = 1024 * 1024;

/// A reply the current backend still owes, in order; see `relay`.
#[derive(Debug)]
enum Expect {
    /// ParseComplete; `forward: false` for a Parse the proxy injected. On error the statement
    /// is forgotten on this backend.
    /// `name`: the client's statement name this Parse creates, forgotten again if the Parse
    /// fails or is skipped after an earlier error.
    Parse {
        forward: bool,
        key: Option<StatementKey>,
        name: Option<String>,
    },
    /// ParseComplete for a client's Parse of a statement its backend already holds, answered
    /// by the proxy at this point in the stream; skipped after an error, the client's `name`
    /// is forgotten, as the server would not have created it.
    ParseHeld {
        name: String,
    },
    /// ParseComplete for the client's own Parse of the unnamed statement. Should it fail, the
    /// unnamed statement is gone, as the server drops it before parsing; skipped after an
    /// earlier error, the statement `before` it stays the client's.
    ParseUnnamed {
        before: Option<StatementKey>,
    },
    /// CloseComplete for the client's Close of a named statement, answered by the proxy at
    /// this point in the stream (the backend's copy may serve others). Skipped after an
    /// earlier error, the statement is the client's again, as the server would not have
    /// closed it.
    CloseHeld {
        name: String,
        statement: ClientStatement,
    },
    /// A Parse the proxy refuses (a statement name already in use): the server was given a
    /// Parse that fails in its place, so it skips to Sync and aborts a transaction as it would
    /// for the client's; its error is replaced with this one.
    Refused(Frame),
    Bind,
    /// A Describe; for a named statement, the client's name and the statement, to remember
    /// the result shape the client was told and the backend's copy has.
    Describe {
        statement: Option<(String, StatementKey)>,
    },
    Execute,
    /// CloseComplete; `forward: false` for an eviction the proxy injected.
    Close {
        forward: bool,
    },
    /// ReadyForQuery closing an extended-protocol batch; `effect` is recorded if the batch
    /// succeeded.
    Sync {
        effect: Option<Box<Effect>>,
    },
    /// Everything up to ReadyForQuery for a simple Query or FunctionCall. `in_batch`: sent
    /// inside an unsynced extended batch, where the server skips it, without a word, after an
    /// error earlier in the batch.
    Query {
        forward: bool,
        effect: Option<Box<Effect>>,
        in_batch: bool,
    },
    /// Everything up to ReadyForQuery for the proxy's own statements that bring the backend to
    /// the client's settings: before a request, the reset of another client's settings and the
    /// replay (`shown`: an error reaches the client); after a RESET, the startup values put
    /// back. Their output is not the client's. One that fails leaves the connection's settings
    /// unknown: it is closed rather than handed to anyone again.
    Settings {
        shown: bool,
    },
    /// A reply the proxy produces itself at this point in the stream.
    Synthetic(Frame),
    /// The statement the proxy runs to abort the server's transaction after failing one of
    /// its statements itself (see `Session::abort_server_transaction`): nothing of it is shown.
    Abort,
    /// The commit-token query the proxy appended after a write: its answer is kept, not shown.
    /// `covers`: the writes sent before it (see [`Unsealed`]); `keys`: their key hints.
    Token {
        keys: Vec<String>,
        covers: u64,
        lsn: u64,
        /// Behind COMMIT AND CHAIN: run inside the chained transaction, it still follows the
        /// commit.
        after_chain: bool,
    },
}

/// A statement the client prepared under a name.
#[derive(Debug, Clone)]
pub(crate) struct ClientStatement {
    key: StatementKey,
    /// Result columns (name, type, typmod) the client was told at its Describe, if it asked.
    shape: Option<Vec<u8>>,
}

/// Session state a statement changes once it succeeds (and, inside a transaction, commits).
#[derive(Debug, Clone)]
pub(crate) struct Effect {
    cmd: SessionCommand,
    sql: String,
}

/// The request being served, kept so it can be re-run elsewhere if its backend fails before
/// anything reached the client.
struct InFlight {
    request: Request,
    client_mark: usize,
    /// A replica read that may move to another node if its server fails.
    retryable: bool,
    /// Nothing of its answer reached the client and it runs outside a transaction, so it may
    /// run again after a recoverable error.
    rerunnable: bool,
    /// A reply from the server (not one the proxy made) is queued for the client.
    server_replied: bool,
    /// Statement names its Parse messages created: run again, it creates them again.
    created: Vec<String>,
}

/// A request sent to a backend, timed until its ReadyForQuery reaches the client.
struct Timing {
    started: tokio::time::Instant,
    node: Arc<crate::cluster::Node>,
    class: crate::pool::queue::Class,
}

/// Per-client state.
pub struct Session {
    shared: Arc<Shared>,
    /// The configuration as of the current request: refreshed from `cfg_source` once per turn
    /// of the session's loop (a pointer comparison), so the request path reads it for free.
    cfg: Arc<crate::config::Config>,
    cfg_source:
        arc_swap::Cache<Arc<arc_swap::ArcSwap<crate::config::Config>>, Arc<crate::config::Config>>,
    client: Transport<Stream>,
    user: String,
    /// The login's key into the pools.
    login: Arc<str>,
    classifier: Arc<Classifier>,
    cancel: CancelSlot,
    lease: Option<Lease>,
    replies: VecDeque<Expect>,
    /// Client view of the transaction status.
    status: TxStatus,
    /// Session state that cannot move lives on the current backend.
    pinned: bool,
    /// The server last reported `standard_conforming_strings` off on this client's backend:
    /// the proxy cannot read the session's statements as the server does (see
    /// `classify::values`), so it keeps one primary backend.
    strings_off: bool,
    route_mode: RouteMode,
    /// The client's named statements.
    statements: names::ClientStatements,
    /// The statement the client last parsed into the unnamed slot.
    unnamed: Option<StatementKey>,
    /// Extended-protocol messages received since the last Sync or Flush.
    batch: Vec<Frame>,
    /// Bytes held in `batch`.
    batch_bytes: usize,
    queue: VecDeque<Request>,
    queued_bytes: usize,
    copy_in: bool,
    /// An extended batch that had no Sync yet failed: messages are dropped until Sync, which
    /// ends the skip where this says.
    skip_until_sync: Option<SyncEnds>,
    /// Swallow backend output up to ReadyForQuery, then run this request again.
    rerun: Option<Request>,
    in_flight: Option<InFlight>,
    /// This client's entry in the registry of connected clients.
    info: Arc<crate::clients::ClientInfo>,
    /// Last input handled while inside a transaction.
    last_activity: Instant,
    /// Since when the backend owes replies (cleared once it has answered everything).
    busy_since: Option<Instant>,
    /// When a query timeout's cancel went out.
    cancel_sent: Option<Instant>,
    /// Requests on the backend whose ReadyForQuery is still to come, oldest first.
    timings: VecDeque<Timing>,
    /// Parameters the client set, replayed on each backend it is given.
    settings: settings::Settings,
    /// Session changes made inside the open transaction, kept if it commits.
    tx_effects: Vec<Effect>,
    /// A COMMIT completed since those changes were made.
    tx_committed: bool,
    /// The open transaction ran ROLLBACK TO SAVEPOINT or COMMIT/ROLLBACK AND CHAIN: which of
    /// its session changes the backend keeps is not known.
    tx_uncertain: bool,
    /// An ErrorResponse arrived since the last ReadyForQuery.
    error_since_ready: bool,
    /// Read-your-writes state: own token, key, presented token.
    tokens: crate::consistency::SessionTokens,
    /// Writes sent to the primary that no commit token covers yet.
    unsealed: consistency::Unsealed,
    /// Append the token query to the request being sent; `Some(true)` behind COMMIT AND CHAIN.
    pending_token: Option<bool>,
    /// A new token is to be reported to the client with its next reply.
    announce_token: bool,
    /// The write's ReadyForQuery, held until its token is recorded.
    ready_after_token: Option<Frame>,
    /// Execution slot held while a request runs (servers with `max_active`).
    slot: Option<crate::pool::queue::Permit>,
    /// Notices held back while the current read may still be re-run elsewhere.
    held: Vec<Frame>,
    /// The current backend's own FATAL error already reached the client.
    backend_fatal_forwarded: bool,
    /// The current backend's FATAL ended that connection alone (a recovery conflict, an idle
    /// timeout): its server is fine, so losing the connection bans nothing.
    backend_closed_alone: bool,
    /// An extended-protocol COPY swallowed its batch's Sync, or its batch ended with Flush:
    /// the server holds the COPY's result until the client's next Sync or Flush, which go to
    /// it at once, ahead of anything queued.
    copy_sync_owed: bool,
    /// A transaction opened by a lone BEGIN, acknowledged to the client and not yet sent to
    /// any backend.
    deferred_tx: Option<deferred::DeferredTx>,
    /// The client said Terminate: nothing more is read from it, what it sent before still runs,
    /// then the session ends.
    terminating: bool,
    /// The client sent more while a request waited for a connection or an execution slot; it
    /// is still to be framed.
    unread_input: bool,
}

impl Session {
    /// A logged-in client (user and database from its registry entry), ready for its first
    /// query.
    pub fn new(
        shared: Arc<Shared>,
        client: Transport<Stream>,
        classifier: Arc<Classifier>,
        cancel: CancelSlot,
        startup: &[(String, String)],
        info: Arc<crate::clients::ClientInfo>,
    ) -> Self {
        let settings = settings::Settings::from_startup(startup);
        let mut cfg_source = arc_swap::Cache::new(Arc::clone(&shared.cfg));
        Self {
            cfg: Arc::clone(cfg_source.load()),
            cfg_source,
            shared,
            client,
            user: info.user.clone(),
            login: crate::pool::login_key(&info.user, &info.database),
            classifier,
            cancel,
            lease: None,
            replies: VecDeque::new(),
            status: TxStatus::Idle,
            pinned: false,
            strings_off: false,
            route_mode: RouteMode::Auto,
            statements: names::ClientStatements::default(),
            unnamed: None,
            batch: Vec::new(),
            batch_bytes: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            copy_in: false,
            skip_until_sync: None,
            rerun: None,
            in_flight: None,
            info,
            timings: VecDeque::new(),
            last_activity: Instant::now(),
            busy_since: None,
            cancel_sent: None,
            deferred_tx: None,
            terminating: false,
            unread_input: false,
            copy_sync_owed: false,
            backend_fatal_forwarded: false,
            backend_closed_alone: false,
            held: Vec::new(),
            slot: None,
            settings,
            tx_effects: Vec::new(),
            tx_committed: false,
            tx_uncertain: false,
            error_since_ready: false,
            tokens: Default::default(),
            unsealed: Default::default(),
            pending_token: None,
            announce_token: false,
            ready_after_token: None,
        }
    }

    /// Serves the client until it leaves, the proxy stops, or the session cannot go on.
    pub async fn run(mut self) -> Result<(), SessionError> {
        let result = self.serve().await;
        if let Err(e) = &result
            && !e.is_client_gone()
        {
            let severity = "FATAL";
            self.client.queue(&protocol::error_response(
                severity,
                e.sqlstate(),
                &e.to_string(),
            ));
            self.client.shutdown().await;
        }
        self.release_lease(true);
        result
    }

    async fn serve(&mut self) -> Result<(), SessionError> {
        // Shutdown reaches a running session through its own flag (see `server::relay_stop`);
        // one that logged in after it began learns here.
        if self.shared.force_close.is_cancelled() {
            self.info.signal(Stop::Close);
        } else if self.shared.shutdown.is_cancelled() {
            self.info.signal(Stop::Drain);
        }
        let info = Arc::clone(&self.info);
        let mut stopping = false;
        loop {
            self.refresh_config();
            if stopping && self.lease.is_none() {
                // Shutting down: a client between transactions is told at once.
                return Err(SessionError::Shutdown);
            }
            while self.can_dispatch() {
                let Some(req) = self.queue.pop_front() else {
                    break;
                };
                self.queued_bytes = self.queued_bytes.saturating_sub(req.size());
                self.dispatch(req).await?;
            }
            if std::mem::take(&mut self.unread_input) {
                // Sent while a request waited: framed now, then dispatched in turn.
                self.on_client_input().await?;
                self.note_activity();
                continue;
            }
            if self.terminating && self.copy_in {
                self.abort_copy();
            }
            self.flush_client().await?;
            if let Some(lease) = self.lease.as_mut()
                && lease.conn().transport.pending_write() > 0
                && let Err(e) = lease.conn().transport.flush().await
            {
                self.backend_failed(Some(e)).await?;
                continue;
            }
            if self.terminating
                && self.queue.is_empty()
                && self.replies.is_empty()
                && self.rerun.is_none()
            {
                // Everything the client sent before Terminate has run.
                return Ok(());
            }
            let timer = self.next_timer();
            let read_client = !self.terminating && self.queued_bytes < MAX_QUEUED_BYTES;
            let lease = self.lease.as_mut();
            let watch_backend = lease.is_some();
            tokio::select! {
                biased;
                // Mid-transaction the session carries on until its server connection is free,
                // unless the grace period is over.
                stop = std::future::poll_fn(|cx| {
                    info.poll_stop(cx, if stopping { Stop::Close } else { Stop::Drain })
                }) => {
                    if stop == Stop::Close {
                        return Err(SessionError::Shutdown);
                    }
                    stopping = true;
                }
                r = async {
                    match lease {
                        Some(l) => l.conn().transport.fill().await,
                        None => std::future::pending().await,
                    }
                }, if watch_backend => {
                    match r {
                        Ok(0) => self.backend_failed(None).await?,
                        Ok(n) => {
                            tracing::trace!(n, "backend bytes");
                            self.on_backend_input().await?
                        }
                        Err(e) => self.backend_failed(Some(e)).await?,
                    }
                    self.note_activity();
                }
                r = self.client.fill(), if read_client => {
                    match r {
                        Ok(0) => return Ok(()),
                        Ok(_) => self.on_client_input().await?,
                        Err(e) => return Err(SessionError::ClientIo(e)),
                    }
                    self.note_activity();
                }
                _ = async {
                    match timer {
                        Some((at, _)) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if timer.is_some() => {
                    if let Some((_, kind)) = timer {
                        self.on_timer(kind).await?;
                    }
                }
            }
        }
    }

    /// Whether the next queued request may go out now. Outside a transaction a request waits
    /// for the previous one to finish, so it can be routed on its own.
    fn can_dispatch(&self) -> bool {
        if self.queue.is_empty() || self.copy_in || self.rerun.is_some() {
            return false;
        }
        match &self.lease {
            None => true,
            // A COPY whose batch had no Sync holds its result until the server reads more.
            Some(_) => self.replies.is_empty() || self.holds_backend() || self.copy_sync_owed,
        }
    }

    /// Takes up a reloaded configuration; costs one atomic load when nothing changed.
    fn refresh_config(&mut self) {
        let current = self.cfg_source.load();
        if !Arc::ptr_eq(current, &self.cfg) {
            self.cfg = Arc::clone(current);
        }
    }

    /// Whether the client must keep its backend even between statements.
    fn holds_backend(&self) -> bool {
        self.status != TxStatus::Idle || self.pinned || self.cfg.pool.mode == PoolMode::Session
    }

    async fn flush_client(&mut self) -> Result<(), SessionError> {
        if self.client.pending_write() == 0 {
            return Ok(());
        }
        if let Some(f) = self.in_flight.as_mut()
            && (f.retryable || f.rerunnable)
            && self.client.pending_write() > f.client_mark
        {
            // Only replies the proxy made itself so far, and the server still owes some: hold
            // them back so the request stays re-runnable until the server has answered.
            let server_owes = self.replies.iter().any(|e| {
                !matches!(
                    e,
                    Expect::Synthetic(_) | Expect::ParseHeld { .. } | Expect::CloseHeld { .. }
                )
            });
            if !f.server_replied && server_owes {
                return Ok(());
            }
            f.retryable = false;
            f.rerunnable = false;
        }
        if let Err(e) = self.client.flush().await {
            if !self.terminating {
                return Err(SessionError::ClientIo(e));
            }
            // Gone after Terminate: its replies go nowhere, but its requests still run.
            self.client.truncate_write(0);
        }
        if let Some(f) = self.in_flight.as_mut() {
            f.client_mark = 0;
        }
        Ok(())
    }

    /// Gives the backend back when the client no longer needs it. `ending` means the client is
    /// gone: the lease then rolls back or discards as needed.
    fn release_lease(&mut self, ending: bool) {
        let Some(mut lease) = self.lease.take() else {
            return;
        };
        // What the connection's own FATAL said matters only to its loss, seen no more now.
        self.backend_fatal_forwarded = false;
        self.backend_closed_alone = false;
        self.info.set_idle();
        if !self.replies.is_empty() || self.copy_in || self.rerun.is_some() {
            // Replies still in flight: the connection's state is unknown, never reuse it, and
            // what still runs there is cancelled as it closes.
            lease.conn().broken = true;
            lease.conn().running = true;
        }
        if ending && self.pinned {
            // Whatever pinned the session (temp tables, LISTEN, session locks, untracked
            // settings) lives on this connection: it goes with the client.
            lease.conn().broken = true;
        }
        if ending && self.cfg.pool.mode == PoolMode::Session {
            // The next client must find what a new server connection has: no settings the
            // proxy did not follow (a search_path listing pg_temp, standard_conforming_strings
            // off, a SET among other statements), no currval or lastval of this one's.
            lease.end_session();
        }
        if ending && lease.conn().status != TxStatus::Idle {
            tracing::debug!(node = %lease.node().name, "client left inside a transaction; rolling back");
        }
        self.replies.clear();
        self.in_flight = None;
        self.timings.clear();
        self.busy_since = None;
        self.cancel_sent = None;
        self.copy_sync_owed = false;
        if self.skip_until_sync.is_some() {
            // No server is left skipping to a Sync: the proxy answers the client's.
            self.skip_until_sync = Some(SyncEnds::Here);
        }
        self.pending_token = None;
        self.slot = None;
        if self.cancel.clear() {
            // A cancel sent for this backend can still land after its query: were the
            // connection handed on, it would cancel another client's work.
            lease.conn().broken = true;
        }
    }

    /// Sends the client an error for a request the proxy could not run, keeping the protocol
    /// in step (ReadyForQuery for Query/Sync, skip-until-Sync for a batch without one).
    fn fail_request(&mut self, req: &Request, e: &SessionError) {
        let message = e.to_string();
        let error = match e.routine() {
            Some(r) => protocol::error_response_from("ERROR", e.sqlstate(), &message, r),
            None => protocol::error_response("ERROR", e.sqlstate(), &message),
        };
        self.fail_request_with(req, &error);
    }

    /// [`Self::fail_request`] with an ErrorResponse already made (a server's).
    fn fail_request_with(&mut self, req: &Request, error: &Frame) {
        self.client.queue(error);
        if req.ends_with_ready() {
            self.client.queue(&protocol::ready_for_query(self.status));
        } else {
            self.skip_to_sync(SyncEnds::Here);
        }
    }
}
