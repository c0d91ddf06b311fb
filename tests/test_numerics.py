"""Numerical edges of the ORPO loss, a property test against an independent float64 reference, and the
paper's identities checked on a model's parameters (test_loss.py checks them on log-probs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orpo.data.batching import KIND_CHOSEN, KIND_PROMPT, KIND_REJECTED, collate, nll_tokens
from orpo.data.readers import normalize_row
from orpo.data.templates import TokenizedPair, TokenStats, tokenize_pairs
from orpo.forward import PolicyForward
from orpo.loss import LOGP_MAX, linear_logps, odds_ratio_loss, orpo_loss, sequence_logps

from conftest import CONV_ROWS, PLAIN_ROWS

# ------------------------------------------------------------------------------------------------
# An independent float64 reference: one pair at a time, straight from the paper's equations.


def reference_loss(x: torch.Tensor, pair: list[int], kind: list[int], n_pairs: int, beta: float, prompt_in_nll: bool,
                   nll_norm: float, pair_norm: float) -> torch.Tensor:
    """x: (N,) float64 token log-probs. L = sum(-log p over NLL tokens)/nll_norm + beta * sum(L_OR)/pair_norm,
    with log P the mean over a completion's tokens, clamped at LOGP_MAX (our documented convention)."""
    nll_idx = [i for i, k in enumerate(kind) if k == KIND_CHOSEN or (prompt_in_nll and k == KIND_PROMPT)]
    nll = -x[nll_idx].sum() / nll_norm
    total_or = x.new_zeros(())
    for j in range(n_pairs):
        logp = []
        for want in (KIND_CHOSEN, KIND_REJECTED):
            idx = [i for i in range(len(kind)) if pair[i] == j and kind[i] == want]
            logp.append(torch.clamp(x[idx].mean(), max=LOGP_MAX))
        odds = [lp - torch.log(-torch.expm1(lp)) for lp in logp]  # log(P / (1 - P))
        ratio = odds[0] - odds[1]
        total_or = total_or + torch.log1p(torch.exp(-ratio))  # -log sigmoid(ratio)
    return nll + beta * total_or / pair_norm


# A completion is either (near) certain, with every token at log p in [-1e-9, 0] so that its mean is well
# inside the clamp, or ordinary, down to the very unlikely (-30). Keeping means away from the clamp's
# edge (-1e-6) matters: d log odds / d log P = 1/(1 - P) is ~1e6 there and jumps to 0 across it.
certain_tokens = st.lists(st.floats(-1e-9, 0.0), min_size=1, max_size=6)
ordinary_tokens = st.lists(st.floats(-30.0, -1e-4), min_size=1, max_size=6)
completion = st.one_of(certain_tokens, ordinary_tokens)
pair_st = st.tuples(st.lists(st.floats(-30.0, 0.0), max_size=4), completion, completion)


@st.composite
def micro_batches(draw):
    pairs = draw(st.lists(pair_st, min_size=1, max_size=4))
    values, pair, kind = [], [], []
    for j, (prompt, chosen, rejected) in enumerate(pairs):
        for k, toks in ((KIND_PROMPT, prompt), (KIND_CHOSEN, chosen), (KIND_REJECTED, rejected)):
            values += toks
            pair += [j] * len(toks)
            kind += [k] * len(toks)
    order = draw(st.permutations(range(len(values))))  # the flat layout is arbitrary
    values, pair, kind = [values[i] for i in order], [pair[i] for i in order], [kind[i] for i in order]
    prompt_in_nll = draw(st.booleans())
    n_nll = sum(1 for k in kind if k == KIND_CHOSEN or (prompt_in_nll and k == KIND_PROMPT))
    # the step's totals are at least this micro-batch's (other micro-batches may add to them)
    nll_norm = float(n_nll * draw(st.integers(1, 3)))
    pair_norm = float(len(pairs) * draw(st.integers(1, 3)))
    beta = draw(st.floats(0.0, 2.0))
    return values, pair, kind, len(pairs), beta, prompt_in_nll, nll_norm, pair_norm


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(micro_batches())
def test_loss_and_gradient_match_float64_reference(mb):
    values, pair, kind, n_pairs, beta, prompt_in_nll, nll_norm, pair_norm = mb
    ref_x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    ref = reference_loss(ref_x, pair, kind, n_pairs, beta, prompt_in_nll, nll_norm, pair_norm)
    ref.backward()
    pair_t, kind_t = torch.tensor(pair), torch.tensor(kind)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        x = torch.tensor(values, dtype=dtype, requires_grad=True)
        out = orpo_loss(x, pair_t, kind_t, n_pairs, beta, prompt_in_nll, nll_norm, pair_norm)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
        assert abs(out.loss.item() - ref.item()) <= rtol * max(abs(ref.item()), 1e-3), dtype
        scale = ref_x.grad.abs().max().item()
        assert (x.grad.double() - ref_x.grad).abs().max().item() <= rtol * scale, dtype


# ------------------------------------------------------------------------------------------------
# Edges, end to end through the chunked lm-head: logits built so that a completion is certain or very
# unlikely, in fp32 and under bf16 autocast.

V = 8
LOGIT = {"certain": 200.0, "plain": 1.0, "unlikely": -30.0}  # target logit; every other logit is 0


def edge_batch(chosen: str, rejected: str, n_chosen: int, n_rejected: int, prompt: int = 2):
    """Hidden states (N, V) with an identity head, so logits == hidden: log p(target) is ~0 for
    "certain", ~-32 for "unlikely". One pair: prompt NLL tokens, then chosen, then rejected."""
    kinds = [KIND_PROMPT] * prompt + [KIND_CHOSEN] * n_chosen + [KIND_REJECTED] * n_rejected
    which = ["plain"] * prompt + [chosen] * n_chosen + [rejected] * n_rejected
    targets = torch.tensor([i % V for i in range(len(kinds))])
    hidden = torch.zeros(len(kinds), V)
    for i, w in enumerate(which):
        hidden[i, targets[i]] = LOGIT[w]
    return hidden, targets, torch.tensor(kinds), torch.zeros(len(kinds), dtype=torch.long)


CASES = [(c, r) for c in LOGIT for r in LOGIT]


@pytest.mark.parametrize("chosen,rejected", CASES)
@pytest.mark.parametrize("lengths", [(1, 1), (1, 7), (5, 2)])
@pytest.mark.parametrize("autocast", [False, True])
def test_extreme_completions_finite_loss_and_gradients(chosen, rejected, lengths, autocast):
    hidden, targets, kinds, pairs = edge_batch(chosen, rejected, *lengths)
    hidden.requires_grad_(True)
    weight = torch.eye(V, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        lp = linear_logps(hidden, weight, targets, chunk=3)
        out = orpo_loss(lp, pairs, kinds, 1, 0.5, True, float(lengths[0] + 1), 1.0)
    assert lp.dtype == torch.float32 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    c, r = sequence_logps(lp.detach(), pairs, kinds, 1)
    if chosen == "certain":
        assert c.item() > LOGP_MAX  # really at the edge: log P rounds to 0 in fp32
    if rejected == "unlikely":
        assert r.item() < -30
    # against the float64 reference on the same log-probs (the head is exact here: logits == hidden)
    ref_x = lp.detach().double().requires_grad_(True)
    ref = reference_loss(ref_x, pairs.tolist(), kinds.tolist(), 1, 0.5, True, float(lengths[0] + 1), 1.0)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_one_token_completions_through_the_model(tiny_model, chatml_tokenizer):
    """Completions of a single token (just the end token), prefix-shared and packed, match the stock
    model's full forward, and loss and gradients are finite, in fp32 and under bf16 autocast."""
    im_end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = chatml_tokenizer("Human: hello there Assistant:")["input_ids"]
    pairs = [TokenizedPair(np.asarray(ids, dtype=np.int32), np.asarray([im_end], dtype=np.int32),
                           np.asarray([ids[1]], dtype=np.int32), "t:0"),
             TokenizedPair(np.asarray(ids[:3], dtype=np.int32), np.asarray([ids[3], im_end], dtype=np.int32),
                           np.asarray([im_end], dtype=np.int32), "t:1")]
    batch = collate(pairs, True, True, True)
    policy = PolicyForward(tiny_model, "blocks")
    lp = policy(batch)
    # the stock model on each whole sequence
    want = []
    for p in pairs:
        for k, comp in enumerate((p.chosen, p.rejected)):
            seq = torch.tensor([int(t) for t in (*p.prompt, *comp)])[None]
            with torch.no_grad():
                logp = torch.log_softmax(tiny_model(input_ids=seq).logits[0], -1)[:-1].gather(1, seq[0, 1:, None])[:, 0]
            want.append(logp[: len(p.prompt) - 1] if k == 0 else logp[:0])
            want.append(logp[len(p.prompt) - 1 :])
    assert torch.allclose(lp.detach(), torch.cat(want), rtol=1e-5, atol=1e-6)
    nll_norm = float(sum(nll_tokens(p, True) for p in pairs))
    for autocast in (False, True):
        tiny_model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = orpo_loss(policy(batch), batch.pair, batch.kind, 2, 0.1, True, nll_norm, 2.0)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters())


@pytest.mark.parametrize("rows", ["conv", "plain"])
def test_truncation_never_lets_an_empty_completion_reach_the_loss(chatml_tokenizer, rows):
    """At every max_length, a pair the data stage keeps has a prompt token and at least one token of each
    completion, and fits; a pair that would lose a completion entirely is dropped and counted. So no
    completion made only of padding ever reaches the loss (where its mean log-prob would be 0/0)."""
    data = CONV_ROWS if rows == "conv" else PLAIN_ROWS
    pairs = [normalize_row(r, f"t:{i}") for i, r in enumerate(data)]
    for max_length in list(range(1, 24)) + [40, 64]:
        stats = TokenStats()
        kept = tokenize_pairs(pairs, chatml_tokenizer, max_length, stats=stats)
        assert len(kept) + stats.skips.total == len(pairs)
        for p in kept:
            assert len(p.prompt) >= 1 and len(p.chosen) >= 1 and len(p.rejected) >= 1
            assert len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= max_length
        if max_length == 1:
            assert not kept and stats.skips.counts == {"completion lost to truncation": len(pairs)}
        if kept:
            b = collate(kept, True, True, True)
            for k in (KIND_CHOSEN, KIND_REJECTED):
                assert (torch.bincount(b.pair[b.kind == k], minlength=len(kept)) >= 1).all()
            assert b.src.min() >= 0


# ------------------------------------------------------------------------------------------------
# The paper's identities on a model's parameters


def _model_pairs(chatml_tokenizer):
    rows = [normalize_row(r, f"t:{i}") for i, r in enumerate(CONV_ROWS)]
    return tokenize_pairs(rows, chatml_tokenizer, 512)


@pytest.mark.parametrize("prompt_in_nll", [False, True])
def test_beta_zero_update_is_sft_on_chosen(tiny_model, chatml_tokenizer, prompt_in_nll):
    """beta = 0: the gradient is the stock model's cross-entropy gradient on the chosen sequences, token
    mean over the batch, with labels on the chosen completion (and the prompt with prompt_in_nll)."""
    pairs = _model_pairs(chatml_tokenizer)
    batch = collate(pairs, True, True, prompt_in_nll)
    nll_norm = float(sum(nll_tokens(p, prompt_in_nll) for p in pairs))
    orpo_loss(PolicyForward(tiny_model)(batch), batch.pair, batch.kind, batch.n_pairs, 0.0, prompt_in_nll,
              nll_norm, float(len(pairs))).loss.backward()
    ours = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    total = 0.0
    for p in pairs:
        seq = torch.tensor([int(t) for t in (*p.prompt, *p.chosen)])[None]
        labels = seq.clone()
        if not prompt_in_nll:
            labels[0, : len(p.prompt)] = -100
        n = int((labels[0, 1:] != -100).sum())
        sft = tiny_model(input_ids=seq, labels=labels).loss * n  # HF's loss is the mean over its n targets
        (sft / nll_norm).backward()
        total += n
    assert total == nll_norm
    for a, p in zip(ours, tiny_model.parameters()):
        assert (a - p.grad).abs().max() <= 1e-5 * p.grad.abs().max()


def test_odds_ratio_gradient_is_paper_eq10_on_parameters(tiny_model, chatml_tokenizer):
    """grad_theta L_OR = -delta(d) * h(d) with delta = [1 + odds(y_w)/odds(y_l)]^-1 and
    h = grad log P(y_w) / (1 - P(y_w)) - grad log P(y_l) / (1 - P(y_l)) (eqs. 10-12; the minus sign because
    L_OR = -log sigmoid, eq. 7). Checked pair by pair on every parameter of a model, in float64."""
    model = tiny_model.double()
    params = list(model.parameters())
    policy = PolicyForward(model)
    for p in _model_pairs(chatml_tokenizer)[:2]:
        batch = collate([p], True, True, False)
        lp = policy(batch)
        c, r = sequence_logps(lp, batch.pair, batch.kind, 1)
        loss, ratio = odds_ratio_loss(c, r)
        g_loss = torch.autograd.grad(loss.sum(), params, retain_graph=True)
        g_c = torch.autograd.grad(c.sum(), params, retain_graph=True)
        g_r = torch.autograd.grad(r.sum(), params)
        delta = torch.sigmoid(-ratio.detach())
        pc, pr = torch.exp(c.detach()), torch.exp(r.detach())
        for gl, gc, gr in zip(g_loss, g_c, g_r):
            h = gc / (1 - pc) - gr / (1 - pr)
            want = -delta * h
            # float64, but HF's RMSNorm rounds through fp32 inside, in the backward pass too
            assert (gl - want).abs().max() <= 1e-6 * want.abs().max()


def test_log_odds_ratio_antisymmetric_on_a_model(tiny_model, chatml_tokenizer):
    """Swapping chosen and rejected negates each pair's log-odds ratio, and the two losses differ by the
    ratio itself: -log sigmoid(-x) - (-log sigmoid(x)) = x."""
    pairs = _model_pairs(chatml_tokenizer)
    swapped = [TokenizedPair(p.prompt, p.rejected, p.chosen, p.where) for p in pairs]
    policy = PolicyForward(tiny_model.double())
    out = []
    for ps in (pairs, swapped):
        b = collate(ps, True, True, False)
        with torch.no_grad():
            out.append(odds_ratio_loss(*sequence_logps(policy(b), b.pair, b.kind, b.n_pairs)))
    (l1, r1), (l2, r2) = out
    assert torch.allclose(r1, -r2, rtol=0, atol=1e-6)
    assert torch.allclose(l2 - l1, r1, rtol=0, atol=1e-6)
    assert (r1.abs() > 1e-3).all()  # not trivially zero
    assert F.logsigmoid(r1).neg().allclose(l1)
    assert math.isfinite(float(l1.sum()))


def test_bf16_rounding_of_the_official_code_and_not_ours():
    """The official implementation (xfactlab/orpo) loads the model in bf16, so its per-token log-probs are
    bf16; it multiplies them by a bf16 mask and sums in bf16 before converting to float64, and it returns
    the loss cast to bf16. Emulating that arithmetic on the same per-token values: log P is off by ~1e-3
    relative (up to ~4e-3), about the size of the log-odds gap between two similar completions. Ours
    keeps per-token log-probs, their sums and the loss in fp32, under bf16 autocast too (the matmuls run
    in bf16; see also test_extreme_completions_finite_loss_and_gradients)."""
    torch.manual_seed(0)
    errs_official, errs_ours = [], []
    for n in (5, 40, 300):
        for _ in range(20):
            tok = -torch.rand(n, dtype=torch.float64) * 4
            exact = tok.mean()
            official = (tok.to(torch.bfloat16) * torch.ones(n, dtype=torch.bfloat16)).sum().double() / n
            kinds = torch.full((n,), KIND_CHOSEN)
            ours, _ = sequence_logps(tok.float(), torch.zeros(n, dtype=torch.long), kinds, 1)
            errs_official.append(abs((official - exact) / exact).item())
            errs_ours.append(abs((ours.double() - exact) / exact).item())
    assert np.mean(errs_official) > 5e-4 and max(errs_official) > 2e-3
    assert max(errs_ours) < 1e-6
    # a bf16 loss keeps 8 significant bits
    loss = torch.tensor(2.3456789, dtype=torch.float64)
    assert abs(loss.to(torch.bfloat16).double() - loss) / loss > 5e-4
    # our log-probs under bf16 autocast are fp32 values of a bf16 matmul, not bf16-rounded log-softmaxes
    h, w = torch.randn(64, 16), torch.randn(V * 4, 16)
    t = torch.randint(0, V * 4, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = linear_logps(h, w, t)
    logits = (h.to(torch.bfloat16) @ w.to(torch.bfloat16).T).float()
    want = torch.log_softmax(logits, -1).gather(1, t[:, None])[:, 0]
    assert lp.dtype == torch.float32 and torch.allclose(lp, want, rtol=1e-6, atol=1e-6)
