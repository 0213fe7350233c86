"""The `verdict` command installed by the wheel: the binary's CLI, `serve` included."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import fixture_dir
from verdict import LLM

VERDICT = str(Path(sys.executable).with_name("verdict"))
TEXTS = ["Loved the new café—coffee was great.", "This update broke everything. Frustrating."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_lists_the_commands():
    out = subprocess.run([VERDICT, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("serve", "classify", "score", "bench"):
        assert command in out


def test_bad_flag_exits_2():
    done = subprocess.run([VERDICT, "classify", "--no-such-flag"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "unexpected argument '--no-such-flag'" in done.stderr


def test_classify_matches_the_python_api(default_model):
    done = subprocess.run([VERDICT, "classify", "--no-progress", *TEXTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    outputs = LLM(device="cpu").classify(TEXTS)
    assert [r["index"] for r in records] == [0, 1]
    assert [r["label"] for r in records] == ["positive", "negative"]
    for record, out in zip(records, outputs):
        assert record["probs"] == pytest.approx(out.outputs.probs, abs=1e-6)
        assert record["prompt_tokens"] == len(out.prompt_token_ids)


def test_model_error_exits_1(tmp_path):
    done = subprocess.run([VERDICT, "classify", "--model", str(tmp_path / "missing"), "x"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "verdict: error:" in done.stderr


def test_python_dash_m_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "verdict", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("verdict ")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_http(stop):
    model = str(fixture_dir("qwen2-cls"))
    port = free_port()
    proc = subprocess.Popen(
        [VERDICT, "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        body = json.dumps({"model": model, "input": TEXTS}).encode()
        request = urllib.request.Request(base + "/classify", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            response = json.load(r)
        assert response["object"] == "list"
        outputs = LLM(model).classify(TEXTS)
        for item, out in zip(response["data"], outputs):
            assert item["probs"] == pytest.approx(out.outputs.probs, abs=1e-6)
            assert item["label"] in ("Default", "Spoiled")
    finally:
        proc.send_signal(stop)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read().decode()
