"""Which fast paths this model may use, proven on the model itself at start-up.

A packed, prefix-shared row ``[prompt, chosen, rejected]`` is exact only if tokens meet through
attention alone, attention sees only what the layout allows (windows, soft-caps and sinks included)
and the head is what we think it is. None of that is assumed: :func:`decide` runs two short random
pairs through each candidate path and through the model's own stock forward (its own attention and
mask, one sequence per row, full logits) and compares the per-token log-probs and the gradient of the
last two decoder layers' weights. The first candidate that agrees is used:

    attention: blocks (CPU) or flex (CUDA)  ->  mask  ->  separate (one sequence per row, as TRL)
    head:      linear (chunked from the weight)  ->  module (the head, chunk by chunk)  ->  model

"separate" with the "model" head is the model's own forward, mask and head; it is exact by
construction and is still checked. A name list only speeds the decision up: models known to mix
tokens outside attention skip the packed candidates (a packed row would leak), and no model is
accepted on its name alone.
"""

from __future__ import annotations

import numpy as np
import torch

from . import attention
from .data.batching import collate
from .data.templates import TokenizedPair
from .errors import UserError
from .forward import Paths, PolicyForward, head_transform, resolve_attention, smallest_window
from .loss import orpo_loss
from .model import base_causal_lm
from .multimodal import language_decoder, text_config

# Per-token log-probs may differ by this (absolute, plus relative) in fp32: SDPA over blocks and the
# chunked head sum in another order. A token that sees what it must not moves them by far more.
LOGP_TOL = 1e-4
GRAD_TOL = 1e-3  # relative L2 error of the checked gradient

# Layer kinds and model types whose layers mix tokens outside attention.
_MIXER_LAYERS = {"conv": "a short convolution", "mamba": "Mamba (SSM) layers",
                 "linear_attention": "linear attention"}
_MIXER_MODELS = {"lfm2": "a short convolution", "lfm2_moe": "a short convolution",
                 "granitemoehybrid": "Mamba (SSM) layers", "jamba": "Mamba (SSM) layers",
                 "falcon_h1": "Mamba (SSM) layers", "nemotron_h": "Mamba (SSM) layers", "bamba": "Mamba (SSM) layers",
                 "zamba": "Mamba (SSM) layers", "zamba2": "Mamba (SSM) layers", "mamba": "Mamba (SSM) layers",
                 "mamba2": "Mamba (SSM) layers", "falcon_mamba": "Mamba (SSM) layers",
                 "qwen3_next": "linear attention", "qwen3_5": "linear attention", "qwen3_5_text": "linear attention",
                 "qwen3_5_moe": "linear attention", "olmo_hybrid": "linear attention", "rwkv": "RWKV recurrences",
                 "recurrent_gemma": "recurrent layers", "minimax": "linear attention"}


def token_mixer(config) -> str | None:
    """What, besides attention, mixes tokens in this model's layers, if a name says so. The model type
    is asked first: transformers labels Jamba's and Granite-4.0-H's Mamba layers "linear_attention" in
    ``layer_types``, which would name the wrong mechanism in the line the user reads."""
    known = _MIXER_MODELS.get(getattr(config, "model_type", ""))
    if known is not None:
        return known
    for t in getattr(config, "layer_types", None) or []:
        for kind, words in _MIXER_LAYERS.items():
            if kind in str(t):
                return words
    return None


def synthetic_pairs(vocab: int, max_length: int, window: int | None, seed: int = 0) -> list[TokenizedPair]:
    """Two random pairs (two, so that a packed row has a pair to leak into), chosen and rejected of
    different lengths; where the model has a sliding window that a pair of ``max_length`` tokens could
    exceed, long enough to exceed it."""
    rng = np.random.default_rng(seed)
    base = 8 if window is None or window >= max_length else max(8, (window + 8) // 2)
    out = []
    for i, (p, c, r) in enumerate([(base, base // 2 + 3, base // 2 + 1), (base // 2 + 1, base + 2, base)]):
        ids = lambda n: rng.integers(3, vocab, n).astype(np.int32)  # noqa: E731
        out.append(TokenizedPair(prompt=ids(p), chosen=ids(c), rejected=ids(r), where=f"check:{i}"))
    return out


def _checked_params(lm) -> list[torch.Tensor]:
    """The weights whose gradient is compared: the last two decoder layers' (a sliding and a full
    layer where they alternate). Every forward error upstream changes their gradient through the
    activations, and the backward of our attention and head runs through them; stopping the backward
    there keeps the check cheap (on CPU a backward pass streams every weight it reaches)."""
    decoder = language_decoder(lm)
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None) or getattr(decoder, "blocks", None)
    mods = list(layers)[-2:] if layers is not None and len(layers) else [decoder]
    return [p for m in mods for p in m.parameters() if p.requires_grad and p.is_floating_point()]


def _loss(logps, batch, beta=0.5):
    nll = float((batch.kind == 1).sum())
    return orpo_loss(logps, batch.pair, batch.kind, batch.n_pairs, beta, False, nll, batch.n_pairs).loss


def reference(lm, pairs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-token log-probs (in collate's order: chosen then rejected, pair by pair) from the model's own
    forward, one sequence per right-padded row with its own 2D mask and full logits (what TRL runs), and
    the checked gradient of the ORPO loss over them. One batched call: on CPU the weights' memory
    traffic, not the few tokens, is the cost of a forward."""
    dev = next(lm.parameters()).device
    batch = collate(pairs, False, False).to(dev)
    logits = lm(input_ids=batch.input_ids, attention_mask=batch.layout.padding_mask(dev), use_cache=False).logits
    logp = torch.log_softmax(logits.flatten(0, 1).index_select(0, batch.src).float(), -1)
    logps = logp.gather(1, batch.target[:, None]).squeeze(1)
    params = _checked_params(lm)
    grads = torch.autograd.grad(_loss(logps, batch), params, allow_unused=True) if params else []
    return logps.detach(), list(grads)


def prove(model, paths: Paths, pairs, ref) -> str | None:
    """None if ``paths`` gives the model's own numbers on ``pairs``; else why not, in a few words."""
    lm = base_causal_lm(model)
    dev = next(lm.parameters()).device
    policy = PolicyForward(model, paths).eval()  # (eval as the model is: decide() restores its mode)
    try:
        batch = policy.collate(pairs, prompt_in_nll=False).to(dev)
        logps = policy(batch)
        # collate emits scored tokens pair by pair, chosen then rejected, as the reference does
        err = (logps.detach() - ref[0]).abs() - LOGP_TOL * ref[0].abs()
        if not bool(torch.isfinite(logps).all()) or float(err.max()) > LOGP_TOL:
            return f"log-probs off by up to {float((logps.detach() - ref[0]).abs().max()):.2g}"
        params = _checked_params(lm)
        if params:
            grads = torch.autograd.grad(_loss(logps, batch), params, allow_unused=True)
            if any((g is None) != (r is None) for g, r in zip(grads, ref[1])):
                return "gradient reaches other weights"
            # one relative error over all checked weights: a key bias, say, has a zero gradient in exact
            # arithmetic, and its rounding noise alone must not reject a path
            g = torch.cat([x.flatten() for x in grads if x is not None])
            r = torch.cat([x.flatten() for x in ref[1] if x is not None])
            rel = float((g - r).norm()) / max(float(r.norm()), 1e-30)
            if rel > GRAD_TOL:
                return f"gradient off by {rel:.2g} (relative)"
    except Exception as e:  # a path the model's code cannot run at all is not used
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        attention.disable(text_config(lm.config))
    return None


def _head_candidates(lm) -> list[str]:
    head = lm.get_output_embeddings()
    scale, softcap = head_transform(text_config(lm.config))
    out = []
    if type(head) is torch.nn.Linear and not softcap and not (head.bias is not None and scale != 1.0):
        out.append("linear")
    if isinstance(head, torch.nn.Module):
        out.append("module")
    return out + ["model"]


def decide(model, attention: str = "auto", prefix_sharing: bool = True, packing: bool = True, device=None,
           max_length: int = 1024) -> Paths:
    """The fastest path that gives this model's own numbers. ``attention`` other than 'auto' forces
    that mode: if the check rejects it, a :class:`UserError` says why."""
    lm = base_causal_lm(model)
    dev = device or next(lm.parameters()).device
    mixer = token_mixer(text_config(lm.config))
    forced = attention != "auto"
    first = resolve_attention(attention, torch.device(dev))
    if forced:
        modes = [first]
    elif mixer:
        modes = ["separate"]
    else:
        modes = [first, "mask", "separate"] if first != "mask" else ["mask", "separate"]
    vocab = min(lm.get_output_embeddings().weight.shape[0], lm.get_input_embeddings().weight.shape[0])
    pairs = synthetic_pairs(vocab, max_length, smallest_window(text_config(lm.config)))
    was_training = model.training
    model.eval()  # dropout (if kept) off: both sides must be deterministic
    try:
        ref = reference(lm, pairs)
        rejected = {}
        for mode in modes:
            sep = mode == "separate"
            for head in _head_candidates(lm):
                paths = Paths(mode, prefix_sharing and not sep, packing and not sep, head)
                why = prove(model, paths, pairs, ref)
                if why is None:
                    paths.rejected = rejected
                    paths.reason = _reason(paths, mixer, rejected, forced)
                    return paths
                rejected[paths.name] = why
    finally:
        model.train(was_training)
    detail = "; ".join(f"{k}: {v}" for k, v in rejected.items())
    if forced:
        raise UserError(f"--attention {attention}: does not give this model's own log-probs ({detail}); "
                        "use --attention auto, which falls back to a path that does")
    raise UserError(f"{getattr(lm.config, 'model_type', 'this model')}: no way of computing its log-probs matched its "
                    f"own forward ({detail}); please report this model")


def _reason(paths: Paths, mixer, rejected: dict, forced: bool) -> str:
    if mixer and paths.attention == "separate":
        return f"this model mixes tokens with {mixer}, so pairs never share a row"
    if forced:
        return "as asked; checked against the model's own forward"
    if rejected:
        first = next(iter(rejected.items()))
        return f"checked against the model's own forward; {first[0]} did not match: {first[1]}"
    return "checked against the model's own forward"


def choose_paths(model, cfg, device, say) -> Paths:
    """:func:`decide` for a run's config, moving the model to ``device`` first (the check is a few
    forward passes, and a GPU's numbers are the ones that count); prints the one line."""
    lm_device = next(model.parameters()).device
    if lm_device != device and lm_device.type != "meta" and not getattr(model, "is_loaded_in_4bit", False):
        model.to(device)
    paths = decide(model, cfg.attention, cfg.prefix_sharing, cfg.packing, device, max_length=cfg.max_length)
    say(paths.line())
    return paths
