"""Jit helpers shared by every kernel: scores with their modifiers, the online-softmax step,
the final normalisation, and bounds-checked tile loads.

Conventions (one place for all kernels):
- scores are kept in log2 units, natural scores times log2(e), so softmax uses ``exp2``;
- query row i and key column j are aligned bottom-right: ``rel = i + (Sk - Sq) - j``;
  causal is ``rel >= 0``, a window (left, right) is ``-right <= rel <= left``;
- a row that sees no key keeps ``m = -inf`` and ``l = 0`` and is finalised to 0 (lse -inf).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_FLOAT = tl.constexpr(2)
MASK_SCAN = tl.constexpr(2048)  # keys of a key-vector mask read per step of mask_key_bounds

# Which blocks of a loop over key blocks get the bounds mask (keys past the sequence or
# outside the causal/window band): none, all, or those from a run-time key on
CHECK_NONE = tl.constexpr(0)
CHECK_ALL = tl.constexpr(1)
CHECK_TAIL = tl.constexpr(2)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def max_along(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _maximum)


@triton.jit
def min_along(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _minimum)


@triton.jit
def sum_along(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def tanh(x):
    """tanh through exp2; saturates to +-1 without overflow trouble."""
    e = tl.exp2(x * (2.0 * LOG2E))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a [R, C] tile, zero-filling rows >= n_rows and columns >= n_cols where asked."""
    if CHECK_ROWS:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :],
                           other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    else:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=(cols < n_cols)[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _modified(MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Whether scores need scaling before the softmax (something is added to or applied on
    them); otherwise the scale is folded into the softmax's exp2 argument, one FMA."""
    return HAS_SOFTCAP or HAS_ALIBI or MASK_KIND != MASK_NONE


@triton.jit
def scores(
    q, k, offs_m, offs_n, seqlen_q, seqlen_k, diag, window_left, window_right,
    qk_scale, softcap, slope, mask_base, stride_mn, tail,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, CHECK_BOUNDS: tl.constexpr, BOUNDED_LEFT: tl.constexpr,
    BOUNDED_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Scores of a q tile [BM, BD] against a k tile [BN, BD], [BM, BN]: in log2 units (natural
    scores times log2(e)) when ``_modified``, else the raw q.k products, which the softmax
    step scales.

    qk_scale is sm_scale*log2(e), or sm_scale/softcap when HAS_SOFTCAP (softcap then holds
    softcap*log2(e)); slope is the ALiBi slope times log2(e), a scalar or a [BM, 1] tile.
    mask_base points at the mask row of each query row ([BM] pointers), or at the one row
    shared by the tile when MASK_KEYS_ONLY (a scalar pointer: one BN-vector per K block).
    Keys past seqlen_k and outside the causal/window band become -inf: with CHECK_BOUNDS ==
    CHECK_ALL, or CHECK_TAIL and ``tail``. (Mask loads are bounded whenever CHECK_BOUNDS is
    not CHECK_NONE.)
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:
        s = softcap * tanh(s * qk_scale)
    elif _modified(MASK_KIND, HAS_SOFTCAP, HAS_ALIBI):
        s = s * qk_scale
    rel = offs_m[:, None] + diag - offs_n[None, :]
    if HAS_ALIBI:
        s -= slope * tl.abs(rel).to(tl.float32)
    if MASK_KIND != MASK_NONE:
        # Blocks inside the keys (not CHECK_BOUNDS) load without a key-bound predicate: one
        # that varies along a row stops the loads from being vectorised when seqlen_k is not
        # a multiple of 16.
        if MASK_KEYS_ONLY:
            # One [BN] row shared by the tile, turned into an additive bias so the tile pays
            # one add (fused with the scaling) rather than a select per score.
            if CHECK_BOUNDS:
                mvals = tl.load(mask_base + offs_n * stride_mn, mask=offs_n < seqlen_k, other=0)
            else:
                mvals = tl.load(mask_base + offs_n * stride_mn)
            if MASK_KIND == MASK_BOOL:
                bias = tl.where(mvals != 0, 0.0, float("-inf"))
            else:
                bias = mvals.to(tl.float32) * LOG2E
            s += bias[None, :]
        else:
            m_ptrs = mask_base[:, None] + offs_n[None, :] * stride_mn
            if CHECK_BOUNDS:
                mvals = tl.load(m_ptrs, other=0, mask=(offs_m < seqlen_q)[:, None]
                                & (offs_n < seqlen_k)[None, :])
            else:
                mvals = tl.load(m_ptrs, mask=(offs_m < seqlen_q)[:, None], other=0)
            if MASK_KIND == MASK_BOOL:
                s = tl.where(mvals != 0, s, float("-inf"))
            else:
                s += mvals.to(tl.float32) * LOG2E
    if CHECK_BOUNDS == CHECK_ALL:
        s = _bounded(s, rel, offs_n, seqlen_k, window_left, window_right, BOUNDED_LEFT,
                     BOUNDED_RIGHT)
    elif CHECK_BOUNDS == CHECK_TAIL:
        if tail:
            s = _bounded(s, rel, offs_n, seqlen_k, window_left, window_right, BOUNDED_LEFT,
                         BOUNDED_RIGHT)
    return s


@triton.jit
def _bounded(s, rel, offs_n, seqlen_k, window_left, window_right, BOUNDED_LEFT: tl.constexpr,
             BOUNDED_RIGHT: tl.constexpr):
    """s with keys past seqlen_k and outside the causal/window band set to -inf."""
    valid = offs_n[None, :] < seqlen_k
    if BOUNDED_RIGHT:
        valid = valid & (rel >= -window_right)
    if BOUNDED_LEFT:
        valid = valid & (rel <= window_left)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def softmax_update(acc, m_i, l_i, s, v, scale, DOT_PRECISION: tl.constexpr):
    """One online-softmax step: fold scores s [BM, BN] (times ``scale``, > 0, to get log2
    units) and values v [BN, BD] into the running unnormalised output acc [BM, BD], row max
    m_i and row sum l_i (log2 units)."""
    m_new = tl.maximum(m_i, max_along(s, 1) * scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s * scale - m_use[:, None])
    l_i = l_i * alpha + sum_along(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def attend_block(
    acc, m_i, l_i, q, k, v, offs_m, offs_n, seqlen_q, seqlen_k, diag, window_left,
    window_right, qk_scale, softcap, slope, mask_base, stride_mn, tail,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, CHECK_BOUNDS: tl.constexpr, BOUNDED_LEFT: tl.constexpr,
    BOUNDED_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Scores of q against one K block, then the online-softmax step with its V block: the
    body every kernel's loop shares. Returns the new (acc, m_i, l_i)."""
    s = scores(q, k, offs_m, offs_n, seqlen_q, seqlen_k, diag, window_left, window_right,
               qk_scale, softcap, slope, mask_base, stride_mn, tail, MASK_KIND,
               MASK_KEYS_ONLY, HAS_SOFTCAP, HAS_ALIBI, CHECK_BOUNDS, BOUNDED_LEFT, BOUNDED_RIGHT,
               DOT_PRECISION)
    if _modified(MASK_KIND, HAS_SOFTCAP, HAS_ALIBI):
        acc, m_i, l_i = softmax_update(acc, m_i, l_i, s, v, 1.0, DOT_PRECISION)
    else:
        acc, m_i, l_i = softmax_update(acc, m_i, l_i, s, v, qk_scale, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def load_kv(src, b, head, row0, start_n, offs_nb, offs_d, seqlen, stride_n, stride_d,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             CHECK_BOUNDS: tl.constexpr, USE_TMA: tl.constexpr):
    """The [BLOCK_N, BLOCK_D] K or V tile of key rows start_n.. of a sequence that starts at
    row0. TMA mode: ``src`` is a (B, H, S, D) tensor descriptor (rows and columns out of the
    tensor read as zeros; rows of a next packed sequence are masked by the scores); pointer
    mode: ``src`` points at (b, head, row0) and bounds are checked where needed."""
    if USE_TMA:
        tile = src.load([b, head, row0 + start_n, 0]).reshape([BLOCK_N, BLOCK_D])
    else:
        ptrs = src + tl.cast(start_n, tl.int64) * stride_n \
            + offs_nb[:, None] * stride_n + offs_d[None, :] * stride_d
        tile = load_tile(ptrs, start_n + offs_nb, seqlen, offs_d, HEAD_DIM,
                         CHECK_BOUNDS, BLOCK_D != HEAD_DIM)
    return tile


@triton.jit
def attend_range(
    acc, m_i, l_i, q, k_src, v_src, b, kvh, row0, start, stop, offs_m, offs_nb, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd,
    seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, softcap, slope, mask_base,
    stride_mn, check_from,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, CHECK_BOUNDS: tl.constexpr, BOUNDED_LEFT: tl.constexpr,
    BOUNDED_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Fold key blocks [start, stop) into (acc, m_i, l_i); row0 is the first key row of the
    sequence in K/V (non-zero for varlen). CHECK_BOUNDS (CHECK_*) says which blocks get the
    bounds mask; with CHECK_TAIL, those from key ``check_from`` on."""
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_nb
        k = load_kv(k_src, b, kvh, row0, start_n, offs_nb, offs_d, seqlen_k,
                     stride_kn, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D, CHECK_BOUNDS, USE_TMA)
        v = load_kv(v_src, b, kvh, row0, start_n, offs_nb, offs_d, seqlen_k,
                     stride_vn, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, CHECK_BOUNDS, USE_TMA)
        acc, m_i, l_i = attend_block(
            acc, m_i, l_i, q, k, v, offs_m, offs_n, seqlen_q, seqlen_k, diag, window_left,
            window_right, qk_scale, softcap, slope, mask_base, stride_mn, start_n >= check_from,
            MASK_KIND, MASK_KEYS_ONLY, HAS_SOFTCAP, HAS_ALIBI, CHECK_BOUNDS, BOUNDED_LEFT,
            BOUNDED_RIGHT, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def attend_band(
    acc, m_i, l_i, q, k_src, v_src, b, kvh, row0, r0, r1, r2, r3, r4, r5, offs_m, offs_nb,
    offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
    seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, softcap, slope, mask_base,
    stride_mn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, ONE_LOOP: tl.constexpr,
):
    """``attend_range`` over a band of key blocks from ``key_range``: [r0, r1) and [r4, r5)
    with bounds masks (the band's edges and the sequence tail), [r2, r3) without (its
    interior). [r0, r1), the blocks cut by a window's left edge, is empty without one and then
    not compiled, and an empty range is skipped at run time (its loop would still cost a
    pipeline prologue, a wait and a barrier). With ONE_LOOP, no mask and no ALiBi, [r2, r5)
    runs as one loop that masks its blocks from r4 on, a run-time branch per block (any
    blocks in [r3, r4) then run unmasked): the band's blocks load in the pipeline of the
    interior instead of in a second loop's prologue, and on pointers every block's loads
    check the key bound. V2 uses it with tensor descriptors on causal bands only; the
    split-KV kernel not yet (unmeasured). (With ALiBi the one loop spilled under triton 3.6's
    ptxas, 48-352 bytes at head_dim 64.)"""
    if BOUNDED_LEFT:
        if r0 < r1:
            acc, m_i, l_i = attend_range(
                acc, m_i, l_i, q, k_src, v_src, b, kvh, row0, r0, r1, offs_m, offs_nb, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, seqlen_q, seqlen_k, diag,
                window_left, window_right, qk_scale, softcap, slope, mask_base, stride_mn, r0,
                HEAD_DIM, BLOCK_D, BLOCK_N, MASK_KIND, MASK_KEYS_ONLY, HAS_SOFTCAP, HAS_ALIBI,
                CHECK_ALL, BOUNDED_LEFT, BOUNDED_RIGHT, DOT_PRECISION, USE_TMA)
    if ONE_LOOP and MASK_KIND == MASK_NONE and not HAS_ALIBI:
        if r2 < r5:
            acc, m_i, l_i = attend_range(
                acc, m_i, l_i, q, k_src, v_src, b, kvh, row0, r2, r5, offs_m, offs_nb, offs_d,
                stride_kn, stride_kd, stride_vn, stride_vd, seqlen_q, seqlen_k, diag,
                window_left, window_right, qk_scale, softcap, slope, mask_base, stride_mn, r4,
                HEAD_DIM, BLOCK_D, BLOCK_N, MASK_KIND, MASK_KEYS_ONLY, HAS_SOFTCAP, HAS_ALIBI,
                CHECK_TAIL, BOUNDED_LEFT, BOUNDED_RIGHT, DOT_PRECISION, USE_TMA)
    else:
        for part in tl.static_range(2):
            if part == 0:
                start, stop = r2, r3
            else:
                start, stop = r4, r5
            if start < stop:
                acc, m_i, l_i = attend_range(
                    acc, m_i, l_i, q, k_src, v_src, b, kvh, row0, start, stop, offs_m,
                    offs_nb, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, seqlen_q,
                    seqlen_k, diag, window_left, window_right, qk_scale, softcap, slope,
                    mask_base, stride_mn, start, HEAD_DIM, BLOCK_D, BLOCK_N, MASK_KIND,
                    MASK_KEYS_ONLY, HAS_SOFTCAP, HAS_ALIBI, CHECK_NONE if part == 0 else CHECK_ALL,
                    BOUNDED_LEFT, BOUNDED_RIGHT, DOT_PRECISION, USE_TMA)
    return acc, m_i, l_i


@triton.jit
def _changes(mvals, MASK_KIND: tl.constexpr):
    """Where a key-vector mask changes a score: a False of a bool mask, a non-zero of a float
    mask."""
    if MASK_KIND == MASK_BOOL:
        changed = mvals == 0
    else:
        changed = mvals != 0
    return changed


@triton.jit
def _hides(mvals, MASK_KIND: tl.constexpr):
    """Where a key-vector mask hides a key: a False of a bool mask, -inf in a float mask."""
    if MASK_KIND == MASK_BOOL:
        hidden = mvals == 0
    else:
        hidden = mvals == float("-inf")
    return hidden


@triton.jit
def mask_key_bounds(mask_base, stride_mn, lo, a, c, hi, MASK_KIND: tl.constexpr,
                    BLOCK_N: tl.constexpr, SCAN: tl.constexpr):
    """Where a key-vector mask matters among key blocks [lo, hi) whose interior is [a, c)
    (``key_range``): (first, end), ``first`` the first interior block (``c`` if none) where
    the mask changes a score, ``end`` the end of the last block with a key it does not hide
    (``lo`` if none). Interior blocks before ``first`` can run as if there were no mask (a
    right-padded batch pays the mask on its padded tail only) and blocks from ``end`` on
    can be skipped (nothing of them is seen). Scanned SCAN keys at a time: forwards from
    ``a`` to the first change, backwards from ``hi`` to the last visible key."""
    offs = tl.arange(0, SCAN)
    first = c
    n = a
    while (n < c) & (first == c):
        idx = n + offs
        inside = idx < c
        mvals = tl.load(mask_base + idx * stride_mn, mask=inside, other=0)
        changed = _changes(mvals, MASK_KIND) & inside
        first = min_along(tl.where(changed, idx, c), 0)
        n += SCAN
    if first < c:
        first = first // BLOCK_N * BLOCK_N
    last = lo - 1
    n = hi
    while (n > lo) & (last < lo):
        idx = n - SCAN + offs
        inside = idx >= lo
        mvals = tl.load(mask_base + idx * stride_mn, mask=inside, other=0)
        seen = ~_hides(mvals, MASK_KIND) & inside
        last = max_along(tl.where(seen, idx, lo - 1), 0)
        n -= SCAN
    end = tl.maximum((last + BLOCK_N) // BLOCK_N * BLOCK_N, lo)
    return first, end


@triton.jit
def finalize(acc, m_i, l_i):
    """Normalised output [BM, BD] and natural-log lse [BM]; rows with no key give 0 and -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    return out, lse


@triton.jit
def key_range(start_m, n_rows, seqlen_q, seqlen_k, window_left, window_right,
              BLOCK_N: tl.constexpr, BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr):
    """Key blocks seen by query rows [start_m, start_m + n_rows), split in three ranges:
    [lo, a) and [c, hi) need bounds masks, [a, c) needs none (whole blocks inside the band
    and inside the sequence). Blocks outside [lo, hi) are never visited. Without
    BOUNDED_LEFT, lo == a == 0."""
    diag = seqlen_k - seqlen_q
    lo = 0
    hi = seqlen_k
    full_lo = 0
    full_hi = seqlen_k // BLOCK_N * BLOCK_N
    if BOUNDED_RIGHT:
        hi = tl.minimum(seqlen_k, tl.maximum(start_m + n_rows + diag + window_right, 0))
        full_hi = tl.minimum(
            full_hi, tl.maximum(start_m + diag + window_right + 1, 0) // BLOCK_N * BLOCK_N)
    if BOUNDED_LEFT:
        lo = tl.maximum(start_m + diag - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = (tl.maximum(start_m + n_rows - 1 + diag - window_left, 0) + BLOCK_N - 1) \
            // BLOCK_N * BLOCK_N
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    c = tl.maximum(tl.minimum(full_hi, hi), a)
    return lo, a, c, hi


@triton.jit
def tile_order(n_tiles, group):
    """(query tile, batch * head) of this program in a 1-D grid of n_tiles * B * H programs.
    Heads go in groups of ``group`` (the remainder's group first); within a group, tile by
    tile from the last to the first, every head of the group per tile. Under a causal mask
    the last query tiles see the most keys, so each group runs its longest programs first
    and leaves only short ones for the end of the grid; the programs running together read
    the K/V of about ``group`` heads (the launcher sizes it to the L2 cache). group = 1:
    head by head."""
    pid = tl.program_id(0)
    heads = tl.num_programs(0) // n_tiles
    rest = heads % group
    lead = rest * n_tiles  # programs of the leading partial group
    if pid < lead:
        size = rest
        first = 0
        local = pid
    else:
        size = group
        first = rest + (pid - lead) // (group * n_tiles) * group
        local = (pid - lead) % (group * n_tiles)
    return n_tiles - 1 - local // size, first + local % size
