"""TRL's names for orpo's options, so that a TRL ``ORPOConfig`` (and the ``TrainingArguments`` it extends)
is read as it is written, from YAML or as Python keywords.

Each TRL key maps to an orpo option, sometimes with its value translated (``bf16: false`` is
``precision: fp32``; ``disable_dropout: true`` is ``keep_dropout: false``; ``max_steps: -1`` is no
limit). Reading one prints one line saying so. A TRL key whose orpo option does not exist (in this
version) is an error naming it, as is any key that is neither orpo's nor TRL's; every such key of a file
is reported at once, and a typo is matched against both sets of names.

This module imports nothing from orpo but the error type, so the config can use it without cycles.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from ..errors import UserError

Translate = Callable[[Any], dict]


def _to(name: str) -> Translate:
    return lambda v: {name: v}


def _truthy(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return v.strip().lower() in ("true", "yes", "1", "on")
    raise UserError(f"'{key}' must be true or false, got {v!r}")


def _comma(v: Any) -> Any:
    return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v


def _strategy(v: Any) -> Any:
    # YAML reads a bare `no` as false: transformers' "no" strategy
    return "no" if v is False else v


def _scheduler(v: Any) -> dict:
    # TRL/transformers' "constant_with_warmup" is orpo's "constant": orpo's warmup applies to every schedule.
    return {"scheduler": {"constant_with_warmup": "constant"}.get(v, v)}


def _model_init_kwargs(v: Any) -> dict:
    if not isinstance(v, dict):
        raise UserError(f"'model_init_kwargs' must be a mapping, got {v!r}")
    out = {}
    for k, x in v.items():
        if k not in MODEL_INIT_KEYS:
            raise UserError(f"model_init_kwargs: '{k}' has no counterpart in orpo "
                            f"(orpo reads {', '.join(sorted(MODEL_INIT_KEYS))})")
        out[MODEL_INIT_KEYS[k]] = x
    return out


MODEL_INIT_KEYS = {"dtype": "model_dtype", "torch_dtype": "model_dtype", "attn_implementation": "attn_implementation",
                   "trust_remote_code": "trust_remote_code"}

# TRL / transformers key -> translation into orpo options. Keys that are also orpo's own names
# (beta, max_length, warmup_ratio, logging_steps, seed, ...) need no entry; their TRL-style values do
# (see VALUE_FIXES). A target missing from TrainConfig makes the key "no counterpart" until it exists.
ALIASES: dict[str, Translate] = {
    "learning_rate": _to("lr"),
    "per_device_train_batch_size": _to("batch_size"),
    "gradient_accumulation_steps": _to("grad_accum"),
    "num_train_epochs": _to("epochs"),
    "lr_scheduler_type": _scheduler,
    "adam_epsilon": _to("adam_eps"),
    "bf16": lambda v: {"precision": "bf16" if _truthy("bf16", v) else "fp32"},
    "disable_dropout": lambda v: {"keep_dropout": not _truthy("disable_dropout", v)},
    "optim": _to("optim"),
    "model_name_or_path": _to("model"),
    "dataset_name": _to("data"),
    "torch_dtype": _to("model_dtype"),
    "dtype": _to("model_dtype"),
    "model_init_kwargs": _model_init_kwargs,
    "use_peft": _to("lora"),
    "lora_target_modules": lambda v: {"lora_target": _comma(v)},
    "torch_compile": _to("compile"),
    "use_liger_kernel": _to("liger"),
    "padding_free": _to("packing"),
    "data_seed": _to("shuffle_seed"),
    "overwrite_output_dir": _to("overwrite"),
    "resume_from_checkpoint": lambda v: ({"resume": _truthy("resume_from_checkpoint", v)}
                                         if isinstance(v, bool) or str(v).lower() in ("true", "false")
                                         else {"resume_from": v}),
    "evaluation_strategy": lambda v: {"eval_strategy": _strategy(v)},  # transformers' name before 4.46
    "per_device_eval_batch_size": _to("eval_batch_size"),
}

# TRL keys that change neither the trained model nor orpo's files: read, whatever their value, with a note
# saying what orpo does instead.
NOTED: dict[str, str] = {
    "log_level": "sets how much transformers prints; orpo prints its own lines",
    "logging_dir": "is TensorBoard's folder in transformers; orpo's TensorBoard logs go to output_dir/orpo",
    "logging_first_step": "logs step 1 in transformers; orpo logs the step-0 evaluation, then every logging_steps",
    "do_eval": "is read by TRL's scripts, not by its trainer; orpo evaluates whenever eval_data is given",
}

# TRL keys whose value, when it is one of these, is what orpo does anyway: read with a note, no option set.
SAME_AS_ORPO: dict[str, tuple] = {
    "logging_strategy": ("steps",),
    "do_train": (True,),
    "fp16": (False,),
    "push_to_hub": (False,),
    "remove_unused_columns": (True, False),
}

# TRL names orpo knows it has nothing for; named as such in the error rather than as a typo.
NO_COUNTERPART = frozenset({
    "fp16", "tf32", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo",
    "logging_strategy", "label_pad_token_id",
    "padding_value", "is_encoder_decoder", "generate_during_eval", "model_adapter_name", "ref_adapter_name",
    "gradient_checkpointing_kwargs", "ddp_find_unused_parameters", "dataloader_num_workers", "lr_scheduler_kwargs",
    "eval_accumulation_steps", "warmup_steps_ratio", "optim_args",
})


def _value_fix(key: str, value: Any) -> tuple[Any, str | None]:
    """TRL-style values of keys orpo shares by name: (orpo value, note or None)."""
    if key == "max_steps" and value == -1:
        return None, "reading TRL's max_steps: -1 as no step limit"
    if key in ("report_to", "lora_target") and isinstance(value, (list, tuple)):
        return _comma(value), None
    if key in ("save_strategy", "eval_strategy"):
        return _strategy(value), None
    if key == "report_to" and value in ("all",):
        raise UserError("report_to: 'all' is TRL's 'every installed tracker'; name the trackers you want")
    return value, None


def _targets(name: str) -> str:
    """The orpo option(s) a TRL key sets, for messages."""
    if name == "model_init_kwargs":
        return "model_dtype, attn_implementation, trust_remote_code"
    sample = {"bf16": True, "disable_dropout": True}.get(name, "x")
    return ", ".join(ALIASES[name](sample))


def suggestion(name: str, orpo_names: list[str]) -> str:
    """' (did you mean ...?)' over orpo's names and TRL's, naming the orpo option a TRL name stands for."""
    close = difflib.get_close_matches(name, list(orpo_names) + list(ALIASES), n=1, cutoff=0.5)
    if not close:
        return ""
    best = close[0]
    if best in ALIASES and best not in orpo_names:
        return f" (did you mean '{best}', TRL's name for '{_targets(best)}'?)"
    return f" (did you mean '{best}'?)"


def translate(raw: dict, orpo_names: list[str], where: str) -> tuple[dict, list[str]]:
    """orpo values from keys that may be orpo's or TRL's. Returns (values, notes to print); raises one
    UserError naming every key it cannot read."""
    values: dict = {}
    notes: list[str] = []
    problems: list[str] = []
    origin: dict[str, str] = {}

    def put(name: str, value: Any, key: str) -> None:
        if name in origin and origin[name] != key:
            problems.append(f"'{key}' and '{origin[name]}' both set '{name}'")
            return
        origin[name] = key
        values[name] = value

    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in orpo_names:
            value, note = _value_fix(name, value)
            if note:
                notes.append(note)
            put(name, value, name)
        elif name in NOTED:
            notes.append(f"TRL's {name} {NOTED[name]}")
        elif name in SAME_AS_ORPO and value in SAME_AS_ORPO[name]:
            notes.append(f"TRL's {name}: {value} is what orpo does; nothing to set")
        elif name in ALIASES:
            try:
                mapped = ALIASES[name](value)
            except UserError as e:
                problems.append(str(e))
                continue
            missing = [t for t in mapped if t not in orpo_names]
            if missing:
                problems.append(f"'{name}' (TRL's) has no counterpart in this version of orpo")
                continue
            for target, v in mapped.items():
                put(target, v, name)
            # the value is shown where the translation changed it (bf16: false -> precision = 'fp32')
            shown = ", ".join(t if v is value else f"{t} = {v!r}" for t, v in mapped.items())
            notes.append(f"reading TRL's {name} as {shown or 'nothing'}")
        elif name in NO_COUNTERPART:
            problems.append(f"'{name}' (TRL's) has no counterpart in orpo"
                            + (f" with the value {value!r}" if name in SAME_AS_ORPO else ""))
        else:
            problems.append(f"unknown option '{key}'{suggestion(name, orpo_names)}")
    if problems:
        raise UserError(f"{where}: " + "; ".join(problems))
    return values, notes
