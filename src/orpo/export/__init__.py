"""``orpo export``: merged safetensors weights, a GGUF for llama.cpp / ollama, and a model card.

The source is an orpo run folder (its LoRA adapter on its base model, else ``OUT/model``), a LoRA adapter
folder, or a plain Hugging Face model folder. Everything goes into one output folder:

- ``--merge``: ``model.safetensors`` + ``config.json`` + the tokenizer, LoRA merged (no ``lora`` names);
- ``--gguf``: ``<name>-<type>.gguf`` for Llama-architecture models. llama.cpp's layout differs from
  transformers' in three ways, each handled here: tensor names (``blk.N.attn_q.weight``, from the ``gguf``
  package's name map), the rows of the Q and K projections (llama.cpp rotates interleaved pairs, transformers
  rotates the two halves of each head, so the rows are reordered per head), and an lm-head that is not
  written when it is the embedding matrix. The tokenizer goes in as metadata: copied from the GGUF the base
  model came from when there is one (``orpo_source.json``) and it still matches, else built from
  ``tokenizer.json`` (byte-level BPE only; anything else is refused rather than written wrong);
- ``README.md``: a model card with the base model, the data, the config and the final metrics.

``verify_gguf`` loads a written GGUF back with transformers and compares logits and tokenization with the
model it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..multimodal import loader_name
from ..model import load_model  # noqa: F401 - the old single module exposed it; callers still use it
from .card import model_card, write_model_card
from .gguf import GGUF_TYPES, SUPPORTED_ARCHITECTURES, VERIFY_TEXTS, check_gguf_support, gguf_tensors, tokenizer_metadata, verify_gguf, write_gguf
from .source import Source, _adapter_base, find_source, load_source, source_gguf, write_merged

__all__ = ["ExportResult", "GGUF_TYPES", "SUPPORTED_ARCHITECTURES", "Source", "VERIFY_TEXTS", "check_gguf_support",
           "export", "find_source", "gguf_tensors", "load_source", "model_card", "source_gguf", "tokenizer_metadata",
           "verify_gguf", "write_gguf", "write_merged", "write_model_card"]



@dataclass
class ExportResult:
    dest: Path
    merged: bool = False
    gguf: Path | None = None
    card: Path | None = None
    verification: dict | None = None


def export(src: str | Path, dest: str | Path | None = None, merge: bool = True, gguf: bool = False,
           gguf_type: str = "f16", verify: bool = False, say=print) -> ExportResult:
    """Export SRC into DEST (default ``SRC/export``): merged weights, a GGUF, and a model card."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    source = find_source(src)
    dest = Path(dest).expanduser() if dest else source.path / "export"
    for d in (source.model_dir, source.adapter):
        if d is not None and dest.resolve() == d.resolve():
            raise UserError(f"--output {dest}: is the source folder itself; pick another folder")
    if gguf:
        _check_config_first(source)  # before loading a model that could not be written
    model, tokenizer, base = load_source(source, say=say)
    if gguf:
        check_gguf_support(model.config)  # before writing anything
    result = ExportResult(dest)
    if merge:
        write_merged(model, tokenizer, dest)
        result.merged = True
        say(f"merged weights: {dest}  ({loader_name(dest)}.from_pretrained loads it)")
    if gguf:
        path = dest / f"{source.name}-{gguf_type}.gguf"
        src_gguf = source_gguf(source, base)
        write_gguf(model, tokenizer, path, gguf_type, name=source.name, source_gguf_file=src_gguf, say=say)
        result.gguf = path
        say(f"gguf: {path}")
        if verify:
            v = verify_gguf(path, model, tokenizer)
            result.verification = v
            tol = 1e-3 if gguf_type == "f32" else 0.05
            ok = v["tokens_match"] and v["max_abs_diff"] <= tol * max(1.0, v["logit_scale"])
            say(f"verify: max |logit difference| {v['max_abs_diff']:.3g} (logits up to {v['logit_scale']:.3g}), "
                f"same top token at {v['argmax_agree']:.1%} of positions, tokenizer "
                f"{'identical' if v['tokens_match'] else 'DIFFERS'} on {len(VERIFY_TEXTS)} texts")
            if not ok:
                raise UserError(f"{path}: verification failed: transformers reads back a different model or tokenizer")
    result.card = write_model_card(dest, source.run_dir, source.adapter or source.model_dir, source.notes)
    say(f"model card: {result.card}")
    return result


def _check_config_first(source) -> None:
    """check_gguf_support on the model's config.json (or its adapter's base model's), where one can be read."""
    from transformers import AutoConfig

    folder = source.model_dir
    if folder is None and source.adapter is not None:
        base = _adapter_base(source.adapter)
        folder = base if base is not None and (base / "config.json").is_file() else None
    if folder is None or not (Path(folder) / "config.json").is_file():
        return  # the check after loading still runs
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError):
        return
    check_gguf_support(config)
