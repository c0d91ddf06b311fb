import json
import math

import numpy as np
import pytest
import torch

from orpo.cli import main
from orpo.train import StepPlan, lr_factor

METRIC_NAMES = ["step", "epoch", "time_s", "pair_tokens", "loss", "nll_loss", "log_odds_ratio", "log_odds_chosen",
                "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "grad_norm", "learning_rate"]


def test_step_plan_covers_each_pair_once_per_epoch_and_partitions_processes():
    plan = StepPlan(n_pairs=23, batch_size=2, grad_accum=3, world=2, seed=7, epochs=2, max_steps=None)
    assert plan.global_batch == 12 and plan.steps_per_epoch == 2 and plan.total_steps == 4
    for epoch in range(2):
        seen = np.concatenate([plan.step_pairs(epoch * 2 + k) for k in range(2)])
        assert sorted(seen.tolist()) == list(range(23))
    for step in range(4):
        parts = [m for r in range(2) for m in plan.micro_batches(step, r)]
        assert sorted(np.concatenate(parts).tolist()) == sorted(plan.step_pairs(step).tolist())
        assert all(len(m) <= 2 for m in parts)
    assert not np.array_equal(plan.step_pairs(0), plan.step_pairs(2))  # reshuffled per epoch


def test_lr_schedules():
    assert lr_factor(0, 100, 10, "linear") == pytest.approx(1 / 11)  # warmup never uses a zero rate
    assert lr_factor(10, 100, 10, "linear") == 1.0
    assert lr_factor(99, 100, 10, "linear") == pytest.approx(1 / 90)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(50, 100, 10, "constant") == 1.0
    assert lr_factor(39, 100, 10, "inverse_sqrt") == pytest.approx(math.sqrt(10 / 40))


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_cli(args):
    return main(["train", *[str(a) for a in args]])


def test_cli_end_to_end_tiny_model(tmp_path, tiny_model_dir, conv_file):
    out = tmp_path / "run"
    rc = run_cli(["--model", tiny_model_dir, "--data", conv_file, "--eval-data", conv_file, "--output-dir", out,
                  "--max-steps", 3, "--batch-size", 2, "--grad-accum", 2, "--precision", "fp32", "--save-steps", 2,
                  "--lr", 1e-3])
    assert rc == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "data_counts.json", "model/config.json",
                 "model/model.safetensors", "model/tokenizer_config.json"):
        assert (out / name).exists(), name
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert [r["step"] for r in eval_rows] == [0, 3]
    for r in train_rows:
        for name in METRIC_NAMES:
            assert name in r, name
            assert math.isfinite(r[name]), (name, r[name])
        assert r["pair_tokens"] > 0
    for name in METRIC_NAMES[4:14]:
        assert "eval_" + name in eval_rows[-1]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000002", "step-000003"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")


def test_cli_lora_saves_adapter_and_merged_model(tmp_path, tiny_model_dir, plain_file):
    out = tmp_path / "run"
    rc = run_cli(["--model", tiny_model_dir, "--data", plain_file, "--output-dir", out, "--max-steps", 2,
                  "--lora", "--lora-r", 4, "--precision", "bf16"])
    assert rc == 0
    assert (out / "adapter" / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ck = sorted((out / "checkpoints").iterdir())[-1]
    from safetensors.torch import load_file

    assert all("lora" in k for k in load_file(ck / "trainable.safetensors"))  # adapters only


def test_existing_run_is_not_overwritten(tmp_path, tiny_model_dir, plain_file, capsys):
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--data", plain_file, "--output-dir", out, "--max-steps", 1, "--precision", "fp32"]
    assert run_cli(args) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "metrics.jsonl").read_text() == before
    assert run_cli(args + ["--overwrite"]) == 0


def test_resume_continues_exactly(tmp_path, tiny_model_dir, conv_file):
    common = ["--model", tiny_model_dir, "--data", conv_file, "--precision", "fp32", "--batch-size", 2,
              "--scheduler", "constant", "--warmup-steps", 0, "--lr", 1e-3, "--save-steps", 3]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(common + ["--output-dir", a, "--max-steps", 6]) == 0
    assert run_cli(common + ["--output-dir", b, "--max-steps", 3]) == 0
    assert run_cli(common + ["--output-dir", b, "--max-steps", 6, "--resume"]) == 0
    ra = [r for r in read_metrics(a)]
    rb = [r for r in read_metrics(b)]
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(ra, rb):
        x = {k: v for k, v in x.items() if k not in ("time_s", "tokens_per_s")}
        y = {k: v for k, v in y.items() if k not in ("time_s", "tokens_per_s")}
        assert x == y  # bitwise: same floats
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_changed_config_is_refused(tmp_path, tiny_model_dir, plain_file, capsys):
    out = tmp_path / "run"
    base = ["--model", tiny_model_dir, "--data", plain_file, "--output-dir", out, "--precision", "fp32"]
    assert run_cli(base + ["--max-steps", 2]) == 0
    capsys.readouterr()
    assert run_cli(base + ["--max-steps", 4, "--resume", "--beta", 0.3]) == 2
    assert "different config (beta changed)" in capsys.readouterr().err


def test_unknown_flag_suggests(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--max-lenght", "5"])
    assert e.value.code == 2
    assert "unknown option --max-lenght (did you mean --max-length?)" in capsys.readouterr().err


def test_bad_data_is_one_line_error(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n')
    rc = run_cli(["--model", tiny_model_dir, "--data", bad, "--output-dir", tmp_path / "o"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == (f"orpo: error: {bad}:2: missing field 'chosen'; the row's keys are 'prompt'; "
                                       "map other names with --columns (e.g. --columns prompt=KEY,chosen=KEY,rejected=KEY)")


def test_help_documents_every_option(capsys):
    from orpo import config as C

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in C.fields():
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "[default:" in text


def test_eval_command_prints_json(tmp_path, tiny_model_dir, conv_file, capsys):
    rc = main(["eval", "--model", str(tiny_model_dir), "--data", str(conv_file), "--precision", "fp32"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = json.loads(last)
    assert m["eval_pairs"] == 12 and 0 <= m["eval_rewards/accuracies"] <= 1
    assert math.isfinite(m["eval_loss"])
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "nll_loss"):
        lo, hi = m[f"eval_{key}_ci"]
        assert lo <= m[f"eval_{key}"] <= hi, key


def test_report_to_tensorboard_writes_events(tmp_path, tiny_model_dir, plain_file):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert run_cli(["--model", tiny_model_dir, "--data", plain_file, "--output-dir", out, "--max-steps", 2,
                    "--precision", "fp32", "--report-to", "tensorboard"]) == 0
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"] and len(acc.Scalars("loss")) == 2
    assert (out / "metrics.jsonl").exists()


def test_missing_tracker_names_the_install_command(tmp_path, tiny_model_dir, plain_file, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    rc = run_cli(["--model", tiny_model_dir, "--data", plain_file, "--output-dir", tmp_path / "o", "--report-to", "wandb"])
    assert rc == 2 and "pip install wandb" in capsys.readouterr().err
    rc = run_cli(["--model", tiny_model_dir, "--data", plain_file, "--output-dir", tmp_path / "o", "--report-to", "tensorbord"])
    assert rc == 2 and "did you mean 'tensorboard'" in capsys.readouterr().err


def test_qlora_without_cuda_is_a_clear_error(tmp_path, tiny_model_dir, plain_file, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = run_cli(["--model", tiny_model_dir, "--data", plain_file, "--output-dir", tmp_path / "o", "--load-in-4bit", "--lora"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1
    rc = run_cli(["--model", tiny_model_dir, "--data", plain_file, "--output-dir", tmp_path / "o", "--load-in-4bit",
                  "--no-lora"])
    assert rc == 2 and "add --lora" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
def test_qlora_trains_on_gpu(tmp_path, tiny_model_dir, plain_file):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    assert run_cli(["--model", tiny_model_dir, "--data", plain_file, "--output-dir", out, "--max-steps", 2,
                    "--load-in-4bit", "--lora", "--lora-r", 4]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert getattr(merged, "is_quantized", False) is False
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out) if "loss" in r)


def test_resume_with_more_steps_uses_the_new_schedule(tmp_path, tiny_model_dir, plain_file):
    out = tmp_path / "run"
    base = ["--model", tiny_model_dir, "--data", plain_file, "--output-dir", out, "--precision", "fp32",
            "--lr", 1e-3, "--warmup-steps", 0, "--save-steps", 2]
    assert run_cli(base + ["--max-steps", 2]) == 0
    assert run_cli(base + ["--max-steps", 4, "--resume"]) == 0
    lrs = [r["learning_rate"] for r in read_metrics(out) if "loss" in r]
    # steps 3 and 4 of a 4-step linear decay, not the finished 2-step schedule's zero
    assert lrs[2:] == pytest.approx([1e-3 * 2 / 4, 1e-3 * 1 / 4])


def test_deepspeed_settings_without_a_dataloader(tiny_model, monkeypatch):
    """Accelerate takes DeepSpeed's micro-batch size from a prepared dataloader; the loop has none, so
    it is set from --batch-size, and clipping from --max-grad-norm. Under ZeRO-3 the lm-head weight,
    read directly by the chunked loss, is registered with DeepSpeed as the policy's external parameter."""
    import sys
    import types

    from orpo.config import build
    from orpo.forward import PolicyForward
    from orpo.train.engine import configure_deepspeed

    registered = []
    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(register_external_parameter=lambda m, p: registered.append((m, p)))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    policy = PolicyForward(tiny_model)
    cfg = build({"batch_size": 3, "max_grad_norm": 0.5})
    for stage, expected in ((2, 0), (3, 1)):
        registered.clear()
        ds = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"}
        acc = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(deepspeed_config=ds)))
        configure_deepspeed(acc, policy, cfg)
        assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_clipping"] == 0.5
        assert len(registered) == expected
        if expected:
            assert registered[0][0] is policy and registered[0][1] is tiny_model.get_output_embeddings().weight
