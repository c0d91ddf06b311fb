"""`orpo train` for torchrun with two test hooks, used by tests/test_distributed.py:

- counts the policy forwards each process runs with gradients off (the evaluation forwards) into
  $COUNT_DIR/rank<N>.json;
- with $FAIL_WRITE set (a path ending such as rng-1.pt, or .tmp-model/model.safetensors for the final
  model), that torch.save or safetensors file fails with ENOSPC, as a full disk would, on whichever
  process writes it.
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


def failing_safetensors(real):
    def save_file(tensors, filename, *a, **k):
        if str(filename).endswith(os.environ["FAIL_WRITE"]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, *a, **k)

    return save_file


fwd.PolicyForward.forward = counting
if os.environ.get("FAIL_WRITE"):
    import transformers.modeling_utils as hf

    torch.save = failing_save
    hf.safe_save_file = failing_safetensors(hf.safe_save_file)
rc = main(sys.argv[1:])
if os.environ.get("COUNT_DIR"):
    (Path(os.environ["COUNT_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(counts))
sys.exit(rc)
