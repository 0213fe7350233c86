//! `POST /tokenize` and `POST /detokenize` (spec §6.7).

use axum::extract::State;
use axum::response::Response;
use serde::Serialize;
use verdict_engine::TruncationSide;

use crate::error::{ApiError, SchemaIssue};
use crate::fields::{as_i64, Body};
use crate::protocol::{json_response, parse_chat, render_chat, RequestOutcome};
use crate::state::{JsonBody, SharedState};

#[derive(Serialize)]
struct TokenizeResponse {
    count: usize,
    max_model_len: usize,
    tokens: Vec<u32>,
    token_strs: Option<Vec<Option<String>>>,
}

pub async fn tokenize_route(
    State(state): State<SharedState>,
    JsonBody(mut body): JsonBody,
) -> Result<Response, ApiError> {
    let model = body.opt_str("model")?;
    let return_token_strs = body.bool_or("return_token_strs", false)?;
    enum Source {
        Text(String),
        Chat(Box<crate::protocol::ChatInput>),
    }
    let (source, add_special_tokens) = if body.has("messages") {
        let chat = parse_chat(&mut body, &state, true)?;
        let add = body.bool_or("add_special_tokens", false)?;
        (Source::Chat(Box::new(chat)), add)
    } else {
        let prompt = body
            .opt_str("prompt")?
            .ok_or_else(|| Body::missing("prompt"))?;
        let add = body.bool_or("add_special_tokens", true)?;
        (Source::Text(prompt), add)
    };
    state.check_model(model.as_deref())?;

    let engine = state.engine.clone();
    let max_model_len = state.info.max_model_len;
    let limit = match state.config.max_tokenize_tokens {
        0 => max_model_len.saturating_mul(2).max(65_536),
        n => n,
    };
    let response = state
        .tokenizers
        .run(move || -> verdict_engine::Result<TokenizeResponse> {
            let text = match source {
                Source::Text(t) => t,
                Source::Chat(chat) => render_chat(&engine, &chat)?,
            };
            let tokenizer = engine.processor().tokenizer();
            // Tokenize one past the limit: enough to tell, and bounded however long the text.
            let tokens = tokenizer
                .encode(
                    &text,
                    add_special_tokens,
                    Some(limit + 1),
                    TruncationSide::Right,
                )?
                .ids;
            if tokens.len() > limit {
                return Err(verdict_engine::EngineError::validation_param(
                    format!(
                        "The prompt has more than {limit} tokens, the most /tokenize returns \
                         for one prompt (the server's --max-tokenize-tokens)."
                    ),
                    "prompt",
                ));
            }
            let token_strs = return_token_strs
                .then(|| tokens.iter().map(|&id| tokenizer.id_to_token(id)).collect());
            Ok(TokenizeResponse {
                count: tokens.len(),
                max_model_len,
                tokens,
                token_strs,
            })
        })
        .await??;
    Ok(json_response(&response, RequestOutcome::default()))
}

#[derive(Serialize)]
struct DetokenizeResponse {
    prompt: String,
}

pub async fn detokenize_route(
    State(state): State<SharedState>,
    JsonBody(mut body): JsonBody,
) -> Result<Response, ApiError> {
    let model = body.opt_str("model")?;
    let tokens = body.take("tokens").ok_or_else(|| Body::missing("tokens"))?;
    let not_ints = || -> ApiError {
        SchemaIssue::new(
            "list_type",
            &["tokens"],
            "Input should be a valid list of integers",
        )
        .with_input(&tokens)
        .into()
    };
    let items = tokens.as_array().ok_or_else(not_ints)?;
    let vocab = state.engine.processor().tokenizer().vocab_size();
    let mut ids = Vec::with_capacity(items.len());
    for item in items {
        let id = as_i64(item).ok_or_else(not_ints)?;
        match u32::try_from(id) {
            Ok(id) if (id as usize) < vocab => ids.push(id),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "Token id {id} is out of vocabulary (the tokenizer has {vocab} tokens)"
                )))
            }
        }
    }
    state.check_model(model.as_deref())?;
    let engine = state.engine.clone();
    let prompt = state
        .tokenizers
        .run(move || engine.processor().tokenizer().decode(&ids, false))
        .await??;
    Ok(json_response(
        &DetokenizeResponse { prompt },
        RequestOutcome::default(),
    ))
}
