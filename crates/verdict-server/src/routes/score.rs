//! `POST /score` and `POST /rerank` for cross-encoders (num_labels == 1, spec §6.6).

use axum::http::HeaderMap;
use axum::response::Response;
use serde::Serialize;
use serde_json::Value;
use verdict_engine::llm::pair_up;
use verdict_engine::{ChatOptions, PairLimits, PooledData, PoolingTask, TokenizeOptions};

use crate::error::{ApiError, SchemaIssue};
use crate::execution::SequenceOutput;
use crate::fields::Body;
use crate::protocol::{
    check_score_template_kwargs, json_float, json_response, run_prompts, CommonFields,
    ListResponse, RequestOutcome,
};
use crate::state::{response_id, unix_now, AppState, Selection};

/// The `/score` body variants, tried in vLLM's order.
const SCORE_FIELD_PAIRS: &[(&str, &str)] = &[
    ("queries", "documents"),
    ("queries", "items"),
    ("data_1", "data_2"),
    ("text_1", "text_2"),
];

/// Fields of every scoring request beyond the common ones.
struct ScoringFields {
    common: CommonFields,
    limits: PairLimits,
}

impl ScoringFields {
    fn parse(body: &mut Body, state: &AppState) -> Result<Self, ApiError> {
        let common = CommonFields::parse(body)?;
        state
            .engine
            .check_step_params(PoolingTask::Classify, &common.step)?;
        let max_tokens_per_query = body.opt_i64("max_tokens_per_query")?.unwrap_or(0);
        let max_tokens_per_doc = body.opt_i64("max_tokens_per_doc")?.unwrap_or(0);
        let instruction = body.opt_str("instruction")?;
        let mut kwargs = body.opt_object("chat_template_kwargs")?.unwrap_or_default();
        body.check_object("mm_processor_kwargs")?;
        let max_model_len = state.info.max_model_len;
        let per_query = token_limit("max_tokens_per_query", max_tokens_per_query, max_model_len)?;
        let per_doc = token_limit("max_tokens_per_doc", max_tokens_per_doc, max_model_len)?;
        check_score_template_kwargs(&kwargs)?;
        if let Some(instruction) = instruction {
            kwargs
                .entry("instruction")
                .or_insert(Value::String(instruction));
        }
        let score_template = state.info.chat_template_from_cli.then(|| ChatOptions {
            add_generation_prompt: false,
            continue_final_message: false,
            template_kwargs: kwargs,
        });
        Ok(ScoringFields {
            common,
            limits: PairLimits {
                max_tokens_per_query: per_query,
                max_tokens_per_doc: per_doc,
                score_template,
            },
        })
    }
}

fn token_limit(name: &str, value: i64, max_model_len: usize) -> Result<usize, ApiError> {
    if value < 0 {
        return Err(ApiError::bad_request_param(
            format!("{name} must be a non-negative integer"),
            name,
        ));
    }
    let value = usize::try_from(value).unwrap_or(usize::MAX);
    if value > 0 && value >= max_model_len {
        return Err(ApiError::bad_request_param(
            format!("{name} ({value}) must be less than max_model_len ({max_model_len})."),
            name,
        ));
    }
    Ok(value)
}

/// One side of a pair: `str`, `{"content": [...]}` or a list of those.
fn parse_side(state: &AppState, key: &str, value: Value) -> Result<Vec<String>, ApiError> {
    let one = |v: Value| -> Result<String, ApiError> {
        match v {
            Value::String(s) => Ok(s),
            Value::Object(m) if m.contains_key("content") => Err(ApiError::bad_request(format!(
                "MultiModalParam is not supported for {}",
                state.info.architecture
            ))),
            other => Err(
                SchemaIssue::new("string_type", &[key], "Input should be a valid string")
                    .with_input(&other)
                    .into(),
            ),
        }
    };
    match value {
        Value::Array(items) => items.into_iter().map(one).collect(),
        other => Ok(vec![one(other)?]),
    }
}

fn check_documents_len(state: &AppState, n: usize) -> Result<(), ApiError> {
    let max = state.config.max_input_list_len;
    if n > max {
        return Err(ApiError::bad_request_param(
            format!(
                "The documents list length ({n}) exceeds the maximum allowed ({max}); \
                 send fewer documents per request or raise --max-input-list-len."
            ),
            "documents",
        ));
    }
    Ok(())
}

/// Tokenizes the (query, document) pairs on the pool and runs them.
async fn score_pairs(
    state: &AppState,
    queries: &[String],
    documents: &[String],
    fields: ScoringFields,
    selection: &Selection,
) -> Result<Vec<(SequenceOutput, f32)>, ApiError> {
    // An adapter with its own head scores only when that head has one label.
    if selection.num_labels(&state.info) != 1 {
        return Err(ApiError::bad_request(format!(
            "Scoring API is only enabled for num_labels == 1; LoRA adapter '{}' has {} labels.",
            selection.name,
            selection.num_labels(&state.info)
        )));
    }
    let pairs: Vec<(String, String)> = pair_up(queries, documents)?
        .into_iter()
        .map(|(q, d)| (q.to_string(), d.to_string()))
        .collect();
    let opts = TokenizeOptions {
        truncate_prompt_tokens: fields.common.truncate_prompt_tokens,
        truncation_side: fields.common.truncation_side,
        add_special_tokens: Some(true),
        ..TokenizeOptions::default()
    };
    state.engine.processor().truncation_len(&opts)?;
    let limits = fields.limits;
    let prompts = state
        .tokenizers
        .tokenize_all(&state.engine, pairs, move |engine, (q, d)| {
            engine.processor().process_pair(&q, &d, &opts, &limits)
        })
        .await?;
    let outputs = run_prompts(state, prompts, &fields.common, selection).await?;
    outputs
        .into_iter()
        .map(|o| match &o.data {
            PooledData::Vector(v) if v.len() == 1 => {
                let score = v[0];
                Ok((o, score))
            }
            _ => Err(ApiError::internal("pooled_data should be a scalar score")),
        })
        .collect()
}

#[derive(Serialize)]
struct ScoreItem {
    index: usize,
    object: &'static str,
    score: f64,
}

json_route!(score_route => score);

/// Which `/score` body variant this is, if any.
pub fn score_fields(body: &Body) -> Option<(&'static str, &'static str)> {
    SCORE_FIELD_PAIRS
        .iter()
        .copied()
        .find(|(a, b)| body.has(a) && body.has(b))
}

pub async fn score(
    state: &AppState,
    headers: &HeaderMap,
    mut body: Body,
) -> Result<Response, ApiError> {
    let Some((first, second)) = score_fields(&body) else {
        return Err(ApiError::schema(
            "[{'type': 'missing', 'loc': ('body',), 'msg': 'Field required: one of \
             {queries, documents}, {queries, items}, {data_1, data_2} or {text_1, text_2}'}]",
        ));
    };
    let first_value = body.take(first).ok_or_else(|| Body::missing(first))?;
    let second_value = body.take(second).ok_or_else(|| Body::missing(second))?;
    let queries = parse_side(state, first, first_value)?;
    let documents = parse_side(state, second, second_value)?;
    let fields = ScoringFields::parse(&mut body, state)?;
    check_documents_len(state, documents.len())?;
    let selection = state.check_model(fields.common.model.as_deref())?;

    let scored = score_pairs(state, &queries, &documents, fields, &selection).await?;
    let prompt_tokens: usize = scored.iter().map(|(o, _)| o.prompt_tokens).sum();
    let mut data = Vec::with_capacity(scored.len());
    for (index, (_, score)) in scored.iter().enumerate() {
        data.push(ScoreItem {
            index,
            object: "score",
            score: json_float(*score)?,
        });
    }
    let response = ListResponse::new(
        response_id("score-", headers),
        unix_now(),
        &selection.name,
        data,
        prompt_tokens,
    );
    Ok(json_response(
        &response,
        RequestOutcome {
            sequences: scored.len(),
            prompt_tokens,
        },
    ))
}

#[derive(Serialize)]
struct RerankDocument {
    text: String,
    multi_modal: Option<()>,
}

#[derive(Serialize)]
struct RerankResult {
    index: usize,
    document: RerankDocument,
    relevance_score: f64,
}

#[derive(Serialize)]
struct RerankUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

#[derive(Serialize)]
struct RerankResponse<'a> {
    id: String,
    model: &'a str,
    usage: RerankUsage,
    results: Vec<RerankResult>,
}

json_route!(rerank_route => rerank);

pub async fn rerank(
    state: &AppState,
    headers: &HeaderMap,
    mut body: Body,
) -> Result<Response, ApiError> {
    let query_value = body.take("query").ok_or_else(|| Body::missing("query"))?;
    let documents_value = body
        .take("documents")
        .ok_or_else(|| Body::missing("documents"))?;
    let query = match query_value {
        Value::Array(_) => {
            return Err(SchemaIssue::new(
                "string_type",
                &["query"],
                "Input should be a valid string",
            )
            .with_input(&query_value)
            .into())
        }
        other => parse_side(state, "query", other)?,
    };
    let documents = parse_side(state, "documents", documents_value)?;
    let top_n = body.opt_i64("top_n")?.unwrap_or(0);
    let fields = ScoringFields::parse(&mut body, state)?;
    check_documents_len(state, documents.len())?;
    let selection = state.check_model(fields.common.model.as_deref())?;

    let scored = score_pairs(state, &query, &documents, fields, &selection).await?;
    let prompt_tokens: usize = scored.iter().map(|(o, _)| o.prompt_tokens).sum();
    let sequences = scored.len();
    let mut results = Vec::with_capacity(sequences);
    for ((index, (_, score)), text) in scored.into_iter().enumerate().zip(documents) {
        results.push(RerankResult {
            index,
            document: RerankDocument {
                text,
                multi_modal: None,
            },
            relevance_score: json_float(score)?,
        });
    }
    // Stable: equal scores keep document order.
    results.sort_by(|a, b| b.relevance_score.total_cmp(&a.relevance_score));
    if top_n > 0 && (top_n as usize) < results.len() {
        results.truncate(top_n as usize);
    }
    let response = RerankResponse {
        id: response_id("score-", headers),
        model: &selection.name,
        usage: RerankUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
        results,
    };
    Ok(json_response(
        &response,
        RequestOutcome {
            sequences,
            prompt_tokens,
        },
    ))
}
