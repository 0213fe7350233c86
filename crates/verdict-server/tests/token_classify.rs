//! spec §9.4 (T-ON-01, T-ON-02) and D-06 on bert-cls served with
//! `--pooler-config '{"task": "token_classify"}'`.

mod common;

use std::sync::Arc;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use verdict_engine::{Engine, PoolerConfig};

fn engine() -> Arc<Engine> {
    shared_engine("bert-token", || {
        let mut args = engine_args("bert-cls");
        args.pooler_config =
            PoolerConfig::from_json(&json!({"task": "token_classify"})).expect("pooler config");
        args
    })
}

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(floats).collect()
}

#[track_caller]
fn assert_rows(what: &str, got: &[Vec<f64>], want: &[Vec<f64>]) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_close(&format!("{what} row {i}"), g, w, ATOL);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_token_outputs_match_transformers() {
    // T-ON-01
    let s = start(engine(), local_config()).await;
    let reference = reference("bert-cls");
    let cases = reference.cases_of("text");
    for case in &cases {
        let want = case.token_probs.as_ref().expect("token_probs");
        for task in [Value::Null, json!("token_classify")] {
            let body = s
                .post("/pooling", &json!({"input": case.text, "task": task}))
                .await;
            let body = body.ok();
            let got = rows(&body["data"][0]["data"]);
            assert_eq!(got.len(), case.input_ids.len());
            assert!(got.iter().all(|r| r.len() == reference.num_labels));
            assert_rows(&case.name, &got, want);
            assert_eq!(body["usage"]["prompt_tokens"], case.input_ids.len());
        }
    }
    // Raw per-token logits without the activation; a batch keeps its order.
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_deref().unwrap()).collect();
    let body = s
        .post(
            "/pooling",
            &json!({"input": texts, "use_activation": false}),
        )
        .await;
    let data = body.ok()["data"].as_array().unwrap().clone();
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(data[i]["index"], i);
        assert_rows(
            &case.name,
            &rows(&data[i]["data"]),
            case.token_logits.as_ref().unwrap(),
        );
    }

    // Binary forms carry the [n_tokens, num_labels] shape in the metadata.
    let short = reference.case("short");
    let answer = s
        .post(
            "/pooling",
            &json!({"input": short.text, "encoding_format": "bytes", "endianness": "little"}),
        )
        .await;
    assert_eq!(answer.status, 200);
    let metadata: Value =
        serde_json::from_str(answer.headers["metadata"].to_str().unwrap()).unwrap();
    assert_eq!(
        metadata["data"][0]["shape"],
        json!([short.input_ids.len(), reference.num_labels])
    );
    let flat: Vec<f64> = answer
        .bytes
        .chunks(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let want: Vec<f64> = short.token_probs.as_ref().unwrap().concat();
    assert_close("bytes", &flat, &want, ATOL);
    let body = s
        .post(
            "/pooling",
            &json!({"input": short.text, "encoding_format": "base64", "endianness": "little"}),
        )
        .await;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(body.ok()["data"][0]["data"].as_str().unwrap())
        .unwrap();
    let from_base64: Vec<f64> = decoded
        .chunks(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    assert_close("base64", &from_base64, &flat, BATCH_TOL);

    // /invocations with a prompt goes to /pooling on a token_classify server.
    let invoked = s.post("/invocations", &json!({"input": short.text})).await;
    assert_rows(
        "invocations",
        &rows(&invoked.ok()["data"][0]["data"]),
        short.token_probs.as_ref().unwrap(),
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_errors_and_missing_apis() {
    // T-ON-02, D-06
    let s = start(engine(), local_config()).await;
    let answer = s
        .post("/pooling", &json!({"input": "hello", "task": "classify"}))
        .await;
    answer.expect_error(
        400,
        "BadRequestError",
        "Try switching the model's pooling_task via",
    );
    assert_eq!(
        answer.error_message(),
        "Try switching the model's pooling_task via --pooler-config.task classify."
    );
    for task in ["embed", "token_embed"] {
        s.post("/pooling", &json!({"input": "hello", "task": task}))
            .await
            .expect_error(
                400,
                "BadRequestError",
                &format!("Unsupported task: '{task}'"),
            );
    }
    s.post("/pooling", &json!({"input": "hello", "task": "plugin"}))
        .await
        .expect_error(400, "BadRequestError", "No IOProcessor plugin installed.");

    let answer = s.post("/classify", &json!({"input": "hello"})).await;
    answer.expect_error(
        501,
        "NotImplementedError",
        "The model does not support Classification API",
    );
    let answer = s
        .post("/score", &json!({"queries": "a", "documents": "b"}))
        .await;
    assert_eq!(
        (answer.status, answer.body.clone()),
        (404, json!({"detail": "Not Found"}))
    );
    // An empty BERT prompt is still [CLS] [SEP]: accepted.
    let body = s.post("/pooling", &json!({"input": ""})).await;
    assert_eq!(body.ok()["data"][0]["data"].as_array().unwrap().len(), 2);
    s.stop().await;
}

// DistilBERT and GTE "new" *ForTokenClassification fixtures through /pooling
// (token_classify is their default and only task).

async fn check_token_fixture_routes(fixture: &str) {
    let s = start(
        shared_engine(fixture, || engine_args(fixture)),
        local_config(),
    )
    .await;
    let reference = reference(fixture);
    let cases = reference.cases_of("text");
    for case in &cases {
        let body = s.post("/pooling", &json!({"input": case.text})).await;
        let got = rows(&body.ok()["data"][0]["data"]);
        assert_rows(&case.name, &got, case.token_probs.as_ref().unwrap());
    }
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_deref().unwrap()).collect();
    let body = s
        .post(
            "/pooling",
            &json!({"input": texts, "task": "token_classify", "use_activation": false}),
        )
        .await;
    let data = body.ok()["data"].as_array().unwrap().clone();
    for (i, case) in cases.iter().enumerate() {
        assert_rows(
            &case.name,
            &rows(&data[i]["data"]),
            case.token_logits.as_ref().unwrap(),
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distilbert_token_classification_pooling() {
    check_token_fixture_routes("distilbert-tokens").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gte_new_token_classification_pooling() {
    check_token_fixture_routes("gte-tokens").await;
}
