//! Qwen2.5-VL against transformers (fp32, CPU): text-only, image and video
//! conversations, each alone and all in one batch, with the media reaching the
//! engine as `data:` URLs, local files and HTTP downloads.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use verdict_engine::{
    ChatMessage, EngineArgs, Llm, MediaLimits, ParamsArg, PoolingTask, Prompt, TokenizeOptions,
};

const ATOL: f32 = 1e-4;
const FIXTURE: &str = "qwen2_5_vl-cls";

/// Serves the files of `dir` over HTTP on a loopback port until the test ends.
fn serve_dir(dir: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            let file = dir.join(path.trim_start_matches('/'));
            let response = match std::fs::read(&file) {
                Ok(body) => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend(body);
                    r
                }
                Err(_) => {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_vec()
                }
            };
            let _ = stream.write_all(&response);
        }
    });
    format!("http://{addr}")
}

/// How a case's `media:<file>` URLs are sent.
#[derive(Clone, Copy)]
enum Transport {
    DataUrl,
    LocalFile,
    Http,
}

fn media_url(name: &str, media: &Path, transport: Transport, http: &str) -> String {
    let path = media.join(name);
    match transport {
        Transport::DataUrl => {
            let bytes = std::fs::read(&path).expect("media file");
            let mime = match path.extension().and_then(|e| e.to_str()) {
                Some("png") => "image/png",
                Some("jpg") => "image/jpeg",
                Some("mp4") => "video/mp4",
                _ => "application/octet-stream",
            };
            format!(
                "data:{mime};base64,{}",
                base64::engine::general_purpose::STANDARD.encode(bytes)
            )
        }
        Transport::LocalFile => format!("file://{}", path.display()),
        Transport::Http => format!("{http}/{name}"),
    }
}

/// The case's messages with every `media:` URL replaced.
fn with_urls(
    messages: &[ChatMessage],
    media: &Path,
    transport: Transport,
    http: &str,
) -> Vec<ChatMessage> {
    let mut out = messages.to_vec();
    for m in &mut out {
        if let Value::Array(parts) = &mut m.content {
            for part in parts {
                for key in ["image_url", "video_url"] {
                    if let Some(url) = part.get_mut(key).and_then(|v| v.get_mut("url")) {
                        let name = url
                            .as_str()
                            .unwrap_or_default()
                            .trim_start_matches("media:")
                            .to_string();
                        *url = json!(media_url(&name, media, transport, http));
                    }
                }
            }
        }
    }
    out
}

fn vl_args(dir: &Path, reference: &Reference) -> EngineArgs {
    let mut args = engine_args(dir, reference);
    args.allowed_local_media_path = Some(dir.join("media"));
    // The http cases are served from loopback, which is refused by default.
    args.allow_private_media_hosts = true;
    args
}

fn prompts_for(reference: &Reference, media: &Path, http: &str) -> Vec<Prompt> {
    let transports = [Transport::DataUrl, Transport::LocalFile, Transport::Http];
    reference
        .cases
        .iter()
        .enumerate()
        .map(|(i, c)| Prompt::Chat {
            messages: with_urls(
                c.messages.as_ref().expect("messages"),
                media,
                transports[i % transports.len()],
                http,
            ),
            options: c.chat_options(),
        })
        .collect()
}

fn check(llm: &Llm, reference: &Reference, prompts: &[Prompt], label: &str) {
    check_classify_cases(llm, &reference.cases, prompts, label, ATOL);
}

#[test]
fn qwen2_5_vl_matches_transformers_for_text_images_and_video() {
    let dir = fixture_dir(FIXTURE);
    let reference = load_reference(&dir);
    let media = dir.join("media");
    let http = serve_dir(media.clone());
    let llm = Llm::new(vl_args(&dir, &reference)).expect("load Qwen2.5-VL fixture");
    assert_eq!(llm.info().num_labels, 2);
    assert!(llm.info().multimodal.is_some());
    let prompts = prompts_for(&reference, &media, &http);
    check(&llm, &reference, &prompts, "convert");
}

/// The reference restricted to the named cases.
fn subset(reference: Reference, names: &[&str]) -> Reference {
    let cases = reference
        .cases
        .iter()
        .filter(|c| names.contains(&c.name.as_str()))
        .cloned()
        .collect();
    Reference { cases, ..reference }
}

#[test]
fn qwen2_5_vl_text_only_conversation_matches_transformers() {
    let dir = fixture_dir(FIXTURE);
    let reference = subset(load_reference(&dir), &["text_only"]);
    let llm = Llm::new(vl_args(&dir, &reference)).expect("load Qwen2.5-VL fixture");
    let prompts = prompts_for(&reference, &dir.join("media"), "http://unused.invalid");
    check(&llm, &reference, &prompts, "text");
}

#[test]
fn qwen2_5_vl_loads_as_sequence_classification_through_hf_overrides() {
    let dir = fixture_dir(FIXTURE);
    let reference = subset(load_reference(&dir), &["text_only", "video"]);
    let mut args = vl_args(&dir, &reference);
    args.convert = verdict_engine::Convert::Auto;
    args.hf_overrides = Some(json!({"architectures": ["Qwen2_5_VLForSequenceClassification"]}));
    let llm = Llm::new(args).expect("load with hf_overrides");
    let prompts = prompts_for(&reference, &dir.join("media"), "http://unused.invalid");
    check(&llm, &reference, &prompts, "hf_overrides");
}

fn image_message(url: &str) -> Vec<ChatMessage> {
    serde_json::from_value(json!([{
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
    }]))
    .expect("messages")
}

#[test]
fn bad_media_fails_alone_with_clear_errors() {
    let dir = fixture_dir(FIXTURE);
    let reference = load_reference(&dir);
    let media = dir.join("media");
    let mut args = vl_args(&dir, &reference);
    args.limit_mm_per_prompt = MediaLimits { image: 1, video: 0 };
    args.allowed_media_domains = Some(vec!["media.example".into()]);
    let llm = Llm::new(args).expect("load");
    let png = media_url("tall.png", &media, Transport::DataUrl, "");
    let chat = |messages| Prompt::Chat {
        messages,
        options: Default::default(),
    };
    let two: Vec<ChatMessage> = serde_json::from_value(json!([{
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": png}},
            {"type": "image_url", "image_url": {"url": png}}
        ]
    }]))
    .expect("messages");
    let video: Vec<ChatMessage> = serde_json::from_value(json!([{
        "role": "user",
        "content": [{"type": "video_url", "video_url": {"url": media_url("clip.mp4", &media, Transport::LocalFile, "")}}]
    }]))
    .expect("messages");
    let cases: Vec<(Prompt, &str)> = vec![
        (
            chat(image_message("data:image/png;base64,bm90IGFuIGltYWdl")),
            "image",
        ),
        (
            chat(two),
            "At most 1 image(s) may be provided in one prompt.",
        ),
        (
            chat(video),
            "At most 0 video(s) may be provided in one prompt.",
        ),
        (
            chat(image_message("http://elsewhere.example/cat.png")),
            "elsewhere.example",
        ),
        (chat(image_message("file:///etc/passwd")), "/etc/passwd"),
        (chat(image_message(&png)), ""),
    ];
    let prompts: Vec<Prompt> = cases.iter().map(|(p, _)| p.clone()).collect();
    let results = llm
        .encode_each(
            &prompts,
            ParamsArg::Default,
            Some(PoolingTask::Classify),
            &TokenizeOptions::default(),
            None,
            &|_| {},
        )
        .expect("call");
    for ((_, want), got) in cases.iter().zip(&results) {
        match (want.is_empty(), got) {
            (true, Ok(out)) => assert_eq!(out.outputs.flatten().len(), 2),
            (true, Err(e)) => panic!("the good prompt failed: {e}"),
            (false, Ok(_)) => panic!("expected an error containing {want:?}"),
            (false, Err(e)) => {
                assert!(e.is_client_error(), "{e} should be the client's fault");
                assert!(
                    e.to_string().contains(want),
                    "{e:?} should mention {want:?}"
                );
            }
        }
    }
}

#[test]
fn video_longer_than_max_model_len_is_refused() {
    let dir = fixture_dir(FIXTURE);
    let reference = load_reference(&dir);
    let media = dir.join("media");
    let mut args = vl_args(&dir, &reference);
    args.max_model_len = Some(40);
    let llm = Llm::new(args).expect("load");
    let case = reference
        .cases
        .iter()
        .find(|c| c.name == "video")
        .expect("video case");
    let prompt = Prompt::Chat {
        messages: with_urls(
            case.messages.as_ref().expect("messages"),
            &media,
            Transport::LocalFile,
            "",
        ),
        options: case.chat_options(),
    };
    let err = llm
        .classify(&[prompt], ParamsArg::Default, &TokenizeOptions::default())
        .expect_err("47 tokens do not fit in 40");
    assert!(
        err.to_string()
            .contains("maximum context length is 40 tokens"),
        "{err}"
    );
}

/// The fixture rewritten the way checkpoints saved before transformers v5 are:
/// text settings at the top level with `rope_scaling: {type: mrope}`, the
/// vision config spelled `in_chans`/`spatial_patch_size`, weights under
/// `visual.` and `model.`, and one `preprocessor_config.json` with
/// `min_pixels`/`max_pixels`.
fn legacy_checkpoint(dir: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("tempdir");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
            .expect("json");
    let mut flat = config.clone();
    let obj = flat.as_object_mut().expect("object");
    obj.remove("text_config");
    for (k, v) in config["text_config"].as_object().expect("text_config") {
        obj.insert(k.clone(), v.clone());
    }
    let rope = obj.remove("rope_parameters").expect("rope_parameters");
    obj.insert("rope_theta".into(), rope["rope_theta"].clone());
    obj.insert(
        "rope_scaling".into(),
        json!({"type": "mrope", "mrope_section": rope["mrope_section"]}),
    );
    let vision = obj["vision_config"].as_object_mut().expect("vision_config");
    let channels = vision.remove("in_channels").expect("in_channels");
    vision.insert("in_chans".into(), channels);
    vision.insert("spatial_patch_size".into(), vision["patch_size"].clone());
    vision.remove("rope_parameters");
    std::fs::write(out.path().join("config.json"), flat.to_string()).expect("write config");

    let bytes = std::fs::read(dir.join("model.safetensors")).expect("weights");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let name = name
                .replace("model.visual.", "visual.")
                .replace("model.language_model.", "model.");
            (name, view)
        })
        .collect();
    safetensors::serialize_to_file(renamed, None, &out.path().join("model.safetensors"))
        .expect("write weights");

    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
    ] {
        std::fs::copy(dir.join(f), out.path().join(f)).expect("copy");
    }
    let image: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("preprocessor_config.json")).expect("preprocessor"),
    )
    .expect("json");
    let mut legacy = image.clone();
    let obj = legacy.as_object_mut().expect("object");
    let size = obj.remove("size").expect("size");
    obj.insert("min_pixels".into(), size["shortest_edge"].clone());
    obj.insert("max_pixels".into(), size["longest_edge"].clone());
    obj.insert(
        "image_processor_type".into(),
        json!("Qwen2_5_VLImageProcessor"),
    );
    std::fs::write(
        out.path().join("preprocessor_config.json"),
        legacy.to_string(),
    )
    .expect("write preprocessor");
    out
}

#[test]
fn qwen2_5_vl_loads_checkpoints_in_the_pre_v5_layout() {
    let dir = fixture_dir(FIXTURE);
    let reference = subset(
        load_reference(&dir),
        &["text_only", "image_png", "image_jpeg", "two_images"],
    );
    let legacy = legacy_checkpoint(&dir);
    let llm = Llm::new(engine_args(legacy.path(), &reference)).expect("load the legacy layout");
    let prompts: Vec<Prompt> = reference
        .cases
        .iter()
        .map(|c| Prompt::Chat {
            messages: with_urls(
                c.messages.as_ref().expect("messages"),
                &dir.join("media"),
                Transport::DataUrl,
                "",
            ),
            options: c.chat_options(),
        })
        .collect();
    check(&llm, &reference, &prompts, "legacy");
}

/// Per-request `mm_processor_kwargs` reach the processors as transformers'
/// `images_kwargs` / `videos_kwargs` do: with these, transformers gives the
/// image a [1, 2, 4] grid and samples the video at 1 fps ([2, 4, 4]), 36 tokens.
#[test]
fn mm_processor_kwargs_override_sizes_and_fps() {
    let dir = fixture_dir(FIXTURE);
    let reference = subset(load_reference(&dir), &["image_and_video"]);
    let llm = Llm::new(vl_args(&dir, &reference)).expect("load");
    let prompts = prompts_for(&reference, &dir.join("media"), "http://unused.invalid");
    let kwargs = json!({
        "images_kwargs": {"size": {"shortest_edge": 784, "longest_edge": 3136}},
        "videos_kwargs": {"fps": 1.0}
    });
    let opts = TokenizeOptions {
        mm_processor_kwargs: kwargs.as_object().cloned(),
        ..Default::default()
    };
    let out = llm
        .classify(&prompts, ParamsArg::Default, &opts)
        .expect("classify with kwargs");
    assert_eq!(out[0].prompt_token_ids.len(), 36);
    let bad = TokenizeOptions {
        mm_processor_kwargs: json!({"min_pixels": 100000, "max_pixels": 10})
            .as_object()
            .cloned(),
        ..Default::default()
    };
    let err = llm
        .classify(&prompts, ParamsArg::Default, &bad)
        .expect_err("min above max");
    assert!(
        err.is_client_error() && err.to_string().contains("min_pixels"),
        "{err}"
    );
}
