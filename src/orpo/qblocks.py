"""One block of :mod:`orpo.attention` without a (Q, K) mask or score matrix kept in memory.

A block (see ``attention._row_attention``) is queries at the *logical* positions ``offset .. offset+Q-1``
(``offset`` 0 for a prompt with its first completion, P for a further completion) over keys at the logical
positions ``0 .. K-1`` (the prompt, then the completion): query ``t`` sees key ``j`` iff ``j <= t`` and,
with a sliding window ``W``, ``j > t - W`` (transformers' rule). Three ways, the first that applies:

1. ``offset == 0``, no window, the model's plain SDPA: one ``is_causal`` call, as before (flash kernels
   build no mask).
2. ``offset > 0``, no window, plain SDPA on the CPU: the keys split into the prompt (fully visible) and
   the completion (causal, square). Two calls of torch's CPU flash kernel, with no mask, merged exactly
   by their log-sum-exps: ``o = (e^{l1} o1 + e^{l2} o2) / (e^{l1} + e^{l2})``. The backward runs the
   kernel's own backward on each half with the merged output and log-sum-exp (in flash attention the
   softmax is recomputed as ``exp(s - lse)`` and ``D = rowsum(dO * O)``, both global, so each half's
   gradient is exact) and adds the two query gradients. Nothing of size Q x K exists at any time.
3. Otherwise (a window, soft-capping or sinks through the model's eager function, a GPU): query blocks.
   Each block of ``B`` queries sees exactly its keys ``[lo, hi)`` (every key it may see, so its softmax is
   exact), with a mask of ``B x (hi - lo)`` built for it alone, through the model's own attention call.
   Under autograd each block is checkpointed (non-reentrant): the backward keeps its inputs, views of
   q, k and v, and recomputes the block's scores, so at most one block's scores live at a time.

Memory is then linear in the tokens; the arithmetic of every query row is the one the model's attention
does over the same keys. ``orpo.support`` still proves the path on the model at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORE_BUDGET = 1 << 24  # scores (heads x queries x keys) of one query block: 64 MB in fp32
MIN_BLOCK = 64


@dataclass(frozen=True)
class Causal:
    """Which keys a block's queries see: causal from logical position ``offset``, optionally windowed
    (``j > t - window``) or chunked (``j // chunk == t // chunk``, Llama-4's local attention)."""

    offset: int
    window: int | None = None
    chunk: int | None = None

    def keys(self, a: int, b: int, k_len: int) -> tuple[int, int]:
        """The keys ``[lo, hi)`` that queries ``a .. b-1`` of the block may see."""
        hi = min(k_len, self.offset + b)
        lo = 0 if self.window is None else max(0, self.offset + a - self.window + 1)
        if self.chunk is not None:
            lo = max(lo, (self.offset + a) // self.chunk * self.chunk)
        return lo, hi

    def mask(self, a: int, b: int, lo: int, hi: int, device) -> torch.Tensor:
        """Bool ``(b - a, hi - lo)``: True where query ``a + r`` sees key ``lo + m``."""
        t = torch.arange(self.offset + a, self.offset + b, device=device)[:, None]
        j = torch.arange(lo, hi, device=device)[None, :]
        m = j <= t
        if self.window is not None:
            m &= j > t - self.window
        if self.chunk is not None:
            m &= j // self.chunk == t // self.chunk
        return m


def _flash_cpu():
    ops = torch.ops.aten
    fwd = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    return (fwd, bwd) if fwd is not None and bwd is not None else None


class _PrefixThenCausal(torch.autograd.Function):
    """q (1, H, C, D) over [prefix (1, KV, P, D); own (1, KV, C, D)]: the prefix fully visible, the own keys
    causally. Two CPU flash calls merged by log-sum-exp (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, kp, vp, kc, vc, scale):
        fwd, _ = _flash_cpu()
        o1, l1 = fwd(q, kp, vp, 0.0, False, scale=scale)
        o2, l2 = fwd(q, kc, vc, 0.0, True, scale=scale)
        lse = torch.logaddexp(l1, l2)  # (1, H, C) fp32
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        out = (o1.to(acc) * (l1 - lse).exp_().unsqueeze(-1).to(acc)).add_(
            o2.to(acc) * (l2 - lse).exp_().unsqueeze(-1).to(acc))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, kp, vp, kc, vc, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        _, bwd = _flash_cpu()
        q, kp, vp, kc, vc, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq1, dkp, dvp = bwd(dout, q, kp, vp, out, lse, 0.0, False, scale=ctx.scale)
        dq2, dkc, dvc = bwd(dout, q, kc, vc, out, lse, 0.0, True, scale=ctx.scale)
        return dq1 + dq2, dkp, dvp, dkc, dvc, None


def _autocast(q, k, v):
    """The dtype the model's SDPA would run in under autocast (it is on autocast's lower-precision list)."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return q.to(dt), k.to(dt), v.to(dt)
    return q, k.to(q.dtype), v.to(q.dtype)


def block_size(heads: int, q_len: int, k_len: int) -> int:
    """Queries per block: heads x block x keys scores within ``SCORE_BUDGET``."""
    return max(MIN_BLOCK, min(q_len, SCORE_BUDGET // max(1, heads * k_len)))


def attend(spec: Causal, q, k, v, call, direct: bool, dropout: float = 0.0, scale: float | None = None,
           block: int | None = None):
    """q (1, H, Q, D), k/v (1, KV, K, D) -> (1, H, Q, D), for a block described by ``spec``.

    call(q, k, v, mask): the model's own attention on a sub-block (mask (Q', K') bool, or None: causal
    from position 0). direct: ``call`` is plain SDPA (no soft-cap, sinks or bias). dropout, scale: what
    ``call`` uses (scale None: 1/sqrt(D)). block: queries per block (default: :func:`block_size`).
    """
    q_len, k_len = q.shape[2], k.shape[2]
    if direct and spec.window is None and spec.chunk is None:
        if spec.offset == 0 and q_len == k_len:
            return call(q, k, v, None)
        if (q.device.type == "cpu" and dropout == 0.0 and spec.offset == k_len - q_len and _flash_cpu() is not None):
            q, k, v = _autocast(q, k, v)
            p = spec.offset
            return _PrefixThenCausal.apply(q, k[:, :, :p], v[:, :, :p], k[:, :, p:], v[:, :, p:], scale)
    span = min((x for x in (spec.window, spec.chunk) if x), default=None)
    step = block or block_size(q.shape[1], q_len, min(k_len, (span or k_len) + q_len))
    if block is None and span is not None:
        # a block of B queries under a window W needs B + W keys: B ~ W keeps its mask and scores
        # O(T W) in all, where one block of the whole row (which a small model's budget allows) is O(T^2)
        step = min(step, max(MIN_BLOCK, span))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for a in range(0, q_len, step):
        b = min(q_len, a + step)
        lo, hi = spec.keys(a, b, k_len)

        def one(qq, kk, vv, a=a, b=b, lo=lo, hi=hi):
            return call(qq, kk, vv, spec.mask(a, b, lo, hi, qq.device))

        args = (q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi])
        if grad:
            from torch.utils.checkpoint import checkpoint

            outs.append(checkpoint(one, *args, use_reentrant=False))
        else:
            outs.append(one(*args))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
