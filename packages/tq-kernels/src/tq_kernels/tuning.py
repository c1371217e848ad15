"""Launch configurations per kernel and architecture, in one place.

Values were picked by the sweeps in experiments/kernels/ (H200, Llama-8B shapes); other GPUs fall back
to the same numbers until measured.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = [
    "MAX_SPLITS",
    "MIN_SPLIT_TOKENS",
    "STORE_SMALL_ROWS",
    "LaunchConfig",
    "decode_config",
    "extend_config",
    "launch_key",
    "lookup_launch",
    "rotation_dot_precision",
    "store_config",
]


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    num_warps: int
    num_stages: int
    # decode and extend: the eight-phase loop with register table lookups for formats whose K and V
    # codes are single 4-bit planes (see tq_kernels._kernels.decode).
    nibble: bool = True
    # NIBBLE loop on NVIDIA GPUs: "sym" looks antisymmetric codebooks up with the
    # 18-instruction program (4 table registers) instead of the general 21-instruction one ("exact");
    # a component whose table is not antisymmetric keeps the general program.  "byte" (formats with
    # 4-bit keys and values, on every device) reads byte tables two words at a time
    # (tq_kernels._kernels.decode_pairs): centroids on a 256-level grid, operands in place
    lut: str = "exact"
    # also run the eight-phase loop for formats with 3-bit components (3bit_nc, k3v4_nc)
    nibble_3bit: bool = False
    # decode's eight-phase loop: up to this many BLOCK_N-token tiles a step, stacked in the rows of the
    # score tile that a GQA group smaller than 16 leaves empty (1, 2 or 4; see tq_kernels._kernels.decode)
    chunks: int = 1
    # decode's eight-phase loop: independent chains of score products (1, 2 or 4; see _tq_phase_scores)
    score_chains: int = 1
    # a register cap per thread for ptxas (0: none): fewer registers, more programs resident per SM
    maxnreg: int = 0


_LAUNCH_PREFIX = "tq-launch/v1"


def launch_key(cfg: LaunchConfig) -> str:
    """``cfg`` as a string a custom op can take: its fields in declaration order, booleans as 0/1.

    Example:
        >>> launch_key(LaunchConfig(32, 1, 3, lut="sym"))
        'tq-launch/v1/32/1/3/1/sym/0/1/1/0'
        >>> lookup_launch(launch_key(LaunchConfig(32, 1, 3, lut="sym"))) == LaunchConfig(32, 1, 3, lut="sym")
        True
    """
    if not isinstance(cfg, LaunchConfig):
        raise ValueError(f"config must be a tq_kernels.tuning.LaunchConfig, got {type(cfg).__name__}")
    values = (getattr(cfg, f.name) for f in fields(LaunchConfig))
    return "/".join([_LAUNCH_PREFIX, *(str(int(v) if isinstance(v, bool) else v) for v in values)])


def lookup_launch(key: str) -> LaunchConfig:
    """The :class:`LaunchConfig` of a :func:`launch_key` string."""
    parts = key.split("/") if isinstance(key, str) else []
    names = fields(LaunchConfig)
    if "/".join(parts[:2]) != _LAUNCH_PREFIX or len(parts) != 2 + len(names):
        raise ValueError(f"{key!r} is not a launch configuration key (expected one made by launch_key)")
    values: dict[str, int | bool | str] = {}
    try:
        for f, text in zip(names, parts[2:], strict=True):
            kind = str(f.type)
            values[f.name] = text if kind == "str" else bool(int(text)) if kind == "bool" else int(text)
    except ValueError as e:
        raise ValueError(f"malformed launch configuration key {key!r}: {e}") from e
    return LaunchConfig(**values)  # type: ignore[arg-type]


def _arch(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def decode_config(head_dim: int, group: int, device: torch.device, nibble: bool = False) -> LaunchConfig:
    """Tile and pipelining of the paged decode kernel; ``nibble``: the format runs the eight-phase
    4-bit loop."""
    if _arch(device) == (0, 0):  # the CPU interpreter: small tiles keep it fast
        return LaunchConfig(block_n=32, num_warps=4, num_stages=1)
    if nibble:
        # the phase accumulators are [BLOCK_G, head_dim / 8]: too narrow to split across warps, so
        # each program is one warp (more warps would each redo the whole tile)
        # H200, B32 x 8K (experiments/results/kernels_h200.json "decode_tuning"): 32-token tiles, three
        # stages and 8-16 splits ran 0.233-0.237 ms against 0.507 ms for the plane loop's best; the
        # symmetric lookup took 4-bit to 0.208 ms, and the eight-phase loop took k3v4_nc from 0.542 to
        # 0.255 ms and 3bit_nc from 0.588 to 0.270 ms
        return LaunchConfig(block_n=32, num_warps=1, num_stages=3, lut="sym", nibble_3bit=True)
    # H200, B32 x 8K, 4-bit (experiments/results/kernels_h200.json "decode_tuning"): 128-token tiles
    # with 4 warps ran 0.52 ms against 0.73 ms for 64-token tiles and 0.66 ms for 32 with 2 warps.
    return LaunchConfig(block_n=128, num_warps=4, num_stages=2)


def extend_config(head_dim: int, group: int, device: torch.device) -> LaunchConfig:
    """Tile, pipelining and loop of the extend (prefill over a compressed prefix) kernel.

    The interpreter runs the eight-phase loop where the format allows (as decode does); on GPUs the
    plane loop stays the default until the eight-phase extend loop has been timed and run through the
    GPU tests (``LaunchConfig(nibble=True)`` opts in).
    """
    if _arch(device) == (0, 0):
        return LaunchConfig(block_n=32, num_warps=4, num_stages=1)
    return LaunchConfig(block_n=64, num_warps=4, num_stages=2, nibble=False)


def store_config(num_rows: int, device: torch.device) -> LaunchConfig:
    """Rows per program (``block_n``) and warps of the store kernel for ``num_rows`` (token, head) rows.

    16 rows a program: larger tiles spill (``benchmarks/aot_report.py --kernel store``) and
    ran slower.  H200, CUDA graphs (experiments/results/kernels_h200.json "decode_tuning", op store):
    a decode step's 32 tokens x 8 heads took 0.015 ms with 8 warps against 0.022 with 4; 65536 tokens
    took 2.41 ms with 4 warps against 2.56 with 8.  So stores of up to ``STORE_SMALL_ROWS`` rows (a
    decode step's batch) run 8 warps, larger ones 4 (test_store_gpu_launch_configs runs both on GPUs).
    """
    if _arch(device) != (0, 0) and num_rows <= STORE_SMALL_ROWS:
        return LaunchConfig(block_n=16, num_warps=8, num_stages=1)
    return LaunchConfig(block_n=16, num_warps=4, num_stages=1)


STORE_SMALL_ROWS = 8192  # (token, head) rows: 1024 tokens of 8 KV heads

# Decode context splits (tq_kernels.ops.decode.default_num_splits).  H200 and H100, 4-bit eight-phase
# loop, CUDA graphs (experiments/results/kernels_decode_sweep_*.json): one 128K sequence ran 0.119 ms
# with 128 splits against 0.150 with the earlier cap of 64 (H200); 32 x 8K ran 0.202 ms with 16 splits
# against 0.216 with 9; 32 x 2K ran 0.080 ms with 9 splits against 0.087 with 16, so a split keeps
# at least 256 tokens.
MAX_SPLITS = 128
MIN_SPLIT_TOKENS = 256


def rotation_dot_precision(device: torch.device) -> str:
    """``input_precision`` of the store/dequantize rotation products.

    The interpreter computes exact float32 (``"ieee"``).  On the GPU, exact float32 ``tl.dot`` runs on
    the CUDA cores and spilled registers (8.7 ms to store 16K tokens x 8 heads on the H200); three TF32
    products (``"tf32x3"``) keep float32-level accuracy (codes only move for values within ~1e-6 of a
    decision boundary) on the tensor cores.
    """
    return "ieee" if _arch(device) == (0, 0) else "tf32x3"
