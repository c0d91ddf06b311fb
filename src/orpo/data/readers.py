"""Read preference pairs from files, check every row, and normalise them to one shape.

Supported inputs: ``.jsonl`` / ``.jsonl.gz``, ``.json`` (an array of objects, or JSON lines),
``.parquet``, ``.csv``, a folder written by ``datasets.Dataset.save_to_disk``, a hub dataset name, and rows
held in memory (read by ``formats.py`` and ``memory.py``). ``--columns`` renames the data's own keys first.

Row formats (see the README's "Data formats"):
  (a) explicit prompt, plain strings:   {"prompt": str, "chosen": str, "rejected": str}
  (b) explicit prompt, chat messages:   {"prompt": [msgs], "chosen": [assistant msgs], "rejected": [...]}
  (c) implicit prompt, conversations:   {"chosen": [msgs], "rejected": [msgs]}; the prompt is the
      longest shared prefix of messages, so multi-turn history is kept.

A row that cannot be understood is fatal and named by file, line (or row) and field. A row that is
understood but useless for training (chosen identical to rejected, an empty completion) is skipped and
counted; ``strict`` turns skips into errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..config import is_in_memory, suggest
from ..errors import UserError
from .formats import DATA_SUFFIXES, read_raw  # noqa: F401 - read_raw is part of this module's interface
from .images import IMAGE_KEYS, image_refs, text_of
from .memory import source_name

Messages = list[dict]
Text = Union[str, Messages]

ROLES = ("system", "user", "assistant", "tool")
FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class Pair:
    """One preference pair, normalised: either all three parts are strings or all are message lists."""

    prompt: Text
    chosen: Text
    rejected: Text
    where: str  # "file:line" or "file: row N", for messages that point at the source
    images: list | None = None  # image-text pairs: the prompt's images (orpo.data.images references)

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class Skips:
    """Rows dropped for a reason, with a count and the first few locations of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return "; ".join(
            f"{n} {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in self.counts.items()
        )


class SkipRow(Exception):
    """Raised inside normalisation for a row that is valid but useless; carries the reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------------
# Validation and normalisation of one row.


def _check_message(msg: Any, where: str, fname: str, idx: int) -> dict:
    loc = f"{where}: field '{fname}' message {idx}"
    if not isinstance(msg, dict):
        raise UserError(f"{loc}: expected an object with 'role' and 'content', got {type(msg).__name__}")
    if "role" not in msg:
        raise UserError(f"{loc}: missing 'role'")
    if "content" not in msg:
        raise UserError(f"{loc}: missing 'content'")
    role, content = msg["role"], msg["content"]
    if not isinstance(role, str) or role not in ROLES:
        raise UserError(f"{loc}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if isinstance(content, list):  # multimodal-style parts: text, and image placeholders (image pairs)
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif isinstance(part, dict) and part.get("type") == "image":
                parts.append({"type": "image"})  # the image itself comes from the row's 'images' field
            elif isinstance(part, dict) and part.get("type") in ("image_url", "video", "audio"):
                raise UserError(f"{loc}: {part['type']} parts are not supported (images go in the row's 'images' "
                                "field, with {\"type\": \"image\"} parts where they sit; see docs/models.md)")
            else:
                raise UserError(f"{loc}: content parts other than text and image are not supported")
        has_image = any(p["type"] == "image" for p in parts)
        content = parts if has_image else "".join(p["text"] for p in parts)
    if not isinstance(content, (str, list)):
        raise UserError(f"{loc}: 'content' must be a string, got {type(content).__name__}")
    return {"role": role, "content": content}


def _as_messages(value: Any, where: str, fname: str, default_role: str) -> Messages:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        return [_check_message(value, where, fname, 0)]
    if isinstance(value, list):
        if not value:
            raise UserError(f"{where}: field '{fname}' is an empty message list")
        return [_check_message(m, where, fname, i) for i, m in enumerate(value)]
    raise UserError(f"{where}: field '{fname}' must be a string or a list of messages, got {type(value).__name__}")


def _check_order(messages: Messages, where: str, fname: str) -> None:
    """System only first; then user and assistant alternate (tool results may follow an assistant)."""
    prev = None
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            if i != 0:
                raise UserError(f"{where}: field '{fname}' message {i}: 'system' is only allowed as the first message")
            continue
        if prev is None and role != "user":
            raise UserError(f"{where}: field '{fname}' message {i}: the conversation must start with 'user', not '{role}'")
        if prev is not None:
            ok = {
                "user": ("assistant", "tool"),
                "assistant": ("user", "tool"),
                "tool": ("assistant", "tool"),
            }[prev]
            if role not in ok:
                raise UserError(
                    f"{where}: field '{fname}' message {i}: '{role}' cannot follow '{prev}' (roles out of order)"
                )
        prev = role


def _has_text(messages: Messages) -> bool:
    return any(text_of(m["content"]).strip() for m in messages)


def rename_columns(row: Any, columns: dict[str, str] | None) -> Any:
    """--columns: take prompt/chosen/rejected from the keys the data uses for them."""
    if not columns or not isinstance(row, dict):
        return row
    out = {k: v for k, v in row.items() if k not in FIELDS}
    for ours in FIELDS:
        theirs = columns.get(ours, ours)
        if theirs in row:
            out[ours] = row[theirs]
    return out


def _missing(where: str, need: str, keys: list[str]) -> UserError:
    found = ", ".join(f"'{k}'" for k in keys) or "none"
    return UserError(f"{where}: missing field '{need}'{suggest(need, [k for k in keys if k not in FIELDS])}; the row's "
                     f"keys are {found}; map other names with --columns (e.g. --columns prompt=KEY,chosen=KEY,"
                     "rejected=KEY)")


def normalize_row(row: Any, where: str, base: Path | None = None) -> Pair:
    """Check one raw row and return it as a :class:`Pair`; raise UserError or SkipRow. ``base``: the
    folder that relative image paths start from (the data file's)."""
    pair = _normalize(row, where)
    images = None
    for key in IMAGE_KEYS:
        value = row.get(key)
        if value is not None and not (isinstance(value, (list, tuple, str, bytes)) and len(value) == 0):
            images = image_refs(value, where, base)
            break
    parts = []  # (field, message) of the messages with image parts
    if pair.conversational:
        for fname, msgs in zip(FIELDS, (pair.prompt, pair.chosen, pair.rejected)):
            parts += [(fname, m) for m in msgs if not isinstance(m["content"], str)]
    if images is None:
        if parts:
            raise UserError(f"{where}: field '{parts[0][0]}' has an image part but the row has no 'images' field")
        return pair
    if not pair.conversational:
        raise UserError(f"{where}: field 'images': image pairs need chat messages (a prompt such as [{{\"role\": "
                        "\"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", \"text\": ...}]}]), "
                        "not plain strings")
    if any(f != "prompt" for f, _ in parts):
        raise UserError(f"{where}: field '{next(f for f, _ in parts if f != 'prompt')}' has an image part; images belong "
                        "to the prompt, which chosen and rejected share")
    pair.images = images
    return pair


def _normalize(row: Any, where: str) -> Pair:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with fields prompt/chosen/rejected, got {type(row).__name__}")
    keys = [str(k) for k in row]
    for need in ("chosen", "rejected"):
        if need not in row or row[need] is None:
            raise _missing(where, need, keys)
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get("prompt")

    whole_conversations = (
        isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected
        and isinstance(chosen[0], dict) and isinstance(rejected[0], dict)
        and chosen[0].get("role") != "assistant" and rejected[0].get("role") != "assistant"
    )
    if prompt is None or whole_conversations:
        # Format (c): implicit prompt, the shared prefix of two conversations. Many hub datasets
        # (UltraFeedback binarized) also carry the prompt as a string beside the whole conversations;
        # the conversations are then the truth and the string is redundant.
        if isinstance(chosen, str) or isinstance(rejected, str):
            hint = suggest("prompt", [k for k in keys if k not in FIELDS])
            raise UserError(
                f"{where}: missing field 'prompt'{hint}; plain-string pairs need an explicit prompt "
                "(only chat-message conversations can share an implicit one); the row's keys are "
                f"{', '.join(repr(k) for k in keys)}; map other names with --columns prompt=KEY"
            )
        c = _as_messages(chosen, where, "chosen", "assistant")
        r = _as_messages(rejected, where, "rejected", "assistant")
        _check_order(c, where, "chosen")
        _check_order(r, where, "rejected")
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        if n == len(c) and n == len(r):
            raise SkipRow("chosen identical to rejected")
        if n == 0 or n == len(c) or n == len(r):
            raise UserError(
                f"{where}: field 'chosen'/'rejected': cannot find the implicit prompt: the two conversations "
                "must share their opening messages and then each end with its own assistant reply"
            )
        for fname, msgs in (("chosen", c), ("rejected", r)):
            if msgs[n]["role"] != "assistant":
                raise UserError(
                    f"{where}: field '{fname}' message {n}: the conversations diverge at a '{msgs[n]['role']}' "
                    "message; the implicit prompt must be everything before the final assistant reply"
                )
            later_user = next((i for i in range(n, len(msgs)) if msgs[i]["role"] == "user"), None)
            if later_user is not None:
                raise UserError(
                    f"{where}: field '{fname}' message {later_user}: the conversations diverge before the final "
                    f"turn (at message {n}); the implicit prompt must be everything before the final assistant reply"
                )
        prompt_msgs, c_tail, r_tail = c[:n], c[n:], r[n:]
        if not _has_text(c_tail) or not _has_text(r_tail):
            raise SkipRow("empty completion")
        return Pair(prompt_msgs, c_tail, r_tail, where)

    conversational = any(isinstance(v, (list, dict)) for v in (prompt, chosen, rejected))
    if not conversational:
        for fname, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise UserError(f"{where}: field '{fname}' must be a string or a list of messages, got {type(value).__name__}")
        if chosen == rejected:
            raise SkipRow("chosen identical to rejected")
        if not chosen.strip() or not rejected.strip():
            raise SkipRow("empty completion")
        return Pair(prompt, chosen, rejected, where)

    # Format (b): explicit prompt with chat messages (a plain string part becomes one message).
    p = _as_messages(prompt, where, "prompt", "user")
    c = _as_messages(chosen, where, "chosen", "assistant")
    r = _as_messages(rejected, where, "rejected", "assistant")
    _check_order(p, where, "prompt")
    if p[-1]["role"] not in ("user", "tool"):
        raise UserError(f"{where}: field 'prompt': the last prompt message must be from 'user', not '{p[-1]['role']}'")
    for fname, msgs in (("chosen", c), ("rejected", r)):
        if msgs[0]["role"] != "assistant":
            raise UserError(f"{where}: field '{fname}' message 0: a completion must be an 'assistant' message, not '{msgs[0]['role']}'")
        _check_order(p + msgs, where, fname)
    if c == r:
        raise SkipRow("chosen identical to rejected")
    if not _has_text(c) or not _has_text(r):
        raise SkipRow("empty completion")
    return Pair(p, c, r, where)


def iter_pairs(path: str | Path, max_rows: int | None = None,
               columns: dict[str, str] | None = None) -> Iterator[tuple[int, str, Pair | None, str | None]]:
    """Stream ``(row index, where, pair or None, skip reason or None)`` over the first ``max_rows``
    rows, raising UserError at the first fatal one. ``columns`` maps prompt/chosen/rejected to the
    data's own keys."""
    conversational = None
    n = 0
    base = None if is_in_memory(path) else Path(path).parent
    for where, row in read_raw(path):
        if max_rows is not None and n >= max_rows:
            break
        try:
            pair = normalize_row(rename_columns(row, columns), where, base)
        except SkipRow as s:
            yield n, where, None, s.reason
            n += 1
            continue
        if conversational is None:
            conversational = pair.conversational
        elif pair.conversational != conversational:
            raise UserError(f"{where}: mixes plain-string and chat-message rows in one file; use one format per file")
        yield n, where, pair, None
        n += 1
    if n == 0:
        raise UserError(f"{source_name(path)}: no rows (the {'data' if is_in_memory(path) else 'file'} is empty)")


def load_pairs(path: str | Path, max_rows: int | None = None,
               columns: dict[str, str] | None = None) -> tuple[list[Pair], Skips, int]:
    """Read, validate and normalise every row into memory. Returns (pairs, skips, rows read)."""
    pairs: list[Pair] = []
    skips = Skips()
    n_read = 0
    for _, where, pair, reason in iter_pairs(path, max_rows, columns):
        n_read += 1
        if pair is None:
            skips.add(reason, where)
        else:
            pairs.append(pair)
    return pairs, skips, n_read


def detect_format(pairs: list[Pair], path: str | Path) -> str:
    """A human description of the format, for reports."""
    if not pairs:
        return "unknown"
    return "chat messages" if pairs[0].conversational else "plain strings"
