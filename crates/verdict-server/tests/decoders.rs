//! The Gemma-2 and Granite fixtures served over HTTP: `/classify` on a
//! `Gemma2ForSequenceClassification` (sliding window and attention soft-capping
//! on), and `--convert classify` with `classifier_from_token` on Gemma-2 (final
//! logit soft-cap) and Granite (`logits_scaling`) causal LMs, against
//! transformers' probabilities.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::{json, Value};
use verdict_engine::{Convert, Engine};

/// An engine for a fixture, with the conversion its reference was made with.
fn fixture_engine(name: &'static str) -> Arc<Engine> {
    shared_engine(name, || {
        let path = fixture_dir(name).join("reference.json");
        let raw: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("reference"))
            .expect("reference.json");
        let mut args = engine_args(name);
        let overrides = &raw["engine_args"]["hf_overrides"];
        if !overrides.is_null() {
            args.convert = Convert::Classify;
            args.hf_overrides = Some(overrides.clone());
        }
        args
    })
}

#[track_caller]
fn check_items(body: &Value, cases: &[&Case], reference: &Reference) {
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), cases.len(), "{body}");
    for (i, (item, case)) in data.iter().zip(cases).enumerate() {
        assert_eq!(item["index"], i);
        let probs = floats(&item["probs"]);
        assert_close(&case.name, &probs, &case.probs, ATOL);
        assert_eq!(item["num_classes"], reference.num_labels);
        assert_eq!(
            item["label"].as_str(),
            reference.label_of(&case.probs).as_deref()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma2_and_granite_classify_match_transformers() {
    for name in ["gemma2-cls", "gemma2-lm-2way", "granite-lm-2way"] {
        let s = start(fixture_engine(name), local_config()).await;
        let reference = reference(name);
        let cases = reference.cases_of("text");
        // One prompt per request, then all in one request (one packed batch).
        for case in &cases {
            let body = s
                .post(
                    "/classify",
                    &json!({"model": format!("test/{name}"), "input": case.text}),
                )
                .await;
            check_items(body.ok(), std::slice::from_ref(case), &reference);
        }
        let texts: Vec<&str> = cases.iter().map(|c| c.text.as_deref().unwrap()).collect();
        let body = s.post("/classify", &json!({"input": texts})).await;
        check_items(body.ok(), &cases, &reference);
        let ids: Vec<&Vec<u32>> = cases.iter().map(|c| &c.input_ids).collect();
        let body = s.post("/classify", &json!({"input": ids})).await;
        check_items(body.ok(), &cases, &reference);
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_gemma2_raw_logits_are_the_capped_difference() {
    // from_2_way_softmax on a soft-capped LM: one label whose raw logit is
    // cap*tanh(l_yes/cap) - cap*tanh(l_no/cap), and the probability its sigmoid.
    let name = "gemma2-lm-2way";
    let s = start(fixture_engine(name), local_config()).await;
    let reference = reference(name);
    let long = reference.case("long");
    let body = s
        .post(
            "/pooling",
            &json!({"input": long.text, "task": "classify", "use_activation": false}),
        )
        .await;
    let logits = floats(&body.ok()["data"][0]["data"]);
    assert_close("long raw logit", &logits, &long.logits, ATOL);
    assert!(
        logits[0].abs() <= 2.0 * 2.0,
        "a difference of two capped logits stays within twice the cap: {logits:?}"
    );
    s.stop().await;
}
