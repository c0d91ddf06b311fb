"""Never lose a run: NaN steps, signals, kill -9 and resume, failed writes, safe loading defaults."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import poison_training_forwards, sigterm_after_rows
from orpo.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
VOLATILE = ("time_s", "tokens_per_s")


def read_rows(out: Path) -> list[dict]:
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rows.append({k: v for k, v in json.loads(line).items() if k not in VOLATILE})
    return rows


def max_logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return max(steps, default=-1)


def latest_checkpoint_step(out: Path) -> int:
    d = out / "checkpoints"
    steps = [int(p.name.split("-")[1]) for p in d.glob("step-*") if (p / "state.json").exists()] if d.is_dir() else []
    return max(steps, default=0)


def orpo_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "orpo", "train", *[str(a) for a in args]]


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
             OMP_NUM_THREADS="1")
    return e


def test_nan_step_is_skipped_and_never_reaches_the_weights(tmp_path, tiny_model_dir, plain_file, monkeypatch):
    # the second step's only micro-batch
    poison_training_forwards(monkeypatch, lambda out, n: out * float("nan") if n == 2 else out)
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(plain_file), "--output-dir", str(out),
               "--max-steps", "3", "--precision", "fp32", "--lr", "1e-2", "--save-steps", "1"])
    assert rc == 0
    rows = read_rows(out)
    assert [r.get("skipped", False) for r in rows] == [False, True, False]
    # the skipped step left the weights exactly as step 1 did
    from safetensors.torch import load_file

    w1 = load_file(out / "checkpoints" / "step-000002" / "trainable.safetensors")
    w0 = load_file(out / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in w0.values())
    assert all(torch.isfinite(v).all() for v in w1.values())


def test_nan_streak_stops_the_run_with_a_clear_message(tmp_path, tiny_model_dir, plain_file, monkeypatch, capsys):
    poison_training_forwards(monkeypatch, lambda out, n: out * float("inf"))  # every training step
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(plain_file), "--output-dir", str(out),
               "--max-steps", "10", "--precision", "fp32", "--max-bad-steps", "3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "stopped at step 3: 3 steps in a row had a NaN/Inf loss or gradient" in err
    assert len(err.strip().splitlines()) == 1


def test_failed_checkpoint_write_keeps_previous(tmp_path, tiny_model_dir, plain_file, monkeypatch, capsys):
    import errno

    import orpo.checkpoint as ck

    out = tmp_path / "run"
    real_save = torch.save
    state = {"n": 0}

    def flaky(obj, f, *a, **k):
        if "step-000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", flaky)
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(plain_file), "--output-dir", str(out),
               "--max-steps", "5", "--precision", "fp32", "--save-steps", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "could not write the checkpoint (No space left on device)" in err
    assert "previous checkpoints are intact" in err
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-000002"]  # no half-written folder left behind
    assert rc == 2 and state["n"] == 0


def test_pickle_weights_refused_unless_allowed(tmp_path, tiny_model_dir, plain_file, capsys):
    import shutil

    from transformers import AutoModelForCausalLM

    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    model = AutoModelForCausalLM.from_pretrained(d)
    (d / "model.safetensors").unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    rc = main(["train", "--model", str(d), "--data", str(plain_file), "--output-dir", str(tmp_path / "o"),
               "--max-steps", "1"])
    assert rc == 2 and "--allow-pickle" in capsys.readouterr().err


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(tmp_path, tiny_model_dir, conv_file):
    common = ["--model", tiny_model_dir, "--data", conv_file, "--precision", "fp32", "--scheduler", "constant",
              "--warmup-steps", 0, "--lr", 1e-3, "--max-steps", 40, "--save-steps", 1000, "--batch-size", 1]
    ref = tmp_path / "ref"
    subprocess.run(orpo_cmd(*common, "--output-dir", ref), env=env(), check=True, capture_output=True)
    out = tmp_path / "run"
    stdout, _ = sigterm_after_rows(orpo_cmd(*common, "--output-dir", out), out, env())
    assert "Resume with:" in stdout and "--resume" in stdout
    ckpts = sorted((out / "checkpoints").iterdir())
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 3 <= stopped_at < 40
    subprocess.run(orpo_cmd(*common, "--output-dir", out, "--resume"), env=env(), check=True, capture_output=True)
    assert read_rows(out) == read_rows(ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_at_random_points_then_resume_is_exact(tmp_path, tiny_model_dir, conv_file, seed):
    """A real subprocess is SIGKILLed at random moments (saves happen every other step, so kills land
    during saves too); each time it is resumed; the final metrics and weights equal an uninterrupted run."""
    from safetensors.torch import load_file

    common = ["--model", tiny_model_dir, "--data", conv_file, "--precision", "fp32", "--scheduler", "cosine",
              "--warmup-steps", 2, "--lr", 1e-3, "--max-steps", 30, "--save-steps", 2, "--batch-size", 1]
    ref = tmp_path / "ref"
    subprocess.run(orpo_cmd(*common, "--output-dir", ref), env=env(), check=True, capture_output=True)
    out = tmp_path / "run"
    rng = random.Random(seed)
    kills = 0
    args = orpo_cmd(*common, "--output-dir", out)
    for attempt in range(4):  # three random kills, then it runs to the end
        start = latest_checkpoint_step(out)
        proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait until this process has trained a step past its checkpoint, then kill at a random moment
        t0 = time.time()
        while proc.poll() is None and max_logged_step(out) <= start and time.time() - t0 < 120:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        if attempt == 3:
            proc.wait(timeout=600)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.kill()
        proc.wait()
        kills += 1
        args = orpo_cmd(*common, "--output-dir", out, "--resume")
    else:
        pytest.fail("run never finished")
    assert kills >= 1
    assert read_rows(out) == read_rows(ref)
    wa, wb = load_file(ref / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


CORPUS = Path(__file__).parent / "corpus" / "bad"
EXPECTED = json.loads((CORPUS / "EXPECTED.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input_corpus_gives_one_located_line(name, tmp_path, tiny_model_dir, capsys):
    """Every fatal data problem: exit 2, one line on stderr naming file, line and field, no traceback,
    and it happens before anything is written to the output folder."""
    import re

    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(CORPUS / name), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orpo: error: "), err
    assert re.search(EXPECTED[name], lines[0]), lines[0]
    assert "Traceback" not in err
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def test_suspect_rows_are_skipped_and_summarised_or_fatal_with_strict(tmp_path, tiny_model_dir, capsys):
    f = CORPUS / "suspect_rows.jsonl"
    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(f), "--output-dir", str(out), "--max-steps", "1",
               "--precision", "fp32"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "5 rows, 3 pairs kept" in text and "1 chosen identical to rejected (e.g. " in text and "suspect_rows.jsonl:2" in text
    counts = json.loads((out / "data_counts.json").read_text())["train"]
    assert counts["skipped_by_reason"] == {"chosen identical to rejected": 1, "empty completion": 1}
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(f), "--output-dir", str(tmp_path / "o2"), "--strict"])
    err = capsys.readouterr().err
    assert rc == 2 and "--strict" in err and "suspect_rows.jsonl:2" in err


def test_unwritable_output_dir_fails_before_heavy_work(tmp_path, tiny_model_dir, plain_file, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("x")
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(plain_file), "--output-dir", str(ro / "file" / "sub")])
    assert rc == 2 and "output folder is not writable" in capsys.readouterr().err


def test_missing_model_fails_fast(tmp_path, plain_file, capsys):
    rc = main(["train", "--model", str(tmp_path / "nope"), "--data", str(plain_file), "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and "model not found" in capsys.readouterr().err


def test_overwrite_with_bad_data_keeps_the_old_run(tmp_path, tiny_model_dir, plain_file, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(plain_file), "--output-dir", str(out),
                 "--max-steps", "1", "--precision", "fp32"]) == 0
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(CORPUS / "wrong_type.jsonl"),
               "--output-dir", str(out), "--overwrite"])
    assert rc == 2
    after = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert before == after
