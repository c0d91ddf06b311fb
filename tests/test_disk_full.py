"""A failed write (no space, quota, read-only, I/O error) in a checkpoint, the final model, the report or
metrics.jsonl ends the run with one line naming the path, the cause and the resume command; what was half
written is removed, complete checkpoints and metrics rows are kept, and the resume then finishes the run
as if nothing had happened. Faults are injected into the real write paths, and (as root) a real small
tmpfs fills up."""

import builtins
import errno
import json
import os
import pathlib
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from orpo import integrity
from orpo.cli import main

VOLATILE = ("time_s", "tokens_per_s")
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def args_for(model, data, out, steps=4, save=2):
    return ["train", "--model", str(model), "--data", str(data), "--eval-data", str(data), "--precision", "fp32", "--no-lora",
            "--batch-size", "2", "--scheduler", "constant", "--warmup-steps", "0", "--lr", "1e-3",
            "--max-steps", str(steps), "--save-steps", str(save), "--output-dir", str(out)]


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def no_temporaries(out):
    left = [p for p in out.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]
    assert not left, left


def resume_and_compare(args, ref, out):
    assert main(args + ["--resume"]) == 0
    assert rows(out) == rows(ref)  # every row once, the same floats
    wa, wb = load_file(ref / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"] and summary["eval"] and summary["steps"] == 4


@pytest.fixture
def ref(tmp_path, tiny_model_dir, conv_file):
    out = tmp_path / "ref"
    assert main(args_for(tiny_model_dir, conv_file, out)) == 0
    return out


def test_full_disk_during_the_final_model_save(tmp_path, tiny_model_dir, conv_file, ref, monkeypatch, capsys):
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    real = mu.safe_save_file

    def full(tensors, filename, *a, **k):
        real(tensors, filename, *a, **k)  # the bytes land, then the disk is full (as safetensors reports it)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", full)
    out = tmp_path / "run"
    args = args_for(tiny_model_dir, conv_file, out)
    capsys.readouterr()
    assert main(args) == 2
    line = one_line(capsys)
    assert line.startswith(f"orpo: error: {out / 'model'}: could not write the final model (No space left on device)")
    assert "the previous checkpoints are intact (newest: step-000004)" in line
    assert "metrics.jsonl keeps every row logged so far" in line
    assert line.endswith("resume with: " + " ".join(["orpo", *args, "--resume"]))
    no_temporaries(out)
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert integrity.verify(out / "checkpoints" / "step-000004") == []
    monkeypatch.setattr(mu, "safe_save_file", real)
    resume_and_compare(args, ref, out)  # redoes only the end: no second final eval row


def test_full_disk_while_appending_a_metrics_row(tmp_path, tiny_model_dir, conv_file, ref, monkeypatch, capsys):
    import orpo.diskio as dio

    out = tmp_path / "run"
    calls = {"n": 0}

    class HalfWriter:
        def __init__(self, fh):
            self.fh = fh

        def write(self, text):
            calls["n"] += 1
            if calls["n"] == 4:  # the 4th row: half of it lands, then the disk is full
                self.fh.write(text[: len(text) // 2])
                self.fh.flush()
                raise ENOSPC
            return self.fh.write(text)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

    def flaky_open(path, mode="r", *a, **k):
        fh = builtins.open(path, mode, *a, **k)
        return HalfWriter(fh) if str(path).endswith("metrics.jsonl") and "a" in mode else fh

    monkeypatch.setattr(dio, "open", flaky_open, raising=False)
    args = args_for(tiny_model_dir, conv_file, out)
    capsys.readouterr()
    assert main(args) == 2
    line = one_line(capsys)
    assert f"{out / 'metrics.jsonl'}: could not write metrics.jsonl (No space left on device)" in line
    assert "newest: step-000002" in line and "--resume" in line
    assert [r["step"] for r in rows(out)] == [0, 1, 2]  # the complete rows; no half row
    no_temporaries(out)
    monkeypatch.setattr(dio, "open", builtins.open, raising=False)
    resume_and_compare(args, ref, out)


def test_full_disk_while_writing_the_report(tmp_path, tiny_model_dir, conv_file, monkeypatch, capsys):
    out = tmp_path / "run"
    real = pathlib.Path.write_text

    def full(self, *a, **k):
        if self.name == ".report.html.tmp":
            real(self, "<html>half a page", encoding="utf-8")
            raise ENOSPC
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    args = args_for(tiny_model_dir, conv_file, out)
    assert main(args) == 2
    line = one_line(capsys)
    assert f"{out / 'report.html'}: could not write the report (No space left on device)" in line
    no_temporaries(out)
    assert (out / "summary.json").exists() and (out / "model" / "README.md").exists()
    monkeypatch.setattr(pathlib.Path, "write_text", real)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(args + ["--resume"]) == 0  # finished: only the missing report is written
    assert "this run is finished" in capsys.readouterr().out
    assert (out / "report.html").exists()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "report.html"} == before


@pytest.fixture
def small_disk(tmp_path):
    """A real 1.2 MB tmpfs (root only): room for two checkpoints of the tiny model, not three."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "disk"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def grow(disk):
    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)


def test_real_full_disk_is_refused_before_the_save_saying_how_much_is_needed(small_disk, tiny_model_dir, conv_file,
                                                                             capsys):
    out = small_disk / "run"
    args = args_for(tiny_model_dir, conv_file, out, steps=6, save=1)
    assert main(args) == 2
    line = one_line(capsys)
    assert "could not write the checkpoint (it needs about" in line and f"is free on {small_disk})" in line
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept and all(integrity.verify(out / "checkpoints" / k) == [] for k in kept)
    no_temporaries(out)
    grow(small_disk)
    assert main(args + ["--resume"]) == 0


def test_real_full_disk_inside_torch_save(small_disk, tmp_path, tiny_model_dir, conv_file, monkeypatch, capsys):
    """Without the free-space check, the disk fills inside torch.save / safetensors themselves (torch would
    say `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos`)."""
    import orpo.diskio as dio

    ref = tmp_path / "ref"
    assert main(args_for(tiny_model_dir, conv_file, ref, steps=6, save=1)) == 0
    monkeypatch.setattr(dio, "check_free", lambda *a, **k: None)
    out = small_disk / "run"
    args = args_for(tiny_model_dir, conv_file, out, steps=6, save=1)
    capsys.readouterr()
    assert main(args) == 2
    line = one_line(capsys)
    assert "could not write the checkpoint (No space left on device)" in line, line
    assert "resume with: orpo train" in line
    no_temporaries(out)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept and all(integrity.verify(out / "checkpoints" / k) == [] for k in kept)
    grow(small_disk)
    assert main(args + ["--resume"]) == 0
    assert rows(out) == rows(ref)
