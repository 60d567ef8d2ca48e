"""FlashAttention-1 forward schedule: one program per batch*head; the outer loop walks K/V
column blocks and, for each, an inner loop walks the query row blocks that see it, loading
their running output, max and sum from a float32 workspace, rescaling and storing them back.
A last pass normalises the workspace into the output. Same scores and softmax step as V2
(``common.py``); only the loop order differs.
"""

import triton
import triton.language as tl

from .common import CHECK_ALL, LOG2E, attend_block, finalize, load_tile


@triton.jit
def attention_fwd_v1(
    Q, K, V, O, LSE, ACC, M, L, MASK, ALIBI,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    H, GROUP, Sq, Sk, qk_scale, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP
    diag = Sk - Sq
    offs_mb = tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM

    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    # Workspace: ACC (B*H, Sq, BLOCK_D) and M, L (B*H, Sq), float32, contiguous.
    acc_base = ACC + pid_bh.to(tl.int64) * Sq * BLOCK_D
    ml_base = pid_bh.to(tl.int64) * Sq
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h * stride_ah).to(tl.float32) * LOG2E
    mask_head = MASK + b * stride_mb + h * stride_mh

    for start_m in range(0, Sq, BLOCK_M):
        offs_m = start_m + offs_mb
        rows = offs_m < Sq
        tl.store(acc_base + offs_m[:, None] * BLOCK_D + offs_d[None, :],
                 tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32), mask=rows[:, None])
        tl.store(M + ml_base + offs_m, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=rows)
        tl.store(L + ml_base + offs_m, tl.full([BLOCK_M], 0.0, tl.float32), mask=rows)
    tl.debug_barrier()

    for start_n in range(0, Sk, BLOCK_N):
        offs_n = start_n + offs_nb
        rows_n = offs_n[:, None].to(tl.int64)
        k = load_tile(k_base + rows_n * stride_kn + offs_d[None, :] * stride_kd,
                      offs_n, Sk, offs_d, HEAD_DIM, True, not EVEN_D)
        v = load_tile(v_base + rows_n * stride_vn + offs_d[None, :] * stride_vd,
                      offs_n, Sk, offs_d, HEAD_DIM, True, not EVEN_D)
        # Query rows that see some key of this block: i + diag - left <= j <= i + diag + right.
        m_lo = 0
        m_hi = Sq
        if BOUNDED_RIGHT:
            m_lo = tl.maximum(start_n - diag - window_right, 0) // BLOCK_M * BLOCK_M
        if BOUNDED_LEFT:
            m_hi = tl.minimum(Sq, tl.maximum(start_n + BLOCK_N - diag + window_left, 0))
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_m = start_m + offs_mb
            rows = offs_m < Sq
            q = load_tile(q_base + offs_m[:, None].to(tl.int64) * stride_qm
                          + offs_d[None, :] * stride_qd,
                          offs_m, Sq, offs_d, HEAD_DIM, True, not EVEN_D)
            acc_ptrs = acc_base + offs_m[:, None] * BLOCK_D + offs_d[None, :]
            acc = tl.load(acc_ptrs, mask=rows[:, None], other=0.0)
            m_i = tl.load(M + ml_base + offs_m, mask=rows, other=float("-inf"))
            l_i = tl.load(L + ml_base + offs_m, mask=rows, other=0.0)
            mask_base = mask_head
            if not MASK_KEYS_ONLY:
                mask_base = mask_head + offs_m.to(tl.int64) * stride_mm
            acc, m_i, l_i = attend_block(
                acc, m_i, l_i, q, k, v, offs_m, offs_n, Sq, Sk, diag, window_left,
                window_right, qk_scale, softcap, slope, mask_base, stride_mn, True, MASK_KIND,
                MASK_KEYS_ONLY, HAS_SOFTCAP, HAS_ALIBI, CHECK_ALL, BOUNDED_LEFT, BOUNDED_RIGHT,
                DOT_PRECISION)
            tl.store(acc_ptrs, acc, mask=rows[:, None])
            tl.store(M + ml_base + offs_m, m_i, mask=rows)
            tl.store(L + ml_base + offs_m, l_i, mask=rows)
        tl.debug_barrier()

    o_base = O + b * stride_ob + h * stride_oh
    for start_m in range(0, Sq, BLOCK_M):
        offs_m = start_m + offs_mb
        rows = offs_m < Sq
        acc = tl.load(acc_base + offs_m[:, None] * BLOCK_D + offs_d[None, :],
                      mask=rows[:, None], other=0.0)
        m_i = tl.load(M + ml_base + offs_m, mask=rows, other=float("-inf"))
        l_i = tl.load(L + ml_base + offs_m, mask=rows, other=0.0)
        out, lse = finalize(acc, m_i, l_i)
        tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=rows[:, None] & (offs_d < HEAD_DIM)[None, :])
        if STORE_LSE:
            tl.store(LSE + b * stride_lb + h * stride_lh + offs_m.to(tl.int64) * stride_lm,
                     lse, mask=rows)
