//! `GET /v1/models`, `/health`, `/ping`, `/version`, `/metrics`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::state::{random_hex32, unix_now, SharedState};

pub async fn models(State(state): State<SharedState>) -> Json<Value> {
    let created = unix_now();
    let root = state.info.model_dir.to_string_lossy().into_owned();
    let cards: Vec<Value> = state
        .info
        .served_model_names
        .iter()
        .map(|name| {
            json!({
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "verdict",
                "root": root,
                "parent": null,
                "max_model_len": state.info.max_model_len,
                "permission": [{
                    "id": format!("modelperm-{}", random_hex32()),
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": false,
                    "allow_sampling": true,
                    "allow_logprobs": true,
                    "allow_search_indices": false,
                    "allow_view": true,
                    "allow_fine_tuning": false,
                    "organization": "*",
                    "group": null,
                    "is_blocking": false,
                }],
            })
        })
        .collect();
    Json(json!({"object": "list", "data": cards}))
}

/// 200 with an empty body while the engine takes work; 503 once its threads
/// have stopped (shutting down, or dead).
pub async fn health(State(state): State<SharedState>) -> StatusCode {
    if state.engine.is_alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

pub async fn metrics(State(state): State<SharedState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
