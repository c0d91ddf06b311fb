"""The ORPO tutorial's TRL config, as written, in a YAML file: read key by key, refused only where a key
would change the result if ignored; with the optimizer changed for a CPU it trains, logs and evaluates
as TRL would. Also: step counts as fractions of the run, save/eval at each epoch's end."""

from __future__ import annotations

import json

import pytest
import torch

import orpo
from orpo import config as C
from orpo.cli import main
from orpo.train.plan import StepPlan

from conftest import CONV_ROWS, write_jsonl

# The tutorial's ORPOConfig(...) keywords, one per line, as a user pastes them into YAML.
TUTORIAL = """\
output_dir: {out}
evaluation_strategy: steps
do_eval: true
optim: {optim}
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
per_device_eval_batch_size: 2
log_level: debug
logging_steps: 20
learning_rate: 8.0e-6
eval_steps: 20
max_steps: 100
save_steps: 20
save_strategy: epoch
warmup_ratio: 0.1
lr_scheduler_type: linear
beta: 0.1
max_length: 1024
"""


def tutorial_yaml(tmp_path, model, optim="paged_adamw_8bit", extra=""):
    train = write_jsonl(tmp_path / "train.jsonl", CONV_ROWS * 12)  # 48 pairs: 6 steps of 8 per epoch
    held = write_jsonl(tmp_path / "eval.jsonl", CONV_ROWS * 2)
    y = tmp_path / "tutorial.yaml"
    y.write_text(f"model: {model}\ndata: {train}\neval_data: {held}\n"
                 + TUTORIAL.format(out=tmp_path / "results", optim=optim) + extra)
    return y


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the paged optimizer runs")
def test_the_tutorial_config_as_written_stops_in_one_line_naming_the_cpu_optimizer(tmp_path, tiny_model_dir, capsys):
    y = tutorial_yaml(tmp_path, tiny_model_dir)
    assert main(["train", str(y)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("orpo: error: --optim paged_adamw_8bit") and "CUDA" in last and "adamw_8bit" in last
    # every other key of the tutorial was read, each with its line, none refused
    for key in ("evaluation_strategy as eval_strategy", "per_device_eval_batch_size as eval_batch_size",
                "TRL's log_level", "TRL's do_eval", "learning_rate as lr"):
        assert key in err, key
    assert "unknown option" not in err and "no counterpart" not in err
    assert not (tmp_path / "results" / "metrics.jsonl").exists()  # it stopped before any work


def test_the_tutorial_config_with_only_optim_changed_trains_logging_and_evaluating_every_20_steps(
        tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("bitsandbytes")
    y = tutorial_yaml(tmp_path, tiny_model_dir, optim="adamw_8bit")
    assert main(["train", str(y)]) == 0
    out = tmp_path / "results"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [20, 40, 60, 80, 100]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 20, 40, 60, 80, 100]
    saved = json.loads(json.dumps(C.load_yaml(out / "config.yaml")))
    assert (saved["eval_batch_size"], saved["eval_strategy"], saved["save_strategy"]) == (2, "steps", "epoch")
    assert (saved["batch_size"], saved["grad_accum"], saved["lr"], saved["optim"]) == (2, 4, 8e-6, "adamw_8bit")
    # save_strategy: epoch: checkpoints at each epoch's end (every 6 steps), not every save_steps (20);
    # the two newest are kept, and the last step always saves.
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-000096", "step-000100"]


def test_keys_that_change_nothing_are_read_with_one_line_each(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("log_level: info\nlogging_dir: tb\nlogging_first_step: true\nrun_name: first-try\ndo_eval: false\n"
                 "push_to_hub: false\nreport_to: [tensorboard]\nevaluation_strategy: 'no'\n"
                 "per_device_eval_batch_size: 16\n")
    cfg = C.build(yaml_path=y)
    assert (cfg.run_name, cfg.report_to, cfg.eval_strategy, cfg.eval_batch_size) == ("first-try", "tensorboard", "no", 16)
    from orpo.train.engine import tracker_names

    assert tracker_names(cfg.run_name)["wandb"] == {"name": "first-try"}
    assert tracker_names(cfg.run_name)["mlflow"] == {"run_name": "first-try"} and tracker_names(None) == {}


def test_a_bare_yaml_no_is_transformers_no_strategy(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("save_strategy: no\nevaluation_strategy: no\n")  # YAML reads both as false
    cfg = C.build(yaml_path=y)
    assert (cfg.save_strategy, cfg.eval_strategy) == ("no", "no")


def test_keys_that_would_change_the_result_are_refused_all_at_once(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("fp16: true\npush_to_hub: true\nlogging_strategy: epoch\nlog_level: debug\nevaluation_strategy: steps\n")
    with pytest.raises(orpo.errors.UserError) as e:
        C.load_yaml(y)
    msg = str(e.value)
    assert "\n" not in msg
    for key in ("'fp16'", "'push_to_hub'", "'logging_strategy'"):
        assert key in msg, key
    assert "log_level" not in msg and "evaluation_strategy" not in msg


@pytest.mark.parametrize("value, error", [(1.5, "whole number"), (-1, "> 0"), ("x", "whole number"), (True, "whole number")])
def test_step_counts_are_whole_or_a_fraction_below_one(value, error):
    with pytest.raises(orpo.errors.UserError, match=error):
        C.build({"logging_steps": value})
    with pytest.raises(orpo.errors.UserError, match=error):
        C.build({"logging_steps": C.coerce("logging_steps", value, "--logging-steps")})


def test_fractions_of_the_run_are_read_as_transformers_reads_them():
    cfg = C.build({"logging_steps": "0.2", "eval_steps": 0.05, "save_steps": "20"})
    assert (cfg.logging_steps, cfg.eval_steps, cfg.save_steps) == (0.2, 0.05, 20)
    assert type(cfg.save_steps) is int  # config.yaml writes 20, not 20.0
    plan = StepPlan(n_pairs=48, batch_size=2, grad_accum=4, world=1, seed=0, epochs=1, max_steps=100)
    # transformers: math.ceil(max_steps * fraction)
    assert (plan.every(0.2), plan.every(0.05), plan.every(0.333), plan.every(20), plan.every(0)) == (20, 5, 34, 20, 0)
    assert [s for s in range(1, 101) if plan.due(s, "steps", 0.25)] == [25, 50, 75, 100]
    assert [s for s in range(1, 20) if plan.due(s, "epoch", 20)] == [6, 12, 18]  # 48 pairs / 8 per step
    assert not any(plan.due(s, "no", 1) for s in range(1, 101)) and not any(plan.due(s, "steps", 0) for s in range(1, 101))


def test_fractional_steps_in_a_run(tmp_path, tiny_model_dir, conv_file):
    result = orpo.train(orpo.TrainConfig(model=str(tiny_model_dir), data=str(conv_file), eval_data=str(conv_file),
                                         output_dir=str(tmp_path / "run"), max_steps=8, logging_steps=0.25,
                                         eval_steps=0.5, save_steps=0, eval_samples=0, precision="fp32"))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4, 8]
