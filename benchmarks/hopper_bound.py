"""Where the warp-specialised Hopper kernel starts to pay against the Triton V2 kernel: each
shape through ``flash_attention(..., variant="auto")`` with the kernel's size bound
(``kernels._launch._HOPPER_MIN_WORK``) at 0 (the Hopper kernel) and out of reach (V2). Small
calls are host-bound, and the Hopper kernel's four descriptors cost more host time than V2's
replayed launch; large ones are GPU-bound, where it is faster. Prints, per shape, the
do_bench median and the time per call back to back (``--calls`` calls, one
synchronisation: ``profile_hf.per_call_us``), both in microseconds, and V2's time over the
Hopper kernel's (above 1: the Hopper kernel wins). Used for the bound (benchmarks/NOTES.md,
"Sixteenth session").

    PYTHONPATH=.:benchmarks python benchmarks/hopper_bound.py --head-dims 128 256
"""

from __future__ import annotations

import argparse

import torch
import triton
from profile_hf import per_call_us  # run as a script: its folder is on sys.path

from kernels import _launch, flash_attention


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--head-dims", type=int, nargs="+", default=[128, 256])
    p.add_argument("--seqs", type=int, nargs="+", default=[128, 256, 512, 1000, 2000])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--hidden", type=int, default=2048, help="heads * head_dim")
    p.add_argument("--max-log2-scores", type=int, default=28)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--calls", type=int, default=200)
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    print("D causal S B H log2(scores) | Hopper: bench us, per call us | V2: bench us, "
          "per call us | V2 / Hopper per call")
    for D in a.head_dims:
        H = a.hidden // D
        for causal in (False, True):
            for S in a.seqs:
                for B in a.batches:
                    scores = B * H * S * S
                    if scores > 1 << a.max_log2_scores:
                        continue
                    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype)
                               for _ in range(3))

                    def fn(q=q, k=k, v=v, causal=causal):
                        return flash_attention(q, k, v, causal=causal, variant="auto")

                    times = []
                    for bound in (0, 1 << 62):
                        _launch._HOPPER_MIN_WORK = bound
                        times += [triton.testing.do_bench(fn, return_mode="median") * 1e3,
                                  per_call_us(fn, a.calls)]
                    print(f"{D} {causal} {S} {B} {H} {scores.bit_length() - 1} | "
                          f"{times[0]:.1f} {times[1]:.1f} | {times[2]:.1f} {times[3]:.1f} | "
                          f"{times[3] / times[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
