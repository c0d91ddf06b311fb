"""``orpo compare``: the ORPO paper's Figure 3 experiment at any scale.

Trains the same model twice with one config: SFT (beta = 0: the NLL of the chosen answers only) and
ORPO (beta > 0), with identical data, seed, steps and learning rate, both evaluated on the same
held-out pairs at the start, every ``eval_steps`` and at the end. Then it draws the held-out
log-probabilities of chosen and rejected answers of both runs on one figure (``OUT/figure3.png``) and
writes the numbers to ``OUT/compare.json``.

    OUT/sft/    a complete orpo run (report.html included) with beta = 0
    OUT/orpo/   the same with beta = --orpo-beta
    OUT/figure3.png, OUT/compare.json

A run folder that already holds a finished run with the same trajectory-relevant options is reused, so
an interrupted comparison picks up where it stopped and the figure can be redrawn for free.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import config as C
from ..errors import UserError
from .figure import compare_numbers, plot_compare

DEFAULT_OUT = "runs/compare"
DEFAULT_EVAL_STEPS = 10


def _finished_with(cfg: C.TrainConfig) -> bool:
    """Whether ``cfg.output_dir`` holds a finished run made with the same options as ``cfg``."""
    out = Path(cfg.output_dir)
    if not (out / "summary.json").is_file() or not (out / "config.yaml").is_file():
        return False
    try:
        import yaml

        saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) or {}
    except Exception:
        return False
    want = cfg.to_dict()
    want["lr"] = cfg.resolved_lr()
    ignore = C.NOT_IN_FINGERPRINT - {"max_steps", "eval_steps"}
    return all(saved.get(k) == v for k, v in want.items() if k not in ignore)


def run_compare(base: C.TrainConfig, orpo_beta: float, output_dir: str | Path, say=print) -> dict:
    """Train SFT and ORPO from ``base`` (whose beta is ignored) and plot them. Returns the numbers."""
    from dataclasses import replace

    from ..train import train

    if base.eval_data is None and base.data is not None:
        raise UserError("orpo compare needs held-out pairs: pass --eval-data")
    if orpo_beta <= 0:
        raise UserError(f"--orpo-beta must be > 0 (the SFT run is the beta = 0 one); got {orpo_beta}")
    out = Path(output_dir)
    runs = {"SFT (beta = 0)": replace(base, beta=0.0, output_dir=str(out / "sft")),
            f"ORPO (beta = {orpo_beta:g})": replace(base, beta=orpo_beta, output_dir=str(out / "orpo"))}
    for label, cfg in runs.items():
        C.validate(cfg)
        if _finished_with(cfg) and not cfg.overwrite:
            say(f"{label}: reusing the finished run in {cfg.output_dir}")
            continue
        say(f"\n=== {label}: {cfg.output_dir} ===")
        train(cfg)
    folders = {label: cfg.output_dir for label, cfg in runs.items()}
    numbers = compare_numbers(folders)
    fig = plot_compare(folders, out / "figure3.png", title=_title(base))
    result = {"figure": str(fig), "runs": folders, "numbers": numbers}
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    return result


def _title(cfg: C.TrainConfig) -> str:
    model = Path(cfg.model).name if cfg.model else "SmolLM2-135M-Instruct"
    data = Path(cfg.data).name if cfg.data else "built-in data"
    how = f"LoRA r={cfg.lora_r}" if cfg.lora else "full fine-tuning"
    return f"{model}, {data}, {how}, lr {cfg.resolved_lr():g}, held-out pairs"


def format_numbers(numbers: dict) -> str:
    """A small plain-text table of the first and last held-out evaluation of each run."""
    lines = [f"{'run':<22}{'step':>10}{'logp chosen':>14}{'logp rejected':>15}{'gap':>9}{'accuracy':>10}"]
    for label, d in numbers.items():
        for when in ("first", "last"):
            c, r = d["logps/chosen"][when], d["logps/rejected"][when]
            acc = d["rewards/accuracies"][when]
            step = d[f"{when}_step"]
            lines.append(f"{label:<22}{step:>10}{c:>14.4f}{r:>15.4f}{c - r:>9.4f}{acc:>10.3f}")
        lines.append(f"{'':<22}{'change':>10}{d['logps/chosen']['change']:>+14.4f}{d['logps/rejected']['change']:>+15.4f}"
                     f"{d['logp_margin']['change']:>+9.4f}{d['rewards/accuracies']['change']:>+10.3f}")
    return "\n".join(lines)
