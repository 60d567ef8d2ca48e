"""Split-KV ("flash-decoding") forward for a few query rows against a long KV cache.

``attention_fwd_splitkv``: one program per (K/V split, batch*kv_head, row block). Its rows are
(query head of the GQA group, query row) pairs, so the group's heads read each K/V tile once.
With one split a program writes the output itself. With several, each writes its split's
normalised output and lse, and the last split of a (batch*kv_head, row block) tile to finish
(counted in a zeroed int32 counter per tile, which it leaves at zero again) merges them: one
launch whatever the split count. Same scores and softmax step as the other kernels
(``common.py``).
"""

import triton
import triton.language as tl

from .common import LN2, LOG2E, attend_band, finalize, key_range, load_tile


@triton.jit
def attention_fwd_splitkv(
    Q, K, V, O_PART, LSE_PART, COUNTERS, O, LSE, MASK, ALIBI,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    H, GROUP, Sq, Sk, split_len, qk_scale, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """O (B, H, Sq, D) and LSE (B, H, Sq) are the outputs. With several splits: O_PART (B, H,
    NUM_SPLITS, Sq, BLOCK_D) and LSE_PART (B, H, NUM_SPLITS, Sq), float32, contiguous, hold
    the splits' results and COUNTERS (B * H / GROUP * row blocks,) int32 is zero on entry and
    on exit; with one split these three are unused. Row r < GROUP * Sq of a kv head is (head
    kvh * GROUP + r // Sq, query r % Sq)."""
    split = tl.program_id(0)
    pid = tl.program_id(1)
    rows0 = tl.program_id(2) * BLOCK_M
    kv_heads = H // GROUP
    b = (pid // kv_heads).to(tl.int64)
    kvh = (pid % kv_heads).to(tl.int64)
    diag = Sk - Sq

    offs_r = rows0 + tl.arange(0, BLOCK_M)
    rows_ok = offs_r < GROUP * Sq
    g = tl.minimum(offs_r // Sq, GROUP - 1)
    head = kvh * GROUP + g  # [BM] int64
    offs_m = offs_r % Sq  # query position of each row
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + offs_m[:, None] * stride_qm \
        + offs_d[None, :] * stride_qd
    q = load_tile(q_ptrs, offs_r, GROUP * Sq, offs_d, HEAD_DIM, True, BLOCK_D != HEAD_DIM)

    slope = tl.full([BLOCK_M, 1], 0.0, tl.float32)
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + head * stride_ah)[:, None].to(tl.float32) * LOG2E
    mask_base = MASK + b * stride_mb
    if not MASK_KEYS_ONLY:
        mask_base = mask_base + head * stride_mh + offs_m.to(tl.int64) * stride_mm

    # The key band seen by rows 0..Sq-1 (``key_range``), cut to this split's keys: blocks of
    # the interior run without bounds checks, the edges of the band and the tail with them.
    lo, a, c, hi = key_range(0, Sq, Sq, Sk, window_left, window_right, BLOCK_N,
                             BOUNDED_LEFT, BOUNDED_RIGHT)
    split_lo = 0
    split_hi = Sk
    if NUM_SPLITS > 1:  # split_len: keys per split, a multiple of BLOCK_N (0 with one split)
        split_lo = split * split_len
        split_hi = split_lo + split_len
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    acc, m_i, l_i = attend_band(
        acc, m_i, l_i, q, k_base, v_base, b, kvh, 0, tl.maximum(lo, split_lo),
        tl.minimum(a, split_hi), tl.maximum(a, split_lo), tl.minimum(c, split_hi),
        tl.maximum(c, split_lo), tl.minimum(hi, split_hi), offs_m, offs_nb, offs_d, stride_kn,
        stride_kd, stride_vn, stride_vd, Sq, Sk, diag, window_left, window_right, qk_scale,
        softcap, slope, mask_base, stride_mn, HEAD_DIM, BLOCK_D, BLOCK_N, MASK_KIND,
        MASK_KEYS_ONLY, HAS_SOFTCAP, HAS_ALIBI, BOUNDED_LEFT, BOUNDED_RIGHT, DOT_PRECISION,
        False, False)

    out, lse = finalize(acc, m_i, l_i)
    last = True
    if NUM_SPLITS > 1:
        part = ((b * H + head) * NUM_SPLITS + split) * Sq + offs_m  # [BM] row in the parts
        tl.store(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=rows_ok[:, None])
        tl.store(LSE_PART + part, lse, mask=rows_ok)
        # Every thread's stores happen before the counter's release; the program that takes
        # the last count acquires them all and merges.
        tl.debug_barrier()
        tile = COUNTERS + pid * tl.num_programs(2) + tl.program_id(2)
        last = tl.atomic_add(tile, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1
        if last:
            tl.atomic_xchg(tile, 0, sem="relaxed", scope="gpu")
            out, lse = merge_parts(O_PART, LSE_PART, (b * H + head) * NUM_SPLITS * Sq + offs_m,
                                   rows_ok, offs_d, Sq, BLOCK_D, NUM_SPLITS)
    if last:
        o_ptrs = O + b * stride_ob + head[:, None] * stride_oh + offs_m[:, None] * stride_om \
            + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty),
                 mask=rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
        if STORE_LSE:
            tl.store(LSE + b * stride_lb + head * stride_lh + offs_m * stride_lm, lse,
                     mask=rows_ok)


@triton.jit
def merge_parts(O_PART, LSE_PART, part0, rows_ok, offs_d, Sq, BLOCK_D: tl.constexpr,
                NUM_SPLITS: tl.constexpr):
    """Combine the NUM_SPLITS results of rows ``part0`` (their row in the parts of split 0):
    outputs weighted by exp(lse), normalised ([BM, BLOCK_D], [BM]); a row no split saw gives 0
    and lse -inf. Read past L1 (``.cg``): other programs wrote them during this kernel."""
    m = tl.full(part0.shape, float("-inf"), tl.float32)
    total = tl.full(part0.shape, 0.0, tl.float32)
    acc = tl.full([part0.shape[0], BLOCK_D], 0.0, tl.float32)
    for split in range(NUM_SPLITS):
        part = part0 + split * Sq
        lse = tl.load(LSE_PART + part, mask=rows_ok, other=float("-inf"),
                      cache_modifier=".cg") * LOG2E
        out = tl.load(O_PART + part[:, None] * BLOCK_D + offs_d[None, :],
                      mask=rows_ok[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        w = tl.exp2(lse - m_use)
        total = total * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * out
        m = m_new
    empty = total == 0.0
    total = tl.where(empty, 1.0, total)
    m = tl.where(empty, 0.0, m)
    return acc / total[:, None], tl.where(empty, float("-inf"), (m + tl.log2(total)) * LN2)
