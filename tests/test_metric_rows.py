"""Metrics rows with logging_steps > 1: a row covers every step since the previous one (pair_tokens
summed, the per-pair and per-token metrics over all the window's pairs and tokens), and a skipped
(non-finite) step gets a row of its own without erasing its window."""

from __future__ import annotations

import json

import pytest

import orpo
from conftest import PLAIN_ROWS

MEANS = ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies", "log_odds_ratio")


def _run(out, model_dir, logging_steps, max_steps):
    cfg = orpo.TrainConfig(model=str(model_dir), data=PLAIN_ROWS * 4, output_dir=str(out), max_steps=max_steps,
                           batch_size=2, precision="fp32", lr=1e-3, save_steps=0, eval_samples=0,
                           logging_steps=logging_steps)
    orpo.train(cfg)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _poison(monkeypatch, steps):
    """The training forward of the given steps (1-based; one micro-batch each) returns NaN."""
    import orpo.forward as fwd

    real, calls = fwd.PolicyForward.forward, {"n": 0}

    def poisoned(self, batch):
        if not self.training:  # the start-up check and the evaluations
            return real(self, batch)
        calls["n"] += 1
        out = real(self, batch)
        return out * float("nan") if calls["n"] in steps else out

    monkeypatch.setattr(fwd.PolicyForward, "forward", poisoned)


def _window(rows, steps):
    """Expected window row from one-step rows (each step has the same number of pairs)."""
    sel = [r for r in rows if r["step"] in steps]
    assert len(sel) == len(steps)
    return {"pair_tokens": sum(r["pair_tokens"] for r in sel), **{k: sum(r[k] for r in sel) / len(sel) for k in MEANS}}


def test_a_row_covers_its_whole_logging_window(tmp_path, tiny_model_dir):
    every = _run(tmp_path / "every", tiny_model_dir, 1, 7)
    windowed = _run(tmp_path / "windowed", tiny_model_dir, 3, 7)
    assert [r["step"] for r in windowed] == [3, 6, 7]
    assert sum(r["pair_tokens"] for r in windowed) == sum(r["pair_tokens"] for r in every)
    for row, steps in zip(windowed, ([1, 2, 3], [4, 5, 6], [7])):
        want = _window(every, steps)
        assert row["pair_tokens"] == want["pair_tokens"]
        for k in MEANS:
            assert row[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
        assert row["grad_norm"] == every[steps[-1] - 1]["grad_norm"]  # the last step's, as transformers logs it
        assert row["tokens_per_s"] > 0


def test_a_skipped_step_keeps_its_window(tmp_path, tiny_model_dir, monkeypatch):
    _poison(monkeypatch, {2, 6})
    every = _run(tmp_path / "every", tiny_model_dir, 1, 7)
    monkeypatch.undo()
    _poison(monkeypatch, {2, 6})  # a fresh call counter for the second run
    windowed = _run(tmp_path / "windowed", tiny_model_dir, 3, 7)
    assert [(r["step"], r.get("skipped", False)) for r in every] == [(s, s in (2, 6)) for s in range(1, 8)]
    # step 2 skipped inside the window 1-3: its own row, then the window of steps 1 and 3; step 6 is a
    # logging step: the window's steps 4 and 5 are logged (as of step 5), then step 6 alone
    assert [(r["step"], r.get("skipped", False)) for r in windowed] == [(2, True), (3, False), (5, False), (6, True),
                                                                        (7, False)]
    assert sum(r["pair_tokens"] for r in windowed) == sum(r["pair_tokens"] for r in every)
    by_step = {r["step"]: r for r in windowed}
    for step, steps in ((3, [1, 3]), (5, [4, 5]), (7, [7])):
        want = _window(every, steps)
        assert by_step[step]["pair_tokens"] == want["pair_tokens"]
        for k in MEANS:
            assert by_step[step][k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), (step, k)
    for step in (2, 6):  # the skipped step's own numbers, as in the one-step run
        assert by_step[step]["pair_tokens"] == every[step - 1]["pair_tokens"]
