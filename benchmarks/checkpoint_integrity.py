"""What checkpoint integrity costs: seconds to write a checkpoint-shaped folder (weights + AdamW's two
moments, as orpo saves them for a full fine-tune of a model with --params parameters), to record its
manifest (sizes + CRC-32), to verify it against the manifest on resume, and to run the structural checks
used for checkpoints without one. Prints one JSON object.

    python benchmarks/checkpoint_integrity.py --params 135e6   # SmolLM2-135M, fp32: ~1.6 GB
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from orpo import diskio, integrity  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=135e6)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder on /tmp)")
    args = ap.parse_args()
    n = int(args.params)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    folder = root / "step-000001"
    folder.mkdir()
    try:
        g = torch.Generator().manual_seed(0)
        w = {"w": torch.randn(n, generator=g)}
        opt = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.randn(n, generator=g),
                             "exp_avg_sq": torch.rand(n, generator=g)}}, "param_groups": [{"lr": 1e-5, "params": [0]}]}
        t = time.perf_counter()
        save_file(w, str(folder / "trainable.safetensors"))
        diskio.save_torch(opt, folder / "optimizer.pt")
        (folder / "state.json").write_text("{}")
        for p in folder.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        t_save = time.perf_counter() - t
        t = time.perf_counter()
        integrity.write_manifest(folder)
        t_manifest = time.perf_counter() - t
        t = time.perf_counter()
        assert integrity.verify(folder) == []
        t_verify = time.perf_counter() - t
        (folder / integrity.MANIFEST).unlink()
        t = time.perf_counter()
        assert integrity.verify(folder) == []
        t_structure = time.perf_counter() - t
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(json.dumps({"params": n, "bytes": size, "save_s": round(t_save, 3), "manifest_s": round(t_manifest, 3),
                          "verify_s": round(t_verify, 3), "verify_without_manifest_s": round(t_structure, 3),
                          "manifest_over_save": round(t_manifest / t_save, 3)}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
