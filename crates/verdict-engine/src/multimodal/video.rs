//! Videos through the ffmpeg binary, matching transformers' PyAV reader
//! (`read_video_pyav`) and `Qwen2VLVideoProcessor.sample_frames`.
//!
//! Stream facts come from one `ffmpeg -i FILE -map 0:v:0 -c copy -f framecrc -`
//! run (no ffprobe needed: the imageio-ffmpeg wheel ships ffmpeg alone):
//! - frame count = number of video packets (PyAV's `stream.frames`, the
//!   container's count, is the same for MP4/MOV; for WebM/MKV, where PyAV
//!   reports 0 and transformers cannot sample, the packet count is used);
//! - frame rate = PyAV's `stream.average_rate`: for MP4/MOV libavformat sets
//!   it to `frames * timescale / sum(sample durations)`, which is exactly
//!   `packets / sum(packet durations)` in the stream time base; ffmpeg's own
//!   stream line prints the same value to 2 decimals, and when the two
//!   disagree by more than that rounding (WebM, whose packet durations are
//!   rounded milliseconds) the printed value is used.
//!
//! Frames are decoded to rgb24 by `ffmpeg -noautorotate ... -fps_mode
//! passthrough -sws_flags bilinear -pix_fmt rgb24`: PyAV's `to_ndarray("rgb24")`
//! converts with swscale using SWS_BILINEAR and the frame's colour tags, does not
//! apply display-matrix rotation, and yields every decoded frame once; these
//! flags make the CLI do the same (bit-identical on the fixtures, BT.601, BT.709
//! and full-range alike).

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::config::VideoConfig;
use super::image::Rgb8;
use crate::error::{EngineError, Result};

pub(crate) const MISSING_FFMPEG: &str =
    "video input needs ffmpeg; run scripts/setup-ffmpeg.sh (or set VERDICT_FFMPEG to an ffmpeg binary)";

/// Most frames decoded from one video. Bounds the work one video can ask for and
/// keeps the frame-selection filter well inside the kernel's 128 KiB limit on
/// one argument (about 17 bytes per selected frame).
pub(crate) const MAX_DECODED_FRAMES: usize = 2048;

/// Where the ffmpeg binary is: `explicit` (set on the processor), then
/// `$VERDICT_FFMPEG`, then the copy scripts/setup-ffmpeg.sh installs under
/// `${VERDICT_HOME:-$HOME/.cache/verdict}/ffmpeg/bin/ffmpeg`, then `PATH`.
pub(crate) fn locate_ffmpeg(explicit: Option<&Path>) -> Result<PathBuf> {
    let named = explicit.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("VERDICT_FFMPEG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(path) = named {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(EngineError::validation(format!(
                "{MISSING_FFMPEG} ({} does not exist)",
                path.display()
            )))
        };
    }
    if let Some(home) = verdict_home() {
        let cached = home.join("ffmpeg").join("bin").join("ffmpeg");
        if cached.is_file() {
            return Ok(cached);
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("ffmpeg");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(EngineError::validation(MISSING_FFMPEG))
}

fn verdict_home() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("VERDICT_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(h));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("verdict"))
}

/// Input options for every ffmpeg run on request data: the input may only be
/// the local temporary file (no network or other protocols) and must be a
/// plain media container, so playlists and concat scripts (HLS, concat,
/// ffconcat...) cannot make ffmpeg read other files or URLs.
const INPUT_GUARD: [&str; 4] = [
    "-protocol_whitelist",
    "file",
    "-format_whitelist",
    "mov,mp4,matroska,webm,avi,mpegts,mpeg,flv,ogg,asf,gif,ivf,h264,hevc,m4v,mjpeg,yuv4mpegpipe",
];

/// What PyAV's `VideoMetadata` holds before sampling.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VideoInfo {
    pub total_frames: usize,
    pub fps: Option<f64>,
    pub width: usize,
    pub height: usize,
}

/// Run ffmpeg with a wall-clock limit, handing its stdout to `consume`.
/// Returns ffmpeg's stderr; a non-zero exit is an error carrying its last line.
fn run_ffmpeg(
    ffmpeg: &Path,
    args: &[&std::ffi::OsStr],
    timeout: Duration,
    consume: &mut dyn FnMut(&mut dyn Read) -> Result<()>,
) -> Result<String> {
    let mut child = Command::new(ffmpeg)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(ffmpeg, args, &e))?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(EngineError::validation("could not read ffmpeg's output"));
    };
    let child = Arc::new(Mutex::new(child));
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = {
        let child = Arc::clone(&child);
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                if let Ok(mut c) = child.lock() {
                    let _ = c.kill();
                }
                true
            } else {
                false
            }
        })
    };
    let mut out = BufReader::with_capacity(1 << 20, stdout);
    let consumed = consume(&mut out);
    // Drain whatever is left so ffmpeg never blocks on a full pipe, then reap it.
    if consumed.is_err() {
        if let Ok(mut c) = child.lock() {
            let _ = c.kill();
        }
    }
    let _ = std::io::copy(&mut out, &mut std::io::sink());
    let status = child.lock().ok().and_then(|mut c| c.wait().ok());
    let _ = done_tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let stderr = err_reader.join().unwrap_or_default();
    if timed_out {
        return Err(EngineError::validation(format!(
            "video decoding took longer than {} s",
            timeout.as_secs()
        )));
    }
    consumed?;
    match status {
        Some(s) if s.success() => Ok(stderr),
        _ => {
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("ffmpeg failed")
                .trim()
                .to_string();
            Err(EngineError::validation(format!(
                "could not read the video: {last}"
            )))
        }
    }
}

/// Why ffmpeg could not be started, in words that point at the real cause: only
/// a missing or non-executable binary means "install ffmpeg".
fn spawn_error(ffmpeg: &Path, args: &[&std::ffi::OsStr], e: &std::io::Error) -> EngineError {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound | ErrorKind::PermissionDenied => EngineError::validation(format!(
            "{MISSING_FFMPEG} (could not run {}: {e})",
            ffmpeg.display()
        )),
        ErrorKind::ArgumentListTooLong => {
            let bytes: usize = args.iter().map(|a| a.len() + 1).sum();
            EngineError::validation(format!(
                "could not read the video: the ffmpeg command line is too long for the system \
                 ({bytes} bytes of arguments; sample fewer frames)"
            ))
        }
        _ => EngineError::validation(format!(
            "could not read the video: starting ffmpeg failed: {e}"
        )),
    }
}

/// Frame count, frame rate and size of the first video stream of `file`.
pub(crate) fn probe(ffmpeg: &Path, file: &Path, timeout: Duration) -> Result<VideoInfo> {
    let mut packets = String::new();
    let args: Vec<&std::ffi::OsStr> = ["-hide_banner", "-nostdin"]
        .iter()
        .chain(INPUT_GUARD.iter())
        .chain(["-i"].iter())
        .map(std::ffi::OsStr::new)
        .chain(std::iter::once(file.as_os_str()))
        .chain(
            ["-map", "0:v:0", "-c", "copy", "-f", "framecrc", "pipe:1"]
                .iter()
                .map(std::ffi::OsStr::new),
        )
        .collect();
    let stderr = run_ffmpeg(ffmpeg, &args, timeout, &mut |r| {
        r.read_to_string(&mut packets)
            .map(|_| ())
            .map_err(|e| EngineError::validation(format!("could not read the video: {e}")))
    })?;
    parse_probe(&packets, &stderr)
}

fn parse_probe(packets: &str, stderr: &str) -> Result<VideoInfo> {
    let mut tb: Option<(u64, u64)> = None;
    let mut dims: Option<(usize, usize)> = None;
    let (mut count, mut duration_sum, mut durations_ok) = (0usize, 0u64, true);
    for line in packets.lines() {
        if let Some(rest) = line.strip_prefix("#tb 0:") {
            let mut it = rest.trim().split('/');
            if let (Some(n), Some(d)) = (it.next(), it.next()) {
                tb = n.trim().parse().ok().zip(d.trim().parse().ok());
            }
        } else if let Some(rest) = line.strip_prefix("#dimensions 0:") {
            let mut it = rest.trim().split('x');
            if let (Some(w), Some(h)) = (it.next(), it.next()) {
                dims = w.trim().parse().ok().zip(h.trim().parse().ok());
            }
        } else if line.starts_with(|c: char| c.is_ascii_digit()) {
            count += 1;
            match line.split(',').nth(3).map(|d| d.trim().parse::<i64>()) {
                Some(Ok(d)) if d > 0 => duration_sum += d as u64,
                _ => durations_ok = false,
            }
        }
    }
    let (width, height) = dims
        .filter(|&(w, h)| w > 0 && h > 0)
        .ok_or_else(|| EngineError::validation("could not read the video: no video stream"))?;
    if count == 0 {
        return Err(EngineError::validation(
            "could not read the video: the video stream has no frames",
        ));
    }
    let exact = match tb {
        Some((num, den)) if durations_ok && duration_sum > 0 && num > 0 => {
            Some((count as f64 * den as f64) / (duration_sum as f64 * num as f64))
        }
        _ => None,
    };
    let shown = printed_fps(stderr);
    let fps = match (exact, shown) {
        (Some(e), Some(s)) if (e - s).abs() <= 0.005 + 1e-9 * s => Some(e),
        (_, Some(s)) => Some(s),
        (e, None) => e,
    };
    Ok(VideoInfo {
        total_frames: count,
        fps,
        width,
        height,
    })
}

/// The "12.50 fps" of the first video stream line of ffmpeg's input dump
/// (libavformat's `print_fps` of the stream's average frame rate).
fn printed_fps(stderr: &str) -> Option<f64> {
    let line = stderr
        .lines()
        .take_while(|l| !l.starts_with("Output #") && !l.starts_with("Stream mapping"))
        .find(|l| l.trim_start().starts_with("Stream #") && l.contains(": Video:"))?;
    line.split(',').find_map(|part| {
        let v = part.trim().strip_suffix(" fps")?;
        match v.strip_suffix('k') {
            Some(k) => k.parse::<f64>().ok().map(|x| x * 1000.0),
            None => v.parse::<f64>().ok(),
        }
        .filter(|x| x.is_finite() && *x > 0.0)
    })
}

/// `Qwen2VLVideoProcessor.sample_frames` (when `do_sample_frames`), else all
/// frames; the indices transformers' `torch.arange(0, total, total / n).int()`
/// yields (float32 values, truncated).
pub(crate) fn sample_indices(
    cfg: &VideoConfig,
    total: usize,
    video_fps: Option<f64>,
) -> Result<Vec<usize>> {
    if !cfg.do_sample_frames {
        return Ok((0..total).collect());
    }
    let tps = cfg.common.temporal_patch_size as f64;
    let num_frames: Option<f64> = if let Some(n) = cfg.num_frames {
        Some((n as f64 / tps).round_ties_even() * tps)
    } else if let Some(fps) = cfg.fps {
        let video_fps = video_fps.ok_or_else(|| {
            EngineError::validation("could not read the video: its frame rate is unknown, and frames are sampled by fps")
        })?;
        let max_frames = ((cfg.max_frames.min(total)) as f64 / tps).floor() * tps;
        let mut n = total as f64 / video_fps * fps;
        n = n
            .max(cfg.min_frames as f64)
            .min(max_frames)
            .min(total as f64);
        Some((n / tps).floor() * tps)
    } else {
        None
    };
    let Some(n) = num_frames else {
        return Ok((0..total).collect());
    };
    if n > total as f64 {
        return Err(EngineError::validation(format!(
            "Video can't be sampled. The inferred `num_frames={n}` exceeds `total_num_frames={total}`."
        )));
    }
    if n <= 0.0 {
        return Err(EngineError::validation(format!(
            "video is too short: {total} frame(s) give no group of temporal_patch_size={} frames to sample",
            cfg.common.temporal_patch_size
        )));
    }
    let step = total as f64 / n;
    let len = (total as f64 / step).ceil() as usize;
    Ok((0..len)
        .map(|i| ((step * i as f64) as f32) as usize)
        .collect())
}

/// Decode the frames at `indices` (sorted) of the first video stream,
/// handing each to `each` as it arrives. Returns how many were delivered.
///
/// Like PyAV's loop, every frame up to the last index is decoded, but only the
/// sampled ones are converted to rgb24 and piped: ffmpeg's `select` filter
/// (frame number `n` counts decoded frames in output order, as PyAV's
/// `enumerate(container.decode(video=0))` does) drops the rest before the
/// format conversion, which is per frame and so unchanged.
pub(crate) fn decode_frames(
    ffmpeg: &Path,
    file: &Path,
    indices: &[usize],
    timeout: Duration,
    each: &mut dyn FnMut(Rgb8) -> Result<()>,
) -> Result<usize> {
    let mut wanted: Vec<usize> = indices.to_vec();
    wanted.dedup();
    let Some(&last) = wanted.last() else {
        return Ok(0);
    };
    let all = wanted.len() == last + 1; // 0..=last: nothing to drop
                                        // `not(n-K)` is 1 on frame K (no commas, so no filtergraph escaping),
                                        // summed as a balanced tree: ffmpeg's expression parser rejects long flat
                                        // chains (~100 terms) but takes 768 terms nested log2(768) deep.
    let select = (!all).then(|| {
        let terms: Vec<String> = wanted.iter().map(|k| format!("not(n-{k})")).collect();
        format!("select={}", balanced_sum(&terms))
    });
    let frames_arg = wanted.len().to_string();
    let mut args: Vec<&std::ffi::OsStr> = ["-hide_banner", "-nostdin", "-v", "error"]
        .iter()
        .chain(INPUT_GUARD.iter())
        .chain(["-noautorotate", "-i"].iter())
        .map(std::ffi::OsStr::new)
        .collect();
    args.push(file.as_os_str());
    args.extend(["-map", "0:v:0", "-an", "-sn", "-dn"].map(std::ffi::OsStr::new));
    if let Some(select) = &select {
        args.extend([std::ffi::OsStr::new("-vf"), std::ffi::OsStr::new(select)]);
    }
    args.extend(
        [
            "-fps_mode",
            "passthrough",
            "-frames:v",
            frames_arg.as_str(),
            "-sws_flags",
            "bilinear",
            "-pix_fmt",
            "rgb24",
            "-c:v",
            "ppm",
            "-f",
            "image2pipe",
            "pipe:1",
        ]
        .map(std::ffi::OsStr::new),
    );
    let mut delivered = 0usize;
    run_ffmpeg(ffmpeg, &args, timeout, &mut |r| {
        for &k in &wanted {
            let Some(frame) = read_ppm(r)? else { break };
            let copies = indices.iter().filter(|&&i| i == k).count();
            for _ in 1..copies {
                each(frame.clone())?;
            }
            each(frame)?;
            delivered += copies;
        }
        Ok(())
    })?;
    Ok(delivered)
}

fn balanced_sum(terms: &[String]) -> String {
    match terms {
        [] => "0".to_string(),
        [one] => one.clone(),
        _ => {
            let (a, b) = terms.split_at(terms.len() / 2);
            format!("({}+{})", balanced_sum(a), balanced_sum(b))
        }
    }
}

/// One binary PPM (P6, maxval 255) from ffmpeg's image2pipe; None at the end.
fn read_ppm(r: &mut dyn Read) -> Result<Option<Rgb8>> {
    let bad = |what: &str| EngineError::validation(format!("could not read the video: {what}"));
    let mut tokens: Vec<usize> = Vec::with_capacity(3);
    let mut magic = [0u8; 2];
    match r.read_exact(&mut magic) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(bad(&e.to_string())),
    }
    if &magic != b"P6" {
        return Err(bad("unexpected frame data from ffmpeg"));
    }
    let mut byte = [0u8; 1];
    let mut cur: Option<usize> = None;
    while tokens.len() < 3 {
        r.read_exact(&mut byte).map_err(|e| bad(&e.to_string()))?;
        match byte[0] {
            b'0'..=b'9' => {
                let d = usize::from(byte[0] - b'0');
                cur = Some(
                    cur.unwrap_or(0)
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(d))
                        .ok_or_else(|| bad("bad frame header"))?,
                );
            }
            b' ' | b'\n' | b'\r' | b'\t' => {
                if let Some(v) = cur.take() {
                    tokens.push(v);
                }
            }
            _ => return Err(bad("bad frame header")),
        }
    }
    let (width, height, maxval) = (tokens[0], tokens[1], tokens[2]);
    if maxval != 255 || width == 0 || height == 0 {
        return Err(bad("unexpected frame format from ffmpeg"));
    }
    let len = width
        .checked_mul(height)
        .and_then(|v| v.checked_mul(3))
        .filter(|&v| v <= 1 << 32)
        .ok_or_else(|| bad("frame too large"))?;
    let mut data = vec![0u8; len];
    r.read_exact(&mut data).map_err(|e| bad(&e.to_string()))?;
    Ok(Some(Rgb8 {
        width,
        height,
        data,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::multimodal::config::load_configs;

    fn cfg(json: &str) -> VideoConfig {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("video_preprocessor_config.json"), json).unwrap();
        load_configs(d.path()).unwrap().1
    }

    #[test]
    fn sampling_matches_transformers() {
        let c = cfg(r#"{"do_sample_frames": true, "fps": 2.0}"#);
        // 20 frames at 12.5 fps: 3.2 -> min_frames 4 -> 4.
        assert_eq!(
            sample_indices(&c, 20, Some(12.5)).unwrap(),
            vec![0, 5, 10, 15]
        );
        // 300 frames at 29.97 fps, 2 fps: 20.02 -> 20 frames, step 15.
        let idx = sample_indices(&c, 300, Some(30000.0 / 1001.0)).unwrap();
        assert_eq!(idx.len(), 20);
        assert_eq!(&idx[..3], &[0, 15, 30]);
        // torch.arange(0, 25, 25 / 6).int() = [0, 4, 8, 12, 16, 20]
        let c = cfg(r#"{"do_sample_frames": true, "num_frames": 6}"#);
        assert_eq!(
            sample_indices(&c, 25, None).unwrap(),
            vec![0, 4, 8, 12, 16, 20]
        );
        // round(5 / 2) * 2 = 4 (half to even)
        let c = cfg(r#"{"do_sample_frames": true, "num_frames": 5}"#);
        assert_eq!(sample_indices(&c, 10, None).unwrap().len(), 4);
        let c = cfg(r#"{"do_sample_frames": true, "num_frames": 40}"#);
        assert!(sample_indices(&c, 10, None).is_err());
        let c = cfg(r#"{"do_sample_frames": true, "fps": 2.0}"#);
        assert!(sample_indices(&c, 1, Some(25.0)).is_err());
        let c = cfg(r#"{"do_sample_frames": false, "fps": 2.0}"#);
        assert_eq!(
            sample_indices(&c, 5, Some(25.0)).unwrap(),
            vec![0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn probe_parsing() {
        let packets = "#tb 0: 1/12800\n#media_type 0: video\n#dimensions 0: 64x48\n\
                       0,      -2048,          0,     1024,     1655, 0x8df9c2d9\n\
                       0,      -1024,       4096,     1024,       60, 0x4fd61dd7, F=0x0\n";
        let stderr = "Input #0, mov,mp4\n  Stream #0:0[0x1](und): Video: h264 (High), yuv420p(progressive), 64x48, 22 kb/s, 12.50 fps, 12.50 tbr, 12800 tbn (default)\nStream mapping:\n";
        let info = parse_probe(packets, stderr).unwrap();
        assert_eq!(
            info,
            VideoInfo {
                total_frames: 2,
                fps: Some(12.5),
                width: 64,
                height: 48
            }
        );
        // WebM: ms durations (41 * 6 = 246) disagree with the printed 24 fps.
        let packets = "#tb 0: 1/1000\n#dimensions 0: 64x48\n".to_string()
            + &"0, 0, 0, 41, 10, 0x0\n".repeat(6);
        let stderr = "  Stream #0:0: Video: vp9 (Profile 0), yuv420p(tv, progressive), 64x48, SAR 1:1 DAR 4:3, 24 fps, 24 tbr, 1k tbn\n";
        assert_eq!(parse_probe(&packets, stderr).unwrap().fps, Some(24.0));
        assert!(parse_probe("", "").is_err());
    }

    #[test]
    fn an_oversized_command_line_is_reported_as_such() {
        // Any executable will do: the kernel refuses the argument before running it.
        let huge = "x".repeat(256 * 1024);
        let args = [std::ffi::OsStr::new(huge.as_str())];
        let e = run_ffmpeg(
            Path::new("/bin/sh"),
            &args,
            Duration::from_secs(5),
            &mut |_| Ok(()),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("command line is too long"), "{msg}");
        assert!(!msg.contains("needs ffmpeg"), "{msg}");
    }

    #[test]
    fn the_largest_frame_selection_fits_one_argument() {
        let terms: Vec<String> = (0..MAX_DECODED_FRAMES)
            .map(|i| format!("not(n-{})", 9_999_999 - i))
            .collect();
        // Linux's MAX_ARG_STRLEN: 32 pages.
        assert!(balanced_sum(&terms).len() + "select=".len() < 128 * 1024);
    }

    #[test]
    fn missing_ffmpeg_is_a_clear_error() {
        let e = locate_ffmpeg(Some(Path::new("/nonexistent/ffmpeg"))).unwrap_err();
        assert!(e.to_string().contains("run scripts/setup-ffmpeg.sh"), "{e}");
    }
}
