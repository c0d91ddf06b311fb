"""Defaults that do not change under you, the printed resume command, TRL configs, flag names across commands."""

import importlib
import json
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

import orpo
from conftest import sigterm_after_rows
from orpo import config as C
from orpo.cli import main, resume_argv

SRC = str(Path(__file__).resolve().parents[1] / "src")
VOLATILE = ("time_s", "tokens_per_s")


def env() -> dict:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS="1")


def read_rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def captured(monkeypatch):
    """Run `orpo train ...` up to the resolved config; the loop is replaced by a recorder."""
    seen = {}

    def fake_train(cfg, argv_for_resume=None):
        seen["cfg"], seen["resume"] = cfg, argv_for_resume
        return types.SimpleNamespace(is_main=False, stopped=False)

    monkeypatch.setattr(importlib.import_module("orpo.train"), "train", fake_train)

    def run(*argv):
        assert main(["train", *argv]) == 0
        return seen["cfg"], seen["resume"]

    return run


def test_a_flag_changes_only_itself_in_the_default_job(captured):
    job, _ = captured()
    assert job == orpo.default_job()
    cfg, _ = captured("--max-steps", "20")
    assert cfg == orpo.default_job(max_steps=20)
    assert (cfg.lora, cfg.lr, cfg.batch_size, cfg.max_length, cfg.output_dir) == (True, 1e-4, 8, 256, "runs/default")
    assert not cfg.overwrite  # no hidden overwrite


def test_printed_resume_command_of_the_default_job_resolves_to_the_same_run(captured, tmp_path):
    job, cmd = captured()
    assert cmd == ["orpo", "train", "--resume"]
    again, _ = captured(*cmd[2:])
    assert again.resume and again.fingerprint() == job.fingerprint()
    cfg, cmd = captured("--max-steps", "20", "--overwrite")
    assert cmd == ["orpo", "train", "--max-steps", "20", "--resume"]
    # the README's way: the saved config.yaml plus --resume (it carries no overwrite: true)
    C.dump_yaml(cfg, tmp_path / "config.yaml")
    saved, _ = captured(str(tmp_path / "config.yaml"), "--resume")
    assert saved.fingerprint(cfg.to_dict()) == cfg.fingerprint() and saved.resume and not saved.overwrite


def test_resume_argv_drops_one_time_flags():
    assert resume_argv(["a.yaml", "--resume-from", "x/step-2", "--overwrite", "--lr", "1", "--resume-from=y"]) == \
        ["a.yaml", "--lr", "1"]


def test_printed_resume_command_works_after_sigterm(tmp_path, tiny_model_dir, conv_file):
    """Flags only (so: the default job with them changed); SIGTERM; run exactly the command it printed."""
    common = ["--model", tiny_model_dir, "--data", conv_file, "--precision", "fp32", "--scheduler", "constant",
              "--warmup-steps", 0, "--lr", 1e-3, "--max-steps", 30, "--save-steps", 1000, "--batch-size", 1,
              "--eval-samples", 0]
    cmd = [sys.executable, "-m", "orpo", "train", *[str(a) for a in common]]
    ref, out = tmp_path / "ref", tmp_path / "run"
    subprocess.run(cmd + ["--output-dir", str(ref)], env=env(), check=True, capture_output=True)
    stdout, _ = sigterm_after_rows(cmd + ["--output-dir", str(out)], out, env())
    printed = stdout.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    args = shlex.split(printed)
    assert args[:2] == ["orpo", "train"] and args[-1] == "--resume"
    res = subprocess.run([sys.executable, "-m", "orpo", *args[1:]], env=env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert read_rows(out) == read_rows(ref)


def test_a_trl_orpo_config_runs_with_its_own_names(tmp_path, tiny_model_dir, plain_file, capsys):
    y = tmp_path / "trl.yaml"
    y.write_text(f"""# as written for trl's ORPOTrainer
model_name_or_path: {tiny_model_dir}
dataset_name: {plain_file}
output_dir: {tmp_path / 'out'}
learning_rate: 1.0e-3
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
max_steps: 2
num_train_epochs: 1
beta: 0.1
max_length: 128
max_prompt_length: 64
max_completion_length: 32
lr_scheduler_type: cosine
warmup_ratio: 0.1
logging_steps: 1
save_steps: 1
save_total_limit: 1
bf16: false
gradient_checkpointing: false
report_to: none
disable_dropout: true
seed: 42
""")
    assert main(["train", str(y)]) == 0
    err = capsys.readouterr().err
    for line in ("reading TRL's learning_rate as lr", "reading TRL's per_device_train_batch_size as batch_size",
                 "reading TRL's gradient_accumulation_steps as grad_accum", "reading TRL's bf16 as precision = 'fp32'",
                 "reading TRL's disable_dropout as keep_dropout = False", "reading TRL's model_name_or_path as model"):
        assert line in err, line
    saved = C.load_yaml(tmp_path / "out" / "config.yaml")
    assert (saved["lr"], saved["batch_size"], saved["grad_accum"], saved["precision"], saved["max_completion_length"],
            saved["lora"]) == (1e-3, 2, 2, "fp32", 32, False)
    assert [r["step"] for r in read_rows(tmp_path / "out")] == [1, 2]


def test_unknown_flags_all_at_once_with_trl_and_typo_hints(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--learning-rate", "1e-3", "--max-lenght", "5"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("orpo train: error: unknown option --learning-rate (TRL's learning_rate is --lr in orpo); "
                   "unknown option --max-lenght (did you mean --max-length?)")


def test_same_flag_names_across_train_eval_compare_export(capsys):
    helps = {}
    for cmd in ("train", "eval", "compare", "export"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        helps[cmd] = capsys.readouterr().out
    for cmd in ("train", "eval", "compare"):
        for flag in ("--eval-max-rows", "--max-length", "--max-completion-length", "--columns", "--chat-template"):
            assert flag in helps[cmd], (cmd, flag)
    for cmd in ("train", "compare", "export"):
        assert "--output-dir" in helps[cmd], cmd
    assert "--eval-data" in helps["eval"] and "--max-rows" not in helps["eval"]


def test_eval_takes_train_s_names(tiny_model_dir, conv_file, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--eval-data", str(conv_file), "--eval-max-rows", "3",
                 "--precision", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_pairs"] == 3
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(conv_file), "--max-rows", "2",  # old name
                 "--precision", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_pairs"] == 2


def test_yaml_reports_every_unknown_key_at_once(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("learnin_rate: 1\noptimm: 2\nlr: 1.0e-4\nfp16: true\n")
    with pytest.raises(orpo.errors.UserError) as e:
        C.load_yaml(y)
    msg = str(e.value)
    assert "\n" not in msg
    assert "'learnin_rate' (did you mean 'learning_rate', TRL's name for 'lr'?)" in msg
    assert "'optimm'" in msg and "'fp16' (TRL's) has no counterpart in orpo" in msg


def test_trl_name_without_an_orpo_field_is_no_counterpart_until_it_exists(tmp_path, monkeypatch):
    """optim arrives with another change; the alias table is generic: a missing target field reads as
    'no counterpart', an existing one is read."""
    from orpo.config import trl_names

    y = tmp_path / "c.yaml"
    y.write_text("optim: adamw_torch\n")
    if "optim" not in [f.name for f in C.fields()]:
        with pytest.raises(orpo.errors.UserError, match="'optim' \\(TRL's\\) has no counterpart in this version"):
            C.load_yaml(y)
    values, notes = trl_names.translate({"learning_rate": 1, "optim": "x"}, ["lr", "optim"], "t")
    assert values == {"lr": 1, "optim": "x"} and notes == ["reading TRL's learning_rate as lr"]
    with pytest.raises(orpo.errors.UserError, match="'learning_rate' and 'lr' both set 'lr'"):
        trl_names.translate({"lr": 1, "learning_rate": 2}, ["lr"], "t")
