"""A GGUF for llama.cpp / ollama from a Llama-architecture model, and its read-back check.

llama.cpp's layout differs from transformers' in three ways, each handled here: tensor names
(``blk.N.attn_q.weight``, from the ``gguf`` package's name map), the rows of the Q and K projections
(llama.cpp rotates interleaved pairs, transformers rotates the two halves of each head, so the rows are
reordered per head), and an lm-head that is not written when it is the embedding matrix. The tokenizer
goes in as metadata: copied from the GGUF the base model came from when there is one and it still
matches, else built from ``tokenizer.json`` (byte-level BPE only; anything else is refused rather than
written wrong). ``verify_gguf`` loads a written GGUF back with transformers and compares logits and
tokenization with the model it came from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError

GGUF_TYPES = ("f16", "bf16", "f32")
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama"}
# Texts whose tokenization and logits are compared after a GGUF is written: plain prose, digits,
# odd whitespace, non-ASCII, and a ChatML-style turn with special tokens.
VERIFY_TEXTS = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France?",
    "Numbers 7, 42 and 12345;  two  spaces,\ttabs\nand a new line. Café naïve über.",
    "<|im_start|>user\nWhich number is larger, 38 or 83?<|im_end|>\n<|im_start|>assistant\n83<|im_end|>\n",
)




def _rope_rows_to_gguf(w, n_heads: int):
    """Reorder the rows of a Q or K projection from transformers' RoPE layout to llama.cpp's.

    transformers rotates dimension i of a head with dimension i + d/2 (the two halves); llama.cpp rotates
    dimensions 2i and 2i + 1 (neighbours). Row i of each head moves to 2i, row i + d/2 to 2i + 1, so that
    both rotate the same pairs. transformers undoes exactly this when it reads a GGUF.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# What to do with a model orpo does not write as GGUF (docs/export.md says the same).
ELSEWHERE = "export it with --merge and convert that folder with llama.cpp's convert_hf_to_gguf.py"


def check_gguf_support(config) -> None:
    """Refuse, in one line, what orpo's GGUF writer does not handle: any architecture but Llama's
    (``LlamaForCausalLM``, model_type ``llama``), and, within Llama, biases, another activation and RoPE
    scaling (Llama 3.1/3.2's ``llama3`` RoPE among them)."""
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else type(config).__name__
    if getattr(config, "model_type", None) != "llama" or (archs and archs[0] not in SUPPORTED_ARCHITECTURES):
        raise UserError(
            f"--gguf: architecture {arch} is not supported; orpo writes GGUF for "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} only (SmolLM, SmolLM2, Llama 3.0: plain RoPE, byte-level BPE); "
            f"{ELSEWHERE}"
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
        raise UserError(f"--gguf: this Llama model has {', '.join(problems)}, which orpo's GGUF export does not "
                        f"handle; {ELSEWHERE}")


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
