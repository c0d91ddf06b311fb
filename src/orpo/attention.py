"""Attention that follows a batch's prompt/completion groups exactly, with no wasted work.

Registered with transformers as the attention implementation ``"orpo_blocks"``; a model switched to it
(see :func:`enable`) calls :func:`block_attention` in every layer with the batch's ``Layout``
passed through as the ``orpo_layout`` keyword. Per group it runs two kinds of SDPA call:

- the prompt and its first completion, causally: ``q, k, v = x[s : s+P+C1]``;
- every further completion against the prompt and itself: ``q = x[c : c+C]``, ``k = [x_prompt; x_c]``,
  with a mask that shows the whole prompt and the completion causally.

A dense (T, T) mask over a packed row would compute every masked block too (on CPU, SDPA does not skip
them) and grows quadratically with the packed length; this computes only the blocks that are seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "orpo_blocks"


_COMPILED_FLEX = None


def _flex_attention():
    """FlexAttention compiled once, with dynamic shapes so packed rows of new lengths reuse the kernel."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


def flex_block_mask(layout, length: int, device):
    """The layout as a FlexAttention BlockMask over rows padded to ``length``: one fused kernel per layer
    that skips every fully masked 128x128 tile (GPU only: FlexAttention has no CPU backward)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = torch.full((layout.rows, length), -1, dtype=torch.int32)
    blk = torch.zeros((layout.rows, length), dtype=torch.int32)
    for gid, g in enumerate(layout.groups):
        seg[g.row, g.start : g.end] = gid
        for k, (cs, n) in enumerate(g.completions, start=1):
            blk[g.row, cs : cs + n] = k
    seg, blk = seg.to(device), blk.to(device)

    def mask_mod(b, h, q, kv):
        return (seg[b, q] == seg[b, kv]) & (kv <= q) & ((blk[b, kv] == 0) | (blk[b, kv] == blk[b, q]))

    return create_block_mask(mask_mod, B=layout.rows, H=None, Q_LEN=length, KV_LEN=length, device=device)


@torch.compiler.disable  # data-dependent loops over the layout: compiled layers call it as it is
def block_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """query (B, H, T, D), key/value (B, KV, T, D) -> (B, T, H, D), as transformers expects."""
    block_mask = kwargs.get("orpo_block_mask")
    if block_mask is not None:
        out = _flex_attention()(query, key, value, block_mask=block_mask, scale=scaling,
                                enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    layout = kwargs.get("orpo_layout")
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise RuntimeError("orpo_blocks attention does not support attention softcapping; use --attention mask")
    window = kwargs.get("sliding_window")
    gqa = query.shape[1] != key.shape[1]
    p_drop = dropout if module.training else 0.0
    rows = [
        _row_attention(query[r : r + 1], key[r : r + 1], value[r : r + 1], groups, layout, window, p_drop, scaling, gqa)
        for r, groups in enumerate(layout.by_row())
    ]
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _row_attention(q, k, v, groups, layout, window, p_drop, scaling, gqa):
    """One row: q (1, H, T, D), k/v (1, KV, T, D) -> (1, H, T, D).

    The row is cut once with ``split`` into its pieces (queries: prompt+first completion, then each
    further completion; keys/values: prompt, then each completion), so the backward pass stitches the
    gradients back with one concatenation instead of zero-filling a full-size tensor for every slice.
    """
    t = q.shape[2]
    q_sizes, kv_sizes, plan = [], [], []
    cursor = 0
    for g in groups:
        if window is not None and g.end - g.start > window:
            raise RuntimeError(
                f"a pair of {g.end - g.start} tokens exceeds the model's sliding window ({window}); "
                "use --attention mask or a smaller --max-length"
            )
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
        # prompt and first completion: plain causal attention over their concatenation
        out.append(F.scaled_dot_product_attention(
            qs[qi], torch.cat((kp, ks[ki + 1]), dim=2), torch.cat((vp, vs[ki + 1]), dim=2),
            is_causal=True, dropout_p=p_drop, scale=scaling, enable_gqa=gqa))
        # every further completion: the whole prompt, then itself causally
        for j, n in enumerate(lens[1:], start=2):
            out.append(F.scaled_dot_product_attention(
                qs[qi + j - 1], torch.cat((kp, ks[ki + j]), dim=2), torch.cat((vp, vs[ki + j]), dim=2),
                attn_mask=layout.suffix_mask(p, n, q.device), dropout_p=p_drop, scale=scaling, enable_gqa=gqa))
        qi += len(lens)
        ki += 1 + len(lens)
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def register() -> None:
    """Make ``"orpo_blocks"`` known to transformers. Without a layout (generation, say) it is plain SDPA
    with transformers' own SDPA masks, so a model can stay switched to it for a whole run."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, block_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def enable(config) -> None:
    """Switch a model config to block attention. It stays switched: gradient checkpointing recomputes
    the forward inside the backward pass, which must see the same attention."""
    register()
    config._attn_implementation = NAME


def placeholder_mask(rows: int, device) -> torch.Tensor:
    """A 4D stand-in passed as ``attention_mask``: transformers returns 4D masks as they are, so no
    (T, T) mask is built for a packed row; :func:`block_attention` ignores it."""
    return torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=device)
