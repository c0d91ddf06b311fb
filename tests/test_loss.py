import math

import pytest
import torch
import torch.nn.functional as F

from orpo.loss import (
    KIND_CHOSEN,
    KIND_PROMPT,
    KIND_REJECTED,
    LOGP_MAX,
    linear_logps,
    log1mexp,
    log_odds,
    metric_vector,
    odds_ratio_loss,
    orpo_loss,
    reference_linear_logps,
    summarize,
)


def test_log1mexp_matches_float64_and_mpmath_like_values():
    x = torch.tensor([-1e-30, -1e-12, -1e-7, -1e-3, -0.5, -math.log(2), -0.7, -1.0, -5.0, -30.0, -100.0, -800.0],
                     dtype=torch.float64)
    got = log1mexp(x)
    # log(1 - e^x) computed with the exact identity in high precision
    want = torch.tensor([math.log(-math.expm1(v)) if v > -0.7 else math.log1p(-math.exp(v)) for v in x.tolist()],
                        dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    # float32: no underflow to -inf near 0 and no loss of the tiny term at very negative x
    x32 = torch.tensor([-1e-7, -1e-6, -50.0], dtype=torch.float32)
    g32 = log1mexp(x32)
    assert torch.isfinite(g32).all()
    assert abs(g32[0].item() - math.log(1e-7)) < 1e-3
    assert g32[2].item() == pytest.approx(-math.exp(-50.0), rel=1e-5)


def test_log1mexp_gradient_is_finite_on_both_branches():
    x = torch.tensor([-1e-6, -0.69, -0.7, -40.0, -200.0], dtype=torch.float64, requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    # d/dx log(1 - e^x) = -e^x / (1 - e^x)
    want = -torch.exp(x.detach()) / (-torch.expm1(x.detach()))
    assert torch.allclose(x.grad, want, rtol=1e-10)
    assert torch.autograd.gradcheck(log1mexp, (torch.tensor([-0.01, -0.6931, -0.6932, -3.0], dtype=torch.float64, requires_grad=True),))


def test_log_odds_clamps_certain_completion():
    lo = log_odds(torch.tensor([0.0, -1e-9, -0.1]))
    assert torch.isfinite(lo).all()
    assert lo[0] == lo[1]  # both clamped to LOGP_MAX
    assert lo[0].item() == pytest.approx(LOGP_MAX - math.log(-math.expm1(LOGP_MAX)), rel=1e-5)


def test_odds_ratio_loss_hand_computed():
    # chosen P = 0.5, rejected P = 0.25: odds 1 and 1/3, log odds ratio = log 3
    c = torch.tensor([math.log(0.5)], dtype=torch.float64)
    r = torch.tensor([math.log(0.25)], dtype=torch.float64)
    loss, ratio = odds_ratio_loss(c, r)
    assert ratio.item() == pytest.approx(math.log(3.0), rel=1e-12)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + 1 / 3)), rel=1e-12)  # -log sigmoid(log 3) = log(4/3)


def _toy(dtype=torch.float64):
    # 2 pairs; pair 0: prompt 2 NLL tokens, chosen 3, rejected 2; pair 1: chosen 1, rejected 4
    kind = torch.tensor([KIND_PROMPT] * 2 + [KIND_CHOSEN] * 3 + [KIND_REJECTED] * 2 + [KIND_CHOSEN] + [KIND_REJECTED] * 4)
    pair = torch.tensor([0] * 7 + [1] * 5)
    lp = -torch.tensor([0.5, 1.0, 0.2, 0.4, 0.6, 2.0, 3.0, 0.05, 1.5, 2.5, 0.5, 1.5], dtype=dtype)
    return lp, pair, kind


def test_orpo_loss_hand_computed_and_metrics():
    lp, pair, kind = _toy()
    beta = 0.1
    out = orpo_loss(lp, pair, kind, 2, beta, prompt_in_nll=False, nll_norm=4.0, pair_norm=2.0)
    c = torch.tensor([-0.4, -0.05], dtype=torch.float64)  # means of chosen tokens
    r = torch.tensor([-2.5, -1.5], dtype=torch.float64)
    lo = lambda v: v - torch.log(1 - torch.exp(v))  # noqa: E731
    lor = -F.logsigmoid(lo(c) - lo(r))
    nll = (0.2 + 0.4 + 0.6 + 0.05) / 4
    assert out.loss.item() == pytest.approx(nll + beta * lor.mean().item(), rel=1e-12)
    m = summarize(metric_vector(out, 2), beta)
    assert m["nll_loss"] == pytest.approx(nll, rel=1e-12)
    assert m["logps/chosen"] == pytest.approx(c.mean().item())
    assert m["logps/rejected"] == pytest.approx(r.mean().item())
    assert m["rewards/margins"] == pytest.approx(beta * (c - r).mean().item())
    assert m["rewards/accuracies"] == 1.0
    assert m["log_odds_ratio"] == pytest.approx(-lor.mean().item())
    assert m["log_odds_chosen"] == pytest.approx((lo(c) - lo(r)).mean().item())
    assert m["loss"] == pytest.approx(out.loss.item(), rel=1e-12)
    # with the prompt in the NLL, the two prompt tokens join the token mean
    out2 = orpo_loss(lp, pair, kind, 2, beta, prompt_in_nll=True, nll_norm=6.0, pair_norm=2.0)
    assert out2.nll_sum.item() == pytest.approx(0.5 + 1.0 + 0.2 + 0.4 + 0.6 + 0.05)


def test_orpo_loss_gradient_matches_float64_reference_with_gradcheck():
    lp, pair, kind = _toy()
    lp = lp.clone().requires_grad_(True)

    def f(x):
        return orpo_loss(x, pair, kind, 2, 0.25, True, 6.0, 2.0).loss

    assert torch.autograd.gradcheck(f, (lp,))


def test_beta_zero_is_sft_on_chosen():
    lp, pair, kind = _toy()
    lp = lp.clone().requires_grad_(True)
    orpo_loss(lp, pair, kind, 2, 0.0, False, 4.0, 2.0).loss.backward()
    want = torch.zeros_like(lp)
    want[kind == KIND_CHOSEN] = -1.0 / 4
    assert torch.equal(lp.grad, want)


def test_odds_ratio_gradient_matches_paper_eq10():
    """Eq. 10: grad L_OR = delta(d) * h(d), delta = 1/(1 + odds_w/odds_l)... written here for the
    mean log-probs directly: d L_OR / d logP_w = -sigmoid(-ratio) / (1 - P_w)."""
    torch.manual_seed(0)
    c = (-torch.rand(64, dtype=torch.float64) * 5 - 1e-3).requires_grad_(True)
    r = (-torch.rand(64, dtype=torch.float64) * 5 - 1e-3).requires_grad_(True)
    loss, ratio = odds_ratio_loss(c, r)
    loss.sum().backward()
    delta = torch.sigmoid(-ratio.detach())  # = [1 + odds_w/odds_l]^-1
    assert torch.allclose(c.grad, -delta / (1 - torch.exp(c.detach())), rtol=1e-10)
    assert torch.allclose(r.grad, delta / (1 - torch.exp(r.detach())), rtol=1e-10)


def test_log_odds_ratio_antisymmetric():
    torch.manual_seed(1)
    c, r = -torch.rand(16, dtype=torch.float64) * 3, -torch.rand(16, dtype=torch.float64) * 3
    _, a = odds_ratio_loss(c, r)
    _, b = odds_ratio_loss(r, c)
    assert torch.allclose(a, -b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("n,chunk", [(1, 0), (7, 3), (33, 8), (50, 50), (50, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_logps_matches_reference_values_and_grads(n, chunk, bias):
    torch.manual_seed(n)
    h = torch.randn(n, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, 40, (n,))
    g = torch.randn(n, dtype=torch.float64)
    got = linear_logps(h, w, t, b, chunk=chunk)
    (got.double() * g).sum().backward()
    grads = [h.grad.clone(), w.grad.clone()] + ([b.grad.clone()] if bias else [])
    for x in [h, w] + ([b] if bias else []):
        x.grad = None
    want = reference_linear_logps(h, w, t, b)
    (want * g).sum().backward()
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)  # forward is fp32 by design
    refs = [h.grad, w.grad] + ([b.grad] if bias else [])
    for a, e in zip(grads, refs):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-6)


def test_linear_logps_bf16_autocast_close_and_frozen_weight():
    torch.manual_seed(0)
    h = torch.randn(20, 32, requires_grad=True)
    w = torch.randn(100, 32) * 0.1  # frozen: no grad requested
    t = torch.randint(0, 100, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_logps(h, w, t, chunk=7)
    assert got.dtype == torch.float32
    got.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    want = reference_linear_logps(h.detach(), w, t)
    assert torch.allclose(got.detach(), want, atol=0.05)
