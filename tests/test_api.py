"""The Python API: orpo.train / evaluate / export_model on the tiny model, with data held in memory."""

import dataclasses
import json
import math
import os
import signal
import threading
import time

import pytest

import orpo
from conftest import CONV_ROWS, PLAIN_ROWS, write_jsonl

VOLATILE = ("time_s", "tokens_per_s")


def rows_of(out):
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def small(model, out, data, **kw):
    return orpo.TrainConfig(model=str(model), data=data, output_dir=str(out), max_steps=3, batch_size=2,
                            precision="fp32", lr=1e-3, save_steps=0, eval_samples=0, **kw)


def test_notebook_flow_dataset_train_evaluate_export(tmp_path, tiny_model_dir):
    """The README's notebook example, on the tiny model: a datasets.Dataset in, metrics, a model, an export."""
    import datasets

    ds = datasets.Dataset.from_list(CONV_ROWS * 3)
    held_out = CONV_ROWS[:2]  # a list of dicts
    result = orpo.train(small(tiny_model_dir, tmp_path / "run", ds, eval_data=held_out))
    assert result.steps == 3 and not result.stopped
    assert math.isfinite(result.final_metrics["loss"]) and "eval_loss" in result.eval_metrics
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "in-memory Dataset (12 rows" in saved and "in-memory list (2 rows" in saved
    metrics = orpo.evaluate(result.model_dir, held_out, precision="fp32")
    assert metrics["eval_pairs"] == 2 and math.isfinite(metrics["eval_loss"])
    # the trained model scores the held-out pairs exactly as the run's own final evaluation did
    assert metrics["eval_loss"] == pytest.approx(result.eval_metrics["eval_loss"], rel=1e-5)
    exported = orpo.export_model(result.output_dir, tmp_path / "export")
    assert (exported.dest / "model.safetensors").is_file() and (exported.dest / "README.md").is_file()


def test_every_in_memory_form_trains_like_the_file(tmp_path, tiny_model_dir):
    """A jsonl file, a list of dicts, a pandas DataFrame and a datasets.Dataset of the same rows give the same
    run, bit for bit; four train() calls in one process (the second run of a process works)."""
    import datasets
    import pandas as pd

    rows = PLAIN_ROWS * 3
    forms = {"file": str(write_jsonl(tmp_path / "p.jsonl", rows)), "list": rows, "frame": pd.DataFrame(rows),
             "dataset": datasets.Dataset.from_list(rows)}
    runs = {}
    for name, data in forms.items():
        orpo.train(small(tiny_model_dir, tmp_path / name, data))
        runs[name] = rows_of(tmp_path / name)
    assert len(runs["file"]) == 3
    for name in ("list", "frame", "dataset"):
        assert runs[name] == runs["file"], name


def test_train_off_the_main_thread(tmp_path, tiny_model_dir):
    """A notebook may run training in a thread: signal handlers cannot be set there, and need not be."""
    out = {}

    def work():
        try:
            out["result"] = orpo.train(small(tiny_model_dir, tmp_path / "t", PLAIN_ROWS * 3))
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=300)
    assert "error" not in out, out.get("error")
    assert out["result"].steps == 3


def test_sigterm_returns_stopped_and_resume_from_python_is_exact(tmp_path, tiny_model_dir):
    """On the main thread (a notebook's kernel), SIGTERM / interrupt saves and returns result.stopped; the
    printed hint, train(config, resume=True), continues to exactly the uninterrupted run."""
    rows = CONV_ROWS * 3
    common = dict(max_steps=30, batch_size=1, scheduler="constant", warmup_steps=0)
    ref, out = tmp_path / "ref", tmp_path / "run"
    orpo.train(dataclasses.replace(small(tiny_model_dir, ref, rows), **common))
    cfg = dataclasses.replace(small(tiny_model_dir, out, rows), **common)
    before = signal.getsignal(signal.SIGTERM)

    def killer():
        path = out / "metrics.jsonl"
        while not path.exists() or len(path.read_text().splitlines()) < 3:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=killer, daemon=True).start()
    first = orpo.train(cfg)
    assert first.stopped and 3 <= first.steps < 30
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    second = orpo.train(cfg, resume=True)
    assert second.steps == 30 and not second.stopped
    assert rows_of(out) == rows_of(ref)


def test_trl_keywords_in_python(capsys):
    cfg = orpo.TrainConfig(learning_rate=3e-4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           num_train_epochs=2, bf16=False, disable_dropout=False)
    assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.precision, cfg.keep_dropout) == \
        (3e-4, 4, 2, 2, "fp32", True)
    err = capsys.readouterr().err
    assert "reading TRL's learning_rate as lr" in err and "reading TRL's bf16 as precision = 'fp32'" in err
    with pytest.raises(orpo.errors.UserError) as e:
        orpo.TrainConfig(learnin_rate=1, foo=2)
    assert "'learnin_rate' (did you mean 'learning_rate', TRL's name for 'lr'?)" in str(e.value)
    assert "'foo'" in str(e.value)


def test_default_job_with_changes():
    job = orpo.default_job(max_steps=20)
    assert (job.lora, job.lr, job.batch_size, job.max_length, job.max_steps) == (True, 1e-4, 8, 256, 20)
    assert not job.overwrite
    assert orpo.default_job(learning_rate=3e-4).lr == 3e-4


def test_import_orpo_stays_light_and_names_are_functions():
    import subprocess
    import sys

    code = ("import sys, orpo; import orpo.train, orpo.evaluate; "
            "print(callable(orpo.train) and not isinstance(orpo.train, type(sys)), "
            "callable(orpo.evaluate) and not isinstance(orpo.evaluate, type(sys)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True True"
    code = "import sys, orpo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_in_memory_data_is_recorded_by_its_content():
    import datasets

    rows = PLAIN_ROWS * 2
    a = orpo.TrainConfig(data=rows)
    assert a.fingerprint() == orpo.TrainConfig(data=[dict(r) for r in rows]).fingerprint()
    changed = [dict(r) for r in rows]
    changed[0]["chosen"] = " Marseille."
    assert a.fingerprint() != orpo.TrainConfig(data=changed).fingerprint()
    label = orpo.TrainConfig(data=datasets.Dataset.from_list(rows)).to_dict()["data"]
    assert label.startswith("in-memory Dataset (8 rows, ")
    with pytest.raises(orpo.errors.UserError, match="data must be a path, a datasets.Dataset"):
        orpo.train(orpo.TrainConfig(data=42))
    with pytest.raises(orpo.errors.UserError, match="a dict is not a list of rows"):
        from orpo.data.readers import load_pairs

        load_pairs({"prompt": "a", "chosen": "b", "rejected": "c"})
