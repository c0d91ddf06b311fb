"""What ``--lora-target all-linear`` means on the model in hand: the linear layers it has that LoRA can
take, and the ones it cannot, each with the reason, in one line.

peft's own ``all-linear`` takes every ``nn.Linear`` but the head, and then, on two families, refuses the
whole run: on MoE models whose experts transformers 5 fuses into 3-D parameters (Mixtral) it turns the
expert names into peft's ``target_parameters``, whose wrapper refuses any ``lora_dropout``; on Mamba
hybrids (Falcon-H1) it refuses ``out_proj``, whose weight the Mamba kernel reads directly. Here the set is
resolved before peft sees it:

- taken: every ``nn.Linear`` (4-bit ones included) or GPT-2 ``Conv1D`` of the language model's decoder;
- skipped, head: the output embedding (as peft does; ``--lora-target ...,lm_head`` names it);
- skipped, bypassed: a projection whose weight a module around it reads directly
  (``self.out_proj.weight`` in Mamba-2's fused kernel, ``self.dt_proj.weight @ ...`` in Jamba): an
  adapter there would never be seen by the forward, so it would silently not train;
- skipped, fused experts: MoE expert weights held as 3-D parameters (``experts.gate_up_proj``), which
  peft adapts only without dropout and which are no linear modules;
- skipped, renamed: on the MoE families peft converts (Qwen3-MoE, Qwen3-Next, DeepSeek-V3, ...) it
  rewrites the names ``gate_proj``, ``up_proj``, ``down_proj`` to the fused experts (its conversion of
  transformers-4 adapters), so a shared expert or dense MLP of that name cannot be targeted;
- skipped, outside the decoder: a vision tower or projector, which orpo keeps frozen.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field

from torch import nn

ALL_LINEAR = "all-linear"
FUSED = "MoE experts fused into 3-D weights, which peft adapts only without dropout"


@dataclass
class LoraTargets:
    """``modules``: what peft gets as ``target_modules`` (leaf names where every module of that name is
    taken, else full names); ``taken``: the leaf names adapted; ``skipped``: {reason: [names]}."""

    modules: list[str]
    taken: list[str]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def line(self) -> str:
        out = f"LoRA targets (all-linear): {', '.join(self.taken)}"
        if self.skipped:
            out += "; skipped: " + "; ".join(f"{', '.join(names)} ({why})" for why, names in self.skipped.items())
        return out


def _linear_classes() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D

        return nn.Linear, Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return (nn.Linear,)


@functools.lru_cache(maxsize=None)
def _class_source(cls: type) -> str:
    parts = []
    for klass in cls.__mro__:
        if klass.__module__.startswith(("torch.", "builtins")):
            continue
        try:
            parts.append(inspect.getsource(klass))
        except (OSError, TypeError):
            pass
    return "\n".join(parts)


def _reads_weight(model: nn.Module, name: str) -> bool:
    """Whether a module around ``name`` reads its weight directly (``self.<path>.weight`` in its code,
    not only its dtype or shape), bypassing the forward an adapter wraps."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        owner = model.get_submodule(".".join(parts[:i]))
        path = re.escape(".".join(parts[i:]))
        used = rf"self\.{path}\.weight\b(?!\.(?:dtype|device|shape|size|ndim|numel))"
        if re.search(used, _class_source(type(owner))):
            return True
    return False


def _renamed_by_peft(model_type: str | None) -> set[str]:
    """Leaf names peft rewrites on this model type before targeting (its conversion of adapters trained
    under transformers 4, where MoE experts were ``nn.Linear``): on Qwen3-MoE, Qwen3-Next, DeepSeek-V3
    and the like a target named ``gate_proj`` becomes the fused experts' ``gate_up_proj``, which then
    refuses dropout, and the shared expert or dense layer of that name is dropped. Such names cannot be
    targeted by name at all."""
    try:
        from peft.utils import transformers_weight_conversion as twc
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return set()
    if model_type is None or get_checkpoint_conversion_mapping(model_type) is None:
        return set()
    base = getattr(twc, "_MODEL_TO_CONVERSION_PATTERN", {}).get(model_type)
    if not getattr(twc, "_MOE_FUSED_TARGETS", {}).get(base):
        return set()
    return set(getattr(twc, "_MOE_TARGET_MODULE_MAPPING", {}).get(base, {}))


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _short(names, parts: int = 1) -> list[str]:
    """The last ``parts`` components of each name, in first-seen order (``model.layers.0.self_attn.q_proj``
    -> ``q_proj``)."""
    return list(dict.fromkeys(".".join(n.split(".")[-parts:]) for n in names))


def _own_forward(module: nn.Module) -> bool:
    """A Linear subclass from a transformers model file whose forward is not ``nn.Linear``'s: peft's LoRA
    layer adds its update to what the forward returns, which need not be a tensor. Quantized linears
    (bitsandbytes, torchao) come from their own packages and are not affected."""
    cls = type(module)
    return (isinstance(module, nn.Linear) and cls.__module__.startswith("transformers.models.")
            and cls.forward is not nn.Linear.forward)


def resolve_all_linear(model: nn.Module, decoder: nn.Module, head: nn.Module | None) -> LoraTargets:
    """The ``all-linear`` set of ``model`` (not yet wrapped by peft): see the module docstring.
    ``decoder``: the language model's decoder inside ``model``; ``head``: its output embedding."""
    linear = _linear_classes()
    named = dict(model.named_modules())
    in_decoder = {n for n, m in named.items() if m is decoder}
    prefix = next(iter(in_decoder), None)
    renamed = _renamed_by_peft(getattr(getattr(model, "config", None), "model_type", None))
    taken, skipped = [], {}

    def skip(why, name):
        skipped.setdefault(why, []).append(name)

    def outside(name):
        return bool(prefix) and not (name == prefix or name.startswith(prefix + "."))

    for name, module in named.items():
        if isinstance(module, linear):
            if head is not None and module is head:
                skip("the output head, as in peft's all-linear", name)
            elif outside(name):
                skip("outside the language model, kept frozen", name)
            elif _leaf(name) in renamed:
                skip("peft maps this name to the fused MoE experts on this model type, so it cannot be targeted", name)
            elif _reads_weight(model, name):
                skip("its layer reads the weight directly, so an adapter would be bypassed", name)
            elif _own_forward(module):
                skip("a model's own Linear subclass with another forward (Llama-4's router returns a tuple), "
                     "which peft's adapter cannot wrap", name)
            else:
                taken.append(name)
        elif not outside(name) and not isinstance(module, nn.modules.conv._ConvNd):  # a convolution's weight is 3-D too
            for p, w in module.named_parameters(recurse=False):
                if w.ndim == 3:
                    skip(FUSED, f"{name}.{p}")
    taken_set = set(taken)
    modules = []
    for leaf in _short(taken):
        same = [n for n in named if _leaf(n) == leaf]  # peft matches a leaf name anywhere in the model
        modules.extend([leaf] if all(n in taken_set for n in same) else [n for n in same if n in taken_set])
    short = {why: _short(names, 2 if why == FUSED else 1) for why, names in skipped.items()}
    return LoraTargets(modules, _short(taken), short)
