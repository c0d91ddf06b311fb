import json

import numpy as np
import pytest

from orpo.data import prepare
from orpo.data.prepare import scan_rows, tokenize_rows
from orpo.data.store import TokenStore
from orpo.data.templates import tokenize_pairs
from orpo.data.readers import load_pairs
from orpo.errors import UserError

from conftest import CONV_ROWS, PLAIN_ROWS, write_jsonl


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORPO_CACHE", str(tmp_path / "cache"))


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for f in ("prompt", "chosen", "rejected"):
            assert np.array_equal(getattr(x, f), getattr(y, f))


def rows_with_skip():
    return CONV_ROWS * 5 + [{"chosen": CONV_ROWS[0]["chosen"], "rejected": CONV_ROWS[0]["chosen"]}]


def test_store_matches_in_memory_tokenization(tmp_path, chatml_tokenizer):
    f = write_jsonl(tmp_path / "c.jsonl", rows_with_skip())
    store, stats = tokenize_rows(scan_rows(f), chatml_tokenizer, 64)
    pairs, _, _ = load_pairs(f)
    same(store, tokenize_pairs(pairs, chatml_tokenizer, 64))
    assert isinstance(store.tokens, np.memmap)  # mapped from the cache, not held in memory
    assert stats.rows_read == 21 and stats.kept == 20 and stats.skips.counts == {"chosen identical to rejected": 1}
    idx = np.array([0, 3, 7])
    assert store.pair_tokens(idx) == sum(store[i].pair_tokens for i in idx)
    assert store.nll_tokens(idx, True) == sum(len(store[i].chosen) + len(store[i].prompt) - 1 for i in idx)


def test_cache_hit_reads_and_tokenizes_nothing(tmp_path, chatml_tokenizer, monkeypatch):
    f = write_jsonl(tmp_path / "c.jsonl", rows_with_skip())
    first, s1 = tokenize_rows(scan_rows(f), chatml_tokenizer, 64)
    calls = []
    monkeypatch.setattr(prepare, "tokenize_batch", lambda *a, **k: calls.append(1) or [])
    monkeypatch.setattr(prepare, "iter_pairs", lambda *a, **k: calls.append(2) or iter(()))
    second, s2 = tokenize_rows(scan_rows(f), chatml_tokenizer, 64)
    assert not calls
    same(first, second)
    assert s1.as_dict() == s2.as_dict() and s2.skips.examples == s1.skips.examples
    monkeypatch.undo()
    f.write_text(f.read_text() + json.dumps(CONV_ROWS[0]) + "\n")  # new content, new entry
    assert len(tokenize_rows(scan_rows(f), chatml_tokenizer, 64)[0]) == 21


def test_chunks_and_parallel_map_equal_serial(tmp_path, chatml_tokenizer, monkeypatch):
    f = write_jsonl(tmp_path / "c.jsonl", rows_with_skip() * 6)
    serial, s1 = tokenize_rows(scan_rows(f), chatml_tokenizer, 48, num_proc=1, cache=False)
    monkeypatch.setattr(prepare, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(prepare, "CHUNK_ROWS", 50)  # several chunks streamed to the store
    parallel, s2 = tokenize_rows(scan_rows(f), chatml_tokenizer, 48, num_proc=2)
    same(serial, parallel)
    assert s1.as_dict() == s2.as_dict()


def test_shuffle_seed_samples_uniformly_and_reproducibly(tmp_path, chatml_tokenizer):
    rows = [{"prompt": f"Human: question {i} Assistant:", "chosen": f" yes {i}", "rejected": " no"} for i in range(200)]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    a = scan_rows(f, max_rows=20, shuffle_seed=1)
    b = scan_rows(f, max_rows=20, shuffle_seed=1)
    c = scan_rows(f, max_rows=20, shuffle_seed=2)
    assert a.n_read == 20 and np.array_equal(a.selected, b.selected) and not np.array_equal(a.selected, c.selected)
    assert a.selected.max() > 100  # drawn from the whole file, not the first rows
    store, _ = tokenize_rows(a, chatml_tokenizer, 64)
    texts = [chatml_tokenizer.decode(p.chosen) for p in store]
    assert texts == [f" yes {i}<|im_end|>" for i in a.selected.tolist()]
    first = scan_rows(f, max_rows=20)
    assert first.selected is None and first.n_read == 20


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"trl-lib/ultrafeedback_binarized: no such local file, and a Hugging Face dataset name needs the network"):
        scan_rows("trl-lib/ultrafeedback_binarized")
    with pytest.raises(UserError, match="data file not found"):
        scan_rows("no/such/file.jsonl")


def test_from_pairs_store_roundtrip(chatml_tokenizer):
    from orpo.data.readers import normalize_row

    pairs = tokenize_pairs([normalize_row(r, f"t:{i}") for i, r in enumerate(PLAIN_ROWS)], chatml_tokenizer, 64)
    store = TokenStore.from_pairs(pairs)
    same(store, pairs)
    assert len(store[1:3]) == 2


def test_tokens_cut_survive_the_cache_and_the_parallel_map(tmp_path, chatml_tokenizer, monkeypatch):
    f = write_jsonl(tmp_path / "c.jsonl", rows_with_skip() * 3)
    serial, s1 = tokenize_rows(scan_rows(f), chatml_tokenizer, 16, num_proc=1, cache=False)
    full = tokenize_pairs(load_pairs(f)[0], chatml_tokenizer, 1 << 30)
    cuts = [sum(len(getattr(a, k)) - len(getattr(b, k)) for k in ("prompt", "chosen", "rejected"))
            for a, b in zip(full, serial)]
    assert len(full) == len(serial) and s1.tokens_cut == sum(cuts) > 0 and s1.largest_cut == max(cuts)
    monkeypatch.setattr(prepare, "PARALLEL_MIN_ROWS", 10)
    _, s2 = tokenize_rows(scan_rows(f), chatml_tokenizer, 16, num_proc=2)  # written to the cache
    _, s3 = tokenize_rows(scan_rows(f), chatml_tokenizer, 16)  # read from it
    assert s1.as_dict() == s2.as_dict() == s3.as_dict()
    # a cache entry written before these counts existed is remade, never read as "nothing cut"
    meta = next((tmp_path / "cache" / "tokens").glob("*/meta.json"))
    m = json.loads(meta.read_text())
    del m["stats"]["tokens_cut"], m["stats"]["largest_cut"]
    meta.write_text(json.dumps(m))
    _, s4 = tokenize_rows(scan_rows(f), chatml_tokenizer, 16)
    assert s4.as_dict() == s1.as_dict()
