"""Launch configurations per kernel and architecture, in one place.

Values were picked by the sweeps in experiments/kernels/ (H200, Llama-8B shapes); other GPUs fall back
to the same numbers until measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LaunchConfig", "decode_config", "extend_config"]


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    num_warps: int
    num_stages: int


def _arch(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def decode_config(head_dim: int, group: int, device: torch.device) -> LaunchConfig:
    """Tile and pipelining of the paged decode kernel."""
    if _arch(device) == (0, 0):  # the CPU interpreter: small tiles keep it fast
        return LaunchConfig(block_n=32, num_warps=4, num_stages=1)
    return LaunchConfig(block_n=64, num_warps=4, num_stages=2)


def extend_config(head_dim: int, group: int, device: torch.device) -> LaunchConfig:
    """Tile and pipelining of the extend (prefill over a compressed prefix) kernel."""
    if _arch(device) == (0, 0):
        return LaunchConfig(block_n=32, num_warps=4, num_stages=1)
    return LaunchConfig(block_n=64, num_warps=4, num_stages=2)
