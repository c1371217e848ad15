"""vlm.py's row: the dummy Gemma 3 engine of one row, its prompts and the attention probe (in its own process)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tq_core.eval.results import gpu_name

# name: (kv_cache_dtype, attention_backend (None: vLLM picks one with media-range support), full capacity)
ROWS = {"bf16": ("auto", None, False), "ours-4bit": ("turboquant_4bit_nc", "CUSTOM", False),
        "ours-4bit-full": ("turboquant_4bit_nc", "CUSTOM", True)}  # fmt: skip
STRIDE = 4  # probe rows kept: every 4th token of the prompt


def prompts(n: int, images: int, tiny: bool) -> list[dict]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        words = [" ".join(f"w{int(w)}" for w in rng.integers(0, 2000, 6)) for _i in range(images + 1)]
        text = "<bos> " + " <start_of_image> ".join(words)
        imgs = [
            Image.fromarray(rng.integers(0, 255, (64 if tiny else 224, 80, 3), dtype=np.uint8))
            for _ in range(images)
        ]
        out.append({"prompt": text, "multi_modal_data": {"image": imgs}})
    return out


def record_attention(model, probe_dir: str) -> int:
    """Wrap each attention layer's impl.forward to save its prefill outputs (runs in the worker)."""
    import torch
    from vllm.model_executor.layers.attention.attention import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for idx, layer in enumerate(layers):
        impl, calls = layer.impl, [0]

        def forward(*args, _orig=impl.forward, _idx=idx, _calls=calls, **kw):
            out = _orig(*args, **kw)
            meta = args[5] if len(args) > 5 else kw.get("attn_metadata")
            on = os.path.exists(f"{probe_dir}/ON")  # the probe only, not the timed batch
            if on and meta is not None and getattr(meta, "max_query_len", 1) > 1:
                rows = out.view(out.shape[0], -1)[: meta.num_actual_tokens : STRIDE]
                torch.save(rows.to(torch.float16).cpu(), f"{probe_dir}/{_idx:03d}_{_calls[0]:04d}.pt")
                _calls[0] += 1
            return out

        impl.forward = forward
    return len(layers)


def run_row(name: str, a: argparse.Namespace) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    kv, backend, full = ROWS[name]
    if backend == "CUSTOM":
        import tq_vllm

        tq_vllm.register()
    import vllm
    from vllm import LLM, SamplingParams

    mdir = Path(f"/tmp/tq_vlm_{'tiny' if a.tiny else 'gemma3-4b'}")
    if not (mdir / "config.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("vlm_model.py")), str(mdir)]
                       + (["--shape", "tiny", "--max-len", "4096"] if a.tiny else []), check=True)  # fmt: skip
    kw = dict(model=str(mdir), load_format="dummy", dtype="bfloat16", kv_cache_dtype=kv, seed=0,
              max_model_len=4096 if a.tiny else 12288, max_num_seqs=a.requests, enable_prefix_caching=False,
              limit_mm_per_prompt={"image": a.images}, max_num_batched_tokens=a.batched_tokens,
              disable_log_stats=False, gpu_memory_utilization=0.85, compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]})  # fmt: skip
    if backend:
        kw["attention_backend"] = backend
    llm = LLM(**kw)
    cc = llm.llm_engine.vllm_config.cache_config
    reqs = prompts(a.requests, a.images, a.tiny)
    probe = Path(a.out) / f"probe_{name}"
    probe.mkdir(parents=True, exist_ok=True)
    for f in probe.glob("*.pt"):
        f.unlink()
    num_layers = llm.apply_model(lambda m: record_attention(m, str(probe)))[0]
    greedy = dict(temperature=0.0, ignore_eos=True)
    (probe / "ON").touch()
    llm.generate(reqs[:1], SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
    (probe / "ON").unlink()
    outs = llm.generate(reqs, SamplingParams(max_tokens=a.gen, **greedy), use_tqdm=False)
    tpot = sorted((m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1)
                  for o in outs if (m := o.metrics) is not None and m.num_generation_tokens > 1)  # fmt: skip
    return {"row": name, "kv_cache_dtype": kv, "attention_backend": backend, "full_capacity": full,
            "vllm": vllm.__version__, "gpu": gpu_name(), "num_attention_layers": num_layers,
            "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
            "media_tokens_per_request": 256 * a.images, "kv_capacity_tokens": (cc.num_gpu_blocks or 0) * cc.block_size,
            "tpot_p50_ms": round(1000 * tpot[len(tpot) // 2], 3) if tpot else None,
            "tokens": [list(o.outputs[0].token_ids) for o in outs]}  # fmt: skip
