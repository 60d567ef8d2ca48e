"""Tile configurations per device, head_dim, dtype and causal flag.

CPU tensors run through Triton's interpreter, where one small configuration is used (no
autotuning: every program runs one after another). CUDA configurations come from the table
below, measured on an H100 (see benchmarks/NOTES.md); other GPUs use the same table, whose
tiles fit the shared memory of Ampere and newer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)

# (variant, head_dim upper bound, is_fp32) -> config; the first row whose bound >= head_dim wins.
_CUDA_TABLE: dict[tuple[str, bool], list[tuple[int, TileConfig]]] = {
    ("v2", False): [
        (64, TileConfig(128, 64, 4, 3)),
        (128, TileConfig(128, 64, 8, 3)),
        (256, TileConfig(64, 64, 4, 2)),
    ],
    ("v2", True): [
        (64, TileConfig(64, 64, 4, 2)),
        (128, TileConfig(64, 32, 4, 2)),
        (256, TileConfig(32, 32, 4, 1)),
    ],
    ("v1", False): [
        (64, TileConfig(64, 64, 4, 1)),
        (128, TileConfig(64, 64, 4, 1)),
        (256, TileConfig(32, 32, 4, 1)),
    ],
    ("v1", True): [
        (64, TileConfig(64, 32, 4, 1)),
        (128, TileConfig(32, 32, 4, 1)),
        (256, TileConfig(16, 32, 4, 1)),
    ],
}


def tile_config(variant: str, device: torch.device, head_dim: int, dtype: torch.dtype,
                causal: bool) -> TileConfig:
    """The tile configuration a kernel launch uses."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    rows = _CUDA_TABLE[(variant, dtype == torch.float32)]
    for bound, cfg in rows:
        if head_dim <= bound:
            return cfg
    raise ValueError(f"head_dim must be <= 256, got {head_dim}")
