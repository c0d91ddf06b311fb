"""`orpo train` for `accelerate launch` / torchrun on CPUs under the sharded engines, used by
tests/test_sharded.py. Accelerate (1.16) never runs them on CPUs: a multi-CPU run is always its plain
data parallel (MULTI_CPU), and `cpu=True` (which orpo passes there to get gloo) also turns DeepSpeed off.
These hooks put the engine back, so the rest of the run is the code a GPU run takes:

- ``ORPO_TEST_ENGINE=fsdp``: the multi-CPU state becomes FSDP with the plugin Accelerate read from the
  launch config (configs/accelerate/fsdp.yaml), so ``prepare`` shards the model with FSDP2's
  ``fully_shard`` over gloo (torch supports CPU meshes).
- ``ORPO_TEST_ENGINE=deepspeed``: Accelerate is asked for a gloo process group without ``cpu=True``, so
  it starts DeepSpeed, which runs on its CPU accelerator.

Test hooks besides: ``REPORT_DIR`` receives rank<N>.json (the engine Accelerate ended up with, and how
much of the weights each process holds); ``NAN_LOSS`` / ``NAN_GRAD`` = ``STEP:RANK`` (or
``STEP:RANK:MICRO``) make that process's log-probs (hence its loss), or only their gradient, NaN in the
training forwards of that optimizer step (or only its MICRO-th micro-batch; all 1-based).
"""

import importlib
import json
import os
import sys
from pathlib import Path

import torch

import orpo.forward as fwd
from orpo.cli import main

eng = importlib.import_module("orpo.train.engine")  # (orpo.train is also the name of a function)
loop = importlib.import_module("orpo.train.loop")

ENGINE = os.environ.get("ORPO_TEST_ENGINE", "")
RANK = int(os.environ.get("RANK", "0"))
current = {"step": 0, "micro": 0}


def force_fsdp():
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    real_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        real_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP  # what Accelerate sets on GPUs (state.py)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def force_deepspeed():
    import accelerate
    from accelerate.utils import InitProcessGroupKwargs

    real = accelerate.Accelerator

    class Accelerator(real):
        def __init__(self, *args, cpu=False, kwargs_handlers=None, **kwargs):
            handlers = [*(kwargs_handlers or []), InitProcessGroupKwargs(backend="gloo")]
            super().__init__(*args, cpu=False, kwargs_handlers=handlers, **kwargs)

    accelerate.Accelerator = Accelerator


def report_prepare():
    real = eng.Engine.prepare

    def prepare(self, policy, optimizer):
        wrapped, opt = real(self, policy, optimizer)
        from torch.distributed.tensor import DTensor

        params = list(wrapped.parameters())
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
        info = {"distributed_type": str(self.accelerator.distributed_type).split(".")[-1],
                "dtensor": any(isinstance(p, DTensor) for p in params),
                "local_numel": local, "numel": sum(p.numel() for p in params)}
        (Path(os.environ["REPORT_DIR"]) / f"rank{RANK}.json").write_text(json.dumps(info))
        return wrapped, opt

    eng.Engine.prepare = prepare


def inject_nan():
    real_step, real_forward = loop.train_step, fwd.PolicyForward.forward
    at = {k: tuple(int(x) for x in os.environ[k].split(":")) for k in ("NAN_LOSS", "NAN_GRAD") if os.environ.get(k)}

    def train_step(run, step):
        current["step"], current["micro"] = step + 1, 0
        return real_step(run, step)

    def hit(key):
        spec = at.get(key)
        return spec is not None and spec[:2] == (current["step"], RANK) and spec[2:] in ((), (current["micro"],))

    def forward(self, batch):
        logps = real_forward(self, batch)
        if torch.is_grad_enabled() and current["step"]:
            current["micro"] += 1
            if hit("NAN_LOSS"):
                logps = logps * float("nan")
            if hit("NAN_GRAD") and logps.requires_grad:
                logps.register_hook(lambda g: g * float("nan"))
        return logps

    loop.train_step, fwd.PolicyForward.forward = train_step, forward


if ENGINE == "fsdp":
    force_fsdp()
elif ENGINE == "deepspeed":
    force_deepspeed()
if os.environ.get("REPORT_DIR"):
    report_prepare()
inject_nan()
sys.exit(main(sys.argv[1:]))
