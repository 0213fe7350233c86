//! Turning prompts into validated token sequences: truncation, length and
//! emptiness rules, vocabulary checks, chat templates and cross-encoder pairs.
//! The messages follow vLLM's so clients see the same errors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::engine::ModelInfo;
use crate::error::{EngineError, Result};
use crate::multimodal::{fetch_all, Modality};
use crate::tokenize::{
    media_parts, ChatMessage, ChatOptions, ChatTemplate, TextTokenizer, TokenizedPrompt,
    TruncationSide,
};

/// One prompt as a caller gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens {
        ids: Vec<u32>,
        token_type_ids: Option<Vec<u32>>,
    },
    Chat {
        messages: Vec<ChatMessage>,
        options: ChatOptions,
    },
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.to_string())
    }
}

impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}

impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Prompt::Tokens {
            ids,
            token_type_ids: None,
        }
    }
}

impl PartialEq for ChatOptions {
    fn eq(&self, other: &Self) -> bool {
        self.add_generation_prompt == other.add_generation_prompt
            && self.continue_final_message == other.continue_final_message
            && self.template_kwargs == other.template_kwargs
    }
}

/// Per-request tokenization settings (vLLM's `tokenization_kwargs` and request fields).
#[derive(Debug, Clone, Default)]
pub struct TokenizeOptions {
    /// Keep this many tokens; -1 means max_model_len.
    pub truncate_prompt_tokens: Option<i64>,
    pub truncation_side: Option<TruncationSide>,
    /// Defaults to true for text and false for chat prompts (the template adds them).
    pub add_special_tokens: Option<bool>,
    /// Multimodal models: overrides of the image/video processor's settings
    /// for this request (vLLM's `mm_processor_kwargs`).
    pub mm_processor_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Set when the request is abandoned (its client left): media fetching and
    /// decoding stop at the next check.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// Tokenizes and validates prompts for one model.
#[derive(Clone)]
pub struct InputProcessor {
    tokenizer: Arc<TextTokenizer>,
    info: Arc<ModelInfo>,
}

impl InputProcessor {
    pub fn new(tokenizer: Arc<TextTokenizer>, info: Arc<ModelInfo>) -> Self {
        InputProcessor { tokenizer, info }
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The truncation length a request asks for, checked against max_model_len.
    pub fn truncation_len(&self, opts: &TokenizeOptions) -> Result<Option<usize>> {
        let max = self.info.max_model_len;
        match opts.truncate_prompt_tokens {
            None => Ok(None),
            Some(-1) => Ok(Some(max)),
            Some(n) if n < -1 => Err(EngineError::validation_param(
                format!("truncate_prompt_tokens must be an integer >= -1, got {n}"),
                "truncate_prompt_tokens",
            )),
            Some(n) if n as u64 > max as u64 => Err(EngineError::validation(
                "truncate_prompt_tokens value is greater than max_model_len. Please request a smaller truncation size.",
            )),
            Some(n) => Ok(Some(n as usize)),
        }
    }

    /// Tokenizes one prompt and validates the result.
    pub fn process(&self, prompt: &Prompt, opts: &TokenizeOptions) -> Result<TokenizedPrompt> {
        let trunc = self.truncation_len(opts)?;
        let side = opts
            .truncation_side
            .unwrap_or_else(|| self.tokenizer.default_truncation_side());
        let tokenized = match prompt {
            Prompt::Text(text) => {
                self.encode_text(text, opts.add_special_tokens.unwrap_or(true), trunc, side)?
            }
            Prompt::Chat { messages, options } => {
                return self.process_chat(messages, options, None, opts);
            }
            Prompt::Tokens {
                ids,
                token_type_ids,
            } => {
                if let Some(tt) = token_type_ids {
                    if tt.len() != ids.len() {
                        return Err(EngineError::validation(format!(
                            "token_type_ids has {} entries but prompt_token_ids has {}",
                            tt.len(),
                            ids.len()
                        )));
                    }
                }
                let (ids, types) = match trunc {
                    Some(n) if ids.len() > n => {
                        let start = match side {
                            TruncationSide::Right => 0,
                            TruncationSide::Left => ids.len() - n,
                        };
                        (
                            ids[start..start + n].to_vec(),
                            token_type_ids
                                .as_ref()
                                .map(|t| t[start..start + n].to_vec()),
                        )
                    }
                    _ => (ids.clone(), token_type_ids.clone()),
                };
                TokenizedPrompt {
                    ids,
                    token_type_ids: types,
                    visuals: Vec::new(),
                }
            }
        };
        let tokenized = self.drop_unused_token_types(tokenized);
        self.validate(&tokenized)?;
        Ok(tokenized)
    }

    /// A model without a token-type table (decoders, `type_vocab_size` 0)
    /// ignores the tokenizer's pair type ids, as transformers and vLLM do.
    fn drop_unused_token_types(&self, mut p: TokenizedPrompt) -> TokenizedPrompt {
        if self.info.type_vocab_size == 0 {
            p.token_type_ids = None;
        }
        p
    }

    /// Renders a conversation with the model's (or `--chat-template`'s) template.
    pub fn render_chat(&self, messages: &[ChatMessage], options: &ChatOptions) -> Result<String> {
        self.render_chat_with(messages, options, None)
    }

    /// Renders with `template` when given (a request's own), else the model's.
    pub fn render_chat_with(
        &self,
        messages: &[ChatMessage],
        options: &ChatOptions,
        template: Option<&ChatTemplate>,
    ) -> Result<String> {
        let template = match template {
            Some(t) => t,
            None => self.tokenizer.chat_template().ok_or_else(|| {
                EngineError::validation(
                    "As of transformers v4.44, default chat template is no longer allowed, so you must provide \
                     a chat template if the tokenizer does not define one.",
                )
            })?,
        };
        if messages.is_empty() {
            return Err(EngineError::validation(
                "messages must contain at least one message",
            ));
        }
        template.render(messages, options, self.info.multimodal.is_some())
    }

    /// A conversation to tokens: rendered, tokenized, and for multimodal
    /// models with its images and videos fetched, preprocessed, and their
    /// placeholder tokens expanded to one per merged patch, as the Hugging Face
    /// processor does.
    pub fn process_chat(
        &self,
        messages: &[ChatMessage],
        options: &ChatOptions,
        template: Option<&ChatTemplate>,
        opts: &TokenizeOptions,
    ) -> Result<TokenizedPrompt> {
        let trunc = self.truncation_len(opts)?;
        let side = opts
            .truncation_side
            .unwrap_or_else(|| self.tokenizer.default_truncation_side());
        let text = self.render_chat_with(messages, options, template)?;
        let add_special = opts.add_special_tokens.unwrap_or(false);
        let media = match &self.info.multimodal {
            Some(_) => media_parts(messages)?,
            None => Vec::new(),
        };
        let (Some(mm), false) = (&self.info.multimodal, media.is_empty()) else {
            let tokenized = self.encode_text(&text, add_special, trunc, side)?;
            self.validate(&tokenized)?;
            return Ok(tokenized);
        };
        let images = media.iter().filter(|m| !m.is_video).count();
        let videos = media.len() - images;
        for (count, limit, name) in [
            (images, mm.limits.image, "image"),
            (videos, mm.limits.video, "video"),
        ] {
            if count > limit {
                return Err(EngineError::validation(format!(
                    "At most {limit} {name}(s) may be provided in one prompt."
                )));
            }
        }
        // The text's tokens bound the prompt from below: refuse a prompt that is
        // already too long before fetching anything, and never tokenize more of
        // it than can be kept.
        let cap = trunc.unwrap_or(self.info.max_model_len);
        let ids = self
            .tokenizer
            .encode(&text, add_special, Some(cap + 1), TruncationSide::Right)?
            .ids;
        if ids.len() > cap {
            return Err(match trunc {
                Some(n) => EngineError::validation_param(
                    format!(
                        "truncate_prompt_tokens={n} would cut into a prompt of more than {n} tokens \
                         that carries images or videos"
                    ),
                    "truncate_prompt_tokens",
                ),
                None => self.too_long(ids.len()),
            });
        }
        let processor = match &opts.mm_processor_kwargs {
            Some(kwargs) => std::borrow::Cow::Owned(mm.processor.with_request_kwargs(kwargs)?),
            None => std::borrow::Cow::Borrowed(mm.processor.as_ref()),
        };
        let urls: Vec<&str> = media.iter().map(|m| m.url.as_str()).collect();
        let fetched = fetch_all(&urls, &mm.policy, opts.cancel.as_ref())?;
        let mut budget = mm.policy.pixel_budget();
        let mut visuals = Vec::with_capacity(media.len());
        for (m, bytes) in media.iter().zip(fetched) {
            if opts
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(EngineError::validation("the request was cancelled"));
            }
            let visual = if m.is_video {
                processor.video_within(&bytes, &mut budget)?
            } else {
                processor.image_within(&bytes, &mut budget)?
            };
            visuals.push(Arc::new(visual));
        }
        let merge = mm.processor.merge_size();
        let mut expanded = Vec::with_capacity(ids.len());
        let mut next = visuals.iter();
        for id in ids {
            let placeholder = id == mm.image_token_id || id == mm.video_token_id;
            if !placeholder {
                expanded.push(id);
                continue;
            }
            let visual = next.next().ok_or_else(|| {
                EngineError::validation(
                    "the prompt has more image/video placeholders than images and videos",
                )
            })?;
            let want_video = id == mm.video_token_id;
            if want_video != (visual.modality == Modality::Video) {
                return Err(EngineError::validation(
                    "the chat template placed image and video placeholders in a different order than the inputs",
                ));
            }
            expanded.extend(std::iter::repeat_n(id, visual.num_tokens(merge)));
        }
        if next.next().is_some() {
            return Err(EngineError::validation(
                "the chat template has no placeholder for some images or videos",
            ));
        }
        if let Some(n) = trunc {
            if expanded.len() > n {
                return Err(EngineError::validation_param(
                    format!(
                        "truncate_prompt_tokens={n} would cut into the image or video tokens of a {}-token prompt",
                        expanded.len()
                    ),
                    "truncate_prompt_tokens",
                ));
            }
        }
        let tokenized = TokenizedPrompt {
            ids: expanded,
            token_type_ids: None,
            visuals,
        };
        self.validate(&tokenized)?;
        Ok(tokenized)
    }

    fn encode_text(
        &self,
        text: &str,
        add_special_tokens: bool,
        trunc: Option<usize>,
        side: TruncationSide,
    ) -> Result<TokenizedPrompt> {
        let max = self.info.max_model_len;
        match trunc {
            Some(n) => self
                .tokenizer
                .encode(text, add_special_tokens, Some(n), side),
            None => {
                let max_chars = max.saturating_mul(self.tokenizer.max_chars_per_token());
                let chars = text.chars().count();
                if chars > max_chars {
                    return Err(EngineError::validation(format!(
                        "This model's maximum context length is {max} tokens. However, you requested 0 output tokens \
                         and your prompt contains {chars} characters (more than {max_chars} characters, which is the \
                         upper bound for {max} input tokens). Please reduce the length of the input prompt or the \
                         number of requested output tokens."
                    )));
                }
                // Tokenize one past the limit: enough to detect overflow, cheap for huge texts.
                self.tokenizer.encode(
                    text,
                    add_special_tokens,
                    Some(max + 1),
                    TruncationSide::Right,
                )
            }
        }
    }

    /// vLLM's error for a prompt of `n` > max_model_len tokens ("at least" when
    /// tokenizing stopped one past the limit).
    fn too_long(&self, n: usize) -> EngineError {
        let max = self.info.max_model_len;
        let at_least = if n == max + 1 { "at least " } else { "" };
        EngineError::validation_param(
            format!(
                "This model's maximum context length is {max} tokens. However, you requested 0 output tokens \
                 and your prompt contains {at_least}{n} input tokens, for a total of {at_least}{n} tokens. \
                 Please reduce the length of the input prompt or the number of requested output tokens. \
                 (parameter=input_tokens, value={n})"
            ),
            "input_tokens",
        )
    }

    /// Length, emptiness and vocabulary checks on a tokenized prompt.
    pub fn validate(&self, p: &TokenizedPrompt) -> Result<()> {
        let max = self.info.max_model_len;
        let n = p.ids.len();
        if n == 0 {
            return Err(EngineError::validation(
                "The decoder prompt cannot be empty",
            ));
        }
        if n > max {
            return Err(self.too_long(n));
        }
        if let Some(&bad) = p
            .ids
            .iter()
            .max()
            .filter(|&&m| m as usize >= self.info.vocab_size)
        {
            return Err(EngineError::validation(format!(
                "Token id {bad} is out of vocabulary (the model has {} tokens)",
                self.info.vocab_size
            )));
        }
        if let Some(mm) = &self.info.multimodal {
            let placeholders = p
                .ids
                .iter()
                .filter(|&&id| id == mm.image_token_id || id == mm.video_token_id)
                .count();
            let merge = mm.processor.merge_size();
            let expected: usize = p.visuals.iter().map(|v| v.num_tokens(merge)).sum();
            if placeholders != expected {
                return Err(EngineError::validation(format!(
                    "the prompt has {placeholders} image/video placeholder tokens but its images and videos need {expected}"
                )));
            }
        }
        if let Some(tt) = &p.token_type_ids {
            let limit = self.info.type_vocab_size;
            if let Some(&bad) = tt.iter().max().filter(|&&m| m as usize >= limit.max(1)) {
                return Err(EngineError::validation(format!(
                    "token type id {bad} is out of range (the model has {limit} token types)"
                )));
            }
            if tt.windows(2).any(|w| w[0] > w[1]) {
                return Err(EngineError::validation(
                    "Token type ids are expected to be a sequence of zeros followed by a sequence of ones",
                ));
            }
        }
        Ok(())
    }

    /// A cross-encoder input: HF pair encoding, or plain concatenation for
    /// LLM-as-reranker models, or the `--chat-template` score template.
    pub fn process_pair(
        &self,
        query: &str,
        document: &str,
        opts: &TokenizeOptions,
        limits: &PairLimits,
    ) -> Result<TokenizedPrompt> {
        let trunc = self.truncation_len(opts)?;
        let query = match limits.max_tokens_per_query {
            0 => query.to_string(),
            n => self.tokenizer.truncate_text(query, n)?,
        };
        let document = match limits.max_tokens_per_doc {
            0 => document.to_string(),
            n => self.tokenizer.truncate_text(document, n)?,
        };
        let limit = trunc.unwrap_or(self.info.max_model_len + 1);
        let tokenized = if let Some(options) = &limits.score_template {
            let messages = vec![
                ChatMessage {
                    role: "query".into(),
                    content: serde_json::Value::String(query),
                    extra: Default::default(),
                },
                ChatMessage {
                    role: "document".into(),
                    content: serde_json::Value::String(document),
                    extra: Default::default(),
                },
            ];
            let text = self.render_chat(&messages, options)?;
            self.tokenizer
                .encode(&text, true, Some(limit), TruncationSide::Right)?
        } else if self.info.pair_concat {
            let text = format!("{query}{document}");
            self.tokenizer
                .encode(&text, true, Some(limit), TruncationSide::Right)?
        } else {
            self.tokenizer.encode_pair(&query, &document, Some(limit))?
        };
        let tokenized = self.drop_unused_token_types(tokenized);
        self.validate(&tokenized)?;
        Ok(tokenized)
    }
}

/// Scoring-specific settings.
#[derive(Debug, Clone, Default)]
pub struct PairLimits {
    pub max_tokens_per_query: usize,
    pub max_tokens_per_doc: usize,
    /// Render (query, document) through the chat template with these options.
    pub score_template: Option<ChatOptions>,
}
