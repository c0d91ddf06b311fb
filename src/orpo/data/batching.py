"""Lay a micro-batch of tokenized pairs out for one forward pass.

A *group* is a prompt followed by one or more completions that each attend to the prompt and to
themselves, never to each other. With prefix sharing a pair is one group ``[prompt, chosen, rejected]``
and its prompt is computed once; without it a pair is two groups ``[prompt, chosen]`` and
``[prompt, rejected]``, as in TRL. Position ids restart at the prompt's end for every completion, so
each completion sees exactly the positions it would see in its own sequence.

With packing, every group of the micro-batch goes into one row with no padding; without it each group
gets its own row, right-padded.

The loss never needs logits of every position: ``src`` lists the flat positions whose hidden state
predicts a scored token, ``target`` that token, ``pair`` its pair and ``kind`` its role (see
``orpo.loss``). The first completion token is predicted from the last prompt position, for the chosen
and the rejected completion alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .templates import TokenizedPair

KIND_PROMPT, KIND_CHOSEN, KIND_REJECTED = 0, 1, 2  # mirrors orpo.loss


@dataclass
class Group:
    """One prompt and its completions inside a row: offsets are positions in that row."""

    row: int
    start: int
    prompt_len: int
    completions: list[tuple[int, int]]  # (start, length) of each completion

    @property
    def end(self) -> int:
        s, n = self.completions[-1]
        return s + n


@dataclass
class Layout:
    """Where the groups of a batch sit; read by the block attention function."""

    rows: int
    length: int
    groups: list[Group]
    _masks: dict = field(default_factory=dict, repr=False)

    def by_row(self) -> list[list[Group]]:
        out: list[list[Group]] = [[] for _ in range(self.rows)]
        for g in self.groups:
            out[g.row].append(g)
        return out

    def block_mask(self, prompt_len: int, length: int, first: bool, window: int | None, device,
                   chunk: int | None = None) -> torch.Tensor:
        """Bool (Q, prompt_len + length) for one block of :mod:`orpo.attention`: the first completion's
        block has the prompt as queries too (Q = prompt_len + length), a further completion only itself
        (Q = length). Keys are the prompt then the completion, at logical positions 0..P+C-1; a query
        sees the keys at or before its own logical position, with ``window`` only the last ``window`` of
        them (transformers' rule: k > q - window), and with ``chunk`` only those in its own chunk of
        ``chunk`` logical positions (Llama-4's chunked attention: k // chunk == q // chunk)."""
        key = (prompt_len, length, first, window, chunk, str(device))
        m = self._masks.get(key)
        if m is None:
            k = torch.arange(prompt_len + length, device=device)[None, :]
            q = torch.arange(prompt_len + length if first else length, device=device)[:, None]
            q = q if first else q + prompt_len
            m = k <= q
            if window is not None:
                m &= k > q - window
            if chunk is not None:
                m &= torch.div(k, chunk, rounding_mode="floor") == torch.div(q, chunk, rounding_mode="floor")
            self._masks[key] = m
        return m

    def dense_mask(self, device, window: int | None = None, chunk: int | None = None) -> torch.Tensor:
        """The same structure as a (rows, 1, T, T) bool mask for a model's own attention, with an
        optional sliding window or attention chunk in logical positions. Positions that hold padding
        attend only to themselves, so no softmax row is empty."""
        t = self.length
        mask = torch.zeros(self.rows, 1, t, t, dtype=torch.bool, device=device)
        idx = torch.arange(t, device=device)
        mask[:, 0, idx, idx] = True
        for g in self.groups:
            p0, p = g.start, g.prompt_len
            for j, (cs, n) in enumerate(g.completions):
                # queries: the prompt too for the first completion; keys: the prompt, then this completion
                q_rows = torch.cat((torch.arange(p0, p0 + p, device=device), torch.arange(cs, cs + n, device=device)))
                blk = self.block_mask(p, n, True, window, device, chunk)  # logical positions 0..p+n-1 both ways
                if j > 0:
                    q_rows, blk = q_rows[p:], blk[p:]
                k_cols = torch.cat((torch.arange(p0, p0 + p, device=device), torch.arange(cs, cs + n, device=device)))
                mask[g.row, 0, q_rows[:, None], k_cols[None, :]] = blk
        return mask

    def padding_mask(self, device) -> torch.Tensor:
        """(rows, T) long, 1 on the tokens of each row's groups: the 2D mask of one sequence per row."""
        mask = torch.zeros(self.rows, self.length, dtype=torch.long)
        for g in self.groups:
            mask[g.row, g.start : g.end] = 1
        return mask.to(device)


@dataclass
class Batch:
    """One micro-batch, ready for ``orpo.forward``.

    input_ids, position_ids: (R, T) long.  src, target, pair, kind: (N,) long, N scored tokens.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    src: torch.Tensor
    target: torch.Tensor
    pair: torch.Tensor
    kind: torch.Tensor
    layout: Layout
    n_pairs: int
    pair_tokens: int  # prompt+chosen plus prompt+rejected tokens, the conventional count
    computed_tokens: int  # tokens actually run through the model (padding included)
    vision: object = None  # image pairs: their pixels (orpo.image_forward.Vision)

    def to(self, device) -> "Batch":
        for name in ("input_ids", "position_ids", "src", "target", "pair", "kind"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        if self.vision is not None:
            self.vision.to(device)
        return self


def nll_tokens(p: TokenizedPair, prompt_in_nll: bool) -> int:
    """NLL tokens a pair contributes: its chosen completion, plus the prompt's tokens after the first."""
    return len(p.chosen) + (len(p.prompt) - 1 if prompt_in_nll else 0)


def collate(
    pairs: list[TokenizedPair],
    prefix_sharing: bool = True,
    packing: bool = True,
    prompt_in_nll: bool = False,
    pad_id: int = 0,
) -> Batch:
    """Build a :class:`Batch` from tokenized pairs (see the module docstring for the layout)."""
    # Each group: (pair index, prompt ids, [(kind, completion ids), ...]).
    groups_spec = []
    for i, p in enumerate(pairs):
        if prefix_sharing:
            groups_spec.append((i, p.prompt, [(KIND_CHOSEN, p.chosen), (KIND_REJECTED, p.rejected)]))
        else:
            groups_spec.append((i, p.prompt, [(KIND_CHOSEN, p.chosen)]))
            groups_spec.append((i, p.prompt, [(KIND_REJECTED, p.rejected)]))

    lengths = [len(pr) + sum(len(c) for _, c in comps) for _, pr, comps in groups_spec]
    if packing:
        rows, t = 1, sum(lengths)
    else:
        rows, t = len(groups_spec), max(lengths)
    ids = np.full((rows, t), pad_id, dtype=np.int64)
    pos = np.zeros((rows, t), dtype=np.int64)
    src, tgt, pair_idx, kinds = [], [], [], []
    groups: list[Group] = []
    row, off = 0, 0
    for (i, prompt, comps), n in zip(groups_spec, lengths):
        if not packing:
            row, off = len(groups), 0
        base = row * t
        pl = len(prompt)
        ids[row, off : off + pl] = prompt
        pos[row, off : off + pl] = np.arange(pl)
        if prompt_in_nll and comps[0][0] == KIND_CHOSEN and pl > 1:
            src.append(base + off + np.arange(pl - 1))
            tgt.append(prompt[1:])
            pair_idx.append(np.full(pl - 1, i))
            kinds.append(np.full(pl - 1, KIND_PROMPT))
        cur = off + pl
        spans = []
        for kind, comp in comps:
            cl = len(comp)
            ids[row, cur : cur + cl] = comp
            pos[row, cur : cur + cl] = pl + np.arange(cl)
            # token j is predicted from the position before it; token 0 from the prompt's last position
            s = base + np.concatenate(([off + pl - 1], cur + np.arange(cl - 1)))
            src.append(s)
            tgt.append(comp)
            pair_idx.append(np.full(cl, i))
            kinds.append(np.full(cl, kind))
            spans.append((cur, cl))
            cur += cl
        groups.append(Group(row=row, start=off, prompt_len=pl, completions=spans))
        off += n

    cat = lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.int64))  # noqa: E731
    return Batch(
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(pos),
        src=cat(src),
        target=cat(tgt),
        pair=cat(pair_idx),
        kind=cat(kinds),
        layout=Layout(rows=rows, length=t, groups=groups),
        n_pairs=len(pairs),
        pair_tokens=sum(p.pair_tokens for p in pairs),
        computed_tokens=rows * t,
    )
