//! Request fields shared by the pooling endpoints (spec §6.2–§6.3), turning
//! them into engine prompts, and the response pieces they share.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use verdict_engine::tokenize::{media_parts, ChatTemplate, TokenizedPrompt};
use verdict_engine::{
    ChatMessage, ChatOptions, EngineError, Prompt, SequenceInput, StepParams, TokenizeOptions,
    TruncationSide,
};

use crate::error::{ApiError, SchemaIssue};
use crate::execution::{admit, run_sequences, CancelOnDrop, SequenceOutput};
use crate::fields::{as_i64, Body};
use crate::state::{AppState, Selection};

/// Fields every pooling request carries (vLLM's common request mixin).
#[derive(Debug, Clone, Default)]
pub struct CommonFields {
    pub model: Option<String>,
    pub truncate_prompt_tokens: Option<i64>,
    pub truncation_side: Option<TruncationSide>,
    pub priority: i64,
    pub use_activation: Option<bool>,
    pub mm_processor_kwargs: Option<Map<String, Value>>,
    /// STEP pooling parameters (accepted only by STEP models).
    pub step: StepParams,
}

impl CommonFields {
    pub fn parse(body: &mut Body) -> Result<Self, ApiError> {
        let model = body.opt_str("model")?;
        body.check_str("user")?;
        body.check_str("request_id")?;
        body.check_str("cache_salt")?;
        let mm_processor_kwargs = body.opt_object("mm_processor_kwargs")?;
        let truncate_prompt_tokens = body.opt_i64("truncate_prompt_tokens")?;
        if let Some(n) = truncate_prompt_tokens.filter(|n| *n < -1) {
            return Err(SchemaIssue::new(
                "greater_than_equal",
                &["truncate_prompt_tokens"],
                "Input should be greater than or equal to -1",
            )
            .with_input(&Value::from(n))
            .into());
        }
        let truncation_side = body
            .opt_literal("truncation_side", &["left", "right"])?
            .and_then(TruncationSide::parse);
        let priority = body.opt_i64("priority")?.unwrap_or(0);
        let use_activation = body.opt_bool("use_activation")?;
        let step = StepParams {
            step_tag_id: body.opt_u32("step_tag_id")?,
            returned_token_ids: body.opt_u32_list("returned_token_ids")?,
        };
        Ok(CommonFields {
            model,
            truncate_prompt_tokens,
            truncation_side,
            priority,
            use_activation,
            mm_processor_kwargs,
            step,
        })
    }

    pub fn tokenize_options(&self, add_special_tokens: bool) -> TokenizeOptions {
        TokenizeOptions {
            truncate_prompt_tokens: self.truncate_prompt_tokens,
            truncation_side: self.truncation_side,
            add_special_tokens: Some(add_special_tokens),
            mm_processor_kwargs: self.mm_processor_kwargs.clone(),
            cancel: None,
        }
    }
}

/// A conversation to render (chat-style requests).
#[derive(Debug, Clone)]
pub struct ChatInput {
    pub messages: Vec<ChatMessage>,
    pub options: ChatOptions,
    /// The request's own template (only with --trust-request-chat-template).
    pub template: Option<String>,
}

/// What a completion- or chat-style request asks to classify.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Completion(Vec<Prompt>),
    Chat(ChatInput),
}

/// The request's prompts plus its `add_special_tokens` (defaults differ by form).
#[derive(Debug, Clone)]
pub struct PromptRequest {
    pub input: PromptInput,
    pub add_special_tokens: bool,
}

impl PromptRequest {
    /// `input` (completion form) or `messages` (chat form); the number of
    /// prompts is bounded by --max-input-list-len.
    pub fn parse(body: &mut Body, state: &AppState) -> Result<Self, ApiError> {
        if let Some(input) = body.take("input") {
            let prompts = parse_completion_input(input, state.info.vocab_size)?;
            let max = state.config.max_input_list_len;
            if prompts.len() > max {
                return Err(ApiError::bad_request_param(
                    format!(
                        "The input list length ({}) exceeds the maximum allowed ({max}); \
                         send fewer prompts per request or raise --max-input-list-len.",
                        prompts.len()
                    ),
                    "input",
                ));
            }
            let add_special_tokens = body.bool_or("add_special_tokens", true)?;
            return Ok(PromptRequest {
                input: PromptInput::Completion(prompts),
                add_special_tokens,
            });
        }
        if body.has("messages") {
            let chat = parse_chat(body, state, false)?;
            let add_special_tokens = body.bool_or("add_special_tokens", false)?;
            return Ok(PromptRequest {
                input: PromptInput::Chat(chat),
                add_special_tokens,
            });
        }
        Err(ApiError::schema(format!(
            "[{}, {}]",
            missing_repr("input"),
            missing_repr("messages")
        )))
    }
}

fn missing_repr(key: &str) -> String {
    format!("{{'type': 'missing', 'loc': ('body', '{key}'), 'msg': 'Field required'}}")
}

/// `messages`, `add_generation_prompt`, `continue_final_message`, `chat_template`,
/// `chat_template_kwargs`. `add_generation_prompt` defaults to `default_gen_prompt`.
pub fn parse_chat(
    body: &mut Body,
    state: &AppState,
    default_gen_prompt: bool,
) -> Result<ChatInput, ApiError> {
    let messages_value = body
        .take("messages")
        .ok_or_else(|| Body::missing("messages"))?;
    let messages: Vec<ChatMessage> =
        serde_json::from_value(messages_value.clone()).map_err(|e| {
            ApiError::from(
                SchemaIssue::new(
                    "value_error",
                    &["messages"],
                    format!("Invalid messages: {e}"),
                )
                .with_input(&messages_value),
            )
        })?;
    let add_generation_prompt = body.bool_or("add_generation_prompt", default_gen_prompt)?;
    let continue_final_message = body.bool_or("continue_final_message", false)?;
    if add_generation_prompt && continue_final_message {
        return Err(SchemaIssue::new(
            "value_error",
            &[],
            "Value error, Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        )
        .into());
    }
    let mut template = body.opt_str("chat_template")?;
    let mut template_kwargs = body.opt_object("chat_template_kwargs")?.unwrap_or_default();
    if let Some(from_kwargs) = template_kwargs.remove("chat_template") {
        if template.is_none() {
            template = match from_kwargs {
                Value::String(s) => Some(s),
                Value::Null => None,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "chat_template_kwargs.chat_template must be a string, got {other}"
                    )))
                }
            };
        }
    }
    body.check_object("media_io_kwargs")?;
    if template.is_some() && !state.config.trust_request_chat_template {
        return Err(ApiError::bad_request(
            "Chat template is passed with request, but --trust-request-chat-template is not set. \
             Refused request with untrusted chat template.",
        ));
    }
    Ok(ChatInput {
        messages,
        options: ChatOptions {
            add_generation_prompt,
            continue_final_message,
            template_kwargs,
        },
        template,
    })
}

/// `str | list[str] | list[int] | list[list[int]]`: a flat int list is ONE prompt.
fn parse_completion_input(input: Value, vocab_size: usize) -> Result<Vec<Prompt>, ApiError> {
    let invalid = |v: &Value| -> ApiError {
        SchemaIssue::new(
            "union_error",
            &["input"],
            "Input should be a valid string, a list of strings, a list of integers or a list of lists of integers",
        )
        .with_input(v)
        .into()
    };
    match input {
        Value::String(s) => Ok(vec![Prompt::Text(s)]),
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ApiError::bad_request("You must pass at least one prompt"));
            }
            if items.iter().all(Value::is_number) {
                let whole = Value::Array(items);
                let ids = token_ids(&whole, vocab_size).ok_or_else(|| invalid(&whole))??;
                return Ok(vec![Prompt::from(ids)]);
            }
            if items.iter().all(Value::is_string) {
                return Ok(items
                    .into_iter()
                    .filter_map(|v| match v {
                        Value::String(s) => Some(Prompt::Text(s)),
                        _ => None,
                    })
                    .collect());
            }
            if items.iter().all(Value::is_array) {
                let mut prompts = Vec::with_capacity(items.len());
                for item in &items {
                    let ids = token_ids(item, vocab_size)
                        .ok_or_else(|| invalid(&Value::Array(items.clone())))??;
                    prompts.push(Prompt::from(ids));
                }
                return Ok(prompts);
            }
            Err(invalid(&Value::Array(items)))
        }
        other => Err(invalid(&other)),
    }
}

/// A JSON list of integers as token ids: None when it is not a list of
/// integers (a schema error), Some(Err) when an id cannot exist.
fn token_ids(v: &Value, vocab_size: usize) -> Option<Result<Vec<u32>, ApiError>> {
    let items = v.as_array()?;
    let mut ids = Vec::with_capacity(items.len());
    for item in items {
        let id = as_i64(item)?;
        match u32::try_from(id) {
            Ok(id) => ids.push(id),
            Err(_) => {
                return Some(Err(ApiError::bad_request(format!(
                    "Token id {id} is out of vocabulary (the model has {vocab_size} tokens)"
                ))))
            }
        }
    }
    Some(Ok(ids))
}

/// Tokenizes a request's prompts on the worker pool, in input order.
pub async fn tokenize_prompts(
    state: &AppState,
    request: PromptRequest,
    common: &CommonFields,
) -> Result<Vec<TokenizedPrompt>, ApiError> {
    let opts = common.tokenize_options(request.add_special_tokens);
    // Checked once up front so a bad value fails before any tokenization.
    state.engine.processor().truncation_len(&opts)?;
    match request.input {
        PromptInput::Completion(prompts) => {
            state
                .tokenizers
                .tokenize_all(&state.engine, prompts, move |engine, prompt| {
                    engine.processor().process(&prompt, &opts)
                })
                .await
        }
        PromptInput::Chat(chat) => {
            // Images and videos are fetched and decoded on the media threads, so
            // a slow image host never holds a tokenizer thread that text requests
            // need; the work stops when the client goes (this future is dropped).
            let (pool, mut opts) = match (&state.media, has_media(&chat.messages)) {
                (Some(media), true) => (media, opts),
                _ => (&state.tokenizers, opts),
            };
            let cancel = Arc::new(AtomicBool::new(false));
            let _cancel_on_drop = CancelOnDrop(cancel.clone());
            opts.cancel = Some(cancel);
            pool.tokenize_all(&state.engine, vec![chat], move |engine, chat| {
                let template = request_template(engine, &chat)?;
                engine.processor().process_chat(
                    &chat.messages,
                    &chat.options,
                    template.as_ref(),
                    &opts,
                )
            })
            .await
        }
    }
}

/// Does the conversation carry images or videos? A malformed media part
/// counts: its error is reported where media is processed.
fn has_media(messages: &[ChatMessage]) -> bool {
    media_parts(messages).map_or(true, |parts| !parts.is_empty())
}

/// The request's own chat template, compiled, if it brought one.
fn request_template(
    engine: &verdict_engine::Engine,
    chat: &ChatInput,
) -> verdict_engine::Result<Option<ChatTemplate>> {
    chat.template
        .as_deref()
        .map(|source| {
            engine
                .processor()
                .tokenizer()
                .compile_chat_template(source)
                .map_err(|e| EngineError::validation(e.to_string()))
        })
        .transpose()
}

/// Renders a conversation with the request's template if it brought one, else the model's.
pub fn render_chat(
    engine: &verdict_engine::Engine,
    chat: &ChatInput,
) -> verdict_engine::Result<String> {
    let template = request_template(engine, chat)?;
    engine
        .processor()
        .render_chat_with(&chat.messages, &chat.options, template.as_ref())
}

/// Runs tokenized prompts through the engine with the request's activation,
/// STEP parameters and priority.
pub async fn run_prompts(
    state: &AppState,
    prompts: Vec<TokenizedPrompt>,
    common: &CommonFields,
    selection: &Selection,
) -> Result<Vec<SequenceOutput>, ApiError> {
    admit(&state.engine, state.config.max_queue_wait)?;
    let use_activation = common
        .use_activation
        .unwrap_or(state.info.default_use_activation);
    let inputs = prompts
        .into_iter()
        .map(|p| {
            SequenceInput::new(p, use_activation)
                .with_step(common.step.clone())
                .with_lora(selection.lora.clone())
        })
        .collect();
    let outputs = run_sequences(&state.engine, &state.metrics, inputs, common.priority).await?;
    if selection.lora.is_some() {
        state
            .metrics
            .observe_lora(&selection.name, total_tokens(&outputs));
    }
    Ok(outputs)
}

/// vLLM's `{"object": "list", "data": [...], "usage": ...}` envelope of
/// `/classify`, `/pooling` and `/score` answers.
#[derive(Debug, Serialize)]
pub struct ListResponse<'a, T> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub data: Vec<T>,
    pub usage: Usage,
}

impl<'a, T> ListResponse<'a, T> {
    pub fn new(
        id: String,
        created: u64,
        model: &'a str,
        data: Vec<T>,
        prompt_tokens: usize,
    ) -> Self {
        ListResponse {
            id,
            object: "list",
            created,
            model,
            data,
            usage: Usage::new(prompt_tokens),
        }
    }
}

/// vLLM's `usage` block.
#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
    pub completion_tokens: usize,
    pub prompt_tokens_details: Option<()>,
}

impl Usage {
    pub fn new(prompt_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            total_tokens: prompt_tokens,
            completion_tokens: 0,
            prompt_tokens_details: None,
        }
    }
}

pub fn total_tokens(outputs: &[SequenceOutput]) -> usize {
    outputs.iter().map(|o| o.prompt_tokens).sum()
}

/// f32 values as JSON numbers (widened to f64, printed shortest round-trip);
/// NaN/Inf are refused as Starlette's JSON encoder refuses them.
pub fn json_floats(values: &[f32]) -> Result<Vec<f64>, ApiError> {
    values.iter().map(|&v| json_float(v)).collect()
}

pub fn json_float(v: f32) -> Result<f64, ApiError> {
    if v.is_finite() {
        Ok(f64::from(v))
    } else {
        Err(ApiError::bad_request(
            "Out of range float values are not JSON compliant",
        ))
    }
}

/// What a handler did, read by the logging middleware.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestOutcome {
    pub sequences: usize,
    pub prompt_tokens: usize,
}

/// A JSON 200 response carrying its outcome for the log line and metrics.
pub fn json_response<T: Serialize>(body: &T, outcome: RequestOutcome) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut response = (
                StatusCode::OK,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                bytes,
            )
                .into_response();
            response.extensions_mut().insert(outcome);
            response
        }
        Err(e) => ApiError::internal(format!("serialising the response: {e}")).into_response(),
    }
}

/// Rejects reserved keys in scoring's `chat_template_kwargs`.
pub fn check_score_template_kwargs(kwargs: &Map<String, Value>) -> Result<(), ApiError> {
    for reserved in ["chat_template", "tools", "tokenize"] {
        if kwargs.contains_key(reserved) {
            return Err(ApiError::bad_request(format!(
                "`{reserved}` is a reserved key of chat_template_kwargs and cannot be set by the request."
            )));
        }
    }
    Ok(())
}
