"""orpo against TRL's ORPOTrainer on one realistic shape per kind of model, with random weights of the
published configs (speed and memory do not depend on the weights' values). Prints the path the
start-up check picks for each, and bench_trl.py's table for each.

    python benchmarks/bench_archs.py --rows 8 --max-length 1024 [--shapes qwen2.5-0.5b,gemma-3-270m,lfm2-350m]

Shapes (from the models' config.json on the hub, written out here because this machine has no network):
Qwen2.5-0.5B (plain attention), Gemma-3-270M (sliding windows of 512 on five layers in six, 262k
vocabulary), LFM2-350M (short convolutions: one sequence per row). The tokenizer is SmolLM2's (its ids
are all inside each model's vocabulary).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "gemma-3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                         num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                         sliding_window=512, query_pre_attn_scalar=256, max_position_embeddings=32768,
                         layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, tie_word_embeddings=True),
    "lfm2-350m": dict(model_type="lfm2", vocab_size=65536, hidden_size=1024, intermediate_size=6656,
                      num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8, conv_L_cache=3,
                      block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=1.0, block_multiple_of=256,
                      layer_types=["conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv", "conv",
                                   "full_attention", "conv", "full_attention", "conv", "full_attention", "conv",
                                   "full_attention", "conv"], tie_word_embeddings=True),
}


def build_shape(name: str, out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    spec = dict(SHAPES[name])
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = AutoConfig.for_model(spec.pop("model_type"), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters (random) in {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hh_rlhf_conv_train.jsonl.gz"))
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "orpo" / "bench-shapes"))
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    from orpo.forward import PolicyForward  # noqa: F401  (fail early on a broken checkout)
    from orpo.model import load_model, resolve_model
    from orpo.support import decide

    tok_dir = resolve_model(None, quiet=True)
    results = {}
    for name in args.shapes.split(","):
        folder = build_shape(name, Path(args.cache) / name, tok_dir)
        t = time.time()
        paths = decide(load_model(folder), max_length=args.max_length)
        print(f"{name}: {paths.line()} [check {time.time() - t:.1f}s]", flush=True)
        raw = Path(args.cache) / f"{name}.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_trl.py"), "--model", str(folder),
                        "--data", args.data, "--rows", str(args.rows), "--max-length", str(args.max_length),
                        "--tools", "ours,trl", "--json", str(raw)], check=True)
        results[name] = {"paths": paths.as_dict(), **json.loads(raw.read_text())}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
