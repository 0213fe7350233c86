//! Chat templates (Qwen3's and Qwen2.5-VL's) rendering hostile conversations:
//! the input is JSON, either a message list or
//! `{"messages": [...], "add_generation_prompt": b, "continue_final_message": b, "kwargs": {...}}`.
//! Rendering may refuse; it must not panic or hang. Rendered text is then
//! tokenized with truncation, as a chat request is.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use verdict_engine::tokenize::{media_parts, ChatMessage, ChatOptions, TextTokenizer};
use verdict_engine::TruncationSide;

fn tokenizers() -> &'static [(TextTokenizer, bool)] {
    static TOKENIZERS: OnceLock<Vec<(TextTokenizer, bool)>> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
        [
            (fixtures.join("tokenizers/qwen3"), false),
            (fixtures.join("models/qwen2_5_vl-cls"), true),
        ]
        .into_iter()
        .map(|(dir, multimodal)| {
            (
                TextTokenizer::load(&dir, None).expect("fixture tokenizer"),
                multimodal,
            )
        })
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let (messages, options) = match value {
        Value::Array(_) => (value, ChatOptions::default()),
        Value::Object(mut o) => {
            let flag = |o: &serde_json::Map<String, Value>, k: &str| {
                o.get(k).and_then(Value::as_bool).unwrap_or(false)
            };
            let options = ChatOptions {
                add_generation_prompt: flag(&o, "add_generation_prompt"),
                continue_final_message: flag(&o, "continue_final_message"),
                template_kwargs: match o.remove("kwargs") {
                    Some(Value::Object(k)) => k,
                    _ => Default::default(),
                },
            };
            (o.remove("messages").unwrap_or(Value::Null), options)
        }
        _ => return,
    };
    let Ok(messages) = serde_json::from_value::<Vec<ChatMessage>>(messages) else {
        return;
    };
    let _ = media_parts(&messages);
    for (tokenizer, multimodal) in tokenizers() {
        let template = tokenizer
            .chat_template()
            .expect("fixture has a chat template");
        if let Ok(text) = template.render(&messages, &options, *multimodal) {
            let _ = tokenizer.encode(&text, false, Some(64), TruncationSide::Left);
        }
    }
});
