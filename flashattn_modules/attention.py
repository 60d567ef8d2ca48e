"""``FlashSelfAttention`` and ``FlashCrossAttention``: flash-attn's module contract
(``flash_attn.modules.mha``) on our kernels, and the helpers every module shares.

Where a call runs:
- CUDA tensors run our Triton kernels; CPU tensors follow ``FLASHATTN_CPU_BACKEND``, read at each
  call (``sdpa``, the default: PyTorch with exactly the kernels' semantics; ``triton``: the
  kernels through Triton's interpreter), see ``flashattn_modules._dispatch``.
- What the kernels do not have is computed through PyTorch (SDPA, or an explicit matmul-softmax
  when weights are asked for), with a one-time ``warnings.warn`` notice, skipped while
  ``torch.compile`` traces: attention dropout in training, masks that require grad, and inputs
  the kernels do not take (float64, head_dim > 256, devices other than CUDA and CPU). Masks are
  then built on the device, without a host sync.

Semantics everywhere: causal masks and windows align the last query with the last key
(bottom-right, as flash-attn); a query row that sees no key gives 0.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from kernels import flash_attention_v2, flash_attention_varlen
from kernels._backward import varlen_backward_is_fused
from kernels.api import MAX_HEAD_DIM

from . import _dispatch

__all__ = ["FlashCrossAttention", "FlashSelfAttention"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LAYOUTS = ("bshd", "bhsd")
_shown_notices: set[str] = set()


# ----------------------------------------------------------------------------- shared helpers

def notice_once(key: str, message: str) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process; nothing while
    ``torch.compile`` traces."""
    if torch.compiler.is_compiling() or key in _shown_notices:
        return
    _shown_notices.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)


def unsupported_by_kernels(x: torch.Tensor, head_dim: int) -> str | None:
    """Why the kernels cannot take ``x`` (a query tensor) with this head_dim, or None."""
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype}"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    if x.device.type not in ("cuda", "cpu"):
        return f"device type {x.device.type}"
    return None


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bshd: bool,
                     causal: bool = False, softmax_scale: float | None = None,
                     attn_mask: torch.Tensor | None = None,
                     window_size: tuple[int, int] = (-1, -1),
                     alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Our kernels' attention, under the CPU policy of ``_dispatch``.

    q (B, H, Sq, D) and k, v (B, Hkv, Sk, D), or with ``bshd`` q (B, Sq, H, D) and k, v
    (B, Sk, Hkv, D); any strides. ``attn_mask``: SDPA convention (bool True = take part, or
    float added), broadcastable to (B, H, Sq, Sk). Returns the output in q's layout, contiguous.
    """
    opts = dict(causal=causal, softmax_scale=softmax_scale, attn_mask=attn_mask,
                window_size=window_size, alibi_slopes=alibi_slopes)
    if not bshd:
        return _dispatch.attention(q, k, v, **opts)
    if q.device.type == "cpu" and _dispatch.cpu_backend() == "sdpa":
        out = _dispatch.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **opts)
        return out.transpose(1, 2).contiguous()  # CPU only: keep the layout's contiguity
    # The BSHD kernel writes (B, Sq, H, D) directly: no transpose copy of the output.
    return flash_attention_v2(q, k, v, **opts)


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """SDPA-convention mask (bool True = take part, or float added) -> additive float mask
    of the same shape (bool: 0 or -inf in ``dtype``; float: unchanged)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, float("-inf"))


def position_bias(seqlen_q: int, seqlen_k: int, device: torch.device, *, causal: bool,
                  window_size: tuple[int, int], alibi_slopes: torch.Tensor | None,
                  keep: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels' causal, window, ALiBi and key-keep masks as one float32 additive bias,
    built on the device: (Sq, Sk), or broadcastable to (B, H, Sq, Sk) with ALiBi slopes
    (H,) / (B, H) or ``keep`` (bool, True = take part, broadcastable to (B, H, Sq, Sk)).
    Positions align bottom-right (query i sits at key position i + Sk - Sq)."""
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0 and alibi_slopes is None and keep is None:
        return None
    rows = torch.arange(seqlen_q, device=device)[:, None]
    rel = rows + (seqlen_k - seqlen_q) - torch.arange(seqlen_k, device=device)[None, :]
    bias = torch.zeros((seqlen_q, seqlen_k), device=device, dtype=torch.float32)
    if right >= 0:
        bias = bias.masked_fill(rel < -right, float("-inf"))
    if left >= 0:
        bias = bias.masked_fill(rel > left, float("-inf"))
    if alibi_slopes is not None:
        bias = bias - alibi_slopes[..., None, None] * rel.abs().float()
    if keep is not None:
        bias = bias.masked_fill(~keep, float("-inf"))
    return bias


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    bias: torch.Tensor | None, *, scale: float, dropout_p: float,
                    need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention through PyTorch with the kernels' semantics, for what the kernels lack.

    q (B, H, Sq, D), k and v (B, Hkv, Sk, D); ``bias`` an additive float mask broadcastable to
    (B, H, Sq, Sk) (it may require grad). Rows whose bias is all -inf give 0 (and weights 0).
    With ``need_weights`` (Hkv == H only), an explicit matmul-softmax returns the weights
    (B, H, Sq, Sk) after dropout; otherwise SDPA runs and the weights are None.
    Returns out (B, H, Sq, D).
    """
    bias, empty = finite_bias(bias, q.dtype)
    if need_weights:
        weights = attention_weights(q, k, bias, empty, scale=scale)
        if dropout_p > 0:
            weights = F.dropout(weights, p=dropout_p)
        return torch.matmul(weights, v), weights
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                         scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return (out if empty is None else out.masked_fill(empty, 0.0)), None


def finite_bias(bias: torch.Tensor | None, dtype: torch.dtype
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """An additive bias (.., Sq, Sk) in ``dtype`` whose all -inf rows (rows that see no key)
    are set to 0, so that no NaN arises forward or backward, and those rows as a bool
    (.., Sq, 1) mask, for the caller to zero. (None, None) for no bias."""
    if bias is None:
        return None, None
    bias = bias.to(dtype)
    empty = torch.isneginf(bias).all(dim=-1, keepdim=True)
    return bias.masked_fill(empty, 0.0), empty


def attention_weights(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
                      empty: torch.Tensor | None, *, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) (B, H, Sq, Sk) in q's dtype, from q (B, H, Sq, D),
    k (B, H, Sk, D), a finite additive ``bias`` and the rows ``empty`` (broadcastable to
    (B, H, Sq, 1)) that see no key, whose weights are 0."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores, dim=-1)
    return weights if empty is None else weights.masked_fill(empty, 0.0)


# ----------------------------------------------------------------------------- varlen helpers

def _pad_right_aligned(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed x (total, H, D) -> (B, max_seqlen, H, D) with sequence b in the LAST rows and
    zeros before, and keep (B, max_seqlen), True on real tokens. Right alignment makes the
    dense bottom-right causal/window/ALiBi positions equal each sequence's own. Gathers on the
    device, no sync."""
    pos = torch.arange(max_seqlen, device=x.device, dtype=cu_seqlens.dtype)
    idx = cu_seqlens[1:, None] - max_seqlen + pos[None, :]
    keep = idx >= cu_seqlens[:-1, None]
    padded = F.pad(x, (0, 0, 0, 0, 0, 1))  # row `total` is the zero row of the padding
    return padded[torch.where(keep, idx, x.shape[0]).long()], keep


def _unpad_right_aligned(out: torch.Tensor, cu_seqlens: torch.Tensor, total: int
                         ) -> torch.Tensor:
    """Inverse of ``_pad_right_aligned`` for out (B, max_seqlen, H, D) -> (total, H, D)."""
    max_seqlen = out.shape[1]
    token = torch.arange(total, device=out.device, dtype=cu_seqlens.dtype)
    ends = cu_seqlens[1:]
    batch = torch.searchsorted(ends, token, right=True)
    row = batch * max_seqlen + (max_seqlen - ends[batch]) + token
    return out.flatten(0, 1)[row.long()]


# ----------------------------------------------------------------------------- modules

def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_cu_seqlens(name: str, cu: object, max_name: str, max_seqlen: object,
                      device: torch.device) -> None:
    cu = _check_tensor(name, cu)
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor of batch + 1 >= 2 offsets, got "
                         f"{cu.dtype} of shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the inputs are on {device}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise ValueError(f"{max_name} must be an int >= 0 (the longest sequence) when {name} "
                         f"is given, got {max_seqlen!r}")


class _FlashAttentionBase(nn.Module):
    """Options and dispatch shared by FlashSelfAttention and FlashCrossAttention."""

    alibi_slopes: torch.Tensor | None

    def __init__(self, causal: bool = False, softmax_scale: float | None = None,
                 attention_dropout: float = 0.0, window_size: tuple[int, int] = (-1, -1),
                 alibi_slopes: torch.Tensor | None = None, deterministic: bool = False, *,
                 layout: str = "bshd") -> None:
        super().__init__()
        _check_bool("causal", causal)
        _check_bool("deterministic", deterministic)
        if softmax_scale is not None and (
                not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool)):
            raise TypeError(f"softmax_scale must be a float or None, got "
                            f"{type(softmax_scale).__name__}")
        if (isinstance(attention_dropout, bool) or not isinstance(attention_dropout, (int, float))
                or not 0.0 <= attention_dropout <= 1.0):
            raise ValueError(f"attention_dropout must be a probability in [0, 1], got "
                             f"{attention_dropout!r}")
        if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
                or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1
                           for w in window_size)):
            raise ValueError(f"window_size must be a pair of ints >= -1 (-1: unbounded), got "
                             f"{window_size!r}")
        if alibi_slopes is not None:
            _check_tensor("alibi_slopes", alibi_slopes)
            if not alibi_slopes.is_floating_point() or alibi_slopes.dim() not in (1, 2):
                raise ValueError(f"alibi_slopes must be a floating (H,) or (B, H) tensor, got "
                                 f"{alibi_slopes.dtype} of shape {tuple(alibi_slopes.shape)}")
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        self.causal = causal
        self.softmax_scale = None if softmax_scale is None else float(softmax_scale)
        self.drop = nn.Dropout(attention_dropout)
        self.window_size = tuple(window_size)
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.deterministic = deterministic  # accepted for flash-attn's contract; see class doc
        self.layout = layout

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, softmax_scale={self.softmax_scale}, "
                f"attention_dropout={self.drop.p}, window_size={self.window_size}, "
                f"alibi={self.alibi_slopes is not None}, layout={self.layout!r}")

    def _options(self, causal: bool | None) -> dict:
        if causal is not None:
            _check_bool("causal", causal)
        slopes = self.alibi_slopes
        return dict(causal=self.causal if causal is None else causal,
                    softmax_scale=self.softmax_scale, window_size=self.window_size,
                    # float32 for the kernels, also after module.half()
                    alibi_slopes=None if slopes is None else slopes.float())

    def _dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bshd: bool,
               keep: torch.Tensor | None, opts: dict) -> torch.Tensor:
        """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) with ``bshd``, else (B, H, S, D); ``keep``
        bool broadcastable to (B, H, Sq, Sk), True = take part. Output in q's layout."""
        dropout_p = self.drop.p if self.training else 0.0
        reason = unsupported_by_kernels(q, q.shape[-1])
        if reason is None and dropout_p == 0.0:
            return kernel_attention(q, k, v, bshd=bshd, attn_mask=keep, **opts)
        notice_once(f"{type(self).__name__}:{reason or 'dropout'}",
                    f"{type(self).__name__}: "
                    + (f"{reason} is not supported by the kernels"
                       if reason else "attention dropout in training is not in the kernels yet")
                    + "; such calls are computed through PyTorch (shown once)")
        if bshd:
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        scale = opts["softmax_scale"]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        bias = position_bias(q.shape[2], k.shape[2], q.device, causal=opts["causal"],
                             window_size=opts["window_size"],
                             alibi_slopes=opts["alibi_slopes"], keep=keep)
        out, _ = torch_attention(q, k, v, bias, scale=scale, dropout_p=dropout_p,
                                 need_weights=False)
        return out.transpose(1, 2).contiguous() if bshd else out

    def _varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                max_seqlen_k: int, opts: dict) -> torch.Tensor:
        """Packed q (total_q, H, D), k/v (total_k, Hkv, D) -> (total_q, H, D).

        Without dropout, CUDA and the ``triton`` CPU policy run the varlen kernel when no
        gradient is needed or its backward is FlashAttention-2's fused varlen kernel (fp16/bf16
        on sm80+, no ALiBi). Otherwise the sequences are gathered into a right-aligned padded
        batch on the device and run densely, then gathered back: one batched backward, where
        the varlen kernel's other backward loops over the sequences on the host."""
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        kernel_ok = (unsupported_by_kernels(q, q.shape[-1]) is None
                     and not (self.training and self.drop.p > 0)
                     and (q.device.type == "cuda" or _dispatch.cpu_backend() == "triton"))
        if kernel_ok and (not needs_grad
                          or varlen_backward_is_fused(q, alibi_slopes=opts["alibi_slopes"])):
            return flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, **opts)
        qp, _ = _pad_right_aligned(q, cu_seqlens_q, max_seqlen_q)
        kp, keep = _pad_right_aligned(k, cu_seqlens_k, max_seqlen_k)
        vp, _ = _pad_right_aligned(v, cu_seqlens_k, max_seqlen_k)
        out = self._dense(qp, kp, vp, bshd=True, keep=keep[:, None, None, :], opts=opts)
        return _unpad_right_aligned(out, cu_seqlens_q, q.shape[0])


class FlashSelfAttention(_FlashAttentionBase):
    """Self-attention on packed qkv, flash-attn's ``FlashSelfAttention`` contract on our kernels:
    code written against ``flash_attn.modules.mha.FlashSelfAttention`` runs by changing the
    import. No parameters.

    Args:
        causal: default causal flag (query i sees keys j <= i, bottom-right aligned).
        softmax_scale: defaults to 1 / sqrt(D).
        attention_dropout: dropout on the attention probabilities, in training only. The kernels
            have no dropout yet: such calls are computed through PyTorch (SDPA), with a one-time
            notice.
        window_size: (left, right) sliding window, -1 unbounded (flash-attn's meaning).
        alibi_slopes: (H,) or (B, H) ALiBi slopes, a non-persistent buffer (moves with the
            module; used as float32).
        deterministic: accepted for compatibility; every path here is deterministic except
            PyTorch's own dropout path on CUDA.
        layout: "bshd" (flash-attn's): qkv (B, S, 3, H, D) -> out (B, S, H, D); or "bhsd"
            (PyTorch's): qkv (B, 3, H, S, D) -> out (B, H, S, D). The matching kernel is run;
            no copy of q, k or v is made. Varlen input is (total, 3, H, D) in both.

    CPU tensors follow ``FLASHATTN_CPU_BACKEND`` (see ``flashattn_modules._dispatch``).
    A query row that sees no key gives 0.
    """

    def forward(self, qkv: torch.Tensor, causal: bool | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, *,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of packed qkv.

        Args:
            qkv: (B, S, 3, H, D) for layout "bshd", (B, 3, H, S, D) for "bhsd", or packed
                sequences (total, 3, H, D) with ``cu_seqlens``. float16, bfloat16 or float32
                (other dtypes run through PyTorch).
            causal: overrides the constructor's flag when not None.
            cu_seqlens: int32 (B + 1,) cumulative sequence lengths starting at 0.
            max_seqlen: int >= every sequence length; required with ``cu_seqlens``.
            key_padding_mask: bool (B, S), True = keep (flash-attn's convention); dense input
                only. Queries at padded positions still attend to the kept keys: their output
                rows carry no meaning.

        Returns:
            (B, S, H, D) for "bshd", (B, H, S, D) for "bhsd", (total, H, D) with cu_seqlens.
        """
        _check_tensor("qkv", qkv)
        opts = self._options(causal)
        if cu_seqlens is not None:
            if qkv.dim() != 4 or qkv.shape[1] != 3:
                raise ValueError(f"with cu_seqlens, qkv must be (total, 3, H, D), got shape "
                                 f"{tuple(qkv.shape)}")
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask is for padded input; with cu_seqlens the "
                                 "sequences are already unpadded")
            _check_cu_seqlens("cu_seqlens", cu_seqlens, "max_seqlen", max_seqlen, qkv.device)
            q, k, v = qkv.unbind(1)
            return self._varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, opts)
        bshd = self.layout == "bshd"
        axis = 2 if bshd else 1
        if qkv.dim() != 5 or qkv.shape[axis] != 3:
            want = "(B, S, 3, H, D)" if bshd else "(B, 3, H, S, D)"
            raise ValueError(f"qkv must be {want} for layout {self.layout!r} (or (total, 3, H, "
                             f"D) with cu_seqlens), got shape {tuple(qkv.shape)}")
        q, k, v = qkv.unbind(axis)
        keep = None
        if key_padding_mask is not None:
            seqlen = q.shape[1] if bshd else q.shape[2]
            keep = _check_key_padding_mask(key_padding_mask, q.shape[0], seqlen, q.device)
        return self._dense(q, k, v, bshd=bshd, keep=keep, opts=opts)


class FlashCrossAttention(_FlashAttentionBase):
    """Attention of queries to packed key/values, flash-attn's ``FlashCrossAttention`` contract
    on our kernels (constructor as ``FlashSelfAttention``'s). K/V may have fewer heads than q
    (GQA/MQA: Hkv divides H); they are read in place, never repeated.

    Layouts: "bshd": q (B, Sq, H, D), kv (B, Sk, 2, Hkv, D) -> (B, Sq, H, D); "bhsd":
    q (B, H, Sq, D), kv (B, 2, Hkv, Sk, D) -> (B, H, Sq, D); varlen (both layouts):
    q (total_q, H, D), kv (total_k, 2, Hkv, D) -> (total_q, H, D). Causal masks and windows
    align each sequence's last query with its last key (bottom-right).
    """

    def forward(self, q: torch.Tensor, kv: torch.Tensor, causal: bool | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                cu_seqlens_k: torch.Tensor | None = None, max_seqlen_k: int | None = None
                ) -> torch.Tensor:
        """Attention of q to kv (shapes in the class docstring).

        Args:
            causal: overrides the constructor's flag when not None.
            cu_seqlens, cu_seqlens_k: int32 (B + 1,) cumulative lengths of the query and key
                sequences; both or neither.
            max_seqlen, max_seqlen_k: ints >= every query / key sequence length, required with
                them.
        """
        _check_tensor("q", q)
        _check_tensor("kv", kv)
        opts = self._options(causal)
        if (cu_seqlens is None) != (cu_seqlens_k is None):
            raise ValueError("cu_seqlens and cu_seqlens_k must be given together (varlen) or "
                             "both be None")
        if cu_seqlens is not None:
            if q.dim() != 3 or kv.dim() != 4 or kv.shape[1] != 2:
                raise ValueError(f"with cu_seqlens, q must be (total_q, H, D) and kv "
                                 f"(total_k, 2, Hkv, D), got {tuple(q.shape)} and "
                                 f"{tuple(kv.shape)}")
            _check_cu_seqlens("cu_seqlens", cu_seqlens, "max_seqlen", max_seqlen, q.device)
            _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, "max_seqlen_k", max_seqlen_k,
                              q.device)
            k, v = kv.unbind(1)
            return self._varlen(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k,
                                opts)
        bshd = self.layout == "bshd"
        axis = 2 if bshd else 1
        if q.dim() != 4 or kv.dim() != 5 or kv.shape[axis] != 2:
            want = ("(B, Sq, H, D) and (B, Sk, 2, Hkv, D)" if bshd
                    else "(B, H, Sq, D) and (B, 2, Hkv, Sk, D)")
            raise ValueError(f"q and kv must be {want} for layout {self.layout!r}, got "
                             f"{tuple(q.shape)} and {tuple(kv.shape)}")
        k, v = kv.unbind(axis)
        return self._dense(q, k, v, bshd=bshd, keep=None, opts=opts)


def _check_key_padding_mask(mask: object, batch: int, seqlen: int, device: torch.device
                            ) -> torch.Tensor:
    """Validate a (B, S) bool keep-mask; return it as a (B, 1, 1, S) view."""
    mask = _check_tensor("key_padding_mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = keep), got {mask.dtype}")
    if tuple(mask.shape) != (batch, seqlen):
        raise ValueError(f"key_padding_mask must have shape (B, S) = {(batch, seqlen)}, got "
                         f"{tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but qkv is on {device}")
    return mask[:, None, None, :]
