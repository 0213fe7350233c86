//! Images and videos for vision-language models (Qwen2-VL / Qwen2.5-VL):
//! bytes in, `pixel_values` + `grid_thw` out, matching transformers 5.x's
//! `Qwen2VLImageProcessor` (torchvision backend, on CPU) and
//! `Qwen2VLVideoProcessor` fed by its PyAV reader.
//!
//! Pipeline, per image or sampled video frame: decode to RGB8 (`image.rs`,
//! ffmpeg for videos in `video.rs`), `smart_resize` to multiples of
//! `patch_size * merge_size` and resample exactly as torchvision does on uint8
//! (`resize.rs`), rescale+normalise in f32 the way transformers fuses them
//! (`(x - mean / rescale) / (std / rescale)`), then patchify into
//! `[grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size²]` in
//! transformers' element order (merge-window-major; an image is repeated
//! `temporal_patch_size` times; a video is padded with its last frame).
//! Media URLs are fetched by `fetch.rs` under a [`MediaPolicy`].
//!
//! Parity: bit-exact `pixel_values` against transformers 5.24 / torchvision 0.29
//! on the committed fixtures (PNG, JPEG, WebP, BMP, alpha PNG, two H.264 videos)
//! and on scripts/crosscheck_media.py's random cases. Known differences, all
//! outside what those cover: only PNG, JPEG, WebP, GIF and BMP are decoded
//! (Pillow reads more); 16-bit PNGs are reduced to 8 bits by the `image` crate,
//! not Pillow; `do_convert_rgb = false` is ignored (inputs are always RGB);
//! video frame counts are container packet counts (PyAV's count for MP4/MOV;
//! PyAV reports 0 for WebM/MKV, where transformers cannot sample at all); with
//! `cap_pixels_per_frame` the frame budget uses the sampled count, which differs
//! from transformers' decoded count only when a container over-states its frames.

mod config;
mod fetch;
mod image;
mod jpeg;
mod resize;
mod video;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use config::{CommonConfig, VideoConfig};
pub use fetch::{fetch_all, fetch_media, fetch_media_until, is_public_address};
pub use resize::{smart_resize, Filter};

use crate::error::{EngineError, Result};
use image::Rgb8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    Image,
    Video,
}

/// One preprocessed image or video.
#[derive(Debug, Clone, PartialEq)]
pub struct VisualInput {
    pub modality: Modality,
    /// Row-major `[num_patches, patch_dim]`.
    pub pixel_values: Vec<f32>,
    pub grid_thw: [usize; 3],
    /// Videos: temporal_patch_size / sampled fps; images: 1.0.
    pub second_per_grid_t: f32,
}

impl VisualInput {
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    pub fn patch_dim(&self) -> usize {
        self.pixel_values.len() / self.num_patches().max(1)
    }

    /// Placeholder tokens in the prompt: patches / merge_size².
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.num_patches() / (merge_size * merge_size).max(1)
    }
}

/// At most this many f32s in one image's or video's `pixel_values` (4 GiB).
const MAX_PIXEL_VALUES: usize = 1 << 30;

/// Default wall-clock limit for one ffmpeg run.
const FFMPEG_TIMEOUT: Duration = Duration::from_secs(120);

/// A checkpoint's image and video preprocessing.
#[derive(Debug, Clone)]
pub struct VisionProcessor {
    image: CommonConfig,
    video: VideoConfig,
    ffmpeg: Option<PathBuf>,
    ffmpeg_timeout: Duration,
}

impl VisionProcessor {
    /// Read `processor_config.json`, `preprocessor_config.json` and
    /// `video_preprocessor_config.json` from a checkpoint folder as transformers
    /// does (see `config.rs`); absent files or keys take the class defaults.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let (image, video) = config::load_configs(model_dir)?;
        Ok(VisionProcessor {
            image,
            video,
            ffmpeg: None,
            ffmpeg_timeout: FFMPEG_TIMEOUT,
        })
    }

    /// Use this ffmpeg binary for videos instead of looking one up
    /// (`$VERDICT_FFMPEG`, the setup script's copy, `PATH`).
    pub fn with_ffmpeg(mut self, ffmpeg: impl Into<PathBuf>) -> Self {
        self.ffmpeg = Some(ffmpeg.into());
        self
    }

    /// Wall-clock limit for each ffmpeg run (default 120 s).
    pub fn with_ffmpeg_timeout(mut self, timeout: Duration) -> Self {
        self.ffmpeg_timeout = timeout;
        self
    }

    /// This processor with a request's `mm_processor_kwargs` applied, as vLLM
    /// passes them to the Hugging Face processor: `min_pixels`, `max_pixels`,
    /// `size` (`shortest_edge`/`longest_edge`) for images and videos, and
    /// `fps`, `num_frames`, `do_sample_frames`, `min_frames`, `max_frames` for
    /// videos, at the top level or under `images_kwargs` / `videos_kwargs`.
    pub fn with_request_kwargs(
        &self,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self> {
        use serde_json::Value;
        let bad = |key: &str, want: &str| {
            EngineError::validation_param(
                format!("mm_processor_kwargs.{key} must be {want}"),
                "mm_processor_kwargs",
            )
        };
        let count = |key: &str, v: &Value| -> Result<usize> {
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad(key, "a non-negative integer"))
        };
        let mut out = self.clone();
        let mut apply = |scope: Option<Modality>,
                         map: &serde_json::Map<String, Value>|
         -> Result<()> {
            let image = scope != Some(Modality::Video);
            let video = scope != Some(Modality::Image);
            for (key, v) in map {
                match key.as_str() {
                    "min_pixels" | "max_pixels" | "size" => {
                        let (min, max) = match key.as_str() {
                            "min_pixels" => (Some(count(key, v)?), None),
                            "max_pixels" => (None, Some(count(key, v)?)),
                            _ => (
                                v.get("shortest_edge")
                                    .map(|x| count("size.shortest_edge", x))
                                    .transpose()?,
                                v.get("longest_edge")
                                    .map(|x| count("size.longest_edge", x))
                                    .transpose()?,
                            ),
                        };
                        for (on, cfg) in [(image, &mut out.image), (video, &mut out.video.common)] {
                            if on {
                                cfg.min_pixels = min.unwrap_or(cfg.min_pixels);
                                cfg.max_pixels = max.unwrap_or(cfg.max_pixels);
                            }
                        }
                    }
                    "fps" if video => {
                        let fps = v
                            .as_f64()
                            .filter(|f| *f > 0.0)
                            .ok_or_else(|| bad(key, "a positive number"))?;
                        out.video.fps = Some(fps);
                        out.video.num_frames = None;
                    }
                    "num_frames" if video => {
                        out.video.num_frames = Some(count(key, v)?);
                        out.video.fps = None;
                    }
                    "do_sample_frames" if video => {
                        out.video.do_sample_frames =
                            v.as_bool().ok_or_else(|| bad(key, "a boolean"))?;
                    }
                    "min_frames" if video => out.video.min_frames = count(key, v)?,
                    "max_frames" if video => out.video.max_frames = count(key, v)?,
                    "images_kwargs" | "videos_kwargs" if scope.is_none() => {}
                    other => tracing::warn!(
                        key = other,
                        "ignoring an unsupported mm_processor_kwargs entry"
                    ),
                }
            }
            Ok(())
        };
        apply(None, kwargs)?;
        for (key, scope) in [
            ("images_kwargs", Modality::Image),
            ("videos_kwargs", Modality::Video),
        ] {
            match kwargs.get(key) {
                Some(Value::Object(map)) => apply(Some(scope), map)?,
                Some(_) => return Err(bad(key, "an object")),
                None => {}
            }
        }
        if out.image.min_pixels > out.image.max_pixels
            || out.video.common.min_pixels > out.video.common.max_pixels
        {
            return Err(EngineError::validation_param(
                "mm_processor_kwargs: min_pixels must not exceed max_pixels",
                "mm_processor_kwargs",
            ));
        }
        Ok(out)
    }

    pub fn image_config(&self) -> &CommonConfig {
        &self.image
    }

    pub fn video_config(&self) -> &VideoConfig {
        &self.video
    }

    /// The image processor's `patch_size` (the video processor's is checked to match
    /// when a video is processed).
    pub fn patch_size(&self) -> usize {
        self.image.patch_size
    }

    pub fn temporal_patch_size(&self) -> usize {
        self.image.temporal_patch_size
    }

    pub fn merge_size(&self) -> usize {
        self.image.merge_size
    }

    /// An encoded image (PNG, JPEG, WebP, GIF, BMP) to patches.
    pub fn image(&self, bytes: &[u8]) -> Result<VisualInput> {
        self.image_within(bytes, &mut PixelBudget::unlimited())
    }

    /// [`Self::image`], refused before decoding when its header declares more
    /// pixels than `budget` has left.
    pub fn image_within(&self, bytes: &[u8], budget: &mut PixelBudget) -> Result<VisualInput> {
        let img = image::decode_rgb8(bytes, budget)?;
        let cfg = &self.image;
        let (h, w) = target_size(img.height, img.width, cfg, cfg.max_pixels)?;
        let img = resize_frame(img, h, w, cfg)?;
        let grid_h = h / cfg.patch_size;
        let grid_w = w / cfg.patch_size;
        let frames = vec![&img.data[..]; cfg.temporal_patch_size];
        Ok(VisualInput {
            modality: Modality::Image,
            pixel_values: patchify(&frames, h, w, cfg)?,
            grid_thw: [1, grid_h, grid_w],
            second_per_grid_t: 1.0,
        })
    }

    /// An encoded video (any container/codec ffmpeg reads) to patches. The bytes
    /// go to a temporary file for ffmpeg.
    pub fn video(&self, bytes: &[u8]) -> Result<VisualInput> {
        self.video_within(bytes, &mut PixelBudget::unlimited())
    }

    /// [`Self::video`], refused before decoding when its sampled frames have
    /// more pixels than `budget` has left.
    pub fn video_within(&self, bytes: &[u8], budget: &mut PixelBudget) -> Result<VisualInput> {
        if bytes.is_empty() {
            return Err(EngineError::validation("could not read the video: no data"));
        }
        let ffmpeg = video::locate_ffmpeg(self.ffmpeg.as_deref())?;
        let mut file = tempfile::Builder::new()
            .prefix("verdict-video-")
            .tempfile()
            .map_err(|e| EngineError::io("creating a temporary file for a video", e))?;
        std::io::Write::write_all(&mut file, bytes)
            .and_then(|()| std::io::Write::flush(&mut file))
            .map_err(|e| EngineError::io("writing a temporary file for a video", e))?;
        self.video_file(&ffmpeg, file.path(), budget)
    }

    fn video_file(
        &self,
        ffmpeg: &Path,
        file: &Path,
        budget: &mut PixelBudget,
    ) -> Result<VisualInput> {
        let cfg = &self.video.common;
        let info = video::probe(ffmpeg, file, self.ffmpeg_timeout)?;
        let indices = video::sample_indices(&self.video, info.total_frames, info.fps)?;
        if indices.len() > video::MAX_DECODED_FRAMES {
            return Err(EngineError::validation(format!(
                "video sampling asks for {} frames; at most {} are decoded per video \
                 (sample fewer with mm_processor_kwargs fps / num_frames / max_frames)",
                indices.len(),
                video::MAX_DECODED_FRAMES
            )));
        }
        budget.charge("video frame", info.width, info.height, indices.len())?;
        let factor = cfg.patch_size * cfg.merge_size;
        // `cap_pixels_per_frame` (unset = off in transformers 5.24): the per-frame
        // cap also bounded by an even share of `max_video_tokens`' pixels.
        let mut max_pixels = cfg.max_pixels;
        if self.video.cap_pixels_per_frame == Some(true) && !indices.is_empty() {
            let total_pixels =
                (self.video.max_video_tokens as f64 * factor as f64 * factor as f64 * 0.9) as usize;
            let share = total_pixels * cfg.temporal_patch_size / indices.len();
            max_pixels = max_pixels
                .min(share)
                .max((cfg.min_pixels as f64 * 1.05) as usize);
        }
        let (h, w) = target_size(info.height, info.width, cfg, max_pixels)?;
        let frame_len = h * w * 3;
        let padded = indices.len().div_ceil(cfg.temporal_patch_size) * cfg.temporal_patch_size;
        let patch_dim = 3 * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
        if (padded / cfg.temporal_patch_size)
            .saturating_mul((h / cfg.patch_size) * (w / cfg.patch_size))
            .saturating_mul(patch_dim)
            > MAX_PIXEL_VALUES
        {
            return Err(EngineError::validation(format!(
                "video is too large: {} frames of {w}x{h} after resizing",
                indices.len()
            )));
        }
        let mut frames: Vec<u8> = Vec::with_capacity(indices.len() * frame_len);
        let got = video::decode_frames(ffmpeg, file, &indices, self.ffmpeg_timeout, &mut |f| {
            if f.width != info.width || f.height != info.height {
                return Err(EngineError::validation(format!(
                    "could not read the video: frame size changes from {}x{} to {}x{}",
                    info.width, info.height, f.width, f.height
                )));
            }
            frames.extend_from_slice(&resize_frame(f, h, w, cfg)?.data);
            Ok(())
        })?;
        if got == 0 {
            return Err(EngineError::validation(
                "could not read the video: no frame could be decoded",
            ));
        }
        let mut slices: Vec<&[u8]> = frames.chunks_exact(frame_len).collect();
        // Pad to a whole temporal patch by repeating the last frame.
        while let (false, Some(&last)) = (
            slices.len().is_multiple_of(cfg.temporal_patch_size),
            slices.last(),
        ) {
            slices.push(last);
        }
        let grid_t = slices.len() / cfg.temporal_patch_size;
        // VideoMetadata.sampled_fps: len(frames_indices) / total_num_frames * fps.
        let fps = info.fps.unwrap_or(24.0);
        let sampled_fps = indices.len() as f64 / info.total_frames as f64 * fps;
        Ok(VisualInput {
            modality: Modality::Video,
            pixel_values: patchify(&slices, h, w, cfg)?,
            grid_thw: [grid_t, h / cfg.patch_size, w / cfg.patch_size],
            second_per_grid_t: (cfg.temporal_patch_size as f64 / sampled_fps) as f32,
        })
    }
}

/// The size an image or frame is resized to (`smart_resize`), or its own size
/// when `do_resize` is off (which must then already fit the patch grid).
fn target_size(
    height: usize,
    width: usize,
    cfg: &CommonConfig,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    let factor = cfg.patch_size * cfg.merge_size;
    if cfg.do_resize {
        let (h, w) = smart_resize(height, width, factor, cfg.min_pixels, max_pixels)?;
        if h == 0 || w == 0 {
            return Err(EngineError::validation(format!(
                "image of {width}x{height} resizes to nothing"
            )));
        }
        Ok((h, w))
    } else if height.is_multiple_of(factor)
        && width.is_multiple_of(factor)
        && height > 0
        && width > 0
    {
        Ok((height, width))
    } else {
        Err(EngineError::validation(format!(
            "image of {width}x{height} is not a multiple of {factor} pixels and the processor does not resize"
        )))
    }
}

fn resize_frame(img: Rgb8, h: usize, w: usize, cfg: &CommonConfig) -> Result<Rgb8> {
    if (img.height, img.width) == (h, w) {
        return Ok(img);
    }
    if h.saturating_mul(w).saturating_mul(3) > MAX_PIXEL_VALUES {
        return Err(EngineError::validation(format!(
            "image would resize to {w}x{h}, too large"
        )));
    }
    Ok(Rgb8 {
        data: resize::resize_rgb8(&img.data, img.width, img.height, w, h, cfg.resample),
        width: w,
        height: h,
    })
}

/// Per-channel uint8 -> f32 tables of transformers' rescale/normalise: with both
/// on they are fused to `(x - mean * (1 / rescale)) / (std * (1 / rescale))`,
/// every constant rounded to f32 as torch does.
fn value_tables(cfg: &CommonConfig) -> [[f32; 256]; 3] {
    let mut t = [[0f32; 256]; 3];
    for (c, table) in t.iter_mut().enumerate() {
        let (mean, std) = if cfg.do_normalize && cfg.do_rescale {
            let inv = (1.0 / cfg.rescale_factor) as f32;
            (
                Some(cfg.image_mean[c] as f32 * inv),
                cfg.image_std[c] as f32 * inv,
            )
        } else if cfg.do_normalize {
            (Some(cfg.image_mean[c] as f32), cfg.image_std[c] as f32)
        } else {
            (None, 0.0)
        };
        for (v, out) in table.iter_mut().enumerate() {
            let x = v as f32;
            *out = match mean {
                Some(m) => (x - m) / std,
                None if cfg.do_rescale => x * cfg.rescale_factor as f32,
                None => x,
            };
        }
    }
    t
}

/// transformers' patch layout. `frames` (RGB8, `h x w`) come in groups of
/// `temporal_patch_size`; patch order is (t, block_row, block_col, merge_row,
/// merge_col), and within a patch (channel, frame-in-group, row, col).
fn patchify(frames: &[&[u8]], h: usize, w: usize, cfg: &CommonConfig) -> Result<Vec<f32>> {
    let (p, m, tps) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (h / p, w / p);
    if gh * p != h
        || gw * p != w
        || !gh.is_multiple_of(m)
        || !gw.is_multiple_of(m)
        || !frames.len().is_multiple_of(tps)
    {
        return Err(EngineError::validation(format!(
            "image of {w}x{h} does not fit the {p}-pixel patch and {m}x{m} merge grid"
        )));
    }
    let grid_t = frames.len() / tps;
    let patch_dim = 3 * tps * p * p;
    let num_patches = grid_t * gh * gw;
    if num_patches.saturating_mul(patch_dim) > MAX_PIXEL_VALUES {
        return Err(EngineError::validation("image or video is too large"));
    }
    let lut = value_tables(cfg);
    let mut out = vec![0f32; num_patches * patch_dim];
    let mut patches = out.chunks_exact_mut(patch_dim);
    for t in 0..grid_t {
        let group = &frames[t * tps..(t + 1) * tps];
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let Some(patch) = patches.next() else {
                            return Err(EngineError::validation("internal patch count mismatch"));
                        };
                        let y0 = (bh * m + mh) * p;
                        let x0 = (bw * m + mw) * p;
                        for (c, table) in lut.iter().enumerate() {
                            for (k, frame) in group.iter().enumerate() {
                                let base = (c * tps + k) * p * p;
                                for py in 0..p {
                                    let row = &frame[((y0 + py) * w + x0) * 3..];
                                    let dst = &mut patch[base + py * p..base + (py + 1) * p];
                                    for (px, d) in dst.iter_mut().enumerate() {
                                        *d = table[usize::from(row[px * 3 + c])];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Where media may come from, as vLLM's `--allowed-media-domains` and
/// `--allowed-local-media-path`, and how much work one request's media may cost.
#[derive(Debug, Clone)]
pub struct MediaPolicy {
    /// None: any host; otherwise the URL's host must be one of these.
    pub allowed_domains: Option<Vec<String>>,
    /// None: no `file://` URLs; otherwise only files under this folder.
    pub allowed_local_path: Option<PathBuf>,
    /// Fetch from hosts that resolve to loopback, private, link-local or
    /// metadata addresses (`--allow-private-media-hosts`). Off, such hosts are
    /// refused unless the address itself is on `allowed_domains`.
    pub allow_private_hosts: bool,
    /// Deadline for all of one request's fetches together (`--media-fetch-timeout`).
    pub timeout: Duration,
    pub max_bytes: usize,
    /// Decoded pixels one image (or video frame) may have, read from its
    /// header before decoding (`--max-image-pixels`).
    pub max_image_pixels: u64,
    /// Decoded pixels all images and sampled video frames of one request may
    /// have together (`--max-media-pixels-per-request`).
    pub max_request_pixels: u64,
}

impl MediaPolicy {
    /// May `url` (already on the domain list, if there is one) reach a
    /// non-public address? Only with the flag, or when the list names the
    /// address itself: a listed *name* can be re-pointed by its DNS.
    fn private_host_allowed(&self, url: &url::Url) -> bool {
        self.allow_private_hosts
            || (self.allowed_domains.is_some()
                && matches!(url.host(), Some(url::Host::Ipv4(_) | url::Host::Ipv6(_))))
    }

    /// The decoded-pixel allowance of one request under this policy.
    pub fn pixel_budget(&self) -> PixelBudget {
        PixelBudget {
            per_image: self.max_image_pixels,
            left: self.max_request_pixels,
        }
    }
}

impl Default for MediaPolicy {
    fn default() -> Self {
        MediaPolicy {
            allowed_domains: None,
            allowed_local_path: None,
            allow_private_hosts: false,
            timeout: Duration::from_secs(10),
            max_bytes: 64 << 20,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            max_request_pixels: DEFAULT_MAX_REQUEST_PIXELS,
        }
    }
}

/// Default `--max-image-pixels`: an 8000x8000 image; decoding one takes
/// about 200 MB and under a second.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 64_000_000;
/// Default `--max-media-pixels-per-request`: four such images, or about two
/// minutes of 1080p video sampled at 2 fps.
pub const DEFAULT_MAX_REQUEST_PIXELS: u64 = 256_000_000;

/// Decoded pixels a request may still spend. Each image or video is charged
/// from its header (image) or stream facts (video) before it is decoded, so an
/// image declaring 13000x13000 in a few bytes is refused without decoding.
#[derive(Debug, Clone)]
pub struct PixelBudget {
    per_image: u64,
    left: u64,
}

impl PixelBudget {
    /// No limit beyond the decoder's own (offline use, tests).
    pub fn unlimited() -> Self {
        PixelBudget {
            per_image: u64::MAX,
            left: u64::MAX,
        }
    }

    /// Charges `frames` images of `width` x `height`, or refuses them.
    fn charge(&mut self, what: &str, width: usize, height: usize, frames: usize) -> Result<()> {
        let pixels = (width as u64).saturating_mul(height as u64);
        if pixels > self.per_image {
            return Err(EngineError::validation(format!(
                "{what} of {width}x{height} pixels is larger than the server's limit of {} pixels \
                 per image (--max-image-pixels)",
                self.per_image
            )));
        }
        let total = pixels.saturating_mul(frames as u64);
        if total > self.left {
            return Err(EngineError::validation(format!(
                "the request's images and videos have more decoded pixels than the server allows \
                 per request (--max-media-pixels-per-request): {what} of {width}x{height}{} needs {total}, \
                 {} are left",
                if frames > 1 { format!(" x {frames} frames") } else { String::new() },
                self.left
            )));
        }
        self.left -= total;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_order_matches_transformers() {
        // 28x28 image, patch 14, merge 2: 4 patches of 3 * 2 * 14 * 14.
        let mut cfg = config::load_configs(Path::new("/nonexistent")).unwrap().0;
        cfg.do_rescale = false;
        cfg.do_normalize = false;
        let (h, w) = (28, 28);
        let img: Vec<u8> = (0..h * w * 3).map(|i| (i % 251) as u8).collect();
        let out = patchify(&[&img, &img], h, w, &cfg).unwrap();
        assert_eq!(out.len(), 4 * 1176);
        let px = |y: usize, x: usize, c: usize| img[(y * w + x) * 3 + c] as f32;
        // patch 3 = merge (1, 1): rows 14.., cols 14..; element (c=2, t=1, y=5, x=7).
        let e = 3 * 1176 + ((2 * 2 + 1) * 14 + 5) * 14 + 7;
        assert_eq!(out[e], px(14 + 5, 14 + 7, 2));
        // patch 1 = merge (0, 1); element (c=1, t=0, y=13, x=0).
        assert_eq!(out[1176 + (2 * 14 + 13) * 14], px(13, 14, 1));
    }

    #[test]
    fn fused_normalisation_constants() {
        let cfg = config::load_configs(Path::new("/nonexistent")).unwrap().0;
        let t = value_tables(&cfg);
        let m = 0.48145466f32 * 255.0;
        let s = 0.26862954f32 * 255.0;
        assert_eq!(t[0][200], (200.0 - m) / s);
    }
}
