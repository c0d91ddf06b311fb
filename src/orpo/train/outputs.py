"""What a run leaves besides its checkpoints and metrics: greedy answers to held-out prompts before and
after training (samples.jsonl, and the default job's right/wrong summary), the final model (OUT/model,
and OUT/adapter for LoRA), summary.json, the model card and the report."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import diskio, resume
from ..answers import answer_summary, sample_marks
from ..config import TrainConfig
from ..data.builtin import heldout_questions
from ..evaluate import generate
from ..export import write_model_card
from ..model import base_causal_lm, load_model
from ..report import write_report_safe
from .setup import Run

MAX_NEW_TOKENS = 48


class Answers:
    """The held-out prompts a run answers before and after training: the built-in questions of the
    default job (each with its expected answer), or the first ``--eval-samples`` prompts of the data."""

    def __init__(self, run: Run):
        cfg = run.cfg
        self.questions = heldout_questions(seed=cfg.seed) if cfg.data is None else []
        self.prompts: list = []
        if cfg.eval_samples and cfg.data is not None:
            src = run.eval_pairs or run.train_pairs
            self.prompts = [p.prompt for p in src[: cfg.eval_samples]]
        self.before: list[str] = []

    def all_prompts(self) -> list:
        return [q for q, _ in self.questions] + self.prompts

    def answer_before(self, run: Run) -> None:
        """Step 0's answers; a resumed run reads the ones its step 0 saved. (Sharded weights cannot
        generate on one process alone: its forward would wait for the others.)"""
        if not run.engine.is_main:
            return
        if run.start_step == 0:
            if not self.all_prompts() or run.engine.sharded:
                return
            lm = base_causal_lm(run.engine.unwrap(run.policy).model)
            self.before = generate(lm, run.tokenizer, self.all_prompts(), max_new_tokens=MAX_NEW_TOKENS, device=run.engine.device)
            resume.save_before(run.out, self.all_prompts(), self.before)
        else:
            self.before = resume.load_before(run.out, self.all_prompts())

    def answer_after(self, run: Run) -> tuple[tuple[float, float] | None, dict | None]:
        """The answers after training, samples.jsonl, and the default job's summary of them."""
        after = []
        if self.all_prompts() and not run.engine.sharded:
            lm = base_causal_lm(run.engine.unwrap(run.policy).model)
            after = generate(lm, run.tokenizer, self.all_prompts(), max_new_tokens=MAX_NEW_TOKENS, device=run.engine.device)
        accuracy, summary = None, None
        if self.questions and self.before:
            n = len(self.questions)
            summary = answer_summary(self.questions, self.before[:n], after[:n])
            accuracy = (summary["exact_before"], summary["exact_after"])
        self._write_samples(run, after)
        return accuracy, summary

    def _write_samples(self, run: Run, after: list[str]) -> None:
        """OUT/samples.jsonl: each held-out prompt with the greedy answer before and after training."""
        rows, before = [], self.before
        for i, (q, answer) in enumerate(self.questions):
            mb, ma = (sample_marks(_at(xs, i), answer, q[-1]["content"]) for xs in (before, after))
            rows.append({"prompt": q[-1]["content"], "expected": answer, "before": _at(before, i), "after": _at(after, i),
                         "correct_before": mb["exact"], "correct_after": ma["exact"],
                         "content_before": mb["content"], "content_after": ma["content"]})
        n = len(self.questions)
        for j, p in enumerate(self.prompts):
            rows.append({"prompt": run.tokenizer.decode(p), "before": _at(before, n + j), "after": _at(after, n + j)})
        diskio.write_text(run.out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _at(xs: list, i: int):
    return xs[i] if i < len(xs) else None


def write_outputs(run: Run, answers: Answers, step: int, last_row: dict, t0: float) -> tuple:
    """The final model, the answers after training, summary.json, the model card and the report (main
    process; the others only take part in gathering sharded weights). Returns (model folder, answer
    accuracy, answer summary)."""
    out, engine = run.out, run.engine
    full_state = engine.full_state(run.policy)  # a collective call: every process
    if not engine.is_main:
        return out / "model", None, None
    model = engine.unwrap(run.policy).model
    with diskio.writing(out / "model", "the final model", cleanup=(out / ".tmp-model", out / ".tmp-adapter")):
        diskio.check_free(out / "model", ckpt.model_bytes(model, full_state), "the final model")
        model_dir = save_final(out, model, run.tokenizer, run.cfg, run.folder, full_state)
    accuracy, summary = answers.answer_after(run)
    record = {
        "steps": step, "time_s": round(time.time() - t0, 2), "final": last_row, "eval": run.eval_last,
        "data": run.data_counts, "answer_accuracy": accuracy, "answers": summary,
        "model_dir": str(model_dir), "paths": {**run.paths.as_dict(), "line": run.paths.line()},
    }
    diskio.write_text(out / "summary.json", json.dumps(record, indent=1))
    with diskio.writing(model_dir / "README.md", "the model card"):
        write_model_card(model_dir, out)
    with diskio.writing(out / "report.html", "the report"):
        write_report_safe(out, engine.say)  # OUT/report.html; a plotting failure only warns, a full disk stops
    return model_dir, accuracy, summary


def save_final(out: Path, model, tokenizer, cfg: TrainConfig, folder: Path, state_dict: dict | None = None) -> Path:
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
