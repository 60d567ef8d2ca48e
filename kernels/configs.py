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

# (variant, is_fp32, causal) -> [(head_dim upper bound, config)]: the first row whose bound is
# >= head_dim wins. fp16/bf16 V2 rows: best of the 2026-11-24 H100 sweep (benchmarks/NOTES.md),
# triton 3.6, tensor descriptors; the float32 and V1 rows are sized to fit shared memory.
_CUDA_TABLE: dict[tuple[str, bool, bool], list[tuple[int, TileConfig]]] = {
    ("v2", False, False): [
        (64, TileConfig(128, 128, 4, 3)),
        (128, TileConfig(128, 128, 8, 3)),
        (256, TileConfig(64, 64, 4, 2)),
    ],
    ("v2", False, True): [
        (64, TileConfig(128, 128, 4, 3)),
        (128, TileConfig(128, 128, 8, 3)),
        (256, TileConfig(64, 64, 4, 2)),
    ],
}
for _causal in (False, True):
    _CUDA_TABLE[("v2", True, _causal)] = [
        (64, TileConfig(64, 64, 4, 2)),
        (128, TileConfig(64, 32, 4, 2)),
        (256, TileConfig(32, 32, 4, 1)),
    ]
    _CUDA_TABLE[("v1", False, _causal)] = [
        (128, TileConfig(64, 64, 4, 1)),
        (256, TileConfig(32, 32, 4, 1)),
    ]
    _CUDA_TABLE[("v1", True, _causal)] = [
        (64, TileConfig(64, 32, 4, 1)),
        (128, TileConfig(32, 32, 4, 1)),
        (256, TileConfig(16, 32, 4, 1)),
    ]
    # Split-KV decode: memory-bound; block_m is the cap on (GQA group x query rows) per tile.
    # 64-key tiles, 3 stages, with one program per multiprocessor (_launch._num_splits): best
    # of the 2026-11-30 H200 sweep at 4 of its 6 points (B8 H32 Hkv 32/8, Sk 1k/8k/32k, D128)
    # and within 1% at Hkv 32, Sk 32k (benchmarks/NOTES.md)
    _CUDA_TABLE[("splitkv", False, _causal)] = [
        (128, TileConfig(64, 64, 4, 3)),
        (256, TileConfig(32, 32, 4, 2)),
    ]
    _CUDA_TABLE[("splitkv", True, _causal)] = [
        (128, TileConfig(32, 32, 4, 2)),
        (256, TileConfig(16, 32, 4, 1)),
    ]


def tile_config(variant: str, device: torch.device, head_dim: int, dtype: torch.dtype,
                causal: bool) -> TileConfig:
    """The tile configuration a kernel launch uses."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    rows = _CUDA_TABLE[(variant, dtype == torch.float32, causal)]
    for bound, cfg in rows:
        if head_dim <= bound:
            return cfg
    raise ValueError(f"head_dim must be <= 256, got {head_dim}")
