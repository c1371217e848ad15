"""Generate text with the reference model on CPU, with a bf16-style DynamicCache and with TurboQuantCache.

    python experiments/reference-model/generate.py [MODEL_DIR] [--prompt TEXT] [--tokens 48]

The same greedy decoding twice: first with transformers' ``DynamicCache``, then with ``TurboQuantCache``
at 134 B per token-head (``turboquant_4bit_nc``, a 16-token exact residual window) and the
``"turboquant"`` attention; prints both continuations, the first position where they differ and the KV
bytes each cache holds.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path, nargs="?", default=HERE / "model")
    ap.add_argument("--prompt", default='def read_config(path):\n    """Read a JSON config file."""\n')
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--format", default="turboquant_4bit_nc")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    import tq_hf

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    ids = tok(args.prompt, return_tensors="pt").input_ids
    runs = {}
    for name in ("DynamicCache", f"TurboQuantCache({args.format})"):
        if name == "DynamicCache":
            model.set_attn_implementation("sdpa")
            cache = DynamicCache(config=model.config)
        else:
            model.set_attn_implementation("turboquant")
            cache = tq_hf.TurboQuantCache(model.config, args.format, residual_length=16)
        with torch.no_grad():
            out = model.generate(ids, past_key_values=cache, max_new_tokens=args.tokens, do_sample=False)
        new = out[0, ids.shape[1] :].tolist()
        runs[name] = new
        held = cache.used_bytes if isinstance(cache, tq_hf.TurboQuantCache) else None
        print(f"===== {name}" + (f" ({held} B of KV vs {cache.dense_bytes()} B in bf16)" if held else ""))
        print(args.prompt + tok.decode(new))
    a, b = runs.values()
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    print(f"===== greedy tokens identical for {len(a) if first is None else first} of {len(a)} steps")


if __name__ == "__main__":
    main()
