"""Profile orpo's training step (forward, loss, backward, clip, AdamW) on the current device.

    python benchmarks/profile_step.py MODEL_DIR DATA [--rows 32] [--attention auto|blocks|flex|mask] [--steps 8]
    python benchmarks/profile_step.py MODEL_DIR DATA --vs-dense    # orpo's step against the dense one

``--vs-dense`` alternates orpo's steps with plain forward+backward+AdamW steps of a second copy of the
model (full-vocabulary cross-entropy) on rows of exactly orpo's packed lengths, in one process, so the
machine's drift hits both alike; bench_trl.py's dense ceiling runs in another process at another time.
"""

import argparse
import time
from pathlib import Path

import torch

from orpo.data.prepare import prepare_pairs
from orpo.forward import PolicyForward
from orpo.support import decide
from orpo.loss import orpo_loss
from orpo.lean import lean_activations
from orpo.model import load_model, load_tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("data")
ap.add_argument("--rows", type=int, default=32)
ap.add_argument("--attention", default="auto")
ap.add_argument("--steps", type=int, default=8)
ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--profile", action="store_true")
ap.add_argument("--compile", action="store_true")
ap.add_argument("--no-lean", action="store_true", help="without lean activations (on by default on CPU)")
ap.add_argument("--vs-dense", action="store_true")
args = ap.parse_args()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
tok = load_tokenizer(Path(args.model))
store, _, _ = prepare_pairs(args.data, tok, 1024, max_rows=args.rows)
model = load_model(Path(args.model)).to(dev)
model.train()
if args.compile:
    from orpo.model import compile_layers

    compile_layers(model)
elif dev.type == "cpu" and not args.no_lean:
    lean_activations(model)
policy = PolicyForward(model, decide(model, args.attention, device=dev))
opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)


def step(i):
    pairs = [store[(i * args.batch + j) % len(store)] for j in range(args.batch)]
    b = policy.collate(pairs, False).to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        lp = policy(b)
    out = orpo_loss(lp, b.pair, b.kind, b.n_pairs, 0.1, False, float((b.kind == 1).sum()), float(b.n_pairs))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return b.computed_tokens


if args.vs_dense:
    from bench_trl import dense_step as make_dense_step

    dense_step = make_dense_step(args.model, dev.type, clip=1.0)  # clipped like orpo's step above

    spent = {"orpo": 0.0, "dense": 0.0}
    for i in range(2 + args.steps):
        t = time.perf_counter(); n = step(i); sync(); dt_orpo = time.perf_counter() - t
        t = time.perf_counter(); dense_step(n); sync(); dt_dense = time.perf_counter() - t
        if i >= 2:  # the first two of each are warm-up
            spent["orpo"] += dt_orpo
            spent["dense"] += dt_dense
    print(f"{args.steps} steps each: orpo {spent['orpo']:.2f} s, dense {spent['dense']:.2f} s; "
          f"orpo runs at {spent['dense'] / spent['orpo']:.0%} of the dense speed on the same tokens")
    raise SystemExit

for i in range(3):
    t = time.time(); step(i); sync(); print(f"warm-up step {i}: {time.time() - t:.3f}s", flush=True)
t = time.time(); n = 0
for i in range(args.steps):
    n += step(i + 3)
sync()
dt = time.time() - t
print(f"{args.attention}: {dt / args.steps * 1000:.1f} ms/step, {n / dt:.0f} computed tokens/s")
if args.profile:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(3):
            step(i + 20)
        sync()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
