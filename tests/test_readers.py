import csv
import gzip
import json

import pytest

from orpo.data.readers import load_pairs
from orpo.errors import UserError

from conftest import CONV_ROWS, PLAIN_ROWS, write_jsonl


def test_plain_strings_jsonl(tmp_path):
    pairs, skips, n = load_pairs(write_jsonl(tmp_path / "a.jsonl", PLAIN_ROWS))
    assert n == 4 and len(pairs) == 4 and skips.total == 0
    assert pairs[0].prompt == PLAIN_ROWS[0]["prompt"] and not pairs[0].conversational
    assert pairs[0].where.endswith("a.jsonl:1")


def test_implicit_prompt_keeps_multi_turn_history(tmp_path):
    pairs, _, _ = load_pairs(write_jsonl(tmp_path / "c.jsonl.gz", CONV_ROWS))
    multi = pairs[1]
    assert [m["role"] for m in multi.prompt] == ["user", "assistant", "user"]
    assert multi.chosen == [{"role": "assistant", "content": "83"}]
    assert multi.rejected == [{"role": "assistant", "content": "38 is larger."}]
    assert pairs[3].prompt[0]["role"] == "system"


def test_explicit_prompt_messages_and_mixed_string_parts(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": {"role": "assistant", "content": "no"}},
    ]
    pairs, _, _ = load_pairs(write_jsonl(tmp_path / "b.jsonl", rows))
    assert all(p.conversational for p in pairs)
    assert pairs[1].chosen == [{"role": "assistant", "content": "hello"}]


def test_json_array_and_json_lines_named_json(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(PLAIN_ROWS))
    assert len(load_pairs(tmp_path / "a.json")[0]) == 4
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in PLAIN_ROWS))
    assert len(load_pairs(tmp_path / "b.json")[0]) == 4


def test_parquet_csv_and_saved_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(PLAIN_ROWS)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    assert len(load_pairs(tmp_path / "a.parquet")[0]) == 4
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(PLAIN_ROWS)
    pairs, _, _ = load_pairs(tmp_path / "a.csv")
    assert pairs[1].chosen == " 83" and pairs[0].where.endswith("a.csv:2")
    ds.save_to_disk(str(tmp_path / "saved"))
    assert len(load_pairs(tmp_path / "saved")[0]) == 4
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "saveddict"))
    assert len(load_pairs(tmp_path / "saveddict")[0]) == 4
    conv = datasets.Dataset.from_list(CONV_ROWS)
    conv.to_parquet(str(tmp_path / "c.parquet"))
    assert load_pairs(tmp_path / "c.parquet")[0][0].conversational


def test_csv_with_message_cells(tmp_path):
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["chosen", "rejected"])
        for r in CONV_ROWS:
            w.writerow([json.dumps(r["chosen"]), json.dumps(r["rejected"])])
    pairs, _, _ = load_pairs(tmp_path / "m.csv")
    assert len(pairs) == 4 and pairs[0].conversational


def test_skips_are_counted_with_locations(tmp_path):
    rows = PLAIN_ROWS + [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "  ", "rejected": "x"},
    ]
    pairs, skips, n = load_pairs(write_jsonl(tmp_path / "s.jsonl", rows))
    assert n == 6 and len(pairs) == 4
    assert skips.counts == {"chosen identical to rejected": 1, "empty completion": 1}
    assert skips.examples["empty completion"] == [f"{tmp_path / 's.jsonl'}:6"]


def test_max_rows(tmp_path):
    pairs, _, n = load_pairs(write_jsonl(tmp_path / "a.jsonl", PLAIN_ROWS), max_rows=2)
    assert n == 2 and len(pairs) == 2


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', r"bad.jsonl:2: invalid JSON"),
        ('{"prompt": "a", "choosen": "b", "rejected": "c"}\n', r"bad.jsonl:1: missing field 'chosen' \(did you mean 'choosen'\?\)"),
        ('{"prompt": "a", "chosen": 3, "rejected": "c"}\n', r"bad.jsonl:1: field 'chosen' must be a string"),
        ('[1, 2]\n', r"bad.jsonl:1: expected an object"),
        ('{"chosen": "a", "rejected": "b"}\n', r"bad.jsonl:1: missing field 'prompt'"),
        ('{"chosen": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}], "rejected": [{"role": "user", "content": "q"}]}\n',
         r"bad.jsonl:1: field 'chosen' message 1: unknown role 'robot'"),
        ('{"chosen": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}\n',
         r"bad.jsonl:1: field 'chosen' message 1: 'user' cannot follow 'user'"),
        ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}\n',
         r"bad.jsonl:1: field 'chosen'/'rejected': cannot find the implicit prompt"),
        ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "z"}]}\n',
         r"bad.jsonl:1: field 'chosen' message 2: the conversations diverge before the final turn"),
        ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}\n',
         r"field 'chosen' message 0: a completion must be an 'assistant' message"),
        ('{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}\n', r"field 'prompt' message 0: missing 'content'"),
        # image-text pairs: a missing image file, an image part without images, images on plain strings
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"images": ["x.png"], "prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}\n',
         r"bad.jsonl:2: field 'images': image 1: x.png: no such file"),
        ('{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}], "chosen": "a", "rejected": "b"}\n',
         r"bad.jsonl:1: field 'prompt' has an image part but the row has no 'images' field"),
        ('{"images": [], "prompt": "a", "chosen": "b", "rejected": "c"}\n{"images": "x.png", "prompt": "a", "chosen": "b", "rejected": "c"}\n',
         r"bad.jsonl:2: field 'images': image 1: x.png: no such file"),
        ('{"prompt": [{"role": "user", "content": [{"type": "video"}]}], "chosen": "a", "rejected": "b"}\n',
         r"bad.jsonl:1: field 'prompt' message 0: video parts are not supported"),
    ],
)
def test_fatal_rows_name_file_line_field(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match=match):
        load_pairs(p)


def test_file_level_errors(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no rows"):
        load_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unsupported file type"):
        load_pairs(tmp_path / "x.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="folder holds no dataset"):
        load_pairs(tmp_path / "folder")
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin.jsonl:2: not valid UTF-8"):
        load_pairs(tmp_path / "latin.jsonl")
    with gzip.open(tmp_path / "g.jsonl.gz", "wb") as fh:
        fh.write(b"")
    with pytest.raises(UserError, match="no rows"):
        load_pairs(tmp_path / "g.jsonl.gz")
    (tmp_path / "notgz.jsonl.gz").write_bytes(b"plain text")
    with pytest.raises(UserError, match="cannot read"):
        load_pairs(tmp_path / "notgz.jsonl.gz")
    (tmp_path / "bad.csv").write_text('prompt,chosen,rejected\n"a,b,c\n')
    with pytest.raises(UserError, match=r"bad.csv:\d+: malformed CSV"):
        load_pairs(tmp_path / "bad.csv")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        load_pairs(tmp_path / "bad.parquet")


def test_mixed_formats_rejected(tmp_path):
    rows = [PLAIN_ROWS[0], CONV_ROWS[0]]
    with pytest.raises(UserError, match=r"mixes plain-string and chat-message rows"):
        load_pairs(write_jsonl(tmp_path / "m.jsonl", rows))


def test_shared_hh_rlhf_conv_reads():
    from conftest import SHARED_DATA

    f = SHARED_DATA / "hh_rlhf_conv_train.jsonl.gz"
    if not f.exists():
        pytest.skip("no ../shared/data")
    pairs, skips, n = load_pairs(f, max_rows=200)
    assert n == 200 and len(pairs) + skips.total == 200
    assert any(len(p.prompt) > 1 for p in pairs)


def test_prompt_string_beside_whole_conversations_uses_the_conversations(tmp_path):
    """UltraFeedback-binarized style: "prompt" is a string and chosen/rejected are whole conversations."""
    row = dict(CONV_ROWS[1], prompt="Which number is larger, 38 or 83?")
    pairs, _, _ = load_pairs(write_jsonl(tmp_path / "u.jsonl", [row]))
    assert [m["role"] for m in pairs[0].prompt] == ["user", "assistant", "user"]
    assert pairs[0].chosen == [{"role": "assistant", "content": "83"}]
