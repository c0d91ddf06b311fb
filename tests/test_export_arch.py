"""GGUF export writes Llama-architecture models only, and says so in one line before loading anything
else; merged safetensors export takes every architecture."""

from __future__ import annotations

import pytest

from orpo.cli import main

from archs import build
from conftest import make_tiny_llama


def orpo_lines(err: str) -> list[str]:
    """orpo's own lines on stderr (libraries imported on the way may log their own)."""
    return [line for line in err.splitlines() if line.startswith("orpo:")]


def _save(model, tokenizer, d):
    model.save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("name", ["qwen2", "mistral", "gemma"])
def test_gguf_refuses_other_architectures_in_one_line_before_loading(name, tmp_path, chatml_tokenizer, capsys,
                                                                    monkeypatch):
    import orpo.export as X

    d = _save(build(name), chatml_tokenizer, tmp_path / name)
    loaded = []
    monkeypatch.setattr(X, "load_source", lambda *a, **k: loaded.append(1))
    assert main(["export", str(d), "--gguf", "--output", str(tmp_path / "o")]) == 2
    (err,) = orpo_lines(capsys.readouterr().err)
    assert "is not supported" in err and "LlamaForCausalLM only" in err
    assert "--merge" in err and "convert_hf_to_gguf.py" in err
    assert not loaded and not (tmp_path / "o").exists()


def test_merge_export_takes_those_architectures(tmp_path, chatml_tokenizer):
    d = _save(build("qwen2"), chatml_tokenizer, tmp_path / "qwen2")
    assert main(["export", str(d), "--merge", "--output", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_gguf_refuses_llama_3_rope_scaling(tmp_path, chatml_tokenizer, capsys):
    model = make_tiny_llama(len(chatml_tokenizer))
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 256}
    d = _save(model, chatml_tokenizer, tmp_path / "llama3")
    assert main(["export", str(d), "--gguf", "--output", str(tmp_path / "o")]) == 2
    (err,) = orpo_lines(capsys.readouterr().err)
    assert "RoPE scaling 'llama3'" in err and "convert_hf_to_gguf.py" in err
