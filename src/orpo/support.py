"""Which fast paths this model may use, proven at start-up on the run as it will train.

A packed, prefix-shared row ``[prompt, chosen, rejected]`` is exact only if tokens meet through
attention alone, attention sees only what the layout allows (windows, chunks, soft-caps and sinks
included) and the head is what we think it is. None of that is assumed: :func:`decide` runs random
pairs through each candidate path and through the model's own stock forward (its own attention and
mask, one sequence per row, full logits) and compares the per-token log-probs and the gradient of the
ORPO loss on the weights the run trains. The first candidate that agrees is used:

    attention: blocks (CPU) or flex (CUDA)  ->  mask  ->  separate (one sequence per row, as TRL)
    head:      linear (chunked from the weight)  ->  module (the head, chunk by chunk)  ->  model

The check looks at the run as it will train (docs/proof.md says exactly what it covers):

- after the adapters (LoRA, QLoRA) are attached, comparing the gradient of the adapter weights;
- in train mode, with every dropout rate set to 0 for the check (LoRA's ``lora_dropout`` included) and
  put back afterwards: with dropout on, the two sides would draw different masks;
- at the run's dtypes (the weights' dtype, bf16 autocast with ``--precision bf16``);
- on a *miniature* of the model (``orpo.miniature``: same config class and values, a few layers that
  hold every layer type, small width, random weights, the same adapters) with pairs longer than every
  sliding window or attention chunk that ``--max-length`` can exceed. The miniature is checked in fp32
  with tight tolerances, then at the run's dtypes, where a path may be at most ``NOISE_X`` times as far
  from the fp32 numbers as the model's own forward at those dtypes is;
- on the real model, on short pairs, at the run's dtypes (its head, its quantized layers, its dtype),
  unless its weights are sharded or partitioned (then the miniature alone).

"separate" with the "model" head is the model's own forward, mask and head; it is exact by
construction and is still checked. A name list only speeds the decision up: models known to mix
tokens outside attention skip the packed candidates (a packed row would leak), and no model is
accepted on its name alone. A mixer that ``orpo.mixers`` tells where each sequence starts (LFM2's
short convolution) is not skipped: its packed paths are tried and proven like any other, on pairs whose
sequences are all longer than its kernel, so that every window of a packed row reaches across a boundary.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from . import attention, miniature, mixers
from .data.batching import collate
from .data.templates import TokenizedPair
from .errors import UserError
from .forward import Paths, PolicyForward, head_transform, resolve_attention
from .loss import orpo_loss
from .mixers import token_mixer
from .model import _DROPOUT_ATTRS
from .model import base_causal_lm
from .multimodal import decoder_layers, text_config

# Per-token log-probs may differ by this (absolute, plus relative) in fp32: SDPA over blocks and the
# chunked head sum in another order. A token that sees what it must not moves them by far more.
LOGP_TOL = 1e-4
GRAD_TOL = 1e-3  # relative L2 error of the checked gradient
# At lower precision (bf16 autocast, bf16/fp16 weights) the miniature is compared with its fp32 twin: a
# path may be at most NOISE_X times as far from the twin's numbers as the model's own forward at the same
# precision is (its rounding noise, measured on the spot). A leak on the miniature is ~100x that noise.
NOISE_X = 4.0
# The real model at lower precision has no fp32 twin: a path is compared with the model's own forward at
# the same precision, within these multiples of the dtype's unit roundoff u (bf16: u = 2^-8): log-probs
# absolute (plus relative), gradient relative. Structural errors are the miniature's job; this catches
# a head or a quantized layer that is not what the path thinks (errors of order 1).
LOWP_LOGP_U = 16.0
LOWP_GRAD_U = 8.0

def synthetic_pairs(vocab: int, span: int | None = None, seed: int = 0, kernel: int = 0) -> list[TokenizedPair]:
    """Two random pairs (two, so that a packed row has a pair to leak into), chosen and rejected of
    different lengths. With ``span`` (the longest sliding window or attention chunk a pair of the run can
    exceed), every sequence is longer than it, and so is each completion of the second pair alone: a
    path that ignores a window or chunk, or applies it from the wrong position, moves the log-probs.
    ``kernel``: the widest short convolution; every prompt and completion is longer, so each window
    that starts a sequence would reach into the previous one."""
    rng = np.random.default_rng(seed)
    if span is None:
        shapes = [(8, 7, 5), (5, 10, 8)]
    else:
        h = span // 2
        shapes = [(h + 5, h + 9, h + 3), (6, span + 4, span + 1)]
    grow = max(0, kernel + 1 - min(min(s) for s in shapes))
    shapes = [tuple(n + grow for n in s) for s in shapes]
    out = []
    for i, (p, c, r) in enumerate(shapes):
        ids = lambda n: rng.integers(3, vocab, n).astype(np.int32)  # noqa: E731
        out.append(TokenizedPair(prompt=ids(p), chosen=ids(c), rejected=ids(r), where=f"check:{i}"))
    return out


def _checked_params(model) -> list[torch.Tensor]:
    """The real model's weights whose gradient is compared: what the run trains in its last two decoder
    layers (a sliding and a full layer where they alternate; their adapters under LoRA), and under peft
    every adapter outside the layers too (a LoRA head). Every forward error upstream changes their
    gradient through the activations; stopping the backward there keeps the check cheap (on CPU a
    backward pass streams every weight it reaches). The miniature compares every trained weight."""
    lm = base_causal_lm(model)
    layers = decoder_layers(lm)
    out = [p for m in layers[-2:] for p in m.parameters() if p.requires_grad and p.is_floating_point()]
    if getattr(model, "peft_config", None):
        inside = {id(p) for m in layers for p in m.parameters()}
        out += [p for p in lm.parameters() if p.requires_grad and p.is_floating_point() and id(p) not in inside]
    return out


def _all_trained(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]


def _loss(logps, batch, beta=0.5):
    nll = float((batch.kind == 1).sum())
    return orpo_loss(logps, batch.pair, batch.kind, batch.n_pairs, beta, False, nll, batch.n_pairs).loss


def _device(model) -> torch.device:
    return next(model.parameters()).device


def run_pairs(model, paths: Paths | None, pairs, params, amp=None):
    """Per-token log-probs (fp32, in collate's order: chosen then rejected, pair by pair) and the fp32
    gradient of the ORPO loss on ``params``, through ``paths``, or (None) through the model's own
    forward: one sequence per right-padded row with its own 2D mask and full logits (what TRL runs).
    ``amp``: the autocast dtype of the run (None: none). One batched call: on CPU the weights' memory
    traffic, not the few tokens, is the cost of a forward."""
    lm = base_causal_lm(model)
    dev = _device(lm)
    try:
        with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            if paths is None:
                batch = collate(pairs, False, False).to(dev)
                logits = lm(input_ids=batch.input_ids, attention_mask=batch.layout.padding_mask(dev),
                            use_cache=False).logits
                logp = torch.log_softmax(logits.flatten(0, 1).index_select(0, batch.src).float(), -1)
                logps = logp.gather(1, batch.target[:, None]).squeeze(1)
            else:
                policy = PolicyForward(model, paths)
                batch = policy.collate(pairs, prompt_in_nll=False).to(dev)
                logps = policy(batch)
            loss = _loss(logps, batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True) if params else []
    finally:
        attention.disable(text_config(lm.config))
    return logps.detach().float(), [g.detach().float() if g is not None else None for g in grads]


def _rel(grads, ref) -> float:
    """One relative L2 error over all compared weights: a key bias, say, has a zero gradient in exact
    arithmetic, and its rounding noise alone must not reject a path."""
    g = [x.flatten() for x in grads if x is not None]
    r = [x.flatten() for x in ref if x is not None]
    if not r:
        return 0.0
    g, r = torch.cat(g), torch.cat(r)
    return float((g - r).norm()) / max(float(r.norm()), 1e-30)


def verdict(cand, ref, floor=None, tol=(LOGP_TOL, GRAD_TOL)) -> str | None:
    """None if ``cand`` = (log-probs, gradient) agrees with ``ref``; else why not, in a few words.
    ``floor``: the model's own forward at the run's precision where ``ref`` is its fp32 twin; the path
    may then be NOISE_X times as far from ``ref`` as ``floor`` is. Else ``tol`` = (log-prob absolute and
    relative, gradient relative)."""
    (lp, gr), (rlp, rgr) = cand, ref
    if not bool(torch.isfinite(lp).all()):
        return "log-probs not finite"
    if any((g is None) != (r is None) for g, r in zip(gr, rgr)):
        return "gradient reaches other weights"
    d, rel = (lp - rlp).abs(), _rel(gr, rgr)
    if floor is None:
        if float((d - tol[0] * rlp.abs()).max()) > tol[0]:
            return f"log-probs off by up to {float(d.max()):.2g}"
        if rel > tol[1]:
            return f"gradient off by {rel:.2g} (relative)"
        return None
    noise, noise_rel = (floor[0] - rlp).abs(), _rel(floor[1], rgr)
    if float(d.max()) > NOISE_X * float(noise.max()) + LOGP_TOL * (1 + float(rlp.abs().max())):
        return f"log-probs off by up to {float(d.max()):.2g} (own forward at this precision: {float(noise.max()):.2g})"
    if rel > NOISE_X * noise_rel + GRAD_TOL:
        return f"gradient off by {rel:.2g} (relative; own forward at this precision: {noise_rel:.2g})"
    return None


def _low_dtype(model, amp, weights=None):
    """The lowest precision the run computes in (None: fp32 throughout)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()} | ({weights} if weights else set())
    if getattr(model, "is_loaded_in_4bit", False) or any(not p.is_floating_point() for p in model.parameters()):
        dtypes.add(torch.bfloat16)  # quantized weights compute in bf16 (orpo's QLoRA compute dtype)
    if amp is not None:
        dtypes.add(amp)
    low = [d for d in dtypes if d in (torch.bfloat16, torch.float16)]
    return (torch.float16 if torch.float16 in low else torch.bfloat16) if low else None


def real_tolerances(model, amp) -> tuple[float, float]:
    """(log-prob, gradient) tolerances for the real model against its own forward at the run's precision:
    fp32's, or multiples of the lowest precision's unit roundoff."""
    low = _low_dtype(model, amp)
    if low is None:
        return LOGP_TOL, GRAD_TOL
    u = torch.finfo(low).eps / 2
    return LOWP_LOGP_U * u, LOWP_GRAD_U * u


class _Stage:
    """One model at one precision on its pairs: ``check(paths)`` is None or why the path differs there.
    ``twin``: an fp32 stage of the same model (the miniature), whose reference the path is held to."""

    def __init__(self, label, model, pairs, params, amp=None, twin=None, tol=(LOGP_TOL, GRAD_TOL)):
        self.label, self.model, self.pairs, self.params, self.amp, self.twin, self.tol = \
            label, model, pairs, params, amp, twin, tol
        self.ref = run_pairs(model, None, pairs, params, amp)  # at the run's precision

    def check(self, paths: Paths) -> str | None:
        try:
            cand = run_pairs(self.model, paths, self.pairs, self.params, self.amp)
        except Exception as e:  # a path the model's code cannot run at all is not used
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        else:
            why = verdict(cand, self.twin.ref, floor=self.ref) if self.twin else verdict(cand, self.ref, tol=self.tol)
        return f"{self.label}{why}" if why and self.label else why


def _miniature_stages(model, dev, span, amp, weights, kernel=0) -> list[_Stage]:
    """The miniature in fp32 (tight tolerances), then at the run's precision (against the fp32 twin)."""
    mini = miniature.build(model, dev)
    _QuietDropout(mini).__enter__()  # for good: the miniature is thrown away after the check
    vocab = base_causal_lm(mini).config.get_text_config().vocab_size
    pairs = synthetic_pairs(vocab, span, seed=1, kernel=kernel)
    where = f"miniature, {span}-token window/chunk reached" if span else "miniature"
    exact = _Stage(f"{where}: ", mini, pairs, _all_trained(mini))
    if not bool(torch.isfinite(exact.ref[0]).all()):
        raise ValueError("the miniature's own log-probs are not finite")
    low = _low_dtype(model, amp, weights)
    if low is None:
        return [exact]
    lowp = miniature.cast_like(copy.deepcopy(mini), model, weights)
    label = f"{where}, {str(low).replace('torch.', '')}: "
    return [exact, _Stage(label, lowp, pairs, _all_trained(lowp), amp, twin=exact)]


def _partitioned(model) -> bool:
    """Weights that are not all here: ZeRO-3 partitions (``ds_id``, shape 0) or meta tensors (FSDP's
    low-memory loading on the other processes)."""
    return any(hasattr(p, "ds_id") or p.numel() == 0 or p.device.type == "meta" for p in model.parameters())


# random in train mode besides dropout: MoE routers' jitter (Mixtral's router_jitter_noise)
_NOISE_ATTRS = _DROPOUT_ATTRS + ("router_jitter_noise", "jitter_noise")


class _QuietDropout:
    """Train mode with every dropout rate 0 for the check (both sides deterministic and alike), all put
    back afterwards: ``nn.Dropout`` modules (LoRA's ``lora_dropout`` among them) and the float rates that
    layers read at each call (``attention_dropout`` and kin, router jitter; on modules and configs)."""

    def __init__(self, *models):
        self.models, self.saved, self.modes = models, [], []

    def __enter__(self):
        for model in self.models:
            self.modes.append((model, model.training))
            model.train()
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout) and module.p != 0:
                    self.saved.append((module, "p", module.p))
                    module.p = 0.0
                for obj in (module, getattr(module, "config", None)):
                    for name in _NOISE_ATTRS:
                        value = getattr(obj, name, None) if obj is not None else None
                        if isinstance(value, float) and value != 0.0:
                            self.saved.append((obj, name, value))
                            setattr(obj, name, 0.0)
        return self

    def __exit__(self, *exc):
        for obj, name, value in reversed(self.saved):
            setattr(obj, name, value)
        for model, mode in self.modes:
            model.train(mode)


def _head_candidates(lm) -> list[str]:
    """"linear" reads the head's weight directly: only a plain ``nn.Linear`` (not one carrying a LoRA
    adapter, whose ``lora_B`` would then never train) without a soft-cap."""
    head = lm.get_output_embeddings()
    scale, softcap = head_transform(text_config(lm.config))
    out = []
    if type(head) is torch.nn.Linear and not softcap and not (head.bias is not None and scale != 1.0):
        out.append("linear")
    if isinstance(head, torch.nn.Module):
        out.append("module")
    return out + ["model"]


def _vocab(lm) -> int:
    """From the config: under ZeRO-3 a partitioned embedding's ``weight.shape[0]`` is 0."""
    vocab = int(lm.config.get_text_config().vocab_size)
    for emb in (lm.get_input_embeddings(), lm.get_output_embeddings()):
        rows = getattr(getattr(emb, "weight", None), "shape", (0,))[0]
        if rows:
            vocab = min(vocab, int(rows))
    return vocab


def decide(model, attention: str = "auto", prefix_sharing: bool = True, packing: bool = True, device=None,
           max_length: int = 1024, precision: str = "fp32", weights_dtype=None, check_real: bool = True) -> Paths:
    """The fastest path that gives this model's own numbers, for the run as it will train: ``model``
    with its adapters attached, ``precision`` "bf16" for bf16 autocast, ``weights_dtype`` where the
    weights will be cast before training (--bf16-weights). ``device``: where the miniature runs (the
    run's device). ``check_real`` False: the real model is not run (sharded weights; see
    :func:`choose_paths`). ``attention`` other than 'auto' forces that mode: if the check rejects it, a
    :class:`UserError` says why."""
    lm = base_causal_lm(model)
    dev = torch.device(device) if device is not None else _device(lm)
    mixer = token_mixer(text_config(lm.config))
    told = mixers.packable(lm, mixer)  # a mixer told where sequences start: packed paths tried, proven
    kernel = mixers.kernel_width(lm) if told else 0
    forced = attention != "auto"
    first = resolve_attention(attention, dev)
    if forced:
        modes = [first]
    elif mixer and not told:
        modes = ["separate"]
    else:
        modes = [first, "mask", "separate"] if first != "mask" else ["mask", "separate"]
    amp = torch.bfloat16 if precision == "bf16" else None
    real = check_real and not _partitioned(model)
    span = miniature.longest_reachable_span(lm.config, max_length)
    notes = [] if real else ["the real weights are sharded or partitioned here: checked on the miniature only"]
    with _QuietDropout(model):
        stages = []
        if not (mixer and not told and real):
            try:
                stages = _miniature_stages(model, dev, span, amp, weights_dtype, kernel)
            except Exception as e:  # a config the miniature cannot copy: the real model is checked instead
                notes.append(f"no miniature ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
        if real:
            # short pairs, unless no miniature reached the windows: then the real model must
            stages.append(_Stage("", model, synthetic_pairs(_vocab(lm), None if stages else span, kernel=kernel),
                                 _checked_params(model), amp, tol=real_tolerances(model, amp)))
        rejected = {}
        if not stages:  # nothing can run here: only the model's own forward, exact by construction
            if forced and first != "separate":
                raise UserError(f"--attention {attention}: cannot be checked here ({'; '.join(notes)})")
            return Paths("separate", False, False, "model", rejected={},
                         reason=f"unchecked: {'; '.join(notes)}; the model's own forward, one sequence per row")
        for mode in modes:
            sep = mode == "separate"
            for head in _head_candidates(lm):
                paths = Paths(mode, prefix_sharing and not sep, packing and not sep, head)
                why = None
                for stage in stages:
                    why = stage.check(paths)
                    if why is not None:
                        break
                if why is None:
                    paths.rejected = rejected
                    paths.reason = _reason(paths, mixer, rejected, forced, told) + "".join(f"; {n}" for n in notes)
                    return paths
                rejected[paths.name] = why
    detail = "; ".join(f"{k}: {v}" for k, v in rejected.items())
    if forced:
        raise UserError(f"--attention {attention}: does not give this model's own log-probs ({detail}); "
                        "use --attention auto, which falls back to a path that does")
    raise UserError(f"{getattr(lm.config, 'model_type', 'this model')}: no way of computing its log-probs matched its "
                    f"own forward ({detail}); please report this model")


def _reason(paths: Paths, mixer, rejected: dict, forced: bool, told: bool = False) -> str:
    if mixer and not told and paths.attention == "separate":
        return f"this model mixes tokens with {mixer}, so pairs never share a row"
    if told and paths.attention != "separate":
        return f"checked against the model's own forward, {mixer} told where each sequence starts"
    if forced:
        return "as asked; checked against the model's own forward"
    if rejected:
        first = next(iter(rejected.items()))
        return f"checked against the model's own forward; {first[0]} did not match: {first[1]}"
    return "checked against the model's own forward"


def choose_paths(model, cfg, device, say, sharded: bool = False, images=None) -> Paths:
    """:func:`decide` for a run's config, on the model as it will train (adapters attached); prints the
    one line. Unsharded, the model is moved to ``device`` first (where the engine would put it anyway,
    and a GPU's numbers are the ones that count). Sharded (FSDP, DeepSpeed), the model stays where it
    is, possibly larger than one device: only the miniature is checked, on ``device``. ``images``: the
    run's image-pair path, whose own check (``images.decide``) sets how image pairs run."""
    lm_device = _device(model)
    quantized = getattr(base_causal_lm(model), "is_loaded_in_4bit", False)
    if not sharded and lm_device != device and lm_device.type != "meta" and not quantized:
        model.to(device)
    paths = decide(model, cfg.attention, cfg.prefix_sharing, cfg.packing, device, max_length=cfg.max_length,
                   precision=getattr(cfg, "precision", "fp32"),
                   weights_dtype=torch.bfloat16 if getattr(cfg, "bf16_weights", False) else None,
                   check_real=not sharded)
    if images is not None:  # image pairs: an orpo.image_forward.ImagePath, checked on the real model
        images.decide(model, paths, torch.bfloat16 if getattr(cfg, "precision", "fp32") == "bf16" else None, not sharded)
    say(paths.line())
    return paths
