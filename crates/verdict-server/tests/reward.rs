//! Reward models and STEP pooling on `/pooling`, a decoder cross-encoder
//! whose tokenizer gives pairs token types, and the reranker recipes end to
//! end (fixtures from scripts/make_reward_fixtures.py).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use serde_json::{json, Value};
use verdict_engine::{Convert, Engine, PoolerConfig};

fn reference_json(name: &str) -> Value {
    let path = fixture_dir(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference.json")).expect("json")
}

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().expect("rows").iter().map(floats).collect()
}

#[track_caller]
fn assert_rows(what: &str, got: &[Vec<f64>], want: &[Vec<f64>]) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_close(&format!("{what} row {i}"), g, w, ATOL);
    }
}

fn texts(reference: &Value) -> Vec<String> {
    reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reward_model_per_token_rewards() {
    let s = start(
        shared_engine("qwen2-rm", || engine_args("qwen2-rm")),
        local_config(),
    )
    .await;
    let reference = reference_json("qwen2-rm");
    let inputs = texts(&reference);
    let body = s.post("/pooling", &json!({"input": inputs})).await;
    let body = body.ok();
    for (i, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let got = rows(&body["data"][i]["data"]);
        assert_rows(
            case["name"].as_str().unwrap(),
            &got,
            &rows(&case["token_logits"]),
        );
        // The sequence reward is the last row.
        let last = got.last().unwrap()[0];
        assert!((last - case["sequence_reward"].as_f64().unwrap()).abs() <= ATOL);
    }
    let body = s
        .post(
            "/pooling",
            &json!({"input": inputs[0], "task": "token_classify", "use_activation": true}),
        )
        .await;
    assert_rows(
        "sigmoid",
        &rows(&body.ok()["data"][0]["data"]),
        &rows(&reference["cases"][0]["token_probs"]),
    );
    s.post("/pooling", &json!({"input": "x", "step_tag_id": 3}))
        .await
        .expect_error(
            400,
            "BadRequestError",
            "Task token_classify only supports ['use_activation'] parameters, does not support ['step_tag_id'] parameters",
        );
    s.post("/pooling", &json!({"input": "x", "task": "classify"}))
        .await
        .expect_error(400, "BadRequestError", "Unsupported task: 'classify'");
    // A model that cannot classify has no /classify route (as vLLM).
    let answer = s.post("/classify", &json!({"input": "x"})).await;
    assert_eq!(answer.status, 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_reward_model_step_rows() {
    let s = start(
        shared_engine("qwen2-prm", || engine_args("qwen2-prm")),
        local_config(),
    )
    .await;
    let reference = reference_json("qwen2-prm");
    let inputs = texts(&reference);
    let body = s.post("/pooling", &json!({"input": inputs})).await;
    let body = body.ok();
    let cases = reference["cases"].as_array().unwrap();
    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        assert_rows(
            name,
            &rows(&body["data"][i]["data"]),
            &rows(&case["step_probs"]),
        );
    }
    // Per-request step tag and raw logits.
    let alt = reference["alt_step_tag_id"].as_u64().unwrap();
    let body = s
        .post(
            "/pooling",
            &json!({"input": inputs, "step_tag_id": alt, "use_activation": false}),
        )
        .await;
    let body = body.ok();
    for (i, case) in cases.iter().enumerate() {
        let want: Vec<Vec<f64>> = rows(&case["alt_step_logits"]);
        assert_rows("alt tag", &rows(&body["data"][i]["data"]), &want);
    }
    s.post(
        "/pooling",
        &json!({"input": "x", "returned_token_ids": [0, -1]}),
    )
    .await
    .expect_error(400, "Bad Request", "returned_token_ids");
    s.post(
        "/pooling",
        &json!({"input": "x", "returned_token_ids": [7]}),
    )
    .await
    .expect_error(400, "BadRequestError", "returned_token_ids");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_pooling_from_the_pooler_config() {
    let reference = reference_json("llama-step-lm");
    let engine = shared_engine("llama-step-lm", || {
        let mut args = engine_args("llama-step-lm");
        args.convert = Convert::Classify;
        args.pooler_config =
            PoolerConfig::from_json(&reference["engine_args"]["pooler_config"]).expect("pooler");
        args
    });
    let s = start(engine, local_config()).await;
    let inputs = texts(&reference);
    let body = s.post("/pooling", &json!({"input": inputs})).await;
    let body = body.ok();
    let alt = reference["alt_returned_token_ids"].clone();
    let alt_body = s
        .post(
            "/pooling",
            &json!({"input": inputs, "returned_token_ids": alt}),
        )
        .await;
    let alt_body = alt_body.ok();
    for (i, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        assert_rows(
            "step",
            &rows(&body["data"][i]["data"]),
            &rows(&case["step_probs"]),
        );
        assert_rows(
            "alt columns",
            &rows(&alt_body["data"][i]["data"]),
            &rows(&case["alt_step_probs"]),
        );
    }
    s.stop().await;
}

/// A copy of the shared Qwen tokenizer with the fixture's pair template
/// (type 1 for the second text), as Qwen3-Embedding ships it.
fn pair_template_tokenizer(fixture: &Path) -> PathBuf {
    let shared = fixture.join("../../tokenizers/qwen3");
    let mut tokenizer: Value =
        serde_json::from_str(&std::fs::read_to_string(shared.join("tokenizer.json")).unwrap())
            .unwrap();
    tokenizer["post_processor"] = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("tokenizer_post_processor.json")).unwrap(),
    )
    .unwrap();
    let out = std::env::temp_dir().join(format!("verdict-server-pair-tok-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::copy(
        shared.join("tokenizer_config.json"),
        out.join("tokenizer_config.json"),
    )
    .unwrap();
    out
}

fn pair_score_engine() -> Arc<Engine> {
    shared_engine("qwen2-pair-score", || {
        let mut args = engine_args("qwen2-pair-score");
        let tok = pair_template_tokenizer(&fixture_dir("qwen2-pair-score"));
        args.tokenizer = Some(tok.to_string_lossy().into_owned());
        args
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoder_cross_encoder_scores_pairs_without_token_types() {
    let s = start(pair_score_engine(), local_config()).await;
    let reference = reference_json("qwen2-pair-score");
    let cases = reference["cases"].as_array().unwrap();
    let queries: Vec<&str> = cases.iter().map(|c| c["query"].as_str().unwrap()).collect();
    let docs: Vec<&str> = cases
        .iter()
        .map(|c| c["document"].as_str().unwrap())
        .collect();
    let want: Vec<f64> = cases
        .iter()
        .map(|c| c["probs"][0].as_f64().unwrap())
        .collect();
    let tokens: usize = cases
        .iter()
        .map(|c| c["input_ids"].as_array().unwrap().len())
        .sum();

    let body = s
        .post("/score", &json!({"queries": queries, "documents": docs}))
        .await;
    let body = body.ok();
    let got: Vec<f64> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["score"].as_f64().unwrap())
        .collect();
    assert_close("score", &got, &want, ATOL);
    assert_eq!(body["usage"]["prompt_tokens"], tokens);

    for (i, case) in cases.iter().enumerate() {
        let body = s
            .post(
                "/rerank",
                &json!({"query": case["query"], "documents": [case["document"], "unrelated"]}),
            )
            .await;
        let results = body.ok()["results"].as_array().unwrap().clone();
        let doc = results
            .iter()
            .find(|r| r["index"] == 0)
            .expect("document 0");
        assert_close(
            "rerank",
            &[doc["relevance_score"].as_f64().unwrap()],
            &[want[i]],
            ATOL,
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_qwen3_reranker_recipe() {
    let reference = reference_json("qwen3-reranker-template");
    let engine = shared_engine("qwen3-reranker-template", || {
        let dir = fixture_dir("qwen3-reranker-template");
        let mut args = engine_args("qwen3-reranker-template");
        args.hf_overrides = Some(json!({"is_original_qwen3_reranker": true}));
        args.chat_template = Some(dir.join("score_template.jinja").to_string_lossy().into());
        args
    });
    let s = start(engine, local_config()).await;
    for case in reference["cases"].as_array().unwrap() {
        let mut body = json!({"query": case["query"], "documents": [case["document"]]});
        if let Some(instruction) = case["instruction"].as_str() {
            body["instruction"] = json!(instruction);
        }
        let answer = s.post("/rerank", &body).await;
        let got = answer.ok()["results"][0]["relevance_score"]
            .as_f64()
            .unwrap();
        let want = case["probs"][0].as_f64().unwrap();
        assert_close(case["name"].as_str().unwrap(), &[got], &[want], ATOL);
        assert_eq!(
            answer.ok()["usage"]["prompt_tokens"],
            case["input_ids"].as_array().unwrap().len()
        );
        let mut score = json!({"text_1": case["query"], "text_2": case["document"]});
        if let Some(instruction) = case["instruction"].as_str() {
            score["chat_template_kwargs"] = json!({"instruction": instruction});
        }
        let answer = s.post("/score", &score).await;
        let got = answer.ok()["data"][0]["score"].as_f64().unwrap();
        assert_close("score", &[got], &[want], ATOL);
    }
    s.stop().await;
}
