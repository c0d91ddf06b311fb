"""The MoE router's auxiliary (load-balancing) loss, added where the model's config turns it on, as TRL's
ORPOTrainer adds it: ``loss += router_aux_loss_coef * aux_loss`` when ``config.output_router_logits``.

TRL's ``aux_loss`` is the model's own ``load_balancing_loss_func`` over its padded batch of 2B
sequences (prompt+chosen, prompt+rejected), padding masked out. Per layer l and token t the router
gives probabilities p_{l,t} (softmax of its logits) and a top-k choice; with f_e the share of top-k
slots and P_e the mean probability of expert e over all (layer, token) pairs,

    aux = E * sum_e f_e * P_e.

It is not a sum over tokens, so it depends on which tokens the router sees. A prefix-shared row holds a
pair's prompt once where TRL's batch holds it twice, and a packed row has no padding. Both f_e and P_e
are means over tokens, so giving each position a weight equal to the number of TRL's sequences that
hold it (a shared prompt 2, a completion 1, padding 0) gives TRL's means exactly: a prompt token's
router logits are the same in both of TRL's sequences (causal attention; the start-up check proves the
layout gives the model's own hidden states). The weights go in as the ``attention_mask`` of the model's
own function, which weighs each position by it. FlexAttention's tile padding gets weight 0.

The router logits are taken by forward hooks on the modules the model itself records them from
(``_can_record_outputs["router_logits"]``), only while :meth:`RouterLoss.recording` is open (not in
the start-up check, the evaluation, or a checkpointed layer's recomputation).
"""

from __future__ import annotations

import contextlib
import sys

import torch

from .errors import UserError
from .model import base_causal_lm


def router_loss_coef(model) -> float | None:
    """``router_aux_loss_coef`` where the config turns the router loss on (TRL's test:
    ``output_router_logits``); None where it is off or its coefficient is 0 (nothing to add)."""
    config = base_causal_lm(model).config
    if not getattr(config, "output_router_logits", False):
        return None
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    return coef or None


def token_weights(layout, length: int, device) -> torch.Tensor:
    """(rows, length) float: how many of TRL's sequences hold each position of the batch (a group's
    prompt: one per completion that follows it; a completion: 1; padding, FlexAttention's tile
    padding included: 0)."""
    w = torch.zeros(layout.rows, length, dtype=torch.float32)
    for g in layout.groups:
        w[g.row, g.start : g.start + g.prompt_len] = len(g.completions)
        for s, n in g.completions:
            w[g.row, s : s + n] = 1.0
    return w.to(device)


def _recorders(lm):
    """(target class or None, class-name suffix or None, layer name or None, output index) for each
    way the model records its router logits, as transformers' OutputRecorder describes it."""
    specs = getattr(lm, "_can_record_outputs", None) or {}
    specs = specs.get("router_logits")
    out = []
    for s in specs if isinstance(specs, list) else [specs] if specs is not None else []:
        if isinstance(s, str):
            out.append((None, s, None, 1))
        elif isinstance(s, type):
            out.append((s, None, None, 1))
        else:
            out.append((getattr(s, "target_class", None), getattr(s, "class_name", None),
                        getattr(s, "layer_name", None), getattr(s, "index", 0)))
    return out


class RouterLoss:
    """Hooks on the model's routers; ``loss(batch)`` after a recorded forward gives ``aux`` (a 0-d
    tensor with its gradient to the router weights)."""

    def __init__(self, model, coef: float):
        lm = base_causal_lm(model)
        self.coef = coef
        self.balance = getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)
        cfg = lm.config
        self.num_experts = getattr(lm, "num_experts", None) or getattr(cfg, "num_local_experts", None) \
            or getattr(cfg, "num_experts", None)
        self.top_k = getattr(lm, "num_experts_per_tok", None) or getattr(cfg, "num_experts_per_tok", None)
        self._on, self._logits, self._handles = False, [], []
        for name, module in lm.named_modules():
            for cls, suffix, layer, index in _recorders(lm):
                if not ((cls is not None and isinstance(module, cls)) or (suffix and name.endswith(suffix))):
                    continue
                if layer is not None and f".{layer.strip('.')}." not in f".{name}.":
                    continue
                self._handles.append(module.register_forward_hook(self._hook(index)))
                break
        if self.balance is None or not self._handles or not self.num_experts or not self.top_k:
            self.close()
            raise UserError(
                f"this model's config turns on the MoE router loss (output_router_logits, router_aux_loss_coef "
                f"{coef:g}) but orpo cannot find its routers or their loss ({type(lm).__name__}); set "
                "output_router_logits to false in the model's config.json to train without it"
            )

    def _hook(self, index):
        def hook(module, args, output):
            if self._on:
                self._logits.append(output[index] if isinstance(output, tuple) else output)

        return hook

    @contextlib.contextmanager
    def recording(self):
        self._on, self._logits = True, []
        try:
            yield
        finally:
            self._on = False

    def loss(self, batch) -> torch.Tensor:
        """``aux`` of the recorded forward over ``batch``: the model's own load-balancing loss with each
        position weighted by :func:`token_weights`."""
        logits, self._logits = tuple(self._logits), []
        rows = batch.layout.rows
        length = logits[0].shape[0] // rows  # FlexAttention pads each row to its tile
        weights = token_weights(batch.layout, length, logits[0].device)
        return self.balance(logits, self.num_experts, self.top_k, weights)

    def add(self, part, batch, pair_norm: float):
        """``part`` (an :class:`orpo.loss.ORPOLoss`) with ``coef * aux`` added, weighted by this
        micro-batch's share of the step's pairs (TRL: the mean over micro-batches of equal size)."""
        aux = self.coef * self.loss(batch).float()
        part.loss = part.loss + aux * (batch.n_pairs / pair_norm)
        part.aux_sum = aux.detach() * batch.n_pairs
        return part

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
