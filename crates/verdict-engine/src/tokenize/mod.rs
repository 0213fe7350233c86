//! Tokenization: the tokenizer with padding and truncation switched off (we
//! truncate ourselves, the way vLLM does), pair encoding for cross-encoders,
//! and chat templates.

mod chat;

pub use chat::{media_parts, ChatMessage, ChatOptions, ChatTemplate, MediaRef};

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use tokenizers::{Encoding, PostProcessor, Tokenizer, TruncationDirection};

use crate::error::{EngineError, Result};
use crate::multimodal::VisualInput;

/// Which end of a prompt truncation removes tokens from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TruncationSide {
    /// Keep the first N tokens.
    #[default]
    Right,
    /// Keep the last N tokens.
    Left,
}

impl TruncationSide {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "right" => Some(TruncationSide::Right),
            "left" => Some(TruncationSide::Left),
            _ => None,
        }
    }
}

/// One tokenized prompt.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenizedPrompt {
    pub ids: Vec<u32>,
    /// Token types when the tokenizer produces a second segment (pairs).
    pub token_type_ids: Option<Vec<u32>>,
    /// Images and videos whose placeholder tokens are in `ids`, in order.
    pub visuals: Vec<Arc<VisualInput>>,
}

impl From<Vec<u32>> for TokenizedPrompt {
    fn from(ids: Vec<u32>) -> Self {
        TokenizedPrompt {
            ids,
            ..Default::default()
        }
    }
}

/// A model's tokenizer plus what its `tokenizer_config.json` says.
pub struct TextTokenizer {
    inner: Tokenizer,
    chat_template: Option<ChatTemplate>,
    truncation_side: TruncationSide,
    model_max_length: Option<usize>,
    do_lower_case: bool,
    max_chars_per_token: usize,
    /// Does encoding a second segment give it token type 1 (BERT-style)?
    pair_has_type_ids: bool,
    /// Passed to chat templates compiled later (a request's own template).
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (padding and truncation switched off) and the
    /// settings next to it. `chat_template_override` replaces the tokenizer's template.
    pub fn load(dir: &Path, chat_template_override: Option<&str>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(EngineError::NotFound(format!(
                "{} not found (verdict needs a fast tokenizer file)",
                path.display()
            )));
        }
        let mut inner = Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("loading {}: {e}", path.display())))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;

        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json(&dir.join("special_tokens_map.json"))?;
        let special = |key: &str| -> Option<String> {
            let pick = |v: &Value| match v {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
                _ => None,
            };
            config
                .get(key)
                .and_then(pick)
                .or_else(|| special_map.get(key).and_then(pick))
        };
        let truncation_side = config
            .get("truncation_side")
            .and_then(Value::as_str)
            .and_then(TruncationSide::parse)
            .unwrap_or_default();
        // transformers uses a huge sentinel for "no limit".
        let model_max_length = config
            .get("model_max_length")
            .and_then(Value::as_f64)
            .filter(|v| *v > 0.0 && *v < 1e12)
            .map(|v| v as usize);

        let template_source = match chat_template_override {
            Some(t) => Some(t.to_string()),
            // As transformers: a separate chat_template.jinja wins over
            // tokenizer_config.json; chat_template.json is the processor's
            // (multimodal checkpoints), whose template places the vision tokens.
            None => std::fs::read_to_string(dir.join("chat_template.jinja"))
                .ok()
                .or_else(|| template_from_config(&read_json(&dir.join("chat_template.json")).ok()?))
                .or_else(|| template_from_config(&config)),
        };
        let chat_template = template_source
            .map(|src| ChatTemplate::new(&src, special("bos_token"), special("eos_token")))
            .transpose()?;

        let max_chars_per_token = inner
            .get_vocab(true)
            .keys()
            .map(|t| t.chars().count())
            .max()
            .unwrap_or(1)
            .max(1);
        let pair_has_type_ids = inner
            .encode_fast(("a", "b"), true)
            .map(|e| e.get_type_ids().iter().any(|&t| t != 0))
            .unwrap_or(false);

        Ok(TextTokenizer {
            inner,
            chat_template,
            truncation_side,
            model_max_length,
            // Only sentence-transformers configs ask us to lowercase; BERT's
            // own normalizer already does it inside tokenizer.json.
            do_lower_case: false,
            max_chars_per_token,
            pair_has_type_ids,
            bos_token: special("bos_token"),
            eos_token: special("eos_token"),
        })
    }

    /// Pairs are encoded without token types (for models that have none).
    pub fn ignore_pair_type_ids(&mut self) {
        self.pair_has_type_ids = false;
    }

    pub fn set_do_lower_case(&mut self, on: bool) {
        self.do_lower_case = on;
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Compiles another template (e.g. a request's `chat_template`) with this tokenizer's special tokens.
    pub fn compile_chat_template(&self, source: &str) -> Result<ChatTemplate> {
        ChatTemplate::new(source, self.bos_token.clone(), self.eos_token.clone())
    }

    pub fn default_truncation_side(&self) -> TruncationSide {
        self.truncation_side
    }

    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    pub fn max_chars_per_token(&self) -> usize {
        self.max_chars_per_token
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of special tokens the post-processor adds around one text (or a pair).
    pub fn num_special_tokens(&self, pair: bool) -> usize {
        self.inner
            .get_post_processor()
            .map(|p| p.added_tokens(pair))
            .unwrap_or(0)
    }

    fn prepare<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        if self.do_lower_case {
            text.to_lowercase().into()
        } else {
            text.into()
        }
    }

    fn raw_encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoding> {
        self.inner
            .encode_fast(self.prepare(text).as_ref(), add_special_tokens)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Tokenizes one text. `max_tokens` truncates like transformers
    /// (`truncation=True, max_length=N`): on the right the special tokens are
    /// kept and content is cut; on the left the full encoding is sliced.
    pub fn encode(
        &self,
        text: &str,
        add_special_tokens: bool,
        max_tokens: Option<usize>,
        side: TruncationSide,
    ) -> Result<TokenizedPrompt> {
        let enc = match (max_tokens, side) {
            (Some(max), TruncationSide::Right) if add_special_tokens => {
                let mut content = self.raw_encode(text, false)?;
                let specials = self.num_special_tokens(false);
                if content.len() + specials > max {
                    content.truncate(max.saturating_sub(specials), 0, TruncationDirection::Right);
                }
                let mut enc = self
                    .inner
                    .post_process(content, None, true)
                    .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
                if enc.len() > max {
                    enc.truncate(max, 0, TruncationDirection::Right);
                }
                enc
            }
            (Some(max), side) => {
                let mut enc = self.raw_encode(text, add_special_tokens)?;
                if enc.len() > max {
                    let dir = match side {
                        TruncationSide::Right => TruncationDirection::Right,
                        TruncationSide::Left => TruncationDirection::Left,
                    };
                    enc.truncate(max, 0, dir);
                }
                enc
            }
            (None, _) => self.raw_encode(text, add_special_tokens)?,
        };
        Ok(self.to_prompt(&enc))
    }

    /// Encodes a (query, document) pair the way transformers does
    /// `tokenizer(a, text_pair=b)`, truncating `longest_first` to `max_tokens`.
    pub fn encode_pair(
        &self,
        first: &str,
        second: &str,
        max_tokens: Option<usize>,
    ) -> Result<TokenizedPrompt> {
        let mut a = self.raw_encode(first, false)?;
        let mut b = self.raw_encode(second, false)?;
        if let Some(max) = max_tokens {
            let budget = max.saturating_sub(self.num_special_tokens(true));
            let (mut la, mut lb) = (a.len(), b.len());
            while la + lb > budget {
                if la > lb {
                    la -= 1;
                } else {
                    lb -= 1;
                }
            }
            if la < a.len() {
                a.truncate(la, 0, TruncationDirection::Right);
            }
            if lb < b.len() {
                b.truncate(lb, 0, TruncationDirection::Right);
            }
        }
        let enc = self
            .inner
            .post_process(a, Some(b), true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(self.to_prompt(&enc))
    }

    /// Cuts `text` after its first `max_tokens` content tokens (by character offsets),
    /// as vLLM's `max_tokens_per_query` / `max_tokens_per_doc` do.
    pub fn truncate_text(&self, text: &str, max_tokens: usize) -> Result<String> {
        let prepared = self.prepare(text);
        let enc = self
            .inner
            .encode(prepared.as_ref(), false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        if enc.len() <= max_tokens {
            return Ok(text.to_string());
        }
        if max_tokens == 0 {
            return Ok(String::new());
        }
        let end = enc.get_offsets()[max_tokens - 1].1;
        Ok(prepared.get(..end).unwrap_or(prepared.as_ref()).to_string())
    }

    fn to_prompt(&self, enc: &Encoding) -> TokenizedPrompt {
        let types = enc.get_type_ids();
        let has_types = self.pair_has_type_ids && types.iter().any(|&t| t != 0);
        TokenizedPrompt {
            ids: enc.get_ids().to_vec(),
            token_type_ids: has_types.then(|| types.to_vec()),
            visuals: Vec::new(),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::validation(format!("cannot decode token ids: {e}")))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

fn read_json(path: &Path) -> Result<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            EngineError::Tokenizer(format!("{} is not valid JSON: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Value::Object(Default::default())),
        Err(e) => Err(EngineError::io_path("reading", path, e)),
    }
}

/// `chat_template` may be a string or a list of named templates.
fn template_from_config(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => {
            let named = |name: &str| {
                items.iter().find_map(|it| {
                    (it.get("name")?.as_str()? == name)
                        .then(|| it.get("template")?.as_str().map(str::to_owned))
                        .flatten()
                })
            };
            named("default").or_else(|| {
                items
                    .first()
                    .and_then(|it| it.get("template")?.as_str().map(str::to_owned))
            })
        }
        _ => None,
    }
}
