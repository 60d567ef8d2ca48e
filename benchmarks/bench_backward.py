"""Forward + backward of attention (training), on the GPU: ours against SDPA in the same run.

Rows: B*S = 16k tokens (B8 S2k, B4 S4k), H*D = 1024 (GQA row: H 32, Hkv 8, D 128), fp16 and
bf16, causal and not. Each provider computes out, then out.backward(grad) for q, k, v that
require grad; do_bench medians (L2 cleared before each call):
- "ours": ``flash_attention(..., variant="auto")``: our forward kernel, then the backward
  ``kernels._backward`` picks (cuDNN's on sm90 for these shapes, run on our out and lse);
- "ours fa2": the same with FlashAttention-2's backward (what windows, causal Sq != Sk and
  other GPUs take);
- "ours blockwise": the same with the blockwise PyTorch backward (what ALiBi, softcap,
  float32 and a gradient into lse take);
- SDPA's default dispatch, and SDPA forced to its flash and cuDNN backends (K/V repeated per
  head on GQA rows for the forced backends).

Two more tables, fp16: a key-padding mask (B, 1, 1, Sk) that pads the last 25% of the keys of
half the batch (ours: cuDNN's backward with the mask as its bias; SDPA's default, efficient
and cuDNN backends with the same mask, and the causal mask folded in), and packed sequences
of random lengths between S/2 and S, 16k tokens in all (``flash_attention_varlen``: our
forward and FlashAttention-2's varlen backward; the peer is PyTorch's own FlashAttention-2
varlen forward and backward, ``aten._flash_attention_forward`` under autograd).

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

from kernels import _backward, flash_attention, flash_attention_varlen

# (batch, heads, kv_heads, seq_len, head_dim, causal)
SHAPES = [(8, 16, 16, 2048, 64, False), (8, 16, 16, 2048, 64, True),
          (4, 8, 8, 4096, 128, False), (4, 8, 8, 4096, 128, True),
          (4, 32, 8, 4096, 128, True)]
# key-padding mask rows (batch, heads, seq_len, head_dim, causal), fp16
MASKED_SHAPES = [(8, 16, 2048, 64, False), (8, 16, 2048, 64, True), (4, 8, 4096, 128, True)]
# packed rows (longest sequence, heads, head_dim, causal), fp16, 16k tokens
VARLEN_SHAPES = [(2048, 16, 64, True), (4096, 8, 128, True), (2048, 16, 64, False)]


# the rules of kernels._backward switched off to force a backward
SWITCH_OFF = {"ours fa2": ("cudnn_covers",), "ours blockwise": ("cudnn_covers", "fa2_covers")}


def _train_step(fn, q, k, v, grad, switch_off: tuple[str, ...] = ()):
    """One forward and backward, with ``kernels._backward``'s rules named in ``switch_off``
    answering False."""
    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(grad)

    def forced_step():
        real = {name: getattr(_backward, name) for name in switch_off}
        for name in switch_off:
            setattr(_backward, name, lambda *args: False)
        try:
            step()
        finally:
            for name, fn_ in real.items():
                setattr(_backward, name, fn_)

    return forced_step if switch_off else step


def _measure(providers: dict, q, k, v, grad) -> dict:
    """ms of one training step per provider (NaN where a backend refuses the inputs)."""
    ms = {}
    for name, fn in providers.items():
        try:
            step = _train_step(fn, q, k, v, grad, SWITCH_OFF.get(name, ()))
            ms[name] = triton.testing.do_bench(step, return_mode="median")
        except RuntimeError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            ms[name] = float("nan")
    return ms


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
    ms = _measure(providers, q, k, v, grad)
    cells = " | ".join(f"{ms[n]:.2f}" for n in providers)
    return (f"| {str(dtype).split('.')[-1]} | {causal} | {batch} | {heads} | {kv_heads} | "
            f"{seq} | {head_dim} | {cells} | {ms['sdpa'] / ms['ours']:.2f} | "
            f"{ms['sdpa cudnn'] / ms['ours']:.2f} |")


def _masked_row(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> str:
    """Training step with a key-padding mask, fp16: ours, ours blockwise, SDPA backends."""
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.float16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    keep = torch.ones(batch, 1, 1, seq, dtype=torch.bool, device="cuda")
    keep[: batch // 2, ..., seq - seq // 4:] = False
    # SDPA takes no mask with is_causal: the causal mask folded into the padding mask
    sdpa_mask = keep & torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril() if causal \
        else keep

    def ours(q, k, v):
        return flash_attention(q, k, v, causal=causal, variant="auto", attn_mask=keep)

    def sdpa(backend=None):
        def fn(q, k, v):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
        return fn

    providers = {"ours": ours, "ours blockwise": ours, "sdpa": sdpa(),
                 "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
                 "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    ms = _measure(providers, q, k, v, grad)
    cells = " | ".join(f"{ms[n]:.2f}" for n in providers)
    return (f"| {causal} | {batch} | {heads} | {seq} | {head_dim} | {cells} | "
            f"{ms['sdpa'] / ms['ours']:.2f} |")


def _varlen_row(seq: int, heads: int, head_dim: int, causal: bool) -> str:
    """Training step over packed sequences of random lengths in [seq/2, seq], 16k tokens,
    fp16: ours (FlashAttention-2's varlen backward), ours blockwise, PyTorch's varlen flash."""
    lengths, gen = [], torch.Generator().manual_seed(seq)
    while sum(lengths) < 16384:
        lengths.append(int(torch.randint(seq // 2, seq + 1, (), generator=gen)))
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    longest, total = max(lengths), sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, device="cuda", dtype=torch.float16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def ours(q, k, v):
        return flash_attention_varlen(q, k, v, cu, cu, longest, longest, causal=causal)

    def flash(q, k, v):
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, longest, longest, 0.0, causal, False)[0]

    providers = {"ours": ours, "ours blockwise": ours, "pytorch varlen flash": flash}
    ms = _measure(providers, q, k, v, grad)
    cells = " | ".join(f"{ms[n]:.2f}" for n in providers)
    return (f"| {causal} | {len(lengths)} | {total} | {heads} | {head_dim} | {cells} | "
            f"{ms['pytorch varlen flash'] / ms['ours']:.2f} |")


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
    masked_head = ("| causal | B | H | S | D | ours ms | ours blockwise ms | sdpa ms "
                   "| sdpa efficient ms | sdpa cudnn ms | sdpa/ours |\n"
                   "|---|---|---|---|---|---|---|---|---|---|---|")
    print(masked_head)
    masked = []
    for shape in MASKED_SHAPES:
        masked.append(_masked_row(*shape))
        print(masked[-1], flush=True)
    varlen_head = ("| causal | sequences | tokens | H | D | ours ms | ours blockwise ms "
                   "| pytorch varlen flash ms | flash/ours |\n" + "|---" * 9 + "|")
    print(varlen_head)
    varlen = []
    for shape in VARLEN_SHAPES:
        varlen.append(_varlen_row(*shape))
        print(varlen[-1], flush=True)
    props = torch.cuda.get_device_properties(0)
    text = (f"\n### Forward + backward, {datetime.date.today().isoformat()}, {props.name}, "
            f"torch {torch.__version__}, triton {triton.__version__}\n\n"
            + head + "\n" + "\n".join(rows) + "\n\nWith a key-padding mask (fp16):\n\n"
            + masked_head + "\n" + "\n".join(masked) + "\n\nPacked sequences (fp16):\n\n"
            + varlen_head + "\n" + "\n".join(varlen) + "\n")
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
