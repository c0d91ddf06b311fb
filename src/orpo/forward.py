"""One forward pass of the policy over a batch, returning the log-prob of every scored token.

``PolicyForward`` wraps the (possibly peft) model in one module whose ``forward`` does everything the
loss needs, so Accelerate can wrap *it* in DDP/FSDP and their hooks see the whole computation. Which
way it runs is a :class:`orpo.support.Paths`, decided for the model in hand by ``orpo.support``:

- attention "blocks" / "flex" / "mask": a packed, prefix-shared row through block attention, one
  FlexAttention kernel, or a dense 4D mask given to the model's own attention;
  "separate": one sequence per right-padded row through the model's own forward and its own mask;
- head "linear": the final hidden states of the scored positions only, log-probs chunk by chunk from
  the lm-head weight (no (T, V) logits tensor), with the model's logit scale folded in;
  "module": the model's head module chunk by chunk, then its scale and soft-cap;
  "model": the model's whole forward with ``logits_to_keep``, whatever its head does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import attention, mixers
from .data.batching import Batch, collate
from .loss import linear_logps
from .model import base_causal_lm
from .multimodal import language_decoder, text_config


@dataclass
class Paths:
    """How a run computes its log-probs (see the module docstring), and why: decided by ``orpo.support``."""

    attention: str = "separate"
    prefix_sharing: bool = False
    packing: bool = False
    head: str = "model"
    reason: str = ""
    rejected: dict = field(default_factory=dict)  # candidate -> why it was not used
    recomputed_layers: int = 0  # decoder layers checkpointed to fit --activation-memory (orpo.recompute)
    images: str = ""  # image pairs: how they run (orpo.image_forward); empty without image pairs

    @property
    def name(self) -> str:
        return f"{self.attention}/{self.head}"

    def line(self) -> str:
        """The one line a run prints about its path."""
        images = f"; image pairs: one sequence per row, {self.images}" if self.images else ""
        if self.attention == "separate":
            return f"fallback: one sequence per row, {_head_words(self.head)} ({self.reason}){images}"
        parts = [self.attention] + [w for w, on in (("prefix sharing", self.prefix_sharing),
                                                      ("packing", self.packing)) if on]
        return f"attention: {' + '.join(parts)}; {_head_words(self.head)} ({self.reason}){images}"

    def as_dict(self) -> dict:
        return asdict(self)


def _head_words(head: str) -> str:
    return {"linear": "chunked lm-head", "module": "the model's head chunk by chunk",
            "model": "the model's own head"}[head]


def resolve_attention(name: str, device: torch.device) -> str:
    """The first attention mode to try: 'auto' is FlexAttention on CUDA and per-block SDPA elsewhere."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "blocks"
    if name == "flex" and device.type != "cuda":
        from .errors import UserError

        raise UserError("--attention flex needs a CUDA GPU (FlexAttention has no CPU backward); use blocks or auto")
    return name


def head_transform(config) -> tuple[float, float | None]:
    """(scale, soft-cap) the model applies to its lm-head output: Cohere multiplies by ``logit_scale``,
    Granite divides by ``logits_scaling``, Gemma-2 soft-caps with ``final_logit_softcapping``."""
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    return scale, getattr(config, "final_logit_softcapping", None) or None


def layer_spans(config) -> dict | tuple:
    """What each layer may see: {layer type: (window, chunk)}, or one (window, chunk) for every layer
    (see :func:`orpo.attention.config_spans`). The dense mask carries one mask per layer type, and
    FlexAttention one BlockMask per distinct (window, chunk)."""
    return attention.config_spans(config)


def row_limit(config) -> int | None:
    """The longest row a fast layout may build for this model (None: any). Llama-4 scales the queries of
    its NoPE layers by 1 + attn_scale * log1p(floor((i + 1) / floor_scale)), with i the token's *index in
    the row*, not its position id (``attn_temperature_tuning``): a token at index floor_scale - 1 or more
    of a packed or prefix-shared row gets another scale than in its own sequence. Rows up to
    floor_scale - 1 tokens (8191 in the released checkpoints) are exact."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    nope = [layer for layer, rope in enumerate(getattr(config, "no_rope_layers", None) or []) if not rope]
    if getattr(config, "attn_temperature_tuning", False) and nope and getattr(config, "floor_scale", None):
        return int(config.floor_scale) - 1
    return None


class PolicyForward(nn.Module):
    """``forward(batch) -> (N,) fp32 log p of batch.target``, the way ``paths`` says.

    paths: a checked :class:`orpo.support.Paths`, or just an attention mode name (tests and benchmarks:
    prefix sharing and packing on, the head picked from its type alone, nothing checked).
    chunk: tokens per lm-head chunk (0: automatic).
    images: an :class:`orpo.image_forward.ImagePath` where the data holds image pairs: a micro-batch with
    one runs one sequence per row through it (text-only micro-batches keep ``paths``).
    """

    def __init__(self, model: nn.Module, paths="blocks", chunk: int = 0, images=None):
        super().__init__()
        lm = base_causal_lm(model)
        config = text_config(lm.config)  # an image-text model's language model reads its text config
        if isinstance(paths, str):
            head = lm.get_output_embeddings()
            plain = type(head) is nn.Linear and head_transform(config)[1] is None
            paths = Paths(paths, True, True, "linear" if plain else "module", reason="unchecked")
        self.model = model
        self.paths = paths
        self.chunk = chunk
        self.images = images
        if paths.attention in ("blocks", "flex"):
            attention.enable(config)
        else:
            attention.disable(config)
        self.scale, self.softcap = head_transform(config)
        self.spans = layer_spans(config)  # the dense mask: one per layer type
        self.flex_spans = attention.model_spans(config)  # FlexAttention: one BlockMask per (window, chunk)
        self.row_limit = row_limit(config)
        # short convolutions told where each sequence of a packed row starts (orpo.mixers): the layout
        # goes down every layer in every packed mode, not just to block attention
        self.mixer_layout = paths.attention != "separate" and mixers.install(lm)
        # the chunked head reads the weight directly (DeepSpeed ZeRO-3 must gather it for the whole forward)
        self.plain_head = paths.head == "linear"
        self._no_split_modules = getattr(lm, "_no_split_modules", None)  # read by FSDP's auto-wrap

    def collate(self, pairs, prompt_in_nll: bool, pad_id: int = 0) -> Batch:
        """A micro-batch laid out the way this forward runs it."""
        if self.images is not None and any(p.images for p in pairs):
            return self.images.collate(pairs, prompt_in_nll, pad_id)
        share, pack = self.paths.prefix_sharing, self.paths.packing
        batch = collate(pairs, share, pack, prompt_in_nll, pad_id)
        if self.row_limit and batch.layout.length > self.row_limit and (share or pack):
            # rows too long for this model's fast layouts (see row_limit): unpacked, and if still too long
            # one sequence per row, where every token sits at the index it has in its own sequence
            batch = collate(pairs, share, False, prompt_in_nll, pad_id)
            if batch.layout.length > self.row_limit:
                batch = collate(pairs, False, False, prompt_in_nll, pad_id)
        return batch

    def forward(self, batch: Batch) -> torch.Tensor:
        lm = base_causal_lm(self.model)
        ids, src = batch.input_ids, batch.src
        kwargs = dict(input_ids=ids, position_ids=batch.position_ids, use_cache=False)
        mode = self.paths.attention
        decoder = None
        if batch.vision is not None:  # image pairs: the model's own forward, one sequence per row
            kwargs, decoder = self.images.inputs(lm, batch)
        elif mode == "flex":
            # Pad each row to a multiple of 128 (FlexAttention's tile) and move the gather indices with it.
            t = ids.shape[1]
            t_pad = -(-t // 128) * 128
            if t_pad != t:
                kwargs["input_ids"] = torch.nn.functional.pad(ids, (0, t_pad - t))
                kwargs["position_ids"] = torch.nn.functional.pad(batch.position_ids, (0, t_pad - t))
                src = (src // t) * t_pad + src % t
            kwargs["attention_mask"] = attention.placeholder_mask(batch.layout.rows, ids.device)
            kwargs["orpo_block_masks"] = attention.flex_block_masks(batch.layout, t_pad, ids.device, self.flex_spans)
        elif mode == "blocks":
            kwargs["attention_mask"] = attention.placeholder_mask(batch.layout.rows, ids.device)
            kwargs["orpo_layout"] = batch.layout
        elif mode == "mask":
            kwargs["attention_mask"] = self._dense_masks(lm, batch)
        else:  # separate: the model's own positions and mask, as TRL runs it
            del kwargs["position_ids"]
            kwargs["attention_mask"] = batch.layout.padding_mask(ids.device)
        if self.mixer_layout and mode != "separate":
            kwargs[mixers.LAYOUT] = batch.layout
        if self.paths.head == "model":
            return self._model_head_logps(lm, kwargs, src, batch.target)
        out = (decoder or language_decoder(lm))(**kwargs)
        hidden = out.last_hidden_state.flatten(0, 1).index_select(0, src)
        head = lm.get_output_embeddings()
        if self.plain_head:
            if self.scale != 1.0:  # (s h) W^T = s (h W^T): the scale rides on the hidden state
                hidden = hidden * self.scale
            return linear_logps(hidden, head.weight, batch.target, head.bias, chunk=self.chunk)
        return _module_logps(head, hidden, batch.target, self.chunk or 1024, self.scale, self.softcap)

    def _dense_masks(self, lm, batch: Batch):
        """The layout as the model's own attention expects it: bool for SDPA, additive for eager, and one
        mask per layer type where layers differ (sliding windows, attention chunks)."""
        dev = batch.input_ids.device
        additive = attention.loaded_attention(text_config(lm.config)) == "eager"

        def one(span):
            m = batch.layout.dense_mask(dev, *span)
            if additive:
                dtype = lm.get_input_embeddings().weight.dtype
                return torch.zeros(m.shape, dtype=dtype, device=dev).masked_fill_(~m, torch.finfo(dtype).min)
            return m

        if isinstance(self.spans, dict):
            return {t: one(span) for t, span in self.spans.items()}
        return one(self.spans)

    def _model_head_logps(self, lm, kwargs, src, targets):
        """The model's whole forward, logits only where a scored token is predicted (one row: exactly
        those positions; several rows: every position, then the scored ones)."""
        rows, t = kwargs["input_ids"].shape
        keep = src if rows == 1 else 0
        logits = lm(**kwargs, logits_to_keep=keep).logits
        logits = logits[0] if rows == 1 else logits.flatten(0, 1).index_select(0, src)
        return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def _module_logps(head, hidden, targets, chunk, scale=1.0, softcap=None):
    """Heads that are not a plain linear map: the model's own head module, one checkpointed chunk at a
    time (memory stays at one chunk of logits), then its scale and soft-cap."""
    from torch.utils.checkpoint import checkpoint

    def piece(h, t):
        logits = head(h).float()
        if scale != 1.0:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1)

    parts = [checkpoint(piece, hidden[s : s + chunk], targets[s : s + chunk], use_reentrant=False)
             for s in range(0, hidden.shape[0], chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
