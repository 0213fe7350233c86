"""Shared helpers: the repository's fixtures, their transformers reference
outputs, and a Hugging Face cache laid out for the seed page's model ids."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict

import pytest

REPO = Path(os.environ.get("VERDICT_REPO", Path(__file__).resolve().parents[2]))
FIXTURES = REPO / "fixtures" / "models"
ATOL = 1e-4


def fixture_dir(name: str) -> Path:
    return FIXTURES / name


def load_reference(directory: Path) -> Dict[str, Any]:
    return json.loads((directory / "reference.json").read_text())


def fixture_kwargs(name: str) -> Dict[str, Any]:
    """`LLM` keywords for a fixture, as its reference says to load it (CPU, fp32)."""
    args = load_reference(fixture_dir(name))["engine_args"]
    kwargs: Dict[str, Any] = {"device": "cpu", "dtype": "float32"}
    if args.get("convert"):
        kwargs["convert"] = args["convert"]
    if args.get("hf_overrides"):
        kwargs["hf_overrides"] = args["hf_overrides"]
    return kwargs


def default_model_dir() -> Path:
    if os.environ.get("VERDICT_DEFAULT_MODEL"):
        return Path(os.environ["VERDICT_DEFAULT_MODEL"])
    home = os.environ.get("VERDICT_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "verdict"
    )
    return Path(home) / "default-model"


def assert_close(what: str, got, want, atol: float = ATOL) -> None:
    got = [float(x) for x in got]
    want = [float(x) for x in want]
    assert len(got) == len(want), f"{what}: length {len(got)} vs {len(want)}"
    worst = max((abs(g - w) for g, w in zip(got, want)), default=0.0)
    assert worst <= atol, f"{what}: max abs diff {worst:e} > {atol:e}\n got  {got}\n want {want}"


@pytest.fixture(scope="session")
def default_model() -> Path:
    directory = default_model_dir()
    if not (directory / "config.json").is_file():
        pytest.fail(
            f"the default model is not set up at {directory}: run scripts/setup-default-model.sh "
            "(scripts/test.sh does)"
        )
    return directory


@pytest.fixture(scope="session")
def seed_hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face hub cache where `jason9693/Qwen2.5-1.5B-apeach` (the seed
    page's model, a Qwen2 classifier with labels Default/Spoiled) is the tiny
    qwen2-cls fixture, so the page's examples run as written, offline."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--jason9693--Qwen2.5-1.5B-apeach"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    source = fixture_dir("qwen2-cls")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile((source / name).resolve(), snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture()
def seed_env(seed_hub_cache, monkeypatch) -> Dict[str, str]:
    monkeypatch.setenv("HF_HUB_CACHE", str(seed_hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = dict(os.environ)
    return env
