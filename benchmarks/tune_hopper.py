"""Sweep the warp-specialised Hopper kernel's configurations (key block, stages, consumer
warpgroups) on an sm_90 GPU, next to SDPA's cuDNN backend and the Triton V2 kernel measured
in the same run, each with its relative error against SDPA. Used for
``kernels._launch.HOPPER_CONFIGS`` (see NOTES.md, "Fourteenth session").

    PYTHONPATH=. python benchmarks/tune_hopper.py --head-dims 64 --consumers 2 3
    PYTHONPATH=. python benchmarks/tune_hopper.py --head-dims 128 256 --block-n 64 128

A configuration whose barriers were wrong would hang its launch: run it under ``timeout``.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from tune_v2 import sweep_inputs  # run as a script: its folder is on sys.path

from kernels import _launch
from kernels.api import score_args


def _measure(launch, q, k, v, out, lse, args, ref, flops, config=None) -> tuple[float, float]:
    """TFLOP/s (do_bench median) of ``launch`` into ``out`` and its relative error against
    ``ref``, the output first filled with NaN."""
    out.fill_(float("nan"))
    launch(q, k, v, out, lse, args, config=config)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    ms = triton.testing.do_bench(lambda: launch(q, k, v, out, lse, args, config=config),
                                 return_mode="median")
    return flops / ms * 1e-9, err


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--causal", nargs="+", default=["false", "true"])
    p.add_argument("--block-n", type=int, nargs="+", default=[64, 128])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--consumers", type=int, nargs="+", default=[2, 3])
    p.add_argument("--tokens", type=int, default=16384, help="batch * seq_len")
    a = p.parse_args()
    for causal, D, S, B, H, q, k, v, flops in sweep_inputs(a):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            cudnn = flops / triton.testing.do_bench(
                lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(
                    q, k, v, is_causal=c), return_mode="median") * 1e-9
        args = score_args(q, k, causal=causal, softmax_scale=None, attn_mask=None,
                          window_size=(-1, -1), softcap=0.0, alibi_slopes=None)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, S, device="cuda", dtype=torch.float32)
        print(f"causal={causal} D={D} S={S} B={B} H={H} {a.dtype}: cudnn {cudnn:.0f} TFLOP/s",
              flush=True)
        tensors = (q, k, v, out, lse, args, ref, flops)
        tf, err = _measure(_launch.forward_v2, *tensors)
        print(f"    {tf:6.0f} ({tf / cudnn:.2f}x cudnn) triton v2 err={err:.1e}", flush=True)
        for bn, st, nc in itertools.product(a.block_n, a.stages, a.consumers):
            cfg = _launch.HopperConfig(bn, st, nc)
            try:
                tf, err = _measure(_launch.forward_hopper, *tensors, config=cfg)
            except Exception as exc:  # a configuration that does not fit shared memory
                print(f"    {cfg} failed: {type(exc).__name__}"[:120], flush=True)
                continue
            print(f"    {tf:6.0f} ({tf / cudnn:.2f}x cudnn) {cfg} err={err:.1e}", flush=True)


if __name__ == "__main__":
    main()
