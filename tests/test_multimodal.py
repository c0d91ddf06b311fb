"""Text ORPO on image-text checkpoints (tiny random ones of each family transformers 5.25 has, built from
configs in their own classes): loaded whole in their own class, the language model trained with the
model's own numbers, the vision tower and projector frozen and saved bit for bit, saved in the class
they came in. And a model type with no class orpo can train is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

import orpo
from conftest import CONV_ROWS
from mm_archs import FAMILIES, IMG, save, vision_state
from orpo import multimodal, support
from orpo.data.templates import TokenizedPair
from orpo.errors import UserError
from orpo.forward import PolicyForward
from orpo.loss import KIND_CHOSEN, KIND_REJECTED, orpo_loss
from orpo.model import add_lora, load_model

FAMILY_NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, chatml_tokenizer):
    """One saved checkpoint per family, built once."""
    root = tmp_path_factory.mktemp("mm")
    return {name: save(name, root / name, chatml_tokenizer) for name in FAMILY_NAMES}


def _architecture(folder) -> str:
    return json.loads((folder / "config.json").read_text())["architectures"][0]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_loads_whole_in_its_own_class_with_the_vision_tower_frozen(folders, name):
    model = load_model(folders[name])
    assert type(model).__name__ == _architecture(folders[name])  # not a text-only class that drops the tower
    outside = multimodal.outside_modules(model)
    assert outside and all("vision" in n or "visual" in n or "projector" in n or "embed_vision" in n
                          or "connector" in n for n in outside)
    for n, p in model.named_parameters():
        inside = not any(n == o or n.startswith(o + ".") for o in outside)
        assert p.requires_grad == inside, n
    # the language model ORPO trains is the decoder stack whose output the chunked head reads
    assert hasattr(multimodal.language_decoder(model), "layers")


def _pairs(seed=0) -> list[TokenizedPair]:
    """Two pairs longer than the families' windows and chunks (12), image and boundary ids excluded."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, IMG - 8, (n,), generator=g).numpy().astype("int32")  # noqa: E731
    return [TokenizedPair(prompt=ids(14), chosen=ids(9), rejected=ids(6), where="t:0"),
            TokenizedPair(prompt=ids(5), chosen=ids(16), rejected=ids(18), where="t:1")]


def _stock_loss(model, pairs, beta=0.5):
    """The ORPO loss from the model's stock forward: each prompt+completion alone through the model's
    own forward (one sequence, its own mask and positions, full logits)."""
    logps, pair, kind = [], [], []
    for i, p in enumerate(pairs):
        for k, completion in ((KIND_CHOSEN, p.chosen), (KIND_REJECTED, p.rejected)):
            seq = torch.tensor(list(p.prompt) + list(completion))[None]
            logits = model(input_ids=seq, use_cache=False).logits[0].float()
            lp = torch.log_softmax(logits[len(p.prompt) - 1 : -1], -1).gather(1, seq[0, len(p.prompt):, None])[:, 0]
            logps.append(lp)
            pair += [i] * len(lp)
            kind += [k] * len(lp)
    n_chosen = sum(len(p.chosen) for p in pairs)
    return orpo_loss(torch.cat(logps), torch.tensor(pair), torch.tensor(kind), len(pairs), beta, False, n_chosen,
                     len(pairs))


def _grads(model, loss) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads) if g is not None}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_text_step_one_equals_the_stock_forward(folders, name):
    """Loss, metrics and the gradient of every trained weight from the path the start-up check picks
    equal those of the model's stock forward; the vision tower gets no gradient."""
    model = load_model(folders[name]).eval()
    pairs = _pairs()
    paths = support.decide(model, max_length=64)
    policy = PolicyForward(model, paths)
    batch = policy.collate(pairs, prompt_in_nll=False)
    n_chosen = sum(len(p.chosen) for p in pairs)
    ours = orpo_loss(policy(batch), batch.pair, batch.kind, batch.n_pairs, 0.5, False, n_chosen, len(pairs))
    stock = _stock_loss(model, pairs)
    metrics = lambda o: {"loss": o.loss, "nll_sum": o.nll_sum, "or_sum": o.or_sum, **o.pair_sums}  # noqa: E731
    mine, theirs = metrics(ours), metrics(stock)
    assert mine.keys() == theirs.keys() and "logps/chosen" in mine
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-5, msg=f"{paths.name} {k}")
    g_ours, g_stock = _grads(model, ours.loss), _grads(model, stock.loss)
    assert g_ours.keys() == g_stock.keys()
    outside = tuple(multimodal.outside_modules(model))
    assert not any(n.startswith(outside) for n in g_ours)
    a = torch.cat([g_ours[n].flatten() for n in sorted(g_ours)])
    b = torch.cat([g_stock[n].flatten() for n in sorted(g_stock)])
    assert float((a - b).norm() / b.norm()) < 1e-4, paths.name


def _small(folder, out, **kw):
    return orpo.TrainConfig(model=str(folder), data=CONV_ROWS, output_dir=str(out), max_steps=2, batch_size=2,
                            precision="fp32", lr=1e-2, save_steps=0, eval_samples=0, max_length=64, **kw)


def _reload(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)


def _assert_saved_whole(src, saved):
    """``saved`` reloads in ``src``'s class with the same parameter names, and every vision and projector
    tensor is bit-identical to ``src``'s; the language model changed."""
    assert _architecture(saved) == _architecture(src)
    before, after = vision_state(src), vision_state(saved)
    assert before and before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    original, trained = _reload(src), _reload(saved)
    assert type(trained) is type(original)
    assert dict(trained.named_parameters()).keys() == dict(original.named_parameters()).keys()
    head = multimodal.language_decoder(original).layers[0]
    head_after = multimodal.language_decoder(trained).layers[0]
    assert any(not torch.equal(a, b) for a, b in zip(head.parameters(), head_after.parameters()))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_full_training_saves_the_whole_checkpoint_in_its_own_class(folders, name, tmp_path):
    result = orpo.train(_small(folders[name], tmp_path / "run"))
    assert result.steps == 2
    _assert_saved_whole(folders[name], result.model_dir)


@pytest.mark.parametrize("name", ["gemma3", "qwen2_5_vl", "llama4"])
def test_lora_targets_the_language_model_only_and_merges_whole(folders, name, tmp_path):
    result = orpo.train(_small(folders[name], tmp_path / "run", lora=True, lora_r=4))
    from safetensors.torch import load_file

    keys = list(load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors")))
    assert keys and not any("vision" in k or "visual" in k or "projector" in k for k in keys)
    _assert_saved_whole(folders[name], result.model_dir)
    # `orpo export` merges the adapter onto the base again: whole, in its class, and the card says so
    exported = orpo.export_model(result.output_dir, tmp_path / "export")
    _assert_saved_whole(folders[name], exported.dest)
    card = (exported.dest / "README.md").read_text()
    assert "AutoModelForImageTextToText.from_pretrained" in card and "AutoModelForCausalLM" not in card


def test_named_lora_targets_skip_the_vision_tower(folders):
    """The vision tower has q_proj / v_proj too (SigLIP); a named target list still stays off it."""
    model = add_lora(load_model(folders["gemma3"]), 4, 8, 0.0, "q_proj,v_proj")
    wrapped = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert wrapped and all("language_model" in n for n in wrapped)


def test_a_model_with_no_trainable_class_is_refused_in_one_line(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel  # an encoder: no causal-LM class

    DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2,
                                     hidden_dim=16)).save_pretrained(tmp_path)
    with pytest.raises(UserError) as e:
        load_model(tmp_path)
    line = str(e.value)
    assert "\n" not in line and "'distilbert'" in line and "causal-LM" in line and "image-text" in line
    assert len(line.replace(str(tmp_path), "")) < 400  # not transformers' list of 200 config classes


def test_a_language_model_saved_alone_loads_in_its_text_class(tmp_path, chatml_tokenizer):
    """A folder saved by Qwen3.5's text-only class under the composite config (as transformers'
    AutoModelForCausalLM loads and saves it) has no vision weights: it loads in that class, never in
    the image-text class with a random vision tower."""
    from transformers import AutoModelForCausalLM

    from mm_archs import build

    text_only = AutoModelForCausalLM.from_config(build("qwen3_5").config)
    text_only.save_pretrained(tmp_path)
    chatml_tokenizer.save_pretrained(tmp_path)
    assert _architecture(tmp_path) == "Qwen3_5ForCausalLM"
    assert type(load_model(tmp_path)).__name__ == "Qwen3_5ForCausalLM"
