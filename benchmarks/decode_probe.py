"""Where the split-KV decode kernel loses fixed time to a minimal kernel (issue 3).

B8 H32 Hkv32 Sq1 D128 fp16, one program per (batch, head), one split: the point where the
library's decode trailed SDPA by 1.4-2 us at every cache length (H100, 2026-12-07: mostly the
three-range loop of ``attend_band``; benchmarks/NOTES.md). Five kernels of one key tile
configuration, timed alternately (GPU time of CUDA-graph replays, median, us), each adding
one part of the library's path to the one before:

- ``minimal``: its own loop; the query row padded to 16 rows for ``tl.dot``, contiguous
  (B*H, S, D) strides known at compile time, grid (B*H,);
- ``shared_loop``: the same frame around ``common.attend_range`` (the loop body every kernel
  shares: ``load_kv``, ``scores``, ``softmax_update``) over all keys, and ``finalize``;
- ``band``: ``key_range`` and ``attend_band`` (the three-range loop) instead;
- ``band_frame``: the library's grid (1, B*H, 1), (batch, head) divided out of the program
  id, and runtime strides;
- ``library``: ``_launch.forward_splitkv`` (the rest of its frame: GQA row mapping, masked
  row loads, lse).

The step whose time jumps holds the cost. ``python benchmarks/decode_probe.py [Sk ...]``
on a GPU (default 1024 8192); each kernel's output is checked against SDPA first.
"""

import functools
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import _launch
from kernels._triton.common import (
    LOG2E,
    MASK_NONE,
    attend_band,
    attend_range,
    finalize,
    key_range,
)
from kernels.api import score_args
from kernels.configs import TileConfig

B, H, D = 8, 32, 128
CONFIGS = (TileConfig(64, 64, 4, 3), TileConfig(64, 32, 2, 3))  # the library's, and one more


@triton.jit
def _padded_row(offset, D: tl.constexpr):
    """Offsets [16, D] of the query row at ``offset``, repeated to the 16 rows of ``tl.dot``,
    and the mask [16, 1] of the real row."""
    offs_m = tl.arange(0, 16)
    return offset + offs_m[:, None] * 0 + tl.arange(0, D)[None, :], (offs_m < 1)[:, None]


@triton.jit
def minimal(Q, K, V, Out, Sk, qk_scale, D: tl.constexpr, BN: tl.constexpr):
    """Q, Out (B*H, 1, D), K, V (B*H, Sk, D), contiguous; Sk a multiple of BN."""
    pid = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BN)
    row, row0 = _padded_row(pid * D, D)
    q = tl.load(Q + row, mask=row0, other=0.0)
    kb = K + pid * Sk * D
    vb = V + pid * Sk * D
    m = tl.full([16], float("-inf"), tl.float32)
    ell = tl.full([16], 0.0, tl.float32)
    acc = tl.zeros([16, D], tl.float32)
    for start in range(0, Sk, BN):
        k = tl.load(kb + (start + offs_n)[:, None] * D + offs_d[None, :])
        v = tl.load(vb + (start + offs_n)[:, None] * D + offs_d[None, :])
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        ell = ell * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m = m_new
    o = acc / ell[:, None]
    tl.store(Out + row, o.to(Out.dtype.element_ty), mask=row0)


@triton.jit
def shared(Q, K, V, Out, Sk, qk_scale, H, stride_qb, stride_qh, stride_kb, stride_kh,
           stride_kn, D: tl.constexpr, BN: tl.constexpr, BAND: tl.constexpr,
           FRAME: tl.constexpr):
    """``minimal``'s frame around the library's loop: ``attend_range`` over [0, Sk) without
    bounds checks, or (BAND) ``attend_band`` over ``key_range``'s three ranges. FRAME: the
    library's frame instead of ``minimal``'s: grid (1, B*H, 1), (batch, head) divided out of
    the program id, runtime strides (out shares q's, v k's)."""
    if FRAME:
        pid = tl.program_id(1)
        b = (pid // H).to(tl.int64)
        h = (pid % H).to(tl.int64)
        q_off = b * stride_qb + h * stride_qh
        kv_off = b * stride_kb + h * stride_kh
        stride_n = stride_kn
    else:
        pid = tl.program_id(0).to(tl.int64)
        q_off = pid * D
        kv_off = pid * Sk * D
        stride_n = D
    offs_d = tl.arange(0, D)
    offs_nb = tl.arange(0, BN)
    row, row0 = _padded_row(q_off, D)
    q = tl.load(Q + row, mask=row0, other=0.0)
    pos = tl.zeros([16], tl.int32)  # every row is query position 0
    slope = tl.full([16, 1], 0.0, tl.float32)
    m = tl.full([16], float("-inf"), tl.float32)
    ell = tl.full([16], 0.0, tl.float32)
    acc = tl.zeros([16, D], tl.float32)
    kb = K + kv_off
    vb = V + kv_off
    if BAND:
        lo, a, c, hi = key_range(0, 1, 1, Sk, -1, -1, BN, False, False)
        acc, m, ell = attend_band(
            acc, m, ell, q, kb, vb, 0, 0, 0, lo, a, a, c, c, hi, pos, offs_nb, offs_d,
            stride_n, 1, stride_n, 1, 1, Sk, Sk - 1, 0, 0, qk_scale, 0.0, slope, K, 0, D, D, BN,
            MASK_NONE, True, False, False, False, False, "ieee", False)
    else:
        acc, m, ell = attend_range(
            acc, m, ell, q, kb, vb, 0, 0, 0, 0, Sk, pos, offs_nb, offs_d, stride_n, 1,
            stride_n, 1, 1, Sk, Sk - 1, 0, 0, qk_scale, 0.0, slope, K, 0, D, D, BN, MASK_NONE,
            True, False, False, False, False, False, "ieee", False)
    o, _ = finalize(acc, m, ell)
    tl.store(Out + row, o.to(Out.dtype.element_ty), mask=row0)


def kernels_at(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               cfg: TileConfig) -> dict:
    """The five calls of one configuration on q (B, H, 1, D), k, v (B, H, Sk, D), contiguous,
    out like q."""
    sk = k.shape[2]
    scale = q.shape[-1] ** -0.5 * LOG2E.value
    grid = (q.shape[0] * q.shape[1],)
    opts = dict(D=q.shape[-1], BN=cfg.block_n, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    args = score_args(q, k, causal=False, softmax_scale=None, attn_mask=None,
                      window_size=(-1, -1), softcap=0.0, alibi_slopes=None)
    frame = (q.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2))
    return {
        "minimal": lambda: minimal[grid](q, k, v, out, sk, scale, **opts),
        "shared_loop": lambda: shared[grid](q, k, v, out, sk, scale, *frame, BAND=False,
                                            FRAME=False, **opts),
        "band": lambda: shared[grid](q, k, v, out, sk, scale, *frame, BAND=True, FRAME=False,
                                     **opts),
        "band_frame": lambda: shared[(1, grid[0], 1)](q, k, v, out, sk, scale, *frame,
                                                      BAND=True, FRAME=True, **opts),
        "library": lambda: _launch.forward_splitkv(q, k, v, out, None, args, num_splits=1,
                                                   config=cfg),
    }


def main() -> None:
    lengths = [int(x) for x in sys.argv[1:]] or [1024, 8192]
    bench = triton.testing.do_bench_cudagraph
    for sk in lengths:
        q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.float16)
        k = torch.randn(B, H, sk, D, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        out = torch.empty_like(q)
        sdpa_call = functools.partial(F.scaled_dot_product_attention, q, k, v)
        ref = sdpa_call().float()
        sdpa = [bench(sdpa_call, return_mode="median")]
        for cfg in CONFIGS:
            calls = kernels_at(q, k, v, out, cfg)
            times = {name: [] for name in calls}
            for name, call in calls.items():
                out.fill_(float("nan"))
                call()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if not err < 2e-3:
                    raise AssertionError(f"{name} at Sk={sk}: relative error {err}")
            for _ in range(3):  # alternately, so that drift meets every kernel alike
                sdpa.append(bench(sdpa_call, return_mode="median"))
                for name, call in calls.items():
                    times[name].append(bench(call, return_mode="median"))
            tile = f"bn{cfg.block_n}/w{cfg.num_warps}/s{cfg.num_stages}"
            print(f"Sk={sk} {tile}: " + " ".join(
                f"{name} {sorted(t)[1] * 1e3:.1f}" for name, t in times.items()), flush=True)
        print(f"Sk={sk}: SDPA {sorted(sdpa)[len(sdpa) // 2] * 1e3:.1f}", flush=True)


if __name__ == "__main__":
    main()
