"""Training: ``train(cfg) -> RunResult``, the loop the CLI and ``orpo.train`` run.

- ``loop.py``: the loop, top to bottom (set-up, before, each step, after the step, finish);
- ``setup.py``: the output folder, data, model, fast paths, optimizer, resume;
- ``engine.py``: Accelerate, and what differs between one process, DDP, FSDP and DeepSpeed;
- ``plan.py``: which pairs each step uses, and the learning-rate schedule;
- ``outputs.py``: held-out answers, the final model, summary, model card, report.
"""

from .loop import RunResult, train
from .plan import StepPlan, lr_factor
from .setup import RUN_FILES

__all__ = ["RUN_FILES", "RunResult", "StepPlan", "lr_factor", "train"]
