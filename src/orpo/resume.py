"""The parts of ``train`` that keep a run whole across interruptions, in one place.

- which checkpoint to resume from: the newest that passes ``integrity.verify``; damaged newer ones are
  named in one line and set aside as ``damaged-step-N`` (so pruning never counts them as kept);
- whether a resumed run has anything left to do: a finished run with its model and summary written is
  left exactly as it is;
- what step 0 made that a resumed run must carry on: the "before" answers (``OUT/before.json``) and the
  last logged training row (the summary's ``final``);
- the command that resumes, and the one line a failed write ends the run with.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shlex
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import diskio, integrity
from .errors import UserError

BEFORE = "before.json"


# ------------------------------------------------------------------------------------------------
# Which checkpoint.


def _broadcast(obj, is_main: bool):
    """The main process's ``obj`` on every process (each would otherwise re-read every file)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj if is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def pick_checkpoint(ckpt_dir: Path, is_main: bool) -> tuple[Path | None, list[tuple[str, list[str]]]]:
    """The newest intact checkpoint (None if there is none at all) and the damaged ones newer than it,
    each with what is wrong. With checkpoints but none intact, one line naming the damaged files."""
    found = ckpt.list_checkpoints(ckpt_dir)
    if not found:
        return None, []
    choice = None
    if is_main:
        chosen, damaged = None, []
        for _, path in reversed(found):
            problems = integrity.verify(path)
            if not problems:
                chosen = str(path)
                break
            damaged.append((str(path), problems))
        choice = (chosen, damaged)
    chosen, damaged = _broadcast(choice, is_main)
    if chosen is None:
        listing = "; ".join(f"{Path(p).name}: {', '.join(why)}" for p, why in damaged)
        raise UserError(f"{ckpt_dir}: every checkpoint is damaged ({listing}); nothing to resume from. Restore "
                        "them from a copy, or start again with --overwrite")
    return Path(chosen), damaged


def damaged_line(chosen: Path, damaged: list[tuple[str, list[str]]]) -> str:
    rest = f"resuming from {chosen.name}, the newest intact one (the damaged are set aside as damaged-step-*)"
    if len(damaged) == 1:
        p, why = damaged[0]
        return f"{p} is damaged ({', '.join(why)}); {rest}"
    listing = ", ".join(f"{Path(p).name} ({', '.join(why)})" for p, why in damaged)
    return f"{chosen.parent}: {listing} are damaged; {rest}"


def set_aside(damaged: list[tuple[str, list[str]]]) -> None:
    for p, _ in damaged:
        if Path(p).exists():
            integrity.set_aside(Path(p))


# ------------------------------------------------------------------------------------------------
# The data a checkpoint was trained on.


def memory_data_changes(saved_cfg: dict, cfg_now: dict) -> list[str]:
    """Fields whose only difference from the saved config is the content hash of rows held in memory:
    the same kind of source with other rows, which :func:`check_data` words (not a changed option)."""
    def kind(v):
        return v.split(" (")[0] if isinstance(v, str) and v.startswith("in-memory ") else None

    return [k for k in ("data", "eval_data") if k in saved_cfg and saved_cfg[k] != cfg_now.get(k)
            and kind(saved_cfg[k]) is not None and kind(saved_cfg[k]) == kind(cfg_now.get(k))]


def _short(content: str) -> str:
    kind, _, rest = content.partition(":")
    if kind == "memory":  # 'in-memory list (N rows, <hash>)': the hash
        return rest.rsplit(", ", 1)[-1].rstrip(")")
    return rest if kind == "hub" else rest[:16]


def check_data(saved: dict | None, now: dict, names: dict, step: int, allow: bool, say) -> None:
    """Refuse a resume whose data (train or eval) is not the content the checkpoint trained on. ``saved``
    and ``now`` map 'train'/'eval' to content ids ('sha256:...', 'memory:...', 'hub:name@revision'); a
    checkpoint made before orpo recorded them (``saved`` None) is not checked."""
    if not saved:
        return
    changed = [k for k in ("train", "eval") if saved.get(k) and now.get(k) and saved[k] != now[k]]
    for k in changed:
        what = (f"{names[k]}: the {'training' if k == 'train' else 'evaluation'} data changed since step {step} "
                f"(content {_short(saved[k])} then, {_short(now[k])} now)")
        if not allow:
            raise UserError(f"{what}; resume with the data the run started with, or pass --allow-data-change to "
                            "train the remaining steps on the new rows (docs/robustness.md), or start a new --output-dir")
        say(f"{what}; going on with the new rows, as --allow-data-change asks: the remaining steps draw from them")


# ------------------------------------------------------------------------------------------------
# Finished runs, and what step 0 left behind.


def finished_summary(out: Path, step: int, total_steps: int) -> dict | None:
    """The summary of a run that reached ``total_steps`` with its model and summary written; None if
    anything is left to do (more steps, or an end cut short, e.g. by a full disk)."""
    if step < total_steps:
        return None
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if summary.get("steps") != step or not (out / "model").is_dir():
        return None
    return summary


def _key(prompts: list) -> str:
    plain = lambda o: o.tolist() if hasattr(o, "tolist") else str(o)  # noqa: E731 - token-id arrays in full
    return hashlib.sha256(json.dumps(prompts, default=plain, sort_keys=True).encode()).hexdigest()[:16]


def save_before(out: Path, prompts: list, answers: list[str]) -> None:
    """Keep the step-0 answers with the run, so a resumed or extended run can still show them."""
    diskio.write_text(out / BEFORE, json.dumps({"prompts": _key(prompts), "answers": answers}), BEFORE)


def load_before(out: Path, prompts: list) -> list[str]:
    """The step-0 answers to exactly these prompts, or [] (a run from before this file existed)."""
    try:
        saved = json.loads((out / BEFORE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if saved.get("prompts") != _key(prompts) or len(saved.get("answers", [])) != len(prompts):
        return []
    return saved["answers"]


def _rows(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def last_train_row(metrics_path: Path) -> dict:
    """The last training row logged (what the summary calls ``final``)."""
    return next((r for r in reversed(_rows(metrics_path)) if "loss" in r), {})


def drop_final_eval(metrics_path: Path, step: int) -> None:
    """The end of a run evaluates after its last checkpoint; redoing that end must not log it twice."""
    rows = _rows(metrics_path)
    keep = [r for r in rows if not (r.get("step") == step and "eval_loss" in r)]
    if len(keep) != len(rows):
        diskio.write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in keep), metrics_path.name)


# ------------------------------------------------------------------------------------------------
# Resuming after a failure.


def resume_command(out: Path, overwrite: bool, argv: list[str] | None) -> str:
    """The command that continues this run: ``argv`` is the command it was started with, whole and
    shell-quoted, ending in --resume (the CLI's), or a call (the API's); without it, OUT/config.yaml's.
    A YAML file that says ``overwrite: true`` would contradict --resume, so --no-overwrite goes in."""
    parts = list(argv) if argv else ["orpo", "train", shlex.quote(str(Path(out) / "config.yaml")), "--resume"]
    if overwrite and parts[-1] == "--resume" and "--no-overwrite" not in parts:
        parts.insert(-1, "--no-overwrite")
    return " ".join(parts)


def write_failure(exc: BaseException, out: Path, overwrite: bool, argv: list[str] | None, is_main: bool):
    """The exception to end the run with for a failed write (``None``: not a write failure, re-raise).
    Half-written temporaries are removed; complete checkpoints and metrics rows are never touched."""
    if isinstance(exc, OSError):  # a write outside the guarded ones: only a fault of OUT's disk is ours to word
        inside = exc.filename is not None and Path(exc.filename).absolute().is_relative_to(Path(out).absolute())
        if exc.errno not in diskio.WRITE_FAULTS or not (inside or exc.errno in (errno.ENOSPC, errno.EDQUOT)):
            return None
        exc = diskio.WriteFailed(exc.filename or out, diskio.cause_of(exc, out))
    if not is_main:
        return SystemExit(2)  # the main process prints the line
    diskio.remove_temporaries(out)
    found = ckpt.list_checkpoints(out / "checkpoints")
    kept = (f"the previous checkpoints are intact (newest: {found[-1][1].name})" if found
            else "no checkpoint was complete yet")
    if (out / "metrics.jsonl").exists():
        kept += " and metrics.jsonl keeps every row logged so far"
    return UserError(f"{exc.path}: could not write {exc.what} ({exc.cause}); {kept}. Free some space, then resume "
                     f"with: {resume_command(out, overwrite, argv)}")
