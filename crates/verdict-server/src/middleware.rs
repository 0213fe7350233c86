//! Cross-cutting layers: API-key check, `X-Request-Id` echo, and the
//! per-request log line and metrics.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::error::ErrorMessage;
use crate::protocol::RequestOutcome;
use crate::state::{random_hex32, SharedState};

/// Paths that stay open with an API key set: probes and monitoring.
const OPEN_PATHS: &[&str] = &["/health", "/ping", "/version", "/metrics"];

/// `Authorization: Bearer <key>` on every other path (stricter than vLLM,
/// which guards only /v1, /v2 and /inference). OPTIONS passes (CORS preflight).
pub async fn require_api_key(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = state.config.api_key.as_deref() else {
        return next.run(request).await;
    };
    if request.method() == Method::OPTIONS || OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim_start());
    let authorised =
        presented.is_some_and(|token| bool::from(token.as_bytes().ct_eq(key.as_bytes())));
    if authorised {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "Unauthorized"})),
        )
            .into_response()
    }
}

/// With --enable-request-id-headers: the response carries the request's
/// `X-Request-Id`, or a fresh one.
pub async fn echo_request_id(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    if !state.config.enable_request_id_headers {
        return next.run(request).await;
    }
    let id = request.headers().get("x-request-id").cloned();
    let mut response = next.run(request).await;
    let id = id.or_else(|| HeaderValue::from_str(&random_hex32()).ok());
    if let Some(id) = id {
        response.headers_mut().insert("x-request-id", id);
    }
    response
}

/// One info line and the metrics for every request.
pub async fn observe(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    // The route pattern, not the raw path: unknown paths must not create new label values.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    let latency = started.elapsed();
    let status = response.status();
    let outcome = response
        .extensions()
        .get::<RequestOutcome>()
        .copied()
        .unwrap_or_default();
    state.metrics.observe_request(
        &route,
        method.as_str(),
        status.as_u16(),
        latency,
        outcome.sequences,
        outcome.prompt_tokens,
    );
    let latency_ms = latency.as_secs_f64() * 1000.0;
    match response.extensions().get::<ErrorMessage>() {
        Some(ErrorMessage(message)) => tracing::info!(
            %method,
            route,
            status = status.as_u16(),
            latency_ms,
            error = %message,
            "request failed"
        ),
        None => tracing::info!(
            %method,
            route,
            status = status.as_u16(),
            items = outcome.sequences,
            tokens = outcome.prompt_tokens,
            latency_ms,
            "request"
        ),
    }
    response
}
