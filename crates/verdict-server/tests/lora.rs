//! LoRA adapters over real HTTP: the `model` field picks the adapter on every
//! route, unknown names are 404 in vLLM's envelope, `/v1/models` lists adapters
//! under their base, and adapters load and unload at runtime while traffic runs.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use verdict_engine::{EngineArgs, LoraLimits, LoraModuleArg};
use verdict_server::ServerConfig;

fn lora_dir(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/lora")
        .join(name)
}

fn lora_reference(name: &str) -> Reference {
    let path = lora_dir(name).join("reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("parsing reference.json")
}

fn lora_args(base: &str, adapters: &[&str]) -> EngineArgs {
    let mut args = engine_args(base);
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

fn runtime_config() -> ServerConfig {
    ServerConfig {
        allow_runtime_lora_updating: true,
        ..local_config()
    }
}

fn texts(reference: &Reference) -> (Vec<String>, Vec<&Case>) {
    let cases = reference.cases_of("text");
    (
        cases
            .iter()
            .map(|c| c.text.clone().expect("text"))
            .collect(),
        cases,
    )
}

/// `/classify` for `model` over the text cases: probabilities and labels as the reference.
async fn check_classify(s: &TestServer, model: &str, reference: &Reference) {
    let (inputs, cases) = texts(reference);
    let a = s
        .post("/classify", &json!({"model": model, "input": inputs}))
        .await;
    let body = a.ok();
    assert_eq!(body["model"], model);
    for (item, case) in body["data"].as_array().expect("data").iter().zip(&cases) {
        let probs = floats(&item["probs"]);
        assert_close(&format!("{model}/{}", case.name), &probs, &case.probs, ATOL);
        assert_eq!(item["num_classes"], reference.num_labels);
        assert_eq!(
            item["label"].as_str().map(str::to_owned),
            reference.label_of(&case.probs),
            "{model}/{}",
            case.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_field_picks_the_adapter_on_classify_and_pooling() {
    let engine = load_engine(lora_args("bert-cls", &["bert-sentiment", "bert-topics"]));
    let s = start(engine, local_config()).await;
    check_classify(&s, "test/bert-cls", &reference("bert-cls")).await;
    check_classify(&s, "bert-sentiment", &lora_reference("bert-sentiment")).await;
    check_classify(&s, "bert-topics", &lora_reference("bert-topics")).await;

    // One /pooling request per model at the same time: they may share a batch.
    let text = reference("bert-cls").cases_of("text")[1]
        .text
        .clone()
        .expect("text");
    let mut tasks = Vec::new();
    for model in ["test/bert-cls", "bert-sentiment", "bert-topics"] {
        let client = s.client.clone();
        let url = s.url("/pooling");
        let body = json!({"model": model, "input": text, "use_activation": false});
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await.expect("send");
            (
                model,
                r.status().as_u16(),
                r.json::<Value>().await.expect("json"),
            )
        }));
    }
    for task in tasks {
        let (model, status, body) = task.await.expect("task");
        assert_eq!(status, 200, "{model}: {body}");
        assert_eq!(body["model"], model);
        let reference = if model == "test/bert-cls" {
            reference("bert-cls")
        } else {
            lora_reference(model)
        };
        let got = floats(&body["data"][0]["data"]);
        assert_close(model, &got, &reference.cases_of("text")[1].logits, ATOL);
    }

    let a = s
        .post(
            "/classify",
            &json!({"model": "no-such-adapter", "input": "x"}),
        )
        .await;
    a.expect_error(
        404,
        "NotFoundError",
        "The model `no-such-adapter` does not exist.",
    );
    let a = s
        .post(
            "/pooling",
            &json!({"model": "no-such-adapter", "input": "x"}),
        )
        .await;
    a.expect_error(404, "NotFoundError", "no-such-adapter");

    let models = s.get("/v1/models").await;
    let cards = models.ok()["data"].as_array().expect("data").clone();
    let ids: Vec<&str> = cards.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids, ["test/bert-cls", "bert-sentiment", "bert-topics"]);
    assert!(cards[0]["parent"].is_null());
    for card in &cards[1..] {
        assert_eq!(card["parent"], "test/bert-cls");
        assert_eq!(card["object"], "model");
        assert!(card["root"]
            .as_str()
            .expect("root")
            .ends_with(card["id"].as_str().unwrap()));
    }

    let metrics = String::from_utf8(s.get("/metrics").await.bytes).expect("utf-8");
    for adapter in ["bert-sentiment", "bert-topics"] {
        for name in [
            "verdict_lora_requests_total",
            "verdict_lora_prompt_tokens_total",
        ] {
            assert!(
                metrics
                    .lines()
                    .any(|l| l.starts_with(&format!("{name}{{lora_name=\"{adapter}\"}}"))),
                "{name} for {adapter} missing:\n{metrics}"
            );
        }
    }
    // Runtime updates are off unless asked for.
    let a = s
        .post(
            "/v1/load_lora_adapter",
            &json!({"lora_name": "x", "lora_path": "y"}),
        )
        .await;
    assert_eq!(a.status, 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_and_rerank_run_through_a_reranker_adapter() {
    let engine = load_engine(lora_args("xlmr-rerank", &["xlmr-rerank"]));
    let s = start(engine, local_config()).await;
    let reference = lora_reference("xlmr-rerank");
    let pairs = reference.cases_of("pair");
    for case in &pairs {
        let (q, d) = (case.text.clone().unwrap(), case.text_pair.clone().unwrap());
        let a = s
            .post(
                "/score",
                &json!({"model": "xlmr-rerank", "queries": q, "documents": [d]}),
            )
            .await;
        let body = a.ok();
        assert_eq!(body["model"], "xlmr-rerank");
        let score = body["data"][0]["score"].as_f64().expect("score");
        assert_close(&case.name, &[score], &case.probs, ATOL);
        let a = s
            .post(
                "/rerank",
                &json!({"model": "xlmr-rerank", "query": q, "documents": [d]}),
            )
            .await;
        let score = a.ok()["results"][0]["relevance_score"]
            .as_f64()
            .expect("score");
        assert_close(&case.name, &[score], &case.probs, ATOL);
        // The base model's score differs: the adapter really ran.
        let a = s
            .post("/score", &json!({"queries": q, "documents": [d]}))
            .await;
        let base = a.ok()["data"][0]["score"].as_f64().expect("score");
        assert!(
            (base - score).abs() > 1e-3,
            "{}: {base} vs {score}",
            case.name
        );
    }
    let a = s
        .post(
            "/rerank",
            &json!({"model": "other", "query": "q", "documents": ["d"]}),
        )
        .await;
    a.expect_error(404, "NotFoundError", "The model `other` does not exist.");
    s.stop().await;
}

/// Base and adapter traffic from several clients while another adapter is loaded
/// and unloaded over and over: no request of that traffic fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adapters_load_and_unload_at_runtime_under_traffic() {
    let engine = load_engine(lora_args("bert-cls", &["bert-sentiment"]));
    let s = Arc::new(start(engine, runtime_config()).await);
    let stop_at = Instant::now() + Duration::from_secs(3);
    let mut clients = Vec::new();
    for (i, model) in [
        "test/bert-cls",
        "bert-sentiment",
        "test/bert-cls",
        "bert-sentiment",
    ]
    .into_iter()
    .enumerate()
    {
        let s = s.clone();
        clients.push(tokio::spawn(async move {
            let mut sent = 0;
            while Instant::now() < stop_at {
                let a = s
                    .post(
                        "/classify",
                        &json!({"model": model, "input": [format!("request {i} {sent}"), "hello"]}),
                    )
                    .await;
                assert_eq!(a.status, 200, "{model}: {}", a.body);
                sent += 1;
            }
            sent
        }));
    }
    let topics = lora_dir("bert-topics").to_string_lossy().into_owned();
    let mut cycles = 0;
    while Instant::now() < stop_at {
        let a = s
            .post(
                "/v1/load_lora_adapter",
                &json!({"lora_name": "hot", "lora_path": topics}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.bytes));
        assert_eq!(
            String::from_utf8_lossy(&a.bytes),
            "Success: LoRA adapter 'hot' added successfully."
        );
        let a = s
            .post("/classify", &json!({"model": "hot", "input": "now loaded"}))
            .await;
        assert_eq!(a.ok()["data"][0]["num_classes"], 5);
        let a = s
            .post("/v1/unload_lora_adapter", &json!({"lora_name": "hot"}))
            .await;
        assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.bytes));
        let a = s
            .post("/classify", &json!({"model": "hot", "input": "gone"}))
            .await;
        a.expect_error(404, "NotFoundError", "The model `hot` does not exist.");
        cycles += 1;
    }
    let mut total = 0;
    for c in clients {
        total += c.await.expect("a client request failed");
    }
    assert!(
        cycles >= 2 && total >= 8,
        "cycles {cycles}, requests {total}"
    );

    // The errors of the two routes.
    let a = s
        .post(
            "/v1/load_lora_adapter",
            &json!({"lora_name": "bert-sentiment", "lora_path": topics}),
        )
        .await;
    a.expect_error(400, "BadRequestError", "has already been loaded");
    let a = s
        .post("/v1/load_lora_adapter", &json!({"lora_name": "x"}))
        .await;
    a.expect_error(
        400,
        "BadRequestError",
        "Both 'lora_name' and 'lora_path' must be provided.",
    );
    let a = s
        .post(
            "/v1/load_lora_adapter",
            &json!({"lora_name": "x", "lora_path": "/no/such/adapter"}),
        )
        .await;
    a.expect_error(404, "NotFoundError", "/no/such/adapter");
    let bad = lora_dir("qwen2-qv").to_string_lossy().into_owned();
    let a = s
        .post(
            "/v1/load_lora_adapter",
            &json!({"lora_name": "x", "lora_path": bad}),
        )
        .await;
    a.expect_error(400, "BadRequestError", "not a linear layer of this model");
    let a = s
        .post(
            "/v1/unload_lora_adapter",
            &json!({"lora_name": "never-loaded"}),
        )
        .await;
    a.expect_error(
        404,
        "NotFoundError",
        "The lora adapter 'never-loaded' cannot be found.",
    );
    let a = s.post("/v1/unload_lora_adapter", &json!({})).await;
    a.expect_error(400, "BadRequestError", "'lora_name' needs to be provided");
    let models = s.get("/v1/models").await;
    assert_eq!(models.ok()["data"].as_array().expect("data").len(), 2);
    match Arc::try_unwrap(s) {
        Ok(s) => s.stop().await,
        Err(_) => panic!("the server is still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_lora_routes_need_the_api_key() {
    let engine = load_engine(lora_args("bert-cls", &[]));
    let config = ServerConfig {
        api_key: Some("secret".into()),
        ..runtime_config()
    };
    let s = start(engine, config).await;
    let body = json!({"lora_name": "a", "lora_path": lora_dir("bert-sentiment")});
    let a = s.post("/v1/load_lora_adapter", &body).await;
    assert_eq!(a.status, 401, "{}", a.body);
    let a = s
        .post("/v1/unload_lora_adapter", &json!({"lora_name": "a"}))
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    let auth = [("authorization", "Bearer secret")];
    let a = s.post_with("/v1/load_lora_adapter", &body, &auth).await;
    assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.bytes));
    let a = s
        .post_with("/classify", &json!({"model": "a", "input": "hi"}), &auth)
        .await;
    assert_eq!(a.ok()["model"], "a");
    let a = s
        .post_with("/v1/unload_lora_adapter", &json!({"lora_name": "a"}), &auth)
        .await;
    assert_eq!(a.status, 200);
    s.stop().await;
}
