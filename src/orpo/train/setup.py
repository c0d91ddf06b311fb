"""Set-up of a run, in the order that loses least when something is wrong: the output folder, the
trackers and the optimizer's package are checked, and every data row read and checked, before the
model loads; then the tokenizer, the model, LoRA, the fast paths proven for the model as it will
train, the optimizer and its schedule; then the checkpoint to resume from, if any. Only after all of
that does ``--overwrite`` remove an old run's files, so a mistake in the new command never costs the
old run."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import diskio, recompute, resume
from ..config import TRACKERS, TrainConfig, dump_yaml, report_targets
from ..data.builtin import HELDOUT_LABEL, builtin_pairs, heldout_pairs
from ..data.chat_templates import set_chat_template
from ..data.prepare import Rows, check_strict, check_usable, report_line, scan_rows, tokenize_rows
from ..data.store import TokenStore
from ..errors import UserError
from ..forward import Paths, PolicyForward
from ..image_forward import ImagePath, run_processor
from ..model import (
    add_lora,
    apply_liger,
    base_causal_lm,
    check_4bit,
    check_model_source,
    compile_layers,
    count_parameters,
    disable_dropout,
    enable_activation_checkpointing,
    load_model,
    load_tokenizer,
    loading_options,
    resolve_model,
)
from ..lean import lean_activations
from ..multimodal import decoder_layers, text_config
from ..optim import check_optimizer, make_optimizer, optimizer_summary
from ..router import RouterLoss, router_loss_coef
from ..support import choose_paths
from .engine import Engine
from .plan import StepPlan, lr_factor

RUN_FILES = ("metrics.jsonl", "config.yaml", "checkpoints", "model", "adapter", "summary.json", "samples.jsonl",
             "data_counts.json", "export", "report.html", "eval_pairs.jsonl", resume.BEFORE)


@dataclass
class Run:
    """Everything the loop needs, built by :func:`set_up`; ``start_step`` onwards change as it runs."""

    cfg: TrainConfig
    engine: Engine
    out: Path
    folder: Path  # the model folder (resolved from a GGUF or a hub name)
    tokenizer: object
    train_pairs: TokenStore
    eval_pairs: TokenStore | None
    data_counts: dict
    paths: Paths
    forward: PolicyForward  # the unwrapped policy (its collate); ``policy`` is the engine's wrapped one
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    plan: StepPlan
    warmup: int
    t_setup: float
    start_step: int = 0
    bad_streak: int = 0  # non-finite steps in a row
    elapsed_before: float = 0.0  # training seconds before a resume
    eval_last: dict = field(default_factory=dict)
    router: RouterLoss | None = None  # the MoE router loss, where the model's config turns it on
    data_ids: dict = field(default_factory=dict)  # 'train'/'eval' -> content id, kept in each checkpoint
    data_names: dict = field(default_factory=dict)  # 'train'/'eval' -> the source as messages name it

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0


def check_environment(cfg: TrainConfig) -> list[str]:
    """What can be checked before Accelerate starts: the trackers asked for are installed, 4-bit loading
    and the optimizer can run here. Returns the trackers' names."""
    names = report_targets(cfg)
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--report-to {name}: the {package} package is not installed; run: pip install {package}")
    if cfg.load_in_4bit:
        check_4bit()
    check_optimizer(cfg)
    return names


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


def tokenize_data(cfg: TrainConfig, tokenizer, rows: Rows | None, say, tag: str,
                  processor=None) -> tuple[TokenStore | None, dict]:
    if rows is None:
        return None, {}
    store, stats = tokenize_rows(rows, tokenizer, cfg.max_length, cfg.max_prompt_length, num_proc=cfg.dataset_num_proc,
                                 max_completion_length=cfg.max_completion_length, truncation_mode=cfg.truncation_mode,
                                 processor=processor)
    check_usable(rows.name, store, stats, cfg.strict)
    say(f"{tag}: {report_line(rows.name, stats)}")
    return store, stats.as_dict()


def image_processor(cfg: TrainConfig, folder: Path, tokenizer, *rows: Rows | None):
    """The model's processor where the data holds image pairs (None otherwise), after checking that the
    model takes images; --chat-template applies to it too."""
    with_images = [r for r in rows if r is not None and r.images]
    if not with_images:
        return None
    return run_processor(folder, tokenizer, with_images[0].name, cfg.trust_remote_code, cfg.chat_template)


def set_up(cfg: TrainConfig, engine: Engine) -> Run:
    """Output folder, data, model, fast paths, LoRA, optimizer, schedule; the engine's ``prepare``."""
    from accelerate.utils import set_seed

    say, device = engine.say, engine.device
    out = prepare_output_dir(cfg, engine.is_main)
    engine.wait()
    set_seed(cfg.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    if device.type == "cuda":
        # cuDNN's SDPA builds a graph for every new sequence shape; packed rows change shape every step,
        # which made each step 2-3x slower on an H100. Flash and memory-efficient SDPA have no such cost.
        torch.backends.cuda.enable_cudnn_sdp(False)

    t_setup = time.time()
    check_model_source(cfg.model)
    train_rows, eval_rows = read_data(cfg)
    folder = resolve_model(cfg.model, quiet=not engine.is_main)
    tokenizer = load_tokenizer(folder, cfg.trust_remote_code)
    set_chat_template(tokenizer, cfg.chat_template, say)
    processor = image_processor(cfg, folder, tokenizer, train_rows, eval_rows)
    with engine.main_first():  # the others then read the main process's token cache
        train_pairs, train_counts = tokenize_data(cfg, tokenizer, train_rows, say, "train", processor)
        eval_pairs, eval_counts = tokenize_data(cfg, tokenizer, eval_rows, say, "eval", processor)
    data_counts = {"train": train_counts, **({"eval": eval_counts} if eval_counts else {})}
    sources = {"train": train_rows, "eval": eval_rows}
    data_ids = {k: r.content for k, r in sources.items() if r is not None}
    for k, counts in data_counts.items():
        counts["content"] = data_ids.get(k, "")

    model = load_model(folder, cfg.trust_remote_code, cfg.allow_pickle, load_in_4bit=cfg.load_in_4bit,
                       **loading_options(cfg))
    if cfg.liger:
        apply_liger(model)
    if not cfg.keep_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    elif (cfg.lean_activations if cfg.lean_activations is not None else device.type == "cpu") \
            and not (cfg.liger or cfg.compile or engine.sharded):
        lean_activations(model)
    model.config.use_cache = False
    if cfg.lora:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target, say)
    # the fast paths are proven on the model as it will train: adapters attached, train mode, the run's
    # dtypes; sharded, the model is not moved to one device (docs/proof.md)
    images = ImagePath(model, processor) if processor is not None else None
    paths = choose_paths(model, cfg, device, say, sharded=engine.sharded, images=images)
    if cfg.compile:
        compile_layers(model)
    trainable, total = count_parameters(model)
    say(f"model: {folder} ({total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable{', LoRA' if cfg.lora else ''})")
    forward = PolicyForward(model, paths, chunk=cfg.logits_chunk, images=images)
    budget_recompute(forward, model, cfg, device, train_pairs, say, engine.sharded)
    coef = router_loss_coef(model)
    router = RouterLoss(model, coef) if coef else None
    if router is not None:
        say(f"MoE router loss: {coef:g} x the model's load-balancing loss, added as TRL adds it "
            "(output_router_logits in the model's config)")

    data_seed = cfg.shuffle_seed if cfg.shuffle_seed is not None else cfg.seed
    plan = StepPlan(len(train_pairs), cfg.batch_size, cfg.grad_accum, engine.world, data_seed, cfg.epochs, cfg.max_steps)
    total_steps = plan.total_steps
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    optimizer = make_optimizer(model, cfg)  # (--bf16-weights: casts the model to bf16 first)
    say(optimizer_summary(optimizer, cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.scheduler))
    policy, optimizer = engine.prepare(forward, optimizer)
    return Run(cfg, engine, out, folder, tokenizer, train_pairs, eval_pairs, data_counts, paths, forward, policy,
               optimizer, scheduler, plan, warmup, t_setup, router=router, data_ids=data_ids,
               data_names={k: r.name for k, r in sources.items() if r is not None})


def budget_recompute(forward, model, cfg, device, train_pairs, say, sharded: bool) -> None:
    """Long rows: checkpoint just enough layers for the activations to fit --activation-memory (see
    orpo.recompute). Not with --gradient-checkpointing (every layer already recomputes), --compile, or
    FSDP/DeepSpeed (their wrapping owns the layers)."""
    if cfg.gradient_checkpointing or cfg.compile or sharded or cfg.activation_memory == 0:
        return
    lm = base_causal_lm(model)
    tokens = recompute.largest_micro_batch(train_pairs, cfg.batch_size, forward.paths.prefix_sharing,
                                           forward.paths.packing)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    budget = (int(cfg.activation_memory * recompute.GIB) if cfg.activation_memory
              else recompute.default_budget(device, trained))
    amp = torch.bfloat16 if cfg.precision == "bf16" else None
    forward.paths.recomputed_layers = recompute.plan(forward, decoder_layers(lm), text_config(lm.config), amp, tokens,
                                                     budget, say)


def restore(run: Run) -> dict | None:
    """--resume / --resume-from: load the checkpoint into the run (step, optimizer, schedule, random
    state). Returns the finished run's summary instead when there is nothing left to do."""
    cfg, engine, say = run.cfg, run.engine, run.engine.say
    if cfg.resume_from:  # a checkpoint named by the user: it must load, or the run stops in one line
        point = ckpt.resume_point(run.ckpt_dir, False, cfg.resume_from)
        path, damaged = (point[1] if point else None), []
    else:
        path, damaged = resume.pick_checkpoint(run.ckpt_dir, engine.is_main) if cfg.resume else (None, [])
    if path is None:
        if cfg.resume:
            say(f"{run.ckpt_dir}: no checkpoint to resume from; starting at step 0")
        return None
    if damaged:
        say(resume.damaged_line(path, damaged))
    saved = json.loads((path / "state.json").read_text())
    saved_cfg = saved.get("config", {})
    if saved.get("fingerprint") != cfg.fingerprint(saved_cfg):
        diff = cfg.trajectory_changes(saved_cfg)
        rows_only = resume.memory_data_changes(saved_cfg, cfg.to_dict())
        if not diff or set(diff) - set(rows_only):
            raise UserError(
                f"{path}: this checkpoint was made with a different config ({', '.join(diff) or 'unknown fields'} "
                "changed); resume with the same options or start a new --output-dir"
            )
        # only the rows held in memory differ: a checkpoint from before data ids were kept has the hashes
        # in its config's labels
        saved.setdefault("data", {})
        for k in rows_only:
            saved["data"].setdefault("train" if k == "data" else "eval", f"memory:{saved_cfg[k]}")
    resume.check_data(saved.get("data"), run.data_ids, run.data_names, saved["step"], cfg.allow_data_change, say)
    done = resume.finished_summary(run.out, saved["step"], run.total_steps) if not damaged else None
    if done is not None:  # nothing left to do: leave every file as it is
        run.start_step = saved["step"]
        say(f"{run.out}: this run is finished ({saved['step']} of {run.total_steps} steps; model and summary written), "
            "so there is nothing to resume. To train it longer, pass a larger --max-steps with --resume")
        return done
    state = engine.load(path, run.policy, run.optimizer, run.scheduler)
    run.start_step, run.bad_streak, run.elapsed_before = state["step"], state.get("bad_streak", 0), state.get("elapsed_s", 0.0)
    # --max-steps may differ from the interrupted run's (it is allowed to: extending a run); the saved
    # learning rate belongs to the old schedule, so set the rate of the next step afresh.
    factor = lr_factor(run.start_step, run.total_steps, run.warmup, cfg.scheduler)
    for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs):
        group["lr"] = base * factor
    run.scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]
    if engine.is_main:
        resume.set_aside(damaged)
        if cfg.resume_from:
            ckpt.carry_metrics(path, run.metrics_path)
        truncate_metrics(run.metrics_path, run.start_step)
        if run.start_step >= run.total_steps:  # only the end is left to redo; it evaluates again
            resume.drop_final_eval(run.metrics_path, run.start_step)
    say(f"resumed from {path} (step {run.start_step} of {run.total_steps})")
    return None


def write_run_files(run: Run) -> None:
    """config.yaml and data_counts.json of the run; with --overwrite, the old run's files go first."""
    if not run.engine.is_main:
        return
    if run.cfg.overwrite:
        for n in RUN_FILES:
            p = run.out / n
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if run.start_step == 0 and run.metrics_path.exists():
        run.metrics_path.unlink()
    with diskio.writing(run.out / "config.yaml"):
        dump_yaml(run.cfg, run.out / "config.yaml")
    diskio.write_text(run.out / "data_counts.json", json.dumps(run.data_counts, indent=1))


def truncate_metrics(path: Path, step: int) -> None:
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
