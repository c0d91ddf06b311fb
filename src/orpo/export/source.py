"""What the user pointed at (a run folder, an adapter, a model folder), loaded and merged; and the merged
safetensors copy that ``AutoModelForCausalLM.from_pretrained`` loads."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..model import default_model_path, load_model, load_tokenizer, resolve_model
from ..modelfiles import check_folder

EXPORT_HINT = "re-download or copy it again, or export another folder"


# ------------------------------------------------------------------------------------------------
# What the user pointed at


@dataclass
class Source:
    path: Path
    run_dir: Path | None = None  # an orpo run folder (config.yaml, summary.json)
    adapter: Path | None = None  # a LoRA adapter folder to merge onto its base
    model_dir: Path | None = None  # a full-weights folder
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """File-name stem for the GGUF: the run's folder name, or the model's."""
        p = self.path.resolve()
        if p.name in ("model", "adapter", "export") and p.parent.name:
            p = p.parent
        name = p.name
        src = _read_json(p / "orpo_source.json") if self.run_dir is None else None
        if src and src.get("gguf"):  # orpo's cached copy of a GGUF: name it after that file, less its quant type
            name = re.sub(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16)$", "", Path(src["gguf"]).stem, flags=re.I)
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _adapter_base(adapter: Path) -> Path | None:
    try:
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    return Path(base) if base else None


def find_source(src: str | Path) -> Source:
    """Classify SRC (an orpo run folder, a LoRA adapter folder, or a plain model folder) and check the
    files that will be loaded (orpo.modelfiles), so a damaged one is refused before anything loads."""
    source = _classify(src)
    if source.adapter is not None:
        check_folder(source.adapter, EXPORT_HINT)
    base = _adapter_base(source.adapter) if source.adapter is not None else None
    if source.model_dir is not None and (base is None or not base.exists()):  # what load_source will load
        check_folder(source.model_dir, EXPORT_HINT)
    return source


def _classify(src: str | Path) -> Source:
    p = Path(src).expanduser()
    if not p.exists():
        raise UserError(f"{p}: not found (pass an orpo run folder, a LoRA adapter folder or a model folder)")
    if not p.is_dir():
        raise UserError(f"{p}: is a file; pass a folder (an orpo run folder, a LoRA adapter or a model folder)")
    if (p / "adapter_config.json").is_file():
        run = p.parent if (p.parent / "config.yaml").is_file() else None
        return Source(p, run_dir=run, adapter=p, model_dir=(run / "model") if run and (run / "model" / "config.json").is_file() else None)
    if (p / "config.json").is_file():
        run = p.parent if p.name == "model" and (p.parent / "config.yaml").is_file() else None
        return Source(p, run_dir=run, model_dir=p)
    if (p / "config.yaml").is_file() and ((p / "model" / "config.json").is_file() or (p / "adapter" / "adapter_config.json").is_file()):
        adapter = p / "adapter" if (p / "adapter" / "adapter_config.json").is_file() else None
        model = p / "model" if (p / "model" / "config.json").is_file() else None
        return Source(p, run_dir=p, adapter=adapter, model_dir=model)
    if (p / "config.yaml").is_file():
        raise UserError(f"{p}: this run has no final model yet (no model/ or adapter/); let it finish or resume it")
    raise UserError(f"{p}: not an orpo run folder, a LoRA adapter folder or a model folder (no config.json)")


def load_source(source: Source, say=print):
    """The full model (LoRA merged) and its tokenizer. A LoRA adapter goes onto its base model when the base
    is on this machine; otherwise a run's merged ``model/`` is used."""
    import torch

    if source.adapter is not None:
        base = _adapter_base(source.adapter)
        if base is not None and base.exists():
            say(f"merging the LoRA adapter {source.adapter} into its base model {base}")
            model = load_model(source.adapter, dtype=torch.float32)
            tok_dir = source.adapter if (source.adapter / "tokenizer_config.json").is_file() else resolve_model(str(base), quiet=True)
            return model, load_tokenizer(tok_dir), base
        if source.model_dir is None:
            raise UserError(f"{source.adapter}: the adapter's base model {base} is not on this machine")
        source.notes.append(f"the adapter's base model {base} is not on this machine; used the run's merged model/")
        say(f"note: {source.notes[-1]}")
    model = load_model(source.model_dir, dtype=torch.float32)
    return model, load_tokenizer(source.model_dir), None


def source_gguf(source: Source, base: Path | None) -> Path | None:
    """The GGUF file the base model was converted from, if orpo converted it (``orpo_source.json``)."""
    candidates = [d for d in (base, source.model_dir, source.adapter and _adapter_base(source.adapter)) if d]
    cfg = _run_config(source.run_dir)
    if cfg is not None:
        m = cfg.get("model")
        if m is None:
            try:
                return default_model_path()
            except UserError:
                pass
        elif str(m).lower().endswith(".gguf") and Path(m).is_file():
            return Path(m)
        elif m:
            candidates.append(Path(m))
    for d in candidates:
        f = Path(d) / "orpo_source.json"
        if f.is_file():
            try:
                g = Path(json.loads(f.read_text())["gguf"])
            except (KeyError, json.JSONDecodeError, TypeError):
                continue
            if g.is_file():
                return g
    return None


def _run_config(run_dir: Path | None) -> dict | None:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------------------
# Merged safetensors


def write_merged(model, tokenizer, dest: Path) -> None:
    """Full weights + tokenizer that ``AutoModelForCausalLM.from_pretrained(dest)`` loads."""
    names = [n for n, _ in model.named_parameters()]
    if any("lora_" in n for n in names):  # pragma: no cover - load_source always merges
        raise RuntimeError("LoRA weights left after merging")
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


