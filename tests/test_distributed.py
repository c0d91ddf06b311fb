"""Two CPU processes (gloo) with per-process batch n equal one process with batch 2n: same metrics, same
weights. TRL fails this (its NLL is a per-process token mean); see the README."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")
VOLATILE = ("time_s", "tokens_per_s")


def env():
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + os.getpid() % 1000))


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, tiny_model_dir, conv_file, launcher):
    from safetensors.torch import load_file

    common = ["train", "--model", str(tiny_model_dir), "--data", str(conv_file), "--precision", "fp32", "--lr", "1e-2",
              "--max-steps", "4", "--eval-data", str(conv_file), "--save-steps", "2", "--warmup-steps", "1",
              "--no-lora"]  # full fine-tuning: LoRA's dropout draws differ per process, so the runs would differ
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "orpo", *common, "--batch-size", "2", "--output-dir", str(one)],
                   env=env(), check=True, capture_output=True, text=True, timeout=600)
    if launcher == "torchrun":
        exe = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        cmd = [exe, "--nproc_per_node", "2", "--master_port", env()["MASTER_PORT"], "-m", "orpo"]
    else:
        exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
        cmd = [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", env()["MASTER_PORT"], "-m", "orpo"]
    res = subprocess.run(cmd + common + ["--batch-size", "1", "--output-dir", str(two)], env=env(),
                         capture_output=True, text=True, timeout=600)  # a hang must fail, not stall CI
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("metrics:") == 1  # only the main process reports
    a, b = rows(one), rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)
    assert any("eval_rewards/accuracies_ci" in r for r in b)  # the intervals, from the gathered per-pair values
    pa, pb = ([json.loads(line) for line in (o / "eval_pairs.jsonl").read_text().splitlines()] for o in (one, two))
    assert [r["where"] for r in pa] == [r["where"] for r in pb]  # every pair once, in the one-process order
    for x, y in zip(pa, pb):
        assert x["logps/rejected"] == pytest.approx(y["logps/rejected"], rel=1e-5, abs=1e-6)
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    w0 = load_file(tiny_model_dir / "model.safetensors")
    assert wa.keys() == wb.keys()
    # Compare the weight updates (TRL's 2-process update differs from its 1-process one by 13% in L1).
    diff = sum((wa[k] - wb[k]).abs().sum() for k in wa)
    size = sum((wa[k] - w0[k]).abs().sum() for k in wa)
    assert size > 0  # it did train
    assert diff / size < 1e-5
    assert max((wa[k] - wb[k]).abs().max() for k in wa) < 1e-5


def test_odd_number_of_eval_pairs_keeps_processes_in_lockstep(tmp_path, tiny_model_dir, conv_file):
    """5 held-out pairs over 2 processes: one holds 3 (2 batches), the other 2 (1 batch); both must run 2
    forwards (sharded engines gather weights in every forward), and the metrics must equal one process's."""
    from conftest import CONV_ROWS, write_jsonl

    evals = write_jsonl(tmp_path / "eval5.jsonl", (CONV_ROWS * 2)[:5])
    common = ["train", "--model", str(tiny_model_dir), "--data", str(conv_file), "--precision", "fp32", "--lr", "1e-2",
              "--max-steps", "2", "--eval-data", str(evals), "--eval-steps", "1", "--save-steps", "0",
              "--no-lora"]  # (LoRA dropout draws differ per process)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "orpo", *common, "--batch-size", "2", "--output-dir", str(one)],
                   env=env(), check=True, capture_output=True, text=True, timeout=600)
    exe = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [exe, "--nproc_per_node", "2", "--master_port", env()["MASTER_PORT"],
           str(Path(__file__).with_name("lockstep_launch.py"))]  # orpo, counting each process's eval forwards
    counts = tmp_path / "counts"
    counts.mkdir()
    res = subprocess.run(cmd + common + ["--batch-size", "1", "--output-dir", str(two)], env=dict(env(), COUNT_DIR=str(counts)),
                         capture_output=True, text=True, timeout=600)  # a hang must fail, not stall CI
    assert res.returncode == 0, res.stderr[-3000:]
    forwards = [json.loads((counts / f"rank{r}.json").read_text())["eval_forwards"] for r in (0, 1)]
    assert forwards == [6, 6]  # 3 evaluations of 2 batches each, on both (uneven, it was [6, 3])
    a = [r for r in rows(one) if "eval_loss" in r]
    b = [r for r in rows(two) if "eval_loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2]
    for x, y in zip(a, b):
        assert y["eval_pairs"] == 5
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)


def test_eval_forwards_are_the_same_on_every_process(tiny_model, chatml_tokenizer):
    """Each share of 7 pairs split rank::3 runs lockstep_batches forwards; padding adds nothing, so the
    shares' sums are the whole set's."""
    from conftest import PLAIN_ROWS
    from orpo.data.readers import normalize_row
    from orpo.data.templates import tokenize_pairs
    from orpo.evaluate import evaluate_pairs, lockstep_batches
    from orpo.forward import PolicyForward

    rows = [normalize_row(r, f"t:{i}") for i, r in enumerate(PLAIN_ROWS * 2)][:7]
    pairs = tokenize_pairs(rows, chatml_tokenizer, 256)
    policy = PolicyForward(tiny_model)
    calls = []
    real = policy.forward
    policy.forward = lambda batch: calls.append(batch.n_pairs) or real(batch)
    sums = []
    n = lockstep_batches(len(pairs), 3, 2)
    assert n == 2  # shares of 3, 2, 2 pairs
    for rank in range(3):
        calls.clear()
        evaluate_pairs(policy, pairs[rank::3], 0.1, False, batch_size=2, n_batches=n, pad_pair=pairs[0],
                       reduce=lambda t: (sums.append(t) if t.ndim == 1 else None) or t)  # the sums, not the table
        assert len(calls) == n
    whole = []
    evaluate_pairs(policy, pairs, 0.1, False, batch_size=2,
                   reduce=lambda t: (whole.append(t) if t.ndim == 1 else None) or t)
    assert torch.allclose(sum(sums), whole[0], rtol=1e-6, atol=1e-9)
    assert float(sum(sums)[3]) == 7  # pairs counted once


def test_full_disk_on_one_process_stops_both_in_one_line(tmp_path, tiny_model_dir, conv_file):
    """Process 1 cannot write its RNG file into a checkpoint: both processes stop at that checkpoint
    (neither waits in a barrier for the other), the main process prints the one line, the temporary
    folder is removed and the earlier checkpoint is kept."""
    out = tmp_path / "two"
    exe = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [exe, "--nproc_per_node", "2", "--master_port", env()["MASTER_PORT"],
           str(Path(__file__).with_name("lockstep_launch.py")), "train", "--model", str(tiny_model_dir),
           "--data", str(conv_file), "--precision", "fp32", "--max-steps", "6", "--save-steps", "1",
           "--batch-size", "1", "--output-dir", str(out)]
    # the first save's rng-1.pt is written; each later one fails (torch.save of the same name)
    res = subprocess.run(cmd, env=dict(env(), FAIL_WRITE="step-000002/rng-1.pt"), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("orpo: error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "step-000002: could not write the checkpoint (No space left on device, on process 1)" in errors[0], errors
    assert "newest: step-000001" in errors[0] and "--resume" in errors[0]
    # no traceback from either orpo process (torchrun itself reports a failed child with one)
    assert f"{SRC}/orpo" not in res.stderr, res.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
