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

// DistilBERT and GTE "new" (scripts/make_encoder_fixtures_distil_gte.py).

parity_tests! {
    distilbert_sinusoidal_positions_recreated => "distilbert-cls",
    distilbert_cross_encoder => "distilbert-rerank",
    gte_new_cross_encoder_ntk_rope => "gte-rerank",
}

#[test]
fn distilbert_token_classification() {
    check_token_fixture("distilbert-tokens");
}

#[test]
fn gte_new_token_classification_split_qkv_mixed_ntk() {
    check_token_fixture("gte-tokens");
}

/// A `*ForTokenClassification` fixture (its only task is token_classify): token
/// ids, per-token logits and probabilities with all prompts packed, and each
/// prompt alone, which must agree with the batch to 1e-5.
fn check_token_fixture(name: &str) {
    let dir = fixture_dir(name);
    let reference = load_reference(&dir);
    let llm = Llm::new(engine_args(&dir, &reference))
        .unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
    assert_eq!(llm.info().num_labels, reference.num_labels, "{name}");
    let prompts: Vec<Prompt> = reference
        .cases
        .iter()
        .map(|c| case_prompt(&llm, c))
        .collect();
    let tok = TokenizeOptions::default();
    let raw = PoolingParams {
        use_activation: Some(false),
        ..Default::default()
    };
    // (token ids, per-token rows) of each prompt.
    let encode = |prompts: &[Prompt], params: ParamsArg| -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
        llm.encode(prompts, params, Some(PoolingTask::TokenClassify), &tok)
            .unwrap_or_else(|e| panic!("{name}: encode failed: {e}"))
            .into_iter()
            .map(|out| match out.outputs {
                PooledData::Matrix(rows) => (out.prompt_token_ids, rows),
                other => panic!("{name}: expected per-token rows, got {other:?}"),
            })
            .collect()
    };
    let probs = encode(&prompts, ParamsArg::Default);
    let logits = encode(&prompts, ParamsArg::All(&raw));
    for (i, case) in reference.cases.iter().enumerate() {
        let what = format!("{name}/{}", case.name);
        assert_eq!(probs[i].0, case.input_ids, "{what}: token ids");
        let want_logits = case.token_logits.as_ref().expect("token_logits");
        let want_probs = case.token_probs.as_ref().expect("token_probs");
        assert_close_2d(
            &format!("{what} logits (batched)"),
            &logits[i].1,
            want_logits,
            ATOL,
        );
        assert_close_2d(
            &format!("{what} probs (batched)"),
            &probs[i].1,
            want_probs,
            ATOL,
        );
        let alone = encode(std::slice::from_ref(&prompts[i]), ParamsArg::All(&raw));
        assert_close_2d(
            &format!("{what} logits (alone)"),
            &alone[0].1,
            want_logits,
            ATOL,
        );
        assert_close_2d(
            &format!("{what} alone vs batched"),
            &alone[0].1,
            &logits[i].1,
            1e-5,
        );
    }
}

// ---------------------------------------------------------------------------
// Reward models, STEP pooling, decoder cross-encoders and reranker recipes
// (fixtures from scripts/make_reward_fixtures.py).
// ---------------------------------------------------------------------------

mod reward {
    use std::path::{Path, PathBuf};

    use serde::Deserialize;
    use serde_json::Value;
    use verdict_engine::{
        ChatOptions, Convert, DeviceArg, EngineArgs, Llm, PairLimits, ParamsArg, PooledData,
        PoolerConfig, PoolingParams, PoolingTask, PoolingType, Prompt, StepParams, TokenizeOptions,
    };

    use super::common::{assert_close, assert_close_2d, fixture_dir, repo_root};
    use super::ATOL;

    #[derive(Deserialize)]
    struct RewardReference {
        engine_args: RewardEngineArgs,
        #[serde(default)]
        step_tag_id: Option<u32>,
        #[serde(default)]
        alt_step_tag_id: Option<u32>,
        #[serde(default)]
        alt_returned_token_ids: Option<Vec<u32>>,
        cases: Vec<RewardCase>,
    }

    #[derive(Deserialize)]
    struct RewardEngineArgs {
        convert: Option<String>,
        hf_overrides: Option<Value>,
        pooler_config: Option<Value>,
        #[serde(default)]
        chat_template: Option<String>,
    }

    #[derive(Deserialize)]
    struct RewardCase {
        name: String,
        #[serde(default)]
        text: Option<String>,
        #[serde(default)]
        query: Option<String>,
        #[serde(default)]
        document: Option<String>,
        #[serde(default)]
        instruction: Option<String>,
        input_ids: Vec<u32>,
        #[serde(default)]
        token_logits: Option<Vec<Vec<f32>>>,
        #[serde(default)]
        token_probs: Option<Vec<Vec<f32>>>,
        #[serde(default)]
        sequence_reward: Option<f32>,
        #[serde(default)]
        step_logits: Option<Vec<Vec<f32>>>,
        #[serde(default)]
        step_probs: Option<Vec<Vec<f32>>>,
        #[serde(default)]
        alt_step_logits: Option<Vec<Vec<f32>>>,
        #[serde(default)]
        alt_step_probs: Option<Vec<Vec<f32>>>,
        #[serde(default)]
        logits: Option<Vec<f32>>,
        #[serde(default)]
        probs: Option<Vec<f32>>,
    }

    fn load(name: &str) -> (PathBuf, RewardReference) {
        let dir = fixture_dir(name);
        let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
        (
            dir,
            serde_json::from_str(&text).expect("parse reference.json"),
        )
    }

    fn args(dir: &Path, reference: &RewardReference) -> EngineArgs {
        let e = &reference.engine_args;
        let mut args = EngineArgs::new(dir.to_string_lossy());
        args.device = DeviceArg::Cpu;
        args.convert = match e.convert.as_deref() {
            Some("classify") => Convert::Classify,
            _ => Convert::Auto,
        };
        args.hf_overrides = e.hf_overrides.clone();
        if let Some(p) = &e.pooler_config {
            args.pooler_config = PoolerConfig::from_json(p).expect("pooler config");
        }
        args.chat_template = e
            .chat_template
            .as_ref()
            .map(|t| dir.join(t).to_string_lossy().into_owned());
        args
    }

    fn matrices(llm: &Llm, prompts: &[Prompt], params: &PoolingParams) -> Vec<Vec<Vec<f32>>> {
        llm.encode(
            prompts,
            ParamsArg::All(params),
            Some(PoolingTask::TokenClassify),
            &TokenizeOptions::default(),
        )
        .expect("encode")
        .into_iter()
        .map(|o| match o.outputs {
            PooledData::Matrix(m) => m,
            PooledData::Vector(v) => panic!("expected rows, got a vector {v:?}"),
        })
        .collect()
    }

    /// Rows of every case, all prompts in one batch and each alone (which must agree to 1e-5).
    fn check_rows(
        label: &str,
        llm: &Llm,
        reference: &RewardReference,
        params: &PoolingParams,
        want: impl Fn(&RewardCase) -> Vec<Vec<f32>>,
    ) {
        let prompts: Vec<Prompt> = reference
            .cases
            .iter()
            .map(|c| Prompt::from(c.text.clone().expect("text")))
            .collect();
        let batched = matrices(llm, &prompts, params);
        for (i, case) in reference.cases.iter().enumerate() {
            let what = format!("{label}/{}", case.name);
            let want = want(case);
            assert_close_2d(&format!("{what} (batched)"), &batched[i], &want, ATOL);
            let alone = matrices(llm, std::slice::from_ref(&prompts[i]), params);
            assert_close_2d(
                &format!("{what} alone vs batched"),
                &alone[0],
                &batched[i],
                1e-5,
            );
        }
    }

    fn raw() -> PoolingParams {
        PoolingParams {
            use_activation: Some(false),
            ..Default::default()
        }
    }

    #[test]
    fn qwen2_reward_model_gives_raw_per_token_rewards() {
        let (dir, reference) = load("qwen2-rm");
        let llm = Llm::new(args(&dir, &reference)).expect("load");
        let info = llm.info();
        assert_eq!(info.task, PoolingTask::TokenClassify);
        assert_eq!(info.supported_tasks, vec![PoolingTask::TokenClassify]);
        assert_eq!((info.num_labels, info.pooling), (1, PoolingType::All));
        assert!(!info.default_use_activation, "rewards are raw by default");
        let logits = |c: &RewardCase| c.token_logits.clone().expect("token_logits");
        check_rows(
            "qwen2-rm",
            &llm,
            &reference,
            &PoolingParams::default(),
            logits,
        );
        check_rows("qwen2-rm raw", &llm, &reference, &raw(), logits);
        let with_sigmoid = PoolingParams {
            use_activation: Some(true),
            ..Default::default()
        };
        check_rows("qwen2-rm sigmoid", &llm, &reference, &with_sigmoid, |c| {
            c.token_probs.clone().expect("token_probs")
        });
        // The sequence reward is the last token's row.
        let case = &reference.cases[1];
        let rows = matrices(
            &llm,
            &[Prompt::from(case.text.clone().unwrap())],
            &PoolingParams::default(),
        );
        let last = rows[0].last().expect("rows")[0];
        assert!((last - case.sequence_reward.unwrap()).abs() <= ATOL);
        // No classify task, and no STEP parameters without STEP pooling.
        let err = llm
            .classify(
                &[Prompt::from("x")],
                ParamsArg::Default,
                &TokenizeOptions::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("Classification API is not supported"), "{err}");
        let step = PoolingParams {
            step: StepParams {
                step_tag_id: Some(5),
                returned_token_ids: Some(vec![0]),
            },
            ..Default::default()
        };
        let err = llm
            .encode(
                &[Prompt::from("x")],
                ParamsArg::All(&step),
                Some(PoolingTask::TokenClassify),
                &TokenizeOptions::default(),
            )
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "Task token_classify only supports ['use_activation'] parameters, does not support ['step_tag_id', 'returned_token_ids'] parameters"
        );
    }

    #[test]
    fn qwen2_process_reward_model_gives_step_probabilities() {
        let (dir, reference) = load("qwen2-prm");
        let llm = Llm::new(args(&dir, &reference)).expect("load");
        let info = llm.info();
        assert_eq!(info.task, PoolingTask::TokenClassify);
        assert_eq!((info.num_labels, info.pooling), (2, PoolingType::Step));
        assert_eq!(info.step_defaults.step_tag_id, reference.step_tag_id);
        assert!(info.default_use_activation);
        check_rows(
            "qwen2-prm",
            &llm,
            &reference,
            &PoolingParams::default(),
            |c| c.step_probs.clone().unwrap(),
        );
        check_rows("qwen2-prm raw", &llm, &reference, &raw(), |c| {
            c.step_logits.clone().unwrap()
        });
        assert!(reference
            .cases
            .iter()
            .any(|c| c.step_probs.as_ref().unwrap().is_empty()));
        // A request's own step tag.
        let alt = PoolingParams {
            step: StepParams {
                step_tag_id: reference.alt_step_tag_id,
                returned_token_ids: None,
            },
            ..Default::default()
        };
        assert!(reference
            .cases
            .iter()
            .any(|c| !c.alt_step_probs.as_ref().unwrap().is_empty()));
        check_rows("qwen2-prm alt tag", &llm, &reference, &alt, |c| {
            c.alt_step_probs.clone().unwrap()
        });
        let alt_raw = PoolingParams {
            use_activation: Some(false),
            ..alt.clone()
        };
        check_rows("qwen2-prm alt tag raw", &llm, &reference, &alt_raw, |c| {
            c.alt_step_logits.clone().unwrap()
        });
        // returned_token_ids picks (and orders) the label columns before the softmax.
        let swapped = PoolingParams {
            step: StepParams {
                step_tag_id: None,
                returned_token_ids: Some(vec![1, 0]),
            },
            ..Default::default()
        };
        check_rows("qwen2-prm swapped", &llm, &reference, &swapped, |c| {
            let rows = c.step_probs.clone().unwrap();
            rows.into_iter().map(|r| vec![r[1], r[0]]).collect()
        });
        let out_of_range = PoolingParams {
            step: StepParams {
                step_tag_id: None,
                returned_token_ids: Some(vec![2]),
            },
            ..Default::default()
        };
        let err = llm
            .encode(
                &[Prompt::from(reference.cases[0].text.clone().unwrap())],
                ParamsArg::All(&out_of_range),
                Some(PoolingTask::TokenClassify),
                &TokenizeOptions::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("returned_token_ids"), "{err}");
    }

    #[test]
    fn step_pooling_reads_lm_head_columns_of_a_causal_lm() {
        let (dir, reference) = load("llama-step-lm");
        let llm = Llm::new(args(&dir, &reference)).expect("load");
        assert_eq!(llm.info().task, PoolingTask::TokenClassify);
        assert_eq!(llm.info().pooling, PoolingType::Step);
        check_rows(
            "llama-step-lm",
            &llm,
            &reference,
            &PoolingParams::default(),
            |c| c.step_probs.clone().unwrap(),
        );
        check_rows("llama-step-lm raw", &llm, &reference, &raw(), |c| {
            c.step_logits.clone().unwrap()
        });
        let alt = PoolingParams {
            step: StepParams {
                step_tag_id: None,
                returned_token_ids: reference.alt_returned_token_ids.clone(),
            },
            ..Default::default()
        };
        check_rows("llama-step-lm alt columns", &llm, &reference, &alt, |c| {
            c.alt_step_probs.clone().unwrap()
        });
    }

    #[test]
    fn step_parameters_need_step_pooling() {
        let dir = fixture_dir("qwen2-cls");
        let mut args = EngineArgs::new(dir.to_string_lossy());
        args.device = DeviceArg::Cpu;
        let llm = Llm::new(args).expect("load");
        let step = PoolingParams {
            step: StepParams {
                step_tag_id: Some(3),
                returned_token_ids: None,
            },
            ..Default::default()
        };
        let err = llm
            .classify(
                &[Prompt::from("x")],
                ParamsArg::All(&step),
                &TokenizeOptions::default(),
            )
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "Task classify only supports ['use_activation'] parameters, does not support ['step_tag_id'] parameters"
        );
    }

    /// A copy of the shared Qwen tokenizer with the fixture's pair template
    /// (type 1 for the second text), as Qwen3-Embedding ships it.
    pub fn pair_template_tokenizer(fixture: &Path) -> PathBuf {
        let shared = repo_root().join("fixtures/tokenizers/qwen3");
        let mut tokenizer: Value = serde_json::from_str(
            &std::fs::read_to_string(shared.join("tokenizer.json")).expect("tokenizer.json"),
        )
        .expect("tokenizer json");
        let template: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture.join("tokenizer_post_processor.json"))
                .expect("tokenizer_post_processor.json"),
        )
        .expect("post processor json");
        tokenizer["post_processor"] = template;
        let out = std::env::temp_dir().join(format!(
            "verdict-pair-tokenizer-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&out).expect("tokenizer dir");
        std::fs::write(out.join("tokenizer.json"), tokenizer.to_string()).expect("write");
        std::fs::copy(
            shared.join("tokenizer_config.json"),
            out.join("tokenizer_config.json"),
        )
        .expect("copy tokenizer_config.json");
        out
    }

    #[test]
    fn decoder_cross_encoder_ignores_pair_token_types() {
        let (dir, reference) = load("qwen2-pair-score");
        let tokenizer = pair_template_tokenizer(&dir);
        let mut args = args(&dir, &reference);
        args.tokenizer = Some(tokenizer.to_string_lossy().into_owned());
        let llm = Llm::new(args).expect("load");
        assert_eq!(llm.info().type_vocab_size, 0);
        let queries: Vec<String> = reference
            .cases
            .iter()
            .map(|c| c.query.clone().unwrap())
            .collect();
        let docs: Vec<String> = reference
            .cases
            .iter()
            .map(|c| c.document.clone().unwrap())
            .collect();
        let tok = TokenizeOptions::default();
        let batched = llm.score(&queries, &docs, None, &tok).expect("score");
        for (i, case) in reference.cases.iter().enumerate() {
            let what = format!("qwen2-pair-score/{}", case.name);
            assert_eq!(
                batched[i].prompt_token_ids, case.input_ids,
                "{what}: pair ids"
            );
            assert_close(
                &what,
                &[batched[i].score],
                case.probs.as_ref().unwrap(),
                ATOL,
            );
            let alone = llm
                .score(&queries[i..=i], &docs[i..=i], None, &tok)
                .expect("score alone");
            assert_close(
                &format!("{what} alone vs batched"),
                &[alone[0].score],
                &[batched[i].score],
                1e-5,
            );
        }
        std::fs::remove_dir_all(tokenizer).ok();
    }

    #[test]
    fn original_qwen3_reranker_with_score_template() {
        let (dir, reference) = load("qwen3-reranker-template");
        let llm = Llm::new(args(&dir, &reference)).expect("load");
        let info = llm.info();
        assert_eq!(info.architecture, "Qwen3ForSequenceClassification");
        assert_eq!(info.num_labels, 1);
        assert!(info.chat_template_from_cli);
        let tok = TokenizeOptions::default();
        let mut prompts = Vec::new();
        for case in &reference.cases {
            let mut options = ChatOptions::default();
            if let Some(instruction) = &case.instruction {
                options
                    .template_kwargs
                    .insert("instruction".into(), Value::from(instruction.clone()));
            }
            let limits = PairLimits {
                score_template: Some(options),
                ..Default::default()
            };
            let p = llm
                .engine()
                .processor()
                .process_pair(
                    case.query.as_deref().unwrap(),
                    case.document.as_deref().unwrap(),
                    &tok,
                    &limits,
                )
                .expect("score template");
            assert_eq!(p.ids, case.input_ids, "{}: rendered ids", case.name);
            prompts.push(Prompt::from(p.ids));
        }
        let out = llm
            .classify(&prompts, ParamsArg::Default, &tok)
            .expect("classify");
        for (o, case) in out.iter().zip(&reference.cases) {
            assert_close(&case.name, &o.probs, case.probs.as_ref().unwrap(), ATOL);
        }
        let raw = llm
            .classify(&prompts, ParamsArg::All(&raw()), &tok)
            .expect("raw");
        for (o, case) in raw.iter().zip(&reference.cases) {
            assert_close(&case.name, &o.probs, case.logits.as_ref().unwrap(), ATOL);
        }
    }
}

// ModernBERT: global and local (sliding-window) layers, both rotary bases, CLS and
// mean pooling, a cross-encoder, a token classifier, and an 8k-token prompt.

parity_tests! {
    modernbert_cls_pooling_all_biases => "modernbert-cls",
    modernbert_mean_pooling_cross_encoder => "modernbert-rerank",
}

/// The pooling each ModernBERT checkpoint asks for (`classifier_pooling`), and
/// its context length (`max_position_embeddings`, 8192).
#[test]
fn modernbert_pooling_and_length_from_config() {
    for (name, pooling) in [
        ("modernbert-cls", verdict_engine::PoolingType::Cls),
        ("modernbert-rerank", verdict_engine::PoolingType::Mean),
    ] {
        let dir = fixture_dir(name);
        let llm = Llm::new(engine_args(&dir, &load_reference(&dir))).expect("load");
        assert_eq!(llm.info().pooling, pooling, "{name}");
        assert_eq!(llm.info().max_model_len, 8192, "{name}");
    }
}

/// ModernBertForTokenClassification: the prediction head and classifier on every
/// token, all prompts packed and each alone.
#[test]
fn modernbert_token_classification() {
    check_token_fixture("modernbert-ner");
}

/// A prompt of max_model_len (8192) tokens runs on the CPU next to a short one:
/// attention holds a block of query rows at a time, never T×T scores, and the
/// long prompt's result does not depend on its batch.
#[test]
fn modernbert_8k_prompt() {
    let dir = fixture_dir("modernbert-cls");
    let llm = Llm::new(engine_args(&dir, &load_reference(&dir))).expect("load");
    let long: Vec<u32> = (0..8192u32).map(|i| 1000 + (i * 7919) % 40000).collect();
    let prompts = [
        Prompt::Tokens {
            ids: long,
            token_type_ids: None,
        },
        Prompt::from("short"),
    ];
    let raw = PoolingParams {
        use_activation: Some(false),
        ..Default::default()
    };
    let tok = TokenizeOptions::default();
    let started = std::time::Instant::now();
    let both = llm
        .encode(
            &prompts,
            ParamsArg::All(&raw),
            Some(PoolingTask::Classify),
            &tok,
        )
        .expect("8k batch");
    let alone = llm
        .encode(
            &prompts[..1],
            ParamsArg::All(&raw),
            Some(PoolingTask::Classify),
            &tok,
        )
        .expect("8k alone");
    assert_eq!(both[0].prompt_token_ids.len(), 8192);
    assert_close(
        "8k alone vs batched",
        &alone[0].outputs.flatten(),
        &both[0].outputs.flatten(),
        1e-5,
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "two 8k forward passes of a tiny model took {:?}",
        started.elapsed()
    );
}

// DeBERTa-v2/v3/mDeBERTa and DeBERTa v1 (fixtures from scripts/make_deberta_fixtures.py).

parity_tests! {
    deberta_v3_sequence_classification_with_buckets_and_conv => "deberta-v3-cls",
    deberta_v3_cross_encoder_with_token_types => "deberta-v3-rerank",
    deberta_v1_sequence_classification => "deberta-v1-cls",
}

/// A `DebertaV2ForTokenClassification` checkpoint: per-token logits and
/// probabilities, all prompts packed and each alone (alone vs packed within 1e-5).
#[test]
fn deberta_v3_token_classification() {
    check_token_fixture("deberta-v3-tokens");
}

/// Relative positions only, yet the default max_model_len is max_position_embeddings.
#[test]
fn deberta_max_model_len_defaults_to_max_position_embeddings() {
    for name in ["deberta-v3-cls", "deberta-v1-cls"] {
        let dir = fixture_dir(name);
        let llm = Llm::new(engine_args(&dir, &load_reference(&dir))).expect("load");
        assert_eq!(llm.info().max_model_len, 512, "{name}");
    }
}
