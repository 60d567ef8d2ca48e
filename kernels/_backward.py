"""Gradients of the dense kernels' outputs (the Triton kernels are forward-only).

PyTorch's fused attention backward kernels run on our forward's output and lse where they
cover a call; the blockwise PyTorch recomputation of ``kernels.torch_attention`` does the
rest. Our lse (B, H, Sq), natural log, is what both kernels take as their softmax statistics.

- FlashAttention-2's backward (``aten._flash_attention_backward``) aligns causal masks and
  windows bottom-right and reads GQA in place, like our kernels; a row that saw no key is the
  one difference (+inf in its lse, -inf in ours). It covers CUDA devices of compute
  capability 8.0 and newer, fp16 and bf16, head_dim a multiple of 8 up to 256 (above 192
  only on sm80 and sm90), no mask, ALiBi or softcap, and no gradient flowing into lse.
- cuDNN's backward is 1.6-1.8x faster than FlashAttention-2's on the H200, but aligns causal
  masks top-left and has no windows: it takes the calls above without a window, causal only
  when Sq == Sk, on sm90 (where it was measured), in eager mode, unless deterministic
  algorithms are asked for (FlashAttention-2's honours them). A configuration that its
  frontend refuses (raised while it builds its graph, before any work) runs
  FlashAttention-2's instead; a compiled graph holds FlashAttention-2's.

H200, 2026-12-01, forward + backward (benchmarks/NOTES.md, ``bench_backward.py``): B8 H16 S2k
D64 causal fp16 26.2 ms blockwise, 1.13 ms with FlashAttention-2's backward (SDPA's own
0.73-0.81 ms); backward alone 0.91 ms with FlashAttention-2's, 0.55 ms with cuDNN's.
"""

from __future__ import annotations

import functools

import torch

from . import _runtime
from ._launch import ScoreArgs
from .torch_attention import attention_backward

_FA2_BACKWARD = getattr(torch.ops.aten, "_flash_attention_backward", None)
# torch builds whose FlashAttention-2 backward takes windows (older ones cannot run ours)
_FA2_WINDOWS = _FA2_BACKWARD is not None and "window_size_left" in str(
    _FA2_BACKWARD.default._schema)
_CUDNN_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
_CUDNN_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward",
                          None)


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


def cudnn_covers(device: torch.device, seqlen_q: int, seqlen_k: int, args: ScoreArgs) -> bool:
    """Whether cuDNN's backward may take a call that ``fa2_covers``."""
    if (_CUDNN_BACKWARD is None or _CUDNN_FORWARD is None or torch.compiler.is_compiling()
            or torch.are_deterministic_algorithms_enabled()):  # FlashAttention-2 honours it
        return False
    if _runtime.capability(device) != (9, 0) or (torch.backends.cudnn.version() or 0) < 90000:
        return False
    if args.window_left >= 0 or (args.window_right >= 0 and not args.causal):
        return False
    return not args.causal or seqlen_q == seqlen_k


@functools.cache
def _cudnn_stats_dims() -> int:
    """Rank of the softmax statistics cuDNN's backward takes: what its forward returns
    ((B, H, Sq, 1) in torch 2.11-2.13), read from the forward's meta kernel."""
    q = torch.empty(1, 1, 1, 8, device="meta", dtype=torch.float16)
    return _CUDNN_FORWARD(q, q, q, None, True)[1].dim()


def dense_backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, args: ScoreArgs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, H, Sq, D), dk and dv (B, Hkv, Sk, D) from grad_out and out (B, H, Sq, D), lse
    (B, H, Sq) and grad_lse (the same, or None), q, k and v as the forward saw them."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    if (not fa2_covers(q.device, q.dtype, q.shape[-1], args, grad_lse) or seqlen_q == 0
            or seqlen_k == 0):
        return attention_backward(grad_out, grad_lse, q, k, v, out, lse, args)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    unused = lse.new_empty(0, dtype=torch.int64)  # dropout's seed and offset
    if cudnn_covers(q.device, seqlen_q, seqlen_k, args):
        if grad_out.stride() != out.stride():
            grad_out, out = grad_out.contiguous(), out.contiguous()
        stats = lse.unsqueeze(-1) if _cudnn_stats_dims() == 4 else lse
        try:
            return _CUDNN_BACKWARD(grad_out, q, k, v, out, stats, unused, unused, None, None,
                                   None, seqlen_q, seqlen_k, 0.0, args.causal,
                                   scale=args.sm_scale)
        except RuntimeError:  # refused while building its graph: FlashAttention-2's below
            pass

    def bshd(x: torch.Tensor) -> torch.Tensor:  # FlashAttention-2's (B, S, H, D) view
        return x.transpose(1, 2)

    lse = torch.where(lse == float("-inf"), float("inf"), lse)
    dq, dk, dv = _FA2_BACKWARD(
        bshd(grad_out), bshd(q), bshd(k), bshd(v), bshd(out), lse, None, None, seqlen_q,
        seqlen_k, 0.0, args.causal, unused, unused, scale=args.sm_scale,
        window_size_left=args.window_left, window_size_right=args.window_right)
    return bshd(dq), bshd(dk), bshd(dv)
