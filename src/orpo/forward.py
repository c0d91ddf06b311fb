"""One forward pass of the policy over a packed batch, returning the log-prob of every scored token.

``PolicyForward`` wraps the (possibly peft) model in one module whose ``forward`` does everything the
loss needs, so Accelerate can wrap *it* in DDP/FSDP and their hooks see the whole computation. It runs
the decoder to the final hidden states, gathers only the positions that predict a scored token, and
computes their log-probs chunk by chunk from the lm-head weight, so no (T, V) logits tensor exists.
"""

from __future__ import annotations

import torch
from torch import nn

from . import attention
from .data.batching import Batch
from .loss import linear_logps
from .model import base_causal_lm


def resolve_attention(name: str, device: torch.device) -> str:
    """The attention mode to use: 'auto' is FlexAttention on CUDA and per-block SDPA elsewhere."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "blocks"
    if name == "flex" and device.type != "cuda":
        from .errors import UserError

        raise UserError("--attention flex needs a CUDA GPU (FlexAttention has no CPU backward); use blocks or auto")
    return name


class PolicyForward(nn.Module):
    """``forward(batch) -> (N,) fp32 log p of batch.target``.

    attention: "blocks" (per-group SDPA, see ``orpo.attention``), "flex" (one FlexAttention kernel with a
    block mask; CUDA only) or "mask" (a dense 4D bool mask given to the model's own attention).
    chunk: tokens per lm-head chunk (0: automatic).
    """

    def __init__(self, model: nn.Module, attention_mode: str = "blocks", chunk: int = 0):
        super().__init__()
        self.model = model
        self.attention_mode = attention_mode
        self.chunk = chunk
        lm = base_causal_lm(model)
        head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // lm.config.num_attention_heads
        if attention_mode == "flex" and head_dim < 16:
            self.attention_mode = attention_mode = "blocks"  # FlexAttention's kernels need head_dim >= 16
        if attention_mode in ("blocks", "flex"):
            attention.enable(lm.config)
        head = lm.get_output_embeddings()
        # Our chunked head needs a plain linear lm-head; anything else (logit softcapping, scaling,
        # a wrapped head) goes through the module itself.
        softcap = getattr(lm.config, "final_logit_softcapping", None) or getattr(lm.config, "logit_scale", None)
        self.plain_head = isinstance(head, nn.Linear) and type(head) is nn.Linear and not softcap
        # FSDP's auto-wrap reads which blocks must not be split from the top module it is given.
        self._no_split_modules = getattr(lm, "_no_split_modules", None)

    def forward(self, batch: Batch) -> torch.Tensor:
        lm = base_causal_lm(self.model)
        decoder = lm.get_decoder()
        kwargs = {}
        ids, pos, src = batch.input_ids, batch.position_ids, batch.src
        if self.attention_mode == "flex":
            # Pad each row to a multiple of 128 (FlexAttention's tile) and move the gather indices with it.
            t = ids.shape[1]
            t_pad = -(-t // 128) * 128
            if t_pad != t:
                ids = torch.nn.functional.pad(ids, (0, t_pad - t))
                pos = torch.nn.functional.pad(pos, (0, t_pad - t))
                src = (src // t) * t_pad + src % t
            mask = attention.placeholder_mask(batch.layout.rows, ids.device)
            kwargs["orpo_block_mask"] = attention.flex_block_mask(batch.layout, t_pad, ids.device)
        elif self.attention_mode == "blocks":
            mask = attention.placeholder_mask(batch.layout.rows, ids.device)
            kwargs["orpo_layout"] = batch.layout
        else:
            mask = batch.layout.dense_mask(ids.device)
        out = decoder(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False, **kwargs)
        hidden = out.last_hidden_state.flatten(0, 1).index_select(0, src)
        head = lm.get_output_embeddings()
        if self.plain_head:
            return linear_logps(hidden, head.weight, batch.target, head.bias, chunk=self.chunk)
        return _module_logps(lm, head, hidden, batch.target, self.chunk or 1024)


def _module_logps(lm, head, hidden, targets, chunk):
    """Fallback for heads that are not a plain nn.Linear: the model's own head, one checkpointed chunk
    at a time, so memory still stays at one chunk of logits."""
    from torch.utils.checkpoint import checkpoint

    softcap = getattr(lm.config, "final_logit_softcapping", None)
    scale = getattr(lm.config, "logit_scale", None)

    def piece(h, t):
        logits = head(h).float()
        if scale:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1)

    parts = [checkpoint(piece, hidden[s : s + chunk], targets[s : s + chunk], use_reentrant=False) for s in range(0, hidden.shape[0], chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
