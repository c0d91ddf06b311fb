"""What differs between the engines a run can be on (one process, DDP, FSDP, DeepSpeed), behind one
small interface, so the loop reads the same for all of them.

- **Gradients.** Our loss is already the step's global mean (every process knows the whole step's token
  and pair totals), but DDP/FSDP/DeepSpeed average gradients over processes and DeepSpeed also divides
  by the accumulation steps: :meth:`Engine.backward` undoes both.
- **Accumulation.** This loop accumulates micro-batches itself (no gradient sync before the last one);
  DeepSpeed insists on doing it inside ``backward``, so it is told where the boundary is.
- **Weights.** FSDP and DeepSpeed hold a shard of the weights on every process: checkpoints are saved
  sharded, and the final model is gathered first.
- **Non-finite steps.** The loop skips an update whose loss or gradient is NaN/Inf, after ``clip``.
  DeepSpeed has taken its step by then (inside the last ``backward``), and under ZeRO-3, or in fp32 or
  bf16 without its overflow check, it applies a NaN gradient. So under DeepSpeed every process agrees,
  before each backward, whether the micro-batch's loss is finite: a step whose first micro-batch is not
  never reaches DeepSpeed (skipped, as on the other engines); one that turns non-finite after some
  micro-batches were accumulated, or whose gradient only is non-finite, stops the run in one line before
  anything from it is saved (the last checkpoint holds the weights before it), unless DeepSpeed reports
  that it skipped that step itself.
"""

from __future__ import annotations

import os
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import TrainConfig
from ..errors import UserError
from ..forward import PolicyForward
from ..model import base_causal_lm


class Engine:
    """Accelerate's ``Accelerator`` and the engine's quirks. ``is_main`` / ``rank`` / ``world`` /
    ``device`` as Accelerate has them; ``say`` prints on the main process only."""

    def __init__(self, cfg: TrainConfig, trackers: list[str]):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import DistributedType

        # Accelerate keeps its settings in process-wide singletons; a second run in the same process (a
        # notebook, the tests) with another precision must start from a clean slate. The process group
        # (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        # Several processes without CUDA (torchrun / accelerate launch on CPUs): Accelerate needs cpu=True
        # to set up gloo instead of trying a GPU backend.
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        self.cfg, self.trackers = cfg, trackers
        self.accelerator = acc = Accelerator(
            mixed_precision="bf16" if cfg.precision == "bf16" else "no", cpu=multi_cpu,
            log_with=trackers or None, project_dir=cfg.output_dir if trackers else None,
            gradient_accumulation_steps=cfg.grad_accum if deepspeed else 1)
        self.is_main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        self.device = acc.device
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        self.sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.autocast = acc.autocast
        self.optimizer = None  # the prepared one (DeepSpeed's says whether it skipped a step itself)
        self.ds_backwards = 0  # micro-batches of this step handed to DeepSpeed
        self.ds_skip = False  # this step's loss was non-finite on some process: DeepSpeed never sees it
        if multi_cpu and not self.sharded and any(os.environ.get(v, "false").lower() == "true"
                             for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")):
            self.say("note: FSDP and DeepSpeed need GPUs; on CPUs this runs as plain data parallel (gloo), same maths")

    def say(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def prepare(self, policy: PolicyForward, optimizer):
        if self.deepspeed:
            configure_deepspeed(self.accelerator, policy, self.cfg)
        policy, self.optimizer = self.accelerator.prepare(policy, optimizer)
        return policy, self.optimizer

    def unwrap(self, policy) -> PolicyForward:
        return self.accelerator.unwrap_model(policy)

    # --- one step ---------------------------------------------------------------------------------

    def accumulating(self, policy, last: bool):
        """No gradient all-reduce before the step's last micro-batch (DeepSpeed decides that itself)."""
        if self.world > 1 and not last and not self.deepspeed:
            return self.accelerator.no_sync(policy)
        return nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        scale = self.world * (self.cfg.grad_accum if self.deepspeed else 1)
        if self.deepspeed:
            self.deepspeed_backward(loss * scale, last)
            return
        self.accelerator.backward(loss * scale)

    def deepspeed_backward(self, loss: torch.Tensor, last: bool) -> None:
        """DeepSpeed's backward, whose last micro-batch of a step also takes the optimizer step. A
        non-finite loss on any process (one host sync per micro-batch, DeepSpeed only) keeps the whole step
        from DeepSpeed, on every process alike, or stops the run if part of it is already accumulated."""
        bad = self.anyone(not bool(torch.isfinite(loss.detach()).all()))
        if bad and self.ds_backwards:
            self.stop_deepspeed(f"the loss of micro-batch {self.ds_backwards + 1} of a step is NaN/Inf, and DeepSpeed "
                                f"already holds the gradients of the {self.ds_backwards} before it")
        self.ds_skip = self.ds_skip or bad
        if not self.ds_skip:
            self.accelerator.gradient_state._set_sync_gradients(last)
            self.accelerator.backward(loss)
            self.ds_backwards += 1
        if last:
            self.ds_backwards = 0

    def clip(self, policy) -> tuple[torch.Tensor, bool]:
        """The gradient norm before clipping (a 0-d float64 tensor on the device, not yet synchronised),
        and whether it is known. Under DeepSpeed, which clips and steps inside backward, it is the norm of
        the step it took, NaN when the step was kept from it, and it may report none."""
        if self.deepspeed:
            return self.deepspeed_norm()
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = self.accelerator.clip_grad_norm_(policy.parameters(), limit)
        if norm is None:  # (no engine of ours returns none; a NaN would read as a skipped step)
            return torch.tensor(float("nan"), device=self.device, dtype=torch.float64), False
        return torch.as_tensor(norm, device=self.device, dtype=torch.float64), True

    def deepspeed_norm(self) -> tuple[torch.Tensor, bool]:
        skipped, self.ds_skip = self.ds_skip, False
        wrapped = self.accelerator.deepspeed_engine_wrapped
        norm = None if skipped else wrapped.get_global_grad_norm()  # (a float, or None when it computed none)
        if norm is not None and not math.isfinite(float(norm)) and not getattr(self.optimizer, "step_was_skipped", False):
            self.stop_deepspeed(f"the gradient norm is {float(norm)}")
        value = float("nan") if skipped or norm is None else float(norm)
        return torch.tensor(value, device=self.device, dtype=torch.float64), skipped or norm is not None

    def stop_deepspeed(self, what: str) -> None:
        """One line, on every process alike (the decision was reduced across them), before anything of
        this step is saved: the newest checkpoint holds the weights from before it."""
        if not self.is_main:
            raise SystemExit(2)  # the main process prints the line
        kept = ckpt.list_checkpoints(Path(self.cfg.output_dir) / "checkpoints")
        where = f"the newest checkpoint, {kept[-1][1]}, is from before it" if kept else "no checkpoint was saved yet"
        raise UserError(
            f"stopped: {what}. DeepSpeed takes the optimizer step inside backward, so orpo cannot skip this step "
            f"as it does on other engines; nothing from it was saved ({where}). Try a lower --lr, "
            "--precision fp32 or a smaller --max-length, then --resume")

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, "sum") if self.world > 1 else t

    def anyone(self, flag: bool) -> bool:
        """True on every process if it is true on any (a signal reaches one process only)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        return bool(self.accelerator.reduce(t, "max").item())

    # --- checkpoints and the final weights -------------------------------------------------------------

    def save(self, ckpt_dir, step: int, policy, optimizer, scheduler, state: dict) -> None:
        if self.sharded:
            ckpt.save_sharded_checkpoint(ckpt_dir, step, self.accelerator, scheduler, state, self.cfg.save_total_limit)
            return
        ckpt.save_checkpoint(ckpt_dir, step, self.unwrap(policy).model, optimizer, scheduler, state,
                             self.is_main, self.rank, self.cfg.save_total_limit)

    def load(self, path, policy, optimizer, scheduler) -> dict:
        if self.sharded:
            return ckpt.load_sharded_checkpoint(path, self.accelerator, scheduler)
        return ckpt.load_checkpoint(path, self.unwrap(policy).model, optimizer, scheduler, self.rank)

    def full_state(self, policy) -> dict | None:
        """The whole model's state dict gathered from the shards (a collective call), or None when every
        process holds the whole model anyway."""
        if not self.sharded:
            return None
        state = self.accelerator.get_state_dict(policy) or {}  # (ZeRO-3 consolidates on the main process only)
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        # A tied weight (the lm-head sharing the embeddings) comes back under both names as two tensors,
        # so save_pretrained cannot see the tie and would write it twice: keep the first name only.
        first: dict[int, str] = {}
        for name, p in self.unwrap(policy).model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name and first[id(p)] in state:
                state.pop(name, None)
        return state

    # --- logging and the end -----------------------------------------------------------------------

    def init_trackers(self) -> None:
        if self.trackers:
            config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.cfg.to_dict().items()}
            self.accelerator.init_trackers("orpo", config=config)

    def track(self, row: dict) -> None:
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                                 step=row["step"])

    def reduce_cpu(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t.to(self.device), "sum").cpu()

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def main_first(self):
        return self.accelerator.main_process_first()

    def end(self) -> None:
        self.accelerator.end_training()


def configure_deepspeed(accelerator, policy: PolicyForward, cfg: TrainConfig) -> None:
    """Settings DeepSpeed needs before ``prepare``: Accelerate reads the micro-batch size from a
    dataloader, and this loop has none (it batches pairs itself); clipping is DeepSpeed's to do, with our
    --max-grad-norm. Under ZeRO-3 the lm-head weight is partitioned outside the head's own forward,
    and our chunked log-prob reads it directly, so DeepSpeed must gather it for the whole forward."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_clipping"] = cfg.max_grad_norm
    if int(ds.get("zero_optimization", {}).get("stage", 0)) == 3 and policy.plain_head:
        import deepspeed

        head = base_causal_lm(policy.model).get_output_embeddings()
        for p in (head.weight, head.bias):
            if p is not None:
                deepspeed.zero.register_external_parameter(policy, p)
