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


class PolicyForward(nn.Module):
    """``forward(batch) -> (N,) fp32 log p of batch.target``.

    attention: "blocks" (per-group SDPA, see ``orpo.attention``) or "mask" (a dense 4D bool mask given
    to the model's own attention). chunk: tokens per lm-head chunk (0: automatic).
    """

    def __init__(self, model: nn.Module, attention_mode: str = "blocks", chunk: int = 0):
        super().__init__()
        self.model = model
        self.attention_mode = attention_mode
        self.chunk = chunk
        lm = base_causal_lm(model)
        if attention_mode == "blocks":
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
        if self.attention_mode == "blocks":
            mask = attention.placeholder_mask(batch.layout.rows, batch.input_ids.device)
            kwargs["orpo_layout"] = batch.layout
        else:
            mask = batch.layout.dense_mask(batch.input_ids.device)
        out = decoder(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=mask,
            use_cache=False,
            **kwargs,
        )
        hidden = out.last_hidden_state.flatten(0, 1).index_select(0, batch.src)
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
