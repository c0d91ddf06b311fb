"""Damaged checkpoints: the manifest (sizes + CRC-32) catches them on --resume, the run falls back to the
newest intact one and still equals an uninterrupted run; checkpoints of an older orpo (no manifest)
still resume, and are checked by what their files say about themselves."""

import json
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from orpo import integrity
from orpo.cli import main

VOLATILE = ("time_s", "tokens_per_s")


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(out):
    return {p.relative_to(out): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}


def common(model, data):
    return ["train", "--model", str(model), "--data", str(data), "--eval-data", str(data), "--precision", "fp32",
            "--batch-size", "2", "--scheduler", "constant", "--warmup-steps", "0", "--lr", "1e-3",
            "--save-steps", "2", "--save-total-limit", "3"]


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,file,expect", [
    (truncate, "trainable.safetensors", "trainable.safetensors is {size:,} bytes, expected {full:,}"),
    (flip_a_byte, "optimizer.pt", "optimizer.pt fails its checksum"),
])
def test_damaged_newest_checkpoint_costs_only_the_steps_since_the_one_before(
        tmp_path, tiny_model_dir, conv_file, capsys, damage, file, expect):
    args = common(tiny_model_dir, conv_file) + ["--max-steps", "6"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main(args + ["--output-dir", str(ref)]) == 0
    assert main(args + ["--output-dir", str(out)]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    target = out / "checkpoints" / "step-000006" / file
    full = target.stat().st_size
    damage(target)
    size = target.stat().st_size
    capsys.readouterr()
    assert main(args + ["--output-dir", str(out), "--resume"]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if " is damaged (" in x)
    assert "step-000006 is damaged (" + expect.format(size=size, full=full) + ")" in line
    assert "resuming from step-000004" in line
    assert "resumed from" in text and "(step 4 of 6)" in text
    # the damaged copy is set aside, not pruned into the kept ones, and step 6 is written afresh
    assert (out / "checkpoints" / "damaged-step-000006" / file).stat().st_size == size
    assert integrity.verify(out / "checkpoints" / "step-000006") == []
    wa, wb = load_file(ref / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert rows(out) == rows(ref)  # every row, bitwise the same floats, none twice


def test_no_intact_checkpoint_is_refused_in_one_line_naming_the_damaged_files(tmp_path, tiny_model_dir, conv_file,
                                                                               capsys):
    out = tmp_path / "run"
    args = common(tiny_model_dir, conv_file) + ["--max-steps", "4", "--output-dir", str(out)]
    assert main(args) == 0
    truncate(out / "checkpoints" / "step-000004" / "trainable.safetensors")
    (out / "checkpoints" / "step-000002" / "optimizer.pt").unlink()
    before = snapshot(out)
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "every checkpoint is damaged" in lines[0]
    assert "step-000004: trainable.safetensors is" in lines[0] and "step-000002: optimizer.pt missing" in lines[0]
    assert snapshot(out) == before  # nothing changed


def test_checkpoint_of_an_older_orpo_without_manifest_resumes_exactly(tmp_path, tiny_model_dir, conv_file, capsys):
    base = common(tiny_model_dir, conv_file) + ["--save-steps", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(base + ["--output-dir", str(a), "--max-steps", "6"]) == 0
    assert main(base + ["--output-dir", str(b), "--max-steps", "3"]) == 0
    (b / "checkpoints" / "step-000003" / "manifest.json").unlink()  # as written before manifests existed
    assert integrity.verify(b / "checkpoints" / "step-000003") == []
    assert main(base + ["--output-dir", str(b), "--max-steps", "6", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r for r in rows(a) if "loss" in r] == [r for r in rows(b) if "loss" in r]
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_structure_checks_for_checkpoints_without_manifest(tmp_path):
    d = tmp_path / "step-000001"
    d.mkdir()
    (d / "state.json").write_text("{}")
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(d / "trainable.safetensors"))
    torch.save({"state": torch.arange(1000, dtype=torch.float32)}, d / "optimizer.pt")
    assert integrity.verify(d) == []
    # a cut-short safetensors file: the header says where the tensors end
    full = (d / "trainable.safetensors").read_bytes()
    (d / "trainable.safetensors").write_bytes(full[:-10])
    assert integrity.verify(d) == [f"trainable.safetensors is {len(full) - 10:,} bytes, its header says {len(full):,}"]
    (d / "trainable.safetensors").write_bytes(full)
    # a torch file with a flipped byte in a tensor: its zip member's CRC-32 no longer matches
    raw = bytearray((d / "optimizer.pt").read_bytes())
    with zipfile.ZipFile(d / "optimizer.pt") as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0xFF
    (d / "optimizer.pt").write_bytes(bytes(raw))
    assert integrity.verify(d) == [f"optimizer.pt fails its checksum (member {info.filename})"]
    (d / "optimizer.pt").write_bytes(bytes(raw[:500]))
    assert integrity.verify(d) == ["optimizer.pt is not a complete torch file"]
    (d / "state.json").write_text("{")
    assert integrity.verify(d)[0] == "state.json unreadable"


def test_manifest_records_every_file(tmp_path):
    d = tmp_path / "c"
    (d / "sub").mkdir(parents=True)
    (d / "state.json").write_text("{}")
    (d / "sub" / "x.bin").write_bytes(b"abc")
    integrity.write_manifest(d)
    m = json.loads((d / "manifest.json").read_text())
    assert m["files"] == {"state.json": {"size": 2, "crc32": integrity.crc32_of(d / "state.json")},
                          "sub/x.bin": {"size": 3, "crc32": "352441c2"}}
    assert integrity.verify(d) == []
    (d / "sub" / "x.bin").write_bytes(b"abd")
    assert integrity.verify(d) == ["sub/x.bin fails its checksum"]
