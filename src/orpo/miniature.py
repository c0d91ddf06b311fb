"""A miniature of the model in hand, for the start-up proof at full window lengths.

The proof (``orpo.support``) must run pairs longer than every sliding window or attention chunk that
``--max-length`` can exceed: 600 tokens for Gemma-3's window of 512, say. On the real model that is a
slow forward (and impossible before sharding when the model is larger than one device), so it runs on a
miniature instead: the model's own config class and config, with

- the layers cut to the first few that hold every layer type in its pattern (Gemma-3: five sliding, one
  global), every per-layer list of the config cut with them;
- a small width (at most 2 KV heads, the same GQA grouping up to 2, head dim 16), a small vocabulary,
  at most 4 experts;
- random weights at std 0.3 (a token that sees what it must not moves the log-probs visibly);
- the run's adapter config (peft), with random ``lora_B`` so the adapters change the forward.

Everything that decides which tokens meet (the attention code, its masks, windows, chunks, soft-caps,
sinks, positions, the head's transform) comes from the same classes and config values; only sizes and
weights differ. A config that cannot be shrunk this way raises, and the caller checks the real model.
"""

from __future__ import annotations

import copy

import torch

from .attention import loaded_attention
from .model import base_causal_lm

VOCAB = 512
HEAD_DIM = 16
STD = 0.3

# sizes set outright where the config has them (MLA ranks and head dims, MLP and expert widths)
_SIZES = {"intermediate_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
          "ffn_hidden_size": 64, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
          "qk_rope_head_dim": 16, "v_head_dim": 16, "global_head_dim": HEAD_DIM}
_CAPS = {"num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
         "n_shared_experts": 1, "topk_group": 1, "n_group": 1}


def attention_spans(config) -> dict[str, int | None]:
    """{layer type: how many positions back a token sees (its sliding window or attention chunk), or None
    where it sees the whole prefix}. Configs without ``layer_types`` give one entry, "all"."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None) or getattr(cfg, "window_size", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    chunk = getattr(cfg, "attention_chunk_size", None)
    types = getattr(cfg, "layer_types", None) or getattr(cfg, "attention_layers", None)
    if types:
        return {t: window if ("sliding" in t or "local" in t) else chunk if "chunk" in t else None for t in set(types)}
    spans = [s for s in (window, chunk) if s]
    return {"all": min(spans) if spans else None}


def longest_reachable_span(config, max_length: int) -> int | None:
    """The longest window or chunk that a sequence of ``max_length`` tokens can exceed (None: none can).
    Pairs longer than it exceed every shorter one too."""
    spans = [s for s in attention_spans(config).values() if s and s < max_length]
    return max(spans) if spans else None


def _layers_needed(types, total: int) -> int:
    """The first layers that hold every layer type and its pattern (at least two)."""
    if not types:
        return min(total, 2)
    last_new = max(list(types).index(t) for t in set(types))
    return min(total, max(2, last_new + 1))


def shrink_config(config):
    """A copy of ``config`` cut to a miniature (see the module docstring); the text config of a composite
    config is returned alone (its CausalLM class is the text model: the vision tower plays no part)."""
    cfg = copy.deepcopy(config.get_text_config() if hasattr(config, "get_text_config") else config)
    total = int(cfg.num_hidden_layers)
    n = _layers_needed(getattr(cfg, "layer_types", None), total)
    for name, value in list(vars(cfg).items()):
        if "rope" in name or not isinstance(value, (list, tuple)):
            continue
        if len(value) == total:  # one entry per layer
            setattr(cfg, name, type(value)(value[:n]))
        elif "layer" in name and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            setattr(cfg, name, type(value)(v for v in value if v < n))  # layer indices
    cfg.num_hidden_layers = n
    names = getattr(cfg, "attribute_map", {}) or {}  # GPT-2: n_head for num_attention_heads, ...
    stored = vars(cfg)  # read past per-layer attributes (Gemma-4's head_dim raises on the config)
    own = {**stored, **{k: stored[v] for k, v in names.items() if v in stored}}
    heads = int(own["num_attention_heads"])
    kv = int(own.get("num_key_value_heads") or heads)
    new_kv = min(kv, 2)
    new_heads = new_kv * min(max(heads // kv, 1), 2)
    cfg.num_attention_heads = new_heads
    if own.get("num_key_value_heads") is not None:
        cfg.num_key_value_heads = new_kv
    sizes = dict(_SIZES, head_dim=HEAD_DIM, hidden_size=new_heads * HEAD_DIM, vocab_size_per_layer_input=VOCAB,
                 hidden_size_per_layer_input=HEAD_DIM)
    for name, value in sizes.items():
        if isinstance(own.get(name), int):
            setattr(cfg, name, value)
    for name, cap in _CAPS.items():
        if isinstance(own.get(name), int):
            setattr(cfg, name, min(own[name], cap))
    spec = own.get("_heterogeneity_spec")
    if spec is not None:  # per-layer values: the layers kept, sizes shrunk (twice the base: still unlike it)
        spec.per_layer_overrides = {i: {k: (2 * sizes[k] if k in sizes and isinstance(v, int) else v)
                                        for k, v in o.items()}
                                    for i, o in spec.per_layer_overrides.items() if i < n}
    cfg.vocab_size = min(int(cfg.vocab_size), VOCAB)
    for name, value in list(vars(cfg).items()):  # special tokens beyond the small vocabulary
        if name.endswith(("token_id", "token_index")) and isinstance(value, int) and value >= cfg.vocab_size:
            setattr(cfg, name, None)
        elif name.endswith("token_id") and isinstance(value, list):
            setattr(cfg, name, [v for v in value if v < cfg.vocab_size] or None)
    return cfg


def build(model, device, seed: int = 0):
    """The miniature of ``model`` (a CausalLM, or a peft model around one) in fp32 on ``device``, in
    train mode, with the same attention implementation and adapter config. The global random state is
    left as it was (the run's seed decides its own initialisation and data order)."""
    from transformers import AutoModelForCausalLM

    lm = base_causal_lm(model)
    cfg = shrink_config(lm.config)
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        kwargs = dict(dtype=torch.float32, attn_implementation=loaded_attention(lm.config))
        if cfg is lm.config or type(cfg) is type(lm.config):
            mini = type(lm)._from_config(cfg, **kwargs)
        else:
            mini = AutoModelForCausalLM.from_config(cfg, **kwargs)
        mini.config.use_cache = False
        with torch.no_grad():
            for p in mini.parameters():
                if p.ndim >= 2:
                    p.normal_(0, STD)
        peft_config = getattr(model, "peft_config", None)
        if peft_config:
            from peft import get_peft_model

            adapter = copy.deepcopy(peft_config[getattr(model, "active_adapter", "default")])
            mini = get_peft_model(mini, adapter)
            with torch.no_grad():
                for name, p in mini.named_parameters():
                    if "lora_B" in name or "lora_embedding_B" in name:
                        p.normal_(0, STD)
    return mini.to(device).train()


def cast_like(mini, model, weights=None):
    """``mini`` with each weight in the dtype the run trains its counterpart in (same parameter name in
    ``model``; ``weights`` where the run casts them all, --bf16-weights): bf16 or fp16 base weights,
    fp32 adapters where peft keeps them so. Quantized (4-bit) weights become their compute dtype, bf16."""
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    floats = [d for d in dtypes.values() if d.is_floating_point]
    common = max(set(floats), key=floats.count) if floats else torch.float32
    with torch.no_grad():
        for name, p in mini.named_parameters():
            dtype = weights or dtypes.get(name, common)
            if not dtype.is_floating_point:
                dtype = torch.bfloat16
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
    return mini
