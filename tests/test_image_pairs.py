"""Image-text preference pairs on tiny random Gemma-3 and LLaVA checkpoints (tiny vision towers), each
saved with a processor built here (the tests' tokenizer with image tokens, the family's PIL image
processor at 28x28 pixels, a chat template with image parts): their step-1 log-probs and gradient
equal the stock model's forward with pixel_values, one sequence per row; `orpo train` runs end to end
from a JSONL file with relative paths and from rows in memory; the vision weights are saved bit for
bit; bad inputs get one line each; `orpo data` shows where the image sits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import orpo
from conftest import _train_tokenizer, write_jsonl
from mm_archs import config as mm_config
from mm_archs import vision_state
from orpo import image_forward
from orpo.data.prepare import prepare_pairs
from orpo.errors import UserError
from orpo.forward import Paths, PolicyForward
from orpo.loss import orpo_loss
from orpo.model import load_model

FAMILIES = ("gemma3", "llava")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_orpo(args, cwd):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "orpo", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)
TOKENS = {"gemma3": dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>"),
          "llava": dict(image_token="<image>")}
PLACEHOLDER = {"gemma3": "<start_of_image>", "llava": "<image>"}


def _template(placeholder: str) -> str:
    """ChatML whose messages may hold image parts (content as a string or a list of parts)."""
    return ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '" + placeholder + "' }}"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{{ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def save_family(name: str, folder, seed: int = 0):
    """A tiny random checkpoint of ``name`` with its processor, saved as a user downloads it."""
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(), bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>", extra_special_tokens=TOKENS[name])
    template = _template(PLACEHOLDER[name])
    tok.chat_template = template
    cfg = mm_config(name)
    if name == "gemma3":
        from transformers.models.gemma3 import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        cfg.mm_tokens_per_image = 4  # a 2x2 grid of image tokens, which attend to each other both ways
        cfg.image_token_id, cfg.boi_token_index, cfg.eoi_token_index = tok.image_token_id, tok.boi_token_id, tok.eoi_token_id
        ip = Gemma3ImageProcessorPil(size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        processor = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=template, image_seq_length=4)
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        from transformers.models.llava import LlavaProcessor

        cfg.image_token_id = tok.image_token_id
        ip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        processor = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=template)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm_images")
    return {name: save_family(name, root / name) for name in FAMILIES}


def make_images(folder, n=3):
    """Small PNGs of different sizes and colours (the processor resizes them to 28x28)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (20 + 7 * i, 30 - 3 * i, 3), dtype=np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def image_rows(names):
    """Image pairs in TRL's vision format: an image part in the prompt, the images beside it."""
    q = ["What is in the picture?", "Which colour is larger here?", "Describe the sea in this image."]
    a = [("A fox.", "The capital is Lyon, I think."), ("The blue one.", "No."), ("The sea is blue and wide.", "Hi!")]
    rows = []
    for i, name in enumerate(names):
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q[i % 3]}]}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": a[i % 3][0]}],
                     "rejected": [{"role": "assistant", "content": a[i % 3][1]}], "images": [name]})
    # two images in one prompt, the second after the text; and a prompt with no image part (TRL: images first)
    rows.append({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                          {"type": "image"}]}],
                 "chosen": [{"role": "assistant", "content": "Two pictures."}],
                 "rejected": [{"role": "assistant", "content": "One."}], "images": [names[0], names[1]]})
    rows.append({"prompt": [{"role": "user", "content": "hello there"}], "chosen": [{"role": "assistant", "content": "Hi!"}],
                 "rejected": [{"role": "assistant", "content": "No."}], "images": names[2]})
    return rows


def _stock_logps(model, processor, pair_rows, pairs):
    """The reference: each prompt+completion alone through the model's own forward with the processor's
    own input_ids, pixel_values and token types (one sequence per row), full logits."""
    from orpo.data.images import open_image, with_image_parts

    out = []
    for row, tp in zip(pair_rows, pairs):
        images = [open_image(r) for r in tp.images]
        msgs = with_image_parts(row["prompt"], len(images), "t")
        for completion, ids in ((row["chosen"], tp.chosen), (row["rejected"], tp.rejected)):
            text = processor.apply_chat_template(msgs + completion, tokenize=False)
            inputs = processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
            full = inputs["input_ids"][0]
            n = len(tp.prompt) + len(ids)
            assert full[:n].tolist() == list(tp.prompt) + list(ids)  # the tokens orpo trains on are the processor's
            extra = {k: v[:, :n] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            pix = {k: v for k, v in inputs.items() if k not in extra and k not in ("mm_token_type_ids", "num_crops")}
            logits = model(**extra, **pix, use_cache=False).logits[0].float()
            seq = extra["input_ids"][0]
            lp = torch.log_softmax(logits[len(tp.prompt) - 1 : n - 1], -1).gather(1, seq[len(tp.prompt):, None])[:, 0]
            out.append(lp)
    return out


def _loss(parts, pairs):
    pair = torch.cat([torch.full((len(x),), i // 2) for i, x in enumerate(parts)])
    kind = torch.cat([torch.full((len(x),), 1 + i % 2) for i, x in enumerate(parts)])
    n_chosen = sum(len(p.chosen) for p in pairs)
    return orpo_loss(torch.cat(parts), pair, kind, len(pairs), 0.5, False, n_chosen, len(pairs)).loss


@pytest.mark.parametrize("name", FAMILIES)
def test_step_one_equals_the_stock_forward_with_pixel_values(folders, name, tmp_path):
    folder = folders[name]
    imgs = make_images(tmp_path / "pics")
    rows = image_rows([f"pics/{p.name}" for p in imgs])
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    processor = image_forward.load_processor(folder)
    store, stats, _ = prepare_pairs(str(data), processor.tokenizer, 256, processor=processor, cache=False)
    assert len(store) == len(rows) and all(p.images for p in store)
    pairs = list(store)
    model = load_model(folder)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ref = _stock_logps(model, processor, rows, pairs)
    g_ref = torch.autograd.grad(_loss(ref, pairs), params, allow_unused=True)

    images = image_forward.ImagePath(model, processor)
    paths = Paths("blocks", True, True, "linear")
    assert images.decide(model, paths) == image_forward.SHARED, paths.images
    assert "vision encoder once per pair" in paths.line()
    policy = PolicyForward(model, paths, images=images)
    batch = policy.collate(pairs, prompt_in_nll=False)
    assert batch.layout.rows == 2 * len(pairs)  # one sequence per row
    calls = []
    hook = (model.model.vision_tower if hasattr(model.model, "vision_tower") else None).register_forward_hook(
        lambda *a: calls.append(1))
    logps = policy(batch)
    hook.remove()
    assert len(calls) == len(pairs)  # the encoder ran once per pair, not once per row
    ours = torch.split(logps, [len(x) for x in ref])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(_loss(list(ours), pairs), params, allow_unused=True)
    for a, b, p in zip(g, g_ref, params):
        assert (a is None) == (b is None)
        if a is not None:
            assert float((a - b).norm()) <= 1e-4 * max(float(b.norm()), 1e-6)
    # the per-row fallback is exact too
    images.mode = image_forward.PER_ROW
    torch.testing.assert_close(PolicyForward(model, paths, images=images)(batch).detach(), logps.detach(),
                               atol=1e-5, rtol=1e-5)


def _train_cfg(folder, data, out, **kw):
    return orpo.TrainConfig(model=str(folder), data=data, output_dir=str(out), max_steps=2, batch_size=2,
                            precision="fp32", lr=1e-2, save_steps=0, eval_samples=0, max_length=96, **kw)


@pytest.mark.parametrize("name", FAMILIES)
def test_trains_from_a_jsonl_file_with_relative_paths_and_saves_the_vision_tower_bit_for_bit(folders, name, tmp_path):
    imgs = make_images(tmp_path / "data" / "pics")
    text_row = {"prompt": [{"role": "user", "content": "Write about the sea."}],
                "chosen": [{"role": "assistant", "content": "The sea is blue."}], "rejected": [{"role": "assistant", "content": "No."}]}
    # text pairs mixed in: a micro-batch with an image pair runs it one sequence per row
    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", image_rows([f"pics/{p.name}" for p in imgs]) + [text_row])
    out = tmp_path / "run"
    res = run_orpo(["train", "--model", folders[name], "--data", data, "--output-dir", out, "--max-steps", "2",
                    "--batch-size", "2", "--precision", "fp32", "--lr", "1e-2", "--save-steps", "0", "--eval-samples", "0",
                    "--max-length", "96"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "image pairs: one sequence per row, vision encoder once per pair" in res.stdout + res.stderr
    assert "6 rows, 6 pairs kept" in res.stdout + res.stderr
    saved = out / "model"
    before, after = vision_state(folders[name]), vision_state(saved)
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    summary = json.loads((out / "summary.json").read_text())
    assert "vision encoder once per pair" in json.dumps(summary["paths"])


def test_trains_from_rows_in_memory_with_pil_images_and_bytes(folders, tmp_path):
    from PIL import Image

    import datasets

    imgs = make_images(tmp_path / "pics")
    pil = [Image.open(p).convert("RGB") for p in imgs]
    rows = image_rows([0, 1, 2])
    for r in rows:  # PIL images in a list of dicts; one row's image as encoded bytes
        r["images"] = [pil[i] for i in r["images"]] if isinstance(r["images"], list) else imgs[r["images"]].read_bytes()
    result = orpo.train(_train_cfg(folders["gemma3"], rows, tmp_path / "list"))  # full fine-tuning
    assert result.steps == 2
    before, after = vision_state(folders["gemma3"]), vision_state(result.model_dir)
    assert before and before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # a datasets.Dataset whose column has the Image feature (its rows come back as PIL images)
    ds = datasets.Dataset.from_list([{**r, "images": [str(imgs[i]) for i in r["images"]]}
                                     for r in image_rows([0, 1, 2])[:4]])
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    assert isinstance(ds[0]["images"][0], Image.Image)
    result = orpo.train(_train_cfg(folders["llava"], ds, tmp_path / "ds", eval_data=ds))  # evaluated on images too
    assert result.steps == 2 and np.isfinite(result.eval_metrics["eval_loss"])
    assert json.loads((tmp_path / "ds" / "data_counts.json").read_text())["train"]["kept"] == 4


def _one_line_error(cmd_args, cwd):
    res = run_orpo(cmd_args, cwd)
    assert res.returncode != 0
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr[-2000:]
    return err.splitlines()[-1], err


def test_bad_inputs_get_one_line_each_and_nothing_written(folders, tiny_model_dir, tmp_path):
    imgs = make_images(tmp_path / "pics")
    rows = image_rows([f"pics/{p.name}" for p in imgs])
    missing = write_jsonl(tmp_path / "missing.jsonl", rows[:1] + [{**rows[1], "images": ["pics/nope.png"]}])
    base = ["train", "--max-steps", "1", "--precision", "fp32", "--eval-samples", "0"]
    out = tmp_path / "out"
    line, _ = _one_line_error(base + ["--model", str(folders["gemma3"]), "--data", str(missing), "--output-dir", str(out)],
                              tmp_path)
    assert f"{missing}:2" in line and "nope.png" in line and "no such file" in line
    assert not any(out.glob("*")) if out.exists() else True
    # images given to a text-only model
    good = write_jsonl(tmp_path / "good.jsonl", rows)
    line, _ = _one_line_error(base + ["--model", str(tiny_model_dir), "--data", str(good), "--output-dir", str(out)],
                              tmp_path)
    assert "text-only model" in line and "'llama'" in line
    # more image tokens than --max-length allows
    line, _ = _one_line_error(base + ["--model", str(folders["gemma3"]), "--data", str(good), "--output-dir", str(out),
                                      "--max-length", "12"], tmp_path)
    assert f"{good}:1" in line and "image" in line and "--max-length" in line
    assert not any(out.glob("*")) if out.exists() else True
    # an image file that is not an image; an image part in a completion
    (tmp_path / "pics" / "bad.png").write_text("not an image")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "images": ["pics/bad.png"]}])
    line, _ = _one_line_error(base + ["--model", str(folders["gemma3"]), "--data", str(bad), "--output-dir", str(out)],
                              tmp_path)
    assert f"{bad}:1" in line and "cannot be read as an image" in line
    comp = write_jsonl(tmp_path / "comp.jsonl", [{**rows[0], "chosen": [{"role": "assistant", "content": [
        {"type": "image"}, {"type": "text", "text": "x"}]}]}])
    line, _ = _one_line_error(base + ["--model", str(folders["gemma3"]), "--data", str(comp), "--output-dir", str(out)],
                              tmp_path)
    assert f"{comp}:1" in line and "'chosen'" in line and "prompt" in line


def test_orpo_data_shows_where_the_image_sits(folders, tmp_path):
    imgs = make_images(tmp_path / "pics")
    data = write_jsonl(tmp_path / "pairs.jsonl", image_rows([f"pics/{p.name}" for p in imgs]))
    res = run_orpo(["data", "--data", data, "--model", folders["gemma3"], "--color", "never"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "<image 1: 4 tokens>" in res.stdout
    assert "<image_soft_token>" not in res.stdout  # the image's tokens are shown as one marker


def test_the_token_cache_keeps_the_images_and_changes_with_them(folders, tmp_path, monkeypatch):
    """A cached store gives back each pair's images; an image file rewritten in place is new data (new cache
    entry, new content id for --resume); PIL images in memory are cached as PNG bytes."""
    from PIL import Image

    from orpo.data.images import open_image
    from orpo.data.prepare import scan_rows, tokenize_rows

    monkeypatch.setenv("ORPO_CACHE", str(tmp_path / "cache"))
    imgs = make_images(tmp_path / "pics")
    data = write_jsonl(tmp_path / "pairs.jsonl", image_rows([f"pics/{p.name}" for p in imgs]))
    processor = image_forward.load_processor(folders["gemma3"])
    tok = processor.tokenizer

    def load():
        rows = scan_rows(str(data))
        return rows, tokenize_rows(rows, tok, 96, processor=processor)[0]

    rows1, first = load()
    rows2, again = load()  # from the cache: the same tokens and the same images
    assert rows2.key == rows1.key and rows1.content.startswith("sha256:") and "+images:sha256:" in rows1.content
    assert [p.images for p in again] == [p.images for p in first] == [(str(imgs[0].resolve()),),
                                                                       (str(imgs[1].resolve()),),
                                                                       (str(imgs[2].resolve()),),
                                                                       (str(imgs[0].resolve()), str(imgs[1].resolve())),
                                                                       (str(imgs[2].resolve()),)]
    Image.new("RGB", (9, 9), (1, 2, 3)).save(imgs[2])  # the same path, other pixels
    rows3, _ = load()
    assert rows3.key != rows1.key and rows3.content != rows1.content
    # in memory: PIL images are kept as PNG bytes through the cache, pixel for pixel
    pil = Image.open(imgs[0]).convert("RGB")
    mem = [{**image_rows(["x", "y", "z"])[0], "images": [pil]}]
    store = tokenize_rows(scan_rows(mem), tok, 96, processor=processor)[0]
    again = tokenize_rows(scan_rows(mem), tok, 96, processor=processor)[0]
    assert isinstance(again[0].images[0], bytes)
    assert np.array_equal(np.asarray(open_image(again[0].images[0])), np.asarray(pil))
    assert list(again[0].prompt) == list(store[0].prompt)


def test_qwen_vl_image_pairs_need_torchvision_in_one_line(tmp_path, chatml_tokenizer):
    """Qwen-VL processors load a torchvision video processor; without torchvision the run stops in one line
    before the model loads (text pairs still train these checkpoints: tests/test_multimodal.py)."""
    import importlib.util

    from mm_archs import save

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    folder = save("qwen2_5_vl", tmp_path / "qwen", chatml_tokenizer)
    imgs = make_images(tmp_path / "pics")
    data = write_jsonl(tmp_path / "pairs.jsonl", image_rows([f"pics/{p.name}" for p in imgs]))
    line, _ = _one_line_error(["train", "--model", folder, "--data", data, "--output-dir", tmp_path / "out",
                               "--max-steps", "1"], tmp_path)
    assert "'qwen2_5_vl'" in line and "torchvision" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_images_need_chat_messages(tmp_path):
    from orpo.data.readers import load_pairs

    imgs = make_images(tmp_path / "pics", 1)
    data = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b",
                                                    "images": ["pics/img0.png"]}])
    with pytest.raises(UserError, match=r"plain.jsonl:1: field 'images': image pairs need chat messages"):
        load_pairs(data)
    assert imgs


def test_the_check_falls_back_to_the_stock_forward_per_row_when_sharing_is_wrong(folders):
    """Features computed once per pair that differ from the stock forward's (here: scaled) are caught by
    the start-up check, which then runs image pairs through the stock forward with pixel_values per row."""
    model = load_model(folders["gemma3"])
    processor = image_forward.load_processor(folders["gemma3"])
    true = model.get_image_features

    def scaled(**kw):
        out = true(**kw)
        out.pooler_output = out.pooler_output * 1.5
        return out

    model.get_image_features = scaled  # what the shared path calls; the stock forward calls its inner model's
    images = image_forward.ImagePath(model, processor)
    paths = Paths("blocks", True, True, "linear")
    assert images.decide(model, paths) == image_forward.PER_ROW
    assert "image pairs: one sequence per row, the model's own forward with pixel_values per row (log-probs off" \
        in paths.line()
