"""The default recipe on every family of the architecture matrix (tests/archs.py): `orpo train --model`
with LoRA on all-linear and lean activations (the CPU default) trains one step, every adapter it attaches
is seen by the forward, and what all-linear leaves out is named with its reason. Also the rules behind
it, on toy modules: lean activations patch only one-input forwards; all-linear skips a projection whose
weight its layer reads directly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import orpo
from orpo.lean import lean_activations
from orpo.lora_targets import resolve_all_linear

from archs import ARCHS, build
from conftest import PLAIN_ROWS

# arch -> (leaf names all-linear must skip, part of the reason)
SKIPPED = {
    "mixtral": (["experts.gate_up_proj", "experts.down_proj"], "fused into 3-D weights"),
    "gpt_oss": (["experts.gate_up_proj", "experts.down_proj"], "fused into 3-D weights"),
    "llama4": (["router"], "Linear subclass with another forward"),
    "falcon_h1": (["out_proj"], "reads the weight directly"),
    "granitemoehybrid": (["out_proj"], "reads the weight directly"),
    "jamba": (["dt_proj"], "reads the weight directly"),
    "qwen3_next": (["gate_proj", "up_proj", "down_proj"], "peft maps this name to the fused MoE experts"),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, chatml_tokenizer):
    made = {}

    def get(name):
        if name not in made:
            d = tmp_path_factory.mktemp(name)
            build(name).save_pretrained(d, safe_serialization=True)
            chatml_tokenizer.save_pretrained(d)
            made[name] = d
        return made[name]

    return get


@pytest.mark.parametrize("name", list(ARCHS))
def test_the_default_recipe_trains_every_family(tmp_path, model_dirs, name, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    cfg = orpo.default_job(model=str(model_dirs(name)), data=PLAIN_ROWS * 2, output_dir=str(out), max_steps=1,
                           batch_size=2, eval_samples=0, eval_steps=0, lr=1e-2)
    assert cfg.lora and cfg.lora_target == "all-linear" and cfg.lora_dropout > 0
    result = orpo.train(cfg)
    assert result.steps == 1 and math.isfinite(result.final_metrics["loss"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("LoRA targets (all-linear): "))
    taken = line.split(": ", 1)[1].split(";")[0].split(", ")
    assert taken and "lm_head" not in taken
    if name in SKIPPED:
        names, why = SKIPPED[name]
        skipped = line.split("; skipped: ", 1)[1]
        assert all(n in skipped for n in names) and why in skipped, line
        assert not set(n.rsplit(".", 1)[-1] for n in names) & set(taken), line
    # every adapter attached is on the forward's path: one step moved every lora_B away from its zero init
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values()), [k for k, v in lora_b.items() if not v.any()]


class _Fused(nn.Module):
    """A layer that uses its projection through the weight, as Mamba's fused kernels do."""

    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(8, 8)
        self.out_proj = nn.Linear(8, 8)

    def forward(self, x):
        return nn.functional.linear(self.in_proj(x), self.out_proj.weight)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        experts = nn.Module()
        experts.gate_up_proj = nn.Parameter(torch.zeros(4, 8, 16))
        self.decoder = nn.ModuleDict(dict(mixer=_Fused(), mlp=nn.Linear(8, 8), experts=experts,
                                          conv=nn.Conv1d(8, 8, 3)))
        self.head = nn.Linear(8, 5)
        self.vision = nn.ModuleDict(dict(proj=nn.Linear(8, 8), patches=nn.Module()))
        self.vision.patches.w = nn.Parameter(torch.zeros(2, 2, 2))


def test_all_linear_skips_what_lora_cannot_take_by_reading_the_code():
    toy = _Toy()
    t = resolve_all_linear(toy, toy.decoder, toy.head)
    assert t.taken == ["in_proj", "mlp"] and t.modules == ["in_proj", "mlp"]  # leaf names: each is unique
    assert t.skipped == {
        "its layer reads the weight directly, so an adapter would be bypassed": ["out_proj"],
        "MoE experts fused into 3-D weights, which peft adapts only without dropout": ["experts.gate_up_proj"],
        "the output head, as in peft's all-linear": ["head"],
        "outside the language model, kept frozen": ["proj"],
    }
    assert t.line().startswith("LoRA targets (all-linear): in_proj, mlp; skipped: out_proj (its layer reads")


class _GatedNorm(nn.Module):
    """An RMSNorm whose forward also takes a gate (Granite-4.0-H's Mamba norm): with gate=None it is a
    plain RMSNorm, so a one-input check alone would pass it."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states, gate=None):
        x = hidden_states.float()
        if gate is not None:
            x = x * nn.functional.silu(gate.float())
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_lean_activations_patch_only_one_input_forwards():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain, self.gated = LlamaRMSNorm(8), _GatedNorm(8)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Decoder()

        def get_decoder(self):
            return self.model

    m = Model().train()
    assert lean_activations(m) == 1
    assert "forward" in vars(m.model.plain) and "forward" not in vars(m.model.gated)
    x, g = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert torch.equal(m.model.gated(x, g), _GatedNorm.forward(m.model.gated, x, g))


def test_granite_4_h_trains_with_lean_activations_on_its_own_numbers():
    """Granite-4.0-H: its gated norm is left alone, the rest is patched, and a training step gives the
    unpatched model's loss and gradients."""
    from orpo.data.batching import collate
    from orpo.data.templates import TokenizedPair
    from orpo.forward import PolicyForward
    from orpo.loss import orpo_loss

    import numpy as np

    rng = np.random.default_rng(0)
    pairs = [TokenizedPair(*(rng.integers(3, 400, n).astype(np.int32) for n in (9, 5, 7)), "t:0")]
    models = [build("granitemoehybrid").train() for _ in range(2)]
    assert lean_activations(models[1]) > 0
    gated = [m for m in models[1].modules() if type(m).__name__.endswith("RMSNormGated")]
    assert gated and all("forward" not in vars(m) for m in gated)
    results = []
    for model in models:
        policy = PolicyForward(model, "separate")
        batch = policy.collate(pairs, False)
        part = orpo_loss(policy(batch), batch.pair, batch.kind, batch.n_pairs, 0.1, False, 5.0, 1.0)
        part.loss.backward()
        results.append((part.loss.detach(), [p.grad for p in model.parameters()]))
    (la, ga), (lb, gb) = results
    assert torch.equal(la, lb)
    for a, b in zip(ga, gb):
        assert (a is None and b is None) or float((a - b).abs().max()) <= 1e-5 * max(float(a.abs().max()), 1e-12)
