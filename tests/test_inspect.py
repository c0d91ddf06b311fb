"""orpo data: counts, length percentiles, truncation counts and the rendered boundary, on the tiny tokenizers."""

import json

import numpy as np

from conftest import CONV_ROWS, PLAIN_ROWS, write_jsonl
from orpo.cli import main
from orpo.data.prepare import prepare_pairs
from orpo.data.readers import load_pairs
from orpo.data.templates import tokenize_pairs
from orpo.inspect_data import BOUNDARY, CLOSE, GREEN, OPEN, inspect_data, render_report


def test_counts_format_and_percentiles(chatml_tokenizer, conv_file):
    info = inspect_data(conv_file, chatml_tokenizer, max_length=1024)
    assert info.rows_read == 12 and info.usable_rows == 12 and not info.skipped
    assert "implicit prompt" in info.format
    assert info.multi_turn == 3  # the row with an earlier exchange, three times
    full = tokenize_pairs(load_pairs(conv_file)[0], chatml_tokenizer, 1 << 30)
    for part, lengths in (("prompt", [len(p.prompt) for p in full]), ("chosen", [len(p.chosen) for p in full]),
                          ("rejected", [len(p.rejected) for p in full])):
        got = info.lengths[part]
        assert got["max"] == max(lengths) and got["p50"] == int(np.percentile(lengths, 50, method="higher"))
        assert got["p50"] <= got["p90"] <= got["p95"] <= got["p99"] <= got["max"]
    f = info.fitted
    assert f["kept"] == 12 and f["prompt_truncated"] == f["completion_truncated"] == f["skipped"] == 0
    assert f["tokens_cut"] == f["largest_cut"] == 0 and "tokens cut:" not in render_report(info, chatml_tokenizer)


def test_truncation_counts_match_what_training_gets(chatml_tokenizer, conv_file):
    for max_length in (12, 20, 32):
        info = inspect_data(conv_file, chatml_tokenizer, max_length=max_length)
        _, stats, _ = prepare_pairs(str(conv_file), chatml_tokenizer, max_length)
        assert info.fitted == stats.as_dict(), max_length
    info = inspect_data(conv_file, chatml_tokenizer, max_length=20)
    assert info.fitted["prompt_truncated"] > 0 and info.fitted["completion_truncated"] > 0
    text = render_report(info, chatml_tokenizer)
    assert "with max_length 20:" in text and f"prompt truncated:      {info.fitted['prompt_truncated']} " in text
    # the tokens cut: the kept pairs' lengths without a limit, less their lengths with it
    pairs = load_pairs(conv_file)[0]
    full, fitted = (tokenize_pairs(pairs, chatml_tokenizer, n) for n in (1 << 30, 20))
    assert len(full) == len(fitted)  # (none dropped at 20, so the pairs line up)
    cuts = [sum(len(getattr(a, k)) - len(getattr(b, k)) for k in ("prompt", "chosen", "rejected"))
            for a, b in zip(full, fitted)]
    assert info.fitted["tokens_cut"] == sum(cuts) > 0 and info.fitted["largest_cut"] == max(cuts)
    share = f"{sum(cuts) / info.full_tokens:.1%}"
    assert f"tokens cut:            {sum(cuts)} ({share} of the usable pairs' tokens); at most {max(cuts)} from one pair" in text
    _, stats, line = prepare_pairs(str(conv_file), chatml_tokenizer, 20)
    assert f"({sum(cuts)} tokens cut, at most {max(cuts)} from one pair)" in line


def test_dropped_rows_are_counted(tmp_path, chatml_tokenizer):
    rows = PLAIN_ROWS + [{"prompt": "Q:", "chosen": " same", "rejected": " same"}, {"prompt": "Q:", "chosen": " ", "rejected": " b"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    info = inspect_data(path, chatml_tokenizer, max_length=64)
    assert info.rows_read == 6 and info.usable_rows == 4
    assert info.skipped == {"chosen identical to rejected": 1, "empty completion": 1}
    assert info.fitted["kept"] == 4 and info.fitted["skipped"] == 2
    text = render_report(info, chatml_tokenizer)
    assert "2 skipped" in text and "chosen identical to rejected" in text


def test_rendering_marks_boundary_and_loss_mask(chatml_tokenizer, conv_file):
    info = inspect_data(conv_file, chatml_tokenizer, max_length=1024, n_examples=2)
    text = render_report(info, chatml_tokenizer, color=False)
    # exactly what the model sees: template, generation prompt, boundary, the completion with one end token
    expected_chosen = ("<|im_start|>user↵\nWhat is the capital of France?<|im_end|>↵\n<|im_start|>assistant↵\n"
                       f"{BOUNDARY}{OPEN}Paris.<|im_end|>{CLOSE}")
    assert expected_chosen in text
    assert f"{BOUNDARY}{OPEN}The capital is Lyon, I think.<|im_end|>{CLOSE}" in text
    assert "example 2" in text and "example 3" not in text
    assert "boundary tokens: … " in text and f"'\\n' {BOUNDARY} 'P" in text
    assert "\033[" not in text
    # the prompt itself is marked as in the loss with --prompt-in-nll
    text = render_report(info, chatml_tokenizer, prompt_in_nll=True, color=False)
    assert f"{OPEN}<|im_start|>user↵\nWhat is the capital of France?" in text
    # colour in a terminal: no bracket markers, the chosen tokens in green
    text = render_report(info, chatml_tokenizer, color=True)
    assert f"{GREEN}Paris.<|im_end|>" in text and OPEN not in text


def test_plain_rows_note_that_the_chat_template_is_not_applied(chatml_tokenizer, plain_file):
    info = inspect_data(plain_file, chatml_tokenizer, max_length=1024, n_examples=1)
    assert info.format.startswith("plain strings")
    assert any("chat template is NOT applied" in n for n in info.notes)
    text = render_report(info, chatml_tokenizer)
    assert f"Human: what is the capital of France? Assistant:{BOUNDARY}{OPEN} Paris.<|im_end|>{CLOSE}" in text


def test_llama3_template_shows_a_single_bos(llama3_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", CONV_ROWS[:1])
    text = render_report(inspect_data(path, llama3_tokenizer, 1024), llama3_tokenizer)
    assert "<|begin_of_text|><|start_header_id|>user" in text and "<|begin_of_text|><|begin_of_text|>" not in text
    assert f"{BOUNDARY}{OPEN}Paris.<|eot_id|>{CLOSE}" in text


def test_data_command(tiny_model_dir, conv_file, capsys):
    rc = main(["data", "--data", str(conv_file), "--model", str(tiny_model_dir), "--max-length", "20", "--json",
               "--color", "never", "--examples", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["rows_read"] == 12 and stats["max_length"] == 20 and stats["with_max_length"]["kept"] == 12
    assert "token lengths (before truncation):" in out and "example 1" in out and BOUNDARY in out
    assert main(["data", "--data", str(conv_file) + ".missing", "--model", str(tiny_model_dir)]) == 2
    assert "data file not found" in capsys.readouterr().err
