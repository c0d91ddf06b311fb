"""The architecture matrix: on tiny random models of every family (tests/archs.py), each path the
start-up check accepts gives the stock model's own step-1 metrics and gradient, each path it rejects
is a clear error when forced, and a broken path is caught by the check itself, not by a name list."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orpo import support
from orpo.data.templates import TokenizedPair
from orpo.errors import UserError
from orpo.forward import PolicyForward
from orpo.loss import metric_vector, orpo_loss, summarize

from archs import ARCHS, VOCAB, build, stock_logps

BETA = 0.3
# This file shrinks the matrix's windows and chunks (64) to W, to keep its many decisions quick; windows
# of realistic size are tested in test_windows.py (every path) and test_proof.py (the check).
W = 12


def _pairs(seed=1):
    """Pairs longer than the window W, chosen and rejected of different lengths."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, VOCAB, n).astype(np.int32)  # noqa: E731
    return [TokenizedPair(ids(p), ids(c), ids(r), f"t:{i}")
            for i, (p, c, r) in enumerate([(W + 2, W - 3, 4), (5, W + 4, W), (3, 2, W + 1)])]




def _step(model, logps, batch):
    nll = float((batch.kind == 1).sum())
    part = orpo_loss(logps, batch.pair, batch.kind, batch.n_pairs, BETA, False, nll, batch.n_pairs)
    grads = torch.autograd.grad(part.loss, [p for p in model.parameters()], allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, model.parameters())])
    return summarize(metric_vector(part, batch.n_pairs).detach(), BETA), flat


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, name):
    if name not in models:
        models[name] = build(name, window=W).eval()
    return models[name]


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_accepted_path_gives_the_stock_numbers(models, name):
    model = _model(models, name)
    pairs = _pairs()
    ref_policy = PolicyForward(model, support.Paths("separate", False, False, "model"))
    ref_batch = ref_policy.collate(pairs, False)
    ref_metrics, ref_grad = _step(model, stock_logps(model, pairs), ref_batch)

    auto = support.decide(model, max_length=64)
    assert auto.attention == ARCHS[name][1], auto.line()
    accepted = 0
    for mode in ("blocks", "mask", "separate"):
        try:
            paths = support.decide(model, attention=mode, max_length=64)
        except UserError as e:
            msg = str(e)
            assert msg.startswith(f"--attention {mode}: does not give this model's own log-probs") and "\n" not in msg
            assert mode != "separate", msg  # the model's own forward, one sequence per row, always holds
            continue
        accepted += 1
        policy = PolicyForward(model, paths)
        batch = policy.collate(pairs, False)
        metrics, grad = _step(model, policy(batch), batch)
        for k, v in ref_metrics.items():
            assert metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-5), (paths.line(), k)
        rel = float((grad - ref_grad).norm() / ref_grad.norm())
        assert rel < 1e-5, (paths.line(), rel)
    assert accepted >= 1


@pytest.mark.parametrize("name", ["lfm2", "granitemoehybrid", "qwen3_5", "jamba"])
def test_leaks_are_caught_without_the_name_list(models, name, monkeypatch):
    """A packed row leaks through a convolution, SSM or linear attention: the check itself must see it.
    LFM2's convolution, which orpo.mixers tells where sequences start, leaks here as plain conv1d."""
    import torch.nn.functional as F

    from orpo import mixers

    monkeypatch.setattr(mixers, "_MIXER_LAYERS", {})
    monkeypatch.setattr(mixers, "_MIXER_MODELS", {})
    monkeypatch.setattr(mixers, "sequence_conv", lambda x, conv, layout: F.conv1d(  # x (R, T, D)
        x.transpose(1, 2), conv.weight, conv.bias, padding=conv.kernel_size[0] - 1,
        groups=x.shape[-1])[..., : x.shape[1]].transpose(1, 2))
    paths = support.decide(_model(models, name), max_length=64)
    assert paths.attention == "separate"
    assert "blocks/linear" in paths.rejected and "log-probs off" in paths.rejected["blocks/linear"]


@pytest.mark.parametrize("name", ["mistral", "gemma3", "qwen2-window", "llama4"])
def test_a_window_the_mask_ignores_is_caught(models, name, monkeypatch):
    import orpo.forward as fwd

    monkeypatch.setattr(fwd, "layer_spans", lambda config: (None, None))
    with pytest.raises(UserError, match="log-probs off"):
        support.decide(_model(models, name), attention="mask", max_length=64)


@pytest.mark.parametrize("name", ["granite", "cohere", "gemma2"])
def test_a_head_transform_we_miss_falls_back_to_the_models_head(models, name, monkeypatch):
    import orpo.forward as fwd

    monkeypatch.setattr(fwd, "head_transform", lambda config: (1.0, None))
    paths = support.decide(_model(models, name), max_length=64)
    assert paths.head == "model" and paths.attention == "blocks"
    assert paths.rejected and all("log-probs off" in why for why in paths.rejected.values())


def test_the_line_and_record(models):
    paths = support.decide(_model(models, "qwen3_5"), max_length=64)
    assert paths.line() == ("fallback: one sequence per row, chunked lm-head "
                            "(this model mixes tokens with linear attention, so pairs never share a row)")
    hybrid = support.decide(_model(models, "lfm2"), max_length=64)
    assert hybrid.line() == ("attention: blocks + prefix sharing + packing; chunked lm-head (checked against the "
                             "model's own forward, a short convolution told where each sequence starts)")
    fast = support.decide(_model(models, "llama"), max_length=64)
    assert fast.line().startswith("attention: blocks + prefix sharing + packing; chunked lm-head")
    assert fast.as_dict()["attention"] == "blocks"


def test_the_check_is_proof_not_trust(models, monkeypatch):
    """A block attention that lets the rejected answer see the chosen one is rejected."""
    from orpo import qblocks

    real = qblocks.attend

    def leaky(spec, q, k, v, call, *args, **kwargs):  # a further completion sees all of itself
        if spec.offset == 0:
            return real(spec, q, k, v, call, *args, **kwargs)
        return call(q, k, v, torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device))

    monkeypatch.setattr(qblocks, "attend", leaky)
    paths = support.decide(_model(models, "llama"), max_length=64)
    assert paths.name == "mask/linear"  # the dense mask path does not go through orpo.qblocks
    assert "log-probs off" in paths.rejected["blocks/linear"]
