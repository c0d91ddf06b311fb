"""Tiny random image-text checkpoints, built from configs in their own classes (no network).

Each has a two-layer language model (vocabulary of the test tokenizer plus 8 ids for the image,
video and boundary tokens, which the tokenizer never emits) and a one-layer vision tower. Saved as a
user downloads them: the ConditionalGeneration class's safetensors, its composite config, a tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

TOK_VOCAB = 400  # the test tokenizer's vocabulary (conftest._train_tokenizer)
VOCAB = TOK_VOCAB + 8
W = 12  # sliding windows and Llama-4's attention chunks: shorter than the test pairs
IMG, VID, START, END = VOCAB - 1, VOCAB - 2, VOCAB - 3, VOCAB - 4

TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
            pad_token_id=2)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
_QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14)
_QWEN_TOP = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=START, vision_end_token_id=END)
_MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])  # sums to head_dim / 2

# model type -> (text config overrides, vision config overrides, composite config overrides)
FAMILIES = {
    "gemma3": (dict(sliding_window=W, layer_types=["sliding_attention", "full_attention"]), dict(),
               dict(mm_tokens_per_image=1, image_token_id=IMG, boi_token_index=START, eoi_token_index=END)),
    "gemma4": (dict(sliding_window=W, layer_types=["sliding_attention", "full_attention"], vocab_size_per_layer_input=VOCAB,
                    hidden_size_per_layer_input=8),
               dict(head_dim=16, num_key_value_heads=2, patch_size=4, position_embedding_size=64, pooling_kernel_size=2),
               dict(image_token_id=IMG, video_token_id=VID, boi_token_id=START, eoi_token_id=END, audio_token_id=VOCAB - 5,
                    boa_token_id=VOCAB - 6, eoa_token_index=VOCAB - 7)),
    "mistral3": (dict(sliding_window=None), dict(head_dim=16), dict(image_token_id=IMG, spatial_merge_size=1)),
    "qwen2_5_vl": (dict(rope_parameters=_MROPE), dict(_QWEN_VISION, fullatt_block_indexes=[0]), _QWEN_TOP),
    "qwen3_vl": (dict(rope_parameters=dict(_MROPE, mrope_interleaved=True)),
                 dict(_QWEN_VISION, deepstack_visual_indexes=[0], num_position_embeddings=16), _QWEN_TOP),
    "qwen3_5": (dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=2,
                     linear_key_head_dim=16, linear_value_head_dim=16),
                dict(_QWEN_VISION, num_position_embeddings=16), _QWEN_TOP),
    "llama4": (dict(intermediate_size_mlp=96, num_local_experts=2, attention_chunk_size=W, no_rope_layers=[1, 0],
                    interleave_moe_layer_step=1),
               dict(vision_output_dim=64, projector_input_dim=64, projector_output_dim=64, pixel_shuffle_ratio=0.5,
                    rope_theta=10000),
               dict(image_token_index=IMG, boi_token_index=START, eoi_token_index=END)),
    "llava": (dict(), dict(), dict(image_token_id=IMG, vision_feature_layer=-1)),
    "smolvlm": (dict(), dict(image_size=28, patch_size=14), dict(image_token_id=IMG, scale_factor=2)),
}


def config(model_type: str):
    from transformers import AutoConfig

    text, vision, top = FAMILIES[model_type]
    base = AutoConfig.for_model(model_type)
    cls = type(base)

    def sub_class(name):  # the sub-config's own class (some composite configs declare AutoConfig)
        declared = cls.sub_configs[name]
        return type(getattr(base, name)) if declared is AutoConfig else declared

    tc = sub_class("text_config")(**{**TEXT, **text})
    vc = sub_class("vision_config")(**{**VISION, **vision})
    return cls(text_config=tc.to_dict(), vision_config=vc.to_dict(), **top)


def build(model_type: str, seed: int = 0, std: float = 0.3):
    """A tiny random fp32 image-text model in its own class (weights at std 0.3, as tests/archs.py)."""
    import transformers
    from transformers import AutoModelForImageTextToText

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config(model_type), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, std)
    return model


def save(model_type: str, folder: Path, tokenizer, seed: int = 0) -> Path:
    """The checkpoint folder a user would download: weights in the model's own class, config, tokenizer."""
    build(model_type, seed).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def vision_state(folder: Path) -> dict[str, torch.Tensor]:
    """The saved tensors of everything but the language model (vision tower, projector), by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            if any(part in k for part in ("vision", "visual", "projector", "multi_modal", "connector")):
                out[k] = v
    return out
