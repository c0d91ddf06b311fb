import numpy as np
import pytest

from orpo.data import prepare
from orpo.data.prepare import read_rows, tokenize_rows

from conftest import CONV_ROWS, write_jsonl


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORPO_CACHE", str(tmp_path / "cache"))


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.where == y.where
        for f in ("prompt", "chosen", "rejected"):
            assert np.array_equal(getattr(x, f), getattr(y, f))


def test_cache_hit_skips_tokenization(tmp_path, chatml_tokenizer, monkeypatch):
    f = write_jsonl(tmp_path / "c.jsonl", CONV_ROWS * 5 + [{"chosen": CONV_ROWS[0]["chosen"], "rejected": CONV_ROWS[0]["chosen"]}])
    rows = read_rows(f)
    first, s1 = tokenize_rows(rows, chatml_tokenizer, 64)
    calls = []
    monkeypatch.setattr(prepare, "tokenize_batch", lambda *a, **k: calls.append(1) or [])
    second, s2 = tokenize_rows(read_rows(f), chatml_tokenizer, 64)
    assert not calls
    same(first, second)
    assert s1.as_dict() == s2.as_dict() and s2.skips.total == 1 and s2.skips.examples == s1.skips.examples
    # another max_length or another file content is another entry
    f.write_text(f.read_text() + f.read_text())
    assert read_rows(f).key != rows.key


def test_parallel_map_equals_serial(tmp_path, chatml_tokenizer, monkeypatch):
    f = write_jsonl(tmp_path / "c.jsonl", CONV_ROWS * 30)
    rows = read_rows(f)
    serial, s1 = tokenize_rows(rows, chatml_tokenizer, 48, num_proc=1, cache=False)
    monkeypatch.setattr(prepare, "PARALLEL_MIN_ROWS", 10)
    parallel, s2 = tokenize_rows(rows, chatml_tokenizer, 48, num_proc=2, cache=False)
    same(serial, parallel)
    assert s1.as_dict() == s2.as_dict()
