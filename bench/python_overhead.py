#!/usr/bin/env python3
"""Overhead of the Python API: `LLM.classify` on 10,000 short prompts against the
`verdict classify` command on the same prompts, default model, CPU.

Each side is timed end to end in a fresh process (start, model load, classify,
results), best of N runs after one warm-up run, as wall time and as the CPU
time the process used (user + system: steadier than wall time on a machine
shared with other work); the Python side also reports the `classify` call alone. Needs the wheel installed in the running Python
(scripts/test-python.sh does that) and the release binary.

    python bench/python_overhead.py [--binary target/release/verdict] [--prompts 10000] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

WORDS = ("great service friendly staff slow delivery cold food loved the coffee broke again "
         "never coming back excellent value terrible update works fine").split()

PYTHON_SIDE = """
import sys, time, json
t0 = time.perf_counter()
from verdict import LLM
llm = LLM(device="cpu")
prompts = open(sys.argv[1], encoding="utf-8").read().splitlines()
t1 = time.perf_counter()
out = llm.classify(prompts, use_tqdm=False)
t2 = time.perf_counter()
assert len(out) == len(prompts)
print(json.dumps({"total": t2 - t0, "classify": t2 - t1}))
"""


def make_prompts(n: int) -> list[str]:
    import random

    rng = random.Random(13)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str]) -> tuple[dict, str]:
    cpu = children_cpu()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return {"process": time.perf_counter() - started, "cpu": children_cpu() - cpu}, done.stdout


def time_python(path: str) -> dict:
    result, stdout = timed([sys.executable, "-c", PYTHON_SIDE, path])
    result.update(json.loads(stdout))
    return result


def time_cli(command: list[str], path: str) -> dict:
    result, _ = timed(
        [*command, "classify", "--device", "cpu", "--no-progress", "--input", path, "--output", os.devnull]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default="target/release/verdict", help="the release `verdict` binary")
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()

    wheel_command = os.path.join(os.path.dirname(sys.executable), "verdict")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prompts.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(make_prompts(args.prompts)) + "\n")
        sides = {
            "LLM.classify (python)": lambda: time_python(path),
            "verdict classify (binary)": lambda: time_cli([args.binary], path),
            "verdict classify (wheel)": lambda: time_cli([wheel_command], path),
        }
        results: dict[str, list[dict]] = {name: [] for name in sides}
        for name, run in sides.items():
            run()  # warm-up: page cache, CPU frequency
        for _ in range(args.runs):
            for name, run in sides.items():  # interleaved, so drift hits every side alike
                results[name].append(run())
    print(f"{args.prompts} prompts, best of {args.runs} after a warm-up, default model on the CPU")
    base = {key: min(r[key] for r in results["verdict classify (binary)"]) for key in ("process", "cpu")}
    for name, runs in results.items():
        wall = min(r["process"] for r in runs)
        cpu = min(r["cpu"] for r in runs)
        extra = f"  (classify call alone {min(r['classify'] for r in runs):.2f} s wall)" if "classify" in runs[0] else ""
        print(
            f"  {name:28s} wall {wall:7.2f} s {100 * (wall / base['process'] - 1):+6.1f}%   "
            f"cpu {cpu:7.2f} s {100 * (cpu / base['cpu'] - 1):+6.1f}%{extra}"
        )
        print("  " + " " * 28 + " runs: " + ", ".join(f"{r['process']:.2f}/{r['cpu']:.2f}" for r in runs))


if __name__ == "__main__":
    main()
