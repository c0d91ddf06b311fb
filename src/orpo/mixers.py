"""Token mixers outside attention, told where each sequence of a packed row starts.

A packed, prefix-shared row ``[prompt, chosen, rejected, prompt, ...]`` is exact through attention
because block attention reads the row's :class:`~orpo.data.batching.Layout`. A layer that mixes tokens
some other way must be told the same thing, or it reads the previous pair's last tokens (and a rejected
completion reads the chosen one's). This module does that for the short causal depthwise convolution
of LFM2 (``Lfm2ShortConv``; LFM2-MoE's and LFM3's are the same code): every token of the row gets its
*logical predecessor*, the previous token of its own sequence (for the first token of a further
completion under prefix sharing, the prompt's last token; none at a sequence's first token or in
padding), and the convolution of width k is

    y[t] = bias + sum_{s=0..k-1} w[k-1-s] * x[pred^s(t)]       (x[none] = 0)

computed with k - 1 gathers instead of ``conv1d``. That is the stock ``conv1d`` with its k - 1 zeros of
left padding exactly, applied to each sequence alone; the gathers carry the gradient back into the
prompt that both completions continue from.

The patch is installed on the module class (:func:`install`) and changes nothing unless the call
carries the layout (``orpo_layout``, which only orpo's packed forward passes): generation, a cache, the
stock forward the start-up check compares with, all run the model's own code. Whether the patched layer
gives the model's own numbers is not assumed: ``orpo.support`` proves it at start-up, like the
attention paths.

Mamba-2 (``seq_idx``) and gated-delta (``cu_seqlens``) layers are not patched: docs/models.md says why.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

LAYOUT = "orpo_layout"  # the keyword orpo's packed forward passes down every layer
_ORIGINAL = "_orpo_original_forward"
# classes whose forward is transformers' LFM2 short convolution: in_proj -> B*x -> causal depthwise
# conv1d -> C*y -> out_proj (modeling_lfm2.py, modeling_lfm2_moe.py, modeling_lfm3.py)
SHORT_CONV = ("Lfm2ShortConv", "Lfm2MoeShortConv", "Lfm3ShortConv")
SHORT_CONV_WORDS = "a short convolution"

# Layer kinds and model types whose layers mix tokens outside attention (orpo.support skips the packed
# paths of those this module does not tell where sequences start).
_MIXER_LAYERS = {"conv": "a short convolution", "mamba": "Mamba (SSM) layers",
                 "linear_attention": "linear attention"}
_MIXER_MODELS = {"lfm2": "a short convolution", "lfm2_moe": "a short convolution", "lfm3": "a short convolution",
                 "granitemoehybrid": "Mamba (SSM) layers", "jamba": "Mamba (SSM) layers",
                 "falcon_h1": "Mamba (SSM) layers", "nemotron_h": "Mamba (SSM) layers", "bamba": "Mamba (SSM) layers",
                 "zamba": "Mamba (SSM) layers", "zamba2": "Mamba (SSM) layers", "mamba": "Mamba (SSM) layers",
                 "mamba2": "Mamba (SSM) layers", "falcon_mamba": "Mamba (SSM) layers",
                 "qwen3_next": "linear attention", "qwen3_5": "linear attention", "qwen3_5_text": "linear attention",
                 "qwen3_5_moe": "linear attention", "olmo_hybrid": "linear attention", "rwkv": "RWKV recurrences",
                 "recurrent_gemma": "recurrent layers", "minimax": "linear attention"}


def token_mixer(config) -> str | None:
    """What, besides attention, mixes tokens in this model's layers, if a name says so. The model type
    is asked first: transformers labels Jamba's and Granite-4.0-H's Mamba layers "linear_attention" in
    ``layer_types``, which would name the wrong mechanism in the line the user reads."""
    known = _MIXER_MODELS.get(getattr(config, "model_type", ""))
    if known is not None:
        return known
    for t in getattr(config, "layer_types", None) or []:
        for kind, words in _MIXER_LAYERS.items():
            if kind in str(t):
                return words
    return None


def _is_short_conv(module: nn.Module) -> bool:
    conv = getattr(module, "conv", None)
    return (type(module).__name__ in SHORT_CONV and isinstance(conv, nn.Conv1d)
            and conv.groups == conv.in_channels == conv.out_channels
            and isinstance(getattr(module, "in_proj", None), nn.Module)
            and isinstance(getattr(module, "out_proj", None), nn.Module))


def short_convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _is_short_conv(m)]


def kernel_width(model: nn.Module) -> int:
    """The widest short convolution of the model (0: none): the start-up check's sequences must be
    longer, so that every window reaches across a boundary of the packed row."""
    return max((int(m.conv.kernel_size[0]) for m in short_convs(model)), default=0)


def packable(model: nn.Module, mixer: str | None) -> bool:
    """Whether the model's mixer outside attention, named ``mixer`` by :func:`token_mixer`, is
    one this module tells where sequences start (then :func:`install` makes packed rows possible)."""
    return mixer == SHORT_CONV_WORDS and bool(short_convs(model))


def install(model: nn.Module) -> bool:
    """Patch the classes of the model's short convolutions (once per class; see the module docstring).
    True if the model has any, so its packed forward must pass the layout down."""
    found = False
    for module in short_convs(model):
        cls = type(module)
        if _ORIGINAL not in vars(cls):
            original = cls.forward
            setattr(cls, _ORIGINAL, original)
            cls.forward = _short_conv_forward(original)
        found = True
    return found


def _short_conv_forward(original):
    packed = _fire_conv_hooks(_packed_short_conv)

    @functools.wraps(original)
    def forward(self, hidden_states, *args, **kwargs):
        layout = kwargs.get(LAYOUT)
        if layout is None or args or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return original(self, hidden_states, *args, **kwargs)
        return packed(self, hidden_states, layout)

    return forward


def _fire_conv_hooks(fn):
    """Accelerate's offload hooks of ``self.conv``, whose weight is read directly, as transformers'
    own forward fires them (``force_accelerate_hooks``)."""
    try:
        from transformers.integrations.accelerate import force_accelerate_hooks
    except ImportError:  # an older transformers: no such decorator, no such hooks to fire
        return fn
    return force_accelerate_hooks("conv")(fn)


def _packed_short_conv(self, hidden_states: torch.Tensor, layout) -> torch.Tensor:
    """transformers' ``Lfm2ShortConv.forward`` with its ``conv1d`` replaced by :func:`sequence_conv`, on
    (R, T, channels) instead of its transposed (R, channels, T): the same products, no transposed copies.
    The padding mask it applies first is not needed: no token has a padding position as predecessor."""
    B, C, x = self.in_proj(hidden_states).chunk(3, dim=-1)
    y = C * sequence_conv(B * x, self.conv, layout)
    return self.out_proj(y)


def sequence_conv(x: torch.Tensor, conv: nn.Conv1d, layout) -> torch.Tensor:
    """x (R, T, D) -> the causal depthwise ``conv`` (width k, its k - 1 zeros of left padding) over each
    sequence of ``layout`` alone, (R, T, D) in x's dtype. Summed in fp32 where the weight is bf16 or fp16
    (the stock ``conv1d`` accumulates in fp32 too)."""
    rows, t, dim = x.shape
    k = int(conv.kernel_size[0])
    weight = conv.weight[:, 0, :]  # (D, k)
    weight = weight.float() if weight.dtype in (torch.bfloat16, torch.float16) else weight
    flat = x.reshape(rows * t, dim).to(weight.dtype)
    padded = torch.cat((flat, flat.new_zeros(1, dim)))  # row N: the zero of a missing predecessor
    out = flat * weight[:, k - 1]
    for s, idx in enumerate(predecessor_chain(layout, t, k, x.device), start=1):
        out = out + padded.index_select(0, idx) * weight[:, k - 1 - s]
    if conv.bias is not None:
        out = out + conv.bias.to(out.dtype)
    return out.reshape(rows, t, dim).to(x.dtype)


@torch.compiler.disable  # a Python loop over the layout: compiled layers call it as it is
def predecessor_chain(layout, t: int, k: int, device) -> list[torch.Tensor]:
    """[pred^1, ..., pred^(k-1)] over the flat tokens of the layout's rows, each ``t`` long (the layout's
    length, or more where FlexAttention pads the rows), as long tensors in which N = R * t stands for
    "none" (see the module docstring). Cached on the layout (one batch, every layer)."""
    key = ("predecessors", t, k, str(device))
    cached = layout._masks.get(key)
    if cached is None:
        n = layout.rows * t
        pred = torch.full((n + 1,), n, dtype=torch.long)
        for g in layout.groups:
            base = g.row * t
            pred[base + g.start + 1 : base + g.end] = torch.arange(base + g.start, base + g.end - 1)
            for cs, _ in g.completions[1:]:  # a further completion continues from the prompt's end
                pred[base + cs] = base + g.start + g.prompt_len - 1
        cached, idx = [], torch.arange(n)
        for _ in range(k - 1):
            idx = pred[idx]
            cached.append(idx.to(device))
        layout._masks[key] = cached
    return cached
