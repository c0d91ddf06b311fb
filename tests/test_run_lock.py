"""One run per output folder: a second `orpo train` (plain, --resume or --overwrite) on a live folder stops
at once in one line naming the live run's pid and start time, and the live run is untouched; the lock
is the kernel's, so `kill -9` releases it; `orpo report` still works on a live folder. Real processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from orpo.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def env():
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS="1")


def orpo(*args):
    return [sys.executable, "-m", "orpo", *[str(a) for a in args]]


HOLDER = """
import sys, time
from pathlib import Path
from orpo import runlock
runlock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_held_lock_refuses_every_kind_of_train_and_kill_9_releases_it(tmp_path, tiny_model_dir, plain_file, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(plain_file), "--output-dir", str(out),
            "--max-steps", "1", "--precision", "fp32"]
    assert main(args) == 0  # a finished run in the folder
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        capsys.readouterr()
        for extra in ([], ["--resume", "--max-steps", "2"], ["--overwrite"]):
            assert main(args + extra) == 2
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in err, err
            assert f"orpo train (pid {holder.pid}, started " in lines[0] and "UTC) is writing this folder" in lines[0]
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        # read-only commands do not take the lock
        assert main(["report", str(out)]) == 0
        assert main(["eval", "--model", str(out / "model"), "--data", str(plain_file)]) == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(args + ["--resume", "--max-steps", "2"]) == 0  # the kernel released it with the process


def test_lock_leaves_no_folder_behind_a_run_that_failed_early(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "never"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(bad), "--output-dir", str(out)]) == 2
    assert not out.exists()


def test_second_train_on_a_live_run_is_refused_and_the_live_run_is_untouched(tmp_path, tiny_model_dir, conv_file):
    out = tmp_path / "run"
    common = ["train", "--model", tiny_model_dir, "--data", conv_file, "--precision", "fp32", "--batch-size", 1,
              "--max-steps", 1000000, "--save-steps", 0, "--output-dir", out]
    # two started together, before either has written anything: exactly one runs
    a = subprocess.Popen(orpo(*common), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(orpo(*common), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while a.poll() is None and b.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        loser, live = (a, b) if a.poll() is not None else (b, a)
        _, err = loser.communicate(timeout=60)
        assert loser.returncode == 2, err
        lines = err.strip().splitlines()
        assert lines[-1].startswith("orpo: error: ") and f"(pid {live.pid}, started " in lines[-1], err
        assert "Traceback" not in err
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            time.sleep(0.05)
            assert live.poll() is None, live.communicate()
        # a job restarted by hand (--overwrite is refused the same way; see the test above)
        r = subprocess.run(orpo(*common, "--resume"), env=env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and f"(pid {live.pid}, started " in r.stderr, r.stderr
        r = subprocess.run(orpo("report", out), env=env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert live.poll() is None  # still running
        live.send_signal(signal.SIGTERM)
        stdout, stderr = live.communicate(timeout=120)
        assert live.returncode == 0, stderr
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if s > 0]
    assert train_steps == list(range(1, len(train_steps) + 1))  # no row twice, none interleaved
    assert not (out / ".orpo.lock").exists()
