//! Bad input and API behaviour: every failure is one clear error that names
//! the problem, and a bad prompt never affects the others of the same call.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::json;
use verdict_engine::{
    ChatMessage, ChatOptions, Convert, EngineArgs, EngineError, Llm, ParamsArg, PooledData,
    PoolerConfig, PoolingParams, PoolingTask, Prompt, TokenizeOptions, TruncationSide,
};

fn load(name: &str) -> (Llm, Reference) {
    let dir = fixture_dir(name);
    let reference = load_reference(&dir);
    (
        Llm::new(engine_args(&dir, &reference)).expect("load fixture"),
        reference,
    )
}

fn load_with(name: &str, edit: impl FnOnce(&mut EngineArgs)) -> Result<Llm, EngineError> {
    let dir = fixture_dir(name);
    let reference = load_reference(&dir);
    let mut args = engine_args(&dir, &reference);
    edit(&mut args);
    Llm::new(args)
}

fn err_text<T>(r: Result<T, EngineError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// A writable copy of a fixture (symlinks resolved) to break on purpose.
fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let src = fixture_dir(name);
    let dst = std::env::temp_dir().join(format!("verdict-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    dst
}

fn args_for(dir: &Path) -> EngineArgs {
    let mut a = EngineArgs::new(dir.to_string_lossy());
    a.device = verdict_engine::DeviceArg::Cpu;
    a
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(path, serde_json::to_string(&cfg).unwrap()).unwrap();
}

#[test]
fn missing_model_directory_and_files() {
    let msg = err_text(Llm::new(args_for(Path::new("/nonexistent/model/dir"))));
    assert!(msg.contains("/nonexistent/model/dir"), "{msg}");

    let dir = copy_fixture("bert-cls", "nocfg");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let msg = err_text(Llm::new(args_for(&dir)));
    assert!(msg.contains("config.json"), "{msg}");

    let dir = copy_fixture("bert-cls", "noweights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let msg = err_text(Llm::new(args_for(&dir)));
    assert!(msg.contains("model.safetensors"), "{msg}");

    let dir = copy_fixture("bert-cls", "notok");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let msg = err_text(Llm::new(args_for(&dir)));
    assert!(msg.contains("tokenizer.json"), "{msg}");
}

#[test]
fn unknown_architecture_lists_supported_ones() {
    let dir = copy_fixture("bert-cls", "arch");
    edit_config(&dir, |c| {
        c["architectures"] = json!(["FancyNetForSequenceClassification"])
    });
    let msg = err_text(Llm::new(args_for(&dir)));
    assert!(msg.contains("FancyNetForSequenceClassification"), "{msg}");
    assert!(
        msg.contains("Qwen2ForSequenceClassification")
            && msg.contains("BertForSequenceClassification"),
        "{msg}"
    );
}

#[test]
fn corrupt_and_truncated_safetensors() {
    let dir = copy_fixture("bert-cls", "corrupt");
    std::fs::write(
        dir.join("model.safetensors"),
        b"definitely not a safetensors file",
    )
    .unwrap();
    let msg = err_text(Llm::new(args_for(&dir)));
    assert!(msg.contains("not a valid safetensors file"), "{msg}");

    let dir = copy_fixture("bert-cls", "truncated");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = err_text(Llm::new(args_for(&dir)));
    assert!(msg.contains("corrupt or truncated"), "{msg}");
}

#[test]
fn mis_shaped_weight_names_tensor_and_both_shapes() {
    let dir = copy_fixture("bert-cls", "shape");
    edit_config(&dir, |c| {
        c["id2label"] = json!({"0": "a", "1": "b", "2": "c", "3": "d", "4": "e"});
        c["label2id"] = json!({"a": 0, "b": 1, "c": 2, "d": 3, "e": 4});
    });
    let msg = err_text(Llm::new(args_for(&dir)));
    assert!(
        msg.contains("classifier.weight") && msg.contains("[3, ") && msg.contains("[5, "),
        "{msg}"
    );

    let dir = copy_fixture("qwen2-cls", "missing");
    edit_config(&dir, |c| c["num_hidden_layers"] = json!(5));
    let msg = err_text(Llm::new(args_for(&dir)));
    assert!(
        msg.contains("missing weight") && msg.contains("layers.2."),
        "{msg}"
    );
}

#[test]
fn config_without_labels_is_an_error() {
    let dir = copy_fixture("bert-cls", "nolabels");
    edit_config(&dir, |c| {
        c["id2label"] = json!({});
        c["label2id"] = json!({});
    });
    let msg = err_text(Llm::new(args_for(&dir)));
    assert!(msg.contains("no labels"), "{msg}");
}

#[test]
fn generative_checkpoints_need_convert() {
    let msg = err_text(load_with("qwen3-reranker", |a| a.convert = Convert::Auto));
    assert!(msg.contains("--convert classify"), "{msg}");
    let msg = err_text(load_with("qwen3-reranker", |a| {
        a.hf_overrides = Some(
            json!({"classifier_from_token": ["no", "definitely-not-a-token"], "method": "from_2_way_softmax"}),
        )
    }));
    assert!(msg.contains("definitely-not-a-token"), "{msg}");
    let msg = err_text(load_with("qwen2-causal-score", |a| {
        a.hf_overrides = Some(json!({"id2label": {"0": "a", "1": "b", "2": "c"}}))
    }));
    assert!(msg.contains("score.weight"), "{msg}");
}

#[test]
fn chat_needs_a_template() {
    let (llm, _) = load("bert-cls");
    let prompt = Prompt::Chat {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: json!("hi"),
            extra: Default::default(),
        }],
        options: ChatOptions::default(),
    };
    let msg = err_text(llm.classify(&[prompt], ParamsArg::Default, &TokenizeOptions::default()));
    assert!(msg.contains("chat template"), "{msg}");
}

#[test]
fn bad_prompts_fail_alone() {
    let reference = load_reference(&fixture_dir("qwen2-cls"));
    let llm = load_with("qwen2-cls", |a| a.max_model_len = Some(512)).unwrap();
    let good = reference.cases.iter().find(|c| c.kind == "text").unwrap();
    let vocab = llm.info().vocab_size as u32;
    let prompts = vec![
        Prompt::from(good.text.clone().unwrap()),
        Prompt::from(vec![1, 2, vocab + 7]),
        Prompt::from(""),
        Prompt::from("hello ".repeat(700)),
        Prompt::from(good.text.clone().unwrap()),
    ];
    let results = llm
        .engine_each(&prompts)
        .into_iter()
        .map(|r| r.map(|o| o.outputs))
        .collect::<Vec<_>>();
    let PooledData::Vector(first) = results[0].as_ref().expect("good prompt") else {
        panic!()
    };
    assert_close("good prompt beside bad ones", first, &good.probs, 1e-4);
    assert_eq!(results[4].as_ref().unwrap(), results[0].as_ref().unwrap());
    let e1 = results[1].as_ref().unwrap_err().to_string();
    assert!(
        e1.contains(&format!("Token id {}", vocab + 7)) && e1.contains("out of vocabulary"),
        "{e1}"
    );
    assert_eq!(
        results[2].as_ref().unwrap_err().to_string(),
        "The decoder prompt cannot be empty"
    );
    let e3 = results[3].as_ref().unwrap_err().to_string();
    assert!(
        e3.starts_with("This model's maximum context length is 512 tokens."),
        "{e3}"
    );
    // The all-or-nothing API fails as a whole on the first bad prompt, as vLLM does.
    assert!(llm
        .classify(&prompts, ParamsArg::Default, &TokenizeOptions::default())
        .is_err());
}

trait EachExt {
    fn engine_each(
        &self,
        prompts: &[Prompt],
    ) -> Vec<Result<verdict_engine::PoolingRequestOutput, EngineError>>;
}

impl EachExt for Llm {
    fn engine_each(
        &self,
        prompts: &[Prompt],
    ) -> Vec<Result<verdict_engine::PoolingRequestOutput, EngineError>> {
        self.encode_each(
            prompts,
            ParamsArg::Default,
            Some(PoolingTask::Classify),
            &TokenizeOptions::default(),
            None,
            &|_| {},
        )
        .expect("call-level checks pass")
    }
}

#[test]
fn length_rules_and_truncation() {
    let llm = load_with("qwen2-cls", |a| a.max_model_len = Some(512)).unwrap();
    let long = Prompt::from("hello ".repeat(600));
    let msg = err_text(llm.classify(
        std::slice::from_ref(&long),
        ParamsArg::Default,
        &TokenizeOptions::default(),
    ));
    assert_eq!(
        msg,
        "This model's maximum context length is 512 tokens. However, you requested 0 output tokens and your prompt \
         contains at least 513 input tokens, for a total of at least 513 tokens. Please reduce the length of the \
         input prompt or the number of requested output tokens. (parameter=input_tokens, value=513)"
    );
    let five = TokenizeOptions {
        truncate_prompt_tokens: Some(5),
        ..Default::default()
    };
    let out = llm
        .classify(std::slice::from_ref(&long), ParamsArg::Default, &five)
        .unwrap();
    assert_eq!(out[0].prompt_token_ids.len(), 5);
    let all = TokenizeOptions {
        truncate_prompt_tokens: Some(-1),
        ..Default::default()
    };
    let out = llm
        .classify(std::slice::from_ref(&long), ParamsArg::Default, &all)
        .unwrap();
    assert_eq!(out[0].prompt_token_ids.len(), 512);
    let too_big = TokenizeOptions {
        truncate_prompt_tokens: Some(513),
        ..Default::default()
    };
    assert_eq!(
        err_text(llm.classify(&[Prompt::from("test")], ParamsArg::Default, &too_big)),
        "truncate_prompt_tokens value is greater than max_model_len. Please request a smaller truncation size."
    );
    // Token-id prompts are sliced raw; left keeps the end.
    let ids: Vec<u32> = (100..120).collect();
    let left = TokenizeOptions {
        truncate_prompt_tokens: Some(4),
        truncation_side: Some(TruncationSide::Left),
        ..Default::default()
    };
    let out = llm
        .classify(&[Prompt::from(ids.clone())], ParamsArg::Default, &left)
        .unwrap();
    assert_eq!(out[0].prompt_token_ids, vec![116, 117, 118, 119]);
    let right = TokenizeOptions {
        truncate_prompt_tokens: Some(4),
        ..Default::default()
    };
    let out = llm
        .classify(&[Prompt::from(ids)], ParamsArg::Default, &right)
        .unwrap();
    assert_eq!(out[0].prompt_token_ids, vec![100, 101, 102, 103]);
}

#[test]
fn a_multi_megabyte_prompt_costs_only_what_is_kept() {
    let llm = load_with("qwen2-cls", |a| a.max_model_len = Some(512)).unwrap();
    // 16 MB: tokenizing all of it used to take many seconds and gigabytes.
    let sentence = "The quick brown fox jumps over the lazy dog, again and again. ";
    let huge = Prompt::from(sentence.repeat(260_000));
    // Both ends of the huge text are this text: the same 512 tokens are kept.
    let short = Prompt::from(sentence.repeat(129));
    for side in [TruncationSide::Right, TruncationSide::Left] {
        let opts = TokenizeOptions {
            truncate_prompt_tokens: Some(-1),
            truncation_side: Some(side),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let out = llm
            .classify(std::slice::from_ref(&huge), ParamsArg::Default, &opts)
            .unwrap();
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(3),
            "{side:?}: {took:?}"
        );
        assert_eq!(out[0].prompt_token_ids.len(), 512);
        let same = llm
            .classify(std::slice::from_ref(&short), ParamsArg::Default, &opts)
            .unwrap();
        assert_eq!(
            out[0].prompt_token_ids, same[0].prompt_token_ids,
            "{side:?}"
        );
    }
    // Without truncation it is refused from its length, before tokenizing.
    let started = std::time::Instant::now();
    let msg = err_text(llm.classify(&[huge], ParamsArg::Default, &TokenizeOptions::default()));
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    assert!(
        msg.starts_with("This model's maximum context length is 512 tokens. However, you requested 0 output tokens and your prompt contains 16120000 characters"),
        "{msg}"
    );
}

#[test]
fn bert_truncation_keeps_special_tokens() {
    let (llm, _) = load("bert-cls");
    let opts = TokenizeOptions {
        truncate_prompt_tokens: Some(4),
        ..Default::default()
    };
    let out = llm
        .classify(
            &[Prompt::from("one two three four five six")],
            ParamsArg::Default,
            &opts,
        )
        .unwrap();
    let ids = &out[0].prompt_token_ids;
    assert_eq!(ids.len(), 4);
    assert_eq!(
        (ids[0], ids[3]),
        (101, 102),
        "[CLS] ... [SEP] kept: {ids:?}"
    );
    // An empty text still has [CLS][SEP] for BERT and is accepted.
    assert!(llm
        .classify(
            &[Prompt::from("")],
            ParamsArg::Default,
            &TokenizeOptions::default()
        )
        .is_ok());
}

#[test]
fn call_level_errors_match_vllm() {
    let (llm, _) = load("qwen2-cls");
    let tok = TokenizeOptions::default();
    assert_eq!(
        err_text(llm.classify(&[], ParamsArg::Default, &tok)),
        "You must pass at least one prompt"
    );
    let three = vec![PoolingParams::default(); 3];
    let four: Vec<Prompt> = (0..4).map(|i| Prompt::from(format!("p{i}"))).collect();
    assert_eq!(
        err_text(llm.classify(&four, ParamsArg::PerPrompt(&three), &tok)),
        "The lengths of prompts (4) and params (3) must be the same."
    );
    let p = [Prompt::from("The chef prepared a delicious meal.")];
    assert!(err_text(llm.encode(
        &p,
        ParamsArg::Default,
        Some(PoolingTask::TokenClassify),
        &tok
    ))
    .starts_with("Try switching the model's pooling_task via"));
    assert!(
        err_text(llm.encode(&p, ParamsArg::Default, Some(PoolingTask::Embed), &tok))
            .starts_with("Embedding API is not supported by this model.")
    );
    assert!(
        err_text(llm.encode(&p, ParamsArg::Default, Some(PoolingTask::Plugin), &tok))
            .starts_with("No IOProcessor plugin installed.")
    );
    assert!(err_text(llm.encode(&p, ParamsArg::Default, None, &tok))
        .starts_with("pooling_task required"));
    assert_eq!(
        err_text(llm.score(&["ping".into()], &["pong".into()], None, &tok)),
        "Scoring API is only enabled for num_labels == 1."
    );
    let dims = PoolingParams {
        dimensions: Some(3),
        ..Default::default()
    };
    assert!(err_text(llm.classify(&p, ParamsArg::All(&dims), &tok))
        .contains("does not support ['dimensions']"));
}

#[test]
fn use_activation_relations() {
    let (llm, _) = load("qwen2-cls");
    let tok = TokenizeOptions::default();
    let p = [Prompt::from(
        "This product was excellent and exceeded my expectations",
    )];
    let get = |ua: Option<bool>| {
        let params = PoolingParams {
            use_activation: ua,
            ..Default::default()
        };
        llm.classify(&p, ParamsArg::All(&params), &tok).unwrap()[0]
            .probs
            .clone()
    };
    let (none, on, off) = (get(None), get(Some(true)), get(Some(false)));
    assert_eq!(none, on);
    assert_ne!(on, off);
    let m = off.iter().copied().fold(f32::MIN, f32::max);
    let exps: Vec<f32> = off.iter().map(|v| (v - m).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let softmax: Vec<f32> = exps.iter().map(|e| e / sum).collect();
    assert_close("softmax(raw) == probs", &softmax, &on, 1e-6);
}

#[test]
fn scoring_pairs_and_calibration() {
    let (llm, reference) = load("xlmr-rerank");
    let tok = TokenizeOptions::default();
    let pair = reference.cases.iter().find(|c| c.kind == "pair").unwrap();
    let q = pair.text.clone().unwrap();
    let d = pair.text_pair.clone().unwrap();
    let one = llm
        .score(
            std::slice::from_ref(&q),
            std::slice::from_ref(&d),
            None,
            &tok,
        )
        .unwrap();
    assert_eq!(one[0].prompt_token_ids, pair.input_ids);
    assert_close("1:1 score", &[one[0].score], &pair.probs, 1e-4);
    let many = llm
        .score(
            std::slice::from_ref(&q),
            &[d.clone(), "other".into(), d.clone()],
            None,
            &tok,
        )
        .unwrap();
    assert_eq!(many.len(), 3);
    // The same pair twice in one batch, and alone: equal up to float summation order.
    assert_close("same pair twice", &[many[0].score], &[many[2].score], 1e-6);
    assert_close("same pair alone", &[many[0].score], &[one[0].score], 1e-6);
    let zipped = llm
        .score(&[q.clone(), q.clone()], &[d.clone(), d.clone()], None, &tok)
        .unwrap();
    assert_eq!(zipped.len(), 2);
    assert_eq!(
        err_text(llm.score(
            &[q.clone(), q.clone()],
            &[d.clone(), d.clone(), d.clone()],
            None,
            &tok
        )),
        "Input lengths must be either 1:1, 1:N or N:N"
    );
    let capped = PoolingParams {
        max_tokens_per_doc: 2,
        ..Default::default()
    };
    let short = llm
        .score(
            std::slice::from_ref(&q),
            std::slice::from_ref(&d),
            Some(&capped),
            &tok,
        )
        .unwrap();
    assert!(short[0].prompt_token_ids.len() < one[0].prompt_token_ids.len());

    // logit_mean / logit_sigma calibrate before the sigmoid.
    let calibrated = load_with("xlmr-rerank", |a| {
        a.pooler_config =
            PoolerConfig::from_str_arg(r#"{"logit_mean": 4.5, "logit_sigma": 2.0}"#).unwrap()
    })
    .unwrap();
    let got = calibrated.score(&[q], &[d], None, &tok).unwrap()[0].score;
    let want = 1.0 / (1.0 + (-(pair.logits[0] - 4.5) / 2.0).exp());
    assert_close("calibrated", &[got], &[want], 1e-5);
}

#[test]
fn problem_type_overrides_pick_the_activation() {
    let (_, reference) = load("qwen2-cls");
    let case = reference.cases.iter().find(|c| c.kind == "text").unwrap();
    let p = [Prompt::from(case.text.clone().unwrap())];
    let tok = TokenizeOptions::default();
    let multi = load_with("qwen2-cls", |a| {
        a.hf_overrides = Some(json!({"problem_type": "multi_label_classification"}))
    })
    .unwrap();
    let probs = multi.classify(&p, ParamsArg::Default, &tok).unwrap()[0]
        .probs
        .clone();
    let sig: Vec<f32> = case
        .logits
        .iter()
        .map(|l| 1.0 / (1.0 + (-l).exp()))
        .collect();
    assert_close("multi-label sigmoid", &probs, &sig, 1e-5);
    let reg = load_with("qwen2-cls", |a| {
        a.hf_overrides = Some(json!({"problem_type": "regression"}))
    })
    .unwrap();
    let values = reg.classify(&p, ParamsArg::Default, &tok).unwrap()[0]
        .probs
        .clone();
    assert_close("regression identity", &values, &case.logits, 1e-4);
}

#[test]
fn mean_pooling_is_configurable() {
    let tok = TokenizeOptions::default();
    let p = [Prompt::from("mean pooling differs from last-token pooling")];
    let last = load_with("qwen2-cls", |_| {})
        .unwrap()
        .classify(&p, ParamsArg::Default, &tok)
        .unwrap();
    let mean = load_with("qwen2-cls", |a| {
        a.pooler_config = PoolerConfig::from_str_arg(r#"{"pooling_type": "MEAN"}"#).unwrap()
    })
    .unwrap()
    .classify(&p, ParamsArg::Default, &tok)
    .unwrap();
    assert_ne!(last[0].probs, mean[0].probs);
    let sum: f32 = mean[0].probs.iter().sum();
    assert!((sum - 1.0).abs() < 1e-5);
}

#[test]
fn token_classification_one_row_per_token() {
    let llm = load_with("bert-cls", |a| {
        a.pooler_config = PoolerConfig {
            task: Some(PoolingTask::TokenClassify),
            ..Default::default()
        }
    })
    .unwrap();
    let tok = TokenizeOptions::default();
    let out = llm
        .encode(
            &[Prompt::from("The chef prepared a delicious meal.")],
            ParamsArg::Default,
            Some(PoolingTask::TokenClassify),
            &tok,
        )
        .unwrap();
    let PooledData::Matrix(rows) = &out[0].outputs else {
        panic!("matrix expected")
    };
    assert_eq!(rows.len(), out[0].prompt_token_ids.len());
    assert!(rows
        .iter()
        .all(|r| r.len() == 3 && (r.iter().sum::<f32>() - 1.0).abs() < 1e-5));
    assert!(
        err_text(llm.classify(&[Prompt::from("x")], ParamsArg::Default, &tok))
            .starts_with("Try switching the model's pooling_task via")
    );
}

#[test]
fn many_prompts_across_many_batches_keep_order() {
    let llm = load_with("gpt2-cls", |a| {
        a.max_num_batched_tokens = Some(1024);
        a.max_model_len = Some(512);
        a.max_num_seqs = Some(7);
    })
    .unwrap();
    let tok = TokenizeOptions::default();
    let prompts: Vec<Prompt> = (0..300)
        .map(|i| Prompt::from(format!("prompt number {i} {}", "x ".repeat(i % 50))))
        .collect();
    let all = llm.classify(&prompts, ParamsArg::Default, &tok).unwrap();
    for i in [0usize, 17, 150, 299] {
        let alone = llm
            .classify(std::slice::from_ref(&prompts[i]), ParamsArg::Default, &tok)
            .unwrap();
        assert_eq!(alone[0].prompt_token_ids, all[i].prompt_token_ids);
        assert_close(&format!("prompt {i}"), &alone[0].probs, &all[i].probs, 1e-5);
    }
}

/// An offline call driven in slices (the Python API's way): progress counts up
/// to every prompt, and a cancelled call stops early, its queued prompts dropped
/// and reported as cancelled; the engine then serves the next call as usual.
#[test]
fn pending_calls_report_progress_and_cancel() {
    use std::time::Duration;
    use verdict_engine::InvalidPrompt;

    let (llm, _) = load("bert-cls");
    let tok = TokenizeOptions::default();
    let prompts: Vec<Prompt> = (0..3000)
        .map(|i| Prompt::from(format!("prompt number {i} with a few more words")))
        .collect();
    let want = llm
        .classify(&prompts[..50], ParamsArg::Default, &tok)
        .expect("classify");

    let mut call = llm
        .start_encode(
            &prompts,
            ParamsArg::Default,
            Some(PoolingTask::Classify),
            &tok,
            InvalidPrompt::FailCall,
        )
        .expect("start");
    assert_eq!(call.total(), 3000);
    let mut seen = Vec::new();
    while !call.wait(Duration::from_millis(5)) {
        seen.push(call.done());
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "progress only grows");
    assert_eq!(call.done(), 3000);
    let outputs = call.finish().expect("finished call");
    assert_eq!(outputs.len(), 3000);
    for (o, w) in outputs.iter().zip(&want) {
        let PooledData::Vector(probs) = &o.as_ref().expect("output").outputs else {
            panic!("expected a vector");
        };
        assert_eq!(probs, &w.probs);
    }

    let mut call = llm
        .start_encode(
            &prompts,
            ParamsArg::Default,
            Some(PoolingTask::Classify),
            &tok,
            InvalidPrompt::FailCall,
        )
        .expect("start");
    call.wait(Duration::from_millis(1));
    call.cancel();
    assert!(call.is_finished());
    let outputs = call
        .finish()
        .expect("a cancelled call still returns per-prompt results");
    let cancelled = outputs
        .iter()
        .filter(|o| matches!(o, Err(e) if e.to_string() == "the call was cancelled"))
        .count();
    assert!(cancelled > 0, "nothing was cancelled");
    assert!(outputs
        .iter()
        .all(|o| o.is_ok() || matches!(o, Err(e) if e.to_string() == "the call was cancelled")));

    // An invalid prompt fails the call as a whole and stops its queued work.
    let mut bad = prompts[..600].to_vec();
    bad[500] = Prompt::from("word ".repeat(2000));
    let err = err_text(llm.classify(&bad, ParamsArg::Default, &tok));
    assert!(
        err.starts_with("This model's maximum context length is"),
        "{err}"
    );
    let again = llm
        .classify(&prompts[..50], ParamsArg::Default, &tok)
        .expect("classify after cancel");
    assert_eq!(again.len(), 50);
    assert_eq!(again[7].probs, want[7].probs);
}
