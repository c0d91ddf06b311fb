"""orpo against TRL's ORPOTrainer on one realistic shape per kind of model, with random weights of the
published configs (speed and memory do not depend on the weights' values). Prints the path the
start-up check picks for each, and bench_trl.py's table for each.

    python benchmarks/bench_archs.py --rows 8 --max-length 1024 [--shapes qwen2.5-0.5b,gemma-3-270m,lfm2-350m]

Shapes (from the models' config.json on the hub, written out here because this machine has no network):
Qwen2.5-0.5B (plain attention), Gemma-3-270M (sliding windows of 512 on five layers in six, 262k
vocabulary), LFM2-350M (short convolutions, packed since orpo.mixers tells them where sequences start);
and, asked for by name, Qwen3.5-0.8B's text model (gated-delta layers, three in four; 248k vocabulary)
and Granite-4.0-H-350M (Mamba-2 layers, 28 of 32, NoPE attention), which run one sequence per row, and
Granite-4.0-H-Tiny (the same with 64 experts; 7B parameters, too large for a 24 GB CPU machine in fp32).
The tokenizer is SmolLM2's (its ids are all inside each model's vocabulary).
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
    # Qwen/Qwen3.5-0.8B's text_config (the checkpoint is image-text; its language model alone here)
    "qwen3.5-0.8b": dict(model_type="qwen3_5_text", vocab_size=248320, hidden_size=1024, intermediate_size=3584,
                         num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                         attn_output_gate=True, linear_num_key_heads=16, linear_num_value_heads=16,
                         linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                         full_attention_interval=4, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6,
                         rms_norm_eps=1e-6, max_position_embeddings=262144, tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25)),
    "granite-4.0-h-350m": dict(model_type="granitemoehybrid", vocab_size=100352, hidden_size=768,
                               intermediate_size=2048, shared_intermediate_size=2048, num_hidden_layers=32,
                               num_attention_heads=12, num_key_value_heads=4, num_local_experts=0,
                               num_experts_per_tok=0, mamba_n_heads=48, mamba_d_head=32, mamba_d_state=128,
                               mamba_n_groups=1, mamba_d_conv=4, mamba_conv_bias=True, mamba_proj_bias=False,
                               position_embedding_type="nope", attention_multiplier=0.015625,
                               embedding_multiplier=12.0, residual_multiplier=0.246, logits_scaling=3.0,
                               rms_norm_eps=1e-5, max_position_embeddings=32768, tie_word_embeddings=True,
                               layer_types=["mamba"] * 10 + ["attention"] + ["mamba"] * 2 + ["attention"]
                               + ["mamba"] * 3 + ["attention"] + ["mamba"] * 9 + ["attention"] + ["mamba"] * 4),
    "granite-4.0-h-tiny": dict(model_type="granitemoehybrid", vocab_size=100352, hidden_size=1536,
                               intermediate_size=512, shared_intermediate_size=1024, num_hidden_layers=40,
                               num_attention_heads=12, num_key_value_heads=4, num_local_experts=64,
                               num_experts_per_tok=6, mamba_n_heads=48, mamba_d_head=64, mamba_d_state=128,
                               mamba_n_groups=1, mamba_expand=2, mamba_d_conv=4, mamba_chunk_size=256,
                               position_embedding_type="nope", max_position_embeddings=131072,
                               tie_word_embeddings=True,
                               layer_types=["mamba"] * 5 + ["attention"] + (["mamba"] * 9 + ["attention"]) * 3
                               + ["mamba"] * 4),
}
DEFAULT = ("qwen2.5-0.5b", "gemma-3-270m", "lfm2-350m")


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
    ap.add_argument("--shapes", default=",".join(DEFAULT), help=f"comma list of: {', '.join(SHAPES)}")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hh_rlhf_conv_train.jsonl.gz"))
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "orpo" / "bench-shapes"))
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--tools", default="ours,trl", help="bench_trl.py's --tools (e.g. ours,ours-separate,trl)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                    help="both tools' precision (fp32: what --precision auto picks on a CPU without native bf16)")
    ap.add_argument("--check-only", action="store_true", help="build each shape and print its path; time nothing")
    args = ap.parse_args()
    from orpo.forward import PolicyForward  # noqa: F401  (fail early on a broken checkout)
    from orpo.model import load_model, resolve_model
    from orpo.support import decide

    tok_dir = resolve_model(None, quiet=True)
    results = {}
    unknown = [n for n in args.shapes.split(",") if n not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    for name in args.shapes.split(","):
        folder = build_shape(name, Path(args.cache) / name, tok_dir)
        t = time.time()
        paths = decide(load_model(folder), max_length=args.max_length)
        print(f"{name}: {paths.line()} [check {time.time() - t:.1f}s]", flush=True)
        if args.check_only:
            results[name] = {"paths": paths.as_dict()}
            continue
        raw = Path(args.cache) / f"{name}.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_trl.py"), "--model", str(folder),
                        "--data", args.data, "--rows", str(args.rows), "--max-length", str(args.max_length),
                        "--tools", args.tools, "--precision", args.precision, "--json", str(raw)], check=True)
        results[name] = {"paths": paths.as_dict(), **json.loads(raw.read_text())}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
