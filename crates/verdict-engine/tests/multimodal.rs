//! Image/video preprocessing against transformers (fixtures from
//! scripts/make_media_fixtures.py), and the media fetching policy.
//!
//! Video tests need ffmpeg (scripts/setup-ffmpeg.sh, which scripts/test.sh runs).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use verdict_engine::multimodal::{
    fetch_all, fetch_media, MediaPolicy, Modality, VisionProcessor, VisualInput,
};
use verdict_engine::EngineError;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn media(name: &str) -> Vec<u8> {
    std::fs::read(root().join("fixtures/media").join(name)).expect("fixture")
}

fn expected() -> Value {
    serde_json::from_slice(&media("expected.json")).expect("expected.json")
}

fn expected_tensor(name: &str) -> Vec<f32> {
    let bytes = media("expected.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let t = st.tensor(name).expect("tensor");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn processor() -> VisionProcessor {
    VisionProcessor::load(&root().join("fixtures/qwen2_5_vl")).expect("processor")
}

fn grid(v: &Value) -> [usize; 3] {
    let g: Vec<usize> = v["grid_thw"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    [g[0], g[1], g[2]]
}

/// (max |diff|, number of differing elements)
fn compare(got: &VisualInput, want: &[f32]) -> (f32, usize) {
    assert_eq!(got.pixel_values.len(), want.len());
    let mut max = 0f32;
    let mut n = 0;
    for (a, b) in got.pixel_values.iter().zip(want) {
        let d = (a - b).abs();
        if d > 0.0 {
            n += 1;
        }
        max = max.max(d);
    }
    (max, n)
}

fn check_image(name: &str, file: &str, tol: f32) -> (f32, usize) {
    let exp = &expected()["images"][name];
    let got = processor().image(&media(file)).unwrap();
    assert_eq!(got.modality, Modality::Image);
    assert_eq!(got.grid_thw, grid(exp), "{file}");
    assert_eq!(got.patch_dim(), 1176);
    assert_eq!(got.second_per_grid_t, 1.0);
    let want = expected_tensor(exp["tensor"].as_str().unwrap());
    let (max, n) = compare(&got, &want);
    eprintln!(
        "{file} vs transformers {name}: grid {:?}, max |diff| {max:e}, {n} of {} values differ",
        got.grid_thw,
        want.len()
    );
    assert!(max <= tol, "{file}: max |diff| {max} > {tol}");
    (max, n)
}

#[test]
fn png_matches_transformers_exactly() {
    let (max, _) = check_image("photo.png", "photo.png", 1e-5);
    assert_eq!(
        max, 0.0,
        "the uint8 resize and f32 normalisation are bit-exact"
    );
}

#[test]
fn lossless_webp_and_bmp_match_the_png() {
    check_image("photo.png", "photo.webp", 0.0);
    check_image("photo.png", "photo.bmp", 0.0);
}

#[test]
fn alpha_png_is_composited_on_white_like_transformers() {
    check_image("alpha.png", "alpha.png", 0.0);
}

#[test]
fn jpeg_matches_transformers_exactly() {
    // transformers decodes with Pillow (libjpeg-turbo: ISLOW IDCT, fancy 4:2:0
    // upsampling); JPEGs go through libjpeg-turbo's decoder here too (jpeg.rs),
    // so the pixels and everything after them are identical. (A pure-Rust
    // decoder differs from libjpeg-turbo by a level or so on subsampled chroma.)
    check_image("photo.jpg", "photo.jpg", 0.0);
}

#[test]
fn gif_first_frame_matches_the_same_png() {
    let p = processor();
    let gif = p.image(&media("palette.gif")).unwrap();
    let png = p.image(&media("palette.png")).unwrap();
    assert_eq!(gif, png);
}

#[test]
fn exif_orientation_is_applied() {
    let exp = &expected()["rotated_jpg"];
    let got = processor().image(&media("rotated.jpg")).unwrap();
    assert_eq!(got.grid_thw, grid(exp));
}

#[test]
fn qwen25_default_limits() {
    let exp = &expected()["qwen25_limits_photo_png"];
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        r#"{{"min_pixels": {}, "max_pixels": {}, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}}"#,
        exp["min_pixels"], exp["max_pixels"]
    );
    std::fs::write(dir.path().join("preprocessor_config.json"), cfg).unwrap();
    let got = VisionProcessor::load(dir.path())
        .unwrap()
        .image(&media("photo.png"))
        .unwrap();
    assert_eq!(got.grid_thw, grid(exp));
    assert_eq!(got.num_tokens(2), 80 / 4);
    let sum: f64 = got.pixel_values.iter().map(|&v| f64::from(v)).sum();
    let abs_sum: f64 = got.pixel_values.iter().map(|&v| f64::from(v).abs()).sum();
    assert!(
        (sum - exp["sum"].as_f64().unwrap()).abs() < 1e-6 * abs_sum,
        "{sum}"
    );
    assert!((abs_sum - exp["abs_sum"].as_f64().unwrap()).abs() < 1e-6 * abs_sum);
    for pick in exp["picks"].as_array().unwrap() {
        let i = pick[0].as_u64().unwrap() as usize;
        assert_eq!(
            got.pixel_values[i],
            pick[1].as_f64().unwrap() as f32,
            "element {i}"
        );
    }
}

fn check_video(name: &str) -> (f32, usize) {
    let exp = &expected()["videos"][name];
    let p = VisionProcessor::load(&root().join(exp["config_dir"].as_str().unwrap())).unwrap();
    let got = p.video(&media(name)).unwrap();
    assert_eq!(got.modality, Modality::Video);
    assert_eq!(got.grid_thw, grid(exp), "{name}");
    let spg = exp["second_per_grid_t"].as_f64().unwrap() as f32;
    assert_eq!(got.second_per_grid_t, spg, "{name}");
    let want = expected_tensor(exp["tensor"].as_str().unwrap());
    let (max, n) = compare(&got, &want);
    eprintln!(
        "{name} vs transformers (PyAV): grid {:?}, second_per_grid_t {}, max |diff| {max:e}, {n} of {} values differ",
        got.grid_thw,
        got.second_per_grid_t,
        want.len()
    );
    (max, n)
}

#[test]
fn video_fps_sampling_matches_transformers() {
    // ffmpeg's rgb24 frames are bit-identical to PyAV's here (same swscale flags).
    let (max, _) = check_video("clip.mp4");
    assert_eq!(max, 0.0);
}

#[test]
fn video_all_frames_padded_matches_transformers() {
    let (max, _) = check_video("short.mp4");
    assert_eq!(max, 0.0);
}

#[test]
fn missing_ffmpeg_is_a_clear_validation_error() {
    let p = processor().with_ffmpeg("/nonexistent/dir/ffmpeg");
    let e = p.video(&media("clip.mp4")).unwrap_err();
    assert!(matches!(e, EngineError::Validation { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("video input needs ffmpeg; run scripts/setup-ffmpeg.sh"),
        "{e}"
    );
}

#[test]
fn undecodable_media_is_rejected() {
    let p = processor();
    let e = p.image(b"definitely not an image").unwrap_err();
    assert!(matches!(e, EngineError::Validation { .. }), "{e}");
    let mut truncated = media("photo.png");
    truncated.truncate(200);
    assert!(matches!(
        p.image(&truncated),
        Err(EngineError::Validation { .. })
    ));
    // A video that is not one (ffmpeg runs and fails).
    let e = p.video(b"definitely not a video").unwrap_err();
    assert!(matches!(e, EngineError::Validation { .. }), "{e}");
    assert!(e.to_string().contains("video"), "{e}");
    // An image given as a video has no usable video stream / too few frames.
    assert!(matches!(
        p.video(&media("photo.png")),
        Err(EngineError::Validation { .. })
    ));
}

#[test]
fn playlists_cannot_make_ffmpeg_read_other_files_or_urls() {
    let dir = tempfile::tempdir().unwrap();
    let clip = root().join("fixtures/media/clip.mp4");
    let clip = clip.canonicalize().unwrap();
    let hls = format!(
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{}\n#EXT-X-ENDLIST\n",
        clip.display()
    );
    let concat = format!("ffconcat version 1.0\nfile '{}'\n", clip.display());
    let p = processor();
    for bytes in [
        hls,
        concat,
        "#EXTM3U\nhttp://127.0.0.1:9/x.ts\n".to_string(),
    ] {
        let e = p.video(bytes.as_bytes()).unwrap_err();
        assert!(matches!(e, EngineError::Validation { .. }), "{e}");
    }
    drop(dir);
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 9])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

#[test]
fn extreme_aspect_ratio_is_rejected() {
    let e = processor().image(&png_bytes(402, 2)).unwrap_err();
    assert!(matches!(e, EngineError::Validation { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("aspect ratio must be smaller than 200"),
        "{e}"
    );
    // 200:1 is still allowed.
    assert!(processor().image(&png_bytes(400, 2)).is_ok());
}

#[test]
fn data_urls() {
    use base64::Engine as _;
    let png = media("photo.png");
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    assert_eq!(fetch_media(&url, &MediaPolicy::default()).unwrap(), png);
    let e = fetch_media(
        "data:image/png;base64,***notbase64***",
        &MediaPolicy::default(),
    )
    .unwrap_err();
    assert!(matches!(e, EngineError::Validation { .. }), "{e}");
    assert!(e.to_string().contains("invalid base64"), "{e}");
}

#[test]
fn domains_and_schemes() {
    let policy = MediaPolicy {
        allowed_domains: Some(vec!["images.example.org".into()]),
        ..MediaPolicy::default()
    };
    let e = fetch_media("https://other.example.org/cat.png", &policy).unwrap_err();
    assert!(matches!(e, EngineError::Validation { .. }), "{e}");
    assert!(e.to_string().contains("not allowed"), "{e}");
    let e = fetch_media("gopher://images.example.org/cat.png", &policy).unwrap_err();
    assert!(
        e.to_string().contains("unsupported media URL scheme"),
        "{e}"
    );
}

#[test]
fn local_files_only_under_the_allowed_path() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    std::fs::write(allowed.join("a.png"), b"inside").unwrap();
    std::fs::write(dir.path().join("secret.txt"), b"outside").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), allowed.join("link.txt")).unwrap();
    let url = |p: &Path| format!("file://{}", p.display());

    let none = MediaPolicy::default();
    let e = fetch_media(&url(&allowed.join("a.png")), &none).unwrap_err();
    assert!(e.to_string().contains("not allowed"), "{e}");

    let policy = MediaPolicy {
        allowed_local_path: Some(allowed.clone()),
        ..MediaPolicy::default()
    };
    assert_eq!(
        fetch_media(&url(&allowed.join("a.png")), &policy).unwrap(),
        b"inside"
    );
    for bad in [
        url(&dir.path().join("secret.txt")),
        format!("{}/../secret.txt", url(&allowed)),
        format!("{}/%2e%2e/secret.txt", url(&allowed)),
        url(&allowed.join("link.txt")),
        url(&dir.path().join("missing.txt")),
    ] {
        let e = fetch_media(&bad, &policy).unwrap_err();
        assert!(matches!(e, EngineError::Validation { .. }), "{bad}: {e}");
        assert!(
            e.to_string().contains("not under the allowed"),
            "{bad}: {e}"
        );
    }
    let e = fetch_media(&url(&allowed.join("missing.png")), &policy).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
}

/// A one-connection-at-a-time HTTP server on 127.0.0.1 answering `n` requests
/// from `route(path) -> (status line, extra headers, body)`.
fn serve(
    n: usize,
    route: impl Fn(&str) -> (String, String, Vec<u8>) + Send + 'static,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&buf[..k]),
                }
            }
            let text = String::from_utf8_lossy(&req);
            let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (status, headers, body) = route(&path);
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    (format!("http://{addr}"), handle)
}

#[test]
fn http_fetch_with_status_size_and_redirect_checks() {
    let png = media("photo.png");
    let body = png.clone();
    let (base, server) = serve(6, move |path| match path {
        "/photo.png" => (
            "200 OK".into(),
            "Content-Type: image/png\r\n".into(),
            body.clone(),
        ),
        "/moved" => (
            "302 Found".into(),
            "Location: /photo.png\r\n".into(),
            Vec::new(),
        ),
        "/away" => (
            "302 Found".into(),
            "Location: http://elsewhere.invalid/x.png\r\n".into(),
            Vec::new(),
        ),
        _ => ("404 Not Found".into(), String::new(), b"no".to_vec()),
    });
    let open = MediaPolicy {
        allow_private_hosts: true,
        ..MediaPolicy::default()
    };
    let got = fetch_media(&format!("{base}/photo.png"), &open).unwrap();
    assert_eq!(got, png);
    // The fetched bytes go through the image path as well.
    let out = processor().image(&got).unwrap();
    assert_eq!(out.grid_thw, [1, 6, 8]);

    let e = fetch_media(&format!("{base}/missing.png"), &open).unwrap_err();
    assert!(matches!(e, EngineError::Validation { .. }), "{e}");
    assert!(e.to_string().contains("status 404"), "{e}");

    let small = MediaPolicy {
        max_bytes: 1000,
        ..open.clone()
    };
    let e = fetch_media(&format!("{base}/photo.png"), &small).unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");

    assert_eq!(fetch_media(&format!("{base}/moved"), &open).unwrap(), png);

    // A redirect to a host outside the allowed list is refused before it is followed.
    let only_local = MediaPolicy {
        allowed_domains: Some(vec!["127.0.0.1".into()]),
        ..MediaPolicy::default()
    };
    let e = fetch_media(&format!("{base}/away"), &only_local).unwrap_err();
    assert!(e.to_string().contains("not allowed"), "{e}");
    server.join().unwrap();
}

#[test]
fn unreachable_host_fails_cleanly() {
    // A port nobody listens on (bound, then closed).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let policy = MediaPolicy {
        timeout: Duration::from_secs(2),
        allow_private_hosts: true,
        ..MediaPolicy::default()
    };
    let e = fetch_media(&format!("http://127.0.0.1:{port}/x.png"), &policy).unwrap_err();
    assert!(matches!(e, EngineError::Validation { .. }), "{e}");
    // A generic reason: the transport's own words would describe the server's network.
    let msg = e.to_string();
    assert!(msg.contains("could not be reached"), "{msg}");
    assert!(
        !msg.to_lowercase().contains("refused") && !msg.contains("os error"),
        "{msg}"
    );
}

#[test]
fn private_and_metadata_hosts_are_refused_unless_allowed() {
    let png = media("photo.png");
    let body = png.clone();
    let (base, server) = serve(2, move |_| ("200 OK".into(), String::new(), body.clone()));
    let port = base.rsplit(':').next().unwrap().to_string();
    let default = MediaPolicy::default();
    for url in [
        format!("{base}/photo.png"),
        format!("http://localhost:{port}/photo.png"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[fd00:ec2::254]/latest/meta-data/".to_string(),
        "http://10.1.2.3/x.png".to_string(),
        "http://100.64.0.1/x.png".to_string(),
        "http://[::ffff:127.0.0.1]/x.png".to_string(),
        "http://0.0.0.0/x.png".to_string(),
    ] {
        let started = Instant::now();
        let e = fetch_media(&url, &default).unwrap_err();
        assert!(
            e.to_string().contains("--allow-private-media-hosts"),
            "{url}: {e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{url} was tried"
        );
    }
    // The flag opens loopback.
    let open = MediaPolicy {
        allow_private_hosts: true,
        ..MediaPolicy::default()
    };
    assert_eq!(
        fetch_media(&format!("{base}/photo.png"), &open).unwrap(),
        png
    );
    // Listing the address itself opens it too; a listed name that resolves to
    // loopback does not (its DNS could be re-pointed).
    let listed = MediaPolicy {
        allowed_domains: Some(vec!["127.0.0.1".into(), "localhost".into()]),
        ..MediaPolicy::default()
    };
    assert_eq!(
        fetch_media(&format!("{base}/photo.png"), &listed).unwrap(),
        png
    );
    let e = fetch_media(&format!("http://localhost:{port}/photo.png"), &listed).unwrap_err();
    assert!(e.to_string().contains("--allow-private-media-hosts"), "{e}");
    server.join().unwrap();
}

#[test]
fn redirects_to_private_hosts_are_refused() {
    let (base, server) = serve(1, |_| {
        (
            "302 Found".into(),
            "Location: http://localhost/secret\r\n".into(),
            Vec::new(),
        )
    });
    // The first hop is allowed (its address is listed); the redirect names a
    // host that resolves to loopback and is refused before it is followed.
    let policy = MediaPolicy {
        allowed_domains: Some(vec!["127.0.0.1".into(), "localhost".into()]),
        ..MediaPolicy::default()
    };
    let e = fetch_media(&format!("{base}/photo.png"), &policy).unwrap_err();
    assert!(e.to_string().contains("--allow-private-media-hosts"), "{e}");
    server.join().unwrap();
}

/// A server on 127.0.0.1 answering every connection on its own thread with
/// `body` after `delay`.
fn slow_server(delay: Duration, body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Arc::new(body);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                std::thread::sleep(delay);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            });
        }
    });
    format!("http://{addr}")
}

fn loopback_policy(timeout: Duration) -> Arc<MediaPolicy> {
    Arc::new(MediaPolicy {
        allow_private_hosts: true,
        timeout,
        ..MediaPolicy::default()
    })
}

#[test]
fn one_requests_fetches_run_at_once_under_one_deadline() {
    let png = media("photo.png");
    let base = slow_server(Duration::from_millis(1000), png.clone());
    let urls: Vec<String> = (0..3).map(|i| format!("{base}/{i}.png")).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let started = Instant::now();
    let got = fetch_all(&urls, &loopback_policy(Duration::from_secs(10)), None).unwrap();
    let took = started.elapsed();
    assert_eq!(got, vec![png.clone(), png.clone(), png]);
    // One after another would take 3 s.
    assert!(took < Duration::from_millis(2500), "{took:?}");

    // The deadline covers the request, not each fetch.
    let started = Instant::now();
    let e = fetch_all(&urls, &loopback_policy(Duration::from_millis(500)), None).unwrap_err();
    assert!(e.to_string().contains("deadline"), "{e}");
    assert!(started.elapsed() < Duration::from_millis(2000));
}

#[test]
fn a_cancelled_requests_fetches_stop_at_once() {
    let base = slow_server(Duration::from_secs(8), Vec::new());
    let url = format!("{base}/slow.png");
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        flag.store(true, Ordering::Relaxed);
    });
    let started = Instant::now();
    let e = fetch_all(
        &[url.as_str()],
        &loopback_policy(Duration::from_secs(10)),
        Some(&cancel),
    )
    .unwrap_err();
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A GIF whose header declares `w` x `h` pixels, with one tiny frame of data.
fn gif_declaring(w: u16, h: u16) -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&w.to_le_bytes());
    gif.extend_from_slice(&h.to_le_bytes());
    gif.extend_from_slice(&[0x00, 0x00, 0x00, 0x2c, 0, 0, 0, 0]);
    gif.extend_from_slice(&w.to_le_bytes());
    gif.extend_from_slice(&h.to_le_bytes());
    gif.extend_from_slice(&[0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b]);
    gif
}

#[test]
fn decoded_pixels_are_budgeted_from_the_header() {
    // 29 bytes declaring 169 M pixels: decoding it would take seconds and GBs.
    let bomb = gif_declaring(13000, 13000);
    assert_eq!(bomb.len(), 29);
    let mut budget = MediaPolicy::default().pixel_budget();
    let vision = processor();
    let started = Instant::now();
    let e = vision.image_within(&bomb, &mut budget).unwrap_err();
    // Refused from the header in microseconds; the bound leaves room for a loaded machine.
    assert!(started.elapsed() < Duration::from_secs(1), "it was decoded");
    assert!(matches!(e, EngineError::Validation { .. }), "{e}");
    assert!(e.to_string().contains("--max-image-pixels"), "{e}");

    // Per request: two 100x100 images fit 20,000 pixels, a third does not.
    let policy = MediaPolicy {
        max_image_pixels: 10_000,
        max_request_pixels: 20_000,
        ..MediaPolicy::default()
    };
    let mut budget = policy.pixel_budget();
    let png = png_bytes(100, 100);
    processor().image_within(&png, &mut budget).unwrap();
    processor().image_within(&png, &mut budget).unwrap();
    let e = processor().image_within(&png, &mut budget).unwrap_err();
    assert!(
        e.to_string().contains("--max-media-pixels-per-request"),
        "{e}"
    );
    let e = processor()
        .image_within(&png_bytes(101, 100), &mut policy.pixel_budget())
        .unwrap_err();
    assert!(e.to_string().contains("--max-image-pixels"), "{e}");
}

/// Not a timed test (run it by hand): a 4000x3000 photo through the image path.
#[test]
#[ignore]
fn big_photo_timing() {
    let img = image::RgbImage::from_fn(4000, 3000, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x ^ y) % 256) as u8])
    });
    let mut jpg = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut jpg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        r#"{"min_pixels": 3136, "max_pixels": 12845056}"#,
    )
    .unwrap();
    let p = VisionProcessor::load(dir.path()).unwrap();
    for max in [12845056usize, 1003520] {
        std::fs::write(
            dir.path().join("preprocessor_config.json"),
            format!(r#"{{"min_pixels": 3136, "max_pixels": {max}}}"#),
        )
        .unwrap();
        let p2 = VisionProcessor::load(dir.path()).unwrap();
        let t = std::time::Instant::now();
        let out = p2.image(&jpg).unwrap();
        eprintln!(
            "4000x3000 JPEG, max_pixels {max}: grid {:?} in {:?}",
            out.grid_thw,
            t.elapsed()
        );
    }
    let _ = p;
}

/// The wider random check of scripts/crosscheck_media.py (run by hand: it
/// needs transformers to write its cases).
#[test]
#[ignore]
fn crosscheck_against_transformers() {
    let Some(dir) = std::env::var_os("VERDICT_MEDIA_CROSSCHECK") else {
        eprintln!("set VERDICT_MEDIA_CROSSCHECK (see scripts/crosscheck_media.py)");
        return;
    };
    let cases: Value =
        serde_json::from_slice(&std::fs::read(Path::new(&dir).join("cases.json")).unwrap())
            .unwrap();
    let mut worst = 0f32;
    for case in cases.as_array().unwrap() {
        let d = Path::new(case["dir"].as_str().unwrap());
        let bytes = std::fs::read(d.join(case["file"].as_str().unwrap())).unwrap();
        let p = VisionProcessor::load(d).unwrap();
        let got = match case["kind"].as_str().unwrap() {
            "image" => p.image(&bytes).unwrap(),
            _ => p.video(&bytes).unwrap(),
        };
        let want: Vec<f32> = std::fs::read(d.join("expected.f32"))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(got.grid_thw, grid(case), "{case}");
        if let Some(spg) = case["second_per_grid_t"].as_f64() {
            assert_eq!(got.second_per_grid_t, spg as f32, "{case}");
        }
        let (max, n) = compare(&got, &want);
        eprintln!(
            "{} {} {}: grid {:?}, max |diff| {max:e}, {n} of {} differ",
            case["kind"],
            case["file"],
            case["size"],
            got.grid_thw,
            want.len()
        );
        worst = worst.max(max);
    }
    assert_eq!(worst, 0.0);
}
