//! `POST /invocations` (SageMaker): one route, dispatched by the body's shape
//! in vLLM's order — classification, rerank, score, pooling.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use verdict_engine::PoolingTask;

use crate::error::ApiError;
use crate::routes::{classify, pooling, score};
use crate::state::{JsonBody, SharedState};

pub async fn invocations_route(
    State(state): State<SharedState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let has_prompt = body.has("input") || body.has("messages");
    let is_rerank = body.has("query") && body.has("documents");
    let is_score = score::score_fields(&body).is_some();
    if has_prompt && !is_rerank && !is_score && state.info.task == PoolingTask::Classify {
        return classify::classify(&state, &headers, body).await;
    }
    if state.info.supports_score() {
        if is_rerank {
            return score::rerank(&state, &headers, body).await;
        }
        if is_score {
            return score::score(&state, &headers, body).await;
        }
    }
    if has_prompt || body.has("data") {
        return pooling::pooling(&state, &headers, body).await;
    }
    Err(ApiError::bad_request(
        "Cannot find suitable handler for request. Expected one of: \
         ClassificationRequest, RerankRequest, ScoreRequest, PoolingRequest.",
    ))
}
