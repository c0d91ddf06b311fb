"""``orpo compare``: the ORPO paper's Figure 3 experiment at any scale.

Trains the same model twice with one config: SFT (beta = 0: the NLL of the chosen answers only) and
ORPO (beta > 0), with identical data, seed, steps and learning rate, both evaluated on the same
held-out pairs at the start, every ``eval_steps`` and at the end. Then it draws the held-out
log-probabilities of chosen and rejected answers of both runs on one figure (``OUT/figure3.png``),
with bootstrap 95% intervals and, for the built-in data, separately for the chatty and the wrong
rejected answers; and it gives the *paired* difference ORPO - SFT on the same held-out pairs (the
chosen - rejected gap, the rejected log-prob, the accuracy; content accuracy of the answers for the
built-in data), with its interval and whether it is distinguishable from zero. Numbers go to
``OUT/compare.json``. With no ``--data`` it runs the default job's recipe on the built-in data.

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
from ..stats import verdict
from .figure import compare_numbers, plot_compare
from .pairs import ALL, answer_numbers, paired_differences, trajectories

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
    result = compare_results(folders)
    result["figure"] = str(plot_compare(folders, out / "figure3.png", title=_title(base)))
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    return result


def compare_results(folders: dict[str, str]) -> dict:
    """Everything ``orpo compare`` reports, from the two run folders (SFT first, then ORPO)."""
    sft, orpo = list(folders.values())[:2]
    return {"runs": folders, "numbers": compare_numbers(folders),
            "kinds": {label: trajectories(f) for label, f in folders.items()},
            "paired_orpo_minus_sft": paired_differences(sft, orpo),
            "answers": {label: answer_numbers(f) for label, f in folders.items()}}


def _title(cfg: C.TrainConfig) -> str:
    model = Path(cfg.model).name if cfg.model else "SmolLM2-135M-Instruct"
    data = Path(cfg.data).name if cfg.data else "built-in data"
    how = f"LoRA r={cfg.lora_r}" if cfg.lora else "full fine-tuning"
    return f"{model}, {data}, {how}, lr {cfg.resolved_lr():g}, held-out pairs"


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def format_numbers(result: dict) -> str:
    """The plain-text summary: each run's held-out log-probs per kind of pair at its first and last
    evaluation (95% intervals), content accuracy, then the paired ORPO - SFT differences in words."""
    lines = [f"{'run':<20}{'pairs':<18}{'step':>5}  {'logp chosen':<24}{'logp rejected':<24}{'gap':>8}"]
    for label, kinds in result["kinds"].items():
        for kind, d in kinds.items():
            for i in (0, -1):
                lines.append(f"{label:<20}{kind:<18}{d['step'][i]:>5}  "
                             f"{d['logps/chosen'][i]:>7.3f} {_ci(d['logps/chosen_ci'][i]):<16}"
                             f"{d['logps/rejected'][i]:>7.3f} {_ci(d['logps/rejected_ci'][i]):<16}{d['gap'][i]:>8.3f}")
    if not result["kinds"] or not all(result["kinds"].values()):  # runs without per-pair values
        lines = [_format_means(result["numbers"])]
    for label, a in result["answers"].items():
        if a:
            lines.append(f"{label}: held-out answers right in content {a['content_before']:.0%} -> {a['content_after']:.0%}, "
                         f"exactly {a['exact_before']:.0%} -> {a['exact_after']:.0%} ({a['questions']} questions; "
                         f"{len(a['regressions'])} went from right to wrong)")
    paired = result["paired_orpo_minus_sft"]
    if paired:
        lines.append("\nORPO minus SFT on the same held-out pairs, at the last evaluation:")
        for kind, d in paired.items():
            if kind == "content accuracy":
                lines.append("  " + verdict("content accuracy of the greedy answers", d, over="questions"))
                continue
            lines.append("  " + verdict(f"{kind}: gap (log p chosen - rejected)", d["gap"]))
            lines.append("  " + verdict(f"{kind}: log p rejected", d["logps/rejected"]))
            if kind == ALL:
                lines.append("  " + verdict(f"{kind}: preference accuracy", d["accuracy"]))
    return "\n".join(lines)


def _format_means(numbers: dict) -> str:
    """The first and last held-out evaluation of each run, from the eval rows' means only."""
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
