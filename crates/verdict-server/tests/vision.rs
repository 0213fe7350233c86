//! spec §9.3 on the tiny Qwen2.5-VL fixture: `/classify` and `/pooling` chat
//! requests with text, images (base64 `data:` URLs and local files) and video,
//! checked against transformers; bad media gets vLLM's 400 envelope while the
//! other requests keep working.

mod common;

use std::sync::Arc;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use verdict_engine::{Convert, Engine, MediaLimits};

const FIXTURE: &str = "qwen2_5_vl-cls";
const MODEL: &str = "test/qwen2_5_vl-cls";

fn engine() -> Arc<Engine> {
    shared_engine("qwen2_5_vl", || {
        let mut args = engine_args(FIXTURE);
        args.convert = Convert::Classify;
        args.max_model_len = Some(512);
        args.limit_mm_per_prompt = MediaLimits { image: 2, video: 1 };
        args.allowed_local_media_path = Some(fixture_dir(FIXTURE).join("media"));
        args.allowed_media_domains = Some(vec!["127.0.0.1".into()]);
        args
    })
}

fn media_path(name: &str) -> std::path::PathBuf {
    fixture_dir(FIXTURE)
        .join("media")
        .join(name)
        .canonicalize()
        .expect("media file")
}

fn data_url(name: &str) -> String {
    let bytes = std::fs::read(media_path(name)).expect("media file");
    let mime = if name.ends_with(".png") {
        "image/png"
    } else if name.ends_with(".jpg") {
        "image/jpeg"
    } else {
        "video/mp4"
    };
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The case's messages with `media:<file>` URLs sent as data URLs (images)
/// or local file URLs (videos).
fn messages(case: &Case) -> Value {
    let mut messages = case.messages.clone().expect("messages");
    for m in messages.as_array_mut().expect("list") {
        let Some(parts) = m["content"].as_array_mut() else {
            continue;
        };
        for part in parts {
            for key in ["image_url", "video_url"] {
                if let Some(url) = part.get_mut(key).and_then(|v| v.get_mut("url")) {
                    let name = url
                        .as_str()
                        .unwrap_or_default()
                        .trim_start_matches("media:");
                    let sent = if key == "image_url" {
                        data_url(name)
                    } else {
                        format!("file://{}", media_path(name).display())
                    };
                    *url = json!(sent);
                }
            }
        }
    }
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_and_pooling_match_transformers_with_images_and_video() {
    let s = start(engine(), local_config()).await;
    let reference = reference(FIXTURE);
    for case in &reference.cases {
        let body = json!({
            "model": MODEL,
            "messages": messages(case),
            "add_generation_prompt": case.add_generation_prompt,
        });
        let answer = s.post("/classify", &body).await;
        let out = answer.ok();
        let item = &out["data"][0];
        assert_close(&case.name, &floats(&item["probs"]), &case.probs, ATOL);
        assert_eq!(
            out["usage"]["prompt_tokens"],
            case.input_ids.len(),
            "{}",
            case.name
        );
        assert_eq!(
            item["label"].as_str(),
            reference.label_of(&case.probs).as_deref()
        );
        let pooled = s.post("/pooling", &body).await;
        assert_close(
            &format!("{} /pooling", case.name),
            &floats(&pooled.ok()["data"][0]["data"]),
            &case.probs,
            ATOL,
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_media_is_a_400_and_the_server_keeps_serving() {
    let s = start(engine(), local_config()).await;
    let image = |url: String| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "what is this?"}
        ]}]})
    };
    s.post(
        "/classify",
        &image("data:image/png;base64,aGVsbG8gd29ybGQ=".into()),
    )
    .await
    .expect_error(400, "BadRequestError", "image");
    s.post(
        "/classify",
        &image("https://not-allowed.example/cat.png".into()),
    )
    .await
    .expect_error(400, "BadRequestError", "not-allowed.example");
    s.post("/classify", &image("file:///etc/hostname".into()))
        .await
        .expect_error(400, "BadRequestError", "/etc/hostname");
    let png = data_url("tall.png");
    let three = json!({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png}},
        {"type": "image_url", "image_url": {"url": png}},
        {"type": "image_url", "image_url": {"url": png}}
    ]}]});
    s.post("/classify", &three).await.expect_error(
        400,
        "BadRequestError",
        "At most 2 image(s) may be provided in one prompt.",
    );
    // A good request still works after all of them.
    s.post("/classify", &image(png)).await.ok();
    s.stop().await;
}

/// An HTTP server on 127.0.0.1 that answers every request (each on its own
/// thread) with `body` after `delay`.
fn slow_media_host(delay: std::time::Duration, body: Vec<u8>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let body = Arc::new(body);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                std::thread::sleep(delay);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            });
        }
    });
    format!("http://{addr}/image.png")
}

fn image_request(url: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "what is this?"}
    ]}]})
}

/// One tokenizer thread and one media thread: media requests waiting on a
/// slow host must not hold up a plain text request.
fn narrow_config() -> verdict_server::ServerConfig {
    verdict_server::ServerConfig {
        tokenizer_workers: 1,
        media_workers: 1,
        ..local_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_media_does_not_delay_text_requests() {
    let s = Arc::new(start(engine(), narrow_config()).await);
    let png = std::fs::read(media_path("tall.png")).expect("media file");
    let url = slow_media_host(std::time::Duration::from_secs(3), png);
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (s, body) = (s.clone(), image_request(&url));
            tokio::spawn(async move { s.post("/classify", &body).await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    s.post("/classify", &json!({"model": MODEL, "input": "plain text"}))
        .await
        .ok();
    let text_took = started.elapsed();
    assert!(
        text_took < std::time::Duration::from_millis(1500),
        "a text request waited {text_took:?} behind media requests"
    );
    for request in slow {
        request.await.expect("task").ok();
    }
    match Arc::try_unwrap(s) {
        Ok(s) => s.stop().await,
        Err(_) => panic!("server still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_clients_media_work_is_cancelled() {
    let s = start(engine(), narrow_config()).await;
    // The host answers after 8 s, well past the client's patience.
    let url = slow_media_host(std::time::Duration::from_secs(8), Vec::new());
    let gone = s
        .client
        .post(s.url("/classify"))
        .json(&image_request(&url))
        .timeout(std::time::Duration::from_millis(300))
        .send()
        .await;
    assert!(gone.is_err(), "the request should have timed out");
    // The only media thread is free again at once, not after the 8 s.
    let started = std::time::Instant::now();
    s.post("/classify", &image_request(&data_url("tall.png")))
        .await
        .ok();
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(3),
        "the next media request waited {took:?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_declaring_too_many_pixels_is_refused_before_decoding() {
    let s = start(engine(), local_config()).await;
    // A 35-byte GIF whose header declares 13000x13000 pixels.
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&13000u16.to_le_bytes());
    gif.extend_from_slice(&13000u16.to_le_bytes());
    gif.extend_from_slice(&[0x00, 0x00, 0x00, 0x2c, 0, 0, 0, 0]);
    gif.extend_from_slice(&13000u16.to_le_bytes());
    gif.extend_from_slice(&13000u16.to_le_bytes());
    gif.extend_from_slice(&[0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b]);
    let url = format!(
        "data:image/gif;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&gif)
    );
    let started = std::time::Instant::now();
    s.post("/classify", &image_request(&url))
        .await
        .expect_error(400, "BadRequestError", "--max-image-pixels");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    s.stop().await;
}
