"""Tiny random models of the architectures people fine-tune, built from configs (no network).

Weights are drawn at std 0.3, large enough that a token seeing what it must not moves the log-probs.
Windows and attention chunks are of a realistic size against the test rows (W = 64 against pairs of
150-300 tokens, tests/test_windows.py), in the layer patterns real checkpoints use: Gemma-3/4 five
sliding layers then one full, OLMo-3, EXAONE-4 and Cohere-2 three then one, Gemma-2 and gpt-oss
alternating, Qwen2 full below ``max_window_layers`` and sliding above, Llama-4 three chunked layers then
one global NoPE layer; Mistral, Phi-3, Starcoder2 and Mixtral slide on every layer. Hybrids get one
layer of each kind. ``build(name, window=w)`` shrinks every window and chunk to w.
"""

from __future__ import annotations

import torch

VOCAB = 400
W = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2)
_LINEAR_ATTN = dict(linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
_WINDOW_KEYS = ("sliding_window", "attention_chunk_size")

# name -> (config overrides, the attention mode `decide` must pick on CPU)
ARCHS = {
    "llama": (dict(), "blocks"),
    "qwen2": (dict(), "blocks"),
    # layer types from max_window_layers, as a checkpoint's config.json gives them: [full, full, sliding, sliding]
    "qwen2-window": (dict(_type="qwen2", use_sliding_window=True, sliding_window=W, max_window_layers=2,
                          num_hidden_layers=4), "blocks"),
    "qwen3": (dict(head_dim=16), "blocks"),
    "gemma": (dict(head_dim=16), "blocks"),
    "gemma2": (dict(head_dim=16, sliding_window=W, attn_logit_softcapping=50.0, final_logit_softcapping=30.0), "blocks"),
    "gemma3": (dict(_type="gemma3_text", head_dim=16, sliding_window=W, num_hidden_layers=6), "blocks"),  # 5:1
    "gemma4": (dict(_type="gemma4_text", sliding_window=W, num_hidden_layers=6), "blocks"),  # 5:1
    "mistral": (dict(sliding_window=W), "blocks"),
    "phi": (dict(_drop=("num_key_value_heads",)), "blocks"),
    "phi3": (dict(sliding_window=W), "blocks"),
    "gpt_neox": (dict(_drop=("num_key_value_heads",)), "blocks"),
    "opt": (dict(), "blocks"),
    "gpt2": (dict(), "blocks"),
    "olmo2": (dict(), "blocks"),
    "smollm3": (dict(), "blocks"),
    "starcoder2": (dict(sliding_window=W), "blocks"),
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=W), "blocks"),
    "qwen2_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32), "blocks"),
    "cohere": (dict(logit_scale=0.5), "blocks"),
    "granite": (dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                     attention_multiplier=0.3), "blocks"),
    "gpt_oss": (dict(sliding_window=W, num_local_experts=4, num_experts_per_tok=2, head_dim=16), "blocks"),
    "olmo3": (dict(sliding_window=W, num_hidden_layers=4), "blocks"),  # 3:1
    "exaone4": (dict(sliding_window=W, num_hidden_layers=4), "blocks"),  # 3:1
    "cohere2": (dict(sliding_window=W, num_hidden_layers=4), "blocks"),  # 3:1
    "llama4": (dict(_type="llama4_text", attention_chunk_size=W, num_hidden_layers=4, head_dim=16,
                    intermediate_size_mlp=96, num_local_experts=2, num_experts_per_tok=1), "blocks"),  # 3:1
    "bloom": (dict(), "separate"),  # ALiBi from the 2D mask: a packed row cannot carry it
    # LFM2's short convolution is told where each sequence starts (orpo.mixers): packed like attention
    "lfm2": (dict(layer_types=["conv", "full_attention"]), "blocks"),
    "lfm2_moe": (dict(layer_types=["conv", "full_attention"], num_dense_layers=1, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32), "blocks"),
    "lfm3": (dict(layer_types=["conv", "full_attention"]), "blocks"),
    "qwen3_5": (dict(_type="qwen3_5_text", layer_types=["linear_attention", "full_attention"], head_dim=16,
                     **_LINEAR_ATTN), "separate"),
    "qwen3_next": (dict(layer_types=["linear_attention", "full_attention"], head_dim=16, num_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                        **_LINEAR_ATTN), "separate"),
    "granitemoehybrid": (dict(layer_types=["mamba", "attention"], logits_scaling=2.0, mamba_d_state=8, mamba_n_heads=4,
                              mamba_d_head=32, mamba_chunk_size=16), "separate"),
    "jamba": (dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                   num_experts=2), "separate"),
    "falcon_h1": (dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16,
                       mamba_n_groups=1), "separate"),
}


def config(name: str, window: int | None = None):
    """The config of architecture ``name`` (a key of ARCHS); ``window`` replaces every window and chunk."""
    import transformers
    from transformers import AutoConfig

    transformers.logging.set_verbosity_error()
    spec = dict(ARCHS[name][0])
    model_type = spec.pop("_type", name.split("-")[0])
    drop = spec.pop("_drop", ())
    kwargs = {k: v for k, v in COMMON.items() if k not in drop}
    kwargs.update(spec)
    if window is not None:
        kwargs.update({k: window for k in _WINDOW_KEYS if k in kwargs})
    return AutoConfig.for_model(model_type, **kwargs)


def build(name: str, seed: int = 0, std: float = 0.3, window: int | None = None):
    """A tiny random fp32 model of architecture ``name`` (a key of ARCHS), loaded the way orpo loads
    models (SDPA where transformers has it, else eager); ``window`` replaces every window and chunk."""
    from transformers import AutoModelForCausalLM

    cfg = config(name, window)
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    except ValueError:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, std)
    return model


def stock_logps(model, pairs):
    """Each sequence alone through the model's own forward: per-token log-probs, chosen then rejected."""
    import numpy as np

    out = []
    for p in pairs:
        for comp in (p.chosen, p.rejected):
            seq = torch.tensor(np.concatenate((p.prompt, comp)).astype(np.int64))[None]
            logp = torch.log_softmax(model(input_ids=seq, use_cache=False).logits[0].float(), -1)
            out.append(logp[len(p.prompt) - 1 : -1].gather(1, seq[0, len(p.prompt):, None])[:, 0])
    return torch.cat(out)
