"""Host-side cost of one decode call, broken down (cProfile + timers). GPU only."""

import cProfile
import pstats
import time

import torch

from kernels import _launch, flash_attention
from kernels.api import score_args


def per_call(fn, n=500) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
k = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.float16)
v = torch.randn_like(k)
args = score_args(q, k, causal=False, softmax_scale=None, attn_mask=None, window_size=(-1, -1),
                  softcap=0.0, alibi_slopes=None)
out = torch.empty_like(q)
lse = torch.empty(1, 32, 1, device="cuda", dtype=torch.float32)
print("full call us", per_call(lambda: flash_attention(q, k, v, variant="auto")))
print("forward_splitkv us", per_call(lambda: _launch.forward_splitkv(q, k, v, out, lse, args)))
print("forward_v2 us", per_call(lambda: _launch.forward_v2(q, k, v, out, lse, args)))
print("2x torch.empty us", per_call(lambda: (torch.empty(8, 4, 128, device="cuda"),
                                              torch.empty(8, 4, device="cuda"))))
pr = cProfile.Profile()
pr.enable()
for _ in range(200):
    flash_attention(q, k, v, variant="auto")
torch.cuda.synchronize()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
