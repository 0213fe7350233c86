//! Truncated tokenization (which tokenizes only a window of the text) against
//! tokenizing everything and truncating after, on the four fixture tokenizers
//! (WordPiece, GPT-2 and RoBERTa byte-level BPE, Qwen3 BPE). Input: one byte
//! picking tokenizer, side and special tokens, one byte for the token count,
//! then the text.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use verdict_engine::tokenize::TextTokenizer;
use verdict_engine::TruncationSide;

fn tokenizers() -> &'static [TextTokenizer] {
    static TOKENIZERS: OnceLock<Vec<TextTokenizer>> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tokenizers");
        ["bert", "gpt2", "qwen3", "roberta"]
            .iter()
            .map(|name| TextTokenizer::load(&dir.join(name), None).expect("fixture tokenizer"))
            .collect()
    })
}

/// What truncation means: the whole text tokenized, then cut.
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
            let mut content = inner.encode_fast(text, false).expect("encode");
            let budget = max.saturating_sub(tokenizer.num_special_tokens(false));
            if content.len() > budget {
                content.truncate(budget, 0, tokenizers::TruncationDirection::Right);
            }
            let mut ids = inner
                .post_process(content, None, true)
                .expect("post-process")
                .get_ids()
                .to_vec();
            ids.truncate(max);
            ids
        }
        (TruncationSide::Right, false) => {
            let mut ids = inner
                .encode_fast(text, false)
                .expect("encode")
                .get_ids()
                .to_vec();
            ids.truncate(max);
            ids
        }
        (TruncationSide::Left, _) => {
            let ids = inner
                .encode_fast(text, specials)
                .expect("encode")
                .get_ids()
                .to_vec();
            ids[ids.len().saturating_sub(max)..].to_vec()
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [mode, count, rest @ ..] = data else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let tokenizer = &tokenizers()[usize::from(mode & 3)];
    let side = if mode & 4 == 0 {
        TruncationSide::Right
    } else {
        TruncationSide::Left
    };
    let specials = mode & 8 != 0;
    let max = usize::from(count % 64) + 1;
    let got = tokenizer
        .encode(&text, specials, Some(max), side)
        .expect("encode")
        .ids;
    let want = reference(tokenizer, &text, specials, max, side);
    assert_eq!(got, want, "mode {mode} max {max} text {text:?}");
});
