"""Turn normalised pairs into token ids: chat template, prompt/completion boundary, end token, truncation.

Rules (each has a test):
- Chat messages go through the tokenizer's chat template; the prompt part ends with the generation
  prompt (``<|im_start|>assistant\\n`` for ChatML). Templated text is tokenized with
  ``add_special_tokens=False`` because templates write their own BOS, so there is never a doubled BOS.
- Plain strings are concatenated, prompt + completion, and tokenized as the tokenizer normally would
  (a BOS only if the tokenizer adds one; a BOS already typed into the prompt is not doubled).
- The prompt/completion boundary is found on the tokenized whole: the longest common prefix of
  tokenize(prompt + chosen), tokenize(prompt + rejected) and tokenize(prompt). A BPE merge across the
  boundary therefore moves the boundary, never the labels; chosen and rejected share one prompt.
- Each completion ends with exactly one end token: anything a template writes after its end-of-turn
  token (ChatML's trailing newline) is dropped, and the tokenizer's EOS is appended only when the
  completion has no end token at all.
- Truncation to ``max_length`` takes tokens from the start of the prompt first (keeping a leading BOS
  and the latest turns), never below ``max_length // 2`` tokens of prompt, then cuts the completions'
  ends. ``max_prompt_length`` is an extra hard cap on the prompt, ``max_completion_length`` one on each
  completion (applied first); ``truncation_mode="keep_start"`` keeps a prompt's start instead of its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .readers import Pair, Skips

# End-of-turn markers of common chat templates, added to the tokenizer's own EOS when present.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|end_of_text|>", "<|endoftext|>")


@dataclass
class TokenizedPair:
    """Token ids of one pair. Sequences are int32 arrays; the pair's two rows are prompt+chosen and
    prompt+rejected."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    where: str
    images: tuple | None = None  # image pairs: the prompt's images (orpo.data.images references)

    @property
    def pair_tokens(self) -> int:
        """Tokens of prompt+chosen plus prompt+rejected: the conventional count, whatever the batching."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class TokenStats:
    """What tokenization and truncation did to a dataset, reported before training starts."""

    rows_read: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    tokens_cut: int = 0  # tokens truncation removed from the kept pairs (prompt once, plus both completions)
    largest_cut: int = 0  # the most tokens removed from one kept pair
    skips: Skips = field(default_factory=Skips)

    def add_cut(self, p_cut: int, c_cut: int) -> None:
        """Count one kept pair's truncation: ``p_cut`` prompt tokens, ``c_cut`` completion tokens removed."""
        self.prompt_truncated += p_cut > 0
        self.completion_truncated += c_cut > 0
        self.tokens_cut += p_cut + c_cut
        self.largest_cut = max(self.largest_cut, p_cut + c_cut)

    def as_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "kept": self.kept,
            "prompt_truncated": self.prompt_truncated,
            "completion_truncated": self.completion_truncated,
            "tokens_cut": self.tokens_cut,
            "largest_cut": self.largest_cut,
            "skipped": self.skips.total,
            "skipped_by_reason": dict(self.skips.counts),
        }


def end_token_ids(tokenizer) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in END_TOKENS:
        if tok in vocab and tok in tokenizer.all_special_tokens:
            ids.add(int(vocab[tok]))
    return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _end_once(completion: list[int], ends: set[int], eos: int | None) -> list[int]:
    """Cut whatever follows the last end token; append EOS if there is none."""
    for i in range(len(completion) - 1, -1, -1):
        if completion[i] in ends:
            return completion[: i + 1]
    if eos is None:
        return completion
    return completion + [eos]


def _render(tokenizer, pairs: list[Pair]) -> tuple[list[str], list[str], list[str], bool]:
    """Texts of prompt, prompt+chosen, prompt+rejected, and whether the tokenizer adds special tokens."""
    prompts, fulls_c, fulls_r = [], [], []
    if pairs and pairs[0].conversational:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "the data holds chat messages but the model's tokenizer has no chat template; "
                "use a chat model or convert the data to plain prompt/chosen/rejected strings"
            )
        for p in pairs:
            try:
                prompt = tokenizer.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True)
                full_c = tokenizer.apply_chat_template(p.prompt + p.chosen, tokenize=False)
                full_r = tokenizer.apply_chat_template(p.prompt + p.rejected, tokenize=False)
            except Exception as e:  # jinja raises its own exception types for template errors
                raise UserError(f"{p.where}: the chat template failed on this row ({e})") from None
            for full in (full_c, full_r):
                if not full.startswith(prompt):
                    raise UserError(
                        f"{p.where}: the chat template does not render the prompt as a prefix of the whole "
                        "conversation, so the completion cannot be located; this template is not supported"
                    )
            prompts.append(prompt)
            fulls_c.append(full_c)
            fulls_r.append(full_r)
        return prompts, fulls_c, fulls_r, False
    for p in pairs:
        prompts.append(p.prompt)
        fulls_c.append(p.prompt + p.chosen)
        fulls_r.append(p.prompt + p.rejected)
    return prompts, fulls_c, fulls_r, True


def _drop_double_bos(ids: list[int], bos: int | None) -> list[int]:
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        return ids[1:]
    return ids


def truncate(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int,
    max_prompt_length: int | None,
    bos: int | None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> tuple[list[int], list[int], list[int], bool, bool]:
    """Fit prompt + each completion into ``max_length`` tokens. Returns the three parts and whether the
    prompt and the completions were cut. ``truncation_mode`` keep_end drops a prompt's first tokens (after
    a BOS), keep_start its last ones; ``max_completion_length`` caps each completion first."""
    keep_bos = bos is not None and len(prompt) > 0 and prompt[0] == bos

    def keep_last(ids: list[int], n: int) -> list[int]:
        if len(ids) <= n:
            return ids
        if truncation_mode == "keep_start":
            return ids[:n]
        if keep_bos and n >= 2:
            return [ids[0]] + ids[len(ids) - (n - 1):]
        return ids[len(ids) - n:]

    p_cut = c_cut = False
    if max_completion_length is not None and max(len(chosen), len(rejected)) > max_completion_length:
        chosen, rejected, c_cut = chosen[:max_completion_length], rejected[:max_completion_length], True
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, p_cut = keep_last(prompt, max_prompt_length), True
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length:
        # at least one prompt token: the first completion token is predicted from the prompt's last one
        floor = min(len(prompt), max(1, max_length // 2))
        keep = max(max_length - longest, floor)
        if keep < len(prompt):
            prompt, p_cut = keep_last(prompt, keep), True
        room = max_length - len(prompt)
        if longest > room:
            chosen, rejected, c_cut = chosen[:room], rejected[:room], True
    return prompt, chosen, rejected, p_cut, c_cut


def tokenize_batch(
    pairs: list[Pair], tokenizer, max_length: int, max_prompt_length: int | None = None,
    max_completion_length: int | None = None, truncation_mode: str = "keep_end", processor=None,
) -> list[tuple[TokenizedPair | None, str | None, bool, bool]]:
    """Tokenize and truncate a batch of pairs (the Rust tokenizer runs whole batches fast).

    Returns, per pair, ``(tokenized pair or None, skip reason or None, prompt cut, completion cut)``; the cuts
    are the numbers of tokens truncation removed from the prompt and from the two completions together
    (0: not cut). Image pairs go through the model's ``processor`` (``orpo.data.images``).
    """
    ends = end_token_ids(tokenizer)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if any(p.images for p in pairs):
        from .images import tokenize_image_pair

        if processor is None:
            where = next(p.where for p in pairs if p.images)
            raise UserError(f"{where}: image pairs need the model's processor (AutoProcessor), which was not loaded")
        text = [p for p in pairs if not p.images]
        done = iter(tokenize_batch(text, tokenizer, max_length, max_prompt_length, max_completion_length,
                                   truncation_mode) if text else [])
        return [tokenize_image_pair(p, processor, max_length, max_prompt_length, max_completion_length, ends, eos)
                if p.images else next(done) for p in pairs]
    prompts, fulls_c, fulls_r, special = _render(tokenizer, pairs)
    enc = lambda texts: tokenizer(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]  # noqa: E731
    out = []
    for pair, p_ids, c_ids, r_ids in zip(pairs, enc(prompts), enc(fulls_c), enc(fulls_r)):
        p_ids, c_ids, r_ids = (_drop_double_bos(x, bos) for x in (p_ids, c_ids, r_ids))
        b = min(_common_prefix(c_ids, p_ids), _common_prefix(r_ids, p_ids))
        prompt = c_ids[:b]
        chosen = _end_once(c_ids[b:], ends, eos)
        rejected = _end_once(r_ids[b:], ends, eos)
        if not prompt:
            out.append((None, "empty prompt (no token to condition on)", False, False))
            continue
        if chosen == rejected:
            out.append((None, "chosen identical to rejected", False, False))
            continue
        full = len(prompt), len(chosen) + len(rejected)
        prompt, chosen, rejected, _, _ = truncate(prompt, chosen, rejected, max_length, max_prompt_length, bos,
                                                  max_completion_length, truncation_mode)
        p_cut, c_cut = full[0] - len(prompt), full[1] - len(chosen) - len(rejected)
        if not chosen or not rejected:
            out.append((None, "completion lost to truncation", p_cut, c_cut))
            continue
        if chosen == rejected:
            out.append((None, "chosen identical to rejected after truncation", p_cut, c_cut))
            continue
        as_ids = lambda x: np.asarray(x, dtype=np.int32)  # noqa: E731
        out.append((TokenizedPair(as_ids(prompt), as_ids(chosen), as_ids(rejected), pair.where), None, p_cut, c_cut))
    return out


def tokenize_pairs(
    pairs: list[Pair],
    tokenizer,
    max_length: int,
    max_prompt_length: int | None = None,
    stats: TokenStats | None = None,
    batch_size: int = 512,
    processor=None,
) -> list[TokenizedPair]:
    """Tokenize and truncate every pair in this process; skipped pairs are counted in ``stats``."""
    stats = stats if stats is not None else TokenStats()
    out: list[TokenizedPair] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        for pair, (tp, reason, p_cut, c_cut) in zip(chunk, tokenize_batch(chunk, tokenizer, max_length, max_prompt_length,
                                                                           processor=processor)):
            if reason is not None:
                stats.skips.add(reason, pair.where)
            else:
                stats.add_cut(p_cut, c_cut)
                out.append(tp)
    stats.kept = len(out)
    return out
