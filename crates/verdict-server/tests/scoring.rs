//! spec §9.5 (S-ON-01..09) on the xlmr-rerank cross-encoder fixture
//! (num_labels 1, sigmoid), served with max_model_len 100 as the vLLM test does.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::{json, Value};
use verdict_engine::Engine;

const MODEL: &str = "test/xlmr-rerank";
const MAX_MODEL_LEN: usize = 100;

fn engine() -> Arc<Engine> {
    shared_engine("xlmr", || {
        let mut args = engine_args("xlmr-rerank");
        args.max_model_len = Some(MAX_MODEL_LEN);
        args
    })
}

async fn server() -> TestServer {
    start(engine(), local_config()).await
}

fn pair_cases(reference: &Reference) -> Vec<&Case> {
    reference.cases_of("pair")
}

fn scores(body: &Value) -> Vec<f64> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["score"].as_f64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_tokenize_and_classify() {
    // S-ON-01, D-07 (num_labels 1: sigmoid, label LABEL_0)
    let s = server().await;
    let reference = reference("xlmr-rerank");
    assert_eq!(s.get("/v1/models").await.ok()["data"][0]["id"], MODEL);
    for case in reference.cases_of("text") {
        let body = s.post("/tokenize", &json!({"prompt": case.text})).await;
        assert_eq!(body.ok()["tokens"], json!(case.input_ids), "{}", case.name);
        if case.input_ids.len() > MAX_MODEL_LEN {
            continue;
        }
        let body = s.post("/classify", &json!({"input": case.text})).await;
        let item = &body.ok()["data"][0];
        assert_close(&case.name, &floats(&item["probs"]), &case.probs, ATOL);
        assert_eq!(item["label"], "LABEL_0");
        assert_eq!(item["num_classes"], 1);
    }
    // S-ON-07
    let short = reference.case("short");
    let body = s
        .post(
            "/pooling",
            &json!({"input": short.text, "task": "classify"}),
        )
        .await;
    assert_eq!(body.ok()["data"][0]["data"].as_array().unwrap().len(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_body_variants_and_shapes() {
    // S-ON-02
    let s = server().await;
    let reference = reference("xlmr-rerank");
    let pairs = pair_cases(&reference);
    let queries: Vec<&str> = pairs.iter().map(|c| c.text.as_deref().unwrap()).collect();
    let documents: Vec<&str> = pairs
        .iter()
        .map(|c| c.text_pair.as_deref().unwrap())
        .collect();
    let want: Vec<f64> = pairs.iter().map(|c| c.probs[0]).collect();
    let tokens: usize = pairs.iter().map(|c| c.input_ids.len()).sum();

    // N:N in every body variant.
    for (a, b) in [
        ("queries", "documents"),
        ("queries", "items"),
        ("data_1", "data_2"),
        ("text_1", "text_2"),
    ] {
        let body = s
            .post("/score", &json!({"model": MODEL, a: queries, b: documents}))
            .await;
        let body = body.ok();
        assert_close(&format!("{a}/{b}"), &scores(body), &want, ATOL);
        assert!(body["id"].as_str().unwrap().starts_with("score-"));
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], MODEL);
        assert_eq!(body["data"][1]["object"], "score");
        assert_eq!(body["data"][1]["index"], 1);
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": null})
        );
    }
    // 1:1 with plain strings, and 1:N replicating the query.
    let first = pairs[0];
    let body = s
        .post(
            "/v1/score",
            &json!({"queries": first.text, "documents": first.text_pair}),
        )
        .await;
    assert_close("1:1", &scores(body.ok()), &[first.probs[0]], ATOL);
    let body = s
        .post(
            "/score",
            &json!({"queries": first.text, "documents": [first.text_pair, pairs[1].text_pair]}),
        )
        .await;
    let one_to_n = scores(body.ok());
    assert_eq!(one_to_n.len(), 2);
    assert_close("1:N first", &one_to_n[..1], &[first.probs[0]], ATOL);
    let single = s
        .post(
            "/score",
            &json!({"queries": first.text, "documents": pairs[1].text_pair}),
        )
        .await;
    assert_close(
        "1:N second",
        &one_to_n[1..],
        &scores(single.ok()),
        BATCH_TOL,
    );

    s.post(
        "/score",
        &json!({"queries": ["a", "b"], "documents": ["c", "d", "e"]}),
    )
    .await
    .expect_error(
        400,
        "BadRequestError",
        "Input lengths must be either 1:1, 1:N or N:N",
    );
    s.post("/score", &json!({"queries": "a", "documents": []}))
        .await
        .expect_error(
            400,
            "BadRequestError",
            "At least one text_pair element must be given",
        );
    s.post("/score", &json!({"queries": [], "documents": "a"}))
        .await
        .expect_error(
            400,
            "BadRequestError",
            "At least one text element must be given",
        );
    s.post("/score", &json!({"queries": "a"}))
        .await
        .expect_error(400, "Bad Request", "missing");
    s.post(
        "/score",
        &json!({"queries": "a", "documents": {"content": [{"type": "image_url"}]}}),
    )
    .await
    .expect_error(
        400,
        "BadRequestError",
        "MultiModalParam is not supported for XLMRobertaForSequenceClassification",
    );
    s.post(
        "/score",
        &json!({"queries": "a", "documents": "b", "model": "nope"}),
    )
    .await
    .expect_error(404, "NotFoundError", "The model `nope` does not exist.");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_sorts_and_limits() {
    // S-ON-03, S-ON-05
    let s = server().await;
    let reference = reference("xlmr-rerank");
    let query = "What is the capital of France?";
    let documents = [
        "The capital of Brazil is Brasilia.",
        "The capital of France is Paris.",
        "Bananas are rich in potassium and grow in tropical climates.",
    ];
    let expected = scores(
        s.post("/score", &json!({"queries": query, "documents": documents}))
            .await
            .ok(),
    );
    let irrelevant = reference.case("pair_irrelevant");
    assert_close(
        "reference pair",
        &expected[2..],
        &[irrelevant.probs[0]],
        ATOL,
    );

    for path in ["/rerank", "/v1/rerank", "/v2/rerank"] {
        let answer = s
            .post(
                path,
                &json!({"model": MODEL, "query": query, "documents": documents}),
            )
            .await;
        let body = answer.ok();
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "model", "usage", "results"]);
        assert!(body["id"].as_str().unwrap().starts_with("score-"));
        let usage = body["usage"].as_object().unwrap();
        assert_eq!(usage.len(), 2, "{usage:?}");
        assert_eq!(usage["prompt_tokens"], usage["total_tokens"]);
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), 3);
        let got: Vec<f64> = results
            .iter()
            .map(|r| r["relevance_score"].as_f64().unwrap())
            .collect();
        assert!(got.windows(2).all(|w| w[0] >= w[1]), "{got:?}");
        for r in results {
            let index = r["index"].as_u64().unwrap() as usize;
            assert_close(
                "rerank",
                &[r["relevance_score"].as_f64().unwrap()],
                &expected[index..=index],
                BATCH_TOL,
            );
            assert_eq!(
                r["document"],
                json!({"text": documents[index], "multi_modal": null})
            );
        }
    }
    let top = s
        .post(
            "/rerank",
            &json!({"query": query, "documents": documents, "top_n": 2}),
        )
        .await;
    assert_eq!(top.ok()["results"].as_array().unwrap().len(), 2);
    let all = s
        .post(
            "/rerank",
            &json!({"query": query, "documents": documents, "top_n": 10, "return_documents": false}),
        )
        .await;
    assert_eq!(all.ok()["results"].as_array().unwrap().len(), 3);

    // S-ON-05: /invocations with rerank and score bodies.
    let rerank_body = json!({"query": query, "documents": documents});
    let direct = s.post("/rerank", &rerank_body).await;
    let invoked = s.post("/invocations", &rerank_body).await;
    assert_json_close(
        "invocations rerank",
        &stable_part(invoked.ok()),
        &stable_part(direct.ok()),
        BATCH_TOL,
    );
    let score_body = json!({"queries": query, "documents": documents});
    let invoked = s.post("/invocations", &score_body).await;
    assert_close(
        "invocations score",
        &scores(invoked.ok()),
        &expected,
        BATCH_TOL,
    );
    let classify_body = json!({"input": query});
    let invoked = s.post("/invocations", &classify_body).await;
    assert!(invoked.ok()["id"]
        .as_str()
        .unwrap()
        .starts_with("classify-"));
    s.post("/invocations", &json!({"nothing": 1}))
        .await
        .expect_error(400, "BadRequestError", "Cannot find suitable handler");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lengths_limits_and_activation() {
    // S-ON-04, S-ON-06, S-ON-08, S-ON-09
    let s = server().await;
    let long_query = "What is the capital of France? ".repeat(100);
    s.post(
        "/rerank",
        &json!({"query": long_query, "documents": ["Paris.", "Berlin."]}),
    )
    .await
    .expect_error(
        400,
        "BadRequestError",
        "Please reduce the length of the input prompt",
    );
    let query20 = "What is the capital of France? ".repeat(20);
    s.post(
        "/score",
        &json!({"queries": query20, "documents": "Paris."}),
    )
    .await
    .expect_error(
        400,
        "BadRequestError",
        "Please reduce the length of the input prompt",
    );
    s.post(
        "/score",
        &json!({"queries": query20, "documents": "Paris.", "truncate_prompt_tokens": 101}),
    )
    .await
    .expect_error(
        400,
        "BadRequestError",
        "Please request a smaller truncation size.",
    );
    let truncated = s
        .post(
            "/score",
            &json!({"queries": query20, "documents": "Paris.", "truncate_prompt_tokens": 50}),
        )
        .await;
    assert_eq!(truncated.ok()["usage"]["prompt_tokens"], 50);

    // S-ON-06: use_activation on rerank.
    let reference = reference("xlmr-rerank");
    let pair = reference.case("pair_relevant");
    let request = |act: Value| json!({"query": pair.text, "documents": [pair.text_pair], "use_activation": act});
    let relevance = |body: &Value| body["results"][0]["relevance_score"].as_f64().unwrap();
    let null = s.post("/rerank", &request(Value::Null)).await;
    let on = s.post("/rerank", &request(json!(true))).await;
    let off = s.post("/rerank", &request(json!(false))).await;
    assert_close(
        "null vs true",
        &[relevance(null.ok())],
        &[relevance(on.ok())],
        BATCH_TOL,
    );
    let raw = relevance(off.ok());
    assert_close("raw", &[raw], &pair.logits, ATOL);
    assert_close(
        "sigmoid(raw)",
        &[sigmoid(raw)],
        &[relevance(&on.body)],
        1e-6,
    );
    assert_close("activated", &[relevance(&on.body)], &pair.probs, ATOL);

    // S-ON-08: max_tokens_per_doc.
    let document =
        "The capital of France is Paris, a city on the Seine with many museums and bridges.";
    let prompt_tokens = |body: &Value| body["usage"]["prompt_tokens"].as_u64().unwrap();
    let unlimited = s
        .post(
            "/rerank",
            &json!({"query": "capital?", "documents": [document], "truncate_prompt_tokens": 99}),
        )
        .await;
    let limited = s
        .post(
            "/rerank",
            &json!({"query": "capital?", "documents": [document], "max_tokens_per_doc": 10}),
        )
        .await;
    assert!(prompt_tokens(limited.ok()) < prompt_tokens(unlimited.ok()));
    let zero = s
        .post(
            "/rerank",
            &json!({"query": "capital?", "documents": [document], "max_tokens_per_doc": 0}),
        )
        .await;
    assert_eq!(prompt_tokens(zero.ok()), prompt_tokens(&unlimited.body));
    s.post(
        "/rerank",
        &json!({"query": "q", "documents": ["d"], "max_tokens_per_doc": -5}),
    )
    .await
    .expect_error(
        400,
        "BadRequestError",
        "max_tokens_per_doc must be a non-negative integer",
    );
    s.post(
        "/score",
        &json!({"queries": "q", "documents": "d", "max_tokens_per_doc": MAX_MODEL_LEN}),
    )
    .await
    .expect_error(
        400,
        "BadRequestError",
        &format!("max_tokens_per_doc ({MAX_MODEL_LEN}) must be less than max_model_len ({MAX_MODEL_LEN})."),
    );
    s.post(
        "/score",
        &json!({"queries": "q", "documents": "d", "chat_template_kwargs": {"tokenize": true}}),
    )
    .await
    .expect_error(400, "BadRequestError", "reserved");

    // S-ON-09
    for task in ["embed", "token_embed"] {
        s.post("/pooling", &json!({"input": "x", "task": task}))
            .await
            .expect_error(
                400,
                "BadRequestError",
                &format!("Unsupported task: '{task}'"),
            );
    }
    s.post("/pooling", &json!({"input": "x", "task": "token_classify"}))
        .await
        .expect_error(
            400,
            "BadRequestError",
            "Try switching the model's pooling_task via",
        );
    s.post("/pooling", &json!({"input": "x", "task": "plugin"}))
        .await
        .expect_error(400, "BadRequestError", "No IOProcessor plugin installed.");
    s.stop().await;

    // The documents list is bounded like vLLM's VLLM_MAX_COMPLETION_PROMPTS.
    let mut config = local_config();
    config.max_input_list_len = 2;
    let s = start(engine(), config).await;
    s.post(
        "/rerank",
        &json!({"query": "q", "documents": ["a", "b", "c"]}),
    )
    .await
    .expect_error(400, "BadRequestError", "documents list length");
    s.post("/classify", &json!({"input": ["a", "b", "c"]}))
        .await
        .expect_error(400, "BadRequestError", "input list length");
    s.post("/rerank", &json!({"query": "q", "documents": ["a", "b"]}))
        .await
        .ok();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_template_renders_score_pairs() {
    // With --chat-template, pairs go through it as query/document messages.
    let reference = reference("xlmr-rerank");
    let pair = reference.case("pair_relevant");
    let tpl = "{% for m in messages %}{% if m.role == 'query' %}{{ instruction }}{{ m.content }}{% else %}{{ m.content }}{% endif %}{% endfor %}";
    let engine = shared_engine("xlmr-template", || {
        let mut args = engine_args("xlmr-rerank");
        args.max_model_len = Some(MAX_MODEL_LEN);
        args.chat_template = Some(tpl.into());
        args
    });
    assert!(engine.info().chat_template_from_cli);
    let s = start(engine, local_config()).await;
    let concatenated = format!(
        "{}{}",
        pair.text.as_deref().unwrap(),
        pair.text_pair.as_deref().unwrap()
    );
    let rendered = s
        .post(
            "/score",
            &json!({"queries": pair.text, "documents": pair.text_pair}),
        )
        .await;
    let direct = s.post("/classify", &json!({"input": concatenated})).await;
    assert_close(
        "template",
        &scores(rendered.ok()),
        &floats(&direct.ok()["data"][0]["probs"]),
        BATCH_TOL,
    );
    let with_instruction = s
        .post(
            "/score",
            &json!({"queries": pair.text, "documents": pair.text_pair, "instruction": "Judge: "}),
        )
        .await;
    let direct = s
        .post(
            "/classify",
            &json!({"input": format!("Judge: {concatenated}")}),
        )
        .await;
    assert_close(
        "template",
        &scores(with_instruction.ok()),
        &floats(&direct.ok()["data"][0]["probs"]),
        BATCH_TOL,
    );
    s.stop().await;
}

// The encoder families' cross-encoders (num_labels 1) and classifiers through
// the server, against transformers (scripts/make_encoder_fixtures_distil_gte.py,
// make_modernbert_fixtures.py, make_deberta_fixtures.py).

fn started(fixture: &'static str) -> impl std::future::Future<Output = TestServer> {
    start(
        shared_engine(fixture, || engine_args(fixture)),
        local_config(),
    )
}

/// A num_labels 1 cross-encoder fixture through /classify, /pooling, /score and
/// /rerank: every text alone, every pair N:N, then one query reranked over every
/// document, each score as /score gives it.
async fn check_cross_encoder_routes(fixture: &'static str) {
    let s = started(fixture).await;
    let reference = reference(fixture);
    let model = format!("test/{fixture}");
    for case in reference.cases_of("text") {
        let body = s
            .post("/classify", &json!({"model": model, "input": case.text}))
            .await;
        let item = &body.ok()["data"][0];
        assert_close(&case.name, &floats(&item["probs"]), &case.probs, ATOL);
        assert_eq!(item["label"], "LABEL_0");
        assert_eq!(item["num_classes"], 1);
        let body = s
            .post(
                "/pooling",
                &json!({"input": case.text, "task": "classify", "use_activation": false}),
            )
            .await;
        assert_close(
            &format!("{} /pooling logits", case.name),
            &floats(&body.ok()["data"][0]["data"]),
            &case.logits,
            ATOL,
        );
    }

    // Pairs: models without token types ignore the template's type ids.
    let pairs = pair_cases(&reference);
    let queries: Vec<&str> = pairs.iter().map(|c| c.text.as_deref().unwrap()).collect();
    let documents: Vec<&str> = pairs
        .iter()
        .map(|c| c.text_pair.as_deref().unwrap())
        .collect();
    let want: Vec<f64> = pairs.iter().map(|c| c.probs[0]).collect();
    let body = s
        .post(
            "/score",
            &json!({"model": model, "queries": queries, "documents": documents}),
        )
        .await;
    assert_close("score N:N", &scores(body.ok()), &want, ATOL);
    let tokens: usize = pairs.iter().map(|c| c.input_ids.len()).sum();
    assert_eq!(body.ok()["usage"]["prompt_tokens"], tokens);
    let one_to_n = scores(
        s.post(
            "/score",
            &json!({"queries": queries[0], "documents": documents}),
        )
        .await
        .ok(),
    );
    assert_close("score 1:N first", &one_to_n[..1], &want[..1], ATOL);
    let body = s
        .post(
            "/rerank",
            &json!({"model": model, "query": queries[0], "documents": documents}),
        )
        .await;
    let results = body.ok()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), documents.len());
    let got: Vec<f64> = results
        .iter()
        .map(|r| r["relevance_score"].as_f64().unwrap())
        .collect();
    assert!(got.windows(2).all(|w| w[0] >= w[1]), "{got:?}");
    for r in &results {
        let index = r["index"].as_u64().unwrap() as usize;
        assert_close(
            "rerank",
            &[r["relevance_score"].as_f64().unwrap()],
            &one_to_n[index..=index],
            BATCH_TOL,
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distilbert_cross_encoder_routes() {
    // BERT's pair encoding gives token types; DistilBERT has none and drops them.
    check_cross_encoder_routes("distilbert-rerank").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gte_new_cross_encoder_routes() {
    check_cross_encoder_routes("gte-rerank").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modernbert_cross_encoder_routes() {
    // Mean pooling from the config's classifier_pooling.
    check_cross_encoder_routes("modernbert-rerank").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deberta_v3_cross_encoder_routes() {
    check_cross_encoder_routes("deberta-v3-rerank").await;
}

/// A multi-label classifier fixture: every text in one /classify batch, with
/// transformers' probabilities and labels; no /score (404, as vLLM registers none).
async fn check_classifier_labels(fixture: &'static str) {
    let s = started(fixture).await;
    let reference = reference(fixture);
    let cases = reference.cases_of("text");
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_deref().unwrap()).collect();
    let body = s.post("/classify", &json!({"input": texts})).await;
    let items = body.ok()["data"].as_array().unwrap();
    assert_eq!(items.len(), cases.len());
    for (item, case) in items.iter().zip(&cases) {
        assert_close(&case.name, &floats(&item["probs"]), &case.probs, ATOL);
        assert_eq!(
            item["label"].as_str(),
            reference.label_of(&case.probs).as_deref()
        );
    }
    let answer = s
        .post("/score", &json!({"queries": "a", "documents": "b"}))
        .await;
    assert_eq!(answer.status, 404, "{answer:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distilbert_classifier_labels_and_no_scoring() {
    check_classifier_labels("distilbert-cls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modernbert_classifier_and_token_classifier() {
    check_classifier_labels("modernbert-cls").await;

    let s = started("modernbert-ner").await;
    let tagger = reference("modernbert-ner");
    for case in tagger.cases_of("text") {
        let body = s.post("/pooling", &json!({"input": case.text})).await;
        let rows = body.ok()["data"][0]["data"].as_array().unwrap().clone();
        let want = case.token_probs.as_ref().expect("token_probs");
        assert_eq!(rows.len(), want.len(), "{}", case.name);
        for (i, (row, w)) in rows.iter().zip(want).enumerate() {
            assert_close(&format!("{} token {i}", case.name), &floats(row), w, ATOL);
        }
    }
    // A token classifier serves no /classify route (as vLLM registers none).
    let answer = s.post("/classify", &json!({"input": "a"})).await;
    assert_eq!(answer.status, 404, "{}", answer.body);
    s.stop().await;
}
