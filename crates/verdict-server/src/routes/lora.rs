//! `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (with
//! --allow-runtime-lora-updating): adapters come and go while requests run; a
//! request holds its adapter, so unloading never fails one already accepted.

use std::path::PathBuf;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use verdict_engine::EngineError;

use crate::error::ApiError;
use crate::fields::Body;
use crate::protocol::RequestOutcome;
use crate::state::AppState;

json_route!(load_route => load);
json_route!(unload_route => unload);

pub async fn load(state: &AppState, _: &HeaderMap, mut body: Body) -> Result<Response, ApiError> {
    let name = body.opt_str("lora_name")?;
    let path = body.opt_str("lora_path")?;
    let (Some(name), Some(path)) = (name, path) else {
        return Err(ApiError::bad_request(
            "Both 'lora_name' and 'lora_path' must be provided.",
        ));
    };
    let registry = registry(state)?;
    if state.info.served_model_names.contains(&name) {
        return Err(ApiError::bad_request(format!(
            "'{name}' is the base model's name; choose another name for the adapter."
        )));
    }
    // Reading and converting the weights blocks: off the async workers.
    let loaded = {
        let name = name.clone();
        tokio::task::spawn_blocking(move || registry.load(&name, &PathBuf::from(path)))
            .await
            .map_err(|e| ApiError::internal(format!("loading the adapter: {e}")))?
    };
    loaded.map_err(load_error)?;
    tracing::info!(lora_name = %name, "LoRA adapter loaded");
    Ok(text(format!(
        "Success: LoRA adapter '{name}' added successfully."
    )))
}

pub async fn unload(state: &AppState, _: &HeaderMap, mut body: Body) -> Result<Response, ApiError> {
    body.opt_i64("lora_int_id")?;
    let Some(name) = body.opt_str("lora_name")? else {
        return Err(ApiError::bad_request(
            "'lora_name' needs to be provided to unload a LoRA adapter.",
        ));
    };
    registry(state)?.unload(&name)?;
    tracing::info!(lora_name = %name, "LoRA adapter unloaded");
    Ok(text(format!(
        "Success: LoRA adapter '{name}' removed successfully."
    )))
}

fn registry(state: &AppState) -> Result<std::sync::Arc<verdict_engine::LoraRegistry>, ApiError> {
    state
        .engine
        .lora()
        .cloned()
        .ok_or_else(|| ApiError::bad_request("LoRA is not enabled (--enable-lora)."))
}

/// A bad adapter is the caller's fault (400); a missing directory is 404.
fn load_error(e: EngineError) -> ApiError {
    match e {
        EngineError::NotFound(m) => ApiError::not_found(m),
        EngineError::Io { .. } => ApiError::not_found(e.to_string()),
        EngineError::Unavailable(_) => ApiError::from(e),
        other => ApiError::bad_request(other.to_string()),
    }
}

fn text(message: String) -> Response {
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response();
    response.extensions_mut().insert(RequestOutcome::default());
    response
}
