#!/usr/bin/env python3
"""Media fixtures and transformers' reference outputs for the multimodal
preprocessing tests (crates/verdict-engine/tests/multimodal.rs).

Run with an environment that has transformers 5.x, torch, torchvision, pillow
and av (PyAV), plus an ffmpeg binary (scripts/setup-ffmpeg.sh prints one):

    /opt/torchenv/bin/python scripts/make_media_fixtures.py [--ffmpeg PATH]

Writes
  fixtures/qwen2_5_vl/preprocessor_config.json        image processor, small limits
  fixtures/qwen2_5_vl/video_preprocessor_config.json  video processor, small limits,
                                                       fps sampling
  fixtures/media/all_frames/video_preprocessor_config.json  do_sample_frames=false
  fixtures/media/*.png|jpg|webp|bmp|gif|mp4           tiny inputs
  fixtures/media/expected.safetensors                 HF pixel_values (f32)
  fixtures/media/expected.json                        grid_thw, second_per_grid_t, ...

Truth is transformers' Qwen2VLImageProcessor (torchvision backend, CPU) fed a
PIL image (as vLLM feeds it), and Qwen2VLVideoProcessor fed frames read by
transformers' own PyAV reader (`load_video(backend="pyav")`, the sampler being
the processor's `sample_frames`) -- transformers' default video loader needs
torchcodec, which is not installed; the PyAV path is the one named in its
docs. second_per_grid_t is computed as Qwen2_5_VLProcessor does
(temporal_patch_size / VideoMetadata.sampled_fps).

Before writing anything, the script checks the two pieces of arithmetic the
Rust code re-implements against the libraries themselves:
  * Pillow's alpha_composite onto white, for all 65,536 (value, alpha) pairs;
  * torchvision's uint8 antialiased resize (bicubic and bilinear), on random
    images and sizes, against a NumPy model of torch's fixed-point kernel.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
import torchvision.transforms.v2.functional as tvF
from torchvision.transforms.v2 import InterpolationMode
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
CFG_DIR = ROOT / "fixtures/qwen2_5_vl"
MEDIA = ROOT / "fixtures/media"

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

IMAGE_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": CLIP_MEAN,
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": CLIP_STD,
    "max_pixels": 28 * 28 * 16,
    "merge_size": 2,
    "min_pixels": 3136,
    "patch_size": 14,
    "processor_class": "Qwen2_5_VLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "temporal_patch_size": 2,
}
VIDEO_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "do_sample_frames": True,
    "fps": 2.0,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "max_frames": 768,
    "merge_size": 2,
    "min_frames": 4,
    "patch_size": 14,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 28 * 28 * 8, "shortest_edge": 3136},
    "temporal_patch_size": 2,
    "video_processor_type": "Qwen2VLVideoProcessor",
}
ALL_FRAMES_CONFIG = dict(VIDEO_CONFIG, do_sample_frames=False)
ALL_FRAMES_CONFIG.pop("fps")
# Qwen2.5-VL-7B-Instruct's limits, for the grid-only check.
QWEN25_LIMITS = {"min_pixels": 3136, "max_pixels": 12845056}


# --------------------------------------------------------------------------
# Self-checks of the arithmetic the Rust code re-implements.

def check_alpha_composite():
    a, v = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([v, 255 - v, (v * 7) % 256, a], -1).astype(np.uint8)
    im = Image.fromarray(rgba, "RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    want = np.array(Image.alpha_composite(bg, im).convert("RGB")).astype(np.int64)
    c, al = rgba[..., :3].astype(np.int64), rgba[..., 3:4].astype(np.int64)
    coef1 = al * 255 * 255 * 128 // (al * 255 + 255 * (255 - al))
    tmp = c * coef1 + 255 * (255 * 128 - coef1) + (0x80 << 7)
    got = (((tmp >> 8) + tmp) >> 8) >> 7
    assert np.array_equal(got, want), "Pillow alpha_composite model is off"


def _filter(kind, x):
    x = abs(x)
    if kind == "bilinear":
        return 1.0 - x if x < 1.0 else 0.0
    a = -0.5  # torch's antialiased bicubic (Pillow's); -0.75 is its non-AA bicubic
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _resize_axis(img, out, axis, kind):
    n = img.shape[axis]
    if n == out:
        return img
    scale = n / out
    support = (1.0 if kind == "bilinear" else 2.0) * max(scale, 1.0)
    stride = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    taps, wt_max = [], 0.0
    for i in range(out):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        size = max(0, min(min(int(center + support + 0.5), n) - xmin, stride))
        w = [_filter(kind, (j + xmin - center + 0.5) * inv) for j in range(size)]
        total = 0.0
        for x in w:
            total += x
        if total != 0.0:
            w = [x / total for x in w]
            wt_max = max([wt_max] + w)
        taps.append((xmin, w))
    p = 0
    while p < 22 and int(0.5 + wt_max * (1 << (p + 1))) < (1 << 15):
        p += 1
    x = np.moveaxis(img.astype(np.int64), axis, -1)
    res = np.zeros(x.shape[:-1] + (out,), np.int64)
    for i, (xmin, w) in enumerate(taps):
        acc = np.full(x.shape[:-1], 1 << (p - 1), np.int64)
        for j, wj in enumerate(w):
            v = wj * (1 << p)
            acc += (int(-0.5 + v) if v < 0 else int(0.5 + v)) * x[..., xmin + j]
        res[..., i] = np.clip(acc >> p, 0, 255)
    return np.moveaxis(res.astype(np.uint8), -1, axis)


def check_resize():
    rng = np.random.default_rng(0)
    modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
    for trial in range(40):
        h0, w0 = rng.integers(3, 90, 2)
        h1, w1 = rng.integers(1, 130, 2)
        img = rng.integers(0, 256, (3, h0, w0), dtype=np.uint8)
        if trial % 2:
            img = (img > 127).astype(np.uint8) * 255  # hard edges: ringing, clamping
        for kind, mode in modes.items():
            want = tvF.resize(torch.from_numpy(img), [int(h1), int(w1)], interpolation=mode, antialias=True).numpy()
            got = _resize_axis(_resize_axis(img, int(w1), 2, kind), int(h1), 1, kind)
            assert np.array_equal(got, want), f"resize model is off: {kind} {(h0, w0)} -> {(h1, w1)}"


# --------------------------------------------------------------------------
# Media.

def pattern(h, w, seed):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(xx / (3.0 + seed) + yy / 7.0)
    g = (xx * 255.0 / max(w - 1, 1) + 40 * ((xx // 9 + yy // 9) % 2)) % 256
    b = 255.0 * (((xx - w / 2) ** 2 + (yy - h / 2) ** 2) < (min(h, w) / 3) ** 2)
    b = np.where(yy % 11 < 2, 30.0, b)
    img = np.stack([r, g, b], -1)
    img += np.random.default_rng(seed).normal(0, 6, img.shape)  # a little texture
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_media(ffmpeg):
    MEDIA.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(pattern(100, 150, 1), "RGB")
    photo.save(MEDIA / "photo.png", optimize=True)
    photo.save(MEDIA / "photo.webp", lossless=True, quality=100, method=6)
    photo.save(MEDIA / "photo.bmp")
    Image.fromarray(pattern(72, 96, 2), "RGB").save(MEDIA / "photo.jpg", quality=90)

    rgba = np.concatenate([pattern(30, 40, 3), np.zeros((30, 40, 1), np.uint8)], -1)
    yy, xx = np.mgrid[0:30, 0:40]
    rgba[..., 3] = np.clip(xx * 255 // 39 + (yy % 5) * 3, 0, 255)  # every alpha level band
    rgba[:3, :, 3] = 0
    rgba[-3:, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(MEDIA / "alpha.png", optimize=True)

    # The same palette image as GIF and PNG (decoders must agree).
    pal = Image.fromarray(pattern(30, 44, 4), "RGB").quantize(colors=64, dither=Image.Dither.NONE)
    pal.convert("RGB").save(MEDIA / "palette.png", optimize=True)
    pal.save(MEDIA / "palette.gif")

    # EXIF orientation 6 (rotate 90 degrees clockwise to display): 48x32 stored.
    rot = Image.fromarray(pattern(32, 48, 5), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    rot.save(MEDIA / "rotated.jpg", quality=90, exif=exif)

    # 20 frames at 12.5 fps (1.6 s), 64x48, H.264 yuv420p with B-frames.
    run = lambda *a: subprocess.run([ffmpeg, "-hide_banner", "-v", "error", "-y", *a], check=True)
    run("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25/2", "-frames:v", "20",
        "-c:v", "libx264", "-preset", "medium", "-pix_fmt", "yuv420p", "-g", "8",
        "-movflags", "+faststart", str(MEDIA / "clip.mp4"))
    # 3 frames at 10 fps, 32x32 (odd count: padded with the last frame).
    run("-f", "lavfi", "-i", "mandelbrot=size=32x32:rate=10", "-frames:v", "3",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", str(MEDIA / "short.mp4"))


def write_configs():
    CFG_DIR.mkdir(parents=True, exist_ok=True)
    (CFG_DIR / "preprocessor_config.json").write_text(json.dumps(IMAGE_CONFIG, indent=2, sort_keys=True) + "\n")
    (CFG_DIR / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG, indent=2, sort_keys=True) + "\n")
    d = MEDIA / "all_frames"
    d.mkdir(parents=True, exist_ok=True)
    (d / "video_preprocessor_config.json").write_text(json.dumps(ALL_FRAMES_CONFIG, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------
# Reference outputs.

def hf_image(processor, path, **kw):
    out = processor(images=[Image.open(path)], return_tensors="pt", **kw)
    return out["pixel_values"].numpy().astype(np.float32), out["image_grid_thw"][0].tolist()


def hf_video(processor, path):
    from transformers.video_utils import load_video

    sampler = None
    if processor.do_sample_frames:
        sampler = lambda metadata, **kw: processor.sample_frames(metadata)
    frames, metadata = load_video(str(path), backend="pyav", sample_indices_fn=sampler)
    out = processor(videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                    return_metadata=True, return_tensors="pt")
    md = out["video_metadata"][0]
    return (
        out["pixel_values_videos"].numpy().astype(np.float32),
        out["video_grid_thw"][0].tolist(),
        processor.temporal_patch_size / md.sampled_fps,
        {
            "total_num_frames": int(metadata.total_num_frames),
            "fps": float(metadata.fps),
            "frames_indices": [int(i) for i in metadata.frames_indices],
            "sampled_fps": float(md.sampled_fps),
        },
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ffmpeg", default=os.environ.get("VERDICT_FFMPEG") or shutil.which("ffmpeg")
                    or str(Path.home() / ".cache/verdict/ffmpeg/bin/ffmpeg"))
    args = ap.parse_args()
    from transformers import AutoImageProcessor, AutoVideoProcessor
    import transformers

    check_alpha_composite()
    check_resize()
    print("self-checks: Pillow alpha_composite and torchvision uint8 resize models agree", file=sys.stderr)

    make_media(args.ffmpeg)
    write_configs()

    ip = AutoImageProcessor.from_pretrained(CFG_DIR)
    assert ip.backend == "torchvision", ip.backend
    vp = AutoVideoProcessor.from_pretrained(CFG_DIR)
    vp_all = AutoVideoProcessor.from_pretrained(MEDIA / "all_frames")

    tensors, meta = {}, {"transformers": transformers.__version__, "torch": torch.__version__,
                         "torchvision": __import__("torchvision").__version__,
                         "images": {}, "videos": {}}
    for name in ["photo.png", "photo.jpg", "alpha.png"]:
        pv, grid = hf_image(ip, MEDIA / name)
        key = name.replace(".", "_")
        tensors[key] = np.ascontiguousarray(pv)
        meta["images"][name] = {"tensor": key, "grid_thw": grid, "shape": list(pv.shape)}

    # Qwen2.5-VL's real limits: too many patches to store; grid plus summary numbers.
    pv, grid = hf_image(ip, MEDIA / "photo.png", size={"shortest_edge": QWEN25_LIMITS["min_pixels"],
                                                       "longest_edge": QWEN25_LIMITS["max_pixels"]})
    pick = np.random.default_rng(7).integers(0, pv.size, 64)
    meta["qwen25_limits_photo_png"] = {
        **QWEN25_LIMITS, "grid_thw": grid, "shape": list(pv.shape),
        "sum": float(pv.astype(np.float64).sum()), "abs_sum": float(np.abs(pv.astype(np.float64)).sum()),
        "picks": [[int(i), float(pv.reshape(-1)[i])] for i in pick],
    }
    # EXIF-rotated JPEG: transformers' load_image applies exif_transpose.
    from transformers.image_utils import load_image
    rot = ip(images=[load_image(str(MEDIA / "rotated.jpg"))], return_tensors="pt")
    meta["rotated_jpg"] = {"grid_thw": rot["image_grid_thw"][0].tolist()}

    for name, proc, cfg in [("clip.mp4", vp, "fixtures/qwen2_5_vl"), ("short.mp4", vp_all, "fixtures/media/all_frames")]:
        pv, grid, spg, md = hf_video(proc, MEDIA / name)
        key = name.replace(".", "_")
        tensors[key] = np.ascontiguousarray(pv)
        meta["videos"][name] = {"tensor": key, "config_dir": cfg, "grid_thw": grid, "shape": list(pv.shape),
                                "second_per_grid_t": spg, **md}

    save_file(tensors, str(MEDIA / "expected.safetensors"))
    os.chmod(MEDIA / "expected.safetensors", 0o644)
    (MEDIA / "expected.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in MEDIA.rglob("*") if p.is_file())
    print(json.dumps({k: v["grid_thw"] for k, v in {**meta["images"], **meta["videos"]}.items()}), file=sys.stderr)
    print(f"fixtures/media: {total} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
