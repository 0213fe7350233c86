"""verdict on Ray: batch classification with Ray Data, online serving with Ray Serve.

Ray Data (one model per actor, rows spread over the actors)::

    import ray, verdict.ray
    ds = ray.data.read_parquet("reviews.parquet")
    ds = ds.map_batches(
        verdict.ray.Classifier,
        fn_constructor_kwargs={"model": "org/classifier", "text_column": "text"},
        concurrency=4,      # actors, each with its own engine
        num_gpus=1,         # per actor, on a CUDA build
        batch_size=1024,
    )
    ds.write_parquet("labelled/")

Ray Serve (the HTTP API, vLLM's /classify etc., on autoscaling replicas)::

    from ray import serve
    import verdict.ray
    serve.run(verdict.ray.serve_app(model="org/classifier",
                                    autoscaling_config={"min_replicas": 1, "max_replicas": 8}))
"""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

from verdict._llm import LLM


class Classifier:
    """A Ray Data callable class: classifies `text_column` into `label_column`
    (the most probable label's name) and `probs_column` (the probability vector).

    Keywords other than the column names and `use_activation` /
    `truncate_prompt_tokens` go to `verdict.LLM` (`model`, `max_model_len`, ...).
    Batches may come as dicts of NumPy arrays (Ray's default), pandas DataFrames
    or pyarrow Tables; the result has the same form.
    """

    def __init__(
        self,
        model: Optional[str] = None,
        *,
        text_column: str = "text",
        label_column: str = "label",
        probs_column: str = "probs",
        use_activation: Optional[bool] = None,
        truncate_prompt_tokens: Optional[int] = None,
        **llm_kwargs: Any,
    ) -> None:
        from verdict.pooling_params import PoolingParams

        self.llm = LLM(model, **llm_kwargs)
        self.text_column = text_column
        self.label_column = label_column
        self.probs_column = probs_column
        self._params = PoolingParams(use_activation=use_activation) if use_activation is not None else None
        self._truncate = truncate_prompt_tokens
        id2label = self.llm.id2label
        self._labels = [id2label.get(i, str(i)) for i in range(self.llm.info["num_labels"])]

    def classify_texts(self, texts: List[str]) -> np.ndarray:
        """Probabilities of `texts`, one row each (float32)."""
        if not texts:
            return np.zeros((0, len(self._labels)), dtype=np.float32)
        outputs = self.llm.classify(
            texts, self._params, use_tqdm=False, truncate_prompt_tokens=self._truncate
        )
        return np.asarray([o.outputs.probs for o in outputs], dtype=np.float32).reshape(len(texts), -1)

    def labels_of(self, probs: np.ndarray) -> np.ndarray:
        return np.asarray([self._labels[i] for i in probs.argmax(axis=1)], dtype=object)

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, dict):
            texts = [str(t) for t in np.asarray(batch[self.text_column]).tolist()]
            probs = self.classify_texts(texts)
            out = dict(batch)
            out[self.label_column] = self.labels_of(probs)
            out[self.probs_column] = probs
            return out
        module = type(batch).__module__.split(".")[0]
        if module == "pandas":
            texts = [str(t) for t in batch[self.text_column].tolist()]
            probs = self.classify_texts(texts)
            out = batch.copy()
            out[self.label_column] = self.labels_of(probs)
            out[self.probs_column] = list(probs)
            return out
        if module == "pyarrow":
            import pyarrow as pa

            texts = [str(t) for t in batch.column(self.text_column).to_pylist()]
            probs = self.classify_texts(texts)
            out = batch.append_column(self.label_column, pa.array(self.labels_of(probs).tolist(), pa.string()))
            return out.append_column(self.probs_column, pa.array(probs.tolist(), pa.list_(pa.float32())))
        raise TypeError(f"unsupported batch type {type(batch).__name__} (use dict, pandas or pyarrow batches)")


# ---- Ray Serve --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the replica's process ends, however it ends
    (Ray may kill a replica without running its finalizers)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, 15)


def _verdict_command() -> List[str]:
    """The `verdict` command installed beside this Python, else `python -m verdict`."""
    script = os.path.join(os.path.dirname(sys.executable), "verdict")
    if os.path.isfile(script):
        return [script]
    found = shutil.which("verdict")
    return [found] if found else [sys.executable, "-m", "verdict"]


class VerdictServer:
    """One Ray Serve replica: a `verdict serve` process on a local port, with
    requests passed through to it unchanged (every route of the HTTP API)."""

    # Headers that describe one hop, not the request.
    _HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "host", "content-length"})

    def __init__(self, serve_args: List[str], startup_timeout: float = 600.0) -> None:
        self.port = _free_port()
        command = _verdict_command() + ["serve", "--host", "127.0.0.1", "--port", str(self.port), *serve_args]
        self.process = subprocess.Popen(command, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"verdict serve exited with code {self.process.returncode}")
            try:
                status, _, _ = self._forward("GET", "/health", {}, b"")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError("verdict serve did not become healthy in time")
            time.sleep(0.2)

    def _forward(self, method: str, path: str, headers: Dict[str, str], body: bytes) -> tuple:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        path = request.url.path
        if request.url.query:
            path += "?" + request.url.query
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self._HOP_HEADERS}
        body = await request.body()
        status, response_headers, content = await asyncio.get_running_loop().run_in_executor(
            None, self._forward, request.method, path, headers, body
        )
        kept = {k: v for k, v in response_headers if k.lower() not in self._HOP_HEADERS}
        return Response(content=content, status_code=status, headers=kept)

    def check_health(self) -> None:
        """Ray Serve's health check: the server process must be up and answering."""
        if self.process.poll() is not None:
            raise RuntimeError(f"verdict serve exited with code {self.process.returncode}")
        status, _, _ = self._forward("GET", "/health", {}, b"")
        if status != 200:
            raise RuntimeError(f"verdict serve /health answered {status}")

    def __del__(self) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


DEFAULT_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 4,
    # Requests in flight per replica that Serve aims for before adding one.
    "target_ongoing_requests": 32,
}


def serve_deployment(
    *,
    autoscaling_config: Optional[Dict[str, Any]] = None,
    ray_actor_options: Optional[Dict[str, Any]] = None,
    max_ongoing_requests: int = 256,
    name: str = "verdict",
) -> Any:
    """The Ray Serve deployment behind `serve_app`, for composing it yourself:
    `serve_deployment(...).bind(["--model", "org/name", ...])`."""
    import ray.serve as serve

    return serve.deployment(
        VerdictServer,
        name=name,
        autoscaling_config=dict(autoscaling_config or DEFAULT_AUTOSCALING),
        ray_actor_options=dict(ray_actor_options or {"num_cpus": 1}),
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=10,
    )


def serve_app(
    model: Optional[str] = None,
    *,
    serve_args: Optional[List[str]] = None,
    autoscaling_config: Optional[Dict[str, Any]] = None,
    ray_actor_options: Optional[Dict[str, Any]] = None,
    max_ongoing_requests: int = 256,
    name: str = "verdict",
) -> Any:
    """A Ray Serve application serving `model` with verdict's HTTP API
    (`/classify`, `/pooling`, `/score`, `/rerank`, ...) on autoscaling replicas.

    `serve_args` are further `verdict serve` flags (e.g. `["--max-model-len",
    "512"]`); `ray_actor_options` sets each replica's resources (e.g.
    `{"num_cpus": 4}` or `{"num_gpus": 1}`). Run it with `serve.run(app)`.
    """
    args = list(serve_args or [])
    if model is not None:
        args = ["--model", model, *args]
    deployment = serve_deployment(
        autoscaling_config=autoscaling_config,
        ray_actor_options=ray_actor_options,
        max_ongoing_requests=max_ongoing_requests,
        name=name,
    )
    return deployment.bind(args)
