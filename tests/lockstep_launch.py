"""`orpo train` for torchrun, counting the policy forwards each process runs with gradients off (the
evaluation forwards) into $COUNT_DIR/rank<N>.json. Used by tests/test_distributed.py."""

import json
import os
import sys
from pathlib import Path

import torch

import orpo.forward as fwd
from orpo.cli import main

counts = {"eval_forwards": 0}
real = fwd.PolicyForward.forward


def counting(self, batch):
    if not torch.is_grad_enabled():
        counts["eval_forwards"] += 1
    return real(self, batch)


fwd.PolicyForward.forward = counting
rc = main(sys.argv[1:])
(Path(os.environ["COUNT_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(counts))
sys.exit(rc)
