"""`orpo eval` on a run folder evaluates as the run did (its beta, max length, held-out data), so it agrees
with the run's own last evaluation row; options given on the command line still win."""

from __future__ import annotations

import json

import pytest

import orpo
from orpo.cli import main

from conftest import CONV_ROWS, write_jsonl

KEYS = ("eval_loss", "eval_nll_loss", "eval_log_odds_ratio", "eval_logps/chosen", "eval_logps/rejected",
        "eval_rewards/margins", "eval_rewards/accuracies")


def last_eval_row(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r][-1]


def eval_json(capsys, *args) -> tuple[dict, str]:
    assert main(["eval", *args]) == 0
    cap = capsys.readouterr()
    return json.loads(cap.out.strip().splitlines()[-1]), cap.err


def agree(a: dict, b: dict) -> bool:
    return all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in KEYS)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """A run with a non-default beta and a max length that truncates the held-out pairs."""
    d = tmp_path_factory.mktemp("eval-run")
    held = write_jsonl(d / "held.jsonl", CONV_ROWS * 2)
    orpo.train(orpo.TrainConfig(model=str(tiny_model_dir), data=str(write_jsonl(d / "train.jsonl", CONV_ROWS * 3)),
                                eval_data=str(held), output_dir=str(d / "run"), beta=0.37, max_length=24, max_steps=3,
                                lr=1e-3, save_steps=0, eval_samples=0, precision="fp32"))
    return d / "run", held


def test_eval_of_a_run_folder_agrees_with_the_runs_last_evaluation(run, capsys):
    out, held = run
    last = last_eval_row(out)
    for args in (["--model", str(out)], ["--model", str(out / "model"), "--data", str(held)]):
        m, err = eval_json(capsys, *args)
        assert agree(m, last), (args, {k: (m[k], last[k]) for k in KEYS})
        assert "the run's beta 0.37, max_length 24" in err
    assert m["eval_truncated_prompts"] > 0  # max length 24 did cut: the run's length was used


def test_options_given_override_the_runs(run, capsys):
    out, held = run
    m, _ = eval_json(capsys, "--model", str(out), "--beta", "0.1", "--max-length", "1024")
    assert not agree(m, last_eval_row(out)) and m["eval_truncated_prompts"] == 0
    # what a model folder outside any run gets: TrainConfig's defaults, the same numbers
    plain, err = eval_json(capsys, "--model", str(out / "model"), "--data", str(held), "--beta", "0.1",
                           "--max-length", "1024", "--precision", "fp32")
    assert agree(plain, m)


def test_the_python_api_reads_the_run_too(run):
    out, _ = run
    assert agree(orpo.evaluate(out / "model"), last_eval_row(out))


def test_a_default_job_like_run_agrees_through_its_adapter(tmp_path, tiny_model_dir, capsys):
    """LoRA, bf16, the built-in data, as the default job: the run folder is evaluated on the built-in
    held-out set of the run's seed, through its unmerged adapter, as the run evaluated it; the merged
    model agrees to bf16's last bits."""
    out = tmp_path / "builtin"
    orpo.train(orpo.TrainConfig(model=str(tiny_model_dir), output_dir=str(out), lora=True, lr=1e-2, beta=0.5,
                                max_length=64, max_steps=2, seed=3, save_steps=0, eval_samples=0, batch_size=4))
    last = last_eval_row(out)
    m, err = eval_json(capsys, "--model", str(out))
    assert agree(m, last) and "built-in held-out set" in err
    merged, _ = eval_json(capsys, "--model", str(out / "model"))
    # Merging rounds W + BA to bf16, which moves each log-prob by about 1e-4 (seen: eval_loss 6.9239 against
    # 6.9251): the continuous metrics agree to that. The accuracy counts pairs by the sign of a margin, so a
    # pair within that rounding of a tie may flip: at most one of the held-out pairs.
    from orpo.data.builtin import heldout_pairs

    smooth = [k for k in KEYS if k != "eval_rewards/accuracies"]
    assert all(merged[k] == pytest.approx(last[k], rel=1e-2, abs=1e-3) for k in smooth), \
        {k: (merged[k], last[k]) for k in KEYS}
    n = len(heldout_pairs(3))
    assert abs(merged["eval_rewards/accuracies"] - last["eval_rewards/accuracies"]) <= 1 / n + 1e-9


def test_eval_needs_data_outside_a_run(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir)]) == 2
    assert "--data is needed" in capsys.readouterr().err
