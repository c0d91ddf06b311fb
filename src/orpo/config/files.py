"""Values from YAML and flags: type checks and conversion, impossible values, reading and writing YAML."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import UserError
from .schema import LOW_MEMORY, TrainConfig, column_map, is_in_memory
from .trl_names import suggestion, translate


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
    if name == "columns" and isinstance(value, dict):  # YAML may give the mapping as a mapping
        return ",".join(f"{k}={v}" for k, v in column_map(value).items())
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
    elif name in STEP_COUNTS:
        out = _step_count(name, value, where)
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


# Counts of steps that, as in transformers, may also be a fraction of the run's steps (a value below 1).
STEP_COUNTS = ("logging_steps", "save_steps", "eval_steps")


def _step_count(name: str, value: Any, where: str) -> int | float:
    """A whole number of steps (kept an int, so config.yaml reads as written) or a fraction in (0, 1)."""
    bad = UserError(f"{where}: '{name}' must be a whole number of steps, or a fraction of the run's steps below 1; "
                    f"got {value!r}")
    if isinstance(value, bool):
        raise bad
    try:
        out = float(str(value).replace("_", "")) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise bad from None
    if not math.isfinite(out) or (out >= 1 and not out.is_integer()):
        raise bad
    return int(out) if out >= 1 or out == 0 else out


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject values that are the right type but impossible, before any heavy work starts."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(f"config: {msg}")

    for name in ("data", "eval_data", "model", "resume_from", "chat_template"):
        if isinstance(getattr(cfg, name), os.PathLike):
            setattr(cfg, name, str(getattr(cfg, name)))
    for name in ("data", "eval_data"):
        v = getattr(cfg, name)
        need(not is_in_memory(v) or hasattr(v, "__iter__"),
             f"{name} must be a path, a datasets.Dataset, a pandas DataFrame or a list of dicts; got {type(v).__name__}")
    if isinstance(cfg.columns, dict):
        cfg.columns = ",".join(f"{k}={v}" for k, v in column_map(cfg.columns).items())
    column_map(cfg.columns)
    if cfg.max_completion_length is not None:
        need(cfg.max_completion_length >= 1, f"max_completion_length must be >= 1; got {cfg.max_completion_length}")
    if cfg.dataset_num_proc is not None:
        need(cfg.dataset_num_proc >= 1, f"dataset_num_proc must be >= 1; got {cfg.dataset_num_proc}")
    need(cfg.beta >= 0, f"beta must be >= 0 (0 is plain SFT on the chosen answers); got {cfg.beta}")
    need(cfg.max_length >= 8, f"max_length must be at least 8 tokens; got {cfg.max_length}")
    if cfg.max_prompt_length is not None:
        need(
            1 <= cfg.max_prompt_length < cfg.max_length,
            f"max_prompt_length must be between 1 and max_length - 1 ({cfg.max_length - 1}); got {cfg.max_prompt_length}",
        )
    if cfg.activation_memory is not None:
        need(cfg.activation_memory >= 0, f"activation_memory must be >= 0 GB (0: never recompute); got {cfg.activation_memory}")
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
    for name in STEP_COUNTS:  # TrainConfig(...) in Python checks no types: the same rule as the YAML
        setattr(cfg, name, _step_count(name, getattr(cfg, name), "config"))
    need(cfg.logging_steps > 0, f"logging_steps must be > 0; got {cfg.logging_steps}")
    need(cfg.save_steps >= 0, f"save_steps must be >= 0; got {cfg.save_steps}")
    need(cfg.save_total_limit >= 1, f"save_total_limit must be >= 1; got {cfg.save_total_limit}")
    need(cfg.eval_steps >= 0, f"eval_steps must be >= 0; got {cfg.eval_steps}")
    if cfg.eval_batch_size is not None:
        need(cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1; got {cfg.eval_batch_size}")
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
    values, notes = translate(raw, [f.name for f in fields()], str(p))
    for note in notes:
        print(f"orpo: {p}: {note}", file=sys.stderr)
    return {name: coerce(name, value, str(p)) for name, value in values.items()}


def build(overrides: dict | None = None, yaml_path: str | Path | None = None) -> TrainConfig:
    """Defaults <- YAML <- overrides, checked. ``overrides`` holds already-typed values."""
    values: dict = {}
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    values.update(overrides or {})
    if values.get("low_memory"):  # a recipe: it fills in only what the user did not set
        for k, v in LOW_MEMORY.items():
            values.setdefault(k, v)
    names = [f.name for f in fields()]
    bad = [k for k in values if k not in names]
    if bad:
        raise UserError("config: " + "; ".join(f"unknown option '{k}'{suggestion(k, names)}" for k in bad))
    return validate(TrainConfig(**values))


def dump_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config (the effective learning rate included) so the run can be repeated."""
    data = cfg.to_dict()
    data["lr"] = cfg.resolved_lr()
    # What this run did, not what the next command should do: `orpo train OUT/config.yaml --resume` must
    # work, and feeding the file back must never delete the run it describes.
    data.update(overwrite=False, resume=False, resume_from=None)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def with_changes(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """``dataclasses.replace`` that also reads TRL's names (one line each), checked."""
    names = [f.name for f in fields()]
    values, notes = translate(changes, names, "changes")
    for note in notes:
        print(f"orpo: {note}", file=sys.stderr)
    return validate(dataclasses.replace(cfg, **values))
