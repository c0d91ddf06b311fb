r"""The ORPO objective (Hong, Lee & Thorne 2024, arXiv 2403.07691) as pure tensor code. Imports only torch.

For a pair (x, y_w, y_l) the paper defines, with P(y|x) the *length-normalised* likelihood

    log P(y|x)      = (1/|y|) \sum_t log p(y_t | x, y_<t)                                 (mean over completion tokens)
    log odds(y|x)   = log P(y|x) - log(1 - P(y|x))                                          (eq. 4)
    L_OR            = -log \sigma( log odds(y_w|x) - log odds(y_l|x) )                       (eq. 7)
    L_ORPO          = E[ L_SFT + \lambda L_OR ]                                              (eq. 6)

``log(1 - P)`` is computed as ``log1mexp(log P)`` (Maechler 2012), never as ``log(1 - exp(.))``.

Averaging. Over one optimizer step (every micro-batch of every process), the NLL is the mean over all
NLL tokens of the step and L_OR the mean over all pairs of the step:

    L = (\sum_{NLL tokens} -log p) / N_tokens  +  beta * (\sum_{pairs} L_OR) / N_pairs

Each micro-batch contributes its own sums divided by the *step's* totals, so the gradients of the
micro-batches add up to exactly the gradient of one big batch (token-weighted NLL), whatever the split.

Token kinds in the flat per-token tensors (see ``orpo.data.batching``):
    KIND_PROMPT = 0   a prompt token of the chosen sequence (enters the NLL only with prompt_in_nll)
    KIND_CHOSEN = 1   a chosen-completion token
    KIND_REJECTED = 2 a rejected-completion token
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KIND_PROMPT, KIND_CHOSEN, KIND_REJECTED = 0, 1, 2
LN2 = math.log(2.0)
# log P is clamped to at most this. A completion the model is certain of (every token at probability 1
# in fp32) has log P == 0 exactly, where log odds is +inf and its gradient NaN; the clamp keeps the
# loss finite and costs nothing anywhere a real model lives (it needs P > 0.999999).
LOGP_MAX = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate over the whole range (Maechler 2012).

    ``log1p(-exp(x))`` for x < -ln 2, ``log(-expm1(x))`` otherwise. Each branch is evaluated only on
    inputs from its own domain, so the branch ``torch.where`` discards cannot put inf or NaN into the
    gradient.
    """
    far = x < -LN2
    x_far = torch.where(far, x, torch.full_like(x, -1.0))
    x_near = torch.where(far, torch.full_like(x, -0.5), x)
    return torch.where(far, torch.log1p(-torch.exp(x_far)), torch.log(-torch.expm1(x_near)))


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """``log P - log(1 - P)`` from ``log P`` (shape kept), with ``log P`` clamped to ``LOGP_MAX``."""
    logp = logp.clamp(max=LOGP_MAX)
    return logp - log1mexp(logp)


def odds_ratio_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ``L_OR`` (B,) and the log odds ratio ``log odds(y_w) - log odds(y_l)`` (B,).

    Inputs are the mean per-token log-probs (B,) of the chosen and rejected completions.
    """
    ratio = log_odds(chosen_logp) - log_odds(rejected_logp)
    return -F.logsigmoid(ratio), ratio


def sequence_logps(
    token_logps: torch.Tensor, pair_index: torch.Tensor, kind: torch.Tensor, n_pairs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean log-prob of each pair's chosen and rejected completion: two (n_pairs,) tensors.

    token_logps (N,) fp32, pair_index (N,) in [0, n_pairs), kind (N,) in {0, 1, 2}.
    """
    out = []
    for k in (KIND_CHOSEN, KIND_REJECTED):
        sel = kind == k
        idx = pair_index[sel]
        sums = token_logps.new_zeros(n_pairs).index_add(0, idx, token_logps[sel])
        counts = torch.bincount(idx, minlength=n_pairs).to(token_logps.dtype)
        out.append(sums / counts.clamp(min=1))
    return out[0], out[1]


@dataclass
class ORPOLoss:
    """What one micro-batch contributes. ``loss`` carries the gradient; the rest are detached sums over
    the micro-batch's pairs (or NLL tokens), to be added across micro-batches and processes and divided
    by the step's totals for logging."""

    loss: torch.Tensor
    nll_sum: torch.Tensor  # sum of -log p over NLL tokens
    nll_tokens: torch.Tensor  # number of NLL tokens
    or_sum: torch.Tensor  # sum of L_OR over pairs
    pair_sums: dict[str, torch.Tensor]  # sums over pairs of the per-pair metrics (TRL's names)
    aux_sum: torch.Tensor | None = None  # the MoE router loss term in ``loss`` times the pairs (orpo.router)


def orpo_loss(
    token_logps: torch.Tensor,
    pair_index: torch.Tensor,
    kind: torch.Tensor,
    n_pairs: int,
    beta: float,
    prompt_in_nll: bool,
    nll_norm: float,
    pair_norm: float,
) -> ORPOLoss:
    """The ORPO loss of one micro-batch, normalised by the optimizer step's totals.

    Args:
        token_logps: (N,) log p of each scored target token, fp32.
        pair_index: (N,) which pair of the micro-batch each token belongs to.
        kind: (N,) KIND_PROMPT / KIND_CHOSEN / KIND_REJECTED.
        n_pairs: pairs in the micro-batch (B).
        beta: weight of L_OR (the paper's lambda; TRL's ``beta``).
        prompt_in_nll: whether KIND_PROMPT tokens enter the NLL.
        nll_norm: NLL tokens in the whole optimizer step (all micro-batches and processes).
        pair_norm: pairs in the whole optimizer step.
    """
    chosen_logp, rejected_logp = sequence_logps(token_logps, pair_index, kind, n_pairs)
    or_loss, ratio = odds_ratio_loss(chosen_logp, rejected_logp)

    nll_mask = (kind == KIND_CHOSEN) | ((kind == KIND_PROMPT) if prompt_in_nll else torch.zeros_like(kind, dtype=torch.bool))
    nll_sum = -(token_logps * nll_mask).sum()
    loss = nll_sum / nll_norm + beta * or_loss.sum() / pair_norm

    with torch.no_grad():
        # TRL's metric conventions: rewards are beta * mean log-probs; ``log_odds_ratio`` is the mean of
        # log sigmoid(ratio) (that is, -L_OR) and ``log_odds_chosen`` the mean of the ratio itself.
        pair_sums = {
            "logps/chosen": chosen_logp.sum(),
            "logps/rejected": rejected_logp.sum(),
            "rewards/chosen": beta * chosen_logp.sum(),
            "rewards/rejected": beta * rejected_logp.sum(),
            "rewards/margins": beta * (chosen_logp - rejected_logp).sum(),
            "rewards/accuracies": (chosen_logp > rejected_logp).float().sum(),
            "log_odds_ratio": (-or_loss).sum(),
            "log_odds_chosen": ratio.sum(),
        }
    return ORPOLoss(
        loss=loss,
        nll_sum=nll_sum.detach(),
        nll_tokens=nll_mask.sum().to(token_logps.dtype),
        or_sum=or_loss.detach().sum(),
        pair_sums=pair_sums,
    )


# ------------------------------------------------------------------------------------------------
# Log-probs of target tokens straight from hidden states, chunked over tokens.


def auto_chunk(vocab_size: int, budget_bytes: int = 256 * 2**20) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay within ``budget_bytes``."""
    return max(16, budget_bytes // (4 * vocab_size))


class _ChunkedLinearLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] for N tokens, never holding more than ``chunk`` rows of logits.

    The forward keeps only the per-token logsumexp; the backward recomputes each chunk's logits. This
    costs one extra (chunk x H x V) matmul per chunk and saves the (N, V) fp32 logits and their
    gradient, which for long sequences are the biggest tensors of the whole step. Liger-Kernel chunks
    over the batch, so one long sequence still builds T x V; this chunks over tokens.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, compute_dtype):
        n = hidden.shape[0]
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax dtype: fp32, or fp64 for fp64 inputs
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        out = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        for s in range(0, n, chunk):
            logits = F.linear(h[s : s + chunk], w, b).to(acc)
            lse_c = torch.logsumexp(logits, dim=-1)
            lse[s : s + chunk] = lse_c
            out[s : s + chunk] = logits.gather(1, targets[s : s + chunk, None]).squeeze(1) - lse_c
        ctx.save_for_backward(h, w, b, targets, lse)
        ctx.chunk = chunk
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, w, b, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        acc = lse.dtype
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=acc, device=w.device) if need_b else None
        grad_out = grad_out.to(acc)
        for s in range(0, h.shape[0], chunk):
            hc = h[s : s + chunk]
            g = grad_out[s : s + chunk]
            logits = F.linear(hc, w, b).to(acc)
            # d logp_t / d logits = onehot(target) - softmax; scaled by the incoming gradient.
            grad_logits = torch.exp(logits - lse[s : s + chunk, None]).mul_(-g[:, None])
            grad_logits.scatter_add_(1, targets[s : s + chunk, None], g[:, None])
            gl = grad_logits.to(h.dtype)
            if need_h:
                grad_h[s : s + chunk] = gl @ w
            if need_w:
                grad_w += (gl.t() @ hc).to(acc)
            if need_b:
                grad_b += grad_logits.sum(0)
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (
            grad_h.to(h_dtype) if need_h else None,
            grad_w.to(w_dtype) if need_w else None,
            grad_b.to(b_dtype) if need_b else None,
            None,
            None,
            None,
        )


def linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """Log-probability (N,) of ``targets`` (N,) (fp32; fp64 for fp64 inputs) under ``softmax(hidden @ weight.T + bias)``.

    hidden (N, H), weight (V, H), bias (V,) or None. Under autocast the matmuls run in the autocast
    dtype, like the model's own lm-head would; the softmax is always fp32.
    """
    if chunk <= 0:
        chunk = auto_chunk(weight.shape[0])
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearLogps.apply(hidden, weight, bias, targets, chunk, compute_dtype)


def reference_linear_logps(hidden, weight, targets, bias=None) -> torch.Tensor:
    """The plain, memory-hungry version of :func:`linear_logps`, for tests."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


# ------------------------------------------------------------------------------------------------
# Turning summed contributions into TRL-named metrics.

PAIR_METRICS = (
    "logps/chosen",
    "logps/rejected",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "log_odds_ratio",
    "log_odds_chosen",
)


METRIC_SIZE = 4 + len(PAIR_METRICS) + 1


def metric_vector(part: ORPOLoss, n_pairs: int) -> torch.Tensor:
    """A flat fp64 vector of METRIC_SIZE sums [nll_sum, nll_tokens, or_sum, n_pairs, *PAIR_METRICS,
    aux_sum]. Vectors add across micro-batches, and across processes with one all-reduce."""
    vals = [part.nll_sum, part.nll_tokens, part.or_sum, torch.tensor(float(n_pairs), device=part.nll_sum.device)]
    vals += [part.pair_sums[k] for k in PAIR_METRICS]
    vals.append(part.aux_sum if part.aux_sum is not None else torch.zeros((), device=part.nll_sum.device))
    # Stays on the device: the caller reads it back once per optimizer step, not once per micro-batch.
    return torch.stack([v.detach().double().reshape(()) for v in vals])


def summarize(vec: torch.Tensor, beta: float) -> dict[str, float]:
    """Means from a summed :func:`metric_vector`: the NLL per token, everything else per pair.
    ``loss`` is the step's objective, NLL + beta * mean L_OR (+ the MoE router loss term, which is also
    ``router_aux_loss``, where the model has it on)."""
    v = vec.tolist()
    nll_sum, nll_tokens, or_sum, n_pairs = v[:4]
    nll = nll_sum / max(nll_tokens, 1.0)
    aux = v[4 + len(PAIR_METRICS)] / max(n_pairs, 1.0)
    out = {"loss": nll + beta * or_sum / max(n_pairs, 1.0) + aux, "nll_loss": nll}
    for k, s in zip(PAIR_METRICS, v[4:]):
        out[k] = s / max(n_pairs, 1.0)
    if aux:
        out["router_aux_loss"] = aux
    return out
