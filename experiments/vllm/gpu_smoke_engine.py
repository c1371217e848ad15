"""One config of gpu_smoke.py inside its own process: the small Llama / Mistral (sliding window) configs,
the configs' table, the seeded weights, and the offline ``LLM`` run that records greedy tokens,
logprobs, prefix-cache hits, a teacher-forced replay and the KV capacity (see gpu_smoke.py)."""

from __future__ import annotations

import json
import os
import random
import time
import zlib
from pathlib import Path

MODELS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
              "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
              "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 32000},
    "mistral-sw": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 512,
                   "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
                   "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 32000, "sliding_window": 256},
}  # fmt: skip
COMMON = {"max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
# name: (model, kv-cache dtype, attention backend, TQ_VLLM_FULL_CAPACITY, baseline)
CONFIGS = {
    "bf16-flash": ("llama", "auto", "FLASH_ATTN", False, None),
    "bf16-custom": ("llama", "auto", "CUSTOM", False, "bf16-flash"),
    "k8v4": ("llama", "turboquant_k8v4", "CUSTOM", False, "bf16-flash"),
    "4bit_nc": ("llama", "turboquant_4bit_nc", "CUSTOM", False, "bf16-flash"),
    "k3v4_nc": ("llama", "turboquant_k3v4_nc", "CUSTOM", False, "bf16-flash"),
    "3bit_nc": ("llama", "turboquant_3bit_nc", "CUSTOM", False, "bf16-flash"),
    "4bit_nc-full": ("llama", "turboquant_4bit_nc", "CUSTOM", True, "bf16-flash"),
    "4bit_nc-vllm": ("llama", "turboquant_4bit_nc", None, False, "bf16-flash"),  # vLLM's own backend
    "sw-bf16-flash": ("mistral-sw", "auto", "FLASH_ATTN", False, None),
    "sw-4bit_nc": ("mistral-sw", "turboquant_4bit_nc", "CUSTOM", False, "sw-bf16-flash"),
}
LENGTHS = [40, 300, 700, 1500, 2500, 100, 64, 900]  # >1024 are prefilled in chunks
GEN = 48
TIMEOUT = int(os.environ.get("SMOKE_TIMEOUT", "420"))  # seconds per config (first starts compile kernels)


def set_weights(model) -> None:
    """Seeded random weights at unit activation scale, the same for every config (see module doc)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if p.dim() == 1:
                p.fill_(1.0)  # norms
                continue
            gain = 8.0 if "lm_head" in name else 1.0  # sharp logits keep greedy choices off near-ties
            std = 1.0 if "embed" in name else gain * p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g).mul_(std).to(p.dtype))


def run_one(name: str) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model, kv, backend, full, _ = CONFIGS[name]
    mdir = Path(f"/tmp/tq_smoke_{model}")
    mdir.mkdir(exist_ok=True)
    (mdir / "config.json").write_text(json.dumps({**MODELS[model], **COMMON}))
    import vllm
    from vllm import LLM, SamplingParams

    import tq_vllm
    from tq_vllm.patches import self_check

    tq_vllm.register()  # what vLLM's loader does; also applies full capacity when the env asks
    kw = dict(model=str(mdir), load_format="dummy", skip_tokenizer_init=True, kv_cache_dtype=kv, seed=0,
              dtype="bfloat16", max_model_len=4096, max_num_seqs=16, max_num_batched_tokens=1024,
              enable_prefix_caching=True, gpu_memory_utilization=0.3)  # fmt: skip
    if backend:
        kw["attention_backend"] = backend
    t0 = time.perf_counter()
    llm = LLM(**kw)
    init_s = time.perf_counter() - t0
    llm.apply_model(set_weights)
    rng = random.Random(0)
    vocab = MODELS[model]["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in LENGTHS]
    greedy = SamplingParams(max_tokens=GEN, temperature=0.0, ignore_eos=True, detokenize=False, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    seqs = [{"tokens": list(o.outputs[0].token_ids),
             "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]}
            for o in outs]  # fmt: skip
    # prefix-cache hits: the 2500-token prompt's first 2048 tokens with new tails
    shared = [prompts[4][:2048] + [rng.randrange(3, vocab) for _ in range(50)] for _ in range(4)]
    hits = llm.generate([{"prompt_token_ids": p} for p in shared], greedy, use_tqdm=False)
    # prefill path vs decode path: teacher-force sequence 3's completion back through a prefill
    score = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0)
    p3 = prompts[3]
    (rep,) = llm.generate([{"prompt_token_ids": p3 + seqs[3]["tokens"]}], score, use_tqdm=False)
    prompt_lp = [
        None if lp is None else lp[t].logprob
        for lp, t in zip(rep.prompt_logprobs[: len(p3)], p3, strict=True)
    ]
    replay = [lp[t].logprob for lp, t in zip(rep.prompt_logprobs[len(p3) :], seqs[3]["tokens"], strict=True)]
    cc = llm.llm_engine.vllm_config.cache_config
    return {"name": name, "model": model, "kv": kv, "backend": backend, "full_capacity": full,
            "vllm": vllm.__version__, "patches": self_check(), "skip_layers": list(cc.kv_cache_dtype_skip_layers),
            "kv_capacity_tokens": (cc.num_gpu_blocks or 0) * cc.block_size, "block_size": cc.block_size,
            "init_s": round(init_s, 1), "seqs": seqs, "prompt_logprobs_3": prompt_lp,
            "replay_logprobs_3": replay, "cached_tokens": [o.num_cached_tokens for o in hits],
            "hit_tokens": [list(o.outputs[0].token_ids) for o in hits]}  # fmt: skip
