"""Data identity on resume (issue 24): a checkpoint keeps the content ids of its training and evaluation
data; ``--resume`` on other content is refused in one line naming the file, the step and both hashes,
unless ``--allow-data-change``. Files, rows held in memory and hub names (by their resolved revision)."""

from __future__ import annotations

import hashlib
import json

import pytest

import orpo
from orpo.cli import main
from orpo.data import formats
from orpo.data.prepare import scan_rows
from orpo.errors import UserError

from conftest import PLAIN_ROWS, write_jsonl

OTHER_ROWS = [dict(r, chosen=r["chosen"] + " Indeed.") for r in PLAIN_ROWS]  # same count, other content


def run_cli(args) -> int:
    return main(["train", *map(str, args)])


def snapshot(out):
    """Every file of a run folder and its bytes (a refused resume must leave all of them as they were)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def first_run(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PLAIN_ROWS * 3)
    out = tmp_path / "run"
    base = ["--model", tiny_model_dir, "--data", data, "--output-dir", out, "--precision", "fp32", "--save-steps", 1,
            "--eval-samples", 0]
    assert run_cli(base + ["--max-steps", 2]) == 0
    return base, data, out


def test_the_checkpoint_and_data_counts_record_the_contents(first_run):
    _, data, out = first_run
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    ids = state["data"]
    assert ids["train"].startswith("sha256:") and len(ids["train"]) == len("sha256:") + 64
    counts = json.loads((out / "data_counts.json").read_text())
    assert counts["train"]["content"] == ids["train"] and "eval" not in ids  # (no --eval-data)


def test_resume_on_changed_file_is_refused_in_one_line_and_nothing_is_touched(first_run, capsys):
    base, data, out = first_run
    old = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())["data"]["train"]
    write_jsonl(data, OTHER_ROWS * 3)
    before = snapshot(out)
    capsys.readouterr()
    assert run_cli(base + ["--max-steps", 4, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("orpo: error: "), err
    line = err[0]
    assert str(data) in line and "the training data changed since step 2" in line
    assert old[len("sha256:"):][:16] in line  # the hash it trained on, and the one it finds
    assert "--allow-data-change" in line and "Traceback" not in line
    assert snapshot(out) == before


def test_allow_data_change_goes_on_with_the_new_rows(first_run, capsys):
    base, data, out = first_run
    write_jsonl(data, OTHER_ROWS * 3)
    capsys.readouterr()
    assert run_cli(base + ["--max-steps", 4, "--resume", "--allow-data-change"]) == 0
    said = capsys.readouterr().out
    assert "changed since step 2" in said and "going on with the new rows" in said
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)][-1] == 4
    # the later checkpoints record the new content (the file's sha256sum), so a further resume on it
    # needs no flag
    assert state["data"]["train"] == "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest()
    assert run_cli(base + ["--max-steps", 5, "--resume"]) == 0


def test_unchanged_data_resumes_without_a_word(first_run, capsys):
    base, _, _ = first_run
    capsys.readouterr()
    assert run_cli(base + ["--max-steps", 3, "--resume"]) == 0
    assert "changed since" not in capsys.readouterr().out


def test_changed_eval_file_is_refused(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", PLAIN_ROWS * 3)
    held = write_jsonl(tmp_path / "held.jsonl", PLAIN_ROWS)
    base = ["--model", tiny_model_dir, "--data", data, "--eval-data", held, "--output-dir", tmp_path / "run",
            "--precision", "fp32", "--save-steps", 1, "--eval-samples", 0]
    assert run_cli(base + ["--max-steps", 1]) == 0
    write_jsonl(held, OTHER_ROWS)
    capsys.readouterr()
    assert run_cli(base + ["--max-steps", 2, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{held}: the evaluation data changed since step 1" in err


def test_rows_in_memory_changed_under_resume(tmp_path, tiny_model_dir):
    rows = [dict(r) for r in PLAIN_ROWS * 3]
    cfg = dict(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), precision="fp32", save_steps=1,
               eval_samples=0)
    orpo.train(orpo.TrainConfig(data=rows, max_steps=2, **cfg))
    orpo.train(orpo.TrainConfig(data=rows, max_steps=3, resume=True, **cfg))  # the same rows: goes on
    rows[0]["chosen"] = " Paris, of course."
    with pytest.raises(UserError) as e:
        orpo.train(orpo.TrainConfig(data=rows, max_steps=4, resume=True, **cfg))
    msg = str(e.value)
    assert msg.startswith("in-memory list: the training data changed since step 3") and "different config" not in msg
    res = orpo.train(orpo.TrainConfig(data=rows, max_steps=4, resume=True, allow_data_change=True, **cfg))
    assert res.steps == 4


def test_a_hub_dataset_is_identified_and_read_by_its_resolved_revision(monkeypatch):
    """The revision the hub resolves the name to now is recorded and passed to datasets, so that every
    pass reads the same rows; another revision is another content."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    shas, loads = iter(["1" * 40, "2" * 40]), []

    class Info:
        def __init__(self):
            self.sha = next(shas)

    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", lambda self, repo, **kw: Info())

    def load_dataset(repo, split=None, streaming=False, revision=None):
        loads.append((repo, split, revision))
        return PLAIN_ROWS

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    formats.hub_revision.cache_clear()
    a = scan_rows("someone/prefs:train")
    assert a.content == f"hub:someone/prefs:train@{'1' * 40}" and a.n_read == len(PLAIN_ROWS)
    assert loads == [("someone/prefs", "train", "1" * 40)]
    formats.hub_revision.cache_clear()  # a new process, after the hub moved on
    b = scan_rows("someone/prefs:train")
    assert b.content.endswith("2" * 40) and b.key != a.key
    formats.hub_revision.cache_clear()
