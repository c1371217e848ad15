"""A dummy-weight Gemma 3 vision-language model directory that vLLM can serve without the hub.

    python experiments/vllm/vlm_model.py DIR [--shape gemma3-4b|tiny]

Writes ``config.json`` (Gemma3ForConditionalGeneration: a prefix-LM model, so vLLM attends
bidirectionally inside each image's 256 tokens), a word-level tokenizer with Gemma 3's image tokens,
and the image processor, all built locally with transformers.  vLLM then loads it with
``load_format="dummy"`` (random weights, the same for every engine of a run).  The text model has
Gemma 3 4B's attention shape (8 query heads, 4 KV heads, head_dim 256, 34 layers), every layer full
attention, so KV capacity compares cleanly (``sliding_window`` None: vLLM 0.26 would otherwise
apply a set ``sliding_window`` to every layer without a per-layer one, and it sizes a sliding layer's
``turboquant_*`` page at ``2 * head_size`` bytes per token-head, 2x bf16's capacity at most); the vision tower is a one-layer SigLIP at 224 px (16 x 16
patches = the 256 tokens an image takes), since only the decoder's KV cache is under test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# Gemma 3's processor wraps each image in "\n\n"; vLLM merges newline runs by their token ids
NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]
WORDS = 2000  # plain words w0 .. w1999 after the special tokens
TEXT = {
    "gemma3-4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=256),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64),
}  # fmt: skip


def vocab() -> dict[str, int]:
    return {t: i for i, t in enumerate([*SPECIAL, *NEWLINES, *(f"w{i}" for i in range(WORDS))])}


def config(shape: str, max_len: int) -> dict:
    v = vocab()
    layers = TEXT[shape]["num_hidden_layers"]
    text = dict(
        TEXT[shape], model_type="gemma3_text", vocab_size=4096, max_position_embeddings=max_len,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=TEXT[shape]["head_dim"],
        sliding_window=None, layer_types=["full_attention"] * layers, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", torch_dtype="bfloat16",
    )  # fmt: skip
    vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, image_size=224, patch_size=14, vision_use_head=False)  # fmt: skip
    return dict(
        architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", text_config=text,
        vision_config=vision, mm_tokens_per_image=256, boi_token_index=v["<start_of_image>"],
        eoi_token_index=v["<end_of_image>"], image_token_index=v["<image_soft_token>"],
        bos_token_id=v["<bos>"], eos_token_id=v["<eos>"], pad_token_id=v["<pad>"], torch_dtype="bfloat16",
    )  # fmt: skip


def build(out: Path, shape: str, max_len: int) -> Path:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ImageProcessor, Gemma3Processor, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config(shape, max_len), indent=1))
    tok = Tokenizer(models.WordLevel(vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken(n, normalized=False) for n in NEWLINES])
    names = dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=list(names.values()), extra_special_tokens=names,
    )  # fmt: skip
    images = Gemma3ImageProcessor(size={"height": 224, "width": 224}, do_pan_and_scan=False)
    Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=256).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(TEXT), default="gemma3-4b")
    ap.add_argument("--max-len", type=int, default=32768)
    a = ap.parse_args()
    print(build(a.out, a.shape, a.max_len))


if __name__ == "__main__":
    main()
