"""Threads, several models in one process, the GIL released while the engine
runs, Ctrl-C, progress bars, and the NumPy outputs."""

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import fixture_dir, load_reference
from verdict import LLM, ClassificationRequestOutput, PoolingParams, PoolingRequestOutput

TEXTS = [c["text"] for c in load_reference(fixture_dir("bert-cls"))["cases"] if c["kind"] == "text"]


@pytest.fixture(scope="module")
def bert():
    return LLM(str(fixture_dir("bert-cls")))


@pytest.fixture(scope="module")
def qwen():
    return LLM(str(fixture_dir("qwen2-cls")))


def test_threads_and_two_models(bert, qwen):
    prompts = [TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(400)]
    want = {
        "bert": [o.outputs.probs for o in bert.classify(prompts, use_tqdm=False)],
        "qwen": [o.outputs.probs for o in qwen.classify(prompts, use_tqdm=False)],
    }
    got = {}
    errors = []

    def work(key, llm, n):
        try:
            got[(key, n)] = [o.outputs.probs for o in llm.classify(prompts, use_tqdm=False)]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [
        threading.Thread(target=work, args=(key, llm, n))
        for n in range(3)
        for key, llm in (("bert", bert), ("qwen", qwen))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(got) == 6
    for (key, _), probs in got.items():
        assert probs == want[key], key


def test_request_ids_are_unique_across_threads(bert):
    ids = []
    lock = threading.Lock()

    def work():
        outs = bert.classify(TEXTS, use_tqdm=False)
        with lock:
            ids.extend(o.request_id for o in outs)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == len(set(ids)) == 4 * len(TEXTS)


def test_gil_released_while_the_engine_runs(default_model):
    llm = LLM(device="cpu")
    prompts = ["The service was friendly and the food arrived quickly."] * 3000
    ticks = 0
    done = threading.Event()

    def run():
        llm.classify(prompts, use_tqdm=False)
        done.set()

    worker = threading.Thread(target=run)
    started = time.monotonic()
    worker.start()
    while not done.is_set():
        ticks += 1  # pure-Python work: only runs while the engine has let go of the GIL
        time.sleep(0.001)
    worker.join()
    elapsed = time.monotonic() - started
    assert elapsed > 0.3, "the call was too short to tell"
    # With the GIL held for the whole call this loop would not have run at all.
    assert ticks > elapsed * 100, (ticks, elapsed)


INTERRUPT_SCRIPT = """
import sys, time
from verdict import LLM
llm = LLM(device="cpu")
prompts = ["A long enough review of a restaurant, to keep the engine busy for a while. %d" % i for i in range(200000)]
print("ready", flush=True)
try:
    llm.classify(prompts, use_tqdm=False)
except KeyboardInterrupt:
    print("interrupted at %.3f" % time.monotonic(), flush=True)
    raise
print("finished", flush=True)
"""


def test_ctrl_c_stops_a_long_call(default_model):
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPT_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # well into the call
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    assert "interrupted at" in out, (out, err)
    assert "finished" not in out
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    assert elapsed < 2.0, f"took {elapsed:.2f} s to stop"


def test_progress_bar_counts_every_prompt(bert):
    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total = total
            self.n = 0
            self.closed = False
            bars.append(self)

        def update(self, step):
            self.n += step

        def close(self):
            self.closed = True

    prompts = [f"prompt {i}" for i in range(500)]
    bert.classify(prompts, use_tqdm=Bar)
    assert len(bars) == 1 and bars[0].total == 500 and bars[0].n == 500 and bars[0].closed
    bert.classify(prompts, use_tqdm=False)
    assert len(bars) == 1


def test_tqdm_bar_on_stderr(bert, capsys):
    pytest.importorskip("tqdm")
    bert.classify([f"prompt {i}" for i in range(300)])
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "300/300" in err


def test_numpy_outputs(bert, qwen):
    (pooled,) = bert.encode("Hello there", pooling_task="classify")
    assert isinstance(pooled, PoolingRequestOutput)
    assert isinstance(pooled.outputs.data, np.ndarray)
    assert pooled.outputs.data.dtype == np.float32 and pooled.outputs.data.shape == (3,)
    assert pooled.outputs.data.flags["C_CONTIGUOUS"]
    (classified,) = bert.classify("Hello there")
    assert isinstance(classified, ClassificationRequestOutput)
    assert type(classified.outputs.probs) is list
    assert all(type(p) is float for p in classified.outputs.probs)
    assert classified.outputs.probs == pooled.outputs.data.tolist()
    assert repr(classified.outputs) == "ClassificationOutput(num_classes=3)"
    assert classified.prompt_token_ids == bert.encode("Hello there", pooling_task="classify")[0].prompt_token_ids
    assert classified.num_cached_tokens == 0 and classified.finished
    assert repr(classified).startswith("ClassificationRequestOutput(request_id=")
    # Per-token rows: a 2-D array, one row per token.
    tokens = LLM(str(fixture_dir("qwen2-cls")), pooler_config={"task": "token_classify"})
    (rows,) = tokens.encode("Hello world again", pooling_task="token_classify")
    assert rows.outputs.data.ndim == 2 and rows.outputs.data.shape[1] == 2
    assert rows.outputs.data.shape[0] == len(rows.prompt_token_ids)


def test_prompt_forms_agree(qwen):
    text = "The movie was surprisingly good!"
    ids = qwen.classify(text)[0].prompt_token_ids
    forms = [
        text,
        [text],
        {"prompt": text},
        {"prompt_token_ids": ids},
        [{"prompt_token_ids": ids}],
        np.array([text]),
    ]
    results = [qwen.classify(f, use_tqdm=False) for f in forms]
    for r in results:
        assert len(r) == 1
        assert r[0].outputs.probs == results[0][0].outputs.probs
        assert r[0].prompt_token_ids == ids
    # A conversation given as a list of messages, and as {"messages": ...}.
    messages = [{"role": "user", "content": text}]
    (a,) = qwen.classify(messages)
    (b,) = qwen.classify({"messages": messages})
    assert a.outputs.probs == b.outputs.probs
    two = qwen.classify([messages, messages])
    assert len(two) == 2


def test_use_activation_false_gives_logits(qwen):
    (probs,) = qwen.classify("Hello")
    (logits,) = qwen.classify("Hello", PoolingParams(use_activation=False))
    soft = np.exp(logits.outputs.probs) / np.exp(logits.outputs.probs).sum()
    np.testing.assert_allclose(soft, probs.outputs.probs, atol=1e-6)
