"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` holding

    trainable.safetensors   the trainable parameters (all weights, or only the LoRA adapters)
    optimizer.pt            AdamW state           scheduler.pt   LR schedule position
    rng-<rank>.pt           every RNG state of each process
    state.json              step, bad-step streak, elapsed time, the config and its fingerprint

It is written into a hidden temporary folder, every file is fsynced, and only then is the folder
renamed into place, so a crash or ``kill -9`` during a save leaves either the complete new checkpoint
or none, and the previous ones untouched. The data order needs no saving: it is a pure function of the
seed and the step (see ``train.StepPlan``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, detached and contiguous (tied weights stored once)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().contiguous().cpu()
    return out


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = json.loads(state["numpy"])
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temporary folders of an interrupted save are ignored."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _write_atomically(ckpt_dir: Path, step: int, keep: int, is_main: bool, barrier, write) -> Path:
    """Run ``write(tmp)`` on every process into a hidden temporary folder, then (main process) fsync it,
    rename it to ``step-NNNNNN`` and prune to the newest ``keep``. A failed write removes the temporary
    folder and leaves the previous checkpoints as they were."""
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-step-{step:06d}"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    try:
        write(tmp)
        barrier()
        if is_main:
            _fsync_tree(tmp)
            if final.exists():  # a stale copy of the same step (from a run resumed before it)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_tree(ckpt_dir)
    except OSError as e:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"{final}: could not write the checkpoint ({e.strerror or e}); the previous checkpoints are intact"
        ) from None
    if is_main:
        for _, old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    state: dict,
    is_main: bool,
    rank: int,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep``. Single-process and DDP
    runs: rank 0 writes weights and optimizer state (identical on every rank), each rank its RNG."""

    def write(tmp: Path) -> None:
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        if is_main:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1))

    return _write_atomically(ckpt_dir, step, keep, is_main, _barrier, write)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, rank: int) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the saved ``state.json``."""
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise UserError(f"{path}: checkpoint does not match the model (unknown parameter {missing[0]})")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-{rank}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng-0.pt"
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------------
# Sharded engines (FSDP, DeepSpeed): each process holds a shard, so Accelerate's own state functions
# write and read the model and optimizer; we add the schedule and our state.json, with the same
# write-to-temporary-then-rename discipline.


def save_sharded_checkpoint(ckpt_dir: Path, step: int, accelerator, scheduler, state: dict, keep: int) -> Path:
    is_main = accelerator.is_main_process

    def write(tmp: Path) -> None:
        accelerator.save_state(str(tmp))
        if is_main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(dict(state, sharded=True), indent=1))

    return _write_atomically(ckpt_dir, step, keep, is_main, accelerator.wait_for_everyone, write)


def load_sharded_checkpoint(path: Path, accelerator, scheduler) -> dict:
    state = json.loads((path / "state.json").read_text())
    if not state.get("sharded"):
        raise UserError(f"{path}: this checkpoint was written without FSDP/DeepSpeed; resume it the same way")
    accelerator.load_state(str(path))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return state


def resume_point(ckpt_dir: Path, resume: bool, resume_from: str | None) -> tuple[int, Path] | None:
    """The checkpoint a run continues from: ``--resume-from PATH`` (a checkpoint folder, or a run folder,
    whose latest checkpoint is taken), else with ``--resume`` the latest one in ``ckpt_dir``, else none."""
    if resume_from:
        p = Path(resume_from).expanduser()
        if (p / "state.json").is_file():
            m = STEP_DIR.match(p.name)
            step = int(m.group(1)) if m else int(json.loads((p / "state.json").read_text()).get("step", 0))
            return step, p
        found = list_checkpoints(p / "checkpoints") or list_checkpoints(p)
        if found:
            return found[-1]
        raise UserError(f"--resume-from {p}: not a checkpoint folder (no state.json) nor a run folder with checkpoints")
    found = list_checkpoints(ckpt_dir)
    return found[-1] if resume and found else None


def carry_metrics(checkpoint: Path, metrics_path: Path) -> None:
    """--resume-from a checkpoint of another run folder: start this run's metrics.jsonl with that run's rows
    (the caller then drops those after the checkpoint's step), so the curves are whole."""
    source = checkpoint.parent.parent / "metrics.jsonl"
    if source.is_file() and source.resolve() != metrics_path.resolve():
        metrics_path.write_bytes(source.read_bytes())
