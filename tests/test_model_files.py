"""Damaged or incomplete model files end in one line naming the file, before any heavy work.

Each fault is made on a copy of the tiny model folder (the shared fixture is never touched): a
safetensors file cut short, a shard named in the index but gone, a config.json and tokenizer files that
do not parse, a GGUF cut short. ``orpo train`` (and eval, export, generate where cheap) must stop with
exactly one ``orpo: error:`` line, no traceback, and nothing written to the output folder.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from orpo.cli import main
from orpo.errors import UserError
from orpo.modelfiles import DamagedModelFile, check_folder, check_gguf, check_model_path


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    return d


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """A real, loadable GGUF of the tiny Llama (orpo's own writer), shared read-only by the tests."""
    from orpo import export as X

    d = tmp_path_factory.mktemp("gguf")
    return X.export(tiny_model_dir, d, merge=False, gguf=True, gguf_type="f32", say=lambda *a: None).gguf


def cut(path: Path, nbytes: int) -> None:
    os.truncate(path, path.stat().st_size - nbytes)


def truncated_safetensors(d: Path) -> tuple[Path, str]:
    f = d / "model.safetensors"
    size = f.stat().st_size
    cut(f, 100)
    return f, f"truncated: {size - 100} bytes, the header says {size}"


def missing_shard(d: Path) -> tuple[Path, str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(d))
    (d / "model.safetensors").unlink()
    model.save_pretrained(d, max_shard_size="20KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    (d / shards[1]).unlink()
    return d / "model.safetensors.index.json", f"missing shard {shards[1]} named in the index"


def broken_config(d: Path) -> tuple[Path, str]:
    f = d / "config.json"
    text = f.read_text()
    f.write_text(text.replace('"model_type": "llama",', '"model_type": "llama"', 1))  # a comma lost in an edit
    line = next(i for i, s in enumerate(f.read_text().splitlines(), 1) if '"model_type"' in s) + 1
    return f, f"not valid JSON: Expecting ',' delimiter at line {line}"


def cut_tokenizer_json(d: Path) -> tuple[Path, str]:
    f = d / "tokenizer.json"
    f.write_bytes(f.read_bytes()[:5000])  # a download cut short
    return f, "not valid JSON"


def broken_tokenizer_config(d: Path) -> tuple[Path, str]:
    f = d / "tokenizer_config.json"
    f.write_text("{'eos_token': '<|im_end|>'}")  # Python, not JSON
    return f, "not valid JSON: Expecting property name enclosed in double quotes at line 1, column 2"


FAULTS = {"truncated-safetensors": truncated_safetensors, "missing-shard": missing_shard,
          "broken-config": broken_config, "cut-tokenizer-json": cut_tokenizer_json,
          "broken-tokenizer-config": broken_tokenizer_config}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("orpo: error: "), err
    return lines[0]


@pytest.mark.parametrize("fault", FAULTS)
def test_train_refuses_a_damaged_folder_in_one_line(fault, model_copy, plain_file, tmp_path, capsys, monkeypatch):
    damaged, what = FAULTS[fault](model_copy)
    capsys.readouterr()
    # the data and the model are never reached: the check runs before both
    setup = importlib.import_module("orpo.train.setup")  # (orpo.train names the function train)
    monkeypatch.setattr(setup, "read_data", lambda cfg: pytest.fail("read the data"))
    out = tmp_path / "run"
    rc = main(["train", "--model", str(model_copy), "--data", str(plain_file), "--output-dir", str(out)])
    line = one_error_line(capsys)
    assert rc != 0
    assert f"orpo: error: {damaged}: " in line and what in line and "re-download" in line, line
    assert not out.exists()  # nothing written, not even an empty folder


def test_existing_run_is_untouched(model_copy, plain_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    files = {"config.yaml": "lr: 1.0e-5\n", "metrics.jsonl": '{"step": 1}\n', "summary.json": "{}"}
    for name, text in files.items():
        (out / name).write_text(text)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    damaged, what = truncated_safetensors(model_copy)
    for flag in ("--overwrite", "--resume"):
        rc = main(["train", "--model", str(model_copy), "--data", str(plain_file), "--output-dir", str(out), flag])
        assert rc != 0 and what in one_error_line(capsys)
        assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


def test_run_folder_model_is_checked(model_copy, plain_file, tmp_path, capsys):
    """--model OUT (an orpo run folder) loads OUT/model: that folder's files are the ones checked."""
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "config.yaml").write_text("lr: 1.0e-5\n")
    shutil.move(model_copy, run / "model")
    damaged, what = broken_tokenizer_config(run / "model")
    capsys.readouterr()
    rc = main(["train", "--model", str(run), "--data", str(plain_file), "--output-dir", str(tmp_path / "o")])
    line = one_error_line(capsys)
    assert rc != 0 and f"{damaged}: {what}" in line


@pytest.mark.parametrize("fault", ["truncated-safetensors", "broken-config"])
def test_eval_generate_and_export_refuse_in_one_line(fault, model_copy, plain_file, tmp_path, capsys):
    damaged, what = FAULTS[fault](model_copy)
    capsys.readouterr()
    for argv in (["eval", "--model", str(model_copy), "--data", str(plain_file)],
                 ["generate", "--model", str(model_copy), "--prompt", "hello"]):
        assert main(argv) != 0
        line = one_error_line(capsys)
        assert f"{damaged}: " in line and what in line, line
    out = tmp_path / "exported"
    assert main(["export", str(model_copy), "--output", str(out)]) != 0
    line = one_error_line(capsys)
    assert f"{damaged}: " in line and what in line and "export another folder" in line, line
    assert not out.exists()


def test_truncated_gguf_refused_before_conversion(tiny_gguf, plain_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ORPO_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "tiny.gguf"
    shutil.copy(tiny_gguf, g)
    size = g.stat().st_size
    cut(g, 64)
    out = tmp_path / "run"
    rc = main(["train", "--model", str(g), "--data", str(plain_file), "--output-dir", str(out)])
    line = one_error_line(capsys)
    assert rc != 0 and f"orpo: error: {g}: truncated: {size - 64} bytes, the header says " in line, line
    assert not out.exists() and not (tmp_path / "cache").exists()  # no conversion was started
    # cut inside the header (the tokenizer's strings): the same one line, from the header parse
    cut(g, g.stat().st_size - 2000)
    with pytest.raises(DamagedModelFile, match="end inside the GGUF header"):
        check_gguf(g)


def test_gguf_header_matches_the_gguf_reader(tiny_gguf):
    """The furthest tensor end computed here is the one the gguf package's reader finds."""
    import gguf

    reader = gguf.GGUFReader(str(tiny_gguf))
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert end <= tiny_gguf.stat().st_size
    check_gguf(tiny_gguf)  # intact: passes


def test_damaged_cached_conversion_is_converted_again(tiny_gguf, tmp_path, monkeypatch):
    """orpo's own copy of a GGUF, damaged after the conversion, is rebuilt rather than refused."""
    from orpo.model import resolve_model

    monkeypatch.setenv("ORPO_CACHE", str(tmp_path / "cache"))
    folder = resolve_model(str(tiny_gguf), quiet=True)
    intact = (folder / "model.safetensors").read_bytes()
    cut(folder / "model.safetensors", 10)
    assert resolve_model(str(tiny_gguf), quiet=True) == folder
    assert (folder / "model.safetensors").read_bytes() == intact


def test_intact_folders_pass_quickly(tiny_model_dir, model_copy):
    t = time.perf_counter()
    check_folder(tiny_model_dir)
    check_model_path(tiny_model_dir)
    assert time.perf_counter() - t < 0.5
    from transformers import AutoModelForCausalLM

    (model_copy / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).save_pretrained(model_copy, max_shard_size="20KB")
    assert len(list(model_copy.glob("model-*.safetensors"))) >= 3
    check_folder(model_copy)  # every shard present and whole


@pytest.mark.parametrize("case", ["extra-bytes", "short-header", "bad-header", "config-list", "no-model-type",
                                  "empty-tokenizer-model", "cut-pickle"])
def test_other_faults_name_the_file(case, model_copy):
    f = model_copy / "model.safetensors"
    expect = {
        "extra-bytes": (f, "extra bytes at the end"),
        "short-header": (f, "too short for a safetensors header"),
        "bad-header": (f, "its header is not valid JSON"),
        "config-list": (model_copy / "config.json", "not a JSON object (a list)"),
        "no-model-type": (model_copy / "config.json", "has no model_type"),
        "empty-tokenizer-model": (model_copy / "tokenizer.model", "is empty (0 bytes)"),
        "cut-pickle": (model_copy / "pytorch_model.bin", "no zip central directory"),
    }[case]
    if case == "extra-bytes":
        with open(f, "ab") as fh:
            fh.write(b"\0" * 8)
    elif case == "short-header":
        f.write_bytes(b"\x10\0\0")
    elif case == "bad-header":
        raw = f.read_bytes()
        f.write_bytes(raw[:8] + b"!" + raw[9:])
    elif case == "config-list":
        (model_copy / "config.json").write_text("[1, 2]")
    elif case == "no-model-type":
        config = json.loads((model_copy / "config.json").read_text())
        del config["model_type"]
        (model_copy / "config.json").write_text(json.dumps(config))
        model_copy = model_copy.rename(model_copy.parent / "weights")  # no model type in the path either
        expect = (model_copy / "config.json", expect[1])
    elif case == "empty-tokenizer-model":
        (model_copy / "tokenizer.model").write_bytes(b"")
    elif case == "cut-pickle":
        import torch

        f.unlink()
        torch.save({"w": torch.zeros(1000)}, model_copy / "pytorch_model.bin")
        cut(model_copy / "pytorch_model.bin", 200)
    with pytest.raises(DamagedModelFile) as e:
        check_folder(model_copy)
    assert str(e.value).startswith(f"{expect[0]}: ") and expect[1] in str(e.value), e.value
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_safety_net_for_what_the_header_check_cannot_see(model_copy, plain_file, tmp_path, capsys):
    """A header whose shapes disagree with its byte ranges passes the length check; safetensors' own error
    at load time still ends in one line naming the folder."""
    f = model_copy / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    header[name]["shape"][0] -= 1
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    f.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n:])
    check_folder(model_copy)  # the sizes still add up
    rc = main(["train", "--model", str(model_copy), "--data", str(plain_file), "--output-dir", str(tmp_path / "o"),
               "--max-steps", "1"])
    line = one_error_line(capsys)
    assert rc != 0 and f"orpo: error: {model_copy}: cannot load the model" in line, line
    assert not (tmp_path / "o").exists()


def test_safety_net_for_a_tokenizer_json_that_is_not_a_tokenizer(model_copy, plain_file, tmp_path, capsys):
    (model_copy / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nothing"}}')
    rc = main(["train", "--model", str(model_copy), "--data", str(plain_file), "--output-dir", str(tmp_path / "o")])
    line = one_error_line(capsys)
    assert rc != 0 and f"orpo: error: {model_copy}: cannot load the tokenizer" in line and "re-download" in line, line
    assert not (tmp_path / "o").exists()
