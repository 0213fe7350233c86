//! `GET /v1/models`, `/health`, `/ping`, `/version`, `/metrics`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::state::{random_hex32, unix_now, SharedState};

/// The served names, then each LoRA adapter with the base model as its `parent`.
pub async fn models(State(state): State<SharedState>) -> Json<Value> {
    let created = unix_now();
    let root = state.info.model_dir.to_string_lossy().into_owned();
    let mut cards: Vec<Value> = state
        .info
        .served_model_names
        .iter()
        .map(|name| {
            card(
                name,
                &root,
                Value::Null,
                Some(state.info.max_model_len),
                created,
            )
        })
        .collect();
    if let Some(registry) = state.engine.lora() {
        let parent = Value::from(state.served_name());
        cards.extend(registry.list().into_iter().map(|adapter| {
            let root = adapter.path.to_string_lossy().into_owned();
            card(&adapter.name, &root, parent.clone(), None, created)
        }));
    }
    Json(json!({"object": "list", "data": cards}))
}

fn card(
    name: &str,
    root: &str,
    parent: Value,
    max_model_len: Option<usize>,
    created: u64,
) -> Value {
    json!({
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "verdict",
                "root": root,
                "parent": parent,
                "max_model_len": max_model_len,
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
