"""``orpo eval`` on a run: the options that decide an evaluation's numbers, as the run's own
``config.yaml`` has them, so that evaluating a run's model gives the run's own evaluation rows.

A run folder is recognised by its ``config.yaml`` beside its ``metrics.jsonl``; its ``model/`` and
``adapter/`` folders lead back to it. A LoRA run's folder is evaluated through its adapter (unmerged, as
the run evaluated it; its merged ``model/`` agrees to the last bits of bf16). Options given on the command line (or as keywords) win. Without
``--data``, the run's held-out data is used: its ``eval_data`` (with its row limit and column map), or,
for a run on the built-in dataset, the built-in held-out set of the run's seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from .files import coerce

# What decides which tokens are scored, how they are run, and how the loss is formed; and the evaluation
# batch, which under bf16 autocast changes the last bits. (trust_remote_code is never taken from a file.)
FROM_RUN = ("beta", "max_length", "max_prompt_length", "max_completion_length", "truncation_mode", "prompt_in_nll",
            "chat_template", "precision", "model_dtype", "attn_implementation", "batch_size", "eval_batch_size")
# Which held-out rows: taken with the data itself, when the data is the run's own.
DATA_FROM_RUN = ("eval_max_rows", "columns")


def run_folder(model: Any) -> Path | None:
    """The run folder that ``model`` (a run folder, or its model/ or adapter/ folder) belongs to."""
    if model is None:
        return None
    p = Path(str(model)).expanduser()
    for d in (p, p.parent if p.name in ("model", "adapter") else None):
        if d is not None and (d / "config.yaml").is_file() and (d / "metrics.jsonl").is_file():
            return d
    return None


def eval_options(model: Any, given: dict) -> tuple[dict, str | None]:
    """Options for evaluating ``model``: those of its run that ``given`` (the user's, typed) leaves unset,
    then ``given``. Returns (options, a line saying what came from the run, or None)."""
    run = run_folder(model)
    if run is None:
        if given.get("eval_data") is None:
            raise UserError("orpo eval: --data is needed (held-out pairs), unless --model is an orpo run folder")
        return dict(given), None
    where = run / "config.yaml"
    try:
        saved = yaml.safe_load(where.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read the run's config ({e})") from None
    if not isinstance(saved, dict):
        raise UserError(f"{where}: not an orpo run config (a mapping of option: value)")
    names = [k for k in FROM_RUN if k in saved and k not in given]
    data = given.get("eval_data")
    own_data = data is None or str(data) == str(saved.get("eval_data"))
    if data is None:
        data = saved.get("eval_data")
        if data is None and saved.get("data") is not None:
            raise UserError(f"{run}: the run had no held-out data; pass --data")
        if isinstance(data, str) and data.startswith("in-memory "):
            raise UserError(f"{run}: the run was evaluated on data held in memory ({data}); pass it with --data")
        if data is None:  # the built-in dataset's held-out set depends on the seed
            names.append("seed")
    if own_data:
        names += [k for k in DATA_FROM_RUN if k in saved and k not in given]
    out = {k: coerce(k, saved[k], str(where)) for k in names}
    out.update(given)
    out["eval_data"] = data
    if Path(str(model)).expanduser() == run and (run / "adapter" / "adapter_config.json").is_file():
        out["model"] = str(run / "adapter")  # a LoRA run: its adapter on the base, as the run evaluated it
    shown = ", ".join(f"{k} {out[k]}" for k in ("beta", "max_length") if k in names)
    which = ("the built-in held-out set" if data is None else "its held-out data") if given.get("eval_data") is None else None
    parts = [p for p in (f"the run's {shown}" if shown else None, which) if p]
    note = (f"{where}: evaluating with {' and '.join(parts)} (options given override)") if parts else None
    return out, note
