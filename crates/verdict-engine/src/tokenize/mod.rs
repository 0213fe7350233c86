//! Tokenization: the tokenizer with padding and truncation switched off (we
//! truncate ourselves, the way vLLM does), pair encoding for cross-encoders,
//! and chat templates.

mod chat;

pub use chat::{media_parts, ChatMessage, ChatOptions, ChatTemplate, MediaRef};

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use tokenizers::{Encoding, ModelWrapper, PostProcessor, Tokenizer, TruncationDirection};

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
    /// May a (right truncation) window end inside a word? Not for WordPiece: a word
    /// longer than its `max_input_chars_per_word` is one [UNK], so a word cut short
    /// tokenizes differently. BPE merges a word from its start, so its head's tokens
    /// hold, and a giant word is what the cut keeps from being tokenized whole.
    cuts_inside_words: bool,
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

        let cuts_inside_words = !matches!(inner.get_model(), ModelWrapper::WordPiece(_));
        Ok(TextTokenizer {
            inner,
            cuts_inside_words,
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
    /// kept and content is cut; on the left the full encoding is sliced. Only
    /// a window of the text large enough for the kept tokens is tokenized (see
    /// [`Self::head_encoding`]), so a huge text costs what its kept part does.
    pub fn encode(
        &self,
        text: &str,
        add_special_tokens: bool,
        max_tokens: Option<usize>,
        side: TruncationSide,
    ) -> Result<TokenizedPrompt> {
        let enc = match (max_tokens, side) {
            (Some(max), TruncationSide::Right) => {
                let (mut content, _) =
                    self.head_encoding(text, max, |t| self.raw_encode(t, false))?;
                if !add_special_tokens {
                    if content.len() > max {
                        content.truncate(max, 0, TruncationDirection::Right);
                    }
                    return Ok(self.to_prompt(&content));
                }
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
            (Some(max), TruncationSide::Left) => {
                let mut enc = self.tail_encoding(text, max, add_special_tokens)?;
                if enc.len() > max {
                    enc.truncate(max, 0, TruncationDirection::Left);
                }
                enc
            }
            (None, _) => self.raw_encode(text, add_special_tokens)?,
        };
        Ok(self.to_prompt(&enc))
    }

    /// The content tokens (no special tokens, as `encode` makes them), and
    /// the prefix's length in bytes, of a prefix of `text` whose first `need` tokens are the full text's first
    /// `need` tokens: the prefix is cut at a whitespace run where there is one
    /// near the window's end, and trusted only when it yields
    /// [`WINDOW_SLACK_TOKENS`] more tokens than needed, so the tokens a cut can
    /// change are never kept. The window doubles until that holds or covers the text.
    fn head_encoding(
        &self,
        text: &str,
        need: usize,
        encode: impl Fn(&str) -> Result<Encoding>,
    ) -> Result<(Encoding, usize)> {
        let want = need.saturating_add(WINDOW_SLACK_TOKENS);
        let mut chars = want.saturating_mul(WINDOW_CHARS_PER_TOKEN);
        loop {
            let Some(cut) = head_cut(text, chars, self.cuts_inside_words) else {
                return Ok((encode(text)?, text.len()));
            };
            let enc = encode(&text[..cut])?;
            if enc.len() >= want {
                return Ok((enc, cut));
            }
            chars = chars.saturating_mul(2);
        }
    }

    /// As [`Self::head_encoding`] from the other end, for left truncation:
    /// the encoding (with special tokens when asked) of a suffix of `text`
    /// whose last `need` tokens are the full encoding's last `need`.
    fn tail_encoding(&self, text: &str, need: usize, add_special_tokens: bool) -> Result<Encoding> {
        let specials = if add_special_tokens {
            self.num_special_tokens(false)
        } else {
            0
        };
        let want = need.saturating_add(WINDOW_SLACK_TOKENS);
        let mut chars = want.saturating_mul(WINDOW_CHARS_PER_TOKEN);
        loop {
            let Some(start) = tail_cut(text, chars) else {
                return self.raw_encode(text, add_special_tokens);
            };
            let enc = self.raw_encode(&text[start..], add_special_tokens)?;
            if enc.len() >= want.saturating_add(specials) {
                return Ok(enc);
            }
            chars = chars.saturating_mul(2);
        }
    }

    /// Encodes a (query, document) pair the way transformers does
    /// `tokenizer(a, text_pair=b)`, truncating `longest_first` to `max_tokens`.
    /// The outcome of `longest_first` depends on each side's length only up to
    /// the budget, so each side is tokenized only that far.
    pub fn encode_pair(
        &self,
        first: &str,
        second: &str,
        max_tokens: Option<usize>,
    ) -> Result<TokenizedPrompt> {
        let (mut a, mut b) = match max_tokens {
            Some(max) => {
                let budget = max.saturating_sub(self.num_special_tokens(true));
                let side = |t: &str| {
                    self.head_encoding(t, budget, |w| self.raw_encode(w, false))
                        .map(|(enc, _)| enc)
                };
                (side(first)?, side(second)?)
            }
            None => (
                self.raw_encode(first, false)?,
                self.raw_encode(second, false)?,
            ),
        };
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
        let (enc, window) = self.head_encoding(text, max_tokens.saturating_add(1), |w| {
            self.inner
                .encode(self.prepare(w).as_ref(), false)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))
        })?;
        if enc.len() <= max_tokens {
            return Ok(text.to_string());
        }
        if max_tokens == 0 {
            return Ok(String::new());
        }
        let end = enc.get_offsets()[max_tokens - 1].1;
        // The offsets are into the prepared (lower-cased) window.
        let prepared = self.prepare(&text[..window]);
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

/// Tokens past the kept ones a partial encoding must reach before it is
/// trusted: cutting a text changes at most the tokens beside the cut.
const WINDOW_SLACK_TOKENS: usize = 16;
/// First guess at characters per token for the window (doubled as needed).
const WINDOW_CHARS_PER_TOKEN: usize = 8;

/// Whitespace that separates words for every tokenizer. Not all of Unicode's:
/// BERT's normalizer deletes control characters such as form feed, which joins
/// the words on either side of them.
fn is_word_separator(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// Byte index to cut `text` at so that the head keeps at most `chars`
/// characters; None when the whole text fits. The cut goes where tokenizers
/// split words anyway, so the head's tokens are the full text's: before the
/// last separator run in the window's second half, else before its last
/// ASCII punctuation run, else (one giant word) mid-word where `inside_words`
/// allows it (the slack tokens absorb the difference), or at 0 (an empty head:
/// the caller grows the window) where it does not.
fn head_cut(text: &str, chars: usize, inside_words: bool) -> Option<usize> {
    let (end, _) = text.char_indices().nth(chars)?;
    // Half the bytes may fall inside a multi-byte character: step back to its start.
    let floor = (0..=end / 2)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let half: Vec<(usize, char)> = text[floor..end]
        .char_indices()
        .map(|(i, c)| (floor + i, c))
        .collect();
    let run_starts = |is_run: fn(char) -> bool| {
        let mut prev: Option<char> = None;
        let mut last = None;
        for &(i, c) in &half {
            if is_run(c) && !prev.is_some_and(is_run) {
                last = Some(i);
            }
            prev = Some(c);
        }
        last
    };
    let cut = run_starts(is_word_separator)
        .or_else(|| run_starts(|c| c.is_ascii_punctuation()))
        .filter(|&i| i > 0)
        .unwrap_or(if inside_words { end } else { 0 });
    Some(cut)
}

/// Byte index where a tail of at most `chars` characters of `text` starts;
/// None when the whole text fits. As [`head_cut`], at the first separator run
/// (else ASCII punctuation run) in the window's first half, but never inside a word.
fn tail_cut(text: &str, chars: usize) -> Option<usize> {
    let (start, _) = text.char_indices().rev().nth(chars.checked_sub(1)?)?;
    if start == 0 {
        return None;
    }
    let limit = start + (text.len() - start) / 2;
    let mut prev = text[..start].chars().next_back();
    let mut whitespace = None;
    let mut punctuation = None;
    for (i, c) in text[start..].char_indices().map(|(i, c)| (start + i, c)) {
        if i > limit {
            break;
        }
        if whitespace.is_none() && is_word_separator(c) && !prev.is_some_and(is_word_separator) {
            whitespace = Some(i);
            break;
        }
        if punctuation.is_none()
            && c.is_ascii_punctuation()
            && !prev.is_some_and(|p| p.is_ascii_punctuation())
        {
            punctuation = Some(i);
        }
        prev = Some(c);
    }
    // Never inside a word: BPE merges a run of repeated symbols pairwise from the
    // word's start, so a word's last tokens depend on where it starts. Without a
    // word boundary an empty tail (`text.len()`) makes the caller grow the window.
    Some(whitespace.or(punctuation).unwrap_or(text.len()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizers() -> Vec<(&'static str, TextTokenizer)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizers");
        ["bert", "gpt2", "qwen3", "roberta"]
            .into_iter()
            .map(|name| (name, TextTokenizer::load(&dir.join(name), None).unwrap()))
            .collect()
    }

    /// Deterministic text mixing words, numbers, punctuation runs, whitespace
    /// runs, accents, CJK and long unbroken words.
    fn mixed_text(seed: u64, words: usize) -> String {
        const PIECES: &[&str] = &[
            "the", "Quick", "brown", "fox", "jumps", "over", "lazy", "dog", "1234", "3.14",
            "naïve", "café", "e\u{301}t\u{e9}", "日本語のテキスト", "你好，世界。", "?!", "...",
            "---", "(x)", "don't", "URL:https://example.org/a?b=c", "\u{1F600}",
            "supercalifragilisticexpialidociousantidisestablishmentarianism",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ];
        const GAPS: &[&str] = &[" ", " ", " ", "  ", "\n", "\t", "", " \n\n "];
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize % n
        };
        let mut out = String::new();
        for _ in 0..words {
            out.push_str(PIECES[next(PIECES.len())]);
            out.push_str(GAPS[next(GAPS.len())]);
        }
        out
    }

    /// Truncation as defined: everything tokenized, then cut.
    fn reference(
        tokenizer: &TextTokenizer,
        text: &str,
        specials: bool,
        max: usize,
        side: TruncationSide,
    ) -> Vec<u32> {
        let inner = tokenizer.inner();
        match (side, specials) {
            (TruncationSide::Right, true) => {
                let mut content = inner.encode_fast(text, false).unwrap();
                let budget = max.saturating_sub(tokenizer.num_special_tokens(false));
                if content.len() > budget {
                    content.truncate(budget, 0, TruncationDirection::Right);
                }
                let mut ids = inner
                    .post_process(content, None, true)
                    .unwrap()
                    .get_ids()
                    .to_vec();
                ids.truncate(max);
                ids
            }
            (TruncationSide::Right, false) => {
                let mut ids = inner.encode_fast(text, false).unwrap().get_ids().to_vec();
                ids.truncate(max);
                ids
            }
            (TruncationSide::Left, _) => {
                let ids = inner
                    .encode_fast(text, specials)
                    .unwrap()
                    .get_ids()
                    .to_vec();
                ids[ids.len().saturating_sub(max)..].to_vec()
            }
        }
    }

    #[test]
    fn windowed_truncation_equals_tokenizing_everything() {
        for (name, tokenizer) in fixture_tokenizers() {
            for seed in 0..12u64 {
                let text = mixed_text(seed, 40 + 90 * seed as usize);
                for max in [1, 2, 7, 31, 128, 400] {
                    for side in [TruncationSide::Right, TruncationSide::Left] {
                        for specials in [false, true] {
                            let got = tokenizer.encode(&text, specials, Some(max), side).unwrap();
                            let want = reference(&tokenizer, &text, specials, max, side);
                            assert_eq!(
                                got.ids, want,
                                "{name} seed {seed} max {max} {side:?} specials {specials}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Found by the tokenize_truncation fuzz target. BERT's normalizer deletes form
    /// feeds and NULs, so words either side of them are one word, and a word over
    /// 100 characters is one [UNK]; a window cut at the form feed, or inside the
    /// giant word, tokenized the word's head as pieces instead. And byte-level BPE
    /// merges a run of one repeated symbol pairwise from its start, so a tail
    /// window starting inside the run ended in different tokens.
    #[test]
    fn windows_never_split_a_wordpiece_word() {
        let giant = "a".repeat(68) + "\u{6}\u{c}" + &"a".repeat(88);
        let texts = [
            format!("\u{1}\0\0{}{giant} tail words here", "\u{fffd}".repeat(28)),
            format!("{} {}", "b".repeat(150), "word ".repeat(40)),
            format!("{giant} {giant}"),
            // The second fuzz input: one long run of a repeated 3-byte symbol, left-truncated.
            format!("{}\0", "\u{fffd}".repeat(150)),
        ];
        for (name, tokenizer) in fixture_tokenizers() {
            for text in &texts {
                for max in [3, 12, 40] {
                    for side in [TruncationSide::Right, TruncationSide::Left] {
                        for specials in [false, true] {
                            let got = tokenizer.encode(text, specials, Some(max), side).unwrap();
                            let want = reference(&tokenizer, text, specials, max, side);
                            assert_eq!(got.ids, want, "{name} max {max} {side:?} {text:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn pairs_and_text_cuts_tokenize_only_a_window_and_agree() {
        for (name, tokenizer) in fixture_tokenizers() {
            let a = mixed_text(3, 300);
            let b = mixed_text(4, 500);
            for max in [8, 64, 300] {
                let got = tokenizer.encode_pair(&a, &b, Some(max)).unwrap();
                let (mut ea, mut eb) = (
                    tokenizer.inner().encode_fast(a.as_str(), false).unwrap(),
                    tokenizer.inner().encode_fast(b.as_str(), false).unwrap(),
                );
                let budget = max - tokenizer.num_special_tokens(true);
                let (mut la, mut lb) = (ea.len(), eb.len());
                while la + lb > budget {
                    if la > lb {
                        la -= 1;
                    } else {
                        lb -= 1;
                    }
                }
                ea.truncate(la, 0, TruncationDirection::Right);
                eb.truncate(lb, 0, TruncationDirection::Right);
                let want = tokenizer.inner().post_process(ea, Some(eb), true).unwrap();
                assert_eq!(got.ids, want.get_ids(), "{name} pair max {max}");
            }
            for n in [1, 10, 100] {
                let cut = tokenizer.truncate_text(&b, n).unwrap();
                let enc = tokenizer.inner().encode(b.as_str(), false).unwrap();
                let end = enc.get_offsets()[n - 1].1;
                assert_eq!(cut, b[..end], "{name} truncate_text {n}");
            }
        }
    }

    #[test]
    fn a_huge_text_costs_only_its_kept_tokens() {
        // 8 MB: tokenizing all of it takes seconds and gigabytes.
        let huge = mixed_text(7, 20_000).repeat(64);
        assert!(huge.len() > 8 << 20);
        for (name, tokenizer) in fixture_tokenizers() {
            let started = std::time::Instant::now();
            for side in [TruncationSide::Right, TruncationSide::Left] {
                let got = tokenizer.encode(&huge, true, Some(512), side).unwrap();
                assert_eq!(got.ids.len(), 512, "{name}");
            }
            let took = started.elapsed();
            assert!(took < std::time::Duration::from_secs(2), "{name}: {took:?}");
        }
    }
}
