"""Gradients of the kernels' outputs (the Triton kernels are forward-only).

PyTorch's fused attention backward kernels run on our forward's output and lse where they
cover a call; the blockwise PyTorch recomputation of ``kernels.torch_attention`` does the
rest. Our lse, natural log, (B, H, Sq) dense or (H, total_q) packed, is what both kernels take
as their softmax statistics; a row that saw no key is the one difference (+inf in theirs,
-inf in ours).

- Both cover CUDA devices of compute capability 8.0 and newer, fp16 and bf16, head_dim a
  multiple of 8 up to 256 (above 192 only on sm80 and sm90), no ALiBi or softcap, and no
  gradient flowing into lse.
- FlashAttention-2's backward (``aten._flash_attention_backward``) aligns causal masks and
  windows bottom-right and reads GQA in place, like our kernels, and takes packed sequences
  (``varlen_backward``); it takes no mask.
- cuDNN's backward is 1.6-1.8x faster than FlashAttention-2's on the H200, but aligns causal
  masks top-left and has no windows: it takes dense calls without a window, causal only when
  Sq == Sk, on sm90 (where it was measured), unless deterministic algorithms are asked for
  (FlashAttention-2's honours them). It also takes masks, as an additive bias in the inputs'
  dtype: a bool mask (0 / -inf), or a floating mask already in that dtype (one of another
  dtype would be rounded, and the backward would no longer match the forward's scores). A
  configuration that its frontend refuses (raised while it builds its graph, before any
  work) runs FlashAttention-2's instead, or the blockwise backward for a mask.

Compiled graphs call these choices at run time, through the ops ``flashattn::attention_bwd``
and ``flashattn::attention_varlen_bwd`` (``kernels.api``).

H200, 2026-12-01 (benchmarks/NOTES.md, ``bench_backward.py``), B8 H16 S2k D64 causal fp16:
forward + backward 26.2 ms blockwise, 1.13 ms with FlashAttention-2's backward (SDPA's own
0.73-0.81 ms); backward alone 0.91 ms with FlashAttention-2's, 0.55 ms with cuDNN's, 0.88 ms
with cuDNN's and a key-padding mask (30 ms forward + backward blockwise).
"""

from __future__ import annotations

import functools

import torch

from . import _runtime
from ._launch import ScoreArgs
from .torch_attention import attention_backward, varlen_attention_backward

_FA2_BACKWARD = getattr(torch.ops.aten, "_flash_attention_backward", None)
# torch builds whose FlashAttention-2 backward takes windows (older ones cannot run ours)
_FA2_WINDOWS = _FA2_BACKWARD is not None and "window_size_left" in str(
    _FA2_BACKWARD.default._schema)
_CUDNN_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
_CUDNN_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward",
                          None)


def _fused_covers(device: torch.device, dtype: torch.dtype, head_dim: int, args: ScoreArgs,
                  grad_lse: torch.Tensor | None) -> bool:
    """What both fused backwards need (masks aside)."""
    if (grad_lse is not None or not _FA2_WINDOWS or device.type != "cuda"
            or torch.version.cuda is None or dtype not in (torch.float16, torch.bfloat16)):
        return False
    if args.alibi_slopes is not None or args.softcap > 0:
        return False
    capability = _runtime.capability(device)
    if head_dim % 8 or head_dim > 256 or capability < (8, 0):
        return False
    return head_dim <= 192 or capability in ((8, 0), (9, 0))


def fa2_covers(device: torch.device, dtype: torch.dtype, head_dim: int, args: ScoreArgs,
               grad_lse: torch.Tensor | None) -> bool:
    """Whether FlashAttention-2's backward computes the gradients of a call on ``device``
    with inputs of ``dtype``; ``grad_lse`` None when no gradient flows into lse."""
    return args.attn_mask is None and _fused_covers(device, dtype, head_dim, args, grad_lse)


def cudnn_covers(device: torch.device, dtype: torch.dtype, head_dim: int, seqlen_q: int,
                 seqlen_k: int, args: ScoreArgs, grad_lse: torch.Tensor | None) -> bool:
    """Whether cuDNN's backward may take a dense call (arguments as ``fa2_covers``)."""
    if (_CUDNN_BACKWARD is None or _CUDNN_FORWARD is None
            or torch.are_deterministic_algorithms_enabled()):  # FlashAttention-2 honours it
        return False
    if not _fused_covers(device, dtype, head_dim, args, grad_lse):
        return False
    mask = args.attn_mask
    if mask is not None and mask.dtype not in (torch.bool, dtype):
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


def _cudnn_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask's broadcast view (B, H, Sq, Sk) as cuDNN's additive bias of ``dtype``:
    (B, 1 or H, Sq, Sk), built at the mask's own size (a key-padding mask (B, 1, 1, Sk) stays
    B x Sk elements) and broadcast back, rows contiguous."""
    shape = mask.shape
    compact = mask[tuple(slice(0, 1) if stride == 0 else slice(None)
                         for stride in mask.stride()[:3])]
    if compact.dtype == torch.bool:
        bias = torch.zeros(compact.shape, device=mask.device, dtype=dtype)
        compact = bias.masked_fill_(~compact, float("-inf"))
    elif compact.stride(-1) != 1:
        compact = compact.contiguous()
    return compact.expand(shape[0], compact.shape[1], shape[2], shape[3])


def _positive_inf_rows(lse: torch.Tensor) -> torch.Tensor:
    """lse as the fused backwards take it: +inf where a row saw no key."""
    return torch.where(lse == float("-inf"), float("inf"), lse)


def _unit_stride(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The fused kernels read head_dim contiguously."""
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def dense_backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, args: ScoreArgs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, H, Sq, D), dk and dv (B, Hkv, Sk, D) from grad_out and out (B, H, Sq, D), lse
    (B, H, Sq) and grad_lse (the same, or None), q, k and v as the forward saw them."""
    seqlen_q, seqlen_k, head_dim = q.shape[2], k.shape[2], q.shape[3]
    fa2 = fa2_covers(q.device, q.dtype, head_dim, args, grad_lse)
    cudnn = cudnn_covers(q.device, q.dtype, head_dim, seqlen_q, seqlen_k, args, grad_lse)
    if not (fa2 or cudnn) or seqlen_q == 0 or seqlen_k == 0:
        return attention_backward(grad_out, grad_lse, q, k, v, out, lse, args)
    fq, fk, fv = _unit_stride(q, k, v)
    # every row sees a key in the calls cuDNN takes without a mask: lse as it is (0.5% of a
    # B8 H16 S2k D64 training step saved, H200)
    stats = lse if cudnn and args.attn_mask is None else _positive_inf_rows(lse)
    unused = lse.new_empty(0, dtype=torch.int64)  # dropout's seed and offset
    if cudnn:
        if grad_out.stride() != out.stride():
            grad_out, out = grad_out.contiguous(), out.contiguous()
        bias = None if args.attn_mask is None else _cudnn_bias(args.attn_mask, q.dtype)
        try:
            return _CUDNN_BACKWARD(
                grad_out, fq, fk, fv, out, stats.unsqueeze(-1) if _cudnn_stats_dims() == 4
                else stats, unused, unused, bias, None, None, seqlen_q, seqlen_k, 0.0,
                args.causal, scale=args.sm_scale)
        except RuntimeError:  # refused while building its graph: the next backward below
            if not fa2:
                return attention_backward(grad_out, grad_lse, q, k, v, out, lse, args)

    def bshd(x: torch.Tensor) -> torch.Tensor:  # FlashAttention-2's (B, S, H, D) view
        return x.transpose(1, 2)

    dq, dk, dv = _FA2_BACKWARD(
        bshd(grad_out), bshd(fq), bshd(fk), bshd(fv), bshd(out), stats, None, None, seqlen_q,
        seqlen_k, 0.0, args.causal, unused, unused, scale=args.sm_scale,
        window_size_left=args.window_left, window_size_right=args.window_right)
    return bshd(dq), bshd(dk), bshd(dv)


def varlen_backward_is_fused(q: torch.Tensor, alibi_slopes: torch.Tensor | None = None,
                             softcap: float = 0.0) -> bool:
    """Whether the backward of ``flash_attention_varlen`` on packed q (total_q, H, D) with
    these options runs FlashAttention-2's varlen kernel (when no gradient flows into lse);
    otherwise it recomputes sequence by sequence after a host read."""
    args = ScoreArgs(1.0, False, -1, -1, softcap, None, alibi_slopes)
    return fa2_covers(q.device, q.dtype, q.shape[-1], args, None)


def varlen_backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, args: ScoreArgs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (total_q, H, D), dk and dv (total_k, Hkv, D) of packed sequences, from grad_out and
    out (total_q, H, D), lse and grad_lse (H, total_q); the maximum lengths are the forward's
    upper bounds. FlashAttention-2's varlen backward where it covers the call (no host read;
    rows after the last sequence are zeroed on the device, it leaves them unwritten), else
    the blockwise backward sequence by sequence (one host read of the cumulative lengths)."""
    if (not fa2_covers(q.device, q.dtype, q.shape[-1], args, grad_lse) or q.shape[0] == 0
            or k.shape[0] == 0):
        return varlen_attention_backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q,
                                         cu_seqlens_k, args)
    grad_out, q, k, v = _unit_stride(grad_out, q, k, v)
    unused = lse.new_empty(0, dtype=torch.int64)
    grads = _FA2_BACKWARD(
        grad_out, q, k, v, out, _positive_inf_rows(lse), cu_seqlens_q, cu_seqlens_k,
        max(max_seqlen_q, 1), max(max_seqlen_k, 1), 0.0, args.causal, unused, unused,
        scale=args.sm_scale, window_size_left=args.window_left,
        window_size_right=args.window_right)[:3]
    for grad, cu in zip(grads, (cu_seqlens_q, cu_seqlens_k, cu_seqlens_k), strict=True):
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad.masked_fill_((rows >= cu[-1])[:, None, None], 0)
    return grads
