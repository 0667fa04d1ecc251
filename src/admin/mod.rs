//! The admin HTTP endpoint on `server.admin_listen`: `/stats` (JSON), `/history` (the last
//! ten minutes, per second), `/metrics` (Prometheus), `/` (a dashboard), `/health`, `/ready`, and draining replicas. With
//! `admin.token` set, every route but `/health` and `/ready` wants `Authorization: Bearer …`
//! (the dashboard page also takes `?token=`, which its script then sends as that header).
//! Requests a browser was tricked into sending are refused first (see [`guard`]).

pub mod console;
pub mod guard;
pub mod history;
pub mod metrics;
mod serve;
pub mod snapshot;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::server::Shared;
use snapshot::Snapshot;

/// The dashboard: one self-contained page, no external assets.
const DASHBOARD: &str = include_str!("dashboard.html");

struct AdminState {
    shared: Arc<Shared>,
    registry: Registry,
    history: Arc<history::History>,
    /// The bound address, a name requests may use besides loopback ones.
    listen: SocketAddr,
}

/// Binds the admin listener and serves it until the proxy shuts down.
pub async fn start(shared: &Arc<Shared>) -> std::io::Result<Option<SocketAddr>> {
    let listen = &shared.cfg.load().server.admin_listen;
    if listen.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(AdminState {
        shared: Arc::clone(shared),
        registry: metrics::registry(Arc::clone(shared)),
        history: Arc::new(history::History::default()),
        listen: addr,
    });
    state.history.spawn_sampler(Arc::clone(shared));
    let protected = Router::new()
        .route("/", get(dashboard))
        .route("/stats", get(stats))
        .route("/history", get(history_samples))
        .route("/metrics", get(prometheus))
        .route("/replicas/{name}/drain", post(drain))
        .route("/replicas/{name}/undrain", post(undrain))
        .route("/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ));
    let app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(protected)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            guard::refuse_browser_attacks,
        ))
        .with_state(state);
    tokio::spawn(serve::serve(listener, app, shared.shutdown.clone()));
    tracing::info!(%addr, "admin endpoint listening");
    Ok(Some(addr))
}

/// Compares in time independent of where the inputs differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn require_token(
    State(state): State<Arc<AdminState>>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let expected = &state.shared.cfg.load().admin.token;
    if expected.is_empty() {
        return next.run(req).await;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // The dashboard page itself may carry the token in its URL; its script uses the header.
    let from_query = (req.uri().path() == "/").then_some(q.token).flatten();
    let given = bearer.map(str::to_string).or(from_query);
    match given {
        Some(t) if same_secret(t.as_bytes(), expected.as_bytes()) => next.run(req).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "admin token required\n",
        )
            .into_response(),
    }
}

async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        DASHBOARD,
    )
}

async fn stats(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(Snapshot::collect(&state.shared)),
    )
}

async fn history_samples(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(serde_json::json!({ "interval_ms": 1000, "samples": state.history.samples() })),
    )
}

async fn prometheus(State(state): State<Arc<AdminState>>) -> Response {
    match metrics::render(&state.registry) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn reload(State(state): State<Arc<AdminState>>) -> Response {
    match state.shared.reload() {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "reload rejected; the running configuration stays");
            (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({ "error": e })),
            )
                .into_response()
        }
    }
}

async fn health() -> &'static str {
    "ok\n"
}

/// Ready while the primary is reachable: the health monitor has reached it and not banned it.
async fn ready(State(state): State<Arc<AdminState>>) -> Response {
    let primary = state.shared.cluster.primary();
    if primary.is_usable() && primary.lsn_read_at_ms.load(Ordering::Acquire) != 0 {
        "ready\n".into_response()
    } else {
        let why = primary
            .ban_reason()
            .unwrap_or_else(|| "primary not reached yet".into());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response()
    }
}

async fn drain(state: State<Arc<AdminState>>, name: Path<String>) -> Response {
    set_drained(&state, &name, true)
}

async fn undrain(state: State<Arc<AdminState>>, name: Path<String>) -> Response {
    set_drained(&state, &name, false)
}

fn set_drained(state: &AdminState, name: &str, drained: bool) -> Response {
    let replica = state
        .shared
        .cluster
        .replicas()
        .iter()
        .find(|n| n.name == name)
        .cloned();
    let Some(node) = replica else {
        return (
            StatusCode::NOT_FOUND,
            format!("no replica named {name:?}\n"),
        )
            .into_response();
    };
    node.drained.store(drained, Ordering::Release);
    tracing::info!(replica = %name, drained, "replica drain changed by the admin endpoint");
    axum::Json(serde_json::json!({ "replica": name, "drained": drained })).into_response()
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }
}
