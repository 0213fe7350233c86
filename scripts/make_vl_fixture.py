#!/usr/bin/env python3
"""Tiny random-weight Qwen2.5-VL classifier with transformers reference outputs.

    /opt/torchenv/bin/python scripts/make_vl_fixture.py

Needs transformers >= 5 (Qwen2.5-VL), torchvision, pillow and av (PyAV); the
CPU reference stack of make_fixtures.py is too old for this model.

Writes fixtures/models/qwen2_5_vl-cls/ (config, bf16 weights with a top-level
`score.weight`, processor configs, chat template, tokenizer symlinks) and its
media (fixtures/models/qwen2_5_vl-cls/media: PNG, JPEG, H.264 mp4), then runs the
Hugging Face processor and model on chat conversations and stores, per case,
the input ids, the logits of `score(last hidden state)` and their softmax.
Deterministic: seeds are fixed.
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers.video_utils import load_video
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures/models/qwen2_5_vl-cls"
MEDIA = OUT / "media"
TOKENIZER = ROOT / "fixtures/tokenizers/qwen3"

# The chat template Qwen2.5-VL checkpoints ship (chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ffmpeg_exe():
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except ImportError:
        return "ffmpeg"


def make_media():
    MEDIA.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:97, 0:151]
    # Smooth structure plus noise, so resizing and patches all matter.
    img = np.stack(
        [
            (xx * 255 / 150),
            (yy * 255 / 96),
            (128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 7.0)),
        ],
        axis=-1,
    )
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(MEDIA / "scene.png")
    # Tall image already on the 28-pixel grid: no resize on either side.
    tall = np.clip(rng.normal(120, 60, (112, 56, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(tall).save(MEDIA / "tall.png")
    Image.fromarray(img[:64, :80]).save(MEDIA / "crop.jpg", quality=90)
    # 4 s of 64x48 video at 10 fps, H.264 yuv420p: 8 frames sampled at 2 fps.
    frames = []
    for t in range(40):
        f = np.zeros((48, 64, 3), np.uint8)
        f[..., 0] = (xx[:48, :64] * 4 + t * 5) % 256
        f[..., 1] = (yy[:48, :64] * 5 + t * 7) % 256
        f[..., 2] = 60 + t * 4
        frames.append(f)
    raw = np.stack(frames).tobytes()
    subprocess.run(
        [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
         "-s", "64x48", "-r", "10", "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p",
         "-preset", "veryslow", "-crf", "18", "-bitexact", str(MEDIA / "clip.mp4")],
        input=raw, check=True)


def build_model():
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=4096,
            rms_norm_eps=1e-6, rope_theta=1000000.0,
            rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=3, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=8,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
            fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu",
        ),
        image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653,
        id2label={0: "still", 1: "moving"}, label2id={"still": 0, "moving": 1},
        tie_word_embeddings=True,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    score = 0.5 * torch.randn(2, 8, generator=g)
    return model, score


def save_model(model, score):
    OUT.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(OUT, safe_serialization=True)
    path = OUT / "model.safetensors"
    tensors = load_file(path)
    tensors["score.weight"] = score.to(torch.bfloat16)
    save_file(tensors, path, metadata={"format": "pt"})
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        link = OUT / f
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(TOKENIZER / f, OUT))
    (OUT / "chat_template.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")


def build_processor():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    image = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 20)
    video = Qwen2VLVideoProcessor(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 6, fps=2.0,
                                  do_sample_frames=True, min_frames=2, max_frames=16)
    processor = Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer,
                                    video_processor=video, chat_template=CHAT_TEMPLATE)
    image.save_pretrained(OUT)
    video.save_pretrained(OUT)
    return processor


def hf_messages(messages):
    """OpenAI-style parts → the {"type": "image"} parts the HF template expects."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p["type"] == "image_url":
                    parts.append({"type": "image"})
                elif p["type"] == "video_url":
                    parts.append({"type": "video"})
                else:
                    parts.append(p)
            content = parts
        out.append({"role": m["role"], "content": content})
    return out


def media_of(messages):
    images, videos = [], []
    for m in messages:
        if isinstance(m["content"], list):
            for p in m["content"]:
                if p["type"] == "image_url":
                    images.append(p["image_url"]["url"].removeprefix("media:"))
                elif p["type"] == "video_url":
                    videos.append(p["video_url"]["url"].removeprefix("media:"))
    return images, videos


def run_case(model, score, processor, case):
    text = processor.apply_chat_template(
        hf_messages(case["messages"]), tokenize=False,
        add_generation_prompt=case.get("add_generation_prompt", False))
    images, videos = media_of(case["messages"])
    kwargs = {}
    if images:
        kwargs["images"] = [Image.open(MEDIA / name) for name in images]
    if videos:
        # Decoded with PyAV (transformers' "pyav" backend); the processor samples frames.
        loaded = [load_video(str(MEDIA / name), backend="pyav") for name in videos]
        kwargs["videos"] = [v for v, _ in loaded]
        kwargs["video_metadata"] = [m for _, m in loaded]
    inputs = processor(text=[text], return_tensors="pt", **kwargs)
    with torch.no_grad():
        out = model.model(**{k: v for k, v in inputs.items() if k != "attention_mask"})
        hidden = out.last_hidden_state[0, -1]
        logits = score.float() @ hidden
    ids = inputs["input_ids"][0].tolist()
    result = {"name": case["name"], "kind": "chat", **case}
    result.update(
        input_ids=ids,
        prompt_tokens=len(ids),
        logits=logits.tolist(),
        probs=torch.softmax(logits, -1).tolist(),
    )
    for key in ("image_grid_thw", "video_grid_thw"):
        if key in inputs:
            result[key] = inputs[key].tolist()
    if "second_per_grid_ts" in inputs:
        result["second_per_grid_ts"] = [float(x) for x in inputs["second_per_grid_ts"]]
    return result


TXT = "This product was excellent and exceeded my expectations"


def user(*parts):
    return {"role": "user", "content": list(parts)}


def text(t):
    return {"type": "text", "text": t}


def image(name):
    return {"type": "image_url", "image_url": {"url": f"media:{name}"}}


def video(name):
    return {"type": "video_url", "video_url": {"url": f"media:{name}"}}


CASES = [
    {"name": "text_only", "messages": [
        {"role": "assistant", "content": "Please classify this text request."},
        {"role": "user", "content": TXT}]},
    {"name": "image_png", "messages": [
        {"role": "assistant", "content": "Please classify this image."},
        user(image("scene.png"), text("Is anything moving here?"))]},
    {"name": "image_on_grid", "messages": [user(text("Look:"), image("tall.png"))]},
    {"name": "image_jpeg", "messages": [user(image("crop.jpg"), text("And this one?"))]},
    {"name": "two_images", "messages": [
        user(image("tall.png"), text("versus"), image("scene.png"))]},
    {"name": "video", "messages": [
        {"role": "assistant", "content": "Please classify this video."},
        user(video("clip.mp4"), text("What happens?"))]},
    {"name": "image_and_video", "messages": [
        user(image("scene.png"), video("clip.mp4"), text("Same scene?"))],
     "add_generation_prompt": True},
]


def main():
    make_media()
    model, score = build_model()
    save_model(model, score)
    processor = build_processor()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(OUT, dtype=torch.float32).eval()
    score = load_file(OUT / "model.safetensors")["score.weight"].float()
    cases = [run_case(model, score, processor, c) for c in CASES]
    reference = {
        "generator": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "architecture": "Qwen2_5_VLForConditionalGeneration",
        "engine_args": {"convert": "classify", "hf_overrides": None},
        "num_labels": 2,
        "activation": "softmax",
        "id2label": {"0": "still", "1": "moving"},
        "media_urls": "media:<file> stands for a file of media/, sent as a data:, file: or http: URL",
        "cases": cases,
    }
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    for c in cases:
        print(c["name"], c["prompt_tokens"], [round(x, 5) for x in c["probs"]],
              c.get("image_grid_thw"), c.get("video_grid_thw"), c.get("second_per_grid_ts"))


if __name__ == "__main__":
    sys.exit(main())
