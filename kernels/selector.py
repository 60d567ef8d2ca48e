"""BackendSelector: which kernel to run for a GPU and a shape.

The rule (measured on an H100, see benchmarks/RESULTS.md):
- "splitkv" (split-KV flash-decoding) for short query blocks against caches:
  seq_len <= DECODE_MAX_Q and seq_len_k >= DECODE_MIN_K. A plain FlashAttention grid has one
  program per 128 query rows and reads each K/V head once per query head, so a decode step
  would leave most multiprocessors idle (V2 took 2-5x the split-KV kernel's GPU time on
  135- to 1000-key caches, H200 2026-11-30); the split-KV kernel read K/V at 96-105% of the
  device copy bandwidth at Sk = 32k. Since its merge is fused (one launch at any split
  count), it costs no more host time than V2, so the threshold is the same in eager mode and
  in torch.compile graphs; how many splits it uses is the launcher's rule
  (``kernels._launch._num_splits``).
- otherwise "v2" (FlashAttention-2) on every GPU: it was faster than V1 at every benchmark
  shape (250-580 TFLOP/s against 4-67 on the H100), because V1's schedule parallelises over
  batch*heads only and round-trips its running output through a float32 workspace for
  every K/V block. V1 runs only when asked for by name. On sm_90, V2's calls at head_dim 128
  and 256 without window, softcap or ALiBi, and without a mask or with a key-vector one (key
  padding), run its warp-specialised Hopper kernel
  (``kernels._launch.hopper_covers``: a per-call rule, since it reads strides and options
  that the shape key below does not hold).
Other GPUs (not measured) and CPU tensors (the interpreter runs every kernel) follow the
same rule. Choices are cached per (capability, shape, dtype, causal) key.
"""

from __future__ import annotations

import functools

import torch

from . import _runtime
from .api import attention

DECODE_MAX_Q = 16
DECODE_MIN_K = 128


@functools.lru_cache(maxsize=4096)
def _choose(capability: tuple[int, int], batch: int, heads: int, seq_len: int, seq_len_k: int,
            head_dim: int, kv_heads: int, dtype: torch.dtype, causal: bool) -> str:
    if seq_len <= DECODE_MAX_Q and seq_len_k >= DECODE_MIN_K:
        return "splitkv"
    return "v2"


def choose_variant(device: torch.device, *, batch: int, heads: int, seq_len: int,
                   seq_len_k: int, head_dim: int, kv_heads: int, dtype: torch.dtype,
                   causal: bool) -> str:
    """The variant the selector picks; cached per (capability, shape, dtype, causal) key
    (traced without the cache under torch.compile, which would only warn about it)."""
    if torch.compiler.is_compiling():
        return _choose.__wrapped__(_runtime.capability(device), batch, heads, seq_len,
                                   seq_len_k, head_dim, kv_heads, dtype, causal)
    return _choose(_runtime.capability(device), batch, heads, seq_len, seq_len_k, head_dim,
                   kv_heads, dtype, causal)


class SelectedKernel:
    """A kernel chosen for a shape. Calling it with any valid q, k, v (of its layout, or the
    one passed as ``layout=``) computes the right answer with its variant. A plain class (not a
    frozen dataclass) so that torch.compile can build and call it inside a graph."""

    def __init__(self, variant: str, layout: str = "bhsd") -> None:
        self.variant = variant
        self.layout = layout

    def __repr__(self) -> str:
        return f"SelectedKernel(variant={self.variant!r}, layout={self.layout!r})"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 layout: str | None = None, causal: bool = False,
                 softmax_scale: float | None = None, return_lse: bool = False,
                 attn_mask: torch.Tensor | None = None, window_size: tuple[int, int] = (-1, -1),
                 softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None):
        """q (B, H, Sq, D) and k, v (B, Hkv, Sk, D) for layout "bhsd"; (B, S, H, D) for "bshd".
        Returns the output in the same layout (and lse (B, H, Sq) with ``return_lse``)."""
        layout = self.layout if layout is None else layout
        if layout not in ("bhsd", "bshd"):
            raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
        return attention(q, k, v, layout=layout, out_bshd=layout == "bshd",
                         variant=self.variant, causal=causal,
                         softmax_scale=softmax_scale, return_lse=return_lse,
                         attn_mask=attn_mask, window_size=window_size, softcap=softcap,
                         alibi_slopes=alibi_slopes)


class BackendSelector:
    """Picks a kernel for a GPU and a shape (see the module docstring for the rule)."""

    def select_attention(self, batch: int, heads: int, seq_len: int, head_dim: int, *,
                         seq_len_k: int | None = None, kv_heads: int | None = None,
                         dtype: torch.dtype = torch.float16, causal: bool = False,
                         device: torch.device | str | None = None,
                         layout: str = "bhsd") -> SelectedKernel:
        """Return a callable kernel with ``.variant`` and ``.layout`` for this shape.
        ``device`` defaults to the current CUDA device when there is one, else the CPU."""
        if device is None:
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        variant = choose_variant(
            device, batch=batch, heads=heads, seq_len=seq_len,
            seq_len_k=seq_len if seq_len_k is None else seq_len_k, head_dim=head_dim,
            kv_heads=heads if kv_heads is None else kv_heads, dtype=dtype, causal=causal)
        return SelectedKernel(variant=variant, layout=layout)
