"""Launchers: turn validated tensors (already viewed as (batch, head, seq, dim) strides) into
kernel arguments, pick the tile configuration, allocate nothing but outputs and workspace."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton without host tensor descriptors: pointer kernels only
    TensorDescriptor = None

from . import _runtime
from ._counters import counters
from .configs import TileConfig, splitkv_grid, tile_config

LOG2E = math.log2(math.e)
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


class ScoreArgs(NamedTuple):
    """Everything that shapes the scores, in the form the kernels take (a named tuple: built
    on every call, and cheaper to build than a frozen dataclass)."""

    sm_scale: float
    causal: bool
    window_left: int  # -1: unbounded
    window_right: int  # -1: unbounded (already 0 when causal)
    softcap: float
    attn_mask: torch.Tensor | None  # broadcast view (B, H, Sq, Sk); bool or floating
    alibi_slopes: torch.Tensor | None  # (B, H) view, float32

    def kernel_args(self) -> tuple[tuple, dict]:
        """(qk_scale, softcap, window_left, window_right) and the constexpr flags."""
        if self.softcap > 0:
            qk_scale, softcap = self.sm_scale / self.softcap, self.softcap * LOG2E
        else:
            qk_scale, softcap = self.sm_scale * LOG2E, 0.0
        mask = self.attn_mask
        values = (qk_scale, softcap, max(self.window_left, 0), max(self.window_right, 0))
        return values, dict(
            BOUNDED_LEFT=self.window_left >= 0, BOUNDED_RIGHT=self.window_right >= 0,
            MASK_KIND=self.mask_kind(), MASK_KEYS_ONLY=mask is None or _keys_only(mask),
            HAS_SOFTCAP=self.softcap > 0, HAS_ALIBI=self.alibi_slopes is not None,
        )

    def mask_kind(self) -> int:
        """MASK_NONE, MASK_BOOL or MASK_FLOAT."""
        if self.attn_mask is None:
            return MASK_NONE
        return MASK_BOOL if self.attn_mask.dtype == torch.bool else MASK_FLOAT

    def mask_arg(self, fallback: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The mask as the kernels read it (bool as uint8) and its strides. A mask with a row
        per query whose rows are not 16-byte aligned is copied into aligned rows first: the
        kernels would otherwise read its [BLOCK_M, BLOCK_N] tiles one byte at a time, measured
        up to 30x slower than the copy plus the kernel (benchmarks/NOTES.md)."""
        if self.attn_mask is None:
            return fallback, (0, 0, 0, 0)
        mask = self.attn_mask
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        if not _keys_only(mask) and not _aligned_rows(mask):
            mask = _aligned_copy(mask)
        return mask, mask.stride()

    def alibi_arg(self, fallback: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if self.alibi_slopes is None:
            return fallback, (0, 0)
        return self.alibi_slopes, self.alibi_slopes.stride()


def _keys_only(mask: torch.Tensor) -> bool:
    """Whether every query row of a (B, H, Sq, Sk) mask view is the same row (one query, or a
    broadcast query dim): the kernels then load one [BLOCK_N] vector per key block."""
    return mask.stride(2) == 0 or mask.shape[2] == 1


def _aligned_rows(mask: torch.Tensor) -> bool:
    size = mask.element_size()
    return mask.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in mask.stride()[:3])


def _aligned_copy(mask: torch.Tensor) -> torch.Tensor:
    """The (B, H, Sq, Sk) view ``mask`` copied into rows padded to 16 bytes, its broadcast
    (stride 0) batch and head dims kept broadcast."""
    batch, heads, rows, keys = mask.shape
    shape = (batch if mask.stride(0) else 1, heads if mask.stride(1) else 1, rows)
    per_row = 16 // mask.element_size()
    buffer = torch.empty(*shape, _cdiv(keys, per_row) * per_row, dtype=mask.dtype,
                         device=mask.device)
    aligned = buffer[..., :keys]
    aligned.copy_(mask[:shape[0], :shape[1]])
    return aligned.expand(batch, heads, rows, keys)


def _lse_arg(lse: torch.Tensor | None, fallback: torch.Tensor
             ) -> tuple[torch.Tensor, tuple[int, ...], bool]:
    """The lse output, its strides and STORE_LSE; a call that wants no lse passes None."""
    if lse is None:
        return fallback, (0, 0, 0), False
    return lse, lse.stride(), True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """Smallest power of two >= n (triton's own helper is a constexpr function whose every
    call costs microseconds of argument unwrapping on the host)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _block_d(head_dim: int) -> int:
    return max(16, _next_pow2(head_dim))


def _order_group(device: torch.device, causal: bool, heads: int, group: int, seqlen_q: int,
                 seqlen_k: int, head_dim: int, itemsize: int) -> int:
    """Heads per group of ``common.tile_order`` for ``heads`` = B * H query heads of GQA
    ``group``: 1 (head by head, so that the tiles of a head run together and share its K/V in
    the L2 cache) unless the grid is causal and small, under 16 query tiles of 128 rows per
    multiprocessor (the CPU counts 4 multiprocessors and a 1 MiB cache). There the longest
    tiles of the last heads would run alone at the end, and a group holds as many heads as
    half the L2 cache holds the K/V of (the query heads of a GQA group share theirs). H100,
    2026-12-06, against head by head (benchmarks/NOTES.md, "Nineteenth session"): batch-1
    prefill of GPT-2 (H12) and the Llama config (H32/8) at D 64, 1.07-1.20x at 2k and 8k
    keys, 1.02-1.04x at 15.5 tiles per multiprocessor; from 31 (B*S = 32k grids) 0.93-1.04x,
    where the heads' K/V no longer stay in the cache."""
    if not causal:
        return 1
    if device.type == "cuda":
        sms, cache = _runtime.multiprocessors(device), _runtime.l2_cache_bytes(device)
    else:
        sms, cache = 4, 1 << 20
    if heads * _cdiv(seqlen_q, 128) >= 16 * sms:
        return 1
    per_head = max(1, 2 * seqlen_k * head_dim * itemsize // group)
    return max(1, min(heads, cache // 2 // per_head))


# Tensor descriptors (TMA) gained 0-11% of kernel time on the H100 but cost about 30 us of host
# time per call (three descriptors, encoded again by Triton's launcher on every launch): more
# than they save on small calls, which are host-bound. Below either bound, pointers.
_TMA_MIN_ROWS = 256
_TMA_MIN_SCORES = 1 << 28  # batch * heads * query rows * keys (B1 H16 S4k: 2^28)
# The Hopper kernel's four descriptors cost more host time than V2's launch (host-bound H200
# calls, 2026-12-01: 110-200 us against 70-120 us), and its gain grows with head_dim (1.16-1.44x
# V2 at 2^27 scores of head_dim 128 outside one slow window, 1.38-2.05x at 2^26 of 256): it
# pays from about 2^34 of batch * heads * query rows * keys * head_dim
# (benchmarks/hopper_bound.py; NOTES.md, "Sixteenth session").
_HOPPER_MIN_WORK = 1 << 34


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors (TMA) need Hopper or newer, a 16-byte aligned base, unit last stride
    and 16-byte aligned, non-zero other strides; otherwise the kernels use pointers."""
    t0 = tensors[0]
    if TensorDescriptor is None or t0.device.type != "cuda":
        return False
    if _runtime.capability(t0.device)[0] < 9:
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1:
            return False
        if any(s == 0 or (s * size) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _descriptor(t: torch.Tensor, rows: int, block_d: int) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, block_d])


class HopperConfig(NamedTuple):
    """A launch of the warp-specialised Hopper kernel: key rows per block, K/V stages in
    shared memory, consumer warpgroups (64 query rows each), and whether a program may run
    two query tiles (``hopper.py``'s PAIRED; ``paired_tiles`` says when it does)."""

    block_n: int
    num_stages: int
    consumers: int = 2
    paired: bool = False

    def registers(self) -> tuple[int, int]:
        """(worker consumers' registers per thread, the kernel's maxnreg): the register file
        (64K) shared by the consumers' and the loader's warpgroups, the loader left with 24,
        the consumers an equal share (warpgroup 0 keeps what remains, at least as much): two
        consumers 240 (maxnreg 168), three 160 (maxnreg 128)."""
        maxnreg = 65536 // (128 * (self.consumers + 1)) // 8 * 8
        share = (maxnreg * (self.consumers + 1) - 24) // self.consumers // 8 * 8
        return min(240, share), maxnreg


# Its configuration by head_dim, and the head_dims it runs (benchmarks/RESULTS.md and
# NOTES.md, "Fourteenth session" and "Fifteenth session"): at 64 the schedule stayed slower
# than V2 with two or three consumer warpgroups (softmax-bound; three spill with 128-key
# blocks, and 64-key blocks halve the work per hand-over), and three were no faster at 128;
# benchmarks/tune_hopper.py sweeps them again for another GPU or triton. head_dim 256 takes
# 64-key blocks: two stages of K and V then fit beside Q in shared memory (192 KiB).
# Paired tiles at 128 only (see ``paired_tiles``).
HOPPER_CONFIGS = {128: HopperConfig(128, 2, paired=True), 256: HopperConfig(64, 2)}

# Query tiles per head up to which a paired configuration runs two per program. H100,
# 2026-12-07, paired / one tile per program, B*S = 32k, medians of 5 rounds (NOTES.md,
# "Twenty-ninth session"): head_dim 128 causal 1.01-1.08 from S 1k to 8k (64 tiles), 0.96 and
# 0.97 at 16k in two runs; head_dim 256 causal 0.95-1.01; not causal 0.95-0.98; under a
# key-padding mask 0.91-0.93 (its scan's bounds and bias spill in the paired loops).
_PAIRED_MAX_TILES = 64


def paired_tiles(cfg: HopperConfig, causal: bool, masked: bool, n_tiles: int) -> bool:
    """Whether the Hopper kernel runs two query tiles per program (last and first, ...): for
    a configuration that allows it, a causal call without a mask of at most
    ``_PAIRED_MAX_TILES`` tiles per head. There causal tiles are short on average and each
    program's start (Q and first K/V loads, pipeline fill) and end (last P.V, store) are a
    large share of its time; the second tile's first loads run under the first one's end,
    and every program sees about the same number of key blocks."""
    return cfg.paired and causal and not masked and n_tiles <= _PAIRED_MAX_TILES


class RowView(NamedTuple):
    """A (B, H, S, D) view as rows of a 2-D matrix (what the Hopper kernel's descriptors
    read): element (b, h, s, d) is at row b * per_batch + h * per_head + s, column
    h * head_col + d, of a (rows, cols) matrix with row stride ``stride``."""

    per_batch: int
    per_head: int
    head_col: int
    stride: int
    rows: int
    cols: int


def row_view(t: torch.Tensor) -> RowView | None:
    """``t`` as a ``RowView``, or None: heads either follow each other in rows (BHSD memory)
    or sit side by side in a row (BSHD memory, and the modules' packed in-projections).
    TMA needs a 16-byte aligned base and row stride, and 32-bit row coordinates."""
    B, H, S, D = t.shape
    sb, sh, ss, sd = t.stride()
    size = t.element_size()
    if sd != 1 or ss < D or (ss * size) % 16 or t.data_ptr() % 16:
        return None
    if sb % ss:
        return None
    if H == 1 or (sh % ss == 0 and sh > 0):
        per_head = sh // ss if H > 1 else 0
        view = RowView(sb // ss, per_head, 0, ss, (B - 1) * (sb // ss) + (H - 1) * per_head + S, D)
    elif (sh * size) % 16 == 0 and D <= sh and (H - 1) * sh + D <= ss:
        view = RowView(sb // ss, 0, sh, ss, (B - 1) * (sb // ss) + S, (H - 1) * sh + D)
    else:
        return None
    return view if view.rows < 2**31 else None


class KeyView(NamedTuple):
    """A (B, H, S, D) view as a 3-D (n, S, cols) tensor with strides (n_stride, stride, 1)
    (what the Hopper kernel's K/V descriptors read; the S dimension ends at the view's last
    key, so TMA reads zeros past it): element (b, h, s, d) is at
    [b * per_batch + h * per_head, s, h * head_col + d]."""

    per_batch: int
    per_head: int
    head_col: int
    n: int
    n_stride: int
    stride: int
    cols: int


def key_view(t: torch.Tensor) -> KeyView | None:
    """``t`` as a ``KeyView``, or None: a ``row_view`` whose heads sit side by side in a row
    (one n per batch), or follow each other in rows with batches at a uniform distance (one
    n per batch and head: BHSD memory, a KV cache sliced along S)."""
    view = row_view(t)
    if view is None:
        return None
    B, H, S, _ = t.shape
    if view.head_col or view.per_head == 0:
        per_batch, per_head, n, n_rows = 1, 0, B, view.per_batch
    elif B == 1 or view.per_batch == H * view.per_head:
        per_batch, per_head, n, n_rows = H, 1, B * H, view.per_head
    else:
        return None
    if n_rows == 0:  # batches at one address (an expanded view)
        if n > 1:
            return None
        n_rows = S  # any positive stride serves a single n
    return KeyView(per_batch, per_head, view.head_col, n, n_rows * view.stride, view.stride,
                   view.cols)


def hopper_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              args: ScoreArgs) -> bool:
    """Whether a dense call runs the warp-specialised Hopper kernel: CUDA tensors, a triton
    with Gluon, ``hopper_covers`` for the device's capability, and an output the kernel's
    TMA stores can address (ours always is: BHSD or BSHD memory)."""
    return (_runtime.GluonDescriptor is not None and q.device.type == "cuda"
            and hopper_covers(_runtime.capability(q.device), q, k, v, args)
            and row_view(out) is not None)


def hopper_covers(capability: tuple[int, int], q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, args: ScoreArgs) -> bool:
    """The Hopper kernel's rule, given the device's capability (a pure function of the call,
    tested on the CPU): sm_90, fp16/bf16, head_dim 128 or 256, no window, softcap or ALiBi, no
    mask or one whose every query row is the same key vector (key padding), causal only with
    Sq <= Sk (every row then sees a key unless the mask hides them), at least one key (the
    consumers would wait for a first block forever), q a ``row_view`` and k, v one
    ``key_view``, and calls of at least ``_HOPPER_MIN_WORK`` (B * H * Sq * Sk * D):
    descriptors cost host time."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    if capability != (9, 0) or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if D not in HOPPER_CONFIGS or B * H * Sq * Sk * D < _HOPPER_MIN_WORK:
        return False
    if args.attn_mask is not None and not _keys_only(args.attn_mask):
        return False
    if (args.alibi_slopes is not None or args.softcap > 0 or args.window_left >= 0
            or (args.window_right >= 0 and not args.causal)):
        return False
    if (args.causal and Sq > Sk) or Sk == 0:
        return False
    k_view = key_view(k)
    return row_view(q) is not None and k_view is not None and k_view == key_view(v)


@functools.cache
def _tile_layout(block: tuple[int, ...], dtype: torch.dtype):
    """Gluon's shared-memory layout of a tile of shape ``block`` (cached: building it costs
    about 6 us of host time, four times per call)."""
    from triton.experimental.gluon import language as gl

    element = gl.float16 if dtype == torch.float16 else gl.bfloat16
    return gl.NVMMASharedLayout.get_default_for(list(block), element)


def forward_hopper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor | None, args: ScoreArgs, *,
                   config: HopperConfig | None = None) -> None:
    """The warp-specialised Hopper kernel on a call ``hopper_ok`` accepted; shapes as in
    ``forward_v2``. One program per query tile of 64 * consumers rows and head, or per two
    (``paired_tiles``), one per multiprocessor at a time."""
    device = q.device
    kernel = _runtime.kernel_module("hopper", device).attention_fwd_hopper
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    cfg = config or HOPPER_CONFIGS[D]
    consumer_regs, maxnreg = cfg.registers()

    def rows_descriptor(t: torch.Tensor, view: RowView):
        return _runtime.GluonDescriptor(t, [view.rows, view.cols], [view.stride, 1], [64, D],
                                        _tile_layout((64, D), t.dtype))

    def keys_descriptor(t: torch.Tensor, view: KeyView):
        block = (1, cfg.block_n, D)
        return _runtime.GluonDescriptor(t, [view.n, Sk, view.cols],
                                        [view.n_stride, view.stride, 1], list(block),
                                        _tile_layout(block, t.dtype))

    qv, kv, ov = row_view(q), key_view(k), row_view(out)
    lse_arg, lse_strides, store_lse = _lse_arg(lse, out)
    mask, mask_strides = args.mask_arg(out)
    n_tiles = _cdiv(Sq, 64 * cfg.consumers)
    paired = paired_tiles(cfg, args.causal, args.attn_mask is not None, n_tiles)
    per_head = _cdiv(n_tiles, 2) if paired else n_tiles
    order = _order_group(device, args.causal, B * H, H // Hkv, Sq, Sk, D, q.element_size())
    _runtime.launch(
        kernel, (per_head * B * H,), device,
        (rows_descriptor(q, qv), keys_descriptor(k, kv), keys_descriptor(v, kv),
         rows_descriptor(out, ov), out, lse_arg, mask,
         qv.per_batch, qv.per_head, qv.head_col, kv.per_batch, kv.per_head, kv.head_col,
         ov.per_batch, ov.per_head, ov.head_col, *out.stride()[:3],
         *lse_strides[:2], mask_strides[0], mask_strides[1], mask_strides[3],
         n_tiles, order, H, H // Hkv, Sq, Sk, args.sm_scale * LOG2E),
        dict(NC=cfg.consumers, STAGES=cfg.num_stages, CAUSAL=args.causal,
             STORE_LSE=store_lse, MASK_KIND=args.mask_kind(), PAIRED=paired,
             CONSUMER_REGS=consumer_regs),
        4, 1, maxnreg)


def forward_v2(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor | None, args: ScoreArgs, *, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0,
    config: TileConfig | None = None,
) -> None:
    """FA2 kernel. q/out (B, H, Sq, D), k/v (B, Hkv, Sk, D), lse (B, H, Sq) or None as
    strided views. Varlen: B = 1 views of packed tokens, the batch given by cu_seqlens (B + 1,)
    int32."""
    device = q.device
    kernel = _runtime.kernel_module("v2", device).attention_fwd_v2
    _, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    rows = max_seqlen_q if varlen else Sq
    # varlen: Sk counts every packed key, a bound on each sequence's length
    cfg = config or tile_config("v2", device, D, q.dtype, args.causal,
                                batch * H * _cdiv(rows, 128), max(rows, Sk))
    mask, mask_strides = args.mask_arg(q)
    alibi, alibi_strides = args.alibi_arg(q)
    lse, lse_strides, store_lse = _lse_arg(lse, out)
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    n_tiles = _cdiv(rows, cfg.block_m)
    order = _order_group(device, args.causal, batch * H, H // Hkv, rows, Sk, D,
                         q.element_size())
    block_d = _block_d(D)
    use_tma = (rows >= _TMA_MIN_ROWS and batch * H * rows * Sk >= _TMA_MIN_SCORES
               and _tma_ok(q, k, v))
    if use_tma:
        q_src = _descriptor(q, cfg.block_m, block_d)
        k_src, v_src = (_descriptor(x, cfg.block_n, block_d) for x in (k, v))
    else:
        q_src, k_src, v_src = q, k, v
    values, flags = args.kernel_args()
    _runtime.launch(
        kernel, (n_tiles * batch * H,), device,
        (q_src, k_src, v_src, out, lse, mask, alibi, cu_q, cu_k,
         *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse_strides,
         *mask_strides, *alibi_strides, n_tiles, order, H, H // Hkv, Sq, Sk, *values),
        dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
             IS_VARLEN=varlen, STORE_LSE=store_lse, USE_TMA=use_tma,
             DOT_PRECISION=_runtime.dot_precision(q.dtype, device), **flags),
        cfg.num_warps, cfg.num_stages, cfg.maxnreg)


def forward_v1(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor | None, args: ScoreArgs, *, config: TileConfig | None = None,
) -> None:
    """FA1-schedule kernel; shapes as in ``forward_v2`` (no varlen). Allocates a float32
    workspace of (B*H, Sq, next_pow2(D)) plus two (B*H, Sq) vectors."""
    device = q.device
    kernel = _runtime.kernel_module("v1", device).attention_fwd_v1
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    cfg = config or tile_config("v1", device, D, q.dtype, args.causal)
    block_d = _block_d(D)
    acc = torch.empty((B * H, Sq, block_d), device=device, dtype=torch.float32)
    m = torch.empty((B * H, Sq), device=device, dtype=torch.float32)
    ell = torch.empty_like(m)
    mask, mask_strides = args.mask_arg(q)
    alibi, alibi_strides = args.alibi_arg(q)
    lse, lse_strides, store_lse = _lse_arg(lse, out)
    values, flags = args.kernel_args()
    _runtime.launch(
        kernel, (B * H,), device,
        (q, k, v, out, lse, acc, m, ell, mask, alibi,
         *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse_strides,
         *mask_strides, *alibi_strides, H, H // Hkv, Sq, Sk, *values),
        dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
             STORE_LSE=store_lse, DOT_PRECISION=_runtime.dot_precision(q.dtype, device), **flags),
        cfg.num_warps, cfg.num_stages, cfg.maxnreg)


# Outside a CUDA-graph capture, caches shorter than this get one split: an eager decode step
# is bound by host time, which a split's workspace and counters add to and its GPU time
# saving cannot repay (benchmarks/NOTES.md, "Fused merge"). A power of two: the growing-cache
# plans of kernels._plan are shared within power-of-two buckets of the key length.
EAGER_SPLIT_MIN_K = 1024


def _num_splits(device: torch.device, groups: int, seqlen_k: int, block_n: int) -> int:
    """Splits of the split-KV kernel for ``groups`` (batch * kv heads) row tiles: at most one
    per two key blocks; one when the tiles alone fill 80% of the multiprocessors; otherwise
    the fewest whose programs fill their last wave at least 85% as well as the best count
    does (flash-attn's rule; one program per multiprocessor a wave). The H200 sweep of
    2026-11-30 (benchmarks/NOTES.md) measured 64 tiles: 2 splits (128 programs) 12.7, 69.9
    us at 1k, 8k keys against 14.2, 70.2 for 3 (192 programs, the earlier rule); 256 tiles:
    one split best. One split for an eager call on a cache shorter than
    ``EAGER_SPLIT_MIN_K``; the CPU (interpreter) counts 4 multiprocessors."""
    most = max(1, min(_cdiv(seqlen_k, 2 * block_n), 128))
    if device.type != "cuda":
        return min(_cdiv(4, groups), most)
    if seqlen_k < EAGER_SPLIT_MIN_K and not torch.cuda.is_current_stream_capturing():
        return 1
    sms = _runtime.multiprocessors(device)
    if groups >= 0.8 * sms:
        return 1

    def fill(splits: int) -> float:
        waves = groups * splits / sms
        return waves / math.ceil(waves)

    best = max(fill(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if fill(s) >= 0.85 * best)


def forward_splitkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor | None, args: ScoreArgs, *, num_splits: int | None = None,
    config: TileConfig | None = None,
) -> None:
    """Split-KV kernel, one launch; shapes as in ``forward_v2`` (no varlen). With more than one
    split, allocates float32 partials of (B, H, splits, Sq, next_pow2(D)) and (B, H, splits,
    Sq), which the last split of each tile merges into ``out`` (``kernels._counters``)."""
    device = q.device
    kernel = _runtime.kernel_module("decode", device).attention_fwd_splitkv
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = H // Hkv
    block_d = _block_d(D)
    cfg = config or tile_config("splitkv", device, D, q.dtype, args.causal)
    block_m = min(cfg.block_m, max(16, _next_pow2(group * Sq)))
    row_blocks = _cdiv(group * Sq, block_m)
    splits = num_splits or _num_splits(device, B * Hkv, Sk, cfg.block_n)
    split_len = _cdiv(_cdiv(Sk, splits), cfg.block_n) * cfg.block_n
    splits = _cdiv(Sk, split_len)
    if splits == 1:  # unused: the launch arguments of a growing cache then differ only in
        split_len = 0  # Sk and the k/v strides, and its calls share a plan (kernels._plan)
    if config is None:
        cfg = splitkv_grid(cfg, device, D, q.dtype, splits * B * Hkv * row_blocks)
    lse, lse_strides, store_lse = _lse_arg(lse, out)
    if splits > 1:
        o_part = torch.empty((B, H, splits, Sq, block_d), device=device, dtype=torch.float32)
        lse_part = torch.empty((B, H, splits, Sq), device=device, dtype=torch.float32)
        tiles = counters(device, B * Hkv * row_blocks)
    else:  # the one split writes out and lse itself
        o_part = lse_part = tiles = lse
    mask, mask_strides = args.mask_arg(q)
    alibi, alibi_strides = args.alibi_arg(q)
    values, flags = args.kernel_args()
    if args.attn_mask is not None:  # rows span heads here: keys-only needs no head stride
        flags["MASK_KEYS_ONLY"] = flags["MASK_KEYS_ONLY"] and mask_strides[1] == 0
    _runtime.launch(
        kernel, (splits, B * Hkv, row_blocks), device,
        (q, k, v, o_part, lse_part, tiles, out, lse, mask, alibi,
         *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse_strides, *mask_strides,
         *alibi_strides, H, group, Sq, Sk, split_len, *values),
        dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
             NUM_SPLITS=splits, STORE_LSE=store_lse,
             DOT_PRECISION=_runtime.dot_precision(q.dtype, device), **flags),
        cfg.num_warps, cfg.num_stages, cfg.maxnreg)
