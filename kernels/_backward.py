"""Gradients of the dense kernels' outputs (the Triton kernels are forward-only).

Where PyTorch's FlashAttention-2 backward kernel (``aten._flash_attention_backward``) covers a
call, it runs on our forward's output and lse; otherwise the blockwise PyTorch recomputation
of ``kernels.torch_attention`` does. FlashAttention-2 shares our conventions: lse (B, H, Sq)
in natural log, causal masks and windows aligned bottom-right, GQA read in place; a row that
saw no key is the one difference (+inf in its lse, -inf in ours). It covers CUDA devices of
compute capability 8.0 and newer, fp16 and bf16, head_dim a multiple of 8 up to 256 (above
192 only on sm80 and sm90), no mask, ALiBi or softcap, and no gradient flowing into lse.

H200, 2026-12-01, fp16, forward + backward (benchmarks/NOTES.md): B8 H16 S2k D64 causal 26.2
ms -> 1.13 ms (SDPA's own 0.81 ms); B4 H16 S4k D128 causal 75.0 -> 3.24 ms (2.21).
"""

from __future__ import annotations

import torch

from . import _runtime
from ._launch import ScoreArgs
from .torch_attention import attention_backward

_FA2_BACKWARD = getattr(torch.ops.aten, "_flash_attention_backward", None)
# torch builds whose FlashAttention-2 backward takes windows (older ones cannot run ours)
_FA2_WINDOWS = _FA2_BACKWARD is not None and "window_size_left" in str(
    _FA2_BACKWARD.default._schema)


def fa2_covers(device: torch.device, dtype: torch.dtype, head_dim: int, args: ScoreArgs,
               grad_lse: torch.Tensor | None) -> bool:
    """Whether FlashAttention-2's backward computes the gradients of a call on ``device``
    with inputs of ``dtype``; ``grad_lse`` None when no gradient flows into lse."""
    if (grad_lse is not None or not _FA2_WINDOWS or device.type != "cuda"
            or torch.version.cuda is None or dtype not in (torch.float16, torch.bfloat16)):
        return False
    if args.attn_mask is not None or args.alibi_slopes is not None or args.softcap > 0:
        return False
    capability = _runtime.capability(device)
    if head_dim % 8 or head_dim > 256 or capability < (8, 0):
        return False
    return head_dim <= 192 or capability in ((8, 0), (9, 0))


def dense_backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, args: ScoreArgs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, H, Sq, D), dk and dv (B, Hkv, Sk, D) from grad_out and out (B, H, Sq, D), lse
    (B, H, Sq) and grad_lse (the same, or None), q, k and v as the forward saw them."""
    if (not fa2_covers(q.device, q.dtype, q.shape[-1], args, grad_lse) or q.shape[2] == 0
            or k.shape[2] == 0):
        return attention_backward(grad_out, grad_lse, q, k, v, out, lse, args)

    def bshd(x: torch.Tensor) -> torch.Tensor:  # FlashAttention-2's (B, S, H, D) view
        return x.transpose(1, 2)

    q_, k_, v_ = (bshd(x if x.stride(-1) == 1 else x.contiguous()) for x in (q, k, v))
    lse = torch.where(lse == float("-inf"), float("inf"), lse)
    unused = lse.new_empty(0, dtype=torch.int64)  # dropout's seed and offset
    dq, dk, dv = _FA2_BACKWARD(
        bshd(grad_out), q_, k_, v_, bshd(out), lse, None, None, q.shape[2], k.shape[2], 0.0,
        args.causal, unused, unused, scale=args.sm_scale, window_size_left=args.window_left,
        window_size_right=args.window_right)
    return bshd(dq), bshd(dk), bshd(dv)
