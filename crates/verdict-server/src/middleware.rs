//! Cross-cutting layers: API-key check, `X-Request-Id` echo, the request
//! body's guard (size from the header, read deadline, keep-alive after early
//! answers), and the per-request log line and metrics.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::error::{ApiError, ErrorMessage};
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

/// When the request's body must have arrived (`--body-read-timeout`), counted from its headers.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub tokio::time::Instant);

/// Unread bodies up to this size are read to the end after an early answer
/// (401, 404, 415, ...), so the kept-alive connection can take the next request.
const DRAIN_LIMIT_BYTES: u64 = 64 * 1024;
/// The longest an early answer waits for such a body.
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// Refuses a declared `Content-Length` over the limit before reading (and
/// before `100 Continue`); sets the body's read deadline; and after the
/// answer, drains a small unread body or says `Connection: close`, so an
/// early error never leaves a kept-alive client with a half-read request.
pub async fn guard_body(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let limit = state.config.max_request_body_bytes as u64;
    let declared = declared_length(request.headers());
    if declared.is_some_and(|length| length > limit) {
        let refusal = ApiError::http(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "The request body is larger than the server's limit of {limit} bytes (--max-request-body-bytes)."
            ),
        );
        return close_after(refusal.into_response());
    }
    let deadline = tokio::time::Instant::now() + state.config.body_read_timeout;
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(BodyDeadline(deadline));
    if http_body::Body::is_end_stream(&body) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (leftover_tx, mut leftover_rx) = oneshot::channel();
    let tracked = Body::new(TrackedRequestBody {
        inner: body,
        finished: false,
        leftover: Some(leftover_tx),
    });
    let response = next.run(Request::from_parts(parts, tracked)).await;
    let reusable = match leftover_rx.try_recv() {
        Ok(Leftover::Finished) => true,
        // A client waiting for `100 Continue` has not sent the body: reading it
        // now would ask for it. Small bodies are read and thrown away.
        Ok(Leftover::Unread(body))
            if !expects_continue && declared.is_none_or(|n| n <= DRAIN_LIMIT_BYTES) =>
        {
            let until = deadline.min(tokio::time::Instant::now() + DRAIN_TIME);
            drain(body, until).await
        }
        // Unread and large, or still held somewhere: the connection cannot be reused.
        _ => false,
    };
    if reusable {
        response
    } else {
        close_after(response)
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Marks the answer as the connection's last.
pub fn close_after(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Reads an unread body to its end within the size and time bounds; true when it got there.
async fn drain(mut body: Body, until: tokio::time::Instant) -> bool {
    let mut read = 0u64;
    loop {
        match tokio::time::timeout_at(until, body.frame()).await {
            Ok(None) => return true,
            Ok(Some(Ok(frame))) => {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > DRAIN_LIMIT_BYTES {
                    return false;
                }
            }
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}

/// What became of a request body once the request was answered.
enum Leftover {
    Finished,
    Unread(Body),
}

/// The request body, reporting on drop whether it was read to the end (and
/// handing it back if not, for [`guard_body`] to drain).
struct TrackedRequestBody {
    inner: Body,
    finished: bool,
    leftover: Option<oneshot::Sender<Leftover>>,
}

impl http_body::Body for TrackedRequestBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.finished = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

impl Drop for TrackedRequestBody {
    fn drop(&mut self) {
        if let Some(leftover) = self.leftover.take() {
            let state = if self.finished || http_body::Body::is_end_stream(&self.inner) {
                Leftover::Finished
            } else {
                Leftover::Unread(std::mem::take(&mut self.inner))
            };
            let _ = leftover.send(state);
        }
    }
}

/// The metrics label of a method: the standard ones, else `other` (any token
/// is a valid method; each new label value would be a new time series).
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    KNOWN
        .into_iter()
        .find(|known| *known == method.as_str())
        .unwrap_or("other")
}

/// One info line and the metrics for every request.
pub async fn observe(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
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
        method,
        status.as_u16(),
        latency,
        outcome.sequences,
        outcome.prompt_tokens,
    );
    let latency_ms = latency.as_secs_f64() * 1000.0;
    match response.extensions().get::<ErrorMessage>() {
        Some(ErrorMessage(message)) => tracing::info!(
            method,
            route,
            status = status.as_u16(),
            latency_ms,
            error = %message,
            "request failed"
        ),
        None => tracing::info!(
            method,
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
