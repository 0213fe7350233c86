"""Scale-out on Ray: Parquet in, Parquet out through Ray Data actors, equal to
one process's LLM.classify; the Ray Serve application builds."""

import sys

import numpy as np
import pytest

from conftest import fixture_dir
from verdict import LLM

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

ROWS = 5000
MODEL = str(fixture_dir("qwen2-cls"))


def make_texts(n):
    words = ["good", "bad", "coffee", "update", "broke", "loved", "slow", "great", "café", "never", "again"]
    rng = np.random.default_rng(7)
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) + f" ({i})" for i in range(n)]


class PidTaggingClassifier:
    """verdict.ray.Classifier, recording which actor process handled each row."""

    def __init__(self, **kwargs):
        import verdict.ray

        self.classifier = verdict.ray.Classifier(**kwargs)

    def __call__(self, batch):
        import os

        out = self.classifier(batch)
        out["worker_pid"] = np.full(len(out["text"]), os.getpid())
        return out


@pytest.fixture(scope="module")
def local_cluster():
    # This module's classes travel to the workers by value (it is not importable there).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_parquet_through_map_batches_equals_llm_classify(local_cluster, tmp_path):
    import verdict.ray

    texts = make_texts(ROWS)
    # A dataset of ten Parquet files, so the rows come in several blocks.
    source = tmp_path / "in"
    source.mkdir()
    part = ROWS // 10
    for k in range(10):
        rows = range(k * part, (k + 1) * part)
        pq.write_table(pa.table({"id": list(rows), "text": [texts[i] for i in rows]}), source / f"part-{k}.parquet")

    ds = ray.data.read_parquet(str(source)).repartition(10)
    ds = ds.map_batches(
        PidTaggingClassifier,
        fn_constructor_kwargs={"model": MODEL},
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=500,
        num_cpus=0.5,
    )
    out_dir = tmp_path / "out"
    ds.write_parquet(str(out_dir))

    table = pq.read_table(str(out_dir)).sort_by("id")
    assert table.num_rows == ROWS
    assert table.column("text").to_pylist() == texts

    llm = LLM(MODEL)
    want = llm.classify(texts, use_tqdm=False)
    want_probs = np.asarray([o.outputs.probs for o in want], dtype=np.float32)
    got_probs = np.asarray([np.asarray(p, dtype=np.float32).reshape(-1) for p in table.column("probs").to_pylist()])
    np.testing.assert_array_equal(got_probs, want_probs)
    labels = [llm.id2label[int(i)] for i in want_probs.argmax(axis=1)]
    assert table.column("label").to_pylist() == labels
    assert set(labels) == {"Default", "Spoiled"}
    assert len(set(table.column("worker_pid").to_pylist())) == 2, "both actors classified rows"


def test_classifier_batch_formats():
    import pandas as pd

    import verdict.ray

    classifier = verdict.ray.Classifier(MODEL, text_column="review", label_column="y", probs_column="p")
    texts = ["good coffee", "broke again", "slow update"]
    want = np.asarray([o.outputs.probs for o in LLM(MODEL).classify(texts)], dtype=np.float32)

    as_numpy = classifier({"review": np.asarray(texts, dtype=object)})
    np.testing.assert_array_equal(as_numpy["p"], want)
    as_pandas = classifier(pd.DataFrame({"review": texts}))
    np.testing.assert_array_equal(np.stack(as_pandas["p"].to_list()), want)
    as_arrow = classifier(pa.table({"review": texts}))
    np.testing.assert_array_equal(np.asarray(as_arrow.column("p").to_pylist(), dtype=np.float32), want)
    assert list(as_numpy["y"]) == list(as_pandas["y"]) == as_arrow.column("y").to_pylist()
    empty = classifier({"review": np.asarray([], dtype=object)})
    assert empty["p"].shape == (0, 2)


def test_serve_deployment_settings():
    serve = pytest.importorskip("ray.serve")
    import verdict.ray

    deployment = verdict.ray.serve_deployment(
        autoscaling_config={"min_replicas": 1, "max_replicas": 3}, ray_actor_options={"num_cpus": 2}
    )
    assert deployment.name == "verdict"
    assert deployment.func_or_class is verdict.ray.VerdictServer
    assert deployment.ray_actor_options == {"num_cpus": 2}
    assert deployment.max_ongoing_requests == 256
    app = verdict.ray.serve_app(MODEL, serve_args=["--max-model-len", "512"])
    assert isinstance(app, serve.Application)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_replicas_answer_classify(local_cluster):
    """A live Ray Serve application: POST /classify through Serve's HTTP proxy
    reaches a replica's `verdict serve` and comes back unchanged."""
    import json
    import urllib.request

    serve = pytest.importorskip("ray.serve")
    import verdict.ray

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = verdict.ray.serve_app(
            MODEL,
            autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
            ray_actor_options={"num_cpus": 0.5},
        )
        serve.run(app, name="verdict", route_prefix="/")
        texts = ["good coffee", "broke again"]
        body = json.dumps({"input": texts}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/classify", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.status == 200
            response = json.load(r)
        want = LLM(MODEL).classify(texts)
        for item, out in zip(response["data"], want):
            assert item["probs"] == pytest.approx(out.outputs.probs, abs=1e-6)
        # Errors pass through with their status and vLLM's envelope.
        bad = urllib.request.Request(
            f"http://127.0.0.1:{port}/classify", b'{"input": []}', {"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=60)
        assert err.value.code == 400
        assert json.load(err.value)["error"]["code"] == 400
    finally:
        serve.shutdown()
