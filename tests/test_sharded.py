"""The sharded engines on this CPU, through the entry point users run (`accelerate launch` with the
shipped configs/accelerate/*.yaml). Accelerate never runs FSDP or DeepSpeed on CPUs (it falls back to
plain data parallel), so tests/engine_launch.py puts the engine back; everything after Accelerate's
choice of engine is the code a GPU run takes: FSDP2's ``fully_shard`` over gloo, DeepSpeed on its CPU
accelerator."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import SRC, env, rows

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


# ------------------------------------------------------------------------------------------------
# DeepSpeed's non-finite steps: the engine's decisions, with a stand-in for Accelerate + DeepSpeed (runs
# everywhere; the real DeepSpeed run is below, where the package is installed).


class FakeDeepSpeed:
    """Accelerate under DeepSpeed as the engine sees it, on one of two processes: ``backward`` records the
    micro-batches DeepSpeed would accumulate (and step on at the boundary); ``reduce`` max-combines with
    the other process's flag; the global gradient norm is DeepSpeed's."""

    def __init__(self, other_bad=False, norm=1.0):
        self.calls, self.other_bad, self.norm = [], other_bad, norm
        self.gradient_state = type("G", (), {"_set_sync_gradients": lambda _, v: self.calls.append(("boundary", v))})()
        self.deepspeed_engine_wrapped = type("W", (), {"get_global_grad_norm": lambda _: self.norm})()

    def backward(self, loss):
        self.calls.append(("backward", float(loss)))

    def reduce(self, t, op):
        import torch

        assert op == "max"
        return torch.maximum(t, torch.tensor([float(self.other_bad)]))


def deepspeed_engine(fake, tmp_path, grad_accum=2, skipped_by_deepspeed=False):
    import types

    import torch

    from orpo.config import TrainConfig
    from orpo.train.engine import Engine

    engine = Engine.__new__(Engine)  # (no Accelerator: the fake stands in for it)
    engine.cfg = TrainConfig(output_dir=str(tmp_path), grad_accum=grad_accum)
    engine.accelerator, engine.world, engine.device, engine.deepspeed = fake, 2, torch.device("cpu"), True
    engine.is_main = True
    engine.optimizer = types.SimpleNamespace(step_was_skipped=skipped_by_deepspeed)
    engine.ds_backwards, engine.ds_skip = 0, False
    return engine


def test_deepspeed_never_sees_a_step_whose_loss_is_nonfinite_on_any_process(tmp_path):
    import math

    import torch

    fake = FakeDeepSpeed(other_bad=True)  # this process's loss is finite, the other's is NaN
    engine = deepspeed_engine(fake, tmp_path)
    engine.backward(torch.tensor(0.5), last=False)
    fake.other_bad = False  # a finite second micro-batch must not reach DeepSpeed either: the step is skipped
    engine.backward(torch.tensor(0.5), last=True)
    assert fake.calls == []  # no backward, so no DeepSpeed step
    norm, known = engine.clip(None)
    assert known and math.isnan(float(norm))  # the loop's guard then logs the step as skipped
    engine.backward(torch.tensor(0.5), last=False)  # the next step goes to DeepSpeed whole
    engine.backward(torch.tensor(0.25), last=True)
    assert fake.calls == [("boundary", False), ("backward", 0.5 * 2 * 2), ("boundary", True), ("backward", 0.25 * 2 * 2)]
    assert engine.clip(None) == (torch.tensor(1.0, dtype=torch.float64), True)


def test_deepspeed_stops_in_one_line_when_a_step_turns_nonfinite_after_accumulating(tmp_path):
    import torch

    from orpo.errors import UserError

    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000004" / "state.json").write_text("{}")
    fake = FakeDeepSpeed()
    engine = deepspeed_engine(fake, tmp_path)
    engine.backward(torch.tensor(0.5), last=False)
    with pytest.raises(UserError) as e:
        engine.backward(torch.tensor(float("inf")), last=True)
    assert len(fake.calls) == 2  # the first micro-batch only; DeepSpeed never stepped
    msg = str(e.value)
    assert "\n" not in msg and "micro-batch 2" in msg and "step-000004" in msg and "--resume" in msg


@pytest.mark.parametrize("skipped_by_deepspeed", [False, True])
def test_deepspeed_nonfinite_gradient_stops_unless_deepspeed_skipped_the_step(tmp_path, skipped_by_deepspeed):
    """A finite loss whose gradient is NaN: DeepSpeed has already stepped, on NaN weights, unless its own
    overflow check skipped the step (fp16, or ZeRO-1/2 with its check); then the loop logs it skipped."""
    import torch

    from orpo.errors import UserError

    fake = FakeDeepSpeed(norm=float("nan"))
    engine = deepspeed_engine(fake, tmp_path, grad_accum=1, skipped_by_deepspeed=skipped_by_deepspeed)
    engine.backward(torch.tensor(0.5), last=True)
    if skipped_by_deepspeed:
        norm, known = engine.clip(None)
        assert known and torch.isnan(norm)
    else:
        with pytest.raises(UserError, match="no checkpoint was saved yet"):
            engine.clip(None)
    fake.norm = None  # a norm DeepSpeed did not compute is not a reason to skip (nor to stop)
    engine.backward(torch.tensor(0.5), last=True)
    norm, known = engine.clip(None)
    assert not known


# ------------------------------------------------------------------------------------------------
# DeepSpeed itself, on its CPU accelerator (pip install deepspeed: a pure-Python package that keeps the
# installed torch; its CPU communication op is compiled on first use, which needs a C++ compiler).

requires_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                        reason="deepspeed not installed (pip install deepspeed)")


def deepspeed_common(model_dir, data, *more):
    return ["train", "--model", str(model_dir), "--data", str(data), "--precision", "fp32", "--lr", "1e-2",
            "--warmup-steps", "1", "--no-lora", *more]


@requires_deepspeed
def test_deepspeed_zero3_starts_partitioned_and_skips_nonfinite_steps(tmp_path, tiny_model_dir, conv_file):
    """The shipped ZeRO-3 config (weights partitioned from the load on, zero.Init): the run starts, and
    with a NaN loss at step 2 and a NaN gradient under a finite loss at step 3, both on process 1 only,
    both steps are skipped on both processes (the first kept from DeepSpeed by orpo, the second skipped
    by DeepSpeed's own check of the norm), and the run equals one process with the same faults."""
    from safetensors.torch import load_file

    common = deepspeed_common(tiny_model_dir, conv_file, "--max-steps", "4", "--save-steps", "2")
    one, two, report = tmp_path / "one", tmp_path / "two", tmp_path / "report"
    report.mkdir()
    subprocess.run([sys.executable, LAUNCH, *common, "--batch-size", "2", "--output-dir", str(one)],
                   env=dict(env(), NAN_LOSS="2:0", NAN_GRAD="3:0"), check=True, capture_output=True, text=True,
                   timeout=600)
    res = subprocess.run(accelerate_launch("deepspeed-zero3.yaml") + common + ["--batch-size", "1", "--output-dir", str(two)],
                         env=dict(env(), ORPO_TEST_ENGINE="deepspeed", REPORT_DIR=str(report), NAN_LOSS="2:1", NAN_GRAD="3:1"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    info = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(i["distributed_type"] == "DEEPSPEED" and i["local_numel"] == 0 for i in info), info  # partitioned
    a, b = rows(one), rows(two)
    assert [r["step"] for r in b if r.get("skipped")] == [2, 3]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        if not x.get("skipped"):
            for k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max() for k in wa) < 1e-5


@requires_deepspeed
def test_deepspeed_stops_in_one_line_when_a_step_turns_nonfinite_midway(tmp_path, tiny_model_dir, conv_file):
    """ZeRO-2 with two micro-batches a step: the second micro-batch of step 3 has a NaN loss on process 1,
    after the first was accumulated inside DeepSpeed. Both processes stop in one line, the checkpoint of
    step 2 is kept and nothing of step 3 is saved."""
    out = tmp_path / "two"
    common = deepspeed_common(tiny_model_dir, conv_file, "--max-steps", "4", "--save-steps", "2", "--grad-accum", "2")
    res = subprocess.run(accelerate_launch("deepspeed-zero2.yaml") + common + ["--batch-size", "1", "--output-dir", str(out)],
                         env=dict(env(), ORPO_TEST_ENGINE="deepspeed", NAN_LOSS="3:1:2"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("orpo: error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "micro-batch 2" in errors[0] and "step-000002" in errors[0] and "--resume" in errors[0], errors
    assert f"{SRC}/orpo" not in res.stderr, res.stderr[-3000:]  # no traceback from orpo
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
