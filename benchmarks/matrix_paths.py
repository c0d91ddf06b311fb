"""The path the start-up check picks on every family of tests/archs.py, with --no-lora and with the default
LoRA recipe: HF_HUB_OFFLINE=1 PYTHONPATH=tests:src python benchmarks/matrix_paths.py"""
import sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from archs import ARCHS, build
from orpo import support
from orpo.model import add_lora
rows = []
for name, (_, expect) in ARCHS.items():
    for lora in (False, True):
        torch.manual_seed(0)
        m = build(name)
        m.train()
        if lora:
            try:
                m = add_lora(m, 16, 32, 0.05, "all-linear", lambda s: None)
            except Exception as e:
                rows.append((name, "lora", f"refused: {str(e)[:60]}")); continue
        t = time.time()
        try:
            p = support.decide(m, max_length=300, precision="fp32")
            got = f"{p.attention}{'+share' if p.prefix_sharing else ''}{'+pack' if p.packing else ''}/{p.head}"
        except Exception as e:
            got = f"ERROR {type(e).__name__}: {str(e)[:80]}"
        rows.append((name, "lora" if lora else "full", got))
        print(f"{name:18s} {'lora' if lora else 'full':5s} {got}  (expected {expect}, {time.time()-t:.1f}s)", flush=True)
