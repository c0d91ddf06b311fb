"""Image-text-to-text checkpoints (Gemma-3/4, Mistral-3, Qwen2.5-VL, Qwen3-VL, Qwen3.5, Llama-4, LLaVA, ...).

ORPO trains their language model; the vision tower and projector are loaded, frozen and saved as they
came, in the checkpoint's own class. Three facts of transformers 5.25 shape this module:

- the class: Gemma-3 loads through ``AutoModelForCausalLM`` as its ConditionalGeneration class, but
  Mistral-3, Qwen2.5-VL and Qwen3-VL load only through ``AutoModelForImageTextToText``, and Qwen3.5 and
  Llama-4 load through ``AutoModelForCausalLM`` as text-only classes that drop the vision weights (saved
  without them, the fine-tuned checkpoint no longer takes images). So a folder whose config carries a
  vision config loads through ``AutoModelForImageTextToText`` whenever that mapping knows its type;
- the language model: ``get_decoder()`` is the decoder of most classes, but Llama-4's is a whole
  CausalLM (``language_model``), whose own ``get_decoder()`` is the decoder;
- the config: windows, soft-caps and the attention implementation the language model reads are on
  ``config.get_text_config()``, not on the composite config.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError


def text_config(config):
    """The config the language model's layers read (the config itself for a text-only model)."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def language_decoder(lm):
    """The decoder stack (embeddings, layers, final norm) that ends in hidden states of shape (B, T, H)."""
    decoder = lm.get_decoder()
    if decoder is lm:  # Llama-4's text CausalLM: transformers' lookup returns the model itself; its stack is ``model``
        inner = getattr(lm, "model", None)
        return inner if inner is not None and hasattr(inner, "layers") else lm
    # Llama-4: get_decoder() is the language model, a whole CausalLM (whose base-model prefix names
    # nothing it holds, so its own get_decoder() returns itself); the stack is its ``model``
    if decoder is not lm and getattr(decoder, "get_output_embeddings", lambda: None)() is not None:
        inner = decoder.get_decoder()
        decoder = inner if inner is not decoder else getattr(decoder, "model", decoder)
    return decoder


def decoder_layers(lm) -> list:
    """The decoder's layers, in order (the decoder itself where it has no layer list)."""
    decoder = language_decoder(lm)
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None) or getattr(decoder, "blocks", None)
    return list(layers) if layers is not None and len(layers) else [decoder]


def is_multimodal(config) -> bool:
    """True where the config describes a vision tower next to a language model."""
    return getattr(config, "vision_config", None) is not None


def model_auto_class(folder: Path, trust_remote_code: bool = False):
    """The transformers Auto class that loads ``folder`` whole, in its own class: image-text-to-text
    for checkpoints with a vision config (where transformers has that class), else causal LM; a model
    type with neither is refused in one line."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{folder}: this model needs its own code; pass --trust-remote-code if you trust it") from None
        raise UserError(f"{folder}: cannot read the model's config.json ({str(e).splitlines()[0]})") from None
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:  # the model's own code says which classes it has
        if "AutoModelForCausalLM" not in auto_map and "AutoModelForImageTextToText" in auto_map:
            return AutoModelForImageTextToText
        return AutoModelForCausalLM
    model_type = getattr(config, "model_type", "")
    image_text = model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    saved_as = (getattr(config, "architectures", None) or [None])[0]
    if saved_as in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() and saved_as not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values():
        # saved by a text-only class (a Qwen3.5 or Llama-4 language model alone): its folder has no vision
        # weights, and the image-text class would give it a random vision tower
        return AutoModelForCausalLM
    if image_text and (is_multimodal(config) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return AutoModelForImageTextToText
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    import transformers

    raise UserError(
        f"{folder}: model type {model_type!r} ({type(config).__name__}) has neither a causal-LM nor an image-text-to-text "
        f"class in transformers {transformers.__version__}; orpo trains decoder language models "
        f"({len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} types: llama, qwen3, gemma3, mistral, phi3, ...) and image-text "
        f"checkpoints ({len(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)} types: gemma3, mistral3, qwen2_5_vl, qwen3_vl, "
        "llama4, llava, ...), listed in docs/models.md")


def language_parameters(lm) -> set[int]:
    """ids of the parameters ORPO trains: the decoder stack's and the lm head's (shared when tied)."""
    ids = {id(p) for p in language_decoder(lm).parameters()}
    head = lm.get_output_embeddings()
    if head is not None:
        ids.update(id(p) for p in head.parameters())
    return ids


def outside_modules(lm) -> list[str]:
    """Names (relative to ``lm``) of the outermost modules holding no language-model parameter: the
    vision tower, the projector, an audio tower. Empty for a text-only model."""
    if not is_multimodal(lm.config):
        return []
    keep = language_parameters(lm)
    out: list[str] = []

    def walk(module, prefix):
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            params = list(child.parameters())
            if not params:
                continue
            if not any(id(p) in keep for p in params):
                out.append(full)
            else:
                walk(child, full + ".")

    walk(lm, "")
    return out


def freeze_outside(lm) -> int:
    """Freeze every parameter outside the language model (vision tower, projector); how many tensors."""
    n = 0
    for name in outside_modules(lm):
        for p in lm.get_submodule(name).parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                n += 1
    return n


def lora_exclude(lm) -> str | None:
    """peft's ``exclude_modules`` (a regex over module names): LoRA stays off the vision tower and
    projector whatever ``target_modules`` says, and off linear layers whose forward is not a linear
    map (Llama-4's MoE router subclasses ``nn.Linear`` and returns a tuple, which peft's LoRA layer
    cannot add to). None when nothing is excluded."""
    from torch import nn

    names = [re.escape(n) + r"(?:\..*)?" for n in outside_modules(lm)]
    names += [re.escape(n) for n, m in lm.named_modules()
              if isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward]
    return r"(?:" + "|".join(names) + r")" if names else None


def loader_name(folder: Path) -> str:
    """The transformers Auto class that loads a saved model folder whole (for the lines and the model
    card that tell the user how to load it)."""
    import json

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "AutoModelForCausalLM"
    return "AutoModelForImageTextToText" if config.get("vision_config") else "AutoModelForCausalLM"
