"""What the start-up check costs on the default job (SmolLM2-135M, the default LoRA recipe, the built-in
data), for one or more source trees side by side, each in its own fresh process, one after the other.

    python benchmarks/bench_check.py --src before=/path/to/old/src --src now=src --repeat 2
    python benchmarks/bench_check.py --src now=src --src now-bf16=src@bf16   # a tree at another --precision

Each child runs ``orpo.train`` on the default job for one step with ``choose_paths`` (the check: the
decision, the miniature, the synthetic pairs, the one line) wrapped in a timer, so the figure is the
check as a run pays it, in the run's own order (adapters attached or not, as that tree does it). The
first call of a process also pages the weights in; both trees pay that alike."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, tempfile
import orpo
import importlib
setup = importlib.import_module("orpo.train.setup")
real = setup.choose_paths
took = []
def timed(*a, **k):
    t = time.perf_counter()
    out = real(*a, **k)
    took.append(time.perf_counter() - t)
    return out
setup.choose_paths = timed
with tempfile.TemporaryDirectory() as d:
    extra = {"precision": sys.argv[1]} if len(sys.argv) > 1 else {}
    orpo.train(orpo.TrainConfig(output_dir=d + "/run", max_steps=1, save_steps=0, eval_samples=0, **extra))
print("RESULT " + json.dumps({"check_s": took[0], "orpo": orpo.__file__}))
"""


def run(src: str) -> dict:
    src, _, precision = src.partition("@")  # PATH@bf16: that --precision (else the tree's default)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", CHILD, *([precision] if precision else [])], env=env,
                          capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"child for {src} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", required=True, help="NAME=PATH of a src folder holding orpo/")
    ap.add_argument("--repeat", type=int, default=2, help="fresh processes per tree (interleaved)")
    args = ap.parse_args()
    trees = [s.split("=", 1) for s in args.src]
    times = {name: [] for name, _ in trees}
    for _ in range(args.repeat):
        for name, path in trees:
            r = run(path)
            times[name].append(r["check_s"])
            print(f"{name:>10}: check {r['check_s']:.2f} s  ({r['orpo']})", flush=True)
    print("\n| tree | check s (each fresh process) | best |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {', '.join(f'{t:.2f}' for t in ts)} | {min(ts):.2f} |")


if __name__ == "__main__":
    main()
