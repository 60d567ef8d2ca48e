"""Public entry points: validation, layout handling, output allocation, and the custom op that
torch.compile and autograd see.

Layouts are a matter of strides: q, k and v reach the op as (B, H, S, D) views (a BSHD
tensor as its (1, 2) transpose), and the output is allocated in the layout the caller wants
back, so both layouts run the same kernels without a copy.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch

from . import _launch, _plan, _runtime
from ._backward import dense_backward, varlen_backward
from ._launch import ScoreArgs

Variant = Literal["v1", "v2", "auto"]
_VARIANTS = ("v1", "v2", "auto")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- validation

def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


_LAYOUT_DIMS = {"bhsd": ("(batch, heads, seq_len, head_dim)", 1, 2),
                "bshd": ("(batch, seq_len, heads, head_dim)", 2, 1),
                "thd": ("(total_tokens, heads, head_dim)", 1, 0)}


def check_qkv(q: object, k: object, v: object, layout: str, rank: int = 4) -> None:
    """Validate q, k, v for ``layout`` ("bhsd", "bshd" or "thd" for packed varlen)."""
    dims, head_axis, seq_axis = _LAYOUT_DIMS[layout]
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
        if x.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {dims}, got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; expected float16, bfloat16 or float32")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; they must match")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; they must match")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q must be on a CUDA or CPU device, got {q.device}")
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    if layout != "thd" and not (q_shape[0] == k_shape[0] == v_shape[0]):
        raise ValueError(f"batch sizes of q, k, v differ: {q_shape[0]}, {k_shape[0]}, "
                         f"{v_shape[0]}")
    heads, kv_heads = q_shape[head_axis], k_shape[head_axis]
    if v_shape[head_axis] != kv_heads:
        raise ValueError(f"k and v must have the same number of heads, got {kv_heads} and "
                         f"{v_shape[head_axis]}")
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k/v's heads ({kv_heads})")
    if k_shape[seq_axis] != v_shape[seq_axis]:
        raise ValueError(f"k and v must have the same seq_len, got {k_shape[seq_axis]} and "
                         f"{v_shape[seq_axis]}")
    head_dim = q_shape[-1]
    if k_shape[-1] != head_dim or v_shape[-1] != head_dim:
        raise ValueError(f"head_dim of q, k, v must match, got {head_dim}, {k_shape[-1]}, "
                         f"{v_shape[-1]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")


def _check_variant(variant: object) -> None:
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")


def score_args(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, *, causal: bool,
               softmax_scale: float | None, attn_mask: torch.Tensor | None,
               window_size: tuple[int, int], softcap: float,
               alibi_slopes: torch.Tensor | None) -> ScoreArgs:
    """Validate the score options against q (B, H, Sq, D) and k (B, Hkv, Sk, D) views and
    return them in kernel form (mask and slopes as broadcast views, never copied on CUDA)."""
    batch, heads, seqlen_q, head_dim = q_bhsd.shape
    seqlen_k = k_bhsd.shape[2]
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale must be a float or None, got "
                        f"{type(softmax_scale).__name__}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1: unbounded), got "
                         f"{window_size!r}")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"softcap must be a float >= 0 (0: off), got {softcap!r}")
    left, right = window_size
    if causal:
        right = 0
    return ScoreArgs(
        sm_scale=float(softmax_scale), causal=causal, window_left=left, window_right=right,
        softcap=float(softcap),
        attn_mask=_prepare_mask(attn_mask, q_bhsd, batch, heads, seqlen_q, seqlen_k),
        alibi_slopes=_prepare_alibi(alibi_slopes, q_bhsd, batch, heads),
    )


def _prepare_mask(mask: object, q: torch.Tensor, batch: int, heads: int, seqlen_q: int,
                  seqlen_k: int) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = _check_tensor("attn_mask", mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = take part) or floating (added to the "
                        f"scores), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"attn_mask is on {mask.device} but q is on {q.device}")
    if mask.requires_grad and torch.is_grad_enabled():
        raise ValueError("attn_mask requires grad, but the kernels give no gradient to masks; "
                         "detach it, or compute this call with torch's SDPA")
    target = (batch, heads, seqlen_q, seqlen_k)
    if mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dims, got shape {tuple(mask.shape)}")
    try:
        view = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(target)
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"(batch, heads, seq_q, seq_k) = {target}") from None
    if q.device.type == "cpu" and view.is_floating_point() and view.dtype != torch.float32:
        view = view.float()  # the interpreter computes bf16 wrongly; CPU only
    return view


def _prepare_alibi(slopes: object, q: torch.Tensor, batch: int, heads: int
                   ) -> torch.Tensor | None:
    if slopes is None:
        return None
    slopes = _check_tensor("alibi_slopes", slopes)
    if slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {slopes.dtype}")
    if slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on {slopes.device} but q is on {q.device}")
    if tuple(slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), got "
                         f"{tuple(slopes.shape)}")
    return slopes.expand(batch, heads)


# ----------------------------------------------------------------------------- custom op

def _run_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: ScoreArgs,
                variant: str, bshd: bool, cu_seqlens_q: torch.Tensor | None,
                cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, store_lse: bool = True,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Allocate the outputs and launch. Dense: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) views;
    out is (B, Sq, H, D) memory when ``bshd``, else (B, H, Sq, D). Varlen: (T, H, D). Without
    ``store_lse`` (a dense eager call that neither returns nor differentiates it) no lse is
    allocated or written, and None is returned in its place."""
    if cu_seqlens_q is not None:  # (T, H, D) -> a (1, H, T, D) view
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((q.shape[1], q.shape[0]), device=q.device, dtype=torch.float32)
        qv, kv, vv, ov = (x.unsqueeze(0).transpose(1, 2) for x in (q, k, v, out))
        lse_view = lse.unsqueeze(0)
    else:
        batch, heads, seqlen_q, head_dim = q.shape
        if bshd:
            out = torch.empty((batch, seqlen_q, heads, head_dim), device=q.device, dtype=q.dtype)
            ov = out.transpose(1, 2)
        else:
            out = ov = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        lse = lse_view = torch.empty((batch, heads, seqlen_q), device=q.device,
                                     dtype=torch.float32) if store_lse else None
        qv, kv, vv = q, k, v
    if out.numel() == 0 or kv.shape[2] == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # The interpreter computes bf16 wrongly: run in float32 and round the output once.
        out32 = torch.empty(ov.shape, dtype=torch.float32)
        _dispatch(qv.float(), kv.float(), vv.float(), out32, lse_view, args, variant,
                  cu_seqlens_q, cu_seqlens_k, max_seqlen_q)
        ov.copy_(out32)
    else:
        _dispatch(qv, kv, vv, ov, lse_view, args, variant, cu_seqlens_q, cu_seqlens_k,
                  max_seqlen_q)
    return out, lse


def _dispatch(q, k, v, out, lse, args, variant, cu_seqlens_q, cu_seqlens_k, max_seqlen_q):
    if variant == "v1":
        _launch.forward_v1(q, k, v, out, lse, args)
    elif variant == "splitkv":
        _launch.forward_splitkv(q, k, v, out, lse, args)
    elif variant == "v2" and cu_seqlens_q is None and _launch.hopper_ok(q, k, v, out, args):
        _launch.forward_hopper(q, k, v, out, lse, args)  # FA2's algorithm, Hopper's schedule
    elif variant == "v2":
        _launch.forward_v2(q, k, v, out, lse, args, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q)
    else:
        raise ValueError(f"unknown kernel variant {variant!r}")


@torch.library.custom_op("flashattn::attention_fwd", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, bshd: bool,
    variant: str, causal: bool, sm_scale: float, window_left: int, window_right: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Sq, D), k/v (B, Hkv, Sk, D) views (varlen: (T, H, D)); returns out, (B, Sq,
    H, D) when ``bshd`` else (B, H, Sq, D), and lse (B, H, Sq) (varlen: (H, T)). The maximum
    lengths bound the packed sequences (0 for dense calls); only the backward reads
    ``max_seqlen_k``."""
    if cu_seqlens_q is None:  # direct calls may pass unexpanded masks and slopes: free views
        batch, heads, seqlen_q = q.shape[:3]
        if attn_mask is not None:
            attn_mask = attn_mask.expand(batch, heads, seqlen_q, k.shape[2])
        if alibi_slopes is not None:
            alibi_slopes = alibi_slopes.expand(batch, heads)
    args = ScoreArgs(sm_scale, causal, window_left, window_right, softcap, attn_mask,
                     alibi_slopes)
    return _run_kernel(q, k, v, args, variant, bshd, cu_seqlens_q, cu_seqlens_k, max_seqlen_q)


@_attention_op.register_fake
def _attention_op_fake(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, bshd, variant, causal, sm_scale, window_left,
                       window_right, softcap):
    if cu_seqlens_q is not None:
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))
    batch, heads, seqlen_q, head_dim = q.shape
    out = q.new_empty((batch, seqlen_q, heads, head_dim) if bshd else tuple(q.shape))
    return out, q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("flashattn::attention_varlen_bwd", mutates_args=())
def _varlen_backward_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    alibi_slopes: torch.Tensor | None, sm_scale: float, causal: bool, window_left: int,
    window_right: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (total_q, H, D), dk and dv (total_k, Hkv, D) of the varlen op. An op of its own:
    its blockwise fallback reads the cumulative lengths on the host, which torch.compile must
    not trace."""
    args = ScoreArgs(sm_scale, causal, window_left, window_right, softcap, None, alibi_slopes)
    return varlen_backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                           max_seqlen_q, max_seqlen_k, args)


@_varlen_backward_op.register_fake
def _varlen_backward_op_fake(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, alibi_slopes, sm_scale, causal,
                             window_left, window_right, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _dense_grads(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, attn_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None, sm_scale: float, causal: bool, window_left: int,
    window_right: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, H, Sq, D), dk and dv (B, Hkv, Sk, D) of a dense call (``dense_backward``)."""
    args = ScoreArgs(sm_scale, causal, window_left, window_right, softcap, attn_mask,
                     alibi_slopes)
    return dense_backward(grad_out, grad_lse, q, k, v, out, lse, args)


@torch.library.custom_op("flashattn::attention_bwd", mutates_args=())
def _dense_backward_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, attn_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None, sm_scale: float, causal: bool, window_left: int,
    window_right: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_dense_grads`` as the op's compiled backward: an op of its own, so that a compiled
    graph makes the same choice of backward kernel as eager mode, at run time (cuDNN's is
    tried and may fall back). Gradients come back with q's, k's and v's strides, as the
    fake implementation promises (copied only where a backward returned others: for q, k, v
    that are non-dense views, e.g. of one packed qkv tensor, FlashAttention-2's backward
    allocates dense gradients). Eager mode calls ``_dense_grads`` itself, with no copy."""
    grads = _dense_grads(grad_out, grad_lse, q, k, v, out, lse, attn_mask, alibi_slopes,
                         sm_scale, causal, window_left, window_right, softcap)
    return tuple(g if g.stride() == x.stride() else torch.empty_like(x).copy_(g)
                 for g, x in zip(grads, (q, k, v), strict=True))


@_dense_backward_op.register_fake
def _dense_backward_op_fake(grad_out, grad_lse, q, k, v, out, lse, attn_mask, alibi_slopes,
                            sm_scale, causal, window_left, window_right, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, alibi_slopes, cu_q, cu_k, max_seqlen_q, max_seqlen_k, bshd, _, causal,
     sm_scale, window_left, window_right, softcap) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, alibi_slopes, cu_q, cu_k)
    ctx.bshd = bshd
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.scalars = (sm_scale, causal, window_left, window_right, softcap)
    # An output that takes no part in the loss gets None rather than zeros: a call whose lse
    # is unused can then take a fused backward kernel (kernels._backward).
    ctx.set_materialize_grads(False)


def _backward_with(dense_grads):
    """The autograd backward of the op, computing dense gradients with ``dense_grads``
    (``_dense_grads`` in eager mode, the ``_dense_backward_op`` in compiled graphs)."""
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, attn_mask, alibi_slopes, cu_q, cu_k = ctx.saved_tensors
        if grad_out is None:  # only lse takes part in the loss
            grad_out = torch.zeros_like(out)
        if cu_q is not None:  # packed (T, H, D) inputs
            grads = _varlen_backward_op(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k,
                                        *ctx.max_seqlens, alibi_slopes, *ctx.scalars)
            return tuple(grads) + (None,) * 13
        if ctx.bshd:  # the output (and its gradient) in (B, Sq, H, D); q, k, v are BHSD views
            grad_out, out = grad_out.transpose(1, 2), out.transpose(1, 2)
        grads = dense_grads(grad_out, grad_lse, q, k, v, out, lse, attn_mask, alibi_slopes,
                            *ctx.scalars)
        return tuple(grads) + (None,) * 13
    return backward


_attention_op.register_autograd(_backward_with(_dense_backward_op),
                                setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The custom op's autograd, without the custom op's dispatch cost (eager only)."""

    @staticmethod
    def forward(*inputs):
        (q, k, v, attn_mask, alibi_slopes, cu_q, cu_k, max_seqlen_q, _, bshd, variant, causal,
         sm_scale, window_left, window_right, softcap) = inputs
        args = ScoreArgs(sm_scale, causal, window_left, window_right, softcap, attn_mask,
                         alibi_slopes)
        return _run_kernel(q, k, v, args, variant, bshd, cu_q, cu_k, max_seqlen_q)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward_with(_dense_grads))


def _call(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
          max_seqlen_k, bshd, variant, causal, sm_scale, window_left, window_right, softcap, *,
          return_lse=True):
    """Run the op (arguments: the op's inputs): through the registered custom op when
    torch.compile traces, otherwise directly (the custom op's Python dispatch costs tens of
    microseconds per call, which a decode step cannot hide). A direct call that needs no
    gradient skips the lse unless ``return_lse`` (its second result is then None)."""
    inputs = (q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
              max_seqlen_k, bshd, variant, causal, sm_scale, window_left, window_right, softcap)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                              or v.requires_grad)
    if torch.compiler.is_compiling():
        return _attention_op(*inputs)
    if needs_grad:
        return _EagerAttention.apply(*inputs)
    args = ScoreArgs(sm_scale, causal, window_left, window_right, softcap, attn_mask,
                     alibi_slopes)
    return _run_kernel(q, k, v, args, variant, bshd, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       store_lse=return_lse)


# ----------------------------------------------------------------------------- entry points

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str,
              out_bshd: bool, variant: str, causal: bool, softmax_scale: float | None,
              return_lse: bool, attn_mask: torch.Tensor | None, window_size: tuple[int, int],
              softcap: float, alibi_slopes: torch.Tensor | None
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Shared body of the dense entry points: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) for
    ``layout`` "bhsd", (B, S, H, D) for "bshd", any strides (validated here). Returns out
    (B, Sq, H, D) when ``out_bshd`` else (B, H, Sq, D), contiguous, and lse (B, H, Sq) with
    ``return_lse``.

    A mask-free eager call replays the launches recorded by the first call of its signature,
    or of its growing-cache family (``kernels._plan``): its inputs were validated then, and
    the key holds everything that the checks, the selector and the launchers read."""
    key = None
    if attn_mask is None and alibi_slopes is None:
        key = _plan.signature(q, k, v, layout, out_bshd, variant, causal, softmax_scale,
                              return_lse, window_size, softcap)
        if key is not None:
            key, plan = _plan.lookup(key, k, layout)
            if plan is not None:
                if plan is _plan.NOT_REPLAYABLE:
                    key = None
                else:
                    out, lse = _plan.replay(plan, q, k, v, _runtime.replay_launch)
                    return (out, lse) if return_lse else out
    check_qkv(q, k, v, layout)
    k_in, v_in = k, v
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    elif key is not None:  # new objects: a recording tells q, k and v apart by identity,
        # also when the caller passed one tensor for all three
        q, k, v = q.view(q.shape), k.view(k.shape), v.view(v.shape)
    if key is None:
        out, lse = _general(q, k, v, out_bshd, variant, causal, softmax_scale, return_lse,
                            attn_mask, window_size, softcap, alibi_slopes)
        return (out, lse) if return_lse else out
    # first call of this signature: record it (and, for a growing-cache family, record it
    # again without launching on a small probe cache)
    with _plan.Recorder() as recorder:
        out, lse = _general(q, k, v, out_bshd, variant, causal, softmax_scale, return_lse,
                            None, window_size, softcap, None)
    call = _plan.Call(q, k, v, out, lse, k_in)
    probe = None
    if _plan.is_family(key):
        k_probe, v_probe = _plan.probe_cache(k_in, v_in, layout)
        kp, vp = ((x.transpose(1, 2) if layout == "bshd" else x) for x in (k_probe, v_probe))
        with _plan.Recorder(dry=True) as dry:
            probe_out, probe_lse = _general(q, kp, vp, out_bshd, recorder.variant, causal,
                                            softmax_scale, return_lse, None, window_size,
                                            softcap, None)
        probe = dry, _plan.Call(q, kp, vp, probe_out, probe_lse, k_probe)
    _plan.store(key, recorder, call, probe)
    return (out, lse) if return_lse else out


def _general(q, k, v, out_bshd, variant, causal, softmax_scale, return_lse, attn_mask,
             window_size, softcap, alibi_slopes):
    """``attention`` without plans: returns (out, lse or None)."""
    args = score_args(q, k, causal=causal, softmax_scale=softmax_scale, attn_mask=attn_mask,
                      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes)
    if variant == "auto":
        from .selector import choose_variant
        variant = choose_variant(q.device, batch=q.shape[0], heads=q.shape[1],
                                 seq_len=q.shape[2], seq_len_k=k.shape[2], head_dim=q.shape[3],
                                 kv_heads=k.shape[1], dtype=q.dtype, causal=causal)
    recorder = _plan.active_recorder()
    if recorder is not None:
        recorder.variant = variant
    return _call(q, k, v, args.attn_mask, args.alibi_slopes, None, None, 0, 0, out_bshd,
                 variant, causal, args.sm_scale, args.window_left, args.window_right, args.softcap,
                 return_lse=return_lse)


@overload
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = ...,
                    softmax_scale: float | None = ..., variant: Variant = ...,
                    return_lse: Literal[False] = ..., attn_mask: torch.Tensor | None = ...,
                    window_size: tuple[int, int] = ..., softcap: float = ...,
                    alibi_slopes: torch.Tensor | None = ...) -> torch.Tensor: ...
@overload
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = ...,
                    softmax_scale: float | None = ..., variant: Variant = ...,
                    return_lse: Literal[True], attn_mask: torch.Tensor | None = ...,
                    window_size: tuple[int, int] = ..., softcap: float = ...,
                    alibi_slopes: torch.Tensor | None = ...
                    ) -> tuple[torch.Tensor, torch.Tensor]: ...
def flash_attention(q, k, v, *, causal=False, softmax_scale=None, variant="v1",
                    return_lse=False, attn_mask=None, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None):
    """Attention on (batch, heads, seq_len, head_dim) tensors ("BHSD", PyTorch's layout).

    Args:
        q: (B, H, Sq, D); k, v: (B, Hkv, Sk, D) with H % Hkv == 0 (GQA/MQA: query head h
            reads K/V head h // (H // Hkv), without copying K/V). float16, bfloat16 or
            float32, D from 1 to 256, any strides. CUDA tensors run compiled kernels; CPU
            tensors run the same kernels through Triton's interpreter.
        causal: query i sees key j iff j <= i + Sk - Sq (aligned bottom-right).
        softmax_scale: defaults to 1 / sqrt(D).
        variant: "v1" (FlashAttention-1 schedule, the default of the layout guide), "v2"
            (FlashAttention-2 on the BHSD strides, no copy; on sm_90 its plain head_dim 128
            and 256 calls run with FlashAttention-3's warp-specialised schedule,
            ``kernels._launch.hopper_covers``) or "auto" (BackendSelector's choice).
            **"auto" is the fast choice**; "v1" is kept for reference.
        return_lse: also return the natural-log log-sum-exp (B, H, Sq), float32, -inf for rows
            that see no key.
        attn_mask: SDPA's convention, broadcastable to (B, H, Sq, Sk): bool (True = take
            part) or floating (added to the scaled scores). Broadcast dims are read with
            stride 0. Combined with ``causal`` and ``window_size`` when given.
        window_size: (left, right), flash-attn's sliding window: query i sees keys j with
            i + Sk - Sq - left <= j <= i + Sk - Sq + right; -1 is unbounded; right is 0 when
            causal.
        softcap: when > 0, scores become softcap * tanh(scores / softcap) after scaling and
            before masks and ALiBi.
        alibi_slopes: float32 (H,) or (B, H); adds -slope * |i + Sk - Sq - j|.

    Returns:
        out (B, H, Sq, D) in q's dtype, and lse (B, H, Sq) if ``return_lse``. A row that sees
        no key gives 0 (lse -inf). Float32 inputs use TF32 matrix units on the GPU only when
        ``torch.get_float32_matmul_precision()`` is not "highest". Differentiable in q, k, v
        (and through lse): PyTorch's fused cuDNN or FlashAttention-2 backward kernels where
        they cover the call, else a blockwise recomputation in PyTorch (``kernels._backward``
        says which).
    """
    _check_variant(variant)
    return attention(q, k, v, layout="bhsd", out_bshd=False, variant=variant, causal=causal,
                     softmax_scale=softmax_scale, return_lse=return_lse, attn_mask=attn_mask,
                     window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes)


def flash_attention_v2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       causal: bool = False, softmax_scale: float | None = None,
                       return_lse: bool = False, attn_mask: torch.Tensor | None = None,
                       window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                       alibi_slopes: torch.Tensor | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 on (batch, seq_len, heads, head_dim) tensors ("BSHD", flash-attn's
    layout): q (B, Sq, H, D), k/v (B, Sk, Hkv, D); returns (B, Sq, H, D) and, with
    ``return_lse``, lse (B, H, Sq). Every option means what it means in ``flash_attention``
    (and, as its "v2", takes the warp-specialised Hopper kernel where that covers the call);
    ``attn_mask`` still broadcasts to (B, H, Sq, Sk) whatever the layout."""
    return attention(q, k, v, layout="bshd", out_bshd=True, variant="v2", causal=causal,
                     softmax_scale=softmax_scale, return_lse=return_lse, attn_mask=attn_mask,
                     window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes)


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                           softmax_scale: float | None = None,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: torch.Tensor | None = None, return_lse: bool = False
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences of different lengths, flash-attn's
    ``flash_attn_varlen_func`` semantics (options keyword-only, no dropout).

    Args:
        q: (total_q, H, D); k, v: (total_k, Hkv, D) with H % Hkv == 0.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) cumulative lengths starting at 0;
            sequence b is rows cu[b]:cu[b + 1]. Causal and windows align each sequence's
            queries to its keys bottom-right, as in ``flash_attention``.
        max_seqlen_q, max_seqlen_k: upper bounds of the lengths (the grid is sized by
            max_seqlen_q; no host read of the cumulative lengths).
        alibi_slopes: float32 (H,) or (batch, H).

    Returns:
        out (total_q, H, D), and lse (H, total_q) float32 with ``return_lse``.

    Differentiable in q, k and v (and through lse): FlashAttention-2's varlen backward kernel
    where it covers the call (fp16/bf16 on sm80+, no ALiBi or softcap, no gradient into lse;
    ``kernels._backward``), else a recomputation in PyTorch sequence by sequence that reads
    the cumulative lengths on the host once per backward.
    """
    check_qkv(q, k, v, "thd", rank=3)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_tensor(name, cu)
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of batch + 1 >= 2 offsets, "
                             f"got {cu.dtype} of shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    batch = cu_seqlens_q.shape[0] - 1
    # Score options see (batch, H, max_seqlen_q, D)-shaped views; only shapes are read.
    qv = q.new_empty(1).expand(batch, q.shape[1], max_seqlen_q, q.shape[2])
    kv = k.new_empty(1).expand(batch, k.shape[1], max_seqlen_k, k.shape[2])
    args = score_args(qv, kv, causal=causal, softmax_scale=softmax_scale, attn_mask=None,
                      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes)
    out, lse = _call(q, k, v, None, args.alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, False, "v2", causal, args.sm_scale,
                     args.window_left, args.window_right, args.softcap)
    return (out, lse) if return_lse else out
