//! `POST /classify` (spec §6.2–§6.4).

use axum::http::HeaderMap;
use axum::response::Response;
use serde::Serialize;
use verdict_engine::{PooledData, PoolingTask};

use crate::error::ApiError;
use crate::fields::Body;
use crate::protocol::{
    json_floats, json_response, run_prompts, tokenize_prompts, total_tokens, CommonFields,
    ListResponse, PromptRequest, RequestOutcome,
};
use crate::state::{response_id, unix_now, AppState};

#[derive(Serialize)]
struct ClassificationItem {
    index: usize,
    label: Option<String>,
    probs: Vec<f64>,
    num_classes: usize,
}

json_route!(classify_route => classify);

pub async fn classify(
    state: &AppState,
    headers: &HeaderMap,
    mut body: Body,
) -> Result<Response, ApiError> {
    let common = CommonFields::parse(&mut body)?;
    let request = PromptRequest::parse(&mut body, state)?;
    if state.info.task != PoolingTask::Classify {
        return Err(ApiError::not_implemented(
            "The model does not support Classification API",
        ));
    }
    let selection = state.check_model(common.model.as_deref())?;
    state
        .engine
        .check_step_params(PoolingTask::Classify, &common.step)?;
    let prompts = tokenize_prompts(state, request, &common).await?;
    let outputs = run_prompts(state, prompts, &common, &selection).await?;

    let prompt_tokens = total_tokens(&outputs);
    let mut data = Vec::with_capacity(outputs.len());
    for (index, output) in outputs.iter().enumerate() {
        let PooledData::Vector(probs) = &output.data else {
            return Err(ApiError::internal(
                "pooled_data should be a 1-D probability vector",
            ));
        };
        data.push(ClassificationItem {
            index,
            label: selection.label_of(&state.info, probs),
            probs: json_floats(probs)?,
            num_classes: probs.len(),
        });
    }
    let response = ListResponse::new(
        response_id("classify-", headers),
        unix_now(),
        &selection.name,
        data,
        prompt_tokens,
    );
    Ok(json_response(
        &response,
        RequestOutcome {
            sequences: outputs.len(),
            prompt_tokens,
        },
    ))
}
