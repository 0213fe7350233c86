//! The server as a service: concurrency, isolation of bad requests, graceful
//! shutdown, cancellation, back-pressure, auth (D-09, stricter than vLLM),
//! metrics, limits and request-id headers.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use verdict_engine::Engine;

fn engine() -> Arc<Engine> {
    shared_engine("qwen2", || {
        let mut args = engine_args("qwen2-cls");
        args.max_model_len = Some(512);
        args
    })
}

/// A mix of request kinds, including ones that must fail.
fn mixed_requests() -> Vec<(&'static str, Value)> {
    let reference = reference("qwen2-cls");
    let texts: Vec<String> = reference
        .cases_of("text")
        .iter()
        .map(|c| c.text.clone().unwrap())
        .collect();
    let chat = reference.case("chat_genprompt");
    let mut requests = Vec::new();
    for i in 0..200 {
        let text = &texts[i % texts.len()];
        let request = match i % 8 {
            0 => ("/classify", json!({"input": text})),
            1 => (
                "/classify",
                json!({"input": [text, texts[(i + 1) % texts.len()], "extra words"]}),
            ),
            2 => (
                "/classify",
                json!({"input": reference.cases_of("text")[i % texts.len()].input_ids}),
            ),
            3 => (
                "/classify",
                json!({"messages": chat.messages, "add_generation_prompt": true}),
            ),
            4 => ("/pooling", json!({"input": text, "use_activation": false})),
            5 => (
                "/classify",
                json!({"input": text, "truncate_prompt_tokens": 3 + i % 5, "truncation_side": "left"}),
            ),
            6 => ("/classify", json!({"input": "hello ".repeat(600)})), // too long: 400
            _ => ("/classify", json!({"input": [text, ""]})),           // one empty prompt: 400
        };
        requests.push(request);
    }
    requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mixed_requests_equal_sequential_ones() {
    let s = start(engine(), local_config()).await;
    let requests = mixed_requests();
    let mut sequential = Vec::with_capacity(requests.len());
    for (path, body) in &requests {
        let a = s.post(path, body).await;
        sequential.push((a.status, stable_part(&a.body)));
    }
    let s = Arc::new(s);
    let tasks: Vec<_> = requests
        .iter()
        .cloned()
        .map(|(path, body)| {
            let s = s.clone();
            tokio::spawn(async move {
                let a = s.post(path, &body).await;
                (a.status, stable_part(&a.body))
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, sequential[i].0, "request {i}: {:?}", requests[i]);
        // Integers (usage, indices) must match exactly; floats within a few f32 ulps.
        assert_json_close(&format!("request {i}"), &body, &sequential[i].1, 1e-6);
        assert_eq!(body["usage"], sequential[i].1["usage"]);
    }
    let statuses: Vec<u16> = sequential.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 400).count(), 50);
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 150);
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_leaves_its_neighbours_untouched() {
    let s = Arc::new(start(engine(), local_config()).await);
    let reference = reference("qwen2-cls");
    let good: Vec<Value> = reference
        .cases_of("text")
        .iter()
        .map(|c| json!({"input": [c.text, c.text]}))
        .collect();
    let bad = [
        json!({"input": ["fine", "hello ".repeat(600)]}),
        json!({"input": [[1, 2], [999_999_999]]}),
        json!({"input": "x", "truncate_prompt_tokens": 9999}),
        json!({"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": true, "continue_final_message": true}),
    ];
    let mut tasks = Vec::new();
    for round in 0..4 {
        for (i, body) in good.iter().enumerate() {
            let server = s.clone();
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                (true, i, server.post("/classify", &body).await)
            }));
            if i == round {
                for b in &bad {
                    let s = s.clone();
                    let b = b.clone();
                    tasks.push(tokio::spawn(async move {
                        (false, 0, s.post("/classify", &b).await)
                    }));
                }
            }
        }
    }
    let cases = reference.cases_of("text");
    for task in tasks {
        let (is_good, i, answer) = task.await.unwrap();
        if is_good {
            let data = answer.ok()["data"].as_array().unwrap().clone();
            for item in data {
                assert_close(
                    &cases[i].name,
                    &floats(&item["probs"]),
                    &cases[i].probs,
                    ATOL,
                );
            }
        } else {
            assert_eq!(answer.status, 400, "{}", answer.body);
        }
    }
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let s = start(engine(), local_config()).await;
    let long = reference("qwen2-cls").case("long").text.clone().unwrap();
    let big = json!({"input": vec![long; 1500]});
    let client = s.client.clone();
    let url = s.url("/classify");
    let in_flight = tokio::spawn(async move {
        let response = client
            .post(url)
            .json(&big)
            .send()
            .await
            .expect("in-flight request");
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("json body");
        (status, body["data"].as_array().map_or(0, Vec::len))
    });
    // Let the request reach the server before shutting down.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let addr = s.server.addr;
    let client = s.client.clone();
    s.server.shutdown().await.expect("clean shutdown");
    let (status, items) = in_flight.await.unwrap();
    assert_eq!((status, items), (200, 1500));
    // Nothing listens any more.
    let after = client
        .get(format!("http://{addr}/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(after.is_err(), "server still answering after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_client_has_its_queued_work_dropped() {
    let engine = engine();
    let s = start(engine.clone(), local_config()).await;
    let reference = reference("qwen2-cls");
    let long = reference.case("long");
    let prompts = 10_000;
    let total_tokens = (prompts * long.input_ids.len()) as u64;
    let stats = engine.stats();
    let before = stats.batched_tokens.load(Ordering::Relaxed);
    let started = Instant::now();
    let result = s
        .client
        .post(s.url("/classify"))
        .json(&json!({"input": vec![long.input_ids.clone(); prompts]}))
        .timeout(Duration::from_millis(400))
        .send()
        .await;
    assert!(
        result.is_err(),
        "finished in {:?}: the request is too small to cancel",
        started.elapsed()
    );
    // Wait for the engine to go idle, then count what it ran.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let idle = stats.queued_sequences.load(Ordering::Relaxed) == 0
            && stats.running_sequences.load(Ordering::Relaxed) == 0;
        if idle || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ran = stats.batched_tokens.load(Ordering::Relaxed) - before;
    eprintln!("cancelled request: ran {ran} of {total_tokens} tokens");
    assert!(
        ran < total_tokens / 2,
        "ran {ran} of {total_tokens} tokens after the client left"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_503_at_once() {
    let engine = shared_engine("bert-small-queue", || {
        let mut args = engine_args("bert-cls");
        args.max_queued_sequences = 4;
        args
    });
    let s = start(engine, local_config()).await;
    let answer = s
        .post("/classify", &json!({"input": vec!["some text"; 10]}))
        .await;
    answer.expect_error(503, "ServiceUnavailableError", "overloaded");
    s.post("/classify", &json!({"input": vec!["some text"; 3]}))
        .await
        .ok();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_everything_but_probes() {
    // D-09, deliberately stricter than vLLM: /classify needs the key too.
    let mut config = local_config();
    config.api_key = Some("sekret".into());
    let s = start(engine(), config).await;
    let body = json!({"input": "hello"});
    let unauthorized = json!({"error": "Unauthorized"});
    for path in [
        "/classify",
        "/pooling",
        "/invocations",
        "/tokenize",
        "/v1/rerank",
        "/score",
    ] {
        let answer = s.post(path, &body).await;
        assert_eq!(
            (answer.status, &answer.body),
            (401, &unauthorized),
            "{path}"
        );
    }
    assert_eq!(s.get("/v1/models").await.status, 401);
    for header in [
        "Bearer wrong",
        "Basic sekret",
        "sekret",
        "Bearer sekret2",
        "Bearer ",
    ] {
        let answer = s
            .post_with("/classify", &body, &[("authorization", header)])
            .await;
        assert_eq!(answer.status, 401, "{header}");
    }
    for header in ["Bearer sekret", "bearer sekret", "BEARER sekret"] {
        let answer = s
            .post_with("/classify", &body, &[("authorization", header)])
            .await;
        answer.ok();
    }
    // With the key an unknown path is a plain 404.
    let answer = s
        .post_with("/v1/rerank", &body, &[("authorization", "Bearer sekret")])
        .await;
    assert_eq!(answer.status, 404);
    for path in ["/health", "/ping", "/version", "/metrics"] {
        assert_eq!(s.get(path).await.status, 200, "{path}");
    }
    let preflight = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/classify"))
        .send()
        .await
        .unwrap();
    assert_ne!(preflight.status().as_u16(), 401);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_limits_and_request_ids() {
    let mut config = local_config();
    config.max_request_body_bytes = 4096;
    config.enable_request_id_headers = true;
    let s = start(engine(), config).await;
    let reference = reference("qwen2-cls");
    let short = reference.case("short");
    for _ in 0..3 {
        s.post("/classify", &json!({"input": short.text}))
            .await
            .ok();
    }
    s.post("/classify", &json!({"input": ""})).await;
    s.get("/nowhere").await;

    let metrics = s.get("/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8(metrics.bytes.clone()).unwrap();
    for needle in [
        "verdict_http_requests_total{route=\"/classify\",method=\"POST\",status=\"200\"} 3",
        "verdict_http_requests_total{route=\"/classify\",method=\"POST\",status=\"400\"} 1",
        "verdict_http_requests_total{route=\"unmatched\",method=\"GET\",status=\"404\"} 1",
        "verdict_http_request_duration_seconds_bucket{route=\"/classify\",le=",
        "verdict_queue_time_seconds_bucket",
        "verdict_inference_time_seconds_bucket",
        "verdict_batch_size_bucket",
        "verdict_batch_tokens_bucket",
        "verdict_queue_depth",
        "verdict_batches_total",
        "# HELP verdict_prompt_tokens_total",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let prompt_tokens = text
        .lines()
        .find(|l| l.starts_with("verdict_prompt_tokens_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<usize>().ok())
        .expect("prompt token counter");
    assert_eq!(prompt_tokens, 3 * short.input_ids.len());

    // Body limit: answered with the envelope.
    let answer = s
        .post("/classify", &json!({"input": "x".repeat(10_000)}))
        .await;
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], 413);

    // Request ids: echoed when sent, generated otherwise.
    let answer = s
        .post_with(
            "/classify",
            &json!({"input": short.text}),
            &[("x-request-id", "req-7")],
        )
        .await;
    assert_eq!(answer.headers["x-request-id"], "req-7");
    assert_eq!(answer.ok()["id"], "classify-req-7");
    let answer = s.post("/classify", &json!({"input": short.text})).await;
    assert_eq!(answer.headers["x-request-id"].len(), 32);
    s.stop().await;
}
