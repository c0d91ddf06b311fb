"""orpo export: merged weights, GGUF round trip through transformers, model card, errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_llama, requires_smollm2

from orpo import export as X
from orpo.cli import main
from orpo.errors import UserError


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A one-step LoRA run on the tiny model (shared by the tests that need a run folder)."""
    from conftest import PLAIN_ROWS, write_jsonl

    d = tmp_path_factory.mktemp("lora-run")
    data = write_jsonl(d / "plain.jsonl", PLAIN_ROWS * 3)
    out = d / "run"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
               "--max-steps", "1", "--lora", "--lora-r", "4", "--precision", "fp32", "--lr", "1e-2",
               "--eval-samples", "0"])
    assert rc == 0
    return out


def _model_dir(tmp_path, tokenizer, tied: bool, seed: int = 0):
    d = tmp_path / ("tied" if tied else "untied")
    make_tiny_llama(len(tokenizer), seed=seed, tied=tied).save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    return d


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


# --- merge ---------------------------------------------------------------------------------------

def test_merge_lora_run(lora_run, tmp_path, chatml_tokenizer):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = tmp_path / "merged"
    assert main(["export", str(lora_run), "--merge", "--output", str(dest)]) == 0
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k for k in keys)
    merged = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    trained = AutoModelForCausalLM.from_pretrained(lora_run / "model", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(dest)
    ids = tok("Human: what is the capital of France? Assistant: Paris.")["input_ids"]
    assert ids == chatml_tokenizer("Human: what is the capital of France? Assistant: Paris.")["input_ids"]
    got, want, before = _logits(merged, ids), _logits(trained, ids), _logits(base, ids)
    assert torch.allclose(got, want, atol=1e-5)  # adapter + base merged here == the run's own merged model
    assert (got - before).abs().max() > 1e-4  # and the adapter did change something
    assert (dest / "README.md").is_file()


def test_no_flags_means_merge(lora_run, tmp_path):
    dest = tmp_path / "out"
    assert main(["export", str(lora_run / "adapter"), "--output", str(dest)]) == 0
    assert (dest / "model.safetensors").is_file() and (dest / "config.json").is_file()
    assert not list(dest.glob("*.gguf"))


def test_default_output_is_src_export(lora_run):
    assert main(["export", str(lora_run), "--gguf", "--gguf-type", "f32"]) == 0
    assert (lora_run / "export" / "run-f32.gguf").is_file()
    assert (lora_run / "export" / "README.md").is_file()
    assert not (lora_run / "export" / "model.safetensors").exists()


# --- GGUF ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_f32(tmp_path, chatml_tokenizer, tied):
    import gguf

    src = _model_dir(tmp_path, chatml_tokenizer, tied, seed=1)
    res = X.export(src, tmp_path / "out", merge=False, gguf=True, gguf_type="f32", say=lambda *a: None)
    names = {t.name for t in gguf.GGUFReader(str(res.gguf)).tensors}
    assert ("output.weight" in names) is (not tied)
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    model = X.load_model(src)
    v = X.verify_gguf(res.gguf, model, chatml_tokenizer)
    assert v["tokens_match"], v["token_mismatches"]
    assert v["tied"] is tied
    assert v["max_abs_diff"] < 1e-4
    assert v["argmax_agree"] == 1.0


def test_gguf_f16_close(tmp_path, chatml_tokenizer, tiny_model_dir):
    res = X.export(tiny_model_dir, tmp_path / "out", merge=False, gguf=True, gguf_type="f16", say=lambda *a: None)
    v = X.verify_gguf(res.gguf, X.load_model(tiny_model_dir), chatml_tokenizer)
    assert v["tokens_match"]
    assert 0 < v["max_abs_diff"] < 0.02 * v["logit_scale"]


def test_gguf_metadata(tmp_path, chatml_tokenizer, tiny_model_dir):
    import gguf

    res = X.export(tiny_model_dir, tmp_path / "out", merge=False, gguf=True, gguf_type="f16", say=lambda *a: None)
    r = gguf.GGUFReader(str(res.gguf))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "llama"
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count"):
        assert f"llama.{key}" in f, key
    assert f["llama.attention.head_count_kv"] == 2 and f["llama.rope.dimension_count"] == 8
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == len(chatml_tokenizer)
    assert f["tokenizer.ggml.tokens"][chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")] == "<|im_end|>"
    assert f["tokenizer.ggml.token_type"][2] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.eos_token_id"] == 2 and f["tokenizer.ggml.bos_token_id"] == 1
    assert f["tokenizer.chat_template"] == chatml_tokenizer.chat_template
    assert f["tokenizer.ggml.merges"][0].count(" ") == 1
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_wrong_rope_permutation_is_caught(tmp_path, chatml_tokenizer, tiny_model_dir, monkeypatch):
    """The verification is sharp enough to see a GGUF written without llama.cpp's Q/K row order."""
    monkeypatch.setattr(X.gguf, "_rope_rows_to_gguf", lambda w, n: w)
    res = X.export(tiny_model_dir, tmp_path / "out", merge=False, gguf=True, gguf_type="f32", say=lambda *a: None)
    v = X.verify_gguf(res.gguf, X.load_model(tiny_model_dir), chatml_tokenizer)
    assert v["max_abs_diff"] > 1e-2


def test_llama3_style_tokenizer(tmp_path, llama3_tokenizer):
    """A tokenizer that adds BOS: add_bos_token is set and the round trip encodes identically."""
    src = _model_dir(tmp_path, llama3_tokenizer, tied=True)
    res = X.export(src, tmp_path / "out", merge=False, gguf=True, gguf_type="f32", say=lambda *a: None)
    import gguf

    f = {k: v.contents() for k, v in gguf.GGUFReader(str(res.gguf)).fields.items()}
    assert f["tokenizer.ggml.add_bos_token"] is True
    v = X.verify_gguf(res.gguf, X.load_model(src), llama3_tokenizer)
    assert v["tokens_match"], v["token_mismatches"]
    assert v["max_abs_diff"] < 1e-4


def test_cli_verify(tmp_path, tiny_model_dir, capsys):
    assert main(["export", str(tiny_model_dir), "--gguf", "--verify", "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "verify: max |logit difference|" in out and "tokenizer identical" in out


def test_adapter_base_gone_falls_back_to_run_model(lora_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "moved-run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("checkpoints", "export"))
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    cfg_path.write_text(json.dumps(cfg))
    assert main(["export", str(run), "--merge"]) == 0
    assert "used the run's merged model/" in capsys.readouterr().out
    assert "used the run's merged model/" in (run / "export" / "README.md").read_text()
    assert main(["export", str(run / "adapter"), "--output", str(tmp_path / "o")]) == 0  # same via the adapter
    shutil.rmtree(run / "model")
    assert main(["export", str(run / "adapter"), "--output", str(tmp_path / "o2")]) == 2
    assert "is not on this machine" in capsys.readouterr().err


# --- model card ----------------------------------------------------------------------------------

def test_model_card(lora_run, tmp_path):
    card = X.write_model_card(tmp_path / "card", lora_run).read_text()
    summary = json.loads((lora_run / "summary.json").read_text())
    assert "# run" in card
    assert str(json.loads((lora_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]) in card
    assert "plain.jsonl" in card and "| train |" in card  # data and its counts
    assert "| beta | 0.5 |" in card and "| lr | 0.01 |" in card and "| lora_r | 4 |" in card  # (the default job's beta)
    assert "| precision | fp32 |" in card and "| max_length | 256 |" in card  # flags alone: the default job's 256
    assert f"| loss | {summary['final']['loss']:.4g} |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_model_card_for_training_output(lora_run, tmp_path):
    """What train.py would write into OUT/model: the card loads the folder itself."""
    import shutil

    dest = tmp_path / "model"
    shutil.copytree(lora_run / "model", dest)
    card = X.write_model_card(dest, lora_run).read_text()
    assert f"from_pretrained({str(dest)!r})" in card and "gguf_file" not in card


def test_model_card_mentions_gguf(tmp_path, tiny_model_dir):
    X.export(tiny_model_dir, tmp_path / "o", merge=False, gguf=True, gguf_type="f16", say=lambda *a: None)
    card = (tmp_path / "o" / "README.md").read_text()
    assert "tiny-llama" in card or "tiny" in card
    assert "gguf_file=" in card and "ollama create" in card and "llama-cli -m" in card
    assert "No orpo run configuration found." in card


# --- errors --------------------------------------------------------------------------------------

def test_missing_folder(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orpo: error:") and "not found" in err and err.count("\n") == 1


def test_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["export", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_non_llama_architecture(tmp_path, chatml_tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(chatml_tokenizer), n_embd=16, n_layer=1, n_head=2,
                               n_positions=64)).save_pretrained(d)
    chatml_tokenizer.save_pretrained(d)
    assert main(["export", str(d), "--gguf", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel is not supported" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_unsupported_tokenizer_refused(tmp_path, chatml_tokenizer):
    """A pre-tokenizer llama.cpp has no name for: no GGUF is written rather than a wrong one."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = chatml_tokenizer.backend_tokenizer.__class__.from_str(chatml_tokenizer.backend_tokenizer.to_str())
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(use_regex=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>")
    model = make_tiny_llama(len(tok))
    with pytest.raises(UserError, match="no llama.cpp equivalent"):
        X.write_gguf(model, tok, tmp_path / "m.gguf", "f32", say=lambda *a: None)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".tmp-*"))


def test_bad_gguf_type(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny_model_dir), "--gguf", "--gguf-type", "q4_0"])
    assert e.value.code == 2


# --- the real model ------------------------------------------------------------------------------

@pytest.mark.integration
@requires_smollm2
def test_smollm2_gguf_f16(tmp_path):
    """SmolLM2-135M-Instruct (tied embeddings, GQA 9/3 heads, ChatML) to an f16 GGUF and back."""
    import gguf

    from orpo.model import load_tokenizer, resolve_model

    src = resolve_model(None, quiet=True)
    res = X.export(src, tmp_path / "o", merge=False, gguf=True, gguf_type="f16", say=lambda *a: None)
    f = gguf.GGUFReader(str(res.gguf)).fields
    assert f["tokenizer.ggml.pre"].contents() == "smollm"  # copied from the source GGUF
    v = X.verify_gguf(res.gguf, X.load_model(src), load_tokenizer(src))
    assert v["tokens_match"], v["token_mismatches"]
    assert v["tied"]
    assert v["max_abs_diff"] < 0.02 * v["logit_scale"], v
    assert v["argmax_agree"] > 0.95, v
