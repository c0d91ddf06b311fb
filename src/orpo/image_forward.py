"""Image-text pairs through the model: one sequence per row, the vision encoder once per pair.

A micro-batch that holds an image pair is laid out one sequence per right-padded row (chosen row,
rejected row, pair by pair) and runs through the model's own forward with its own mask. The vision
tower and projector are frozen, so their output is a constant of the pair: it is computed once per pair
under ``torch.no_grad`` (the model's own ``get_image_features``) and handed to the model's forward for
both rows as precomputed encoder outputs (``mm_encoder_outputs``, which transformers 5.25's image-text
classes take in place of ``pixel_values``); the model's own code scatters it into the image-token
positions, builds its own mask (Gemma-3's ``token_type_ids`` let image tokens attend to each other both
ways) and runs the language model. The log-probs and the gradient of every trained weight are therefore
the stock forward's with ``pixel_values``, which :meth:`ImagePath.decide` checks at start-up on the
real model; where they differ (or the class takes no encoder outputs) the run uses the stock forward
with ``pixel_values`` per row, the encoder running for each row, and says so in its path line.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from . import attention
from .data.batching import Batch, collate
from .data.images import image_token_ids, open_image
from .data.templates import TokenizedPair
from .errors import UserError
from .forward import PolicyForward
from .model import base_causal_lm
from .multimodal import is_multimodal, text_config
from .support import _QuietDropout, _checked_params, _loss, real_tolerances, verdict

SHARED, PER_ROW = "encoder once per pair", "the model's own forward with pixel_values per row"
NOT_PIXELS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# processors that load a torchvision video (or image) processor whatever the data holds (transformers 5.25)
TORCHVISION_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "qwen2_5_omni",
                     "qwen3_omni_moe", "glm4v", "glm4v_moe", "gemma4", "llama4", "smolvlm", "mistral3")


def check_model(config, folder, data_name: str) -> None:
    """Image pairs need an image-text checkpoint; a text-only model is refused in one line."""
    if not is_multimodal(config):
        raise UserError(f"{data_name}: the data holds image-text pairs but {folder} is a text-only model (model type "
                        f"{getattr(config, 'model_type', '?')!r}, no vision tower); use an image-text checkpoint "
                        "(docs/models.md) or drop the 'images' field")


def load_processor(folder, trust_remote_code: bool = False):
    """The model's processor (image processor, tokenizer, chat template) from its folder, in one line if it
    cannot load. PIL image processors are used: torchvision (the fast ones') does not import with every
    torch build."""
    import importlib.util

    from transformers import AutoConfig, AutoProcessor

    model_type = getattr(AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code), "model_type", "")
    no_tv = importlib.util.find_spec("torchvision") is None
    torchvision = (f"{folder}: image pairs on {model_type!r} need its processor, whose video or image processor "
                   "needs torchvision, which is not installed here; install the torchvision build that matches your torch "
                   "(from the same index as torch: pip's default one replaces the torch build), or train on text "
                   "pairs, which need no processor (docs/models.md)")
    if no_tv and model_type in TORCHVISION_TYPES:
        raise UserError(torchvision)
    try:
        processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=trust_remote_code, backend="pil")
    except Exception as e:  # noqa: BLE001 - a missing torchvision surfaces as several error types
        if no_tv and "torchvision" in f"{e} {e.__context__}".lower():
            raise UserError(torchvision) from None
        if isinstance(e, ImportError):  # another package the processor needs (SmolVLM's num2words, say)
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise UserError(f"{folder}: the model's processor cannot load here: {first}") from None
        if not isinstance(e, (OSError, ValueError, TypeError, KeyError, AttributeError)):
            raise
        raise UserError(f"{folder}: image pairs need the model's processor (preprocessor_config.json / "
                        f"processor_config.json), which does not load ({(str(e).splitlines() or [type(e).__name__])[0][:160]})") from None
    if getattr(processor, "image_processor", None) is None or not image_token_ids(processor) or not placeholder(processor):
        raise UserError(f"{folder}: the model's processor ({type(processor).__name__}) has no image processor or image "
                        "token; image pairs need an image-text processor")
    return processor


def run_processor(folder, tokenizer, data_name: str, trust_remote_code: bool = False, chat_template=None):
    """The processor a run with image pairs uses: the model must take images (one line if not), and the
    tokenizer's chat template (``--chat-template``, or the tokenizer's where the processor has none) is its."""
    from transformers import AutoConfig

    check_model(AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code), folder, data_name)
    processor = load_processor(folder, trust_remote_code)
    if chat_template or not getattr(processor, "chat_template", None):
        processor.chat_template = tokenizer.chat_template
    return processor


def placeholder(processor) -> str | None:
    """The text that stands for one image before the processor expands it (Gemma-3's start-of-image)."""
    return getattr(processor, "image_token", None) or getattr(processor.tokenizer, "image_token", None)


@dataclass
class Vision:
    """A micro-batch's images: per pair, the image processor's tensors (None for a text pair), and the
    token types of the rows where the model's forward takes them."""

    pixels: list
    token_type_ids: torch.Tensor | None

    def to(self, device) -> "Vision":
        self.pixels = [{k: v.to(device, non_blocking=True) for k, v in p.items()} if p else p for p in self.pixels]
        if self.token_type_ids is not None:
            self.token_type_ids = self.token_type_ids.to(device, non_blocking=True)
        return self


class ImagePath:
    """What a run with image pairs does at collate and forward time; ``mode`` is SHARED or PER_ROW."""

    def __init__(self, model, processor, mode: str = SHARED):
        lm = base_causal_lm(model)
        self.processor, self.mode = processor, mode
        self.accepts = set(inspect.signature(type(lm).forward).parameters)
        self.image_ids = sorted(image_token_ids(processor))
        self.token_types = "token_type_ids" in self.accepts  # Gemma-3: image tokens attend both ways
        self.placeholder = placeholder(processor)

    def pixels(self, refs) -> dict:
        """The processor's tensors for one pair's images that the model's forward takes (pixel_values,
        image_sizes, pixel_attention_mask, ...), made with the processor's own image settings."""
        images = [open_image(r) for r in refs]
        out = self.processor(text=[" ".join([self.placeholder] * len(images))], images=[images], return_tensors="pt")
        return {k: v for k, v in out.items() if k not in NOT_PIXELS and k in self.accepts and torch.is_tensor(v)}

    def collate(self, pairs: list[TokenizedPair], prompt_in_nll: bool, pad_id: int = 0) -> Batch:
        """One sequence per right-padded row (chosen, rejected, pair by pair), with the pairs' pixels."""
        batch = collate(pairs, False, False, prompt_in_nll, pad_id)
        types = None
        if self.token_types:
            types = torch.isin(batch.input_ids, torch.tensor(self.image_ids)).long()
            types *= batch.layout.padding_mask("cpu")
        batch.vision = Vision([self.pixels(p.images) if p.images else None for p in pairs], types)
        return batch

    def inputs(self, lm, batch: Batch, mode: str | None = None) -> tuple[dict, object]:
        """The keyword arguments of the model's own forward for ``batch`` (the way ``mode``, else this
        path's mode, says), and the module that returns the final hidden states (the composite base
        model, under the head)."""
        ids, vision = batch.input_ids, batch.vision
        kw = dict(input_ids=ids, attention_mask=batch.layout.padding_mask(ids.device), use_cache=False)
        if vision.token_type_ids is not None:
            kw["token_type_ids"] = vision.token_type_ids
        rows = [p for p in vision.pixels for _ in range(2)]  # each pair's images, for its chosen and rejected row
        if (mode or self.mode) == SHARED:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            with torch.no_grad():  # frozen encoder: a constant of the pair, computed once
                feats = [lm.get_image_features(**p, return_dict=True).pooler_output if p else None
                         for p in vision.pixels]
            per_row = [f for f in feats for _ in range(2) if f is not None]
            if per_row:
                stacked = torch.is_tensor(per_row[0])  # Gemma-3: one (images, tokens, H) tensor; LLaVA: a list
                flat = [t for f in per_row for t in f]
                pooled = torch.stack(flat) if stacked else flat
                kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        else:
            present = [p for p in rows if p]
            if present:
                for k in present[0]:
                    kw[k] = torch.cat([p[k] for p in present])
        return kw, lm.base_model

    # --------------------------------------------------------------------------------------------
    # The start-up check.

    def synthetic_pairs(self, vocab: int, seed: int = 2) -> list[TokenizedPair]:
        """Two pairs, each prompt holding a random image between random text, completions of other lengths."""
        import io

        from PIL import Image

        rng = np.random.default_rng(seed)
        out = []
        for i, (size, a, b, c, r) in enumerate((((40, 32), 5, 3, 7, 4), ((32, 40), 2, 6, 4, 9))):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, format="PNG")
            ref = buf.getvalue()
            expanded = self.processor(text=[self.placeholder], images=[[open_image(ref)]], add_special_tokens=False)
            special = set(self.processor.tokenizer.all_special_ids) | set(self.image_ids)

            def ids(n):  # random text tokens: never an image token, which would ask for features
                draw = rng.integers(3, vocab, 4 * n + 8)
                return np.asarray([t for t in draw if t not in special][:n], np.int32)

            prompt = np.concatenate([ids(a), np.asarray(expanded["input_ids"][0], np.int32), ids(b)])
            out.append(TokenizedPair(prompt, ids(c), ids(r), f"image check:{i}", (ref,)))
        return out

    def stock(self, lm, batch: Batch):
        """The reference: the model's own forward with pixel_values (and its extras) per row, full logits."""
        dev = batch.input_ids.device
        kw, _ = self.inputs(lm, batch, PER_ROW)
        logits = lm(**kw).logits
        logp = torch.log_softmax(logits.flatten(0, 1).index_select(0, batch.src).float(), -1)
        return logp.gather(1, batch.target[:, None].to(dev)).squeeze(1)

    def decide(self, model, paths, amp=None, check: bool = True) -> str:
        """Set and return this path's mode for ``model``: SHARED where it gives the stock forward's
        log-probs and gradient (checked on the real model, at the run's precision), else PER_ROW with the
        reason. Also sets ``paths.images`` (the words of the run's path line). ``check`` False (weights
        sharded or partitioned here, so the real model cannot run alone): PER_ROW, the stock forward."""
        if not check:
            self.mode = PER_ROW
            paths.images = f"{PER_ROW} (unchecked: the weights are sharded or partitioned here)"
            return self.mode
        lm = base_causal_lm(model)
        dev = next(lm.parameters()).device
        vocab = int(text_config(lm.config).vocab_size)
        pairs = self.synthetic_pairs(vocab)
        params = _checked_params(model)
        tol = real_tolerances(model, amp)
        why = None

        with _QuietDropout(model), torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            batch = self.collate(pairs, False).to(dev)
            ref_lp = self.stock(lm, batch)
            ref = (ref_lp.detach().float(), _grads(_loss(ref_lp, batch), params))
            for mode in (SHARED, PER_ROW):
                self.mode = mode
                try:
                    policy = PolicyForward(model, paths, images=self)
                    lp = policy(batch)
                    cand = (lp.detach().float(), _grads(_loss(lp, batch), params))
                    why_now = verdict(cand, ref, tol=tol)
                except Exception as e:  # noqa: BLE001 - a class that cannot run this way does not use it
                    why_now = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                finally:
                    attention.disable(text_config(lm.config))
                if why_now is None:
                    break
                if mode == PER_ROW:
                    raise UserError(f"{getattr(lm.config, 'model_type', 'this model')}: image pairs: no way of computing "
                                    f"log-probs matched the model's own forward ({why}; per row: {why_now}); please "
                                    "report this model")
                why = why_now
        paths.images = "vision encoder once per pair" if self.mode == SHARED else f"{PER_ROW} ({why})"
        return self.mode


def _grads(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True) if params else []
    return [g.detach().float() if g is not None else None for g in grads]
