"""A failure one process of a two-process run meets ends both, promptly, in one line (orpo.train.failures);
a process killed with SIGKILL ends the launcher, and --resume continues the run exactly. Real launchers
(torchrun, accelerate launch), two CPU processes, the tiny model."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from test_distributed import SRC, env, rows
from test_run_lock import HOLDER

LOCKSTEP = str(Path(__file__).with_name("lockstep_launch.py"))  # orpo train with test hooks (FAIL_WRITE)


def launcher(kind: str, script: list[str], node: int | None = None) -> list[str]:
    """Two processes of ``script`` (["-m", "orpo"] or [path]) under torchrun or accelerate launch; with
    ``node``, this launcher's one process of a run on two "machines" (two launchers on this host, each
    watching only its own process, as on a cluster)."""
    port = env()["MASTER_PORT"]
    if kind == "torchrun":
        exe = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        nodes = ["--nproc_per_node", "2"] if node is None else [
            "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1"]
        return [exe, *nodes, "--master_port", port, *script]
    exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    nodes = ["--num_machines", "1"] if node is None else [
        "--num_machines", "2", "--machine_rank", str(node), "--main_process_ip", "127.0.0.1"]
    return [exe, "launch", "--multi_gpu", "--num_processes", "2", *nodes, "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", port, *script]


def on_two_machines(kind: str, script: list[str], args: list[str], timeout: float = 120):
    """Both launchers of a two-"machine" run, started together: (seconds until both ended, their results)."""
    t0 = time.time()
    procs = [subprocess.Popen(launcher(kind, script, node) + args, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    took = time.time() - t0
    return took, [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def train_args(model, data, out, *extra) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--precision", "fp32", "--batch-size", "1",
            "--output-dir", str(out), *[str(a) for a in extra]]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("orpo: error: ")]


def root_cause(stderr: str) -> tuple[int | None, str]:
    """The rank and exit the launcher names as the root cause (the first worker it saw end)."""
    tail = stderr.split("Root Cause", 1)[-1]
    rank = next((int(line.split(":")[1].split()[0]) for line in tail.splitlines() if "rank      :" in line), None)
    code = next((line.split(":", 1)[1].strip() for line in tail.splitlines() if "exitcode  :" in line), "")
    return rank, code


@pytest.mark.parametrize("kind", ["torchrun", "accelerate"])
def test_refused_lock_ends_both_processes_in_one_line(tmp_path, tiny_model_dir, conv_file, kind):
    """Process 0 is refused the lock before the process group exists. Process 1 runs under a launcher of
    its own (another machine, as it were), which would never stop it: waiting for process 0 in
    Accelerate's start-up, it hears of the refusal from the launcher's store and ends by itself, silently,
    with status 2; the one line names the live run."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        took, (node0, node1) = on_two_machines(kind, ["-m", "orpo"],
                                               train_args(tiny_model_dir, conv_file, out, "--max-steps", 2))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert node0.returncode != 0 and node1.returncode != 0
    errors = error_lines(node0.stderr) + error_lines(node1.stderr)
    assert len(errors) == 1, node0.stderr[-3000:] + node1.stderr[-3000:]
    assert f"orpo train (pid {holder.pid}, started " in errors[0] and "is writing this folder" in errors[0]
    assert error_lines(node0.stderr) == errors  # printed by the main process
    for res in (node0, node1):  # no traceback from either orpo process
        assert f"{SRC}/orpo" not in res.stderr and "[rank1]" not in res.stderr, res.stderr[-3000:]
    for node, res in enumerate((node0, node1)):  # each ended by itself, with a UserError's status
        rank, code = root_cause(res.stderr)
        assert rank == node and code.startswith("2 "), res.stderr[-3000:]
    assert took < 60, took  # (start-up of both on a small CI machine included)
    assert sorted(p.name for p in out.iterdir()) == [".orpo.lock"]  # the holder's folder, untouched


def test_failed_final_write_on_the_main_process_ends_both(tmp_path, tiny_model_dir, conv_file):
    """The final model cannot be written (a full disk, on process 0 only, which alone writes it): process
    1, waiting at the end, stops at once and silently; one line names the file and the resume command;
    every checkpoint is kept."""
    out = tmp_path / "run"
    cmd = launcher("torchrun", [LOCKSTEP]) + train_args(tiny_model_dir, conv_file, out, "--max-steps", 3,
                                                         "--save-steps", 1)
    t0 = time.time()
    res = subprocess.run(cmd, env=dict(env(), FAIL_WRITE=".tmp-model/model.safetensors"), capture_output=True,
                         text=True, timeout=120)
    took = time.time() - t0
    assert res.returncode != 0
    errors = error_lines(res.stderr)
    assert len(errors) == 1, res.stderr[-3000:]
    assert "could not write the final model (No space left on device)" in errors[0], errors
    assert "newest: step-000003" in errors[0] and "--resume" in errors[0]
    assert f"{SRC}/orpo" not in res.stderr and "[rank1]" not in res.stderr, res.stderr[-3000:]
    rank, code = root_cause(res.stderr)
    assert rank == 0 and code.startswith("2 "), (rank, code)
    assert took < 60, took
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert not (out / "model").exists() and not (out / ".tmp-model").exists()
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3]


def test_failed_final_write_without_an_agent_store(tmp_path, tiny_model_dir, conv_file):
    """Two processes started by hand (RANK, WORLD_SIZE, MASTER_ADDR/PORT only, as some cluster scripts do):
    the store is the process group's, hosted by process 0, and heard from once the group exists. Nobody
    would stop process 1 here; it ends by itself with status 2 and no traceback."""
    out = tmp_path / "run"
    args = [sys.executable, LOCKSTEP, *train_args(tiny_model_dir, conv_file, out, "--max-steps", 2, "--save-steps", 1)]
    base = dict(env(), FAIL_WRITE=".tmp-model/model.safetensors", MASTER_ADDR="127.0.0.1", WORLD_SIZE="2")
    procs = [subprocess.Popen(args, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [2, 2], [e[-3000:] for _, e in results]
    errors = [line for _, e in results for line in error_lines(e)]
    assert len(errors) == 1 and error_lines(results[0][1]) == errors, errors
    assert "could not write the final model" in errors[0]
    assert not any("Traceback" in e for _, e in results), [e[-3000:] for _, e in results]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_bad_data_met_by_both_processes_gives_one_line(tmp_path, tiny_model_dir):
    """Bad data is seen by every process alike: each stops, the line is printed once."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a"}\n')
    out = tmp_path / "run"
    res = subprocess.run(launcher("torchrun", ["-m", "orpo"]) + train_args(tiny_model_dir, bad, out, "--max-steps", 2),
                         env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "bad.jsonl:1" in errors[0], res.stderr[-3000:]
    assert f"{SRC}/orpo" not in res.stderr, res.stderr[-3000:]
    assert not out.exists()


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the launcher's worker of ``rank`` (its environment says RANK=rank)."""
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "orpo" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def logged_steps(out: Path) -> int:
    try:
        return max((json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                    if line.strip().endswith("}")), default=0)
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_of_one_process_ends_the_launcher_and_resume_is_exact(tmp_path, tiny_model_dir, conv_file):
    """A regression test for what already worked: under accelerate launch, process 1 is killed with SIGKILL
    mid-run; the launcher ends (non-zero) on its own, and --resume with two processes ends with the same
    metrics rows and weights as an uninterrupted two-process run."""
    from safetensors.torch import load_file

    common = ["--scheduler", "cosine", "--warmup-steps", 2, "--lr", 1e-3, "--max-steps", 10, "--save-steps", 2]
    ref, out = tmp_path / "ref", tmp_path / "run"
    subprocess.run(launcher("accelerate", ["-m", "orpo"]) + train_args(tiny_model_dir, conv_file, ref, *common),
                   env=env(), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(launcher("accelerate", ["-m", "orpo"]) + train_args(tiny_model_dir, conv_file, out, *common),
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and logged_steps(out) < 3 and time.time() < deadline:
            time.sleep(0.05)  # past the first checkpoint (step 2)
        victim = rank_pid(proc.pid, 1)
        assert proc.poll() is None and victim is not None, "the run ended before it could be killed"
        psutil.Process(victim).send_signal(signal.SIGKILL)
        t0 = time.time()
        proc.wait(timeout=60)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert took < 30, took
    assert logged_steps(out) < 10  # it did not finish
    res = subprocess.run(launcher("accelerate", ["-m", "orpo"]) +
                         train_args(tiny_model_dir, conv_file, out, *common, "--resume"),
                         env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert rows(out) == rows(ref)
    wa, wb = load_file(ref / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
