"""Options users expect: column mapping, completion cap, truncation mode, chat templates, tokenizing
processes, model dtype and attention, --resume-from, the notebook progress bar."""

import io
import json

import numpy as np
import pytest
import torch

from conftest import CONV_ROWS, PLAIN_ROWS, write_jsonl
from orpo import config as C
from orpo.cli import main
from orpo.data.chat_templates import KNOWN, set_chat_template
from orpo.data.prepare import scan_rows, tokenize_rows
from orpo.data.readers import load_pairs
from orpo.data.templates import tokenize_batch, truncate
from orpo.errors import UserError

RENAMED = [{"question": r["prompt"], "response_j": r["chosen"], "response_k": r["rejected"], "id": i}
           for i, r in enumerate(PLAIN_ROWS)]


def test_columns_map_other_names(tmp_path):
    path = write_jsonl(tmp_path / "se.jsonl", RENAMED)
    mapping = C.column_map("prompt=question,chosen=response_j,rejected=response_k")
    pairs, skips, n = load_pairs(path, columns=mapping)
    assert n == 4 and [p.chosen for p in pairs] == [r["chosen"] for r in PLAIN_ROWS]
    assert pairs[0].prompt == PLAIN_ROWS[0]["prompt"]
    # the same mapping from Python as a dict, and in YAML as a mapping
    assert C.build({"columns": {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}}).columns == \
        "prompt=question,chosen=response_j,rejected=response_k"
    # the mapping is part of what the token cache keys on
    assert scan_rows(path, columns=mapping).key != scan_rows(path, columns={"prompt": "question", "chosen":
                                                                             "response_k", "rejected": "response_j"}).key


def test_missing_field_lists_the_keys_found_and_the_option(tmp_path):
    path = write_jsonl(tmp_path / "se.jsonl", RENAMED)
    with pytest.raises(UserError) as e:
        load_pairs(path)
    msg = str(e.value)
    assert f"{path}:1: missing field 'chosen'" in msg
    assert "'question', 'response_j', 'response_k', 'id'" in msg and "--columns" in msg
    with pytest.raises(UserError, match="write FIELD=KEY pairs"):
        C.build({"columns": "answer=response_j"})


def test_max_completion_length_and_truncation_mode():
    prompt, chosen, rejected = list(range(100, 120)), list(range(10)), list(range(20, 26))
    p, c, r, p_cut, c_cut = truncate(prompt, chosen, rejected, 64, None, bos=None, max_completion_length=4)
    assert (p, c, r, p_cut, c_cut) == (prompt, chosen[:4], rejected[:4], False, True)
    # a prompt too long for max_length: keep_end (default) drops its start, keep_start its end
    p, *_ = truncate(prompt, chosen, rejected, 20, None, bos=100)
    assert p == [100] + prompt[-9:]  # the BOS stays
    p, *_ = truncate(prompt, chosen, rejected, 20, None, bos=100, truncation_mode="keep_start")
    assert p == prompt[:10]
    p, *_ = truncate(prompt, chosen, rejected, 64, 5, bos=None, truncation_mode="keep_start")
    assert p == prompt[:5]


def test_max_completion_length_through_tokenization(chatml_tokenizer):
    from orpo.data.readers import normalize_row

    pairs = [normalize_row(r, f"row {i}") for i, r in enumerate(CONV_ROWS)]
    full = tokenize_batch(pairs, chatml_tokenizer, 1024)
    capped = tokenize_batch(pairs, chatml_tokenizer, 1024, max_completion_length=3)
    for (a, *_), (b, _, p_cut, c_cut) in zip(full, capped):
        assert list(b.prompt) == list(a.prompt)
        assert list(b.chosen) == list(a.chosen)[:3] and list(b.rejected) == list(a.rejected)[:3]
        # the cuts are token counts: none from the prompt, every completion token past the third
        assert p_cut == 0 and c_cut == max(0, len(a.chosen) - 3) + max(0, len(a.rejected) - 3)


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_every_known_chat_template_renders_prompt_as_prefix(chatml_tokenizer, name):
    from orpo.data.readers import normalize_row
    from orpo.data.templates import end_token_ids

    notes = []
    tok = _copy(chatml_tokenizer)
    set_chat_template(tok, name, notes.append)
    assert tok.chat_template == KNOWN[name][0] and notes[0].startswith(f"chat template: {name}")
    pairs = [normalize_row(r, f"row {i}") for i, r in enumerate(CONV_ROWS)]
    out = tokenize_batch(pairs, tok, 1024)
    ends = end_token_ids(tok)
    for tp, reason, *_ in out:
        assert reason is None
        for completion in (tp.chosen, tp.rejected):  # exactly one end token, at the end
            assert completion[-1] in ends and not any(t in ends for t in completion[:-1])


def _copy(tok):
    import copy

    return copy.deepcopy(tok)


def test_chat_template_from_a_file_and_unknown_names(chatml_tokenizer, tmp_path):
    tok = _copy(chatml_tokenizer)
    f = tmp_path / "t.jinja"
    f.write_text(KNOWN["zephyr"][0])
    set_chat_template(tok, str(f), lambda m: None)
    assert tok.chat_template == KNOWN["zephyr"][0]
    with pytest.raises(UserError, match="not a known template .*did you mean 'chatml'"):
        set_chat_template(tok, "chatm", lambda m: None)
    notes = []
    set_chat_template(tok, "gemma", notes.append)  # markers this tokenizer does not have: said so
    assert "<start_of_turn>, <end_of_turn> are not special tokens" in notes[0]


def test_chat_template_reaches_training(tmp_path, tiny_model_dir, conv_file, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(conv_file), "--output-dir", str(out),
                 "--max-steps", "1", "--precision", "fp32", "--chat-template", "zephyr", "--eval-samples", "0"]) == 0
    assert "chat template: zephyr" in capsys.readouterr().out
    saved = json.loads((out / "model" / "tokenizer_config.json").read_text()).get("chat_template") or \
        (out / "model" / "chat_template.jinja").read_text()
    assert saved == KNOWN["zephyr"][0]  # the model is saved with the template it was trained with


def test_dataset_num_proc_gives_the_same_tokens(tmp_path, chatml_tokenizer, monkeypatch):
    import orpo.data.prepare as P

    monkeypatch.setenv("ORPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "PARALLEL_MIN_ROWS", 1)
    path = write_jsonl(tmp_path / "c.jsonl", CONV_ROWS * 5)
    one, _ = tokenize_rows(scan_rows(path), chatml_tokenizer, 64, cache=False, num_proc=1)
    two, _ = tokenize_rows(scan_rows(path), chatml_tokenizer, 64, cache=False, num_proc=2)
    assert np.array_equal(one.tokens, two.tokens) and np.array_equal(one.index, two.index)


def test_model_dtype_and_attention_implementation(tiny_model_dir):
    from orpo.model import load_model, loading_options

    cfg = C.build({"model_dtype": "bfloat16", "attn_implementation": "eager"})
    m = load_model(tiny_model_dir, **loading_options(cfg))
    assert next(m.parameters()).dtype == torch.bfloat16 and m.config._attn_implementation == "eager"
    m = load_model(tiny_model_dir, **loading_options(C.build({})))
    assert next(m.parameters()).dtype == torch.float32 and m.config._attn_implementation == "sdpa"
    with pytest.raises(UserError, match="must be one of auto, float32"):
        C.coerce("model_dtype", "fp8", "--model-dtype")


def test_resume_from_a_checkpoint_of_another_run(tmp_path, tiny_model_dir, plain_file):
    from safetensors.torch import load_file

    common = ["--model", str(tiny_model_dir), "--data", str(plain_file), "--precision", "fp32", "--batch-size", "2",
              "--lr", "1e-3", "--max-steps", "4", "--eval-samples", "0", "--no-lora"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *common, "--output-dir", str(a), "--save-steps", "2"]) == 0
    assert main(["train", *common, "--output-dir", str(b), "--resume-from", str(a / "checkpoints" / "step-000002")]) == 0

    def rows(d):
        return [{k: v for k, v in json.loads(x).items() if k not in ("time_s", "tokens_per_s")}
                for x in (d / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows(b)] == [1, 2, 3, 4] and rows(b) == rows(a)
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(UserError, match="not a checkpoint folder"):
        from orpo.checkpoint import resume_point

        resume_point(tmp_path, False, str(tmp_path / "nothing"))


def test_resume_from_with_other_options_is_refused(tmp_path, tiny_model_dir, plain_file, capsys):
    common = ["--model", str(tiny_model_dir), "--data", str(plain_file), "--precision", "fp32", "--max-steps", "2",
              "--eval-samples", "0", "--save-steps", "1"]
    a = tmp_path / "a"
    assert main(["train", *common, "--output-dir", str(a)]) == 0
    capsys.readouterr()
    assert main(["train", *common, "--output-dir", str(tmp_path / "b"), "--beta", "0.3",
                 "--resume-from", str(a / "checkpoints" / "step-000001")]) == 2
    assert "different config (beta changed)" in capsys.readouterr().err


def test_progress_bar_in_a_notebook(monkeypatch):
    import importlib.util

    import rich.console

    from orpo import progress

    stream = io.StringIO()
    assert not progress.Progress(3, stream=stream).live  # not a terminal: plain lines
    monkeypatch.setattr(rich.console, "_is_jupyter", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "ipywidgets" else real(n, *a))
    assert progress.Progress(3, stream=stream).live  # Jupyter with ipywidgets: rich's live bar
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "ipywidgets" else real(n, *a))
    p = progress.Progress(3, stream=stream)
    assert not p.live  # Jupyter without ipywidgets: rich cannot draw there, so one line per step
    with p:
        p.update(1, {"loss": 1.0})
    assert "step 1/3" in stream.getvalue()
