//! The admin port: `/livez` (the process runs), `/readyz` (it can serve: the metadata service
//! answers), `/metrics` (Prometheus text). Kept off the public port.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::media::MediaService;

#[derive(Clone)]
struct AdminState {
    media: Arc<MediaService>,
    shutting_down: CancellationToken,
}

pub fn router(media: Arc<MediaService>, shutting_down: CancellationToken) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { media, shutting_down })
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.shutting_down.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".to_owned());
    }
    match s.media.meta.status().await {
        Ok(_) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("metadata service: {e}\n")),
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.media.metrics.encode())
}
