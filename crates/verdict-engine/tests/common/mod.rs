//! Reads the reference outputs that transformers produced for the fixtures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use verdict_engine::{
    ChatMessage, ChatOptions, Convert, EngineArgs, Llm, ParamsArg, PoolingParams, PoolingTask,
    Prompt, TokenizeOptions,
};

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub architecture: String,
    pub engine_args: RefEngineArgs,
    pub num_labels: usize,
    pub activation: String,
    pub id2label: Option<serde_json::Map<String, Value>>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
pub struct RefEngineArgs {
    pub convert: Option<String>,
    pub hf_overrides: Option<Value>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct Case {
    pub name: String,
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub text_pair: Option<String>,
    #[serde(default)]
    pub pair_mode: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    pub add_generation_prompt: bool,
    #[serde(default)]
    pub continue_final_message: bool,
    pub input_ids: Vec<u32>,
    #[serde(default)]
    pub token_type_ids: Option<Vec<u32>>,
    pub logits: Vec<f32>,
    pub probs: Vec<f32>,
    #[serde(default)]
    pub token_logits: Option<Vec<Vec<f32>>>,
    #[serde(default)]
    pub token_probs: Option<Vec<Vec<f32>>>,
}

impl Case {
    pub fn chat_options(&self) -> ChatOptions {
        ChatOptions {
            add_generation_prompt: self.add_generation_prompt,
            continue_final_message: self.continue_final_message,
            template_kwargs: Default::default(),
        }
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

pub fn fixture_dir(name: &str) -> PathBuf {
    repo_root().join("fixtures/models").join(name)
}

pub fn load_reference(dir: &Path) -> Reference {
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("parse reference.json")
}

pub fn engine_args(dir: &Path, reference: &Reference) -> EngineArgs {
    let mut args = EngineArgs::new(dir.to_string_lossy());
    args.convert = match reference.engine_args.convert.as_deref() {
        Some("classify") => Convert::Classify,
        Some(other) => panic!("unexpected convert {other}"),
        None => Convert::Auto,
    };
    args.hf_overrides = reference.engine_args.hf_overrides.clone();
    args.device = verdict_engine::DeviceArg::Cpu;
    args
}

/// Fails with every element that differs by more than `atol`.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length {} vs {}",
        got.len(),
        want.len()
    );
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= atol && got.iter().all(|g| g.is_finite()),
        "{what}: max abs diff {worst:e} > {atol:e}\n got  {got:?}\n want {want:?}"
    );
}

pub fn assert_close_2d(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], atol: f32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: rows {} vs {}",
        got.len(),
        want.len()
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_close(&format!("{what} row {i}"), g, w, atol);
    }
}

/// Every case's prompt through `llm`: token ids, probabilities and raw logits
/// with all prompts packed into one batch, and each prompt alone, which must
/// agree with the batch to 1e-5.
pub fn check_classify_cases(llm: &Llm, cases: &[Case], prompts: &[Prompt], label: &str, atol: f32) {
    let tok = TokenizeOptions::default();
    let raw = PoolingParams {
        use_activation: Some(false),
        ..Default::default()
    };
    let encode = |prompts: &[Prompt], params: ParamsArg| {
        llm.encode(prompts, params, Some(PoolingTask::Classify), &tok)
            .unwrap_or_else(|e| panic!("{label}: encode failed: {e}"))
    };
    let batched = encode(prompts, ParamsArg::Default);
    let batched_raw = encode(prompts, ParamsArg::All(&raw));
    for (i, case) in cases.iter().enumerate() {
        let what = format!("{label}/{}", case.name);
        assert_eq!(
            batched[i].prompt_token_ids, case.input_ids,
            "{what}: token ids"
        );
        let batch_logits = batched_raw[i].outputs.flatten();
        assert_close(
            &format!("{what} logits (batched)"),
            &batch_logits,
            &case.logits,
            atol,
        );
        assert_close(
            &format!("{what} probs (batched)"),
            &batched[i].outputs.flatten(),
            &case.probs,
            atol,
        );
        let alone = encode(std::slice::from_ref(&prompts[i]), ParamsArg::All(&raw));
        let alone = alone[0].outputs.flatten();
        assert_close(
            &format!("{what} logits (alone)"),
            &alone,
            &case.logits,
            atol,
        );
        assert_close(
            &format!("{what} alone vs batched"),
            &alone,
            &batch_logits,
            1e-5,
        );
    }
}
