"""Lean activations: RMSNorm and the gated MLP keeping less for the backward pass, for the model's own
numbers. A module is patched only after its patched forward and backward equal its own on a random
input; see :func:`lean_activations`."""

from __future__ import annotations

import functools
import inspect

from .model import base_causal_lm


def _lean_rms_norm_fn():
    import torch

    class LeanRMSNorm(torch.autograd.Function):
        """``y = w * (x * r).to(x.dtype)`` with ``r = rsqrt(mean(x^2) + eps)`` over the last dim, x in fp32,
        as Llama's RMSNorm computes it, op for op, but keeping only ``x`` (which the residual stream
        holds anyway) and ``r`` (one float per token) instead of the normalised fp32 copy. The backward
        is the closed form: with xh = x * r and g = dy * w, dw = sum(dy * xh) and
        dx = r * (g - xh * mean(g * xh)).  x: (..., H), w: (H,), r: (..., 1)."""

        @staticmethod
        def forward(ctx, x, weight, eps):
            xf = x.to(torch.float32)
            r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            ctx.save_for_backward(x, weight, r)
            return weight * (xf * r).to(x.dtype)

        @staticmethod
        def backward(ctx, dy):
            x, weight, r = ctx.saved_tensors
            xh = x.to(torch.float32) * r
            dw = None
            if ctx.needs_input_grad[1]:  # a plain sum over tokens: einsum takes a slow path on CPU here
                dw = (dy * xh.to(x.dtype)).reshape(-1, xh.shape[-1]).sum(0).to(weight.dtype)
            g = (dy * weight).to(torch.float32)
            m = torch.linalg.vecdot(g, xh).unsqueeze(-1).div_(xh.shape[-1])
            return torch.addcmul(g, xh, m, value=-1).mul_(r).to(x.dtype), dw, None

    return LeanRMSNorm


def _lean_norm_forward(module, norm_fn, hidden_states):
    import torch

    if module.training and torch.is_grad_enabled():
        return norm_fn.apply(hidden_states, module.weight, module.variance_epsilon)
    return type(module).forward(module, hidden_states)


def _gated(act, gate, up):
    return act(gate) * up


def _lean_mlp_forward(module, x):
    from torch.utils.checkpoint import checkpoint

    gate, up = module.gate_proj(x), module.up_proj(x)
    if module.training and (gate.requires_grad or up.requires_grad):
        # act(gate) is recomputed from gate in the backward: one element-wise kernel, T x I values less
        return module.down_proj(checkpoint(_gated, module.act_fn, gate, up, use_reentrant=False,
                                           preserve_rng_state=False, determinism_check="none"))
    return module.down_proj(_gated(module.act_fn, gate, up))


def _takes_one_input(module) -> bool:
    """Whether the module's own ``forward`` takes exactly one argument (the hidden states) and nothing
    else: the only call the lean forwards replace and the only one ``_same_numbers`` can prove. A norm
    whose forward takes more (Granite-4.0-H's gated RMSNorm is called as ``norm(x, gate)``), optional
    or not, or ``*args`` / ``**kwargs``, is left alone."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _same_numbers(module, lean_forward) -> bool:
    """Whether ``lean_forward`` gives the module's own output and gradients (input and weights) on a
    random input, in training mode: the proof a module needs before it is patched."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    ref = next(iter(module.parameters()))
    width = getattr(module, "hidden_size", None) or ref.shape[-1]
    if getattr(module, "gate_proj", None) is not None:
        width = module.gate_proj.weight.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 3, width, generator=gen).to(ref.device, ref.dtype)
    was = module.training
    module.train()
    try:
        outs = []
        for fwd in (lambda h: type(module).forward(module, h), lean_forward):
            h = x.clone().requires_grad_(True)
            y = fwd(h)
            dy = torch.ones_like(y) + 0.1 * torch.arange(y.numel(), device=y.device, dtype=y.dtype).reshape(y.shape).sin()
            outs.append((y.detach(), *torch.autograd.grad(y, [h, *params], dy, allow_unused=True)))
    except Exception:
        return False
    finally:
        module.train(was)
    tol = dict(rtol=1e-4, atol=1e-5) if ref.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    return all((a is None and b is None) or (a is not None and b is not None and torch.allclose(a, b, **tol))
               for a, b in zip(*outs))


def lean_activations(model) -> int:
    """Keep less for the backward pass in every decoder layer, for the same numbers: each RMSNorm keeps
    its input and one float per token instead of a normalised fp32 copy (T x H x 4 bytes, two norms per
    layer), and the gated MLP recomputes ``act(gate)`` from ``gate`` (T x I x 2 bytes under bf16
    autocast). For SmolLM2 that is 230 of the 1,300 KB per token that autograd keeps.

    The norm's forward is Llama's op for op and its backward the closed form (equal within fp32
    rounding); the MLP's recomputation runs the model's own activation on the same input
    (non-reentrant ``torch.utils.checkpoint``, bitwise equal). A module is patched only after its
    patched forward and backward are checked against its own on a random input (a norm with another
    formula, Gemma's ``1 + weight`` say, or an MLP wired otherwise is left alone), and only when its own
    forward takes the one input the check calls it with (a forward that takes a gate or any other
    argument is left alone, so the check always proves the call the model makes). Only instance
    ``forward`` attributes change: weights, state dict and saving are untouched, and in eval or under
    ``no_grad`` the original forward runs. Not for sharded engines (ZeRO-3 gathers weights in module
    hooks that a recomputation would bypass), layer checkpointing (which recomputes everything anyway)
    or Liger and ``torch.compile`` (which fuse these ops themselves). Returns how many modules changed."""
    norm_fn = _lean_rms_norm_fn()
    changed = 0
    for module in base_causal_lm(model).get_decoder().modules():
        if hasattr(module, "weight") and hasattr(module, "variance_epsilon") and getattr(module, "weight") is not None:
            lean = functools.partial(_lean_norm_forward, module, norm_fn)
        elif all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            lean = functools.partial(_lean_mlp_forward, module)
        else:
            continue
        if _takes_one_input(module) and _same_numbers(module, lean):
            module.forward = lean
            changed += 1
    return changed
