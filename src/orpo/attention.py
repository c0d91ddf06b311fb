"""Attention that follows a batch's prompt/completion groups exactly, with no wasted work.

Registered with transformers as the attention implementation ``"orpo_blocks"``; a model switched to it
(see :func:`enable`) calls :func:`block_attention` in every layer with the batch's ``Layout``
passed through as the ``orpo_layout`` keyword. Per group it makes two kinds of call to the model's
*own* attention (the SDPA kernel it was loaded with, called directly; or its eager function, with
soft-capping or sinks):

- the prompt and its first completion, causally: ``q, k, v = x[s : s+P+C1]``;
- every further completion against the prompt and itself: ``q = x[c : c+C]``, ``k = [x_prompt; x_c]``,
  with a mask that shows the whole prompt and the completion causally.

Each layer keeps its own limits (:func:`layer_span`: its layer type's sliding window or attention chunk,
as the model builds its mask for that layer), applied in *logical* positions, the ones the completion
would have in its own sequence: query at position i sees keys j with i - W < j <= i under a window W,
and j // C == i // C under Llama-4's chunks of C. FlexAttention gets one BlockMask per (window, chunk)
and each layer picks its own.

A dense (T, T) mask over a packed row would compute every masked block too (on CPU, SDPA does not skip
them) and grows quadratically with the packed length; this computes only the blocks that are seen.
Whether the result equals the model's own forward is not assumed: ``orpo.support`` proves it on the
model at start-up.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from . import qblocks

NAME = "orpo_blocks"
INNER = "_orpo_inner_attn"  # config attribute: the implementation the model was loaded with


def config_spans(config) -> dict | tuple:
    """What each layer may see, as the model's own masks build it: ``{layer type: (window, chunk)}`` for
    configs with per-layer types (Gemma-2/3/4, gpt-oss, Qwen2, OLMo-3, EXAONE-4, Cohere-2, Llama-4),
    else one ``(window, chunk)`` for every layer (Mistral, Phi-3: the window slides on all layers).

    window: a query at logical position i sees keys j with i - window < j <= i;
    chunk: only keys of its own chunk, j // chunk == i // chunk (Llama-4's ``attention_chunk_size``);
    None: no limit. A multimodal config is read through its text config, as the decoder reads it."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    chunk = getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    if types:
        return {t: (window if "sliding" in str(t) else None, chunk if "chunked" in str(t) else None)
                for t in set(types)}
    return (window, None)


def layer_span(module, kwargs) -> tuple:
    """(window, chunk) of the layer ``module`` belongs to: its layer type's, read from the config the way
    the model picks its mask for the layer; a ``sliding_window`` the layer passes must agree with it
    (raises ValueError otherwise, so the start-up check refuses the path)."""
    spans = config_spans(module.config)
    idx = getattr(module, "layer_idx", None)
    if isinstance(spans, dict):
        types = module.config.get_text_config().layer_types if hasattr(module.config, "get_text_config") \
            else module.config.layer_types
        if idx is not None and 0 <= idx < len(types):
            span = spans[types[idx]]
        elif not any(c for _, c in spans.values()):  # no layer index: the window the layer passes
            span = (kwargs.get("sliding_window"), None)
        else:
            raise ValueError(f"{type(module).__name__} has no layer index to pick its layer type by")
    else:
        span = spans
    if "sliding_window" in kwargs and kwargs["sliding_window"] != span[0]:
        raise ValueError(f"layer {idx} passes sliding_window={kwargs['sliding_window']}, its layer type says {span[0]}")
    return span


def model_spans(config) -> set:
    """Every distinct (window, chunk) the model's layers use: one FlexAttention BlockMask is built for each."""
    spans = config_spans(config)
    return set(spans.values()) if isinstance(spans, dict) else {spans}


_COMPILED = {}


def _compiled(name: str, fn, device):
    """``fn`` compiled once on CUDA with dynamic shapes, so packed rows of new lengths reuse the kernel;
    as it is elsewhere (the CPU runs FlexAttention's forward only, in tests: its unfused reference)."""
    if torch.device(device).type != "cuda":
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def flex_block_masks(layout, length: int, device, spans) -> dict:
    """The layout as one FlexAttention BlockMask per (window, chunk) in ``spans``, over rows padded to
    ``length``: one fused kernel per layer that skips every fully masked 128x128 tile. Built by a
    compiled ``create_block_mask`` on CUDA. Windows and chunks are in logical positions, the ones each
    token has in its own sequence (a completion's continue its prompt's)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = torch.full((layout.rows, length), -1, dtype=torch.int32)
    blk = torch.zeros((layout.rows, length), dtype=torch.int32)
    pos = torch.zeros((layout.rows, length), dtype=torch.int32)
    for gid, g in enumerate(layout.groups):
        seg[g.row, g.start : g.end] = gid
        pos[g.row, g.start : g.start + g.prompt_len] = torch.arange(g.prompt_len, dtype=torch.int32)
        for k, (cs, n) in enumerate(g.completions, start=1):
            blk[g.row, cs : cs + n] = k
            pos[g.row, cs : cs + n] = g.prompt_len + torch.arange(n, dtype=torch.int32)
    seg, blk, pos = seg.to(device), blk.to(device), pos.to(device)
    on_cuda = torch.device(device).type == "cuda"

    def mask_for(w: int, c: int):
        def mask_mod(b, h, q, kv):
            same = (seg[b, q] == seg[b, kv]) & (kv <= q) & ((blk[b, kv] == 0) | (blk[b, kv] == blk[b, q]))
            return same & (pos[b, kv] > pos[b, q] - w) & (pos[b, kv] // c == pos[b, q] // c)

        return mask_mod

    out = {}
    for window, chunk in spans:
        mask_mod = mask_for(window if window is not None else 1 << 30, chunk if chunk is not None else 1 << 30)
        out[(window, chunk)] = create_block_mask(mask_mod, B=layout.rows, H=None, Q_LEN=length, KV_LEN=length,
                                                 device=device, _compile=on_cuda)
    return out


def _flex(module, query, key, value, block_mask, dropout, scaling, kwargs):
    """One FlexAttention call: query (B, H, T, D), key/value (B, KV, T, D) -> (B, H, T, D). The layer's
    soft-cap (Gemma-2) goes through ``score_mod``: s -> c tanh(s / c), as its eager function computes it.
    Its sinks (gpt-oss: one logit per head that joins every softmax and is then dropped) rescale the
    output: softmax over [scores, sink] = softmax(scores) * e^lse / (e^lse + e^sink), lse the kernel's
    log-sum-exp of the scores, so out * sigmoid(lse - sink). What flex cannot express raises."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    if dropout and module.training:
        raise ValueError("FlexAttention has no attention dropout")
    if kwargs.get("position_bias") is not None:
        raise ValueError("FlexAttention here takes no position bias")
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    score_mod = None
    if softcap:
        def score_mod(score, b, h, q, kv):
            return softcap * torch.tanh(score / softcap)
    flex = _compiled("flex", flex_attention, query.device)
    gqa = query.shape[1] != key.shape[1]
    if sinks is None:
        return flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    out, aux = flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=gqa,
                    return_aux=AuxRequest(lse=True))
    keep = torch.sigmoid(aux.lse.float() - sinks.float()[None, :, None])  # (B, H, T)
    return (out.float() * keep[..., None]).to(query.dtype)


def inner_attention(module, config):
    """The attention function the model was loaded with: transformers' registered one, or the model
    file's own ``eager_attention_forward`` (where soft-capping and sinks live)."""
    name = getattr(config, INNER, None) or "sdpa"
    if name == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn, True
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward, False
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name], False


@torch.compiler.disable  # data-dependent loops over the layout: compiled layers call it as it is
def block_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """query (B, H, T, D), key/value (B, KV, T, D) -> (B, T, H, D), as transformers expects."""
    block_masks = kwargs.pop("orpo_block_masks", None)
    layout = kwargs.pop("orpo_layout", None)
    if block_masks is not None:  # FlexAttention: the BlockMask of this layer's window and chunk
        span = layer_span(module, kwargs)
        if span not in block_masks:
            raise ValueError(f"no block mask for window/chunk {span}")
        out = _flex(module, query, key, value, block_masks[span], dropout, scaling, kwargs)
        return out.transpose(1, 2).contiguous(), None
    fn, additive = inner_attention(module, module.config)
    if layout is None:  # generation, or a forward outside orpo: the model's own attention, as loaded
        return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    window, chunk = layer_span(module, kwargs)
    gqa = query.shape[1] != key.shape[1]
    p_drop = dropout if module.training else 0.0
    # Plain SDPA (Llama and most families): call the kernel directly, with GQA and is_causal, as
    # transformers' SDPA wrapper would (it repeats K/V whenever a mask is given; this need not).
    direct = fn is _sdpa() and not kwargs.get("softcap") and kwargs.get("position_bias") is None

    def attend(q, k, v, mask):
        """q (1, H, Q, D), k/v (1, KV, K, D), mask (Q, K) bool or None (causal) -> (1, H, Q, D)."""
        if direct:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p_drop,
                                                  scale=scaling, enable_gqa=gqa)
        if mask is None:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril_()
        mask = mask[None, None]  # (1, 1, Q, K), as transformers' attention functions expect
        if additive:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
        return fn(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)[0].transpose(1, 2)

    def attend_causal(q, k, v, spec):  # orpo.qblocks: the block without a (Q, K) mask or scores kept
        return qblocks.attend(spec, q, k, v, attend, direct, p_drop, scaling)

    rows = [_row_attention(query[r : r + 1], key[r : r + 1], value[r : r + 1], groups, layout, window, chunk,
                           attend_causal)
            for r, groups in enumerate(layout.by_row())]
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _row_attention(q, k, v, groups, layout, window, chunk, attend):
    """One row: q (1, H, T, D), k/v (1, KV, T, D) -> (1, H, T, D).

    The row is cut once with ``split`` into its pieces (queries: prompt+first completion, then each
    further completion; keys/values: prompt, then each completion), so the backward pass stitches the
    gradients back with one concatenation instead of zero-filling a full-size tensor for every slice.
    """
    t = q.shape[2]
    q_sizes, kv_sizes, plan = [], [], []
    cursor = 0
    for g in groups:
        if g.start > cursor:  # padding between groups: no queries attend to it
            q_sizes.append(g.start - cursor)
            kv_sizes.append(g.start - cursor)
            plan.append(None)
        lens = [n for _, n in g.completions]
        q_sizes += [g.prompt_len + lens[0]] + lens[1:]
        kv_sizes += [g.prompt_len] + lens
        plan.append((g.prompt_len, lens))
        cursor = g.end
    if cursor < t:
        q_sizes.append(t - cursor)
        kv_sizes.append(t - cursor)
        plan.append(None)
    qs, ks, vs = q.split(q_sizes, dim=2), k.split(kv_sizes, dim=2), v.split(kv_sizes, dim=2)
    out, qi, ki = [], 0, 0
    for item in plan:
        if item is None:
            out.append(qs[qi].new_zeros(qs[qi].shape))
            qi, ki = qi + 1, ki + 1
            continue
        p, lens = item
        kp, vp = ks[ki], vs[ki]
        for j, n in enumerate(lens, start=1):
            # the first completion runs with the prompt as queries too: plain causal attention over both;
            # every further one sees the whole prompt, then itself causally
            first = j == 1
            w = window if window is not None and p + n > window else None  # only where the block is longer
            c = chunk if chunk is not None and p + n > chunk else None
            # queries from logical position 0 (prompt + first completion) or p; keys 0..p+n-1 (orpo.qblocks)
            spec = qblocks.Causal(0 if first else p, w, c)
            out.append(attend(qs[qi + j - 1], torch.cat((kp, ks[ki + j]), dim=2),
                              torch.cat((vp, vs[ki + j]), dim=2), spec))
        qi += len(lens)
        ki += 1 + len(lens)
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def _mask_fn(**kwargs):
    """The mask transformers builds when no layout is given: the inner implementation's own kind."""
    from transformers.masking_utils import eager_mask, sdpa_mask

    inner = getattr(kwargs.get("config"), INNER, None)
    return (eager_mask if inner == "eager" else sdpa_mask)(**kwargs)


def register() -> None:
    """Make ``"orpo_blocks"`` known to transformers. Without a layout (generation, say) it is the model's
    own attention with its own masks, so a model can stay switched to it for a whole run."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, block_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask_fn)


def enable(config) -> None:
    """Switch a model config to block attention. It stays switched: gradient checkpointing recomputes
    the forward inside the backward pass, which must see the same attention."""
    register()
    if config._attn_implementation != NAME:
        setattr(config, INNER, config._attn_implementation)
        config._attn_implementation = NAME


def disable(config) -> None:
    """Back to the implementation the model was loaded with."""
    inner = getattr(config, INNER, None)
    if config._attn_implementation == NAME and inner:
        config._attn_implementation = inner


def loaded_attention(config) -> str:
    """The implementation the model was loaded with, whether or not it is switched now."""
    return getattr(config, INNER, None) if config._attn_implementation == NAME else config._attn_implementation


def placeholder_mask(rows: int, device) -> torch.Tensor:
    """A 4D stand-in passed as ``attention_mask``: transformers returns 4D masks as they are, so no
    (T, T) mask is built for a packed row; :func:`block_attention` ignores it."""
    return torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=device)
