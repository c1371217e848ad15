"""Tiny random-weight vision-language models built from transformers' configs (no downloads), and
their image inputs made from numpy arrays, as a processor would hand them to the model.

* ``qwen2_vl``: Qwen2-VL, a plain causal decoder with multimodal rotary positions (M-RoPE);
* ``gemma3``: Gemma 3 (``Gemma3ForConditionalGeneration``): bidirectional attention inside each image's
  token range, sliding-window layers (window 8, shorter than the prompts) and a full layer;
* ``paligemma``: PaliGemma: the whole prefix (image and prompt) is bidirectional.

The text decoders use head_dim 64 (a head_dim tq_kernels serves) and a 256-token vocabulary whose last
ids are the image tokens.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VLM_FAMILIES = ["qwen2_vl", "gemma3", "paligemma"]
VOCAB = 256
IMAGE, BOI, EOI = 255, 253, 254  # image placeholder, begin and end of image (Qwen2-VL: vision start/end)
TEXT = dict(
    vocab_size=VOCAB,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
IMAGE_SIDE = 16  # pixels; Gemma 3 and PaliGemma: 4x4 patches of 4 pixels
QWEN_PATCH = 2  # Qwen2-VL: 8x8 patches of 2 pixels, merged 2x2 into 16 image tokens
TOKENS_PER_IMAGE = {"qwen2_vl": 16, "gemma3": 16, "paligemma": 16}


def tiny_vlm(family: str, seed: int = 0) -> torch.nn.Module:
    """A float32 VLM in eval mode with random weights (``torch.manual_seed(seed)``)."""
    siglip = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIDE,
        patch_size=4,
        num_channels=3,
    )
    if family == "qwen2_vl":
        cfg = Qwen2VLConfig(
            text_config=dict(
                **TEXT,
                hidden_size=256,  # Qwen2-VL's head_dim is hidden_size // num_attention_heads
                num_hidden_layers=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
            ),
            vision_config=dict(
                depth=1,
                embed_dim=32,
                hidden_size=256,
                num_heads=2,
                patch_size=QWEN_PATCH,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            image_token_id=IMAGE,
            video_token_id=252,
            vision_start_token_id=BOI,
            vision_end_token_id=EOI,
        )
        cls: Any = Qwen2VLForConditionalGeneration
    elif family == "gemma3":
        cfg = Gemma3Config(
            text_config=dict(
                **TEXT,
                hidden_size=128,
                num_hidden_layers=3,
                sliding_window=8,
                query_pre_attn_scalar=64,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            ),
            vision_config=siglip,
            mm_tokens_per_image=TOKENS_PER_IMAGE["gemma3"],
            image_token_index=IMAGE,
            boi_token_index=BOI,
            eoi_token_index=EOI,
        )
        cls = Gemma3ForConditionalGeneration
    elif family == "paligemma":
        cfg = PaliGemmaConfig(
            text_config=dict(**TEXT, model_type="gemma", hidden_size=128, num_hidden_layers=2),
            vision_config={**siglip, "projection_dim": 128},
            image_token_index=IMAGE,
            projection_dim=128,
        )
        cls = PaliGemmaForConditionalGeneration
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return cls(cfg).eval()


def image_array(seed: int) -> np.ndarray:
    """An RGB image `[H, W, 3]` in [0, 1], float32, as a decoded picture would be."""
    return np.random.default_rng(seed).random((IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.float32)


def pixel_inputs(family: str, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The model's image inputs for ``images`` (what its processor would produce, without one)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) * 2 - 1  # [N, 3, H, W] in [-1, 1]
    if family != "qwen2_vl":
        return {"pixel_values": x}
    # Qwen2-VL takes flattened patches: each image repeated over the temporal patch (2 frames), split
    # into 2x2-merged groups of patches, one row of C * T * P * P values per patch
    n, c, p, m = x.shape[0], 3, QWEN_PATCH, 2
    g = IMAGE_SIDE // p
    x = x[:, None].expand(n, 2, c, IMAGE_SIDE, IMAGE_SIDE)
    x = x.reshape(n, 2, c, g // m, m, p, g // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return {
        "pixel_values": x.reshape(n * g * g, c * 2 * p * p),
        "image_grid_thw": torch.tensor([[1, g, g]] * n),
    }


def prompt_ids(
    family: str, texts: list[list[int]], images_per_row: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) `[B, T]`: each row ``images_per_row`` images, each after a text token, then
    its text; shorter rows are left-padded (id 0)."""
    image = [IMAGE] * TOKENS_PER_IMAGE[family]
    if family != "paligemma":
        image = [BOI, *image, EOI]
    rows = []
    for text in texts:
        row: list[int] = []
        for i in range(images_per_row):
            row += [5 + i, *image]
        rows.append(row + list(text))
    t = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def model_inputs(
    model: torch.nn.Module, family: str, ids: torch.Tensor, images: list[np.ndarray], mask: torch.Tensor
) -> dict[str, Any]:
    """Keyword arguments for forward/generate: ids, mask, image inputs and the token types the family
    needs (Gemma 3 and PaliGemma's masks read them; Qwen2-VL's M-RoPE does on transformers >= 5.2x)."""
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, **pixel_inputs(family, images)}
    is_image = (ids == IMAGE).long()
    if family == "gemma3":
        kw["token_type_ids"] = is_image
    elif family == "paligemma":
        # 0 for the prefix (image and prompt, bidirectional), 1 for the suffix; the prompt is all prefix
        kw["token_type_ids"] = torch.zeros_like(ids)
    elif "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kw["mm_token_type_ids"] = is_image.int()
    return kw
