"""Finished runs stay finished: `--resume` with nothing left to do says so and changes no file; extending
a finished run (a larger --max-steps) keeps its step-0 "before" answers, a complete summary and model
card, and no metrics row twice. Run like the default job: the built-in data (which has held-out questions
answered before and after) and a recipe that says `overwrite: true`."""

import json
from collections import Counter

from orpo.cli import main
from orpo.resume import resume_command


def snapshot(out):
    return {p.relative_to(out): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}


def samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_finished_default_style_job_resumed_changes_nothing_then_extends_completely(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    recipe = tmp_path / "job.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\noutput_dir: {out}\noverwrite: true\nprecision: fp32\nmax_rows: 24\n"
                      "batch_size: 2\nsave_steps: 0\neval_steps: 0\nlr: 1.0e-3\n")
    assert main(["train", str(recipe), "--max-steps", "2"]) == 0
    first = samples(out)
    assert first and all(r["before"] is not None for r in first)
    snap = snapshot(out)
    capsys.readouterr()

    # the resume command orpo prints for this job (the recipe's overwrite: true would contradict --resume)
    cmd = resume_command(out, True, ["orpo", "train", str(recipe), "--max-steps", "2", "--resume"])
    assert cmd.endswith(f"{recipe} --max-steps 2 --no-overwrite --resume")
    assert main(["train", str(recipe), "--max-steps", "2", "--no-overwrite", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "this run is finished (2 of 2 steps" in text and "larger --max-steps" in text
    assert snapshot(out) == snap  # not a byte, not a timestamp

    assert main(["train", str(recipe), "--max-steps", "4", "--no-overwrite", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    later = samples(out)
    assert [r["before"] for r in later] == [r["before"] for r in first]  # step-0 answers kept
    assert all(r["after"] is not None for r in later)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final"]["step"] == 4 and summary["eval"]["step"] == 4
    assert summary["answer_accuracy"] is not None
    card = (out / "model" / "README.md").read_text()
    assert "| loss |" in card and "Held-out questions answered exactly right" in card
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = Counter((r["step"], "eval" if "eval_loss" in r else "train") for r in rows)
    assert all(n == 1 for n in kinds.values()), kinds
    assert [s for (s, k) in sorted(kinds) if k == "train"] == [1, 2, 3, 4]


def test_resume_command_for_the_default_job_goes_through_its_recipe(monkeypatch, tmp_path):
    """`orpo train` with no arguments runs recipes/default.yaml; the line that says how to resume it must
    be a command that resumes it (the recipe no longer says overwrite: true, so nothing to turn off)."""
    import importlib

    import orpo.cli as cli

    tr = importlib.import_module("orpo.train")  # the module (orpo.train, the attribute, is the API function)
    seen = {}

    def fake_train(cfg, argv_for_resume=None):
        seen["cmd"] = resume_command(cfg.output_dir, cfg.overwrite, argv_for_resume)
        raise SystemExit(0)

    monkeypatch.setattr(tr, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    try:
        cli.main(["train"])
    except SystemExit:
        pass
    assert seen["cmd"] == "orpo train --resume"


def test_extended_run_keeps_the_before_answers_of_its_sample_prompts(tmp_path, tiny_model_dir, conv_file, capsys):
    out = tmp_path / "run"
    base = ["train", "--model", str(tiny_model_dir), "--data", str(conv_file), "--eval-data", str(conv_file),
            "--output-dir", str(out), "--precision", "fp32", "--eval-samples", "2", "--lr", "1e-2"]
    assert main(base + ["--max-steps", "1"]) == 0
    first = samples(out)
    assert len(first) == 2 and all(r["before"] for r in first)
    assert main(base + ["--max-steps", "3", "--resume"]) == 0
    later = samples(out)
    assert [r["before"] for r in later] == [r["before"] for r in first]
    assert json.loads((out / "summary.json").read_text())["final"]["step"] == 3
