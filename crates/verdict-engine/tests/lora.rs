//! PEFT LoRA adapters against PEFT's own outputs (fp32, CPU): each adapter alone
//! and batched, base-model and adapter sequences mixed in one packed batch (heads
//! with other label counts included), and the adapters verdict must refuse.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use verdict_engine::engine::{self, LoadedEngine};
use verdict_engine::tokenize::TokenizedPrompt;
use verdict_engine::{
    EngineArgs, Llm, LoraLimits, LoraModuleArg, LoraRequest, ParamsArg, PooledData, PoolingParams,
    PoolingTask, Prompt, SequenceInput, TokenizeOptions,
};

const ATOL: f32 = 1e-4;

fn lora_dir(name: &str) -> PathBuf {
    repo_root().join("fixtures/lora").join(name)
}

fn lora_reference(name: &str) -> Reference {
    load_reference(&lora_dir(name))
}

/// The base fixture with LoRA on and `adapters` loaded under their own names.
fn lora_args(base: &str, adapters: &[&str]) -> EngineArgs {
    let dir = fixture_dir(base);
    let mut args = engine_args(&dir, &load_reference(&dir));
    args.enable_lora = true;
    args.lora_limits = LoraLimits {
        max_loras: 4,
        max_rank: 16,
    };
    args.lora_modules = adapters
        .iter()
        .map(|a| LoraModuleArg {
            name: a.to_string(),
            path: lora_dir(a),
        })
        .collect();
    args
}

/// A case's prompt as the token ids transformers saw (tokenization has its own tests).
fn token_prompt(case: &Case) -> Prompt {
    Prompt::Tokens {
        ids: case.input_ids.clone(),
        token_type_ids: case.token_type_ids.clone(),
    }
}

fn sequence(case: &Case, lora: Option<&verdict_engine::lora::LoraRef>) -> SequenceInput {
    let prompt = TokenizedPrompt {
        ids: case.input_ids.clone(),
        token_type_ids: case.token_type_ids.clone(),
        ..Default::default()
    };
    SequenceInput::new(prompt, false).with_lora(lora.cloned())
}

/// Every case through the adapter, all in one call and each alone.
fn check_adapter_alone(base: &str, adapter: &str) {
    let reference = lora_reference(adapter);
    let llm = Llm::new(lora_args(base, &[])).unwrap_or_else(|e| panic!("{adapter}: {e}"));
    let request = LoraRequest {
        name: adapter.to_string(),
        path: lora_dir(adapter),
    };
    let prompts: Vec<Prompt> = reference.cases.iter().map(token_prompt).collect();
    let tok = TokenizeOptions::default();
    let raw = PoolingParams {
        use_activation: Some(false),
        ..Default::default()
    };
    let encode = |prompts: &[Prompt], params: ParamsArg| {
        llm.encode_with_lora(
            prompts,
            params,
            Some(PoolingTask::Classify),
            &tok,
            Some(&request),
        )
        .unwrap_or_else(|e| panic!("{adapter}: {e}"))
    };
    let logits = encode(&prompts, ParamsArg::All(&raw));
    let probs = llm
        .classify_with_lora(&prompts, ParamsArg::Default, &tok, Some(&request))
        .unwrap_or_else(|e| panic!("{adapter}: {e}"));
    let registry = llm.engine().lora().expect("lora enabled");
    let info = registry.get(adapter).expect("loaded on first use");
    assert_eq!(info.info().num_labels, reference.num_labels, "{adapter}");
    if let Some(labels) = &reference.id2label {
        let ours = info.info().id2label.clone().expect("id2label");
        for (k, v) in labels {
            assert_eq!(
                ours.get(&k.parse::<usize>().unwrap()).map(String::as_str),
                v.as_str(),
                "{adapter}: id2label"
            );
        }
    }
    for (i, case) in reference.cases.iter().enumerate() {
        let what = format!("{adapter}/{}", case.name);
        let batched = logits[i].outputs.flatten();
        assert_close(
            &format!("{what} logits (batched)"),
            &batched,
            &case.logits,
            ATOL,
        );
        assert_close(&format!("{what} probs"), &probs[i].probs, &case.probs, ATOL);
        let alone = encode(std::slice::from_ref(&prompts[i]), ParamsArg::All(&raw));
        let alone = alone[0].outputs.flatten();
        assert_close(
            &format!("{what} logits (alone)"),
            &alone,
            &case.logits,
            ATOL,
        );
        assert_close(&format!("{what} alone vs batched"), &alone, &batched, 1e-5);
    }
}

#[test]
fn bert_adapter_on_query_and_value() {
    check_adapter_alone("bert-cls", "bert-sentiment");
}

#[test]
fn bert_adapter_with_regex_targets_pooler_and_five_labels() {
    check_adapter_alone("bert-cls", "bert-topics");
}

#[test]
fn qwen2_adapter_on_all_linear_layers_with_rslora() {
    check_adapter_alone("qwen2-cls", "qwen2-all");
}

/// Gemma-2: soft-capped attention, sliding window, all-linear with its own score.
#[test]
fn gemma2_adapter_on_all_linear_layers() {
    check_adapter_alone("gemma2-cls", "gemma2-all");
}

#[test]
fn qwen2_adapter_on_q_and_v_with_three_labels() {
    check_adapter_alone("qwen2-cls", "qwen2-qv");
}

fn load_engine(args: &EngineArgs) -> LoadedEngine {
    engine::load(args).unwrap_or_else(|e| panic!("load: {e}"))
}

/// Base-model and adapter sequences interleaved in one packed batch (twice over,
/// so the batch passes the CPU's MLP row chunk): each result matches its own
/// reference and the same sequence run alone.
fn check_mixed_batch(base: &str, adapters: &[&str]) {
    let loaded = load_engine(&lora_args(base, adapters));
    let registry = loaded.lora.clone().expect("lora enabled");
    let base_ref = load_reference(&fixture_dir(base));
    let mut refs = vec![(None, base_ref)];
    for a in adapters {
        let adapter = registry.get(a).expect("loaded at start");
        refs.push((
            Some(verdict_engine::lora::LoraRef(adapter)),
            lora_reference(a),
        ));
    }
    let mut inputs = Vec::new();
    let mut expected: Vec<(String, &[f32])> = Vec::new();
    for round in 0..2 {
        for c in 0..refs[0].1.cases.len() {
            for (lora, reference) in &refs {
                let case = &reference.cases[c];
                inputs.push(sequence(case, lora.as_ref()));
                let who = lora.as_ref().map_or("base", |l| l.name());
                expected.push((format!("{who}/{}#{round}", case.name), &case.logits));
            }
        }
    }
    let tokens: usize = inputs.iter().map(|s| s.ids.len()).sum();
    assert!(
        tokens > 1024,
        "the batch must pass one MLP row chunk ({tokens})"
    );
    let mixed = loaded.runner.run(&inputs).expect("mixed batch");
    for ((input, out), (what, want)) in inputs.iter().zip(&mixed).zip(&expected) {
        let PooledData::Vector(got) = out else {
            panic!("{what}: expected a vector")
        };
        assert_close(&format!("{what} (mixed)"), got, want, ATOL);
        let alone = loaded
            .runner
            .run(std::slice::from_ref(input))
            .expect("alone");
        assert_close(
            &format!("{what} alone vs mixed"),
            &alone[0].flatten(),
            got,
            1e-5,
        );
    }
}

#[test]
fn bert_base_and_two_adapters_in_one_batch() {
    check_mixed_batch("bert-cls", &["bert-sentiment", "bert-topics"]);
}

#[test]
fn qwen2_base_and_two_adapters_in_one_batch() {
    check_mixed_batch("qwen2-cls", &["qwen2-all", "qwen2-qv"]);
}

/// ModernBERT's fused Wqkv, both Wo and the GeGLU halves of Wi, and its own head
/// (dense + norm + classifier) with 4 labels; prompts past the local window.
#[test]
fn modernbert_adapter_with_its_head() {
    check_adapter_alone("modernbert-cls", "modernbert-topics");
}

#[test]
fn modernbert_base_and_adapter_in_one_batch() {
    check_mixed_batch("modernbert-cls", &["modernbert-topics"]);
}

/// DeBERTa-v3 with share_att_key: the adapted query and key projections also
/// project the relative table (as PEFT runs them), plus embed_proj and every dense.
#[test]
fn deberta_adapter_on_every_linear_with_its_pooler() {
    check_adapter_alone("deberta-v3-cls", "deberta-guard");
}

#[test]
fn deberta_adapter_on_query_and_key_only() {
    check_adapter_alone("deberta-v3-cls", "deberta-qk");
}

/// Without share_att_key: pos_key_proj and pos_query_proj adapted.
#[test]
fn deberta_reranker_adapter_on_the_position_projections() {
    check_adapter_alone("deberta-v3-rerank", "deberta-rerank-pos");
}

/// PEFT's `all-linear` also adapts the head's dense layer (BERT's and DeBERTa's
/// pooler, ModernBERT's head): merged into the adapter's own head.
#[test]
fn all_linear_adapters_adapt_the_head_dense_too() {
    check_adapter_alone("bert-cls", "bert-all-linear");
    check_adapter_alone("modernbert-cls", "modernbert-all-linear");
    check_adapter_alone("deberta-v3-cls", "deberta-all-linear");
}

#[test]
fn merged_head_adapter_beside_others_in_one_batch() {
    check_mixed_batch("bert-cls", &["bert-all-linear", "bert-sentiment"]);
}

/// Each run of sequences attends with its own adapter's projected relative table.
#[test]
fn deberta_base_and_two_adapters_in_one_batch() {
    check_mixed_batch("deberta-v3-cls", &["deberta-guard", "deberta-qk"]);
}

/// A copy of an adapter with its config edited.
fn edited_adapter(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for file in ["adapter_model.safetensors", "config.json"] {
        std::fs::copy(lora_dir(name).join(file), dir.path().join(file)).expect("copy");
    }
    let text = std::fs::read_to_string(lora_dir(name).join("adapter_config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    dir
}

fn load_error(args: &EngineArgs) -> String {
    match engine::load(args) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

fn with_module(mut args: EngineArgs, name: &str, path: &Path) -> EngineArgs {
    args.lora_modules.push(LoraModuleArg {
        name: name.into(),
        path: path.to_path_buf(),
    });
    args
}

type ConfigEdit = Box<dyn FnOnce(&mut serde_json::Value)>;

#[test]
fn unsupported_adapters_are_refused_with_the_reason() {
    let cases: Vec<(&str, ConfigEdit, &str)> = vec![
        ("dora", Box::new(|c| c["use_dora"] = true.into()), "DoRA"),
        ("bias", Box::new(|c| c["bias"] = "all".into()), "bias `all`"),
        (
            "unknown target",
            Box::new(|c| c["target_modules"] = serde_json::json!(["query", "value", "gate"])),
            "target module `gate`",
        ),
        (
            "weights outside the targets",
            Box::new(|c| c["target_modules"] = serde_json::json!(["query"])),
            "which its target_modules do not name",
        ),
    ];
    for (what, edit, needle) in cases {
        let dir = edited_adapter("bert-sentiment", edit);
        let msg = load_error(&with_module(lora_args("bert-cls", &[]), "a", dir.path()));
        assert!(msg.contains(needle), "{what}: {msg}");
        assert!(msg.contains("LoRA adapter 'a'"), "{what}: {msg}");
    }

    let mut args = lora_args("bert-cls", &["bert-sentiment"]);
    args.lora_limits.max_rank = 2;
    let msg = load_error(&args);
    assert!(msg.contains("greater than --max-lora-rank 2"), "{msg}");

    let mut args = lora_args("bert-cls", &["bert-sentiment", "bert-topics"]);
    args.lora_limits.max_loras = 1;
    let msg = load_error(&args);
    assert!(msg.contains("--max-loras is 1"), "{msg}");

    for family in ["gpt2-cls", "deberta-v1-cls"] {
        let dir = fixture_dir(family);
        let mut args = engine_args(&dir, &load_reference(&dir));
        args.enable_lora = true;
        let msg = load_error(&args);
        assert!(
            msg.contains("LoRA adapters are not supported"),
            "{family}: {msg}"
        );
    }

    let args = lora_args("bert-cls", &[]);
    let base_name = args.model.clone();
    let msg = load_error(&with_module(args, &base_name, &lora_dir("bert-sentiment")));
    assert!(msg.contains("is the base model's name"), "{msg}");

    let msg = load_error(&with_module(
        lora_args("qwen2-cls", &[]),
        "wrong base",
        &lora_dir("bert-sentiment"),
    ));
    assert!(msg.contains("not a linear layer of this model"), "{msg}");
}

#[test]
fn adapters_unload_and_reload_by_name() {
    let llm = Llm::new(lora_args("bert-cls", &["bert-sentiment"])).expect("load");
    let registry = llm.engine().lora().expect("lora").clone();
    let held = registry.get("bert-sentiment").expect("loaded");
    registry.unload("bert-sentiment").expect("unload");
    assert!(registry.get("bert-sentiment").is_none());
    assert!(registry.unload("bert-sentiment").is_err());
    // A sequence that holds the adapter still runs with it.
    let reference = lora_reference("bert-sentiment");
    let case = &reference.cases[1];
    let mut results = llm.engine().run_blocking(
        vec![sequence(case, Some(&verdict_engine::lora::LoraRef(held)))],
        &|_| {},
    );
    let got = results.remove(0).expect("run").flatten();
    assert_close("held adapter", &got, &case.logits, ATOL);
    registry
        .load("bert-sentiment", &lora_dir("bert-sentiment"))
        .expect("reload");
    assert_eq!(registry.list().len(), 1);
}

/// Per-token heads: a 3-label token-classification adapter and its base model (with
/// other labels) in one batch, every token row as PEFT / transformers give it.
fn check_token_adapter_mixed(base: &str, adapter_name: &str) {
    let loaded = load_engine(&lora_args(base, &[adapter_name]));
    let adapter = verdict_engine::lora::LoraRef(
        loaded
            .lora
            .as_ref()
            .and_then(|r| r.get(adapter_name))
            .expect("loaded"),
    );
    let base_ref = load_reference(&fixture_dir(base));
    let lora_ref = lora_reference(adapter_name);
    let mut inputs = Vec::new();
    let mut expected = Vec::new();
    for (base_case, lora_case) in base_ref.cases.iter().zip(&lora_ref.cases) {
        inputs.push(sequence(base_case, None));
        expected.push((format!("base/{}", base_case.name), base_case));
        inputs.push(sequence(lora_case, Some(&adapter)));
        expected.push((format!("{adapter_name}/{}", lora_case.name), lora_case));
    }
    let mixed = loaded.runner.run(&inputs).expect("mixed batch");
    for ((input, out), (what, case)) in inputs.iter().zip(&mixed).zip(&expected) {
        let PooledData::Matrix(rows) = out else {
            panic!("{what}: expected per-token rows")
        };
        let want = case.token_logits.as_ref().expect("token_logits");
        assert_close_2d(&format!("{what} (mixed)"), rows, want, ATOL);
        let alone = loaded
            .runner
            .run(std::slice::from_ref(input))
            .expect("alone");
        let PooledData::Matrix(alone) = &alone[0] else {
            panic!("{what}: expected per-token rows")
        };
        assert_close_2d(&format!("{what} alone vs mixed"), alone, rows, 1e-5);
    }
}

#[test]
fn token_classification_adapter_with_its_own_labels_in_a_mixed_batch() {
    check_token_adapter_mixed("distilbert-tokens", "distilbert-ner");
}

/// ModernBERT: regex targets on the fused Wqkv and both GeGLU halves of Wi, rsLoRA.
#[test]
fn modernbert_token_adapter_in_a_mixed_batch() {
    check_token_adapter_mixed("modernbert-ner", "modernbert-ner");
}

#[test]
fn offline_score_through_a_reranker_adapter() {
    let llm = Llm::new(lora_args("xlmr-rerank", &[])).expect("load");
    let reference = lora_reference("xlmr-rerank");
    let request = LoraRequest::from_path(lora_dir("xlmr-rerank"));
    for case in reference.cases.iter().filter(|c| c.kind == "pair") {
        let q = vec![case.text.clone().expect("text")];
        let d = vec![case.text_pair.clone().expect("text_pair")];
        let scored = llm
            .score_with_lora(&q, &d, None, &TokenizeOptions::default(), Some(&request))
            .expect("score");
        assert_eq!(scored[0].prompt_token_ids, case.input_ids, "{}", case.name);
        assert_close(&case.name, &[scored[0].score], &case.probs, ATOL);
    }
    // A 3-label head cannot score.
    let llm = Llm::new(lora_args("bert-cls", &[])).expect("load");
    let request = LoraRequest::from_path(lora_dir("bert-sentiment"));
    let err = llm
        .score_with_lora(
            &["a".into()],
            &["b".into()],
            None,
            &TokenizeOptions::default(),
            Some(&request),
        )
        .unwrap_err();
    assert!(err.to_string().contains("num_labels == 1"), "{err}");
}
