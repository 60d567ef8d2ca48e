"""``FlashMultiheadAttention``, a drop-in for ``torch.nn.MultiheadAttention`` on our kernels, and
``replace_multihead_attention``, which swaps it into a model.

Interchangeability: ``FlashMultiheadAttention`` subclasses ``nn.MultiheadAttention`` (so
``isinstance`` checks still hold) and keeps its constructor, parameters, names, shapes,
registration order, ``state_dict`` keys, initialisation and public attributes; only ``forward``
is ours. Argument errors are ``ValueError`` / ``TypeError`` that are also the
``AssertionError`` / ``RuntimeError`` torch raises in the same case, so code written against
either keeps catching them.

Differences from torch, on purpose:
- A query row that sees no key (every key masked) gets attention 0 and weights 0 (SDPA's
  policy), so its output row is ``out_proj``'s bias; torch returns NaN there on its weights path
  and on its fast path.
- ``is_causal`` is a hint only: the result is the one ``attn_mask`` defines. Torch's SDPA path
  drops the mask and applies a top-left causal mask instead.
- Mixed bool / float ``attn_mask`` and ``key_padding_mask`` are combined (bool converted to
  -inf) without torch's deprecation warning.

Costs:
- ``need_weights=True`` (torch's default!) computes the weights explicitly, since the kernels
  return none: an extra (N, num_heads, L, S) matmul and softmax, memory O(N * num_heads * L * S),
  on top of the kernel. Pass ``need_weights=False`` where the weights are not used, as
  ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer`` do.
- The output of the attention kernel is (N, L, num_heads, head_dim) contiguous, a free view of
  (N, L, E) for ``batch_first``; sequence-first inputs pay a transpose inside ``out_proj``.
- In training with ``dropout > 0``, and when a float mask requires grad (a learned bias), the
  kernels (no dropout, no mask gradient yet) are not used: that call runs through PyTorch (SDPA,
  or the explicit path with weights, whose weights are then after dropout, as torch's), with the
  masks built on the device and a one-time notice. So do inputs the kernels do not take
  (float64, head_dim > 256, devices other than CUDA and CPU). Otherwise CUDA tensors always run
  the kernels, and CPU tensors follow ``FLASHATTN_CPU_BACKEND`` (see ``_dispatch``).
"""

from __future__ import annotations

import numbers
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import _dispatch
from .attention import (
    attention_weights,
    finite_bias,
    kernel_attention,
    mask_to_bias,
    notice_once,
    torch_attention,
    unsupported_by_kernels,
)

__all__ = ["FlashMultiheadAttention", "replace_multihead_attention"]


class _ArgumentError(ValueError, AssertionError):
    """A bad argument; also the AssertionError that torch.nn.MultiheadAttention raises."""


class _ArgumentTypeError(TypeError, AssertionError):
    """A bad argument type; also the AssertionError that torch raises."""


class _MaskError(ValueError, RuntimeError):
    """A bad mask; also the RuntimeError that torch raises."""


def _skip_fused_paths(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook, registered on every FlashMultiheadAttention, that does nothing.

    ``nn.TransformerEncoderLayer`` in eval under no_grad runs a fused fast path that reads its
    ``self_attn`` weights and never calls ``self_attn``; it skips that path when a module of the
    layer has hooks. This hook is what keeps our forward running there."""


_causal_cache: list[tuple[weakref.ref, int, bool]] = []


def _is_square_causal(mask: torch.Tensor) -> bool:
    """Whether a 2-D (L, L) bool / float mask in torch's convention is the square causal mask
    (True / -inf strictly above the diagonal, False / 0 elsewhere), as
    ``nn.Transformer.generate_square_subsequent_mask`` makes. Reads mask values (a host sync):
    eager only, and answered from a one-entry cache for the same mask and version (not for
    inference-mode tensors, which have no version), so the layers of one model call pay it
    once."""
    version = None if mask.is_inference() else mask._version  # inference tensors have none
    if _causal_cache and version is not None:
        ref, cached_version, answer = _causal_cache[0]
        if ref() is mask and cached_version == version:
            return answer
    seqlen = mask.shape[0]
    above = torch.ones((seqlen, seqlen), dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        answer = torch.equal(mask, above)
    else:
        reference = torch.zeros((seqlen, seqlen), dtype=mask.dtype, device=mask.device)
        answer = torch.equal(mask, reference.masked_fill(above, float("-inf")))
    _causal_cache[:] = [] if version is None else [(weakref.ref(mask), version, answer)]
    return answer


def _is_count(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_mask_dtype(name: str, mask: object, query: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise _ArgumentTypeError(f"{name} must be a torch.Tensor or None, got "
                                 f"{type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise _ArgumentTypeError(f"{name} must be bool (True = masked out) or floating (added "
                                 f"to the scores), got {mask.dtype}")
    if mask.device != query.device:
        raise _ArgumentError(f"{name} is on {mask.device} but query is on {query.device}")
    return mask


def _merge_masks(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                 extra_keys: int) -> torch.Tensor | None:
    """Torch-convention masks (bool True = masked out, or float added), attn_mask
    (1 | N, 1 | H, L, S) and key_padding_mask (N, 1, 1, S), -> one SDPA-convention mask (bool
    True = take part, or float added) broadcastable to (N, H, L, S + extra_keys), the
    ``extra_keys`` appended keys (bias_k, zero attention) seen by every query. None if no mask.
    Built on the device; a key-padding mask alone stays (N, 1, 1, S), which the kernels read
    as a per-key mask."""
    masks = [m for m in (attn_mask, key_padding_mask) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        merged = ~masks[0] if len(masks) == 1 else ~(masks[0] | masks[1])
    else:
        dtype = next(m.dtype for m in masks if m.is_floating_point())
        floats = [m if m.is_floating_point()
                  else torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(
                      m, float("-inf")) for m in masks]
        merged = floats[0] if len(floats) == 1 else floats[0] + floats[1]
    if extra_keys:
        fill = torch.ones if merged.dtype == torch.bool else torch.zeros
        pad = fill(merged.shape[:-1] + (extra_keys,), dtype=merged.dtype, device=merged.device)
        merged = torch.cat([merged, pad], dim=-1)
    return merged


class FlashMultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` on FlashAttention kernels (see the module docstring for
    what is identical, what differs and what each path costs).

    Constructor, parameters and attributes are torch's: ``embed_dim`` E, ``num_heads`` H,
    ``dropout``, ``bias``, ``add_bias_kv``, ``add_zero_attn``, ``kdim``, ``vdim``,
    ``batch_first``, ``device``, ``dtype``. ``FlashMultiheadAttention.from_torch(mha)`` converts
    an existing module.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not _is_count(value):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"embed_dim and num_heads must be greater than 0, got "
                                 f"embed_dim={embed_dim} and num_heads={num_heads}")
        if embed_dim % num_heads:
            raise _ArgumentError(f"embed_dim must be divisible by num_heads, got "
                                 f"embed_dim={embed_dim} and num_heads={num_heads}")
        for name, value in (("kdim", kdim), ("vdim", vdim)):
            if value is not None and (not _is_count(value) or value <= 0):
                raise ValueError(f"{name} must be None or an int > 0, got {value!r}")
        if (isinstance(dropout, bool) or not isinstance(dropout, numbers.Real)
                or not 0.0 <= dropout <= 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias,
                         add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=kdim,
                         vdim=vdim, batch_first=batch_first, device=device, dtype=dtype)
        self.register_forward_pre_hook(_skip_fused_paths)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> FlashMultiheadAttention:
        """A FlashMultiheadAttention computing what ``mha`` computes, on the same Parameter
        objects (same weights, device, dtype, requires_grad, and optimizers built on ``mha``
        keep training it; ``copy.deepcopy(mha)`` first for independent weights), the same
        ``out_proj`` module, and ``mha``'s training mode. Draws no random numbers."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got "
                            f"{type(mha).__name__}")
        with torch.device("meta"):  # the placeholders are replaced below
            new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout,
                      bias=mha.in_proj_bias is not None, add_bias_kv=mha.bias_k is not None,
                      add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
                      batch_first=mha.batch_first)
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                     "in_proj_bias", "bias_k", "bias_v"):
            setattr(new, name, getattr(mha, name))
        new.out_proj = mha.out_proj
        return new.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Multi-head attention with torch's semantics and shapes.

        Args:
            query: (L, N, E), or (N, L, E) with ``batch_first``, or unbatched (L, E).
            key: (S, N, kdim), (N, S, kdim) or (S, kdim); value: likewise with vdim.
            key_padding_mask: (N, S), or (S,) unbatched; bool (True = ignore that key) or float
                (added to that key's scores).
            need_weights: also return the attention weights (an extra explicit matmul-softmax,
                see the module docstring).
            attn_mask: (L, S), or (N * num_heads, L, S) ((num_heads, L, S) unbatched); bool
                (True = not allowed) or float (added). A float mask that requires grad is
                trained through (computed by PyTorch).
            average_attn_weights: average the weights over heads.
            is_causal: hint that ``attn_mask`` is the square causal mask; needs ``attn_mask``
                (RuntimeError otherwise). The result is the one the mask defines; in eager mode
                the causal kernel runs when the mask is the square causal mask.

        Returns:
            attn_output (L, N, E), (N, L, E) or (L, E); and with ``need_weights`` the weights
            (N, L, S') averaged or (N, num_heads, L, S') per head ((L, S') / (num_heads, L, S')
            unbatched), S' = S plus 1 for ``add_bias_kv`` and 1 for ``add_zero_attn``;
            otherwise None. A query row that sees no key has attention 0 and weights 0.
        """
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise _MaskError("is_causal=True needs attn_mask (is_causal is a hint that attn_mask "
                             "is the causal mask); pass "
                             "nn.Transformer.generate_square_subsequent_mask(L)")
        if query.device.type == "cpu":
            _dispatch.cpu_backend()  # FLASHATTN_CPU_BACKEND is validated on every CPU call
        same_qkv, same_kv = query is key and key is value, key is value
        if not batched:
            query, key, value = (x.unsqueeze(0) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        # The projections run on the inputs as stored; then (N, L | S, H, D) views.
        q, k, v = self._project(query, key, value, same_qkv, same_kv)
        if batched and not self.batch_first:
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        k, v, extra_keys = self._append_keys(k, v)

        mask4 = None
        if attn_mask is not None:
            mask4 = (attn_mask.view(batch, self.num_heads, seqlen_q, seqlen_k)
                     if attn_mask.dim() == 3 else attn_mask[None, None])
        kpm4 = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        scale = self.head_dim ** -0.5
        dropout_p = self.dropout if self.training else 0.0
        learned_mask = torch.is_grad_enabled() and any(
            m is not None and m.requires_grad for m in (attn_mask, key_padding_mask))
        reason = unsupported_by_kernels(q, self.head_dim)
        if reason is None and dropout_p > 0:
            reason = "dropout > 0 in training"
        if reason is None and learned_mask:
            reason = "a float mask that requires grad"

        if reason is not None:
            notice_once(f"FlashMultiheadAttention: {reason}",
                        f"FlashMultiheadAttention: {reason} is not supported by the kernels "
                        "yet; such calls are computed through PyTorch (shown once)")
            bias = mask_to_bias(_merge_masks(mask4, kpm4, extra_keys), q.dtype)
            out, weights = torch_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), bias, scale=scale,
                                           dropout_p=dropout_p, need_weights=need_weights)
            out = out.transpose(1, 2)
        else:
            causal = (is_causal and attn_mask.dim() == 2 and seqlen_q == seqlen_k
                      and not extra_keys and not torch.compiler.is_compiling()
                      and _is_square_causal(attn_mask))
            mask = _merge_masks(None if causal else mask4, kpm4, extra_keys)
            out = kernel_attention(q, k, v, bshd=True, causal=causal, attn_mask=mask)
            weights = None
            if need_weights:
                full = _merge_masks(mask4, kpm4, extra_keys) if causal else mask
                bias, empty = finite_bias(mask_to_bias(full, q.dtype), q.dtype)
                weights = attention_weights(q.transpose(1, 2), k.transpose(1, 2), bias, empty,
                                            scale=scale)

        out = out.reshape(batch, seqlen_q, self.embed_dim)
        if batched and not self.batch_first:
            out = out.transpose(0, 1)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    # ------------------------------------------------------------------------- forward parts

    def _check_inputs(self, query: object, key: object, value: object,
                      key_padding_mask: object, attn_mask: object) -> bool:
        """Validate shapes, dtypes and devices; return whether the input is batched."""
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor):
                raise _ArgumentTypeError(f"{name} must be a torch.Tensor, got "
                                         f"{type(x).__name__}")
            if x.is_nested:
                raise _ArgumentTypeError(
                    f"{name} is a nested tensor, which FlashMultiheadAttention does not take. "
                    "nn.TransformerEncoder(enable_nested_tensor=True) makes them from padded "
                    "batches: build the encoder after swapping, through "
                    "replace_multihead_attention(encoder), or set encoder.use_nested_tensor = "
                    "False")
        if query.dim() not in (2, 3):
            raise _ArgumentError(f"query must be 3-D (batched) or 2-D (unbatched), got shape "
                                 f"{tuple(query.shape)}")
        batched = query.dim() == 3
        for name, x in (("key", key), ("value", value)):
            if x.dim() != query.dim():
                raise _ArgumentError(f"{name} must be {query.dim()}-D like query, got shape "
                                     f"{tuple(x.shape)}")
            if x.dtype != query.dtype:
                raise _ArgumentTypeError(f"{name} has dtype {x.dtype} but query has "
                                         f"{query.dtype}; they must match")
            if x.device != query.device:
                raise _ArgumentError(f"{name} is on {x.device} but query is on {query.device}")
        for name, x, dim in (("query", query, self.embed_dim), ("key", key, self.kdim),
                             ("value", value, self.vdim)):
            if x.shape[-1] != dim:
                raise _ArgumentError(f"{name}'s last dim must be {dim}, got shape "
                                     f"{tuple(x.shape)}")
        seq_axis = 1 if batched and self.batch_first else 0
        if key.shape[:-1] != value.shape[:-1]:
            raise _ArgumentError(f"key and value must agree on batch and sequence dims, got "
                                 f"{tuple(key.shape)} and {tuple(value.shape)}")
        seqlen_q, seqlen_k = query.shape[seq_axis], key.shape[seq_axis]
        batch = query.shape[1 - seq_axis] if batched else 1
        if batched and key.shape[1 - seq_axis] != batch:
            raise _ArgumentError(f"query and key must have the same batch size, got shapes "
                                 f"{tuple(query.shape)} and {tuple(key.shape)} (batch_first="
                                 f"{self.batch_first})")
        if key_padding_mask is not None:
            key_padding_mask = _check_mask_dtype("key_padding_mask", key_padding_mask, query)
            want = (batch, seqlen_k) if batched else (seqlen_k,)
            if tuple(key_padding_mask.shape) != want:
                raise _ArgumentError(f"key_padding_mask must have shape {want}, got "
                                     f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            attn_mask = _check_mask_dtype("attn_mask", attn_mask, query)
            heads = batch * self.num_heads
            shapes = ((seqlen_q, seqlen_k), (heads, seqlen_q, seqlen_k))
            if tuple(attn_mask.shape) not in shapes:
                per_head = "N * num_heads" if batched else "num_heads"
                raise _MaskError(f"attn_mask must have shape (L, S) = {shapes[0]} or "
                                 f"({per_head}, L, S) = {shapes[1]}, got "
                                 f"{tuple(attn_mask.shape)}")
        return batched

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 same_qkv: bool, same_kv: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """In-projections of query (.., E) and key, value (.., kdim / vdim), 3-D in either
        batch layout, into (.., H, D) views: one matmul for self-attention, two when key is
        value."""
        embed = self.embed_dim
        bias = self.in_proj_bias
        biases = (None, None, None) if bias is None else bias.chunk(3)
        if not self._qkv_same_embed_dim:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), weights,
                                                             biases, strict=True))
        elif same_qkv:
            q, k, v = F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)
        elif same_kv:
            q = F.linear(query, self.in_proj_weight[:embed], biases[0])
            kv_bias = None if bias is None else bias[embed:]
            k, v = F.linear(key, self.in_proj_weight[embed:], kv_bias).chunk(2, dim=-1)
        else:
            q, k, v = (F.linear(x, w, b) for x, w, b in zip(
                (query, key, value), self.in_proj_weight.chunk(3), biases, strict=True))
        shape = (self.num_heads, self.head_dim)
        return q.unflatten(-1, shape), k.unflatten(-1, shape), v.unflatten(-1, shape)

    def _append_keys(self, k: torch.Tensor, v: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append bias_k / bias_v and the zero attention key to k, v (N, S, H, D); return them
        and how many keys were appended."""
        extra = []
        if self.bias_k is not None:
            extra.append((self.bias_k, self.bias_v))
        if self.add_zero_attn:
            extra.append((None, None))
        if not extra:
            return k, v, 0
        shape = (k.shape[0], 1, self.num_heads, self.head_dim)
        ks, vs = [k], [v]
        for bias_k, bias_v in extra:
            ks.append(k.new_zeros(shape) if bias_k is None
                      else bias_k.view(1, 1, *shape[2:]).expand(shape).to(k.dtype))
            vs.append(v.new_zeros(shape) if bias_v is None
                      else bias_v.view(1, 1, *shape[2:]).expand(shape).to(v.dtype))
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1), len(extra)


class _FusedFeedForwardEncoderLayer(nn.TransformerEncoderLayer):
    """An ``nn.TransformerEncoderLayer`` whose feed-forward block runs ``linear1`` and a ReLU
    as one GEMM with the activation in its epilogue (``torch._addmm_activation``), as torch's
    fused fast path does; ``replace_multihead_attention`` gives this class to the encoder
    layers whose attention it swaps, since our module turns that fast path off. The result is
    the one of ``relu(linear1(x))``: ReLU commutes with the final rounding. When a gradient is
    needed (the fused GEMM has no autograd formula), for another activation, without a bias or
    on a non-contiguous input, the block is torch's own."""

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        linear1 = self.linear1
        fusable = (self.activation_relu_or_gelu == 1 and linear1.bias is not None
                   and x.is_contiguous()
                   and not (torch.is_grad_enabled() and (x.requires_grad
                            or linear1.weight.requires_grad or linear1.bias.requires_grad)))
        if not fusable:
            return super()._ff_block(x)
        hidden = torch._addmm_activation(linear1.bias, x.view(-1, x.shape[-1]), linear1.weight.t())
        hidden = hidden.view(*x.shape[:-1], hidden.shape[-1])
        return self.dropout2(self.linear2(self.dropout(hidden)))


def replace_multihead_attention(model: nn.Module) -> nn.Module:
    """Swap every ``torch.nn.MultiheadAttention`` in ``model`` (exact type; subclasses, which
    may override forward, are left alone) for a ``FlashMultiheadAttention`` sharing its
    parameters (see ``from_torch``), including those inside ``nn.TransformerEncoder``,
    ``nn.TransformerDecoder`` and ``nn.Transformer``. A module used in several places is
    converted once. Returns ``model`` (changed in place), or the converted module when
    ``model`` is itself a MultiheadAttention.

    Every ``nn.TransformerEncoder`` that now holds one gets ``use_nested_tensor = False``: its
    nested-tensor route (eval, no_grad, padded batch) would otherwise hand nested tensors to our
    module, which takes padded ones and masks. ``nn.TransformerEncoderLayer``'s fused fast path
    is skipped through our module's forward pre-hook, so our forward really runs; to keep the
    fused feed-forward of that path, every ``nn.TransformerEncoderLayer`` (exact type) whose
    ``self_attn`` is now ours becomes a ``_FusedFeedForwardEncoderLayer`` (a subclass: same
    parameters, ``state_dict`` and ``isinstance``; only ``_ff_block`` differs, see there).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) is nn.MultiheadAttention:
        return FlashMultiheadAttention.from_torch(model)
    converted: dict[int, FlashMultiheadAttention] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MultiheadAttention:
                if id(child) not in converted:
                    converted[id(child)] = FlashMultiheadAttention.from_torch(child)
                setattr(parent, name, converted[id(child)])
    for module in model.modules():
        if type(module) is nn.TransformerEncoderLayer and isinstance(
                module.self_attn, FlashMultiheadAttention):
            module.__class__ = _FusedFeedForwardEncoderLayer
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(m, FlashMultiheadAttention) for m in module.modules()):
            module.use_nested_tensor = False
    return model
