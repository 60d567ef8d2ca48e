"""Tile configurations per device, head_dim, dtype, causal flag and (V2) grid size.

CPU tensors run through Triton's interpreter, where one small configuration is used (no
autotuning: every program runs one after another). CUDA configurations come from the table
below (V2 at head_dim <= 128 measured on an H100; head_dim 256 and split-KV on an H200), the
small-grid rule for causal V2 and the split-KV grid rule (``splitkv_grid``: its H100 rule
measured on an H100, its other rule on an H200; see benchmarks/NOTES.md); other GPUs use the
H200's rules, whose tiles fit the shared memory of Ampere and newer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ._runtime import device_name, multiprocessors


@dataclass(frozen=True)
class TileConfig:
    """Query rows and key rows per tile, warps and pipeline stages of a launch; ``maxnreg``
    caps the registers per thread (None: the compiler's choice), which sets how many programs
    a multiprocessor holds."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None


INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)

# (variant, is_fp32, causal) -> [(head_dim upper bound, config)]: the first row whose bound is
# >= head_dim wins. fp16/bf16 V2 rows: best of the 2026-11-24 H100 sweep at head_dim <= 128 and
# of the 2026-11-30 H200 sweep at 256 (128x64 tiles, 8 warps: 0.71-0.83x cuDNN against
# 0.55-0.67x for the 64x64 tile before; benchmarks/NOTES.md), triton 3.6, tensor descriptors;
# the float32 and V1 rows are sized to fit shared memory. Non-causal head_dim <= 64: 8 warps
# capped at 128 registers (under triton 3.6 no spills with tensor descriptors, 8 bytes with
# pointers), so that two programs share a multiprocessor (16 warps; uncapped the tile takes
# 161-205 registers and one program), over the H100's 4-warp tile (243-255 registers, one
# warpgroup per program; on pointers it spills 26 bytes: 0.75 -> 0.91x cuDNN at B8 H16 S2k).
# H200, eleventh session of 2026-11-30, fraction of cuDNN, B*S = 32k, S 1k-16k: fp16
# 0.87-0.97 -> 0.90-1.01, bf16 0.93-0.98 -> 0.97-1.01; B1 H12 S2k 0.79 -> 0.92. Causal kept
# the 4-warp tile (1.00 against 0.95-0.99 at S 4k, 16k).
_CUDA_TABLE: dict[tuple[str, bool, bool], list[tuple[int, TileConfig]]] = {
    ("v2", False, False): [
        (64, TileConfig(128, 128, 8, 3, maxnreg=128)),
        (128, TileConfig(128, 128, 8, 3)),
        (256, TileConfig(128, 64, 8, 2)),
    ],
    ("v2", False, True): [
        (64, TileConfig(128, 128, 4, 3)),
        (128, TileConfig(128, 128, 8, 3)),
        (256, TileConfig(128, 64, 8, 3)),
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
    # and within 1% at Hkv 32, Sk 32k (benchmarks/NOTES.md); changed by the size of the grid
    # (splitkv_grid). head_dim <= 64: tiles of 128 keys (the same bytes per tile): B16
    # decode on 200-1000 keys (GPT-2 H12, Llama H32/8; one split) 5.7-17.8 -> 5.3-15.2 us
    # (--sweep-short, eleventh session)
    _CUDA_TABLE[("splitkv", False, _causal)] = [
        (64, TileConfig(64, 128, 4, 3)),
        (128, TileConfig(64, 64, 4, 3)),
        (256, TileConfig(32, 32, 4, 2)),
    ]
    _CUDA_TABLE[("splitkv", True, _causal)] = [
        (128, TileConfig(32, 32, 4, 2)),
        (256, TileConfig(16, 32, 4, 1)),
    ]


# Causal fp16/bf16 V2 on small grids (batch-1 prefill): head_dim upper bound -> [(programs of
# 128 query rows per multiprocessor below the bound, config)]. 128-row blocks leave the causal
# triangle in a few large, unequal programs; 64-row blocks balance it. H200 sweeps of
# 2026-11-30 against the table's tile, as a fraction of cuDNN (benchmarks/NOTES.md):
# - head_dim 64: B1 H12 S2k 0.64 -> 0.91 (64x64), B1 H32/8 S2k 0.68 -> 0.87 (64x64), B1 H12
#   S8k 0.90 -> 0.99 (64x128), B1 H32/8 S8k 0.94 -> 0.96 (64x128); from 16 programs per
#   multiprocessor (B4 H32 S8k: 62) the table's tile was best; the 64x64 tile capped at 128
#   registers (eleventh session): B1 H12 S2k 0.89 -> 0.91 (fp16) and 0.91 -> 0.94 (bf16), B1
#   H32/8 S2k 0.88 -> 0.90 and 0.87 -> 0.89;
# - head_dim 128: B1 H16 S2k (1.9 per multiprocessor) 0.75 -> 0.86 (64x64); at S8k (7.8) the
#   table's tile stayed best (0.94 against 0.88);
# - head_dim 256: B1 H8 S2k (1.0) 0.62 -> 0.65, S8k (3.9) 0.81 -> 0.92 (64x64); at 15.5 per
#   multiprocessor (B16 S2k, B4 S8k) the table's tile was best (0.81-0.82 against 0.76-0.80).
_SMALL_CAUSAL_GRID: list[tuple[int, list[tuple[float, TileConfig]]]] = [
    (64, [(4, TileConfig(64, 64, 4, 3, maxnreg=128)), (16, TileConfig(64, 128, 4, 3))]),
    (128, [(4, TileConfig(64, 64, 4, 3))]),
    (256, [(8, TileConfig(64, 64, 4, 3))]),
]

# Causal fp16/bf16 V2 at 64 < head_dim <= 128 on short sequences (query and key lengths up to
# SHORT_CAUSAL_LEN), whatever the grid: each program walks a few key blocks, and the table's
# tile (225 KiB of shared memory: one program per multiprocessor) exposes every program's
# start; 128x64 tiles with 8 warps, 2 stages and 128 registers put two on a multiprocessor.
# H200, eleventh session, fraction of cuDNN, B*S = 32k, H16 and H32/8, fp16 and bf16: S 512
# 0.62-0.69 -> 0.73-0.87, S 1k 0.71-0.80 -> 0.77-0.87; at S 1.5k -1% to +3%, at S 2k even
# (benchmarks/NOTES.md).
SHORT_CAUSAL_LEN = 1024
_SHORT_CAUSAL = TileConfig(128, 64, 8, 2, maxnreg=128)


def tile_config(variant: str, device: torch.device, head_dim: int, dtype: torch.dtype,
                causal: bool, blocks_128: int = 0, seq_len: int = 0) -> TileConfig:
    """The tile configuration a kernel launch uses. For V2: ``blocks_128``, the number of
    programs a grid of 128-row query blocks would have (batch * heads * blocks per
    sequence), and ``seq_len``, an upper bound on every sequence's query and key length; 0
    when unknown."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    fp32 = dtype == torch.float32
    if variant == "v2" and causal and not fp32 and blocks_128:
        per_multiprocessor = blocks_128 / multiprocessors(device)
        rules = next((rules for bound, rules in _SMALL_CAUSAL_GRID if head_dim <= bound), [])
        for bound, cfg in rules:
            if per_multiprocessor < bound:
                return cfg
        if 64 < head_dim <= 128 and 0 < seq_len <= SHORT_CAUSAL_LEN:
            return _SHORT_CAUSAL
    rows = _CUDA_TABLE[(variant, fp32, causal)]
    for bound, cfg in rows:
        if head_dim <= bound:
            return cfg
    raise ValueError(f"head_dim must be <= 256, got {head_dim}")


# Split-KV tiles for a full grid (more programs than multiprocessors: one split) on the H100,
# fp16/bf16, 64 < head_dim <= 128: 32-key tiles, 2 warps. B8 H32 Hkv32 D128, one split, GPU
# time (us) against the table's 64-key, 4-warp tile, 2026-12-07: 1k 47.4 / 48.3, 8k 347.8 /
# 349.8, 32k 1366.8 / 1381.8 (SDPA 48.0, 348.8, 1380.4); the twenty-sixth session's sweep
# agreed (47.1 / 48.1, 340.6 / 340.9). The 32-key tile divides the table's 64, so the split
# length computed from the table's tile stays a whole number of tiles. Not every H100 host
# agrees: on one (twenty-eighth session, same day, same device name) the 64-key tile led at
# 8k, 338.6 / 339.2 (SDPA 338.4); nothing the selector can read tells the hosts apart.
_H100_FULL_GRID = dict(block_n=32, num_warps=2, num_stages=3)


def splitkv_grid(cfg: TileConfig, device: torch.device, head_dim: int, dtype: torch.dtype,
                 programs: int) -> TileConfig:
    """The split-KV configuration for a grid of ``programs``, from the table's ``cfg``; the
    rules cover fp16/bf16 at 64 < head_dim <= 128 on CUDA and differ by GPU:
    - H100: with more programs than multiprocessors, the table's tile with the key rows,
      warps and stages of ``_H100_FULL_GRID``; otherwise the table's tile. An extra stage at
      one program per multiprocessor (the H200's rule) cost the H100 1-2% (2026-12-07, B8
      H32 Hkv8 D128, 2 splits, 128 programs, GPU time, us: 1k 12.2-12.4 / 12.4-13.1, 8k 92.5
      / 93.5-93.7, 32k 349.9-352.0 / 354.7-355.4 with 3 / 4 stages).
    - Other GPUs (measured on the H200): with at most one program per multiprocessor, one
      stage more, since each program alone then keeps the multiprocessor's loads in flight.
      2026-11-30 (B8 H32 Hkv8 D128, 2 splits: 128 programs): 80.0 -> 79.1 us at 8k keys,
      266.7 -> 256.4 at 32k; at Hkv 32 (256 programs) 3 stages stayed best (255.7 against
      257.3 us at 8k). At head_dim 64 (128-key tiles, B16 H32 Hkv8, 128 programs, 200-1000
      keys) 3 stages beat 4: 5.3 / 7.3 / 10.9 against 5.8 / 7.8 / 11.2 us.
    (benchmarks/NOTES.md.)"""
    if device.type != "cuda" or dtype == torch.float32 or not 64 < head_dim <= 128:
        return cfg
    full = programs > multiprocessors(device)
    if "H100" in device_name(device):
        return dataclasses.replace(cfg, **_H100_FULL_GRID) if full else cfg
    return cfg if full else dataclasses.replace(cfg, num_stages=cfg.num_stages + 1)
