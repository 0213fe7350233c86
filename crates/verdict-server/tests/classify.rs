//! spec §9.1 (C-ON-01..15), §9.7 truncation and §9.9 derived checks on the
//! qwen2-cls fixture (Qwen2 classifier, labels Default/Spoiled, max_model_len 512).

mod common;

use std::sync::Arc;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use verdict_engine::Engine;

const MODEL: &str = "test/qwen2-cls";

fn engine() -> Arc<Engine> {
    shared_engine("qwen2", || {
        let mut args = engine_args("qwen2-cls");
        args.max_model_len = Some(512);
        args.served_model_name = vec![MODEL.into(), "qwen-alias".into()];
        args
    })
}

async fn server() -> TestServer {
    start(engine(), local_config()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_is_bounded() {
    let config = verdict_server::ServerConfig {
        max_tokenize_tokens: 20,
        ..local_config()
    };
    let s = start(engine(), config).await;
    let twenty = "hello ".repeat(20);
    let body = s
        .post("/tokenize", &json!({"prompt": twenty.trim_end()}))
        .await;
    assert_eq!(body.ok()["count"], 20);
    // Megabytes of text are refused after tokenizing only past the limit.
    let huge = "hello ".repeat(1 << 20);
    let started = std::time::Instant::now();
    s.post("/tokenize", &json!({"prompt": huge}))
        .await
        .expect_error(400, "BadRequestError", "more than 20 tokens");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    s.stop().await;
}

#[track_caller]
fn check_item(item: &Value, index: usize, case: &Case, reference: &Reference) {
    assert_eq!(item["index"], index, "{item}");
    let probs = floats(&item["probs"]);
    assert_close(&case.name, &probs, &case.probs, ATOL);
    assert_eq!(item["num_classes"], probs.len());
    assert_eq!(
        item["label"].as_str(),
        reference.label_of(&case.probs).as_deref(),
        "{item}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_tokenize_and_detokenize() {
    // C-ON-01, C-ON-02
    let s = server().await;
    let reference = reference("qwen2-cls");
    let models = s.get("/v1/models").await;
    let body = models.ok();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], MODEL);
    assert_eq!(body["data"][1]["id"], "qwen-alias");
    let card = &body["data"][0];
    assert_eq!(card["object"], "model");
    assert_eq!(card["max_model_len"], 512);
    assert!(card["parent"].is_null());
    assert!(card["created"].as_u64().unwrap() > 1_600_000_000);
    let permission = &card["permission"][0];
    assert_eq!(permission["object"], "model_permission");
    assert!(permission["id"].as_str().unwrap().starts_with("modelperm-"));
    assert_eq!(permission["allow_sampling"], true);
    assert_eq!(permission["organization"], "*");

    for case in reference.cases_of("text") {
        let answer = s
            .post("/tokenize", &json!({"model": MODEL, "prompt": case.text}))
            .await;
        let body = answer.ok();
        assert_eq!(body["tokens"], json!(case.input_ids), "{}", case.name);
        assert_eq!(body["count"], case.input_ids.len());
        assert_eq!(body["max_model_len"], 512);
        assert!(body["token_strs"].is_null());
    }
    let short = reference.case("short");
    let body = s
        .post(
            "/tokenize",
            &json!({"prompt": short.text, "return_token_strs": true}),
        )
        .await;
    let strs = body.ok()["token_strs"].as_array().unwrap().clone();
    assert_eq!(strs.len(), short.input_ids.len());
    assert!(strs.iter().all(Value::is_string));

    // Chat form: add_generation_prompt defaults to true for /tokenize.
    let chat = reference.case("chat_genprompt");
    let body = s
        .post("/tokenize", &json!({"messages": chat.messages}))
        .await;
    assert_eq!(body.ok()["tokens"], json!(chat.input_ids));
    let plain = reference.case("chat_no_genprompt");
    let body = s
        .post(
            "/tokenize",
            &json!({"messages": plain.messages, "add_generation_prompt": false}),
        )
        .await;
    assert_eq!(body.ok()["tokens"], json!(plain.input_ids));

    let body = s
        .post("/detokenize", &json!({"tokens": short.input_ids}))
        .await;
    assert_eq!(body.ok()["prompt"], json!(short.text));
    s.post("/detokenize", &json!({"tokens": [1, -4]}))
        .await
        .expect_error(400, "BadRequestError", "out of vocabulary");
    s.post("/tokenize", &json!({"prompt": "x", "model": "nope"}))
        .await
        .expect_error(404, "NotFoundError", "The model `nope` does not exist.");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_text_and_token_ids_match_transformers() {
    // C-ON-03, C-ON-04
    let s = server().await;
    let reference = reference("qwen2-cls");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for case in reference.cases_of("text") {
        for input in [json!(case.text), json!(case.input_ids)] {
            let answer = s
                .post("/classify", &json!({"model": MODEL, "input": input}))
                .await;
            let body = answer.ok();
            assert_eq!(body["object"], "list");
            assert_eq!(body["model"], MODEL);
            let id = body["id"].as_str().unwrap();
            let hex = id.strip_prefix("classify-").expect("classify- prefix");
            assert_eq!(hex.len(), 16, "{id}");
            assert!(hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
            assert!(body["created"].as_u64().unwrap() >= before);
            assert_eq!(body["data"].as_array().unwrap().len(), 1);
            check_item(&body["data"][0], 0, case, &reference);
            let n = case.input_ids.len();
            assert_eq!(
                body["usage"],
                json!({"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0, "prompt_tokens_details": null})
            );
            // Keys in vLLM's order.
            let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["id", "object", "created", "model", "data", "usage"]);
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_keep_input_order() {
    // C-ON-05
    let s = server().await;
    let reference = reference("qwen2-cls");
    let cases = reference.cases_of("text");
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_deref().unwrap()).collect();
    let ids: Vec<&Vec<u32>> = cases.iter().map(|c| &c.input_ids).collect();
    let total: usize = cases.iter().map(|c| c.input_ids.len()).sum();
    for input in [json!(texts), json!(ids)] {
        let body = s.post("/classify", &json!({"input": input})).await;
        let body = body.ok();
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), cases.len());
        for (i, case) in cases.iter().enumerate() {
            check_item(&data[i], i, case, &reference);
        }
        assert_eq!(body["usage"]["prompt_tokens"], total);
    }
    // Ten copies, as the vLLM test does.
    let short = reference.case("short");
    let body = s
        .post("/classify", &json!({"input": vec![short.text.clone(); 10]}))
        .await;
    let data = body.ok()["data"].as_array().unwrap().clone();
    assert_eq!(data.len(), 10);
    for (i, item) in data.iter().enumerate() {
        check_item(item, i, short, &reference);
        assert!(["Default", "Spoiled"].contains(&item["label"].as_str().unwrap()));
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_inputs_and_lengths() {
    // C-ON-06..09, §9.7
    let s = server().await;
    let reference = reference("qwen2-cls");
    s.post("/classify", &json!({"input": ""}))
        .await
        .expect_error(400, "BadRequestError", "The decoder prompt cannot be empty");
    s.post("/classify", &json!({"input": []}))
        .await
        .expect_error(400, "BadRequestError", "You must pass at least one prompt");
    s.post("/classify", &json!({"input": [[]]}))
        .await
        .expect_error(400, "BadRequestError", "The decoder prompt cannot be empty");

    let long = "hello ".repeat(600);
    let body = s
        .post(
            "/classify",
            &json!({"input": long, "truncate_prompt_tokens": 5}),
        )
        .await;
    let usage = &body.ok()["usage"];
    assert_eq!(
        (
            usage["prompt_tokens"].as_u64(),
            usage["total_tokens"].as_u64()
        ),
        (Some(5), Some(5))
    );

    let answer = s
        .post(
            "/classify",
            &json!({"input": "test", "truncate_prompt_tokens": 513}),
        )
        .await;
    answer.expect_error(
        400,
        "BadRequestError",
        "truncate_prompt_tokens value is greater than max_model_len. Please request a smaller truncation size.",
    );
    assert_eq!(
        answer.error_message(),
        "truncate_prompt_tokens value is greater than max_model_len. Please request a smaller truncation size."
    );

    let body = s
        .post(
            "/classify",
            &json!({"input": long, "truncate_prompt_tokens": -1}),
        )
        .await;
    assert_eq!(body.ok()["usage"]["prompt_tokens"], 512);

    let answer = s.post("/classify", &json!({"input": long})).await;
    answer.expect_error(
        400,
        "BadRequestError",
        "This model's maximum context length is 512 tokens. However, you requested 0 output tokens and your prompt contains",
    );
    assert!(answer
        .error_message()
        .contains("Please reduce the length of the input prompt"));
    assert_eq!(answer.body["error"]["param"], "input_tokens");

    s.post(
        "/classify",
        &json!({"input": "x", "truncate_prompt_tokens": -2}),
    )
    .await
    .expect_error(400, "Bad Request", "greater_than_equal");

    // Left truncation keeps the last N tokens; right keeps the first N.
    let case = reference.case("long");
    let n = 10;
    let tail = &case.input_ids[case.input_ids.len() - n..];
    let head = &case.input_ids[..n];
    for (side, ids) in [("left", tail), ("right", head)] {
        let truncated = s
            .post(
                "/classify",
                &json!({"input": case.text, "truncate_prompt_tokens": n, "truncation_side": side}),
            )
            .await;
        let direct = s.post("/classify", &json!({"input": ids})).await;
        assert_eq!(truncated.ok()["usage"]["prompt_tokens"], n);
        assert_json_close(
            side,
            &truncated.body["data"],
            &direct.ok()["data"],
            BATCH_TOL,
        );
        let on_ids = s
            .post(
                "/classify",
                &json!({"input": case.input_ids, "truncate_prompt_tokens": n, "truncation_side": side}),
            )
            .await;
        assert_json_close(side, &on_ids.ok()["data"], &direct.body["data"], BATCH_TOL);
    }

    // C-ON-09: add_special_tokens either way (Qwen adds none).
    let short = reference.case("short");
    for add in [false, true] {
        let body = s
            .post(
                "/classify",
                &json!({"input": short.text, "add_special_tokens": add}),
            )
            .await;
        check_item(&body.ok()["data"][0], 0, short, &reference);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_requests_match_rendered_references() {
    // C-ON-10
    let s = server().await;
    let reference = reference("qwen2-cls");
    for case in reference.cases_of("chat") {
        let request = json!({
            "model": MODEL,
            "messages": case.messages,
            "add_generation_prompt": case.add_generation_prompt,
            "continue_final_message": case.continue_final_message,
        });
        let body = s.post("/classify", &request).await;
        let body = body.ok();
        check_item(&body["data"][0], 0, case, &reference);
        assert_eq!(
            body["usage"]["prompt_tokens"],
            case.input_ids.len(),
            "{}",
            case.name
        );
    }
    let plain = reference.case("chat_no_genprompt");
    let body = s
        .post(
            "/classify",
            &json!({"messages": plain.messages, "add_special_tokens": true}),
        )
        .await;
    assert_eq!(body.ok()["usage"]["prompt_tokens"], plain.input_ids.len());
    s.post(
        "/classify",
        &json!({"messages": plain.messages, "add_generation_prompt": true, "continue_final_message": true}),
    )
    .await
    .expect_error(
        400,
        "Bad Request",
        "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
    );
    s.post(
        "/classify",
        &json!({"messages": plain.messages, "chat_template": "{{ messages[0].content }}"}),
    )
    .await
    .expect_error(
        400,
        "BadRequestError",
        "Chat template is passed with request, but --trust-request-chat-template is not set. Refused request with untrusted chat template.",
    );
    s.post(
        "/classify",
        &json!({"messages": plain.messages, "chat_template_kwargs": {"chat_template": "x"}}),
    )
    .await
    .expect_error(400, "BadRequestError", "--trust-request-chat-template");
    s.stop().await;

    // A trusted request template is used: rendering just the text of the first message.
    let mut config = local_config();
    config.trust_request_chat_template = true;
    let s = start(engine(), config).await;
    let short = reference.case("short");
    let body = s
        .post(
            "/classify",
            &json!({
                "messages": [{"role": "user", "content": short.text}],
                "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
            }),
        )
        .await;
    check_item(&body.ok()["data"][0], 0, short, &reference);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_activation_and_scoring_routes() {
    let s = server().await;
    let reference = reference("qwen2-cls");
    // C-ON-11: /invocations answers like /classify for both request forms.
    let short = reference.case("short");
    let chat = reference.case("chat_no_genprompt");
    for request in [
        json!({"input": short.text}),
        json!({"messages": chat.messages}),
    ] {
        let direct = s.post("/classify", &request).await;
        let invoked = s.post("/invocations", &request).await;
        assert_json_close(
            "invocations",
            &stable_part(invoked.ok()),
            &stable_part(direct.ok()),
            BATCH_TOL,
        );
        assert!(invoked.body["id"]
            .as_str()
            .unwrap()
            .starts_with("classify-"));
    }

    // C-ON-12: use_activation null = true; false gives the raw logits.
    let null = s
        .post(
            "/classify",
            &json!({"input": short.text, "use_activation": null}),
        )
        .await;
    let on = s
        .post(
            "/classify",
            &json!({"input": short.text, "use_activation": true}),
        )
        .await;
    let off = s
        .post(
            "/classify",
            &json!({"input": short.text, "use_activation": false}),
        )
        .await;
    assert_json_close(
        "null vs true",
        &null.ok()["data"],
        &on.ok()["data"],
        BATCH_TOL,
    );
    let raw = floats(&off.ok()["data"][0]["probs"]);
    assert_close("raw logits", &raw, &short.logits, ATOL);
    assert_close(
        "softmax(raw)",
        &softmax(&raw),
        &floats(&on.body["data"][0]["probs"]),
        1e-6,
    );

    // C-ON-13: no scoring on a 2-label model.
    for path in ["/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"] {
        let answer = s
            .post(
                path,
                &json!({"query": "a", "documents": ["b"], "queries": "a"}),
            )
            .await;
        assert_eq!(answer.status, 404, "{path}");
        assert_eq!(answer.body, json!({"detail": "Not Found"}), "{path}");
    }
    let unknown = s.get("/no/such/path").await;
    assert_eq!(
        (unknown.status, unknown.body.clone()),
        (404, json!({"detail": "Not Found"}))
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooling_formats_and_task_errors() {
    // C-ON-14, C-ON-15, D-03
    let s = server().await;
    let reference = reference("qwen2-cls");
    let short = reference.case("short");
    let body = s
        .post(
            "/pooling",
            &json!({"input": short.text, "encoding_format": "float", "task": "classify"}),
        )
        .await;
    let body = body.ok();
    assert!(body["id"].as_str().unwrap().starts_with("pooling-"));
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["object"], "pooling");
    let data = floats(&body["data"][0]["data"]);
    assert_eq!(data.len(), 2);
    assert_close("pooling", &data, &short.probs, ATOL);
    assert_eq!(body["usage"]["prompt_tokens"], short.input_ids.len());

    // base64 in each dtype and byte order decodes to the same values.
    for (dtype, endianness, width, tol) in [
        // serde_json's default parser may be one ulp off on 17-digit numbers.
        ("float32", "little", 4, 1e-12),
        ("float32", "big", 4, 1e-12),
        ("float32", "native", 4, 1e-12),
        ("float16", "little", 2, 1e-3),
        ("bfloat16", "big", 2, 1e-2),
    ] {
        let body = s
            .post(
                "/pooling",
                &json!({"input": short.text, "encoding_format": "base64", "embed_dtype": dtype, "endianness": endianness}),
            )
            .await;
        let encoded = body.ok()["data"][0]["data"].as_str().unwrap().to_string();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(bytes.len(), 2 * width, "{dtype}");
        let values = decode(&bytes, dtype, endianness);
        assert_close(dtype, &values, &data, tol);
    }

    // bytes: raw body plus a `metadata` header; bytes_only: no header.
    let answer = s
        .post(
            "/pooling",
            &json!({"input": [short.text, short.text], "encoding_format": "bytes"}),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["content-type"], "application/octet-stream");
    assert_eq!(answer.bytes.len(), 16);
    let metadata: Value =
        serde_json::from_str(answer.headers["metadata"].to_str().unwrap()).unwrap();
    assert_eq!(metadata["model"], MODEL);
    assert_eq!(metadata["data"][1]["start"], 8);
    assert_eq!(metadata["data"][1]["end"], 16);
    assert_eq!(metadata["data"][1]["shape"], json!([2]));
    assert_eq!(metadata["data"][0]["embed_dtype"], "float32");
    assert_eq!(
        metadata["usage"]["prompt_tokens"],
        2 * short.input_ids.len()
    );
    // Two prompts batch together, which may move the last f32 bit.
    assert_close(
        "bytes",
        &decode(&answer.bytes[..8], "float32", "native"),
        &data,
        1e-6,
    );
    let answer = s
        .post(
            "/pooling",
            &json!({"input": short.text, "encoding_format": "bytes_only", "embed_dtype": "fp8_e4m3"}),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert!(answer.headers.get("metadata").is_none());
    assert_eq!(answer.bytes.len(), 2);

    for task in ["embed", "token_embed"] {
        s.post("/pooling", &json!({"input": short.text, "task": task}))
            .await
            .expect_error(
                400,
                "BadRequestError",
                &format!("Unsupported task: '{task}'"),
            );
    }
    let answer = s
        .post(
            "/pooling",
            &json!({"input": short.text, "task": "token_classify"}),
        )
        .await;
    answer.expect_error(
        400,
        "BadRequestError",
        "Try switching the model's pooling_task via",
    );
    assert_eq!(
        answer.error_message(),
        "Try switching the model's pooling_task via --pooler-config.task token_classify."
    );
    s.post("/pooling", &json!({"input": short.text, "task": "plugin"}))
        .await
        .expect_error(400, "BadRequestError", "No IOProcessor plugin installed.");
    s.post("/pooling", &json!({"data": {"anything": 1}}))
        .await
        .expect_error(400, "BadRequestError", "No IOProcessor plugin installed.");
    s.post("/pooling", &json!({"input": short.text, "dimensions": 4}))
        .await
        .expect_error(
            400,
            "BadRequestError",
            "dimensions is currently not supported",
        );
    let answer = s
        .post(
            "/pooling",
            &json!({"input": short.text, "encoding_format": "xml"}),
        )
        .await;
    answer.expect_error(400, "Bad Request", "literal_error");
    assert!(answer.error_message().contains("xml"));
    s.post(
        "/pooling",
        &json!({"input": short.text, "embed_dtype": "float64"}),
    )
    .await
    .expect_error(400, "Bad Request", "float64");
    s.post("/pooling", &json!({"input": short.text, "task": "score"}))
        .await
        .expect_error(400, "BadRequestError", "`score` task was removed");
    s.stop().await;
}

fn decode(bytes: &[u8], dtype: &str, endianness: &str) -> Vec<f64> {
    let big = endianness == "big" || (endianness == "native" && cfg!(target_endian = "big"));
    match dtype {
        "float32" => bytes
            .chunks(4)
            .map(|c| {
                let a = [c[0], c[1], c[2], c[3]];
                f64::from(if big {
                    f32::from_be_bytes(a)
                } else {
                    f32::from_le_bytes(a)
                })
            })
            .collect(),
        _ => bytes
            .chunks(2)
            .map(|c| {
                let bits = if big {
                    u16::from_be_bytes([c[0], c[1]])
                } else {
                    u16::from_le_bytes([c[0], c[1]])
                };
                if dtype == "float16" {
                    f64::from(half::f16::from_bits(bits).to_f32())
                } else {
                    f64::from(half::bf16::from_bits(bits).to_f32())
                }
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derived_checks_and_schema_errors() {
    // D-01, D-02, D-04, D-05 and body validation.
    let s = server().await;
    let reference = reference("qwen2-cls");
    let short = reference.case("short");
    s.post("/classify", &json!({"input": "x", "model": "nope"}))
        .await
        .expect_error(404, "NotFoundError", "The model `nope` does not exist.");
    // An alias is accepted; the response names the first served name.
    let body = s
        .post(
            "/classify",
            &json!({"input": short.text, "model": "qwen-alias"}),
        )
        .await;
    assert_eq!(body.ok()["model"], MODEL);

    let answer = s
        .post_raw(
            "/classify",
            json!({"input": "x"}).to_string().into_bytes(),
            &[("content-type", "text/plain")],
        )
        .await;
    answer.expect_error(
        400,
        "Bad Request",
        "Unsupported Media Type: Only 'application/json' is allowed",
    );
    let answer = s
        .post_raw(
            "/classify",
            b"{\"input\":".to_vec(),
            &[("content-type", "application/json")],
        )
        .await;
    answer.expect_error(400, "Bad Request", "json_invalid");
    let answer = s
        .post_raw(
            "/classify",
            b"[1,2]".to_vec(),
            &[("content-type", "application/json; charset=utf-8")],
        )
        .await;
    answer.expect_error(400, "Bad Request", "dictionary");

    // Unknown fields are ignored; known-but-unused ones are accepted.
    let body = s
        .post(
            "/classify",
            &json!({"input": short.text, "foo": "bar", "user": "u", "request_id": "r", "priority": 3,
                    "cache_salt": "s", "mm_processor_kwargs": {}}),
        )
        .await;
    check_item(&body.ok()["data"][0], 0, short, &reference);

    let body = s
        .post_with(
            "/classify",
            &json!({"input": short.text}),
            &[("X-Request-Id", "abc")],
        )
        .await;
    assert_eq!(body.ok()["id"], "classify-abc");
    // Echoing the header is off unless configured.
    assert!(body.headers.get("x-request-id").is_none());

    s.post("/classify", &json!({"model": MODEL}))
        .await
        .expect_error(400, "Bad Request", "missing");
    s.post("/classify", &json!({"input": 5}))
        .await
        .expect_error(400, "Bad Request", "input");
    s.post("/classify", &json!({"input": ["a", 1]}))
        .await
        .expect_error(400, "Bad Request", "input");
    s.post("/classify", &json!({"input": [1.5]}))
        .await
        .expect_error(400, "Bad Request", "input");
    s.post("/classify", &json!({"input": [[1], [-1]]}))
        .await
        .expect_error(400, "BadRequestError", "out of vocabulary");
    s.post("/classify", &json!({"input": [999_999_999]}))
        .await
        .expect_error(400, "BadRequestError", "out of vocabulary");
    let answer = s
        .post(
            "/classify",
            &json!({"input": "x", "truncation_side": "middle"}),
        )
        .await;
    answer.expect_error(400, "Bad Request", "literal_error");
    assert!(answer.error_message().contains("middle"));
    s.post("/classify", &json!({"input": "x", "use_activation": "yes"}))
        .await
        .expect_error(400, "Bad Request", "bool_type");
    s.post("/classify", &json!({"input": "x", "priority": "high"}))
        .await
        .expect_error(400, "Bad Request", "int_type");
    s.post("/classify", &json!({"messages": "hi"}))
        .await
        .expect_error(400, "Bad Request", "messages");
    let wrong_method = s.get("/classify").await;
    assert_eq!(wrong_method.status, 405);

    // Health, ping and version.
    let health = s.get("/health").await;
    assert_eq!((health.status, health.bytes.len()), (200, 0));
    assert_eq!(s.get("/ping").await.status, 200);
    assert_eq!(s.post_raw("/ping", Vec::new(), &[]).await.status, 200);
    let version = s.get("/version").await;
    assert_eq!(version.ok()["version"], env!("CARGO_PKG_VERSION"));
    s.stop().await;
}

// DeBERTa-v3 (deberta-v3-cls: log-bucketed relative positions, conv layer, no token
// types): /classify and /pooling against transformers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deberta_v3_classify_and_pooling_match_transformers() {
    let engine = shared_engine("deberta-v3-cls", || engine_args("deberta-v3-cls"));
    let s = start(engine, local_config()).await;
    let reference = reference("deberta-v3-cls");
    // Relative positions only: max_model_len still comes from max_position_embeddings.
    assert_eq!(
        s.get("/v1/models").await.ok()["data"][0]["max_model_len"],
        512
    );
    let cases = reference.cases_of("text");
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_deref().unwrap()).collect();
    let body = s.post("/classify", &json!({"input": texts})).await;
    let data = body.ok()["data"].as_array().unwrap().clone();
    assert_eq!(data.len(), cases.len());
    for (i, case) in cases.iter().enumerate() {
        check_item(&data[i], i, case, &reference);
    }
    let tokens: usize = cases.iter().map(|c| c.input_ids.len()).sum();
    assert_eq!(body.ok()["usage"]["prompt_tokens"], tokens);
    let body = s
        .post(
            "/pooling",
            &json!({"input": texts, "task": "classify", "use_activation": false}),
        )
        .await;
    for (i, case) in cases.iter().enumerate() {
        let item = &body.ok()["data"][i];
        assert_eq!(item["index"], i);
        assert_close(&case.name, &floats(&item["data"]), &case.logits, ATOL);
    }
    // Token ids straight in, as transformers saw them.
    let long = reference.case("long");
    let body = s.post("/classify", &json!({"input": long.input_ids})).await;
    check_item(&body.ok()["data"][0], 0, long, &reference);
    s.stop().await;
}
