"""The ORPO training loop, top to bottom, on Accelerate.

    set-up (setup.py: folder, data, model, fast paths, optimizer; resume)
    -> before: held-out answers and evaluation at step 0
    -> each step: micro-batches -> forward -> loss -> backward -> clip -> [finite?] step
    -> after the step: log, evaluate, save, signal
    -> finish: last checkpoint, final evaluation, model, answers, summary, report

One optimizer step consumes ``batch_size * grad_accum * processes`` pairs. The data order is a pure
function of the seed and the step (plan.py), so resuming needs no saved iterator and every process
knows the whole step's pairs (hence the step's token and pair totals, which normalise the loss exactly).
Whatever differs between one process, DDP, FSDP and DeepSpeed is in engine.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import diskio, precision, resume, runlock
from ..config import TrainConfig
from ..errors import UserError
from ..evaluate import evaluate_pairs, lockstep_batches, write_pair_values
from ..loss import METRIC_SIZE, metric_vector, orpo_loss, summarize
from ..progress import Progress
from ..report import write_report_safe
from .engine import Engine
from .failures import shared_failures
from .outputs import Answers, write_outputs
from .setup import Run, check_environment, restore, set_up, write_run_files


@dataclass
class RunResult:
    """What a run left behind: ``orpo.train`` returns it and the CLI prints from it."""

    output_dir: Path
    steps: int
    final_metrics: dict
    eval_metrics: dict
    answer_accuracy: tuple[float, float] | None
    model_dir: Path
    is_main: bool = True
    answers: dict | None = None  # the default job's held-out answers (orpo.answers.answer_summary)
    stopped: bool = False  # by a signal, after saving a checkpoint; the run can be resumed


def train(cfg: TrainConfig, argv_for_resume: list[str] | None = None) -> RunResult:
    """One run, holding the output folder's lock (main process only: ``RANK`` 0, set by torchrun and
    accelerate before Accelerate starts); a failed write ends it in one line with the resume command.
    With several processes, a failure any of them meets ends all of them with that line (failures.py)."""
    is_main = int(os.environ.get("RANK", "0")) == 0
    with shared_failures() as shared, runlock.output_lock(Path(cfg.output_dir), enabled=is_main):
        try:
            return _train(cfg, argv_for_resume, shared)
        except (diskio.WriteFailed, OSError) as e:
            failure = resume.write_failure(e, Path(cfg.output_dir), cfg.overwrite, argv_for_resume, is_main)
            if failure is None:
                raise
            raise failure from None


def _train(cfg: TrainConfig, argv_for_resume: list[str] | None, shared=None) -> RunResult:
    cfg.precision, why = precision.resolve(cfg.precision, precision.run_device_type())  # (config.yaml keeps it)
    engine = Engine(cfg, check_environment(cfg))
    if why:
        engine.say(why)
    if shared is not None:  # (a launcher without an agent store: its store exists from here on)
        shared.connect()
    run = set_up(cfg, engine)
    done = restore(run)
    if done is not None:
        if engine.is_main and not (run.out / "report.html").exists():
            write_report_safe(run.out, engine.say)
        acc = done.get("answer_accuracy")
        return RunResult(run.out, run.start_step, done.get("final") or {}, done.get("eval") or {},
                         tuple(acc) if acc else None, Path(done.get("model_dir") or run.out / "model"), engine.is_main)
    write_run_files(run)
    engine.init_trackers()
    answers = before(run)

    run.policy.train()
    t0 = time.time() - run.elapsed_before
    log = LogWindow(resume.last_train_row(run.metrics_path) if run.start_step and engine.is_main else {})
    progress = Progress(run.total_steps, run.start_step, enabled=engine.is_main)
    step, stopped = run.start_step, False
    with StopRequested() as stop, progress:
        while step < run.total_steps:
            result = train_step(run, step)
            step += 1
            stopped = after_step(run, step, result, log, progress, stop, t0)
            if stopped:
                break
    if stopped:
        cmd = resume.resume_command(run.out, cfg.overwrite, argv_for_resume)
        engine.say(f"stopped by signal after step {step}; checkpoint saved. Resume with:\n  {cmd}")
        engine.end()
        return RunResult(run.out, step, log.last_row, run.eval_last, None, run.out / "model", engine.is_main, stopped=True)
    return finish(run, answers, step, log.last_row, t0)


# ------------------------------------------------------------------------------------------------
# Before the first step.


def before(run: Run) -> Answers:
    """Greedy answers to held-out prompts, and the evaluation at step 0 (a resumed run keeps both)."""
    answers = Answers(run)
    answers.answer_before(run)
    if run.eval_pairs and run.start_step == 0:
        run.eval_last = evaluate(run, 0)
        run.engine.say(eval_line(run.eval_last))
    run.engine.say(f"setup took {time.time() - run.t_setup:.1f}s; training {run.total_steps} steps of "
                   f"{run.plan.global_batch} pairs ({len(run.train_pairs)} pairs, {run.plan.steps_per_epoch} steps per epoch)")
    return answers


def evaluate(run: Run, step: int) -> dict:
    """Held-out metrics with their intervals, each process on its share of the pairs; one metrics row,
    and every pair's own values in eval_pairs.jsonl (for paired comparisons across runs)."""
    engine, pairs, cfg = run.engine, run.eval_pairs, run.cfg
    rank, world = engine.rank, engine.world
    bs = cfg.resolved_eval_batch_size()
    m, values = evaluate_pairs(
        run.policy, pairs[rank::world], cfg.beta, cfg.prompt_in_nll, batch_size=bs,
        collate_fn=run.forward.collate, pad_id=run.pad_id, device=engine.device,
        autocast=engine.autocast, reduce=engine.reduce_cpu,
        n_batches=lockstep_batches(len(pairs), world, bs), pad_pair=pairs[0],  # same forwards everywhere
        positions=range(rank, len(pairs), world), n_total=len(pairs), keep_values=True,
    )
    row = {"step": step, "epoch": round(min(step, run.total_steps) / run.plan.steps_per_epoch, 4), **m}
    log_row(run, row)
    if engine.is_main:
        write_pair_values(run.out / "eval_pairs.jsonl", step, pairs, values)
    return row


# ------------------------------------------------------------------------------------------------
# One optimizer step.


@dataclass
class StepResult:
    sums: torch.Tensor  # metric_vector sums over the step's pairs, all processes (float64, CPU)
    grad_norm: float
    finite: bool  # loss and gradient finite: the optimizer stepped
    lr: float
    pair_tokens: int


def train_step(run: Run, step: int) -> StepResult:
    """Micro-batches -> forward -> loss -> backward; clip; step unless something is NaN/Inf."""
    cfg, engine = run.cfg, run.engine
    micro = run.plan.micro_batches(step, engine.rank)
    step_idx = run.plan.step_pairs(step)
    nll_norm = float(run.train_pairs.nll_tokens(step_idx, cfg.prompt_in_nll))
    pair_norm = float(len(step_idx))
    vec = torch.zeros(METRIC_SIZE, dtype=torch.float64, device=engine.device)
    for m, idx in enumerate(micro):
        weight = 1.0
        if len(idx) == 0:  # a short last step: keep every process in lockstep, add nothing
            idx, weight = step_idx[:1], 0.0
        batch = run.forward.collate([run.train_pairs[i] for i in idx], cfg.prompt_in_nll, run.pad_id).to(engine.device)
        last = m == len(micro) - 1
        with engine.accumulating(run.policy, last):
            with engine.autocast(), (run.router.recording() if run.router else contextlib.nullcontext()):
                logps = run.policy(batch)
            part = orpo_loss(logps, batch.pair, batch.kind, batch.n_pairs, cfg.beta, cfg.prompt_in_nll, nll_norm, pair_norm)
            if run.router is not None:  # the MoE router's load-balancing loss (orpo.router)
                part = run.router.add(part, batch, pair_norm)
            engine.backward(part.loss * weight, last)
        if weight:
            vec += metric_vector(part, batch.n_pairs)
    norm, norm_known = engine.clip(run.policy)
    vec = engine.sum(vec)
    # The one host-device synchronisation of the step: the sums and the norm come back together, and
    # the finiteness check needs them before the optimizer may step.
    back = torch.cat([vec, norm.reshape(1).double()]).cpu()
    sums, grad_norm = back[:-1], float(back[-1])
    finite = (math.isfinite(grad_norm) or not norm_known) and bool(torch.isfinite(sums).all())
    lr = run.scheduler.get_last_lr()[0]
    if finite:
        run.optimizer.step()
        run.bad_streak = 0
    else:
        run.bad_streak += 1
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # after a skipped update torch warns; the schedule follows steps
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()
    return StepResult(sums, grad_norm, finite, lr, run.train_pairs.pair_tokens(step_idx))


# ------------------------------------------------------------------------------------------------
# After each step.


class LogWindow:
    """The steps since the last logged row. A row covers every finite step of its window: ``pair_tokens``
    and ``tokens_per_s`` over all of them, the metrics over all their pairs and tokens (the NLL per
    token, the rest per pair), ``grad_norm`` and ``learning_rate`` of the last one (as transformers
    logs them). A skipped (non-finite) step gets a row of its own and leaves the window as it was."""

    def __init__(self, last_row: dict):
        self.last_row = last_row
        self.sums, self.tokens, self.seconds, self.last = None, 0, 0.0, None
        self.mark = time.time()

    def add(self, result: StepResult, step: int) -> float:
        """Count a step in (finite) or out of (skipped) the window; returns the step's seconds."""
        now = time.time()
        seconds, self.mark = now - self.mark, now
        if result.finite:
            self.sums = result.sums if self.sums is None else self.sums + result.sums
            self.tokens += result.pair_tokens
            self.seconds += seconds
            self.last = (step, result)
        return seconds

    @property
    def empty(self) -> bool:
        return self.last is None

    def row(self, run: Run, t0: float) -> dict:
        """The window's row, as of its last finite step; the window starts afresh."""
        step, result = self.last
        row = {"step": step, "epoch": round(run.plan.epoch_at(step - 1), 4), "time_s": round(time.time() - t0, 3),
               "pair_tokens": self.tokens, **summarize(self.sums, run.cfg.beta),
               "grad_norm": result.grad_norm, "learning_rate": result.lr,
               "tokens_per_s": round(self.tokens / max(self.seconds, 1e-9), 2)}
        self.last_row = row
        self.sums, self.tokens, self.seconds, self.last = None, 0, 0.0, None
        return row

    @staticmethod
    def skipped_row(run: Run, step: int, result: StepResult, seconds: float, t0: float) -> dict:
        """A skipped step's own row: its tokens and its (non-finite) metrics."""
        return {"step": step, "epoch": round(run.plan.epoch_at(step - 1), 4), "time_s": round(time.time() - t0, 3),
                "pair_tokens": result.pair_tokens, **summarize(result.sums, run.cfg.beta),
                "grad_norm": result.grad_norm, "learning_rate": result.lr,
                "tokens_per_s": round(result.pair_tokens / max(seconds, 1e-9), 2), "skipped": True}


def after_step(run: Run, step: int, result: StepResult, log: LogWindow, progress: Progress, stop, t0: float) -> bool:
    """Log, stop on too many non-finite steps, evaluate, save; True when a signal asks to stop (after
    saving a checkpoint)."""
    cfg, engine = run.cfg, run.engine
    seconds = log.add(result, step)
    rows = []
    if (step % run.plan.every(cfg.logging_steps) == 0 or step == run.total_steps) and not log.empty:
        rows.append(log.row(run, t0))  # (as of its last finite step, before a skipped step's own row)
    if not result.finite:
        rows.append(log.skipped_row(run, step, result, seconds, t0))
    for row in rows:
        log_row(run, row)
        progress.update(row["step"], row)
    if not result.finite:
        check_bad_streak(run, step, result.grad_norm)
    if run.eval_pairs and run.plan.due(step, cfg.eval_strategy, cfg.eval_steps) and step < run.total_steps:
        run.eval_last = evaluate(run, step)
        progress.note(eval_line(run.eval_last))
    stop.flag = engine.anyone(stop.flag)  # every process must stop at the same step, whichever got the signal
    if stop.flag and not log.empty:  # the checkpoint ends the window: its row must not be lost
        row = log.row(run, t0)
        log_row(run, row)
        progress.update(row["step"], row)
    if (run.plan.due(step, cfg.save_strategy, cfg.save_steps) and step < run.total_steps) or stop.flag:
        save(run, step, t0)
    return stop.flag


def check_bad_streak(run: Run, step: int, grad_norm: float) -> None:
    run.engine.say(f"step {step}: non-finite loss or gradient (grad_norm={grad_norm}); update skipped "
                   f"({run.bad_streak} in a row)")
    if run.bad_streak >= run.cfg.max_bad_steps:
        kept = ckpt.list_checkpoints(run.ckpt_dir)
        where = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was saved"
        raise UserError(
            f"stopped at step {step}: {run.bad_streak} steps in a row had a NaN/Inf loss or gradient; the weights "
            f"were not updated by them and {where}. Try a lower --lr, --precision fp32 or a smaller --max-length"
        )


def save(run: Run, step: int, t0: float) -> None:
    cfg = run.cfg
    state = {"step": step, "bad_streak": run.bad_streak, "elapsed_s": time.time() - t0,
             "fingerprint": cfg.fingerprint(), "config": cfg.to_dict(), "data": run.data_ids}
    run.engine.save(run.ckpt_dir, step, run.policy, run.optimizer, run.scheduler, state)


def log_row(run: Run, row: dict) -> None:
    """One metrics row: always to metrics.jsonl (a failed append leaves no half row), and to the trackers."""
    if run.engine.is_main:
        diskio.append_line(run.metrics_path, json.dumps(row))
    run.engine.track(row)


def eval_line(row: dict) -> str:
    def v(key, fmt):  # the value and its bootstrap 95% interval
        ci = row.get(f"eval_{key}_ci")
        return f"{row['eval_' + key]:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")

    return (f"eval @ step {row['step']}: loss {row['eval_loss']:.4f}, nll {v('nll_loss', '.4f')}, "
            f"accuracy {v('rewards/accuracies', '.3f')}, margin {v('rewards/margins', '.4f')}, "
            f"logps chosen {v('logps/chosen', '.3f')} / rejected {v('logps/rejected', '.3f')}")


# ------------------------------------------------------------------------------------------------
# The end.


def finish(run: Run, answers: Answers, step: int, last_row: dict, t0: float) -> RunResult:
    """The last checkpoint, the final evaluation, then the model and the files that describe the run."""
    if step > run.start_step:  # (a redone end, e.g. after a full disk, has its checkpoint already)
        save(run, step, t0)
    if run.eval_pairs:
        run.eval_last = evaluate(run, step)
        run.engine.say(eval_line(run.eval_last))
    model_dir, accuracy, summary = write_outputs(run, answers, step, last_row, t0)
    run.engine.wait()
    run.engine.end()
    return RunResult(run.out, step, last_row, run.eval_last, accuracy, model_dir, run.engine.is_main, summary)


class StopRequested:
    """SIGTERM / SIGINT: finish the current step, save, and exit cleanly (a second signal is fatal)."""

    def __init__(self):
        self.flag = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.flag:
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
