"""The sharded engines on this CPU, through the entry point users run (`accelerate launch` with the
shipped configs/accelerate/*.yaml). Accelerate never runs FSDP or DeepSpeed on CPUs (it falls back to
plain data parallel), so tests/engine_launch.py puts the engine back; everything after Accelerate's
choice of engine is the code a GPU run takes: FSDP2's ``fully_shard`` over gloo, DeepSpeed on its CPU
accelerator."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import env, rows

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = str(Path(__file__).with_name("engine_launch.py"))


def accelerate_launch(config: str, *extra: str) -> list[str]:
    exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    return [exe, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2",
            "--mixed_precision", "no", "--main_process_port", env()["MASTER_PORT"], *extra, LAUNCH]


def test_fsdp2_two_processes_equal_one_process(tmp_path, tiny_model_dir, conv_file):
    """FSDP2 with the shipped config (transformer-layer wrapping, activation checkpointing, sharded
    checkpoints), two gloo processes with batch 1 against one process with batch 2: the same metrics,
    held-out values and final weights to 1e-5, and each process really held half the weights."""
    from safetensors.torch import load_file

    common = ["train", "--model", str(tiny_model_dir), "--data", str(conv_file), "--precision", "fp32", "--lr", "1e-2",
              "--max-steps", "4", "--eval-data", str(conv_file), "--save-steps", "2", "--warmup-steps", "1",
              "--no-lora"]  # (LoRA's dropout draws differ per process)
    one, two, report = tmp_path / "one", tmp_path / "two", tmp_path / "report"
    report.mkdir()
    subprocess.run([sys.executable, "-m", "orpo", *common, "--batch-size", "2", "--output-dir", str(one)],
                   env=env(), check=True, capture_output=True, text=True, timeout=600)
    res = subprocess.run(accelerate_launch("fsdp.yaml") + common + ["--batch-size", "1", "--output-dir", str(two)],
                         env=dict(env(), ORPO_TEST_ENGINE="fsdp", REPORT_DIR=str(report)),
                         capture_output=True, text=True, timeout=600)  # a hang must fail, not stall CI
    assert res.returncode == 0, res.stderr[-3000:]
    assert "plain data parallel" not in res.stdout
    info = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    for i in info:
        assert i["distributed_type"] == "FSDP" and i["dtensor"], i
        assert i["local_numel"] < 0.6 * i["numel"], i  # a shard each, not a replica
    assert info[0]["local_numel"] + info[1]["local_numel"] == info[0]["numel"]
    assert any((two / "checkpoints" / "step-000002").glob("pytorch_model_fsdp_0/*.distcp"))  # saved sharded
    a, b = rows(one), rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    w0 = load_file(tiny_model_dir / "model.safetensors")
    assert wa.keys() == wb.keys()
    size = sum((wa[k] - w0[k]).abs().sum() for k in wa)
    assert size > 0
    assert sum((wa[k] - wb[k]).abs().sum() for k in wa) / size < 1e-5
    assert max((wa[k] - wb[k]).abs().max() for k in wa) < 1e-5
