"""The MoE router's load-balancing loss (orpo.router) equals TRL's ORPOTrainer's on tiny Mixtral,
Qwen2-MoE and gpt-oss models with ``output_router_logits`` on: the loss, the logged loss and the
gradients, with prefix sharing and packing (each shared prompt token weighted twice) and without.
Same ids on both sides, as in test_parity_trl.py; fp32."""

from __future__ import annotations

import pytest
import torch

from orpo.data.batching import nll_tokens
from orpo.forward import Paths, PolicyForward
from orpo.loss import metric_vector, orpo_loss, summarize
from orpo.router import RouterLoss, router_loss_coef, token_weights

from archs import build
from test_parity_trl import (BETA, LONG_ROWS, RTOL, grad_rel, grads, make_trainer, pairs_from_trl, rel, trl_batch,
                             trl_rows)

COEF = 0.5  # large, so that a wrong router loss cannot hide in the ORPO loss's rounding


def _moe(name):
    model = build(name)
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = COEF
    return model


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("sharing,packing", [(True, True), (False, False)])
def test_router_loss_equals_trls(tmp_path, chatml_tokenizer, name, sharing, packing):
    trl_model, our_model = _moe(name), _moe(name)
    trainer = make_trainer(trl_model, chatml_tokenizer, LONG_ROWS, tmp_path)
    assert trainer.aux_loss_enabled and trainer.aux_loss_coef == COEF
    rows = trl_rows(trainer)
    batch = trl_batch(trainer, rows)
    with torch.no_grad():
        aux_t = trainer.concatenated_forward(trl_model, batch)[5]
    trl_model.zero_grad()
    loss_t, _ = trainer.get_batch_loss_metrics(trl_model, batch)
    loss_t.backward()
    g_t = grads(trl_model)

    assert router_loss_coef(our_model) == COEF
    router = RouterLoss(our_model, COEF)
    policy = PolicyForward(our_model, Paths("blocks", sharing, packing, "linear"))
    pairs = pairs_from_trl(rows)
    ours = policy.collate(pairs, True)
    n = len(pairs)
    our_model.zero_grad()
    with router.recording():
        logps = policy(ours)
    nll_norm = float(sum(nll_tokens(p, True) for p in pairs))
    part = orpo_loss(logps, ours.pair, ours.kind, ours.n_pairs, BETA, True, nll_norm, n)
    without = part.loss.detach().clone()
    part = router.add(part, ours, float(n))
    part.loss.backward()
    m_o = summarize(metric_vector(part, n), BETA)

    assert abs(float(without - loss_t.detach())) > 100 * RTOL * abs(float(loss_t))  # the router loss is visible
    assert rel(part.loss.detach(), loss_t.detach()) <= RTOL
    assert rel(m_o["loss"], loss_t.item()) <= RTOL
    assert rel(m_o["router_aux_loss"], COEF * aux_t.item()) <= RTOL
    assert grad_rel(grads(our_model), g_t) <= RTOL
    router_grads = [k for k in g_t if "gate" in k or "router" in k]
    assert router_grads and all(g_t[k].abs().max() > 0 for k in router_grads)


def test_shared_prompt_tokens_count_once_per_completion():
    from orpo.data.batching import collate
    from orpo.data.templates import TokenizedPair

    import numpy as np

    ids = lambda n: np.arange(3, 3 + n, dtype=np.int32)  # noqa: E731
    pairs = [TokenizedPair(ids(4), ids(2), ids(3), "a"), TokenizedPair(ids(2), ids(1), ids(2), "b")]
    shared = collate(pairs, True, True)
    assert token_weights(shared.layout, shared.input_ids.shape[1] + 3, "cpu").tolist() == [
        [2, 2, 2, 2, 1, 1, 1, 1, 1, 2, 2, 1, 1, 1, 0, 0, 0]]
    padded = collate(pairs, False, False)
    w = token_weights(padded.layout, padded.input_ids.shape[1], "cpu")
    assert w.tolist() == [[1] * 6 + [0], [1] * 7, [1] * 3 + [0] * 4, [1] * 4 + [0] * 3]


def test_router_loss_is_off_unless_the_config_turns_it_on():
    model = build("mixtral")
    assert not model.config.output_router_logits and router_loss_coef(model) is None
    model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.0
    assert router_loss_coef(model) is None  # TRL adds 0 x aux: nothing


def test_nothing_is_recorded_outside_a_training_forward():
    model = _moe("mixtral")
    router = RouterLoss(model, COEF)
    model(input_ids=torch.tensor([[5, 6, 7]]))
    assert router._logits == []
    with router.recording():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert len(router._logits) == model.config.num_hidden_layers


def test_a_run_adds_the_router_loss_to_its_objective(tmp_path, chatml_tokenizer, capsys):
    """`orpo train` on a Mixtral whose config has the router loss on: step 1 logs the ORPO loss of the
    same run without it, plus the router term; the run says so in one line."""
    import json

    import orpo
    from conftest import PLAIN_ROWS

    rows = {}
    for on in (False, True):
        folder = tmp_path / f"model-{on}"
        model = build("mixtral")
        model.config.output_router_logits, model.config.router_aux_loss_coef = on, COEF
        model.save_pretrained(folder)
        chatml_tokenizer.save_pretrained(folder)
        out = tmp_path / f"run-{on}"
        orpo.train(orpo.TrainConfig(model=str(folder), data=PLAIN_ROWS * 2, output_dir=str(out), max_steps=1,
                                    batch_size=4, grad_accum=2, precision="fp32", save_steps=0, eval_samples=0))
        rows[on] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "router_aux_loss" not in rows[False] and rows[True]["router_aux_loss"] > 0
    assert rows[True]["loss"] - rows[True]["router_aux_loss"] == pytest.approx(rows[False]["loss"], rel=1e-6)
    assert rows[True]["nll_loss"] == pytest.approx(rows[False]["nll_loss"], rel=1e-6)
    assert "MoE router loss: 0.5 x the model's load-balancing loss" in capsys.readouterr().out
