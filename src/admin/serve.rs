//! Accepting and serving admin connections: how many at once, and how long each may take to
//! send a request head.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

/// Admin connections served at once; past it a new one is closed at once, so however many
/// sockets a peer opens, the database port keeps its file descriptors.
const MAX_CONNECTIONS: usize = 64;

/// Time a connection gets to send a whole request head, counted from when the server starts
/// waiting for it: a silent socket, a trickled head or an idle keep-alive is closed after it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts admin connections until shutdown, each bounded by [`HEADER_READ_TIMEOUT`] and all
/// together by [`MAX_CONNECTIONS`]; at shutdown, requests under way finish first.
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    stop: tokio_util::sync::CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
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
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "admin connection refused: {MAX_CONNECTIONS} already open");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "admin connection ended");
            }
            drop(slot);
        });
    }
    // Requests under way finish; idle connections close now.
    if tokio::time::timeout(HEADER_READ_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("admin endpoint stopped with requests still open");
    }
}
