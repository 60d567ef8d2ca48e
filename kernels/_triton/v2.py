"""FlashAttention-2 forward: one program per (query block, batch*head); K/V stream through the
inner loop; normalisation deferred to the end; bounds masks only on the blocks that need them.

Tensors arrive as 4-D (batch, head, seq, dim) strides, so BHSD and BSHD inputs (and any other
view) run the same code. With IS_VARLEN, rows of batch b are rows cu[b]..cu[b+1] of a packed
sequence and the batch stride is unused.
"""

import triton
import triton.language as tl

from .common import (
    CHECK_NONE,
    LOG2E,
    MASK_NONE,
    MASK_SCAN,
    attend_band,
    attend_range,
    finalize,
    key_range,
    load_tile,
    mask_key_bounds,
    tile_order,
)


@triton.jit
def attention_fwd_v2(
    Q, K, V, O, LSE, MASK, ALIBI, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    n_tiles, order_group, H, GROUP, Sq, Sk, qk_scale, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Q, K, V are pointers, or (B, H, S, D) tensor descriptors with blocks [1, 1, BLOCK_*,
    BLOCK_D] when USE_TMA; O, LSE, MASK, ALIBI are pointers. Grid: (n_tiles * B * H,), in
    ``tile_order``'s order with groups of ``order_group`` heads."""
    tile, pid_bh = tile_order(n_tiles, order_group)
    start_m = tile * BLOCK_M
    seq = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    b = seq
    if IS_VARLEN:
        q_row0 = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_row0
        k_row0 = tl.load(CU_K + b)
        seqlen_k = tl.load(CU_K + b + 1) - k_row0
        b = 0  # packed sequences share the one batch entry of the (1, H, T, D) views
    else:
        q_row0 = 0
        k_row0 = 0
        seqlen_q = Sq
        seqlen_k = Sk
    if start_m < seqlen_q:
        b64 = tl.cast(b, tl.int64)
        h64 = tl.cast(h, tl.int64)
        kvh64 = tl.cast(kvh, tl.int64)
        row0 = tl.cast(q_row0 + start_m, tl.int64)
        diag = seqlen_k - seqlen_q
        offs_mb = tl.arange(0, BLOCK_M)
        offs_m = start_m + offs_mb
        offs_nb = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)

        if USE_TMA:
            q = Q.load([b, h, q_row0 + start_m, 0]).reshape([BLOCK_M, BLOCK_D])
            k_src = K
            v_src = V
        else:
            q_base = Q + b64 * stride_qb + h64 * stride_qh + row0 * stride_qm
            q = load_tile(q_base + offs_mb[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                          offs_m, seqlen_q, offs_d, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
            k_row64 = tl.cast(k_row0, tl.int64)
            k_src = K + b64 * stride_kb + kvh64 * stride_kh + k_row64 * stride_kn
            v_src = V + b64 * stride_vb + kvh64 * stride_vh + k_row64 * stride_vn

        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(ALIBI + tl.cast(seq, tl.int64) * stride_ab + h64 * stride_ah)
            slope = slope.to(tl.float32) * LOG2E
        mask_base = MASK + b64 * stride_mb + h64 * stride_mh
        if not MASK_KEYS_ONLY:
            mask_base = mask_base + offs_m.to(tl.int64) * stride_mm

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

        lo, a, c, hi = key_range(start_m, BLOCK_M, seqlen_q, seqlen_k, window_left,
                                 window_right, BLOCK_N, BOUNDED_LEFT, BOUNDED_RIGHT)
        # Leading blocks cut by the left edge of a window, then the interior that needs no
        # bounds mask, then the diagonal band and the sequence tail. A key-vector mask is
        # skipped on the interior blocks before the first key it changes, and the blocks
        # after the last key it lets through are not visited.
        if MASK_KEYS_ONLY and MASK_KIND != MASK_NONE:
            free_hi, end = mask_key_bounds(mask_base, stride_mn, lo, a, c, hi, MASK_KIND,
                                           BLOCK_N, MASK_SCAN)
            hi = tl.minimum(hi, end)
            c = tl.minimum(c, hi)
            a = tl.minimum(a, hi)
            free_hi = tl.minimum(free_hi, c)
            acc, m_i, l_i = attend_range(
                acc, m_i, l_i, q, k_src, v_src, b, kvh, k_row0, a, free_hi, offs_m, offs_nb,
                offs_d, stride_kn, stride_kd, stride_vn, stride_vd, seqlen_q, seqlen_k, diag,
                window_left, window_right, qk_scale, softcap, slope, mask_base, stride_mn, a,
                HEAD_DIM, BLOCK_D, BLOCK_N, MASK_NONE, MASK_KEYS_ONLY, HAS_SOFTCAP, HAS_ALIBI,
                CHECK_NONE, BOUNDED_LEFT, BOUNDED_RIGHT, DOT_PRECISION, USE_TMA)
        else:
            free_hi = a
        # One pipelined loop over the interior and the band (ONE_LOOP) where the band has a
        # right edge (causal): +1-5% at head_dim 64 on the H100; without one it cost 3-5%
        # (benchmarks/NOTES.md, thirty-first session).
        acc, m_i, l_i = attend_band(
            acc, m_i, l_i, q, k_src, v_src, b, kvh, k_row0, lo, a, free_hi, c, c, hi, offs_m,
            offs_nb, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, seqlen_q, seqlen_k,
            diag, window_left, window_right, qk_scale, softcap, slope, mask_base, stride_mn,
            HEAD_DIM, BLOCK_D, BLOCK_N, MASK_KIND, MASK_KEYS_ONLY, HAS_SOFTCAP, HAS_ALIBI,
            BOUNDED_LEFT, BOUNDED_RIGHT, DOT_PRECISION, USE_TMA, USE_TMA and BOUNDED_RIGHT)

        out, lse = finalize(acc, m_i, l_i)
        o_base = O + b64 * stride_ob + h64 * stride_oh + row0 * stride_om
        o_ptrs = o_base + offs_mb[:, None] * stride_om + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty),
                 mask=(offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :])
        if STORE_LSE:
            l_ptrs = LSE + b64 * stride_lb + h64 * stride_lh + (row0 + offs_mb) * stride_lm
            tl.store(l_ptrs, lse, mask=offs_m < seqlen_q)
