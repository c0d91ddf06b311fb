"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` holding

    trainable.safetensors   the trainable parameters (all weights, or only the LoRA adapters)
    optimizer.pt            AdamW state           scheduler.pt   LR schedule position
    rng-<rank>.pt           every RNG state of each process
    state.json              step, bad-step streak, elapsed time, the config and its fingerprint
    manifest.json           size and CRC-32 of every other file (see ``integrity``), checked on resume

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

from . import diskio, integrity
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


def _any_failed(failed: bool) -> bool:
    """Whether any process failed (a collective, so it is also a barrier)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return failed
    cuda = torch.distributed.get_backend() == "nccl"
    flag = torch.tensor([1.0 if failed else 0.0], device="cuda" if cuda else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _cause_elsewhere(error) -> str:
    """What went wrong on the process(es) that failed, for the one line the main process prints."""
    causes = [None]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        causes = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(causes, error.cause if error else None)
    rank, cause = next(((r, c) for r, c in enumerate(causes) if c), (None, None))
    return f"{cause}, on process {rank}" if cause else "another process could not write its part"


def _write_atomically(ckpt_dir: Path, step: int, keep: int, is_main: bool, barrier, write, need: int = 0) -> Path:
    """Run ``write(tmp)`` on every process into a hidden temporary folder, then (main process) record
    the manifest, fsync, rename it to ``step-NNNNNN`` and prune to the newest ``keep``.

    Each phase ends with every process agreeing whether any of them failed, so a full disk on one
    process stops all of them at the same point instead of leaving the others in a barrier. A failure
    (or fewer than ``need`` bytes free, checked first) removes the temporary folder, leaves the
    previous checkpoints as they were and raises :class:`diskio.WriteFailed`."""
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-step-{step:06d}"
    what = "the checkpoint"

    def prepare():
        diskio.check_free(final, need, what)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)

    def publish():
        integrity.write_manifest(tmp)
        _fsync_tree(tmp)
        if final.exists():  # a stale copy of the same step (from a run resumed before it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_tree(ckpt_dir)

    for phase, on_main_only in ((prepare, True), (lambda: write(tmp), False), (publish, True)):
        error = None
        if is_main or not on_main_only:
            try:
                with diskio.writing(final, what):
                    phase()
            except diskio.WriteFailed as e:
                error = e
        if _any_failed(error is not None):
            elsewhere = _cause_elsewhere(error)  # a collective: every process takes part
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise error or diskio.WriteFailed(final, elsewhere, what)
    if is_main:
        for _, old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def checkpoint_bytes(ckpt_dir: Path, model: torch.nn.Module | None = None) -> int:
    """About how many bytes the next checkpoint takes: the newest one's size, else (cheap to know) the
    trainable weights plus AdamW's two moments of the same size."""
    found = list_checkpoints(ckpt_dir)
    if found:
        return sum(p.stat().st_size for p in found[-1][1].rglob("*") if p.is_file())
    if model is None:
        return 0
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return 3 * n


def model_bytes(model: torch.nn.Module, state_dict: dict | None = None) -> int:
    """About how many bytes the final model folder takes: every weight once, at the dtype it is saved
    in (LoRA merged: the base weights; adapters are small). 0 (unknown) for a 4-bit model, merged
    into a fresh full-precision copy."""
    if state_dict is not None:
        return sum(v.numel() * v.element_size() for v in state_dict.values() if torch.is_tensor(v))
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if p.dtype == torch.uint8:  # bitsandbytes 4-bit
            return 0
        if id(p) not in seen and "lora_" not in name:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


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
        diskio.save_torch(rng_state(), tmp / f"rng-{rank}.pt")
        if is_main:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            diskio.save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
            diskio.save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1))

    need = checkpoint_bytes(ckpt_dir, model) if is_main else 0
    return _write_atomically(ckpt_dir, step, keep, is_main, _barrier, write, need)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, rank: int) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the saved ``state.json``.
    (``integrity.verify`` has checked the files; one it could not judge and that fails to load still
    gives one line.)"""
    try:
        return _load_checkpoint(path, model, optimizer, scheduler, rank)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, torch.load and pickle each raise their own
        raise UserError(f"{path}: could not read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
                        "; remove it to resume from the one before") from None


def _load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, rank: int) -> dict:
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
            diskio.save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(dict(state, sharded=True), indent=1))

    need = checkpoint_bytes(ckpt_dir) if is_main else 0  # the previous one's size; unknown before the first
    return _write_atomically(ckpt_dir, step, keep, is_main, accelerator.wait_for_everyone, write, need)


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
