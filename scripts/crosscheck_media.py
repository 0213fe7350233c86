#!/usr/bin/env python3
"""A wider, throw-away parity check of the image/video preprocessing than the
committed fixtures: random images (sizes 1..2000 px, big downscales, upscales,
thin strips) under several pixel limits, and a few videos (29.97 fps sampling,
BT.709 and full-range H.264), with transformers' outputs written to a folder
outside the repo. The Rust side is an ignored test:

    /opt/torchenv/bin/python scripts/crosscheck_media.py /tmp/verdict-crosscheck
    VERDICT_MEDIA_CROSSCHECK=/tmp/verdict-crosscheck \\
        cargo test --release -p verdict-engine --test multimodal crosscheck -- --ignored --nocapture
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_media_fixtures import IMAGE_CONFIG, VIDEO_CONFIG, hf_image, hf_video, pattern  # noqa: E402


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/verdict-crosscheck")
    ffmpeg = os.environ.get("VERDICT_FFMPEG") or shutil.which("ffmpeg") or str(
        Path.home() / ".cache/verdict/ffmpeg/bin/ffmpeg")
    from transformers import AutoImageProcessor, AutoVideoProcessor

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(int(os.environ.get("SEED", "1")))
    cases = []
    limits = [(3136, 12544), (3136, 200704), (3136, 1003520), (200704, 1003520)]
    sizes = [(1500, 2000), (1999, 37), (12, 2000), (7, 9), (1, 150), (28, 28), (56, 56), (333, 500), (1080, 1920)]
    sizes += [tuple(int(x) for x in rng.integers(1, 1200, 2)) for _ in range(12)]
    for i, (h, w) in enumerate(sizes):
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = limits[i % len(limits)]
        cfg_dir = out / f"img{i}"
        cfg_dir.mkdir()
        (cfg_dir / "preprocessor_config.json").write_text(json.dumps(dict(IMAGE_CONFIG, min_pixels=lo, max_pixels=hi)))
        img = pattern(h, w, i) if i % 2 else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mode = ["RGB", "RGBA", "L"][i % 3]
        pil = Image.fromarray(img, "RGB")
        if mode == "RGBA":
            a = rng.integers(0, 256, (h, w), dtype=np.uint8)
            pil = Image.fromarray(np.dstack([img, a]), "RGBA")
        elif mode == "L":
            pil = pil.convert("L")
        path = cfg_dir / "img.png"
        pil.save(path)
        ip = AutoImageProcessor.from_pretrained(cfg_dir)
        pv, grid = hf_image(ip, path)
        pv.astype("<f4").tofile(cfg_dir / "expected.f32")
        cases.append({"kind": "image", "dir": str(cfg_dir), "file": "img.png", "mode": mode, "size": [h, w],
                      "limits": [lo, hi], "grid_thw": grid})

    run = lambda *a: subprocess.run([ffmpeg, "-hide_banner", "-v", "error", "-y", *a], check=True)
    videos = [
        ("ntsc.mp4", ["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=30000/1001", "-frames:v", "150",
                      "-c:v", "libx264", "-pix_fmt", "yuv420p"], {}),
        ("bt709.mp4", ["-f", "lavfi", "-i", "testsrc2=size=66x50:rate=24", "-frames:v", "30",
                       "-vf", "scale=out_color_matrix=bt709", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                       "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709"], {}),
        ("fullrange.mp4", ["-f", "lavfi", "-i", "testsrc2=size=64x48:rate=15", "-frames:v", "23",
                           "-c:v", "libx264", "-pix_fmt", "yuvj420p"], {"num_frames": 6, "fps": None}),
        ("capped.mp4", ["-f", "lavfi", "-i", "testsrc2=size=200x150:rate=30000/1001", "-frames:v", "150",
                        "-c:v", "libx264", "-pix_fmt", "yuv420p"],
         {"cap_pixels_per_frame": True, "max_video_tokens": 40,
          "size": {"shortest_edge": 3136, "longest_edge": 28 * 28 * 20}}),
        ("mpeg4.avi", ["-f", "lavfi", "-i", "testsrc2=size=80x60:rate=25", "-frames:v", "40",
                       "-c:v", "mpeg4", "-q:v", "3"], {"min_frames": 2}),
    ]
    for name, args, over in videos:
        d = out / name.replace(".", "_")
        d.mkdir()
        cfg = dict(VIDEO_CONFIG, **over)
        cfg = {k: v for k, v in cfg.items() if v is not None}
        (d / "video_preprocessor_config.json").write_text(json.dumps(cfg))
        run(*args, str(d / name))
        vp = AutoVideoProcessor.from_pretrained(d)
        try:
            pv, grid, spg, md = hf_video(vp, d / name)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: transformers failed: {e}", file=sys.stderr)
            continue
        pv.astype("<f4").tofile(d / "expected.f32")
        cases.append({"kind": "video", "dir": str(d), "file": name, "grid_thw": grid,
                      "second_per_grid_t": spg, **md})
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
    print(f"{len(cases)} cases in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
