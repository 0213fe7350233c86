//! The image and video processor settings of a Qwen2-VL / Qwen2.5-VL
//! checkpoint, read the way transformers 5.x reads them.
//!
//! Where they come from (first found wins, per processor, as transformers'
//! `get_image_processor_dict` / `get_video_processor_dict`):
//! - image: `processor_config.json["image_processor"]` (what
//!   `ProcessorMixin.save_pretrained` writes in v5), then `preprocessor_config.json`;
//! - video: `processor_config.json["video_processor"]`, then
//!   `video_preprocessor_config.json`, then `preprocessor_config.json` (the image
//!   processor's file: a checkpoint without a video config gets the image
//!   config's `min_pixels`/`max_pixels` and flags, with the video class defaults
//!   for the rest).
//!
//! Absent keys take the class defaults of `Qwen2VLImageProcessor` /
//! `Qwen2VLVideoProcessor`. `size` is `{shortest_edge, longest_edge}` (pixel
//! counts); top-level `min_pixels` / `max_pixels`, when not null, override it.

use std::path::Path;

use serde_json::{Map, Value};

use super::resize::Filter;
use crate::error::{EngineError, Result};

pub(crate) const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub(crate) const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Settings shared by the image and the video processor.
#[derive(Debug, Clone, PartialEq)]
pub struct CommonConfig {
    pub do_resize: bool,
    /// `size.shortest_edge` (min_pixels).
    pub min_pixels: usize,
    /// `size.longest_edge` (max_pixels).
    pub max_pixels: usize,
    pub resample: Filter,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub do_convert_rgb: bool,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
}

/// `Qwen2VLVideoProcessor`'s settings.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoConfig {
    pub common: CommonConfig,
    pub do_sample_frames: bool,
    pub fps: Option<f64>,
    pub num_frames: Option<usize>,
    pub min_frames: usize,
    pub max_frames: usize,
    /// None behaves as false (transformers 5.24 warns and keeps the uncapped behaviour).
    pub cap_pixels_per_frame: Option<bool>,
    pub max_video_tokens: usize,
}

impl CommonConfig {
    fn image_defaults() -> Self {
        CommonConfig {
            do_resize: true,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            resample: Filter::Bicubic,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
        }
    }

    fn video_defaults() -> Self {
        CommonConfig {
            min_pixels: 128 * 28 * 28,
            max_pixels: 28 * 28 * 768,
            ..CommonConfig::image_defaults()
        }
    }

    fn from_json(obj: &Map<String, Value>, defaults: CommonConfig, what: &str) -> Result<Self> {
        let mut c = defaults;
        let err =
            |key: &str, v: &Value| EngineError::Config(format!("{what}: bad value for {key}: {v}"));
        if let Some(v) = present(obj, "do_resize") {
            c.do_resize = v.as_bool().ok_or_else(|| err("do_resize", v))?;
        }
        if let Some(size) = present(obj, "size") {
            let size = size.as_object().ok_or_else(|| err("size", size))?;
            let edge = |key: &str| -> Result<Option<usize>> {
                present(size, key)
                    .map(|v| as_usize(v).ok_or_else(|| err(key, v)))
                    .transpose()
            };
            let (short, long) = (edge("shortest_edge")?, edge("longest_edge")?);
            // transformers refuses a size without both keys (unless min/max_pixels fill them).
            let has_override =
                present(obj, "min_pixels").is_some() && present(obj, "max_pixels").is_some();
            match (short, long) {
                (Some(s), Some(l)) => {
                    c.min_pixels = s;
                    c.max_pixels = l;
                }
                _ if has_override => {}
                _ => {
                    return Err(EngineError::Config(format!(
                        "{what}: `size` must hold shortest_edge and longest_edge, got {}",
                        Value::Object(size.clone())
                    )))
                }
            }
        }
        if let Some(v) = present(obj, "min_pixels") {
            c.min_pixels = as_usize(v).ok_or_else(|| err("min_pixels", v))?;
        }
        if let Some(v) = present(obj, "max_pixels") {
            c.max_pixels = as_usize(v).ok_or_else(|| err("max_pixels", v))?;
        }
        if let Some(v) = present(obj, "resample") {
            let code = v.as_i64().ok_or_else(|| err("resample", v))?;
            c.resample = Filter::from_pil(code).ok_or_else(|| {
                EngineError::Config(format!(
                    "{what}: resample={code} is not supported (only 2 = bilinear and 3 = bicubic)"
                ))
            })?;
        }
        if let Some(v) = present(obj, "do_rescale") {
            c.do_rescale = v.as_bool().ok_or_else(|| err("do_rescale", v))?;
        }
        if let Some(v) = present(obj, "rescale_factor") {
            c.rescale_factor = v.as_f64().ok_or_else(|| err("rescale_factor", v))?;
        }
        if let Some(v) = present(obj, "do_normalize") {
            c.do_normalize = v.as_bool().ok_or_else(|| err("do_normalize", v))?;
        }
        if let Some(v) = present(obj, "image_mean") {
            c.image_mean = triple(v).ok_or_else(|| err("image_mean", v))?;
        }
        if let Some(v) = present(obj, "image_std") {
            c.image_std = triple(v).ok_or_else(|| err("image_std", v))?;
        }
        if let Some(v) = present(obj, "do_convert_rgb") {
            c.do_convert_rgb = v.as_bool().ok_or_else(|| err("do_convert_rgb", v))?;
        }
        if let Some(v) = present(obj, "patch_size") {
            c.patch_size = as_usize(v).ok_or_else(|| err("patch_size", v))?;
        }
        if let Some(v) = present(obj, "temporal_patch_size") {
            c.temporal_patch_size = as_usize(v).ok_or_else(|| err("temporal_patch_size", v))?;
        }
        if let Some(v) = present(obj, "merge_size") {
            c.merge_size = as_usize(v).ok_or_else(|| err("merge_size", v))?;
        }
        if c.patch_size == 0 || c.temporal_patch_size == 0 || c.merge_size == 0 {
            return Err(EngineError::Config(format!(
                "{what}: patch_size, temporal_patch_size and merge_size must be positive"
            )));
        }
        if c.do_rescale && c.rescale_factor == 0.0 {
            return Err(EngineError::Config(format!(
                "{what}: rescale_factor must not be 0"
            )));
        }
        if c.do_normalize && c.image_std.contains(&0.0) {
            return Err(EngineError::Config(format!(
                "{what}: image_std must not contain 0"
            )));
        }
        Ok(c)
    }
}

impl VideoConfig {
    fn defaults() -> Self {
        VideoConfig {
            common: CommonConfig::video_defaults(),
            do_sample_frames: false,
            fps: None,
            num_frames: None,
            min_frames: 4,
            max_frames: 768,
            cap_pixels_per_frame: None,
            max_video_tokens: 128000,
        }
    }

    fn from_json(obj: &Map<String, Value>, what: &str) -> Result<Self> {
        let mut c = VideoConfig::defaults();
        c.common = CommonConfig::from_json(obj, c.common, what)?;
        let err =
            |key: &str, v: &Value| EngineError::Config(format!("{what}: bad value for {key}: {v}"));
        if let Some(v) = present(obj, "do_sample_frames") {
            c.do_sample_frames = v.as_bool().ok_or_else(|| err("do_sample_frames", v))?;
        }
        if let Some(v) = present(obj, "fps") {
            c.fps = Some(v.as_f64().ok_or_else(|| err("fps", v))?);
        }
        if let Some(v) = present(obj, "num_frames") {
            c.num_frames = Some(as_usize(v).ok_or_else(|| err("num_frames", v))?);
        }
        if let Some(v) = present(obj, "min_frames") {
            c.min_frames = as_usize(v).ok_or_else(|| err("min_frames", v))?;
        }
        if let Some(v) = present(obj, "max_frames") {
            c.max_frames = as_usize(v).ok_or_else(|| err("max_frames", v))?;
        }
        if let Some(v) = present(obj, "cap_pixels_per_frame") {
            c.cap_pixels_per_frame =
                Some(v.as_bool().ok_or_else(|| err("cap_pixels_per_frame", v))?);
        }
        if let Some(v) = present(obj, "max_video_tokens") {
            c.max_video_tokens = as_usize(v).ok_or_else(|| err("max_video_tokens", v))?;
        }
        Ok(c)
    }
}

/// Both processors' settings for one checkpoint directory.
pub(crate) fn load_configs(dir: &Path) -> Result<(CommonConfig, VideoConfig)> {
    let processor = read_json(&dir.join("processor_config.json"))?;
    let section = |name: &str| -> Option<Map<String, Value>> {
        processor
            .as_ref()
            .and_then(|p| p.get(name))
            .and_then(Value::as_object)
            .cloned()
    };
    let preprocessor = read_json(&dir.join("preprocessor_config.json"))?;
    let image = match section("image_processor").or_else(|| preprocessor.clone()) {
        Some(obj) => {
            CommonConfig::from_json(&obj, CommonConfig::image_defaults(), "image processor")?
        }
        None => CommonConfig::image_defaults(),
    };
    let video_obj = match section("video_processor") {
        Some(obj) => Some(obj),
        None => read_json(&dir.join("video_preprocessor_config.json"))?.or(preprocessor),
    };
    let video = match video_obj {
        Some(obj) => VideoConfig::from_json(&obj, "video processor")?,
        None => VideoConfig::defaults(),
    };
    Ok((image, video))
}

fn read_json(path: &Path) -> Result<Option<Map<String, Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EngineError::io_path("reading", path, e)),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(obj)) => Ok(Some(obj)),
        Ok(_) => Err(EngineError::Config(format!(
            "{} is not a JSON object",
            path.display()
        ))),
        Err(e) => Err(EngineError::Config(format!("{}: {e}", path.display()))),
    }
}

/// A key that is there and not null.
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn as_usize(v: &Value) -> Option<usize> {
    if let Some(u) = v.as_u64() {
        return usize::try_from(u).ok();
    }
    // 12845056.0 and the like.
    let f = v.as_f64()?;
    (f >= 0.0 && f.fract() == 0.0 && f < 1e18).then_some(f as usize)
}

fn triple(v: &Value) -> Option<[f64; 3]> {
    if let Some(x) = v.as_f64() {
        return Some([x; 3]);
    }
    let a = v.as_array()?;
    match a.len() {
        1 => a[0].as_f64().map(|x| [x; 3]),
        3 => Some([a[0].as_f64()?, a[1].as_f64()?, a[2].as_f64()?]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        d
    }

    #[test]
    fn defaults_without_files() {
        let d = dir_with(&[]);
        let (img, vid) = load_configs(d.path()).unwrap();
        assert_eq!(img, CommonConfig::image_defaults());
        assert_eq!(vid, VideoConfig::defaults());
        assert_eq!((img.min_pixels, img.max_pixels), (3136, 1003520));
        assert_eq!(
            (vid.common.min_pixels, vid.common.max_pixels),
            (100352, 602112)
        );
    }

    #[test]
    fn video_falls_back_to_the_image_config() {
        let d = dir_with(&[(
            "preprocessor_config.json",
            r#"{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                "image_processor_type": "Qwen2VLImageProcessor"}"#,
        )]);
        let (img, vid) = load_configs(d.path()).unwrap();
        assert_eq!((img.min_pixels, img.max_pixels), (3136, 12845056));
        assert_eq!(
            (vid.common.min_pixels, vid.common.max_pixels),
            (3136, 12845056)
        );
        assert_eq!(
            (vid.min_frames, vid.max_frames, vid.do_sample_frames),
            (4, 768, false)
        );
    }

    #[test]
    fn nested_processor_config_wins() {
        let d = dir_with(&[
            (
                "processor_config.json",
                r#"{"image_processor": {"size": {"shortest_edge": 100, "longest_edge": 200}},
                    "video_processor": {"size": {"shortest_edge": 300, "longest_edge": 400}, "fps": 2.0,
                                        "do_sample_frames": true}}"#,
            ),
            (
                "preprocessor_config.json",
                r#"{"min_pixels": 1, "max_pixels": 2}"#,
            ),
            (
                "video_preprocessor_config.json",
                r#"{"min_pixels": 5, "max_pixels": 6}"#,
            ),
        ]);
        let (img, vid) = load_configs(d.path()).unwrap();
        assert_eq!((img.min_pixels, img.max_pixels), (100, 200));
        assert_eq!((vid.common.min_pixels, vid.common.max_pixels), (300, 400));
        assert_eq!((vid.fps, vid.do_sample_frames), (Some(2.0), true));
    }

    #[test]
    fn min_max_pixels_override_size_and_bad_values_are_config_errors() {
        let d = dir_with(&[(
            "preprocessor_config.json",
            r#"{"size": {"shortest_edge": 10, "longest_edge": 20}, "max_pixels": 30, "min_pixels": null}"#,
        )]);
        let (img, _) = load_configs(d.path()).unwrap();
        assert_eq!((img.min_pixels, img.max_pixels), (10, 30));
        for bad in [
            r#"{"size": {"height": 56, "width": 56}}"#,
            r#"{"resample": 1}"#,
            r#"{"patch_size": 0}"#,
            r#"{"image_mean": [1, 2]}"#,
            r#"[1]"#,
        ] {
            let d = dir_with(&[("preprocessor_config.json", bad)]);
            let e = load_configs(d.path()).unwrap_err();
            assert!(matches!(e, EngineError::Config(_)), "{bad}: {e}");
        }
    }
}
