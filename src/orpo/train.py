"""The ORPO training loop, top to bottom, on Accelerate.

    config -> output folder -> data (read, check, tokenize, truncate) -> model (+LoRA) -> optimizer
    -> [resume] -> for each step: micro-batches -> forward -> loss -> backward -> clip -> step
    -> log / evaluate / checkpoint -> final model, metrics, summary

One optimizer step consumes ``batch_size * grad_accum * processes`` pairs. The data order is a pure
function of the seed and the step, so resuming needs no saved iterator and every process knows the
whole step's pairs (hence the step's token and pair totals, which normalise the loss exactly).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import TrainConfig, dump_yaml
from .data import collate
from .data.prepare import prepare_pairs
from .data.batching import nll_tokens
from .data.builtin import builtin_pairs, heldout_pairs, heldout_questions, is_correct
from .errors import UserError
from .evaluate import evaluate_pairs, generate
from .forward import PolicyForward
from .loss import metric_vector, orpo_loss, summarize
from .model import (
    add_lora,
    base_causal_lm,
    count_parameters,
    enable_activation_checkpointing,
    load_model,
    load_tokenizer,
    resolve_model,
)
from .progress import Progress

RUN_FILES = ("metrics.jsonl", "config.yaml", "checkpoints", "model", "adapter", "summary.json", "samples.jsonl")


# ------------------------------------------------------------------------------------------------
# The data order.


@dataclass
class StepPlan:
    """Which pairs each optimizer step uses, and which of them this process runs in which micro-batch.

    Epoch ``e`` visits the pairs in ``permutation(seed + e)``; step ``k`` of the epoch takes the next
    ``global_batch`` of them (the last step of an epoch may be short). Those pairs are split into
    ``grad_accum * world`` near-equal slots; slot ``m * world + rank`` is micro-batch ``m`` of process
    ``rank``.
    """

    n_pairs: int
    batch_size: int
    grad_accum: int
    world: int
    seed: int
    epochs: float
    max_steps: int | None
    _perms: dict = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_pairs / self.global_batch)

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * self.steps_per_epoch))

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.n_pairs)}
        return self._perms[epoch]

    def step_pairs(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._perm(epoch)[k * self.global_batch : (k + 1) * self.global_batch]

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        slots = np.array_split(self.step_pairs(step), self.grad_accum * self.world)
        return [slots[m * self.world + rank] for m in range(self.grad_accum)]

    def epoch_at(self, step: int) -> float:
        """Epochs completed after ``step`` (0-based) finishes."""
        return (step + 1) / self.steps_per_epoch


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based): linear warmup that never uses
    a zero rate, then the schedule over the remaining steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    if kind == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)  # linear


# ------------------------------------------------------------------------------------------------
# Pieces of set-up.


def prepare_output_dir(cfg: TrainConfig, is_main: bool) -> Path:
    out = Path(cfg.output_dir)
    existing = [n for n in RUN_FILES if (out / n).exists()]
    if existing and not (cfg.resume or cfg.overwrite):
        raise UserError(
            f"{out}: already holds a run ({', '.join(existing)}); pass --resume to continue it "
            "or --overwrite to replace it, or choose another --output-dir"
        )
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"{out}: output folder is not writable ({e.strerror or e})") from None
        if cfg.overwrite:
            for n in existing:
                p = out / n
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return out


def load_data(cfg: TrainConfig, tokenizer, say) -> tuple[list, list, dict]:
    """Tokenized train and eval pairs, and the counts reported before training."""
    builtin = cfg.data is None
    common = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, strict=cfg.strict)
    train, stats, report = prepare_pairs(cfg.data, tokenizer, max_rows=cfg.max_rows,
                                         pairs=builtin_pairs(cfg.seed) if builtin else None, **common)
    say(f"train: {report}")
    counts = {"train": stats.as_dict()}
    evals = []
    if cfg.eval_data is not None or builtin:
        evals, stats, report = prepare_pairs(cfg.eval_data, tokenizer, max_rows=cfg.eval_max_rows,
                                             pairs=heldout_pairs(cfg.seed) if builtin and cfg.eval_data is None else None,
                                             label="built-in held-out set" if cfg.eval_data is None else None, **common)
        say(f"eval: {report}")
        counts["eval"] = stats.as_dict()
    return train, evals, counts


def make_optimizer(model, cfg: TrainConfig):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.resolved_lr(), betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    try:
        return torch.optim.AdamW([g for g in groups if g["params"]], fused=True, **kwargs)
    except (RuntimeError, TypeError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW([g for g in groups if g["params"]], **kwargs)


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


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after checkpoint ``step``: the resumed run writes them again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# The run.


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    final_metrics: dict
    eval_metrics: dict
    answer_accuracy: tuple[float, float] | None
    model_dir: Path


def train(cfg: TrainConfig, argv_for_resume: list[str] | None = None) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from accelerate.state import AcceleratorState, GradientState

    # Accelerate keeps its settings in process-wide singletons; a second run in the same process (a
    # notebook, the tests) with another precision must start from a clean slate. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no")
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    say = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)

    out = prepare_output_dir(cfg, is_main)
    accelerator.wait_for_everyone()
    metrics_path, ckpt_dir = out / "metrics.jsonl", out / "checkpoints"
    set_seed(cfg.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)

    # --- model and data -----------------------------------------------------------------------
    t_setup = time.time()
    folder = resolve_model(cfg.model, quiet=not is_main)
    tokenizer = load_tokenizer(folder, cfg.trust_remote_code)
    train_pairs, eval_pairs, data_counts = load_data(cfg, tokenizer, say)
    model = load_model(folder, cfg.trust_remote_code, cfg.allow_pickle)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    if cfg.lora:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target)
    trainable, total = count_parameters(model)
    say(f"model: {folder} ({total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable{', LoRA' if cfg.lora else ''})")
    mode = "blocks" if cfg.attention in ("auto", "blocks") else "mask"
    policy = PolicyForward(model, attention_mode=mode, chunk=cfg.logits_chunk)

    plan = StepPlan(len(train_pairs), cfg.batch_size, cfg.grad_accum, world, cfg.seed, cfg.epochs, cfg.max_steps)
    total_steps = plan.total_steps
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.scheduler))
    policy, optimizer = accelerator.prepare(policy, optimizer)
    pad_id = tokenizer.pad_token_id or 0

    # --- resume ---------------------------------------------------------------------------------
    start_step, bad_streak, elapsed_before = 0, 0, 0.0
    found = ckpt.list_checkpoints(ckpt_dir)
    if cfg.resume and found:
        step_done, path = found[-1]
        state = ckpt.load_checkpoint(path, accelerator.unwrap_model(policy).model, optimizer, scheduler, rank)
        if state.get("fingerprint") != cfg.fingerprint():
            diff = cfg.trajectory_changes(state.get("config", {}))
            raise UserError(
                f"{path}: this checkpoint was made with a different config ({', '.join(diff) or 'unknown fields'} "
                "changed); resume with the same options or start a new --output-dir"
            )
        start_step, bad_streak, elapsed_before = state["step"], state.get("bad_streak", 0), state.get("elapsed_s", 0.0)
        if is_main:
            _truncate_metrics(metrics_path, start_step)
        say(f"resumed from {path} (step {start_step} of {total_steps})")
    elif cfg.resume:
        say(f"{ckpt_dir}: no checkpoint to resume from; starting at step 0")
    if is_main:
        if start_step == 0 and metrics_path.exists():
            metrics_path.unlink()
        dump_yaml(cfg, out / "config.yaml")
        (out / "data_counts.json").write_text(json.dumps(data_counts, indent=1))

    autocast = accelerator.autocast

    def run_eval(step: int) -> dict:
        mine = eval_pairs[rank::world]
        m = evaluate_pairs(
            policy, mine, cfg.beta, cfg.prompt_in_nll, batch_size=max(2, cfg.batch_size * 2),
            prefix_sharing=cfg.prefix_sharing, packing=cfg.packing, pad_id=pad_id, device=device,
            autocast=autocast, reduce=lambda t: accelerator.reduce(t.to(device), "sum").cpu(),
        )
        row = {"step": step, "epoch": round(min(step, total_steps) / plan.steps_per_epoch, 4), **m}
        if is_main:
            _append_jsonl(metrics_path, row)
        return row

    # --- before: greedy answers on held-out prompts -----------------------------------------------
    lm = base_causal_lm(accelerator.unwrap_model(policy).model)
    questions = heldout_questions(seed=cfg.seed) if cfg.data is None else []
    sample_prompts = _sample_prompts(cfg, eval_pairs, train_pairs, tokenizer)
    before_answers = []
    if is_main and start_step == 0 and (questions or sample_prompts):
        before_answers = generate(lm, tokenizer, [q for q, _ in questions] + sample_prompts, max_new_tokens=48, device=device)
    eval_last = {}
    if eval_pairs and start_step == 0:
        eval_last = run_eval(0)
        say(_eval_line(eval_last))
    say(f"setup took {time.time() - t_setup:.1f}s; training {total_steps} steps of {plan.global_batch} pairs "
        f"({len(train_pairs)} pairs, {plan.steps_per_epoch} steps per epoch)")

    # --- the loop -------------------------------------------------------------------------------
    policy.train()
    progress = Progress(total_steps, start_step, enabled=is_main)
    t0 = time.time() - elapsed_before
    last_row: dict = {}
    window = None  # metric sums since the last logged step
    window_tokens, window_start = 0, time.time()
    step = start_step
    stopped_early = False
    with StopRequested() as stop, progress:
        while step < total_steps:
            micro = plan.micro_batches(step, rank)
            step_idx = plan.step_pairs(step)
            nll_norm = float(sum(nll_tokens(train_pairs[i], cfg.prompt_in_nll) for i in step_idx))
            pair_norm = float(len(step_idx))
            step_tokens = sum(train_pairs[i].pair_tokens for i in step_idx)
            vec = torch.zeros(12, dtype=torch.float64)
            for m, idx in enumerate(micro):
                weight = 1.0
                if len(idx) == 0:  # a short last step: keep every process in lockstep, add nothing
                    idx, weight = step_idx[:1], 0.0
                batch = collate([train_pairs[i] for i in idx], cfg.prefix_sharing, cfg.packing, cfg.prompt_in_nll, pad_id).to(device)
                sync = accelerator.no_sync(policy) if (world > 1 and m < len(micro) - 1) else _nullcontext()
                with sync:
                    with autocast():
                        logps = policy(batch)
                    part = orpo_loss(logps, batch.pair, batch.kind, batch.n_pairs, cfg.beta, cfg.prompt_in_nll, nll_norm, pair_norm)
                    # DDP averages gradients over processes; our loss is already a global mean.
                    accelerator.backward(part.loss * (weight * world))
                if weight:
                    vec += metric_vector(part, batch.n_pairs)
            grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            vec_all = accelerator.reduce(vec.to(device), "sum").cpu() if world > 1 else vec
            finite = math.isfinite(grad_norm) and bool(torch.isfinite(vec_all).all())
            lr_now = scheduler.get_last_lr()[0]
            if finite:
                optimizer.step()
                bad_streak = 0
            else:
                bad_streak += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1

            if finite:
                window = vec_all if window is None else window + vec_all
            window_tokens += step_tokens
            if not finite or step % cfg.logging_steps == 0 or step == total_steps:
                now = time.time()
                row = {"step": step, "epoch": round(plan.epoch_at(step - 1), 4), "time_s": round(now - t0, 3),
                       "pair_tokens": step_tokens}
                if window is not None:
                    row.update(summarize(window, cfg.beta))
                row.update({"grad_norm": grad_norm, "learning_rate": lr_now,
                            "tokens_per_s": round(window_tokens / max(now - window_start, 1e-9), 2)})
                if not finite:
                    row["skipped"] = True
                    row.update({k: v for k, v in summarize(vec_all, cfg.beta).items()})
                if is_main:
                    _append_jsonl(metrics_path, row)
                progress.update(step, row)
                last_row = row
                window, window_tokens, window_start = None, 0, now
            if not finite:
                say(f"step {step}: non-finite loss or gradient (grad_norm={grad_norm}); update skipped ({bad_streak} in a row)")
                if bad_streak >= cfg.max_bad_steps:
                    kept = ckpt.list_checkpoints(ckpt_dir)
                    where = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was saved"
                    raise UserError(
                        f"stopped at step {step}: {bad_streak} steps in a row had a NaN/Inf loss or gradient; "
                        f"the weights were not updated by them and {where}. Try a lower --lr, --precision fp32 "
                        "or a smaller --max-length"
                    )

            if eval_pairs and cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps:
                eval_last = run_eval(step)
                progress.note(_eval_line(eval_last))

            if (cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps) or stop.flag:
                _save(ckpt_dir, step, policy, accelerator, optimizer, scheduler, cfg, bad_streak, time.time() - t0, is_main, rank)
            if stop.flag:
                stopped_early = True
                break

    if stopped_early:
        cmd = " ".join(["orpo", "train", *(argv_for_resume or [f"--output-dir {out}"]), "--resume"])
        say(f"stopped by signal after step {step}; checkpoint saved. Resume with:\n  {cmd}")
        raise SystemExit(0 if stop.flag else 1)

    # --- the end: final eval, model, summary -----------------------------------------------------
    _save(ckpt_dir, step, policy, accelerator, optimizer, scheduler, cfg, bad_streak, time.time() - t0, is_main, rank)
    if eval_pairs:
        eval_last = run_eval(step)
        say(_eval_line(eval_last))
    accuracy = None
    if is_main:
        model_dir = _save_final(out, accelerator.unwrap_model(policy).model, tokenizer, cfg)
        after_answers = []
        if questions or sample_prompts:
            lm = base_causal_lm(accelerator.unwrap_model(policy).model)
            after_answers = generate(lm, tokenizer, [q for q, _ in questions] + sample_prompts, max_new_tokens=48, device=device)
        if questions and before_answers:
            n = len(questions)
            acc_b = sum(is_correct(a, q[1]) for a, q in zip(before_answers[:n], questions)) / n
            acc_a = sum(is_correct(a, q[1]) for a, q in zip(after_answers[:n], questions)) / n
            accuracy = (acc_b, acc_a)
        _write_samples(out, tokenizer, questions, sample_prompts, before_answers, after_answers)
        summary = {
            "steps": step, "time_s": round(time.time() - t0, 2), "final": last_row, "eval": eval_last,
            "data": data_counts, "answer_accuracy": accuracy, "model_dir": str(model_dir),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        from .report import write_report_safe  # issue 5: OUT/report.html; a failure only warns

        write_report_safe(out, say)
    else:
        model_dir = out / "model"
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(out, step, last_row, eval_last, accuracy, model_dir)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _eval_line(row: dict) -> str:
    return (f"eval @ step {row['step']}: loss {row['eval_loss']:.4f}, nll {row['eval_nll_loss']:.4f}, "
            f"accuracy {row['eval_rewards/accuracies']:.3f}, margin {row['eval_rewards/margins']:.4f}, "
            f"logps chosen {row['eval_logps/chosen']:.3f} / rejected {row['eval_logps/rejected']:.3f}")


def _save(ckpt_dir, step, policy, accelerator, optimizer, scheduler, cfg, bad_streak, elapsed, is_main, rank):
    state = {"step": step, "bad_streak": bad_streak, "elapsed_s": elapsed, "fingerprint": cfg.fingerprint(),
             "config": cfg.to_dict()}
    ckpt.save_checkpoint(ckpt_dir, step, accelerator.unwrap_model(policy).model, optimizer, scheduler, state,
                         is_main, rank, cfg.save_total_limit)


def _save_final(out: Path, model, tokenizer, cfg: TrainConfig) -> Path:
    """OUT/model: full weights that AutoModelForCausalLM loads (LoRA merged); OUT/adapter for LoRA."""
    model_dir = out / "model"
    tmp = out / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora:
        adapter_tmp = out / ".tmp-adapter"
        shutil.rmtree(adapter_tmp, ignore_errors=True)
        model.save_pretrained(adapter_tmp)
        tokenizer.save_pretrained(adapter_tmp)
        shutil.rmtree(out / "adapter", ignore_errors=True)
        os.replace(adapter_tmp, out / "adapter")
        merged = model.merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
    return model_dir


def _sample_prompts(cfg: TrainConfig, eval_pairs, train_pairs, tokenizer) -> list:
    """A few held-out prompts (or training prompts when there is no eval data) for before/after answers."""
    if cfg.eval_samples == 0 or cfg.data is None:
        return []
    src = eval_pairs or train_pairs
    return [p.prompt for p in src[: cfg.eval_samples]]


def _write_samples(out: Path, tokenizer, questions, prompts, before, after) -> None:
    """OUT/samples.jsonl: each held-out prompt with the greedy answer before and after training."""
    rows = []
    for i, (q, answer) in enumerate(questions):
        rows.append({"prompt": q[-1]["content"], "expected": answer, "before": _at(before, i), "after": _at(after, i),
                     "correct_before": is_correct(_at(before, i) or "", answer),
                     "correct_after": is_correct(_at(after, i) or "", answer)})
    n = len(questions)
    for j, p in enumerate(prompts):
        rows.append({"prompt": tokenizer.decode(p), "before": _at(before, n + j), "after": _at(after, n + j)})
    with open(out / "samples.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def _at(xs: list, i: int):
    return xs[i] if i < len(xs) else None
