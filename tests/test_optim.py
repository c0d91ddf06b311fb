"""--optim: every optimizer that runs on CPU trains, saves, resumes and lands near exact AdamW's loss on a
tiny model; the CUDA-only one and missing packages stop with one line before any heavy work."""

import importlib.util
import json
import math

import pytest
import torch

from orpo import config as C
from orpo.cli import main
from orpo.errors import UserError
from orpo.optim import CHOICES, check_optimizer, make_optimizer

from conftest import make_tiny_llama

# name -> extra flags. Hidden size 64 gives matrices of 4,096+ values, which the 8-/4-bit optimizers
# quantise (smaller tensors keep fp32 states); GaLore gets a rank below 64 and a refresh inside the run.
RUNS = {
    "adamw": [],
    "adamw_8bit": [],
    "adamw_torch_8bit": [],
    "adamw_torch_4bit": [],
    "galore_adamw": ["--galore-rank", 32, "--galore-update-interval", 2, "--galore-scale", 1.0],
    "adamw+bf16": ["--bf16-weights"],
    "adamw_torch_8bit+bf16": ["--bf16-weights"],
}
# Every one of them resumes bitwise on CPU (fp32, no autocast): the checkpoint holds the whole optimizer
# state, and torchao's stochastic rounding draws from torch's default generator, whose state it restores.
STEPS = 8
# mean |loss - exact AdamW's loss| allowed over the 8 steps (measured 2026-12-01: 0, 0.004, 0.002, 0.075, 0.040, 0.042)
TOLERANCE = {"adamw": 0.0, "adamw_8bit": 0.02, "adamw_torch_8bit": 0.02, "adamw_torch_4bit": 0.15, "adamw+bf16": 0.1,
             "adamw_torch_8bit+bf16": 0.1}


def _package(name: str) -> str | None:
    optim = name.split("+")[0]
    return "torchao" if name.endswith("+bf16") else CHOICES[optim].module


@pytest.fixture(scope="module")
def model64(tmp_path_factory, chatml_tokenizer):
    d = tmp_path_factory.mktemp("tiny-llama-64")
    make_tiny_llama(len(chatml_tokenizer), hidden=64).save_pretrained(d, safe_serialization=True)
    chatml_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from conftest import CONV_ROWS, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("data") / "conv.jsonl", CONV_ROWS * 4)


def _run(args) -> int:
    return main(["train", *[str(a) for a in args]])


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _common(model64, pairs, name):
    optim = name.split("+")[0]
    return ["--model", model64, "--data", pairs, "--no-lora", "--beta", 0.1, "--precision", "fp32", "--batch-size", 2, "--lr", 3e-3,
            "--scheduler", "constant", "--warmup-steps", 0, "--eval-samples", 0, "--optim", optim, *RUNS[name]]


@pytest.fixture(scope="module")
def exact_losses(model64, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("exact") / "run"
    assert _run(_common(model64, pairs, "adamw") + ["--output-dir", out, "--max-steps", STEPS, "--save-steps", 0]) == 0
    return [r["loss"] for r in _rows(out)]


@pytest.mark.parametrize("name", list(RUNS))
def test_optimizer_trains_saves_resumes_and_tracks_adamw(name, model64, pairs, tmp_path, exact_losses):
    pkg = _package(name)
    if pkg and importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{pkg} is not installed")
    common = _common(model64, pairs, name)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(common + ["--output-dir", a, "--max-steps", STEPS, "--save-steps", 4]) == 0
    assert _run(common + ["--output-dir", b, "--max-steps", 4, "--save-steps", 4]) == 0
    # the optimizer's state is in the checkpoint, as tensors a weights_only load accepts
    state = torch.load(b / "checkpoints" / "step-000004" / "optimizer.pt", weights_only=True)
    assert len(state["state"]) > 0
    assert _run(common + ["--output-dir", b, "--max-steps", STEPS, "--save-steps", 4, "--resume"]) == 0

    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in ra + rb)
    keys = ("loss", "grad_norm", "logps/chosen", "logps/rejected")
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]  # bitwise
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # it learns, and stays near exact AdamW: the mean |loss - exact loss| over the run (losses fall from
    # 6.7 to 0.6 here), or for GaLore, a low-rank method (rank 32 of 64), most of exact AdamW's drop
    losses = [r["loss"] for r in ra]
    drop, exact_drop = losses[0] - losses[-1], exact_losses[0] - exact_losses[-1]
    assert exact_drop > 5  # the comparison means something
    if name == "galore_adamw":
        assert drop > 0.7 * exact_drop, (losses, exact_losses)
    else:
        gap = sum(abs(x - y) for x, y in zip(losses, exact_losses)) / STEPS
        assert gap <= TOLERANCE[name], (gap, losses, exact_losses)
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(a / "model")
    assert final.dtype == (torch.bfloat16 if name.endswith("+bf16") else torch.float32)


def test_clipping_and_nan_skipping_with_a_low_bit_optimizer(model64, tiny_model, monkeypatch):
    """The loop clips, then steps only on finite gradients: a skipped step leaves weights and state alone."""
    pytest.importorskip("torchao")
    cfg = C.build({"optim": "adamw_torch_8bit", "lr": 1e-2})
    model = make_tiny_llama(400, hidden=64)
    opt = make_optimizer(model, cfg)
    w = model.model.layers[0].mlp.up_proj.weight
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 100
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert float(norm) > 1.0
    assert float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])) == pytest.approx(1.0, rel=1e-4)
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(before, w)
    assert type(opt.state[w]["exp_avg"]).__name__ == "OptimState8bit"  # really quantised


def test_paged_adamw_8bit_on_cpu_is_one_clear_line(tmp_path, tiny_model_dir, plain_file, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = _run(["--model", tiny_model_dir, "--data", plain_file, "--output-dir", tmp_path / "o", "--optim",
               "paged_adamw_8bit"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--optim paged_adamw_8bit" in err and "needs a CUDA GPU" in err and "adamw_8bit" in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.parametrize("optim,package", [("adamw_8bit", "bitsandbytes"), ("galore_adamw", "galore-torch"),
                                           ("adamw_torch_4bit", "torchao")])
def test_missing_package_names_the_pip_command(optim, package, tmp_path, tiny_model_dir, plain_file, capsys,
                                               monkeypatch):
    real = importlib.util.find_spec
    module = CHOICES[optim].module
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a))
    rc = _run(["--model", tiny_model_dir, "--data", plain_file, "--output-dir", tmp_path / "o", "--optim", optim])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"pip install {package}" in err, err


def test_torchao_on_cpu_without_a_compiler_is_one_clear_line(monkeypatch):
    pytest.importorskip("torchao")
    import orpo.optim as O

    monkeypatch.setattr(O, "_cxx_compiler", lambda: None)
    with pytest.raises(UserError, match="--optim adamw_torch_4bit: torchao compiles .* needs a C\\+\\+ compiler"):
        check_optimizer(C.build({"optim": "adamw_torch_4bit"}), cuda=False)
    check_optimizer(C.build({"optim": "adamw_torch_4bit"}), cuda=True)  # CUDA: triton, no host compiler needed
    check_optimizer(C.build({"optim": "adamw_8bit"}), cuda=False)


def test_bf16_weights_needs_a_torchao_optimizer():
    with pytest.raises(UserError, match="--bf16-weights: stochastic rounding comes with torchao"):
        check_optimizer(C.build({"optim": "adamw_8bit", "bf16_weights": True}), cuda=False)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        check_optimizer(C.build({"optim": "paged_adamw_8bit"}), cuda=False)


def test_low_memory_fills_in_only_what_is_not_given(tmp_path):
    cfg = C.build({"low_memory": True})
    assert {k: getattr(cfg, k) for k in C.LOW_MEMORY} == C.LOW_MEMORY
    cfg = C.build({"low_memory": True, "gradient_checkpointing": False, "optim": "adamw"})
    assert cfg.gradient_checkpointing is False and cfg.optim == "adamw"
    p = tmp_path / "c.yaml"
    p.write_text("low_memory: true\noptim: adamw_torch_4bit\n")
    cfg = C.build(yaml_path=p)
    assert cfg.optim == "adamw_torch_4bit" and cfg.gradient_checkpointing is True
    C.dump_yaml(cfg, tmp_path / "resolved.yaml")  # the resolved config feeds back unchanged (lr written resolved)
    again = C.build(yaml_path=tmp_path / "resolved.yaml").to_dict()
    assert {k: v for k, v in again.items() if k != "lr"} == {k: v for k, v in cfg.to_dict().items() if k != "lr"}


def test_galore_projects_only_decoder_matrices_and_lora_gets_plain_adamw():
    pytest.importorskip("galore_torch")
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama(400, hidden=64)
    opt = make_optimizer(model, C.build({"optim": "galore_adamw", "galore_rank": 8}))
    projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    assert len(projected) == 2 * 7  # q, k, v, o, gate, up, down of two layers; not the (tied) embedding
    assert all(id(p) != id(model.model.embed_tokens.weight) for p in projected)
    lora = get_peft_model(make_tiny_llama(400, hidden=64), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    opt = make_optimizer(lora, C.build({"optim": "galore_adamw", "galore_rank": 8, "lora": True}))
    assert not any("rank" in g for g in opt.param_groups)  # rank-4 adapters: nothing to project


@pytest.mark.parametrize("name", list(RUNS))
def test_optimizer_trains_lora_adapters(name, model64, pairs, tmp_path):
    """With --lora only the adapters are trained (and held by the optimizer); the base stays as it was."""
    pkg = _package(name)
    if pkg and importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{pkg} is not installed")
    out = tmp_path / "run"
    args = _common(model64, pairs, name) + ["--lora", "--lora-r", 4, "--lr", 1e-2, "--output-dir", out, "--max-steps", 3,
                                             "--save-steps", 2]
    assert _run(args) == 0
    rows = _rows(out)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    from safetensors.torch import load_file

    state = torch.load(out / "checkpoints" / "step-000003" / "optimizer.pt", weights_only=True)
    saved = load_file(out / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert len(state["state"]) == len(saved)  # a state for every adapter matrix, none for the base
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in lora_b)  # B starts at zero: the adapters moved


def test_tutorial_recipe_is_the_tutorials_job():
    from pathlib import Path

    cfg = C.build(yaml_path=Path(__file__).resolve().parents[1] / "configs" / "mistral-7b-qlora-tutorial.yaml")
    assert (cfg.model.endswith("Mistral-7B-v0.1") and cfg.load_in_4bit and cfg.lora and cfg.optim == "paged_adamw_8bit")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 16, 0.05)
    assert set(cfg.lora_target.split(",")) == {f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")}
    assert (cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.warmup_ratio, cfg.scheduler) == (2, 4, 8e-6, 0.1, "linear")
    assert (cfg.beta, cfg.max_length, cfg.max_steps, cfg.eval_steps, cfg.precision) == (0.1, 1024, 100, 20, "bf16")
    assert cfg.data == "HuggingFaceH4/ultrafeedback_binarized:train_prefs"
    assert cfg.eval_data == "HuggingFaceH4/ultrafeedback_binarized:test_prefs"
