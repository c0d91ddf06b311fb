"""Build a randomly initialised model from a config folder (config.json + tokenizer files) and save it as
safetensors. Used on machines that cannot download weights: speed and memory do not depend on the
values of the weights. ``--size 1b`` swaps in a 1.1B-parameter Llama shape (TinyLlama's) with the same
tokenizer.

    python benchmarks/make_random_model.py CONFIG_DIR OUT_DIR [--size 1b]
"""

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("config_dir")
ap.add_argument("out_dir")
ap.add_argument("--size", choices=["same", "1b"], default="same")
args = ap.parse_args()
cfg = AutoConfig.from_pretrained(args.config_dir)
if args.size == "1b":
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 2048, 5632, 22
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 32, 4, 64
    cfg.tie_word_embeddings = False
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
out = Path(args.out_dir)
model.save_pretrained(out, safe_serialization=True)
for f in Path(args.config_dir).iterdir():
    if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
        shutil.copy(f, out / f.name)
print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters (random)")
