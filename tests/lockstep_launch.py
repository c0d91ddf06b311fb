"""`orpo train` for torchrun with two test hooks, used by tests/test_distributed.py:

- counts the policy forwards each process runs with gradients off (the evaluation forwards) into
  $COUNT_DIR/rank<N>.json;
- with $FAIL_WRITE set (a file name such as rng-1.pt), that torch.save fails with ENOSPC, as a full
  disk would, on whichever process writes it.
"""

import errno
import json
import os
import sys
from pathlib import Path

import torch

import orpo.forward as fwd
from orpo.cli import main

counts = {"eval_forwards": 0}
real_forward = fwd.PolicyForward.forward
real_save = torch.save


def counting(self, batch):
    if not torch.is_grad_enabled():
        counts["eval_forwards"] += 1
    return real_forward(self, batch)


def failing_save(obj, f, *a, **k):
    if str(f).endswith(os.environ["FAIL_WRITE"]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(obj, f, *a, **k)


fwd.PolicyForward.forward = counting
if os.environ.get("FAIL_WRITE"):
    torch.save = failing_save
rc = main(sys.argv[1:])
if os.environ.get("COUNT_DIR"):
    (Path(os.environ["COUNT_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(counts))
sys.exit(rc)
