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
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import diskio, resume, runlock
from .answers import answer_summary, sample_marks
from .config import TRACKERS, TrainConfig, dump_yaml, report_targets
from .data.prepare import Rows, check_strict, check_usable, report_line, scan_rows, tokenize_rows
from .data.store import TokenStore
from .data.builtin import HELDOUT_LABEL, builtin_pairs, heldout_pairs, heldout_questions
from .data.chat_templates import set_chat_template
from .errors import UserError
from .evaluate import evaluate_pairs, generate, lockstep_batches, write_pair_values
from .export import write_model_card
from .report import write_report_safe
from .forward import PolicyForward
from .support import choose_paths
from .loss import metric_vector, orpo_loss, summarize
from .model import (
    add_lora,
    apply_liger,
    base_causal_lm,
    check_4bit,
    check_model_source,
    compile_layers,
    count_parameters,
    disable_dropout,
    enable_activation_checkpointing,
    lean_activations,
    load_model,
    load_tokenizer,
    loading_options,
    resolve_model,
)
from .optim import check_optimizer, make_optimizer, optimizer_summary
from .progress import Progress

RUN_FILES = ("metrics.jsonl", "config.yaml", "checkpoints", "model", "adapter", "summary.json", "samples.jsonl",
             "data_counts.json", "export", "report.html", "eval_pairs.jsonl", resume.BEFORE)


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
    inside = cfg.resume_from is not None and out.resolve() in Path(cfg.resume_from).resolve().parents
    if existing and not (cfg.resume or cfg.overwrite or inside):
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
    return out


def check_trackers(cfg: TrainConfig) -> list[str]:
    """The trackers asked for, each checked to be installed before any heavy work."""
    import importlib.util

    names = report_targets(cfg)
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--report-to {name}: the {package} package is not installed; run: pip install {package}")
    return names


def clear_previous_run(out: Path) -> None:
    """--overwrite: remove the old run's files. Called only once data and model have loaded, so a
    mistake in the new command never costs the old run."""
    for n in RUN_FILES:
        p = out / n
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def read_data(cfg: TrainConfig) -> tuple[Rows, Rows | None]:
    """Read and check every training and eval row; no tokenizer needed, so this runs before any heavy
    work and a bad row fails in seconds."""
    builtin = cfg.data is None
    train = scan_rows(cfg.data, cfg.max_rows, cfg.shuffle_seed, builtin_pairs(cfg.seed) if builtin else None,
                      columns=cfg.columns)
    evals = None
    if cfg.eval_data is not None:
        evals = scan_rows(cfg.eval_data, cfg.eval_max_rows, columns=cfg.columns)
    elif builtin:
        evals = scan_rows(None, pairs=heldout_pairs(cfg.seed), label=HELDOUT_LABEL)
    for rows in (train, evals):
        if rows is not None:
            check_strict(rows.name, rows.skips, cfg.strict)
    return train, evals


def tokenize_data(cfg: TrainConfig, tokenizer, rows: Rows | None, say, tag: str) -> tuple[TokenStore | None, dict]:
    if rows is None:
        return None, {}
    store, stats = tokenize_rows(rows, tokenizer, cfg.max_length, cfg.max_prompt_length, num_proc=cfg.dataset_num_proc,
                                 max_completion_length=cfg.max_completion_length, truncation_mode=cfg.truncation_mode)
    check_usable(rows.name, store, stats, cfg.strict)
    say(f"{tag}: {report_line(rows.name, stats)}")
    return store, stats.as_dict()


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


def _log(accelerator, path: Path, row: dict, is_main: bool) -> None:
    """One metrics row: always to metrics.jsonl, and to the trackers if any."""
    if is_main:
        _append_jsonl(path, row)
    if accelerator.trackers:
        accelerator.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=row["step"])


def _append_jsonl(path: Path, row: dict) -> None:
    diskio.append_line(path, json.dumps(row))  # a failed append leaves no half row


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
    diskio.write_text(path, "".join(line + "\n" for line in keep), path.name)


# ------------------------------------------------------------------------------------------------
# The run.


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
    """The run below, holding the output folder's lock (main process only: ``RANK`` 0, set by torchrun
    and accelerate before Accelerate starts); a failed write ends it in one line with the resume command."""
    is_main = int(os.environ.get("RANK", "0")) == 0
    with runlock.output_lock(Path(cfg.output_dir), enabled=is_main):
        try:
            return _train(cfg, argv_for_resume)
        except (diskio.WriteFailed, OSError) as e:
            failure = resume.write_failure(e, Path(cfg.output_dir), cfg.overwrite, argv_for_resume, is_main)
            if failure is None:
                raise
            raise failure from None


def _train(cfg: TrainConfig, argv_for_resume: list[str] | None = None) -> RunResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType, set_seed

    # Accelerate keeps its settings in process-wide singletons; a second run in the same process (a
    # notebook, the tests) with another precision must start from a clean slate. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # Several processes without CUDA (torchrun / accelerate launch on CPUs): Accelerate needs cpu=True
    # to set up gloo instead of trying a GPU backend.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # DeepSpeed runs the accumulation itself (it steps at the boundary inside backward), so it must know
    # the number of micro-batches; every other engine leaves accumulation to this loop.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    trackers = check_trackers(cfg)
    if cfg.load_in_4bit:
        check_4bit()
    check_optimizer(cfg)
    accelerator = Accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no", cpu=multi_cpu,
                              log_with=trackers or None, project_dir=cfg.output_dir if trackers else None,
                              gradient_accumulation_steps=cfg.grad_accum if deepspeed else 1)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    sharded = _is_sharded(accelerator)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    device = accelerator.device
    say = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    if multi_cpu and any(os.environ.get(v, "false").lower() == "true" for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")):
        say("note: FSDP and DeepSpeed need GPUs; on CPUs this runs as plain data parallel (gloo), same maths")

    out = prepare_output_dir(cfg, is_main)
    accelerator.wait_for_everyone()
    metrics_path, ckpt_dir = out / "metrics.jsonl", out / "checkpoints"
    set_seed(cfg.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    if device.type == "cuda":
        # cuDNN's SDPA builds a graph for every new sequence shape; packed rows change shape every step,
        # which made each step 2-3x slower on an H100. Flash and memory-efficient SDPA have no such cost.
        torch.backends.cuda.enable_cudnn_sdp(False)

    # --- model and data -----------------------------------------------------------------------
    t_setup = time.time()
    check_model_source(cfg.model)
    train_rows, eval_rows = read_data(cfg)
    folder = resolve_model(cfg.model, quiet=not is_main)
    tokenizer = load_tokenizer(folder, cfg.trust_remote_code)
    set_chat_template(tokenizer, cfg.chat_template, say)
    with accelerator.main_process_first():  # the others then read the main process's token cache
        train_pairs, train_counts = tokenize_data(cfg, tokenizer, train_rows, say, "train")
        eval_pairs, eval_counts = tokenize_data(cfg, tokenizer, eval_rows, say, "eval")
    data_counts = {"train": train_counts, **({"eval": eval_counts} if eval_counts else {})}
    model = load_model(folder, cfg.trust_remote_code, cfg.allow_pickle, load_in_4bit=cfg.load_in_4bit,
                       **loading_options(cfg))
    if cfg.liger:
        apply_liger(model)
    if not cfg.keep_dropout:
        disable_dropout(model)
    paths = choose_paths(model, cfg, device, say)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    elif (cfg.lean_activations if cfg.lean_activations is not None else device.type == "cpu") \
            and not (cfg.liger or cfg.compile or sharded):
        lean_activations(model)
    model.config.use_cache = False
    if cfg.lora:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target)
    if cfg.compile:
        compile_layers(model)
    trainable, total = count_parameters(model)
    say(f"model: {folder} ({total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable{', LoRA' if cfg.lora else ''})")
    policy = forward = PolicyForward(model, paths, chunk=cfg.logits_chunk)

    data_seed = cfg.shuffle_seed if cfg.shuffle_seed is not None else cfg.seed
    plan = StepPlan(len(train_pairs), cfg.batch_size, cfg.grad_accum, world, data_seed, cfg.epochs, cfg.max_steps)
    total_steps = plan.total_steps
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    optimizer = make_optimizer(model, cfg)  # (--bf16-weights: casts the model to bf16 first)
    say(optimizer_summary(optimizer, cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.scheduler))
    if deepspeed:
        _configure_deepspeed(accelerator, policy, cfg)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    pad_id = tokenizer.pad_token_id or 0

    # --- resume ---------------------------------------------------------------------------------
    start_step, bad_streak, elapsed_before = 0, 0, 0.0
    if cfg.resume_from:  # a checkpoint named by the user: it must load, or the run stops in one line
        point = ckpt.resume_point(ckpt_dir, False, cfg.resume_from)
        path, damaged = (point[1] if point else None), []
    else:
        path, damaged = resume.pick_checkpoint(ckpt_dir, is_main) if cfg.resume else (None, [])
    if path is not None:
        if damaged:
            say(resume.damaged_line(path, damaged))
        saved = json.loads((path / "state.json").read_text())
        if saved.get("fingerprint") != cfg.fingerprint(saved.get("config")):
            diff = cfg.trajectory_changes(saved.get("config", {}))
            raise UserError(
                f"{path}: this checkpoint was made with a different config ({', '.join(diff) or 'unknown fields'} "
                "changed); resume with the same options or start a new --output-dir"
            )
        done = resume.finished_summary(out, saved["step"], total_steps) if not damaged else None
        if done is not None:  # nothing left to do: leave every file as it is
            say(f"{out}: this run is finished ({saved['step']} of {total_steps} steps; model and summary written), so "
                "there is nothing to resume. To train it longer, pass a larger --max-steps with --resume")
            if is_main and not (out / "report.html").exists():
                write_report_safe(out, say)
            acc = done.get("answer_accuracy")
            return RunResult(out, saved["step"], done.get("final") or {}, done.get("eval") or {},
                             tuple(acc) if acc else None, Path(done.get("model_dir") or out / "model"), is_main)
        if sharded:
            state = ckpt.load_sharded_checkpoint(path, accelerator, scheduler)
        else:
            state = ckpt.load_checkpoint(path, accelerator.unwrap_model(policy).model, optimizer, scheduler, rank)
        start_step, bad_streak, elapsed_before = state["step"], state.get("bad_streak", 0), state.get("elapsed_s", 0.0)
        # --max-steps may differ from the interrupted run's (it is allowed to: extending a run); the
        # saved learning rate belongs to the old schedule, so set the rate of the next step afresh.
        factor = lr_factor(start_step, total_steps, warmup, cfg.scheduler)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * factor
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        if is_main:
            resume.set_aside(damaged)
            if cfg.resume_from:
                ckpt.carry_metrics(path, metrics_path)
            _truncate_metrics(metrics_path, start_step)
            if start_step >= total_steps:  # only the end is left to redo; it evaluates again
                resume.drop_final_eval(metrics_path, start_step)
        say(f"resumed from {path} (step {start_step} of {total_steps})")
    elif cfg.resume:
        say(f"{ckpt_dir}: no checkpoint to resume from; starting at step 0")
    if is_main:
        if cfg.overwrite:
            clear_previous_run(out)
        if start_step == 0 and metrics_path.exists():
            metrics_path.unlink()
        with diskio.writing(out / "config.yaml"):
            dump_yaml(cfg, out / "config.yaml")
        diskio.write_text(out / "data_counts.json", json.dumps(data_counts, indent=1))
    if trackers:
        accelerator.init_trackers("orpo", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                  for k, v in cfg.to_dict().items()})

    autocast = accelerator.autocast

    def run_eval(step: int) -> dict:
        mine = eval_pairs[rank::world] if eval_pairs is not None else []
        bs = max(2, cfg.batch_size * 2)
        m, values = evaluate_pairs(
            policy, mine, cfg.beta, cfg.prompt_in_nll, batch_size=bs,
            collate_fn=forward.collate, pad_id=pad_id, device=device,
            autocast=autocast, reduce=lambda t: accelerator.reduce(t.to(device), "sum").cpu(),
            n_batches=lockstep_batches(len(eval_pairs), world, bs), pad_pair=eval_pairs[0],  # same forwards everywhere
            positions=range(rank, len(eval_pairs), world), n_total=len(eval_pairs), keep_values=True,
        )
        row = {"step": step, "epoch": round(min(step, total_steps) / plan.steps_per_epoch, 4), **m}
        _log(accelerator, metrics_path, row, is_main)
        if is_main:  # every pair's own values, for paired comparisons across runs (orpo compare)
            write_pair_values(out / "eval_pairs.jsonl", step, eval_pairs, values)
        return row

    # --- before: greedy answers on held-out prompts -----------------------------------------------
    lm = base_causal_lm(accelerator.unwrap_model(policy).model)
    questions = heldout_questions(seed=cfg.seed) if cfg.data is None else []
    sample_prompts = _sample_prompts(cfg, eval_pairs, train_pairs, tokenizer)
    before_answers = []
    # (Sharded weights cannot generate on one process alone: its forward would wait for the others.)
    if is_main and start_step == 0 and (questions or sample_prompts) and not sharded:
        before_answers = generate(lm, tokenizer, [q for q, _ in questions] + sample_prompts, max_new_tokens=48, device=device)
        resume.save_before(out, [q for q, _ in questions] + sample_prompts, before_answers)
    elif is_main and start_step:  # a resumed run keeps the answers of its step 0
        before_answers = resume.load_before(out, [q for q, _ in questions] + sample_prompts)
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
    last_row: dict = resume.last_train_row(metrics_path) if start_step and is_main else {}
    window = None  # metric sums since the last logged step
    window_tokens, window_start = 0, time.time()
    step = start_step
    stopped_early = False
    with StopRequested() as stop, progress:
        while step < total_steps:
            micro = plan.micro_batches(step, rank)
            step_idx = plan.step_pairs(step)
            nll_norm = float(train_pairs.nll_tokens(step_idx, cfg.prompt_in_nll))
            pair_norm = float(len(step_idx))
            step_tokens = train_pairs.pair_tokens(step_idx)
            vec = torch.zeros(12, dtype=torch.float64, device=device)
            for m, idx in enumerate(micro):
                weight = 1.0
                if len(idx) == 0:  # a short last step: keep every process in lockstep, add nothing
                    idx, weight = step_idx[:1], 0.0
                batch = forward.collate([train_pairs[i] for i in idx], cfg.prompt_in_nll, pad_id).to(device)
                last = m == len(micro) - 1
                sync = accelerator.no_sync(policy) if (world > 1 and not last and not deepspeed) else nullcontext()
                with sync:
                    with autocast():
                        logps = policy(batch)
                    part = orpo_loss(logps, batch.pair, batch.kind, batch.n_pairs, cfg.beta, cfg.prompt_in_nll, nll_norm, pair_norm)
                    # DDP/FSDP/DeepSpeed average gradients over processes, and DeepSpeed also divides by
                    # the accumulation steps; our loss is already the step's global mean, so undo both.
                    scale = weight * world * (cfg.grad_accum if deepspeed else 1)
                    if deepspeed:
                        accelerator.gradient_state._set_sync_gradients(last)
                    accelerator.backward(part.loss * scale)
                if weight:
                    vec += metric_vector(part, batch.n_pairs)
            norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            if world > 1:
                vec = accelerator.reduce(vec, "sum")
            # The one host-device synchronisation of the step: the sums and the norm come back together,
            # and the finiteness check needs them before the optimizer may step.
            # (DeepSpeed has already stepped inside backward and reports no norm when it computed none;
            # it skips a step whose gradients are not finite itself and then reports an infinite norm.)
            norm_known = norm is not None or not deepspeed
            norm = torch.as_tensor(float("nan") if norm is None else norm, device=device, dtype=torch.float64)
            back = torch.cat([vec, norm.reshape(1).double()]).cpu()
            vec_all, grad_norm = back[:-1], float(back[-1])
            finite = (math.isfinite(grad_norm) or not norm_known) and bool(torch.isfinite(vec_all).all())
            lr_now = scheduler.get_last_lr()[0]
            if finite:
                optimizer.step()
                bad_streak = 0
            else:
                bad_streak += 1
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # after a skipped update torch warns; the schedule follows steps
                warnings.simplefilter("ignore", UserWarning)
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
                _log(accelerator, metrics_path, row, is_main)
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

            if world > 1:  # every process must stop at the same step, whichever got the signal
                flag = torch.tensor([float(stop.flag)], device=device)
                stop.flag = bool(accelerator.reduce(flag, "max").item())
            if (cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps) or stop.flag:
                _save(ckpt_dir, step, policy, accelerator, optimizer, scheduler, cfg, bad_streak, time.time() - t0, is_main, rank)
            if stop.flag:
                stopped_early = True
                break

    if stopped_early:
        cmd = resume.resume_command(out, cfg.overwrite, argv_for_resume)
        say(f"stopped by signal after step {step}; checkpoint saved. Resume with:\n  {cmd}")
        accelerator.end_training()
        return RunResult(out, step, last_row, eval_last, None, out / "model", is_main, stopped=True)

    # --- the end: final eval, model, summary -----------------------------------------------------
    if step > start_step:  # (a redone end, e.g. after a full disk, has its checkpoint already)
        _save(ckpt_dir, step, policy, accelerator, optimizer, scheduler, cfg, bad_streak, time.time() - t0, is_main, rank)
    if eval_pairs:
        eval_last = run_eval(step)
        say(_eval_line(eval_last))
    accuracy, answers = None, None
    # Sharded engines hold pieces of the weights on every process: gather them (a collective call).
    full_state = None
    if sharded:
        full_state = {k[len("model."):]: v for k, v in accelerator.get_state_dict(policy).items() if k.startswith("model.")}
    if is_main:
        with diskio.writing(out / "model", "the final model", cleanup=(out / ".tmp-model", out / ".tmp-adapter")):
            diskio.check_free(out / "model", ckpt.model_bytes(accelerator.unwrap_model(policy).model, full_state), "the final model")
            model_dir = _save_final(out, accelerator.unwrap_model(policy).model, tokenizer, cfg, folder, full_state)
        after_answers = []
        if (questions or sample_prompts) and not sharded:
            lm = base_causal_lm(accelerator.unwrap_model(policy).model)
            after_answers = generate(lm, tokenizer, [q for q, _ in questions] + sample_prompts, max_new_tokens=48, device=device)
        if questions and before_answers:
            n = len(questions)
            answers = answer_summary(questions, before_answers[:n], after_answers[:n])
            accuracy = (answers["exact_before"], answers["exact_after"])
        _write_samples(out, tokenizer, questions, sample_prompts, before_answers, after_answers)
        summary = {
            "steps": step, "time_s": round(time.time() - t0, 2), "final": last_row, "eval": eval_last,
            "data": data_counts, "answer_accuracy": accuracy, "answers": answers,
            "model_dir": str(model_dir), "paths": {**paths.as_dict(), "line": paths.line()},
        }
        diskio.write_text(out / "summary.json", json.dumps(summary, indent=1))
        with diskio.writing(model_dir / "README.md", "the model card"):
            write_model_card(model_dir, out)
        with diskio.writing(out / "report.html", "the report"):
            write_report_safe(out, say)  # OUT/report.html; a plotting failure only warns, a full disk stops
    else:
        model_dir = out / "model"
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(out, step, last_row, eval_last, accuracy, model_dir, is_main, answers)


def _configure_deepspeed(accelerator, policy: PolicyForward, cfg: TrainConfig) -> None:
    """Settings DeepSpeed needs before ``prepare``: Accelerate reads the micro-batch size from a
    dataloader, and this loop has none (it batches pairs itself); clipping is DeepSpeed's to do, with our
    --max-grad-norm. Under ZeRO-3 the lm-head weight is partitioned outside the head's own forward,
    and our chunked log-prob reads it directly, so DeepSpeed must gather it for the whole forward."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_clipping"] = cfg.max_grad_norm
    if int(ds.get("zero_optimization", {}).get("stage", 0)) == 3 and policy.plain_head:
        import deepspeed

        head = base_causal_lm(policy.model).get_output_embeddings()
        for p in (head.weight, head.bias):
            if p is not None:
                deepspeed.zero.register_external_parameter(policy, p)


def _eval_line(row: dict) -> str:
    def v(key, fmt):  # the value and its bootstrap 95% interval
        ci = row.get(f"eval_{key}_ci")
        return f"{row['eval_' + key]:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")

    return (f"eval @ step {row['step']}: loss {row['eval_loss']:.4f}, nll {v('nll_loss', '.4f')}, "
            f"accuracy {v('rewards/accuracies', '.3f')}, margin {v('rewards/margins', '.4f')}, "
            f"logps chosen {v('logps/chosen', '.3f')} / rejected {v('logps/rejected', '.3f')}")


def _is_sharded(accelerator) -> bool:
    """FSDP and DeepSpeed hold a shard of the weights on each process."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _save(ckpt_dir, step, policy, accelerator, optimizer, scheduler, cfg, bad_streak, elapsed, is_main, rank):
    state = {"step": step, "bad_streak": bad_streak, "elapsed_s": elapsed, "fingerprint": cfg.fingerprint(),
             "config": cfg.to_dict()}
    if _is_sharded(accelerator):
        ckpt.save_sharded_checkpoint(ckpt_dir, step, accelerator, scheduler, state, cfg.save_total_limit)
        return
    ckpt.save_checkpoint(ckpt_dir, step, accelerator.unwrap_model(policy).model, optimizer, scheduler, state,
                         is_main, rank, cfg.save_total_limit)


def _save_final(out: Path, model, tokenizer, cfg: TrainConfig, folder: Path, state_dict: dict | None = None) -> Path:
    """OUT/model: full weights that AutoModelForCausalLM loads (LoRA merged); OUT/adapter for LoRA.

    ``state_dict`` is the gathered state of a sharded (FSDP/DeepSpeed) run. A 4-bit (QLoRA) or sharded
    LoRA run is merged into a fresh full-precision copy of the base model, never into rounded weights.
    """
    model_dir = out / "model"
    tmp = out / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora:
        adapter_tmp = out / ".tmp-adapter"
        shutil.rmtree(adapter_tmp, ignore_errors=True)
        model.save_pretrained(adapter_tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(adapter_tmp)
        shutil.rmtree(out / "adapter", ignore_errors=True)
        os.replace(adapter_tmp, out / "adapter")
        if cfg.load_in_4bit or state_dict is not None:
            from peft import PeftModel

            dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
            if state_dict is not None:  # ZeRO-3 would partition this fresh copy across processes at load
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
            base = load_model(folder, cfg.trust_remote_code, cfg.allow_pickle, dtype=dtype)
            merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
        else:
            merged = model.merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
    elif state_dict is not None:
        base_causal_lm(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
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
        mb, ma = (sample_marks(_at(xs, i), answer, q[-1]["content"]) for xs in (before, after))
        rows.append({"prompt": q[-1]["content"], "expected": answer, "before": _at(before, i), "after": _at(after, i),
                     "correct_before": mb["exact"], "correct_after": ma["exact"],
                     "content_before": mb["content"], "content_after": ma["content"]})
    n = len(questions)
    for j, p in enumerate(prompts):
        rows.append({"prompt": tokenizer.decode(p), "before": _at(before, n + j), "after": _at(after, n + j)})
    diskio.write_text(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _at(xs: list, i: int):
    return xs[i] if i < len(xs) else None
