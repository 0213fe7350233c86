//! Every fixture architecture against transformers' outputs (fp32, CPU):
//! token ids, raw logits and probabilities, each prompt alone and all packed
//! into one batch, and per-token outputs for token classification.

mod common;

use common::*;
use verdict_engine::{
    Llm, ParamsArg, PooledData, PoolerConfig, PoolingParams, PoolingTask, Prompt, TokenizeOptions,
};

const ATOL: f32 = 1e-4;

fn case_prompt(llm: &Llm, case: &Case) -> Prompt {
    match case.kind.as_str() {
        "text" => Prompt::Text(case.text.clone().expect("text")),
        "chat" => Prompt::Chat {
            messages: case.messages.clone().expect("messages"),
            options: case.chat_options(),
        },
        "pair" => {
            // Pairs go through the engine's own pair encoding; the ids are checked below.
            let p = llm
                .engine()
                .processor()
                .process_pair(
                    case.text.as_deref().expect("text"),
                    case.text_pair.as_deref().expect("text_pair"),
                    &TokenizeOptions::default(),
                    &Default::default(),
                )
                .unwrap_or_else(|e| panic!("{}: pair encoding failed: {e}", case.name));
            Prompt::Tokens {
                ids: p.ids,
                token_type_ids: p.token_type_ids,
            }
        }
        other => panic!("unknown case kind {other}"),
    }
}

fn check_fixture(name: &str) {
    let dir = fixture_dir(name);
    check_model(name, &dir, &load_reference(&dir));
}

fn check_model(name: &str, dir: &std::path::Path, reference: &Reference) {
    let dir = dir.to_path_buf();
    let llm = Llm::new(engine_args(&dir, reference))
        .unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
    assert_eq!(
        llm.info().num_labels,
        reference.num_labels,
        "{name}: num_labels"
    );
    if let Some(labels) = &reference.id2label {
        let ours = llm.info().id2label.clone().expect("id2label");
        for (k, v) in labels {
            assert_eq!(
                ours.get(&k.parse::<usize>().unwrap()).map(String::as_str),
                v.as_str(),
                "{name}: id2label"
            );
        }
    }
    let prompts: Vec<Prompt> = reference
        .cases
        .iter()
        .map(|c| case_prompt(&llm, c))
        .collect();
    check_classify_cases(&llm, &reference.cases, &prompts, name, ATOL);
    let tok = TokenizeOptions::default();
    let raw = PoolingParams {
        use_activation: Some(false),
        ..Default::default()
    };
    // classify() gives the same probabilities.
    let classified = llm
        .classify(&prompts, ParamsArg::Default, &tok)
        .expect("classify");
    for (c, case) in classified.iter().zip(&reference.cases) {
        assert_eq!(c.num_classes(), reference.num_labels);
        assert_close(
            &format!("{name}/{} classify", case.name),
            &c.probs,
            &case.probs,
            ATOL,
        );
    }

    // Per-token outputs through the token_classify task.
    let token_cases: Vec<&Case> = reference
        .cases
        .iter()
        .filter(|c| c.token_logits.is_some())
        .collect();
    if token_cases.is_empty() {
        return;
    }
    drop(llm);
    let mut args = engine_args(&dir, reference);
    args.pooler_config = PoolerConfig {
        task: Some(PoolingTask::TokenClassify),
        ..Default::default()
    };
    let llm = Llm::new(args).unwrap_or_else(|e| panic!("{name}: token_classify load failed: {e}"));
    let prompts: Vec<Prompt> = token_cases.iter().map(|c| case_prompt(&llm, c)).collect();
    let probs = llm
        .encode(
            &prompts,
            ParamsArg::Default,
            Some(PoolingTask::TokenClassify),
            &tok,
        )
        .expect("token probs");
    let logits = llm
        .encode(
            &prompts,
            ParamsArg::All(&raw),
            Some(PoolingTask::TokenClassify),
            &tok,
        )
        .expect("token logits");
    for (i, case) in token_cases.iter().enumerate() {
        let what = format!("{name}/{} tokens", case.name);
        let (PooledData::Matrix(p), PooledData::Matrix(l)) =
            (&probs[i].outputs, &logits[i].outputs)
        else {
            panic!("{what}: expected per-token matrices");
        };
        assert_eq!(
            p.len(),
            case.input_ids.len(),
            "{what}: one row per prompt token"
        );
        assert_close_2d(
            &format!("{what} logits"),
            l,
            case.token_logits.as_ref().unwrap(),
            ATOL,
        );
        assert_close_2d(
            &format!("{what} probs"),
            p,
            case.token_probs.as_ref().unwrap(),
            ATOL,
        );
    }
}

macro_rules! parity_tests {
    ($($test:ident => $fixture:literal),* $(,)?) => {
        $(#[test] fn $test() { check_fixture($fixture); })*
    };
}

parity_tests! {
    bert_sequence_classification => "bert-cls",
    ernie_sequence_classification => "ernie-cls",
    roberta_sequence_classification => "roberta-cls",
    xlm_roberta_cross_encoder => "xlmr-rerank",
    gpt2_sequence_classification => "gpt2-cls",
    gpt2_lm_head_converted_from_tokens => "gpt2-lm-tokens",
    qwen2_sequence_classification => "qwen2-cls",
    qwen3_multi_label => "qwen3-cls",
    qwen3_reranker_from_2_way_softmax => "qwen3-reranker",
    llama_regression_with_llama3_rope => "llama-cls",
    mistral_sequence_classification => "mistral-cls",
    qwen2_causal_lm_converted_with_score => "qwen2-causal-score",
}

/// The bundled default model: real all-MiniLM-L6-v2 weights (fetched from the
/// package registry by scripts/setup-default-model.sh) with the fitted head.
#[test]
fn real_minilm_default_model() {
    let dir = std::env::var("VERDICT_DEFAULT_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            let home = std::env::var("VERDICT_HOME")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|_| {
                    std::path::PathBuf::from(std::env::var("HOME").expect("HOME"))
                        .join(".cache/verdict")
                });
            home.join("default-model")
        });
    assert!(
        dir.join("config.json").is_file(),
        "the default model is not set up at {}: run scripts/setup-default-model.sh (scripts/test.sh does)",
        dir.display()
    );
    let reference_path = repo_root().join("assets/default-model");
    let reference = load_reference(&reference_path);
    check_model("default-model", &dir, &reference);

    // The seed page's examples come out the right way round, with clear margins.
    let llm = Llm::new(engine_args(&dir, &reference)).expect("load default model");
    let out = llm
        .classify(
            &[
                Prompt::from("Loved the new café—coffee was great."),
                Prompt::from("This update broke everything. Frustrating."),
            ],
            ParamsArg::Default,
            &TokenizeOptions::default(),
        )
        .expect("classify");
    let labels = llm.info().id2label.clone().expect("labels");
    let positive = labels
        .iter()
        .find(|(_, l)| l.as_str() == "positive")
        .map(|(i, _)| *i)
        .expect("positive label");
    assert!(
        out[0].probs[positive] > 0.9,
        "café sentence: {:?}",
        out[0].probs
    );
    assert!(
        out[1].probs[positive] < 0.1,
        "update sentence: {:?}",
        out[1].probs
    );
}

/// bfloat16 backbones (heads stay fp32) agree with transformers' fp32
/// probabilities within the usual 16-bit tolerance.
#[test]
fn bfloat16_backbone_within_16_bit_tolerance() {
    for name in ["bert-cls", "qwen2-cls", "gpt2-cls"] {
        let dir = fixture_dir(name);
        let reference = load_reference(&dir);
        let mut args = engine_args(&dir, &reference);
        args.dtype = verdict_engine::DTypeArg::BFloat16;
        let llm = Llm::new(args).unwrap_or_else(|e| panic!("{name}: bf16 load failed: {e}"));
        let cases: Vec<&Case> = reference
            .cases
            .iter()
            .filter(|c| c.kind == "text")
            .collect();
        let prompts: Vec<Prompt> = cases.iter().map(|c| case_prompt(&llm, c)).collect();
        let out = llm
            .classify(&prompts, ParamsArg::Default, &TokenizeOptions::default())
            .expect("classify");
        for (o, case) in out.iter().zip(&cases) {
            assert_close(
                &format!("{name}/{} bf16", case.name),
                &o.probs,
                &case.probs,
                1e-2,
            );
        }
    }
}

// Gemma 1/2/3, Phi-3 and Granite (scripts/make_decoder_fixtures.py, transformers 5):
// each as a classifier and as a causal LM converted with classifier_from_token.
parity_tests! {
    gemma_sequence_classification => "gemma-cls",
    gemma_lm_converted_from_tokens => "gemma-lm-tokens",
    gemma2_window_and_attention_softcap => "gemma2-cls",
    gemma2_lm_final_softcap_from_2_way_softmax => "gemma2-lm-2way",
    gemma3_text_sequence_classification => "gemma3-cls",
    gemma3_lm_final_softcap_from_tokens => "gemma3-lm-tokens",
    phi3_longrope_sequence_classification => "phi3-cls",
    phi3_lm_partial_rotary_from_tokens => "phi3-lm-tokens",
    granite_causal_lm_converted_with_score => "granite-cls",
    granite_lm_logits_scaling_from_2_way_softmax => "granite-lm-2way",
}
