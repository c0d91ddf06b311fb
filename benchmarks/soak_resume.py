"""Soak test of crash safety (kept out of CI: it takes minutes). Trains a tiny random Llama for 2,000
steps twice: once uninterrupted, once SIGKILLed at random moments (saves every 25 steps, so kills land
in the middle of saves too) and resumed with --resume each time. The final weights and every metrics
row (but the wall-clock ones) must be bitwise equal.

    python benchmarks/soak_resume.py [--steps 2000] [--kills 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    from conftest import CHATML, CONV_ROWS, _train_tokenizer, make_tiny_llama, write_jsonl

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(), bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      pad_token="<|im_end|>", unk_token="<|endoftext|>")
        tok.chat_template = CHATML
        make_tiny_llama(len(tok)).save_pretrained(d / "model")
        tok.save_pretrained(d / "model")
        data = write_jsonl(d / "data.jsonl", CONV_ROWS * 8)
        common = [sys.executable, "-m", "orpo", "train", "--model", str(d / "model"), "--data", str(data),
                  "--precision", "fp32", "--max-steps", str(args.steps), "--save-steps", "25", "--batch-size", "2",
                  "--lr", "1e-3", "--scheduler", "cosine", "--eval-samples", "0", "--logging-steps", "5",
                  "--no-lora", "--max-length", "1024"]  # the job as recorded (flags alone start from the default job)
        t = time.time()
        subprocess.run(common + ["--output-dir", str(d / "ref")], env=env, check=True, capture_output=True)
        print(f"uninterrupted run: {time.time() - t:.0f}s", flush=True)

        rng = random.Random(args.seed)
        out = d / "run"
        cmd = common + ["--output-dir", str(out)]
        kills = 0
        t = time.time()
        while True:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if kills < args.kills:
                time.sleep(rng.uniform(3.0, 12.0))  # start-up takes a few seconds; some kills land before training
            if kills < args.kills and proc.poll() is None:
                proc.kill()
                proc.wait()
                kills += 1
                cmd = common + ["--output-dir", str(out), "--resume"]
                continue
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"run failed: {err.decode()[-2000:]}")
            break
        print(f"interrupted run: {kills} kills, {time.time() - t:.0f}s", flush=True)

        def rows(p):
            return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "tokens_per_s")}
                    for line in (p / "metrics.jsonl").read_text().splitlines()]

        a, b = load_file(d / "ref" / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
        same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        same_rows = rows(d / "ref") == rows(out)
        print(f"{args.steps} steps, {kills} kill -9s: final weights bitwise equal: {same_weights}; "
              f"metrics rows equal: {same_rows} ({len(rows(out))} rows)")
        raise SystemExit(0 if same_weights and same_rows else 1)


if __name__ == "__main__":
    main()
