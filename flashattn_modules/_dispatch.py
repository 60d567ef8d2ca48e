"""Where module and patcher calls go: our kernels on CUDA; on CPU, by FLASHATTN_CPU_BACKEND.

FLASHATTN_CPU_BACKEND is read at each call:
- ``sdpa`` (default): PyTorch, with exactly the kernels' semantics (bottom-right causal,
  windows, ALiBi and masks folded into one explicit float mask built on the device; rows that
  see no key give 0; softcap, which no mask can express, through the kernels' PyTorch twin
  ``kernels.torch_attention``);
- ``triton``: the Triton kernels through Triton's interpreter (what the tests use).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kernels import flash_attention
from kernels.api import check_qkv, score_args
from kernels.torch_attention import attention_forward

CPU_BACKENDS = ("sdpa", "triton")


def cpu_backend() -> str:
    """The CPU policy, read from FLASHATTN_CPU_BACKEND now."""
    value = os.environ.get("FLASHATTN_CPU_BACKEND", "sdpa")
    if value not in CPU_BACKENDS:
        raise ValueError(f"FLASHATTN_CPU_BACKEND must be one of {CPU_BACKENDS}, got {value!r}")
    return value


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              softmax_scale: float | None = None, attn_mask: torch.Tensor | None = None,
              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
              alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Attention on BHSD q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> (B, H, Sq, D), with the
    kernels' semantics wherever it runs (see the module docstring)."""
    if q.device.type == "cpu" and cpu_backend() == "sdpa":
        return torch_semantics(q, k, v, causal=causal, softmax_scale=softmax_scale,
                               attn_mask=attn_mask, window_size=window_size, softcap=softcap,
                               alibi_slopes=alibi_slopes)
    return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, variant="auto",
                           attn_mask=attn_mask, window_size=window_size, softcap=softcap,
                           alibi_slopes=alibi_slopes)


def torch_semantics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None, attn_mask: torch.Tensor | None = None,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """The kernels' semantics through PyTorch's SDPA (BHSD in and out), any device."""
    check_qkv(q, k, v, "bhsd")
    args = score_args(q, k, causal=causal, softmax_scale=softmax_scale, attn_mask=attn_mask,
                      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes)
    if args.softcap > 0:
        return attention_forward(q, k, v, args)[0]
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    rows = torch.arange(seqlen_q, device=q.device)[:, None]
    cols = torch.arange(seqlen_k, device=q.device)[None, :]
    rel = rows + (seqlen_k - seqlen_q) - cols
    bias = torch.zeros((seqlen_q, seqlen_k), device=q.device, dtype=torch.float32)
    if args.window_right >= 0:
        bias = bias.masked_fill(rel < -args.window_right, float("-inf"))
    if args.window_left >= 0:
        bias = bias.masked_fill(rel > args.window_left, float("-inf"))
    if args.alibi_slopes is not None:
        bias = bias - args.alibi_slopes[:, :, None, None] * rel.abs().float()
    if args.attn_mask is not None:
        m = args.attn_mask
        bias = bias.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else bias + m.float()
    bias = bias.to(q.dtype) if q.dtype != torch.float32 else bias
    empty = (bias == float("-inf")).all(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.expand(q.shape[0], q.shape[1], seqlen_q, seqlen_k),
        scale=args.sm_scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.masked_fill(empty, 0.0)
