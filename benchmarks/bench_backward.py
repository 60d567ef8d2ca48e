"""Forward + backward of attention (training), on the GPU: ours against SDPA in the same run.

Rows: B*S = 16k tokens (B8 S2k, B4 S4k), H*D = 1024 (GQA row: H 32, Hkv 8, D 128), fp16 and
bf16, causal and not. Each provider computes out, then out.backward(grad) for q, k, v that
require grad; do_bench medians (L2 cleared before each call):
- "ours": ``flash_attention(..., variant="auto")``: our forward kernel, then the backward
  ``kernels._backward`` picks (cuDNN's on sm90 for these shapes, run on our out and lse);
- "ours fa2": the same with FlashAttention-2's backward (what windows, causal Sq != Sk and
  other GPUs take);
- "ours blockwise": the same with the blockwise PyTorch backward (what masks, ALiBi,
  softcap, float32 and a gradient into lse take);
- SDPA's default dispatch, and SDPA forced to its flash and cuDNN backends (K/V repeated per
  head on GQA rows for the forced backends).

    PYTHONPATH=. python benchmarks/bench_backward.py --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import _backward, flash_attention

# (batch, heads, kv_heads, seq_len, head_dim, causal)
SHAPES = [(8, 16, 16, 2048, 64, False), (8, 16, 16, 2048, 64, True),
          (4, 8, 8, 4096, 128, False), (4, 8, 8, 4096, 128, True),
          (4, 32, 8, 4096, 128, True)]


def _train_step(fn, q, k, v, grad, switch_off: str | None = None):
    """One forward and backward, with ``kernels._backward``'s ``switch_off`` rule (its name)
    answering False: cudnn_covers for FlashAttention-2's backward, fa2_covers for the
    blockwise one."""
    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(grad)

    def forced_step():
        real = getattr(_backward, switch_off)
        setattr(_backward, switch_off, lambda *args: False)
        try:
            step()
        finally:
            setattr(_backward, switch_off, real)

    return forced_step if switch_off else step


def _row(dtype: torch.dtype, batch: int, heads: int, kv_heads: int, seq: int, head_dim: int,
         causal: bool) -> str:
    """One table row: ms of one training step per provider, and SDPA's over ours."""
    q = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=dtype,
                        requires_grad=True) for _ in range(2))
    grad = torch.randn_like(q)
    group = heads // kv_heads

    def ours(q, k, v):
        return flash_attention(q, k, v, causal=causal, variant="auto")

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)

    def forced(backend):
        def fn(q, k, v):
            if group > 1:
                k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn

    providers = {"ours": ours, "ours fa2": ours, "ours blockwise": ours, "sdpa": sdpa,
                 "sdpa flash": forced(SDPBackend.FLASH_ATTENTION),
                 "sdpa cudnn": forced(SDPBackend.CUDNN_ATTENTION)}
    ms = {}
    for name, fn in providers.items():
        try:
            switch_off = {"ours fa2": "cudnn_covers", "ours blockwise": "fa2_covers"}
            step = _train_step(fn, q, k, v, grad, switch_off.get(name))
            ms[name] = triton.testing.do_bench(step, return_mode="median")
        except RuntimeError as exc:  # a backend that refuses the shape
            print(f"{name}: {exc}", file=sys.stderr)
            ms[name] = float("nan")
    cells = " | ".join(f"{ms[n]:.2f}" for n in providers)
    return (f"| {str(dtype).split('.')[-1]} | {causal} | {batch} | {heads} | {kv_heads} | "
            f"{seq} | {head_dim} | {cells} | {ms['sdpa'] / ms['ours']:.2f} | "
            f"{ms['sdpa cudnn'] / ms['ours']:.2f} |")


def run(dtype: torch.dtype) -> list[str]:
    rows = []
    for shape in SHAPES:
        rows.append(_row(dtype, *shape))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--out", default="", help="markdown file the table is appended to")
    a = p.parse_args()
    head = ("| dtype | causal | B | H | Hkv | S | D | ours ms | ours fa2 ms | ours blockwise ms "
            "| sdpa ms | sdpa flash ms | sdpa cudnn ms | sdpa/ours | cudnn/ours |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(head)
    rows = [row for dtype in a.dtypes for row in run(getattr(torch, dtype))]
    props = torch.cuda.get_device_properties(0)
    text = (f"\n### Forward + backward, {datetime.date.today().isoformat()}, {props.name}, "
            f"torch {torch.__version__}, triton {triton.__version__}\n\n"
            + head + "\n" + "\n".join(rows) + "\n")
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
