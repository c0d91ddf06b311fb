"""Which decoder layers recompute their activations in the backward pass: measured, then budgeted.

Each decoder layer keeps, for the backward pass, tensors that grow with the tokens of a micro-batch:
about 27 KiB per token per layer for SmolLM2-135M in fp32 with lean activations, so 0.8 MB per token
over its 30 layers and about 20 GB for the two 12,000-token rows of two 8,192-token pairs. A layer that
is checkpointed keeps only its inputs and runs its forward again in the backward pass. That gives the
same numbers (the same operations on the same inputs; dropout replays its random state), for one more
forward of that layer.

So the exact default checkpoints no layer while a micro-batch's activations fit a budget
(``--activation-memory``), and otherwise as few layers as bring them under it. The bytes per token are
measured on the model in hand, on the path it will train on, under the run's autocast: the live tensor
bytes the forward leaves for the backward (torch.profiler's allocation events) at two lengths, whose
difference is linear in the tokens (issue 23: no (T x T) scores anywhere), once with no layer and once
with every layer checkpointed. With ``a`` the bytes per token a plain layer keeps over a checkpointed
one, ``S`` what the model keeps per token with no layer checkpointed, and T the tokens of the largest
micro-batch, checkpointing k of n layers keeps about T * (S - k * a) and adds one layer's recompute,
T * a, while the backward passes through it: k is the smallest with T * (S - k * a + a) <= budget.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile

import numpy as np
import torch

GIB = 2**30
CPU_BUDGET = 4 * GIB  # a budget that leaves a 16 GB laptop room for weights, optimizer states and the OS


def default_budget(device: torch.device, trained: int = 0) -> int:
    """Bytes of activations a micro-batch may keep: on a GPU, half of what is free after loading once the
    ``trained`` parameters' fp32 gradients and AdamW states (12 bytes each, allocated later) are set
    aside; on the CPU 4 GiB or a quarter of the RAM, whichever is less."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int((free - 12 * trained) * 0.5)) or 1
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * GIB
    return min(CPU_BUDGET, ram // 4)


def largest_micro_batch(pairs, batch_size: int, prefix_sharing: bool, packing: bool) -> int:
    """An upper bound on the tokens one forward computes: the ``batch_size`` longest pairs, packed into one
    row (prompt once with prefix sharing, twice without), or one right-padded row per sequence."""
    if not pairs:
        return 0
    p = np.array([len(x.prompt) for x in pairs])
    c = np.array([len(x.chosen) for x in pairs])
    r = np.array([len(x.rejected) for x in pairs])
    if packing and not any(getattr(x, "images", None) for x in pairs):  # image pairs: one sequence per row
        per = p + c + r if prefix_sharing else 2 * p + c + r
        return int(np.sort(per)[-batch_size:].sum())
    longest = int(np.max(p + np.maximum(c, r)))
    return 2 * min(batch_size, len(pairs)) * longest


def _forward_kept(policy, pairs, amp) -> int:
    """Live tensor bytes that one forward through ``policy`` leaves behind (what the backward needs): on
    CUDA the allocator's count; on the CPU, which keeps none, torch.profiler's allocation events."""
    dev = next(policy.model.parameters()).device
    batch = policy.collate(pairs, prompt_in_nll=False).to(dev)

    def run():
        with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            return policy(batch)

    if dev.type == "cuda":
        before = torch.cuda.memory_allocated(dev)
        logps = run()
        return max(0, torch.cuda.memory_allocated(dev) - before)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logps = run()
    del logps
    return max(0, sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"))


@contextlib.contextmanager
def _quiet_profiler():
    """The profiler's backend writes start/stop lines straight to file descriptor 2; keep every other line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            rest = [x for x in tmp.read().decode(errors="replace").splitlines(True) if "profiler_st" not in x]
            sys.stderr.write("".join(rest))


def _pairs(vocab: int, length: int):
    from .data.templates import TokenizedPair

    rng = np.random.default_rng(0)
    ids = lambda k: rng.integers(3, vocab, k).astype(np.int32)  # noqa: E731
    return [TokenizedPair(ids(length // 2), ids(length // 2), ids(length // 2 - 4), "activation-memory")]


def measure(policy, layers, vocab: int, amp, lengths=(256, 512)) -> tuple[float, float]:
    """(S, a): bytes per token the model keeps for the backward, and the bytes per token one layer keeps
    beyond what it keeps when checkpointed (see the module docstring)."""
    small, large = (_pairs(vocab, n) for n in lengths)
    t_small = policy.collate(small, False).computed_tokens
    t_large = policy.collate(large, False).computed_tokens

    def slope() -> float:
        return (_forward_kept(policy, large, amp) - _forward_kept(policy, small, amp)) / (t_large - t_small)

    was_training = policy.model.training
    policy.model.train()  # checkpointing and lean activations act in train mode only
    try:
        plain = slope()
        set_checkpointed(layers, range(len(layers)))
        ckpt = slope()
    finally:
        set_checkpointed(layers, [])
        policy.model.train(was_training)
    return plain, max(0.0, (plain - ckpt) / len(layers))


def layers_to_checkpoint(per_token: float, per_layer: float, n_layers: int, tokens: int, budget: int) -> int:
    """The fewest layers to checkpoint so that ``tokens`` keep at most ``budget`` bytes (n if none does)."""
    if tokens * per_token <= budget or per_layer <= 0:
        return 0
    k = math.ceil((tokens * (per_token + per_layer) - budget) / (tokens * per_layer))
    return max(0, min(n_layers, k))


def checkpointable(layers) -> bool:
    """True where every layer is transformers' GradientCheckpointingLayer (it reads a per-layer flag)."""
    return bool(layers) and all(hasattr(m, "gradient_checkpointing") for m in layers)


def set_checkpointed(layers, which) -> None:
    """Checkpoint exactly the layers at indices ``which`` (non-reentrant, as ``--gradient-checkpointing``)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    which = set(which)
    for i, m in enumerate(layers):
        m.gradient_checkpointing = i in which
        if i in which:
            m._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)


def spread(k: int, n: int) -> list[int]:
    """k of n layer indices, evenly spaced (so a hybrid's layer kinds are checkpointed in proportion)."""
    if k >= n:
        return list(range(n))
    return sorted({int(i * n / k) for i in range(k)})


def rough_bytes_per_token(config, n_layers: int) -> int:
    """Twice a generous guess, (8 H + 3 I) fp32 values per layer (SmolLM2 keeps 0.93 of the guess): the
    measure runs only where this bound could exceed the budget, so short rows start at no cost."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    return 2 * n_layers * (8 * hidden + 3 * inter) * 4


def plan(policy, layers, config, amp, tokens: int, budget: int, say) -> int:
    """Measure, choose and apply: the number of layers now checkpointed. Says one line when it is not 0.
    ``config``: the language model's config (its vocabulary and widths)."""
    if budget <= 0 or not tokens or not checkpointable(layers):
        return 0
    if tokens * rough_bytes_per_token(config, len(layers)) <= budget:
        return 0
    vocab = min(int(config.vocab_size), int(policy.model.get_input_embeddings().weight.shape[0]) or 1 << 62)
    per_token, per_layer = measure(policy, layers, vocab, amp)
    k = layers_to_checkpoint(per_token, per_layer, len(layers), tokens, budget)
    if k:
        set_checkpointed(layers, spread(k, len(layers)))
        kept = tokens * (per_token - k * per_layer + per_layer)
        say(f"activation memory: {k} of {len(layers)} layers recompute in the backward pass (the largest micro-batch, "
            f"{tokens:,} tokens, would keep {tokens * per_token / GIB:.1f} GiB; now about {kept / GIB:.1f} GiB, budget "
            f"{budget / GIB:.1f} GiB: --activation-memory GB; same numbers, about {30 * k // len(layers)}% more time)")
    return k
