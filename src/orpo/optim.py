"""The optimizer: exact fused AdamW, or a memory-lean one (``--optim``), built over the trainable weights.

What each holds per trained parameter, besides its weight and gradient (fp32 unless ``--bf16-weights``):

    adamw               2 x fp32 moments       8 bytes   torch's fused AdamW, exact
    adamw_8bit          2 x 8-bit, blockwise   ~2 bytes  bitsandbytes AdamW8bit
    paged_adamw_8bit    the same, in CUDA unified memory that pages to the host under pressure (CUDA only)
    adamw_torch_8bit    2 x 8-bit, blockwise   ~2 bytes  torchao AdamW8bit (step compiled by torch.compile)
    adamw_torch_4bit    2 x 4-bit, blockwise   ~1 byte   torchao AdamW4bit
    galore_adamw        fp32 moments of the gradient projected to rank r (GaLore, Zhao et al. 2024):
                        for a (m, n) weight, m <= n, the moments are (r, n) plus an (m, r) projection
                        P refreshed by SVD every ``--galore-update-interval`` steps; the update is
                        scale * P @ adam(P^T g). Embeddings, the lm-head, norms and matrices of rank
                        <= r (LoRA adapters) get plain AdamW in the same optimizer.

``--bf16-weights`` casts the model to bf16 before the optimizer is built (2 bytes per weight and per
gradient instead of 4) and rounds each fp32 update back to bf16 stochastically (torchao's
``bf16_stochastic_round``): E[round(w + u)] = w + u, so updates far below a bf16 ulp still move the
weights on average. It needs one of the torchao-backed choices (``adamw`` then means torchao's
``_AdamW``; ``adamw_torch_8bit``, ``adamw_torch_4bit``).

Every optimizer here keeps all of its state in ``state_dict()`` as tensors and plain numbers, so the
checkpoint's ``torch.load(weights_only=True)`` restores it and a resumed run continues from the same
state (see tests/test_optim.py for which continue bitwise).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass

import torch

from .config import TrainConfig
from .errors import UserError


@dataclass(frozen=True)
class Choice:
    module: str | None  # the module that must be importable
    package: str | None  # the pip package that provides it
    cuda_only: bool = False
    torchao: bool = False  # compiled with torch.compile; takes --bf16-weights


CHOICES = {
    "adamw": Choice(None, None),
    "adamw_8bit": Choice("bitsandbytes", "bitsandbytes"),
    "paged_adamw_8bit": Choice("bitsandbytes", "bitsandbytes", cuda_only=True),
    "adamw_torch_8bit": Choice("torchao", "torchao", torchao=True),
    "adamw_torch_4bit": Choice("torchao", "torchao", torchao=True),
    "galore_adamw": Choice("galore_torch", "galore-torch"),
}


def check_optimizer(cfg: TrainConfig, cuda: bool | None = None) -> None:
    """Fail before any heavy work, with one line, when ``--optim`` cannot run here."""
    choice = CHOICES[cfg.optim]
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if choice.cuda_only and not cuda:
        raise UserError(f"--optim {cfg.optim}: pages its state through CUDA unified memory and needs a CUDA GPU; "
                        "without one use --optim adamw_8bit (the same 8-bit AdamW, unpaged)")
    if cfg.bf16_weights and cfg.optim != "adamw" and not choice.torchao:
        raise UserError(f"--bf16-weights: stochastic rounding comes with torchao's optimizers; use --optim adamw, "
                        f"adamw_torch_8bit or adamw_torch_4bit, not {cfg.optim}")
    needs = "torchao" if cfg.bf16_weights else choice.module
    package = "torchao" if cfg.bf16_weights else choice.package
    if needs and importlib.util.find_spec(needs) is None:
        what = "--bf16-weights" if cfg.bf16_weights and not choice.module else f"--optim {cfg.optim}"
        raise UserError(f"{what}: the {package} package is not installed; run: pip install {package} "
                        "(or pip install 'orpo[optim]')")
    if (choice.torchao or cfg.bf16_weights) and not cuda and not _cxx_compiler():
        raise UserError(f"{'--bf16-weights' if cfg.bf16_weights else '--optim ' + cfg.optim}: torchao compiles its "
                        "step with torch.compile, which on CPU needs a C++ compiler; install one (apt-get install g++) "
                        "or set CXX")


def _cxx_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")


def _import_quietly(name: str):
    """Import bitsandbytes / torchao without their start-up warnings about CUDA kernels and optional
    extensions that a CPU machine cannot load and this module does not use."""
    import importlib
    import logging

    logs = [logging.getLogger(n) for n in (name, "torch.utils._pytree")]  # torchao registers enums there
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optim`` over ``model``'s trainable parameters: weight decay on matrices
    only (biases and norms get none). With ``cfg.bf16_weights`` the model is cast to bf16 first."""
    if cfg.bf16_weights:
        model.to(torch.bfloat16)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    kwargs = dict(lr=cfg.resolved_lr(), betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    name = cfg.optim
    if name == "adamw" and not cfg.bf16_weights:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # a device or dtype without the fused kernel
            return torch.optim.AdamW(groups, **kwargs)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        bnb = _import_quietly("bitsandbytes")
        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return cls(groups, **kwargs)
    if name == "galore_adamw":
        return _galore(model, groups, cfg, kwargs)
    return _torchao(name, groups, cfg.bf16_weights, kwargs)


# ------------------------------------------------------------------------------------------------
# torchao: its optimizers want the learning rate as a tensor (a float would recompile the step for
# every new value), while schedulers, the resume code and the metrics read and write floats. The
# subclass keeps floats in ``param_groups`` and hands torchao a tensor only for the step.


def _torchao(name: str, groups: list[dict], bf16: bool, kwargs: dict) -> torch.optim.Optimizer:
    _import_quietly("torchao")
    import torchao.optim as ao
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit

    # The quantised states are tensor subclasses: allow them in the checkpoint's weights_only load.
    torch.serialization.add_safe_globals([OptimState4bit, OptimState8bit])
    base = {"adamw": ao._AdamW, "adamw_torch_8bit": ao.AdamW8bit, "adamw_torch_4bit": ao.AdamW4bit}[name]

    class FloatLR(base):
        def add_param_group(self, group: dict) -> None:
            torch.optim.Optimizer.add_param_group(self, group)

        @torch.no_grad()
        def step(self, closure=None):
            floats = [g["lr"] for g in self.param_groups]
            for g, lr in zip(self.param_groups, floats):
                g["lr"] = torch.tensor(float(lr), dtype=torch.float32)
            try:
                return super().step(closure)
            finally:
                for g, lr in zip(self.param_groups, floats):
                    g["lr"] = lr

    FloatLR.__name__ = FloatLR.__qualname__ = base.__name__
    return FloatLR(groups, bf16_stochastic_round=bf16, **kwargs)


# ------------------------------------------------------------------------------------------------
# GaLore: galore-torch keeps each projection in a Python object, which a weights_only checkpoint
# cannot hold; the subclass stores its matrix as a tensor and rebuilds the object on load.


def _galore(model: torch.nn.Module, groups: list[dict], cfg: TrainConfig, kwargs: dict) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW
    from galore_torch.galore_projector import GaLoreProjector

    skip = set()
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if emb is not None and getattr(emb, "weight", None) is not None:
            skip.add(id(emb.weight))
    low, rest = [], []
    for g in groups:
        for p in g["params"]:
            (low if p.ndim == 2 and id(p) not in skip and min(p.shape) > cfg.galore_rank else rest).append((p, g))
    projected = {"params": [p for p, _ in low], "weight_decay": cfg.weight_decay, "rank": cfg.galore_rank,
                 "update_proj_gap": cfg.galore_update_interval, "scale": cfg.galore_scale, "proj_type": "std"}
    plain_decay = {"params": [p for p, g in rest if g["weight_decay"]], "weight_decay": cfg.weight_decay}
    plain = {"params": [p for p, g in rest if not g["weight_decay"]], "weight_decay": 0.0}

    class GaLore(GaLoreAdamW):
        def state_dict(self):
            sd = super().state_dict()
            state = {}
            for k, s in sd["state"].items():
                s = dict(s)  # the optimizer's own dict: never modify it
                proj = s.pop("projector", None)
                if proj is not None:
                    s["projector_matrix"] = proj.ortho_matrix
                state[k] = s
            return {**sd, "state": state}

        def load_state_dict(self, sd):
            mats = {k: s["projector_matrix"] for k, s in sd["state"].items() if "projector_matrix" in s}
            state = {k: {n: v for n, v in s.items() if n != "projector_matrix"} for k, s in sd["state"].items()}
            super().load_state_dict({**sd, "state": state})
            index = 0
            for group in self.param_groups:
                for p in group["params"]:
                    if index in mats:
                        proj = GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                               scale=group["scale"], proj_type=group["proj_type"])
                        proj.ortho_matrix = mats[index].to(p.device)
                        self.state[p]["projector"] = proj
                    index += 1

    return GaLore([g for g in (projected, plain_decay, plain) if g["params"]], no_deprecation_warning=True, **kwargs)


def optimizer_summary(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> str:
    """One line for the start-up log: the optimizer and what it projects or quantises."""
    bits = {"adamw_8bit": "8-bit states", "paged_adamw_8bit": "8-bit paged states", "adamw_torch_8bit": "8-bit states",
            "adamw_torch_4bit": "4-bit states"}.get(cfg.optim, "fp32 states")
    if cfg.optim == "galore_adamw":
        low = sum(len(g["params"]) for g in optimizer.param_groups if "rank" in g)
        bits = f"rank-{cfg.galore_rank} projection of {low} matrices, every {cfg.galore_update_interval} steps"
    return f"optimizer: {cfg.optim} ({bits}{', bf16 weights, stochastic rounding' if cfg.bf16_weights else ''})"
