"""Image-text preference pairs: the images a row carries, its messages with image parts, and its tokens.

A row's ``images`` (or ``image``) field holds one image or a list: a file path (relative to the data
file's folder), a PIL image, encoded bytes, or a ``{"bytes": ..., "path": ...}`` dict (how ``datasets``
and Parquet store images). Each becomes a *reference*: an absolute path (``str``) or encoded bytes
(PIL images are saved as PNG, which is lossless), so a pair's images travel through the token cache and
to the collate function as small values, and pixels are made only for the micro-batch that needs them.

The prompt's messages say where each image sits with ``{"type": "image"}`` content parts (the
convention of TRL's DPOTrainer for vision data); a prompt without any gets one per image at the start
of its first user message, as TRL does. The model's processor renders the messages with its chat
template and expands each image's placeholder into the model's image tokens. The prompt of an image
pair is never truncated (an image cut in half has no meaning): a prompt that leaves no room for a
completion within ``--max-length`` is an error naming the row.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

IMAGE_KEYS = ("images", "image")


def _is_pil(value: Any) -> bool:
    return hasattr(value, "save") and hasattr(value, "mode") and hasattr(value, "size")


def _check_opens(data, where: str, label: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(data if isinstance(data, str) else io.BytesIO(data)) as im:
            im.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise UserError(f"{where}: field 'images': {label}: cannot be read as an image ({e})") from None


def image_refs(value: Any, where: str, base: Path | None) -> list:
    """The row's images as references (see the module docstring); each file is checked to exist and to
    open as an image, so a bad one stops the run at the data check, before the model loads."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for k, item in enumerate(items, start=1):
        label = f"image {k}"
        if isinstance(item, dict) and ("bytes" in item or "path" in item):
            item = item.get("bytes") or item.get("path")
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
            _check_opens(data, where, label)
            out.append(data)
        elif _is_pil(item):
            buf = io.BytesIO()
            try:
                item.save(buf, format="PNG")
            except OSError:  # a mode PNG cannot hold (CMYK): the processor converts to RGB anyway
                buf = io.BytesIO()
                item.convert("RGB").save(buf, format="PNG")
            out.append(buf.getvalue())
        elif isinstance(item, (str, Path)) and str(item).strip():
            path = Path(item).expanduser()
            if not path.is_absolute() and base is not None:
                path = base / path
            if not path.is_file():
                raise UserError(f"{where}: field 'images': {label}: {item}: no such file (looked for {path})")
            _check_opens(str(path), where, f"{label} ({path})")
            out.append(str(path.resolve()))
        else:
            raise UserError(f"{where}: field 'images': {label}: expected a file path, a PIL image or image bytes, "
                            f"got {type(item).__name__}")
    return out


def open_image(ref):
    """A reference -> a loaded PIL image."""
    from PIL import Image

    im = Image.open(ref if isinstance(ref, str) else io.BytesIO(ref))
    im.load()
    return im


def fingerprint(h, refs) -> None:
    """Feed the references' content into a hash: a file's path and bytes, an encoded image's bytes."""
    for ref in refs:
        if isinstance(ref, str):
            h.update(ref.encode())
            with open(ref, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(hashlib.sha256(ref).digest())


def text_of(content) -> str:
    """A message's text, whether its content is a string or a list of parts."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def as_parts(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def count_image_parts(messages) -> int:
    return sum(1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p.get("type") == "image")


def with_image_parts(prompt: list[dict], n_images: int, where: str) -> list[dict]:
    """The prompt's messages with list-of-parts content (what vision chat templates iterate over), and
    one image part per image: as written, or (none written) all at the start of the first user message."""
    msgs = [{"role": m["role"], "content": as_parts(m["content"])} for m in prompt]
    n_parts = count_image_parts(msgs)
    if n_parts == 0:
        first = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[first]["content"] = [{"type": "image"} for _ in range(n_images)] + msgs[first]["content"]
    elif n_parts != n_images:
        raise UserError(f"{where}: field 'prompt' has {n_parts} image part(s) but the row has {n_images} image(s); "
                        "give one {\"type\": \"image\"} part per image, in order (or none: the images then open the "
                        "first user message)")
    return msgs


# ------------------------------------------------------------------------------------------------
# Tokens: the processor renders and expands; the boundary and the end token follow the text rules.


def image_token_ids(processor) -> set[int]:
    """The ids that stand for image features (what the model scatters its image features into): the
    processor's own list, as it marks them in ``mm_token_type_ids`` (Gemma-3's ``image_token_id`` is its
    start-of-image token, which is not one of them)."""
    tok = processor.tokenizer
    ids = set(getattr(processor, "image_token_ids", None) or [])
    if not ids and isinstance(getattr(processor, "image_token_id", None), int):
        ids.add(processor.image_token_id)
    token = getattr(processor, "image_token", None) or getattr(tok, "image_token", None)
    if not ids and token:
        ids.add(tok.convert_tokens_to_ids(token))
    return ids


def _render(processor, pair, messages) -> tuple[str, str, str]:
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if not template:
        raise UserError(f"{pair.where}: image pairs need a chat template: the model's processor and tokenizer have "
                        "none (pass --chat-template)")
    try:
        render = lambda m, gen: processor.apply_chat_template(m, tokenize=False, add_generation_prompt=gen,  # noqa: E731
                                                              chat_template=template)
        prompt = render(messages, True)
        full_c = render(messages + [{"role": m["role"], "content": as_parts(m["content"])} for m in pair.chosen], False)
        full_r = render(messages + [{"role": m["role"], "content": as_parts(m["content"])} for m in pair.rejected], False)
    except UserError:
        raise
    except Exception as e:  # jinja raises its own exception types for template errors
        raise UserError(f"{pair.where}: the chat template failed on this row ({e})") from None
    for full in (full_c, full_r):
        if not full.startswith(prompt):
            raise UserError(f"{pair.where}: the chat template does not render the prompt as a prefix of the whole "
                            "conversation, so the completion cannot be located; this template is not supported")
    return prompt, full_c, full_r


def _expand(processor, text: str, images) -> list[int]:
    """Token ids of ``text`` with each image placeholder expanded into the model's image tokens."""
    try:
        out = processor(text=[text], images=[images], add_special_tokens=False)
    except (ValueError, TypeError, OSError) as e:
        raise UserError(f"the model's processor failed on this row ({str(e).splitlines()[0]})") from None
    return list(map(int, out["input_ids"][0]))


def tokenize_image_pair(pair, processor, max_length: int, max_prompt_length: int | None, max_completion_length,
                        ends: set[int], eos: int | None):
    """One image pair -> (TokenizedPair or None, skip reason, prompt cut, completion cut); see the module
    docstring. The boundary is found on the texts tokenized without their images (images sit in the
    prompt only), and the prompt's tokens are the processor's, images expanded."""
    from .templates import TokenizedPair, _common_prefix, _drop_double_bos, _end_once

    tok = processor.tokenizer
    bos = tok.bos_token_id
    messages = with_image_parts(pair.prompt, len(pair.images), pair.where)
    prompt_t, full_c, full_r = _render(processor, pair, messages)
    enc = tok([prompt_t, full_c, full_r], add_special_tokens=False, return_attention_mask=False)["input_ids"]
    p_raw, c_raw, r_raw = (_drop_double_bos(list(x), bos) for x in enc)
    b = min(_common_prefix(c_raw, p_raw), _common_prefix(r_raw, p_raw))
    chosen, rejected = _end_once(c_raw[b:], ends, eos), _end_once(r_raw[b:], ends, eos)
    try:
        images = [open_image(r) for r in pair.images]
    except OSError as e:
        raise UserError(f"{pair.where}: field 'images': cannot be read as an image ({e})") from None
    try:
        p_exp = _drop_double_bos(_expand(processor, prompt_t, images), bos)
    except UserError as e:
        raise UserError(f"{pair.where}: {e}") from None
    tail = len(p_raw) - b  # prompt tokens a merge across the boundary moved into the completions
    if tail and p_exp[len(p_exp) - tail:] != p_raw[b:]:
        raise UserError(f"{pair.where}: the prompt's last tokens merge with the completion next to an image; "
                        "end the prompt with some text after the image")
    prompt = p_exp[: len(p_exp) - tail]
    if chosen == rejected:
        return None, "chosen identical to rejected", 0, 0
    img_ids = image_token_ids(processor)
    n_img = sum(1 for t in prompt if t in img_ids)
    what = f"the prompt is {len(prompt)} tokens ({n_img} of them for its {len(pair.images)} image(s), never truncated)"
    if len(prompt) >= max_length:
        raise UserError(f"{pair.where}: {what} and leaves no room for a completion within --max-length {max_length}; "
                        f"raise --max-length above {len(prompt)}")
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        raise UserError(f"{pair.where}: {what}, more than --max-prompt-length {max_prompt_length}; raise "
                        f"--max-prompt-length to at least {len(prompt)}")
    full = len(chosen) + len(rejected)
    room = max_length - len(prompt)
    if max_completion_length is not None:
        room = min(room, max_completion_length)
    chosen, rejected = chosen[:room], rejected[:room]
    c_cut = full - len(chosen) - len(rejected)
    if chosen == rejected:
        return None, "chosen identical to rejected after truncation", 0, c_cut
    as_ids = lambda x: np.asarray(x, dtype=np.int32)  # noqa: E731
    return TokenizedPair(as_ids(prompt), as_ids(chosen), as_ids(rejected), pair.where, tuple(pair.images)), None, 0, c_cut


def processor_fingerprint(processor) -> str:
    """What of the processor changes the tokens: its image processor's settings and its chat template."""
    h = hashlib.sha256(type(processor).__name__.encode())
    ip = getattr(processor, "image_processor", None)
    if ip is not None:
        h.update(ip.to_json_string().encode())
    h.update(str(getattr(processor, "chat_template", None)).encode())
    for name in ("image_seq_length", "patch_size", "num_additional_image_tokens", "vision_feature_select_strategy",
                 "image_token"):
        h.update(f"|{name}={getattr(processor, name, None)}".encode())
    return h.hexdigest()
