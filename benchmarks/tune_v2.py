"""Sweep V2 tile configurations on the GPU for a few shapes, next to SDPA's cuDNN and flash
backends measured in the same run. Used to build kernels/configs.py (see NOTES.md).

    PYTHONPATH=. python benchmarks/tune_v2.py --seqs 4096 16384 --head-dims 64 128
    PYTHONPATH=. python benchmarks/tune_v2.py --head-dims 64 --warps 8 --maxnreg 128
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import _launch
from kernels.api import score_args
from kernels.configs import TileConfig


def sweep_inputs(a: argparse.Namespace) -> Iterator[tuple]:
    """(causal, D, S, B, H, q, k, v, flops) for every causal flag, head_dim and sequence
    length of the parsed arguments ``a`` (``causal``, ``head_dims``, ``seqs``, ``tokens``,
    ``dtype``): H * D = 2048, B * S = tokens, fresh normal inputs on the GPU."""
    dtype = getattr(torch, a.dtype)
    for causal, D, S in itertools.product([c == "true" for c in a.causal], a.head_dims, a.seqs):
        H, B = 2048 // D, max(1, a.tokens // S)
        q = torch.randn(B, H, S, D, device="cuda", dtype=dtype)
        k, v = torch.randn_like(q), torch.randn_like(q)
        yield causal, D, S, B, H, q, k, v, 4 * B * H * S * S * D * (0.5 if causal else 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--causal", nargs="+", default=["false", "true"])
    p.add_argument("--block-m", type=int, nargs="+", default=[64, 128])
    p.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--maxnreg", type=int, nargs="*", default=[],
                   help="register caps to try besides the uncapped tile (e.g. 128: two "
                        "8-warp programs per multiprocessor)")
    p.add_argument("--tokens", type=int, default=32768,
                   help="batch * seq_len (batch at least 1): 32k for the benchmark grids, "
                        "a sequence length for batch-1 (small-grid) shapes")
    a = p.parse_args()
    for causal, D, S, B, H, q, k, v, flops in sweep_inputs(a):
        peers = {}
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(be):
                ms = triton.testing.do_bench(
                    lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(
                        q, k, v, is_causal=c), return_mode="median")
            peers[name] = flops / ms * 1e-9
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        args = score_args(q, k, causal=causal, softmax_scale=None, attn_mask=None,
                          window_size=(-1, -1), softcap=0.0, alibi_slopes=None)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, S, device="cuda", dtype=torch.float32)
        results = []
        for bm, bn, w, st, cap in itertools.product(a.block_m, a.block_n, a.warps, a.stages,
                                                    [None, *a.maxnreg]):
            cfg = TileConfig(bm, bn, w, st, cap)
            try:
                _launch.forward_v2(q, k, v, out, lse, args, config=cfg)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = triton.testing.do_bench(
                    lambda c=cfg, q=q, k=k, v=v, o=out, m=lse, a=args: _launch.forward_v2(
                        q, k, v, o, m, a, config=c),
                    return_mode="median")
                results.append((flops / ms * 1e-9, cfg, err))
            except Exception as exc:
                print(f"  {cfg} failed: {type(exc).__name__}"[:120])
        results.sort(key=lambda r: -r[0])
        print(f"causal={causal} D={D} S={S} B={B} H={H}: cudnn {peers['cudnn']:.0f} "
              f"flash {peers['flash']:.0f} TFLOP/s", flush=True)
        for tf, cfg, err in results[:5]:
            print(f"    {tf:6.0f} ({tf / peers['cudnn']:.2f}x cudnn, "
                  f"{tf / peers['flash']:.2f}x flash) {cfg} err={err:.1e}", flush=True)


if __name__ == "__main__":
    main()
