"""FlashAttention-2's forward with Hopper's asynchronous schedule (FlashAttention-3's), in
Gluon, Triton's lower-level language: only for sm_90, fp16/bf16, and calls without a mask,
window, softcap or ALiBi (``kernels._launch.hopper_covers`` says exactly which).

Why a second kernel for the plain case: triton 3.6 compiles ``v2.py``'s loop with CTA-wide
barriers around its loads, so the two warpgroups of a program do their softmax at the same
time and leave the tensor cores idle together (benchmarks/NOTES.md). Here the work is split
by hand (``gl.warp_specialize``):
- one loader warp issues the TMA loads of Q (once) and of the K and V blocks into a ring of
  ``STAGES`` shared-memory slots, each slot guarded by a "ready" and an "empty" mbarrier
  (K and V through descriptors that end at Sk: a last partial block reads zeros past it,
  never another head's keys or a cache's unwritten slots);
- ``NC`` consumer warpgroups (2 or 3) each own 64 query rows of the program's 64*NC-row
  tile. They take turns issuing their matrix products, in a ring (the ``turn`` mbarriers:
  ping-pong for two), so one warpgroup's softmax runs under the others' products; and
  inside a warpgroup the scores of block j + 1 are computed while the softmax of block j
  runs (the wgmma is asynchronous).
- whole output tiles leave through TMA from the consumer's Q slot, a last partial tile
  through masked pointer stores.

Conventions are ``common.py``'s: scores in log2 units, query row i sees key j iff
j <= i + Sk - Sq when causal. The launcher only calls this kernel where every query row
sees a key (Sq <= Sk when causal), so no row ends with an empty softmax.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

ROWS = gl.constexpr(64)  # query rows of one consumer warpgroup (the wgmma's M)
LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _as_block(buf, desc):
    """A [BN, D] ring slot seen as the [1, BN, D] block of a K/V descriptor."""
    return buf._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)


@gluon.jit
def _loads(q_desc, k_desc, v_desc, smem, bars, coords, n_blocks):
    """Loader partition: Q of every consumer once, then K and V block by block."""
    q_bufs, k_bufs, v_bufs = smem
    q_bar, k_ready, k_empty, v_ready, v_empty, turn = bars
    b, h, m0, q_row, q_col, kv_n, kv_col, o_row, o_col = coords
    BN: gl.constexpr = k_desc.block_type.shape[1]
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    NC: gl.constexpr = q_bufs.type.shape[0]
    mbarrier.expect(q_bar, NC * q_desc.block_type.nbytes)
    for c in gl.static_range(NC):
        tma.async_copy_global_to_shared(q_desc, [q_row + m0 + c * ROWS, q_col], q_bar,
                                        q_bufs.index(c))
    for j in range(n_blocks):
        slot = j % STAGES
        phase = (j // STAGES) & 1
        # a fresh mbarrier counts as having completed phase 1: the first pass does not wait
        mbarrier.wait(k_empty.index(slot), phase ^ 1)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_n, j * BN, kv_col], k_ready.index(slot),
                                        _as_block(k_bufs.index(slot), k_desc))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_n, j * BN, kv_col], v_ready.index(slot),
                                        _as_block(v_bufs.index(slot), v_desc))


@gluon.jit
def _scores(s, qk_scale, j, row0, seqlen_k, diag, CAUSAL: gl.constexpr, MASKED: gl.constexpr):
    """Block j's scores in log2 units; on a MASKED block the keys after each row's causal
    diagonal, or (not causal) past Sk, are -inf. Keys past Sk read as zeros (TMA's fill);
    causal, no row below Sq reaches them."""
    s = s * qk_scale
    if MASKED:
        BM: gl.constexpr = s.type.shape[0]
        BN: gl.constexpr = s.type.shape[1]
        cols = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s.type.layout))
        if CAUSAL:
            rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s.type.layout))
            s = gl.where(cols[None, :] <= (rows + diag)[:, None], s, float("-inf"))
        else:
            s = s + gl.where(cols < seqlen_k, 0.0, float("-inf"))[None, :]
    return s


@gluon.jit
def _step(j, q, p, m_i, l_i, acc, smem, bars, c: gl.constexpr, consts, row0, diag, seqlen_k,
          CAUSAL: gl.constexpr, MASKED: gl.constexpr):
    """One key block j >= 1 of consumer ``c``: issue S_j = Q K_j^T, then P_{j-1} V_{j-1} into
    the accumulator, hand the tensor cores to the next warpgroup, and run S_j's softmax while
    P_{j-1} V_{j-1} completes."""
    q_bufs, k_bufs, v_bufs = smem
    q_bar, k_ready, k_empty, v_ready, v_empty, turn = bars
    zeros, qk_scale = consts
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    NC: gl.constexpr = q_bufs.type.shape[0]
    FIRST: gl.constexpr = 1 if c == 0 else 0  # warpgroup 0 takes the first turn
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout,
                                                 k_width=2)
    slot = j % STAGES
    prev = (j - 1) % STAGES
    mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
    mbarrier.wait(turn.index(c), (j & 1) ^ FIRST)
    s = warpgroup_mma(q, k_bufs.index(slot).permute((1, 0)), zeros,
                      use_acc=False, is_async=True)
    mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(q.dtype), p_layout),
                        v_bufs.index(prev), acc, is_async=True)
    mbarrier.arrive(turn.index((c + 1) % NC), count=1)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))  # the scores; P.V still runs
    mbarrier.arrive(k_empty.index(slot), count=1)
    s = _scores(s, qk_scale, j, row0, seqlen_k, diag, CAUSAL, MASKED)
    m_new = gl.maximum(m_i, gl.max(s, 1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, 1)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(v_empty.index(prev), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    return p, m_new, l_i, acc


@gluon.jit
def _consume(q_desc, k_desc, smem, bars, coords, n_blocks, c: gl.constexpr, scalars, out,
             lse_ptr, CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr):
    """Consumer warpgroup ``c``: rows [m0 + 64c, m0 + 64c + 64) of the tile."""
    q_bufs, k_bufs, v_bufs = smem
    q_bar, k_ready, k_empty, v_ready, v_empty, turn = bars
    b, h, m0, q_row, q_col, kv_n, kv_col, o_row, o_col = coords
    out_ptr, out_desc = out
    qk_scale, seqlen_q, seqlen_k, out_sb, out_sh, out_sm, lse_sb, lse_sh = scalars
    BN: gl.constexpr = k_desc.block_type.shape[1]
    D: gl.constexpr = k_desc.block_type.shape[2]
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    NC: gl.constexpr = q_bufs.type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    FIRST: gl.constexpr = 1 if c == 0 else 0  # warpgroup 0 takes the first turn

    row0 = m0 + c * ROWS
    diag = seqlen_k - seqlen_q
    # blocks [0, n_full) need no mask for these rows; blocks [n_full, n_blocks) cross their
    # causal diagonal or the end of the keys
    n_full = seqlen_k // BN
    if CAUSAL:
        n_full = gl.minimum(n_full, (row0 + diag + 1) // BN)
    n_full = gl.minimum(n_full, n_blocks)
    q = q_bufs.index(c)
    zeros = gl.zeros([ROWS, BN], gl.float32, layout=s_layout)
    acc = gl.zeros([ROWS, D], gl.float32, layout=o_layout)
    mbarrier.wait(q_bar, 0)

    # block 0 (every row sees key 0): its scores and softmax start the running state
    mbarrier.wait(k_ready.index(0), 0)
    mbarrier.wait(turn.index(c), FIRST)
    s = warpgroup_mma(q, k_bufs.index(0).permute((1, 0)), zeros,
                      use_acc=False, is_async=True)
    mbarrier.arrive(turn.index((c + 1) % NC), count=1)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    mbarrier.arrive(k_empty.index(0), count=1)
    if n_full > 0:
        s = _scores(s, qk_scale, 0, row0, seqlen_k, diag, CAUSAL, False)
    else:
        s = _scores(s, qk_scale, 0, row0, seqlen_k, diag, CAUSAL, True)
    m_i = gl.max(s, 1)
    p = gl.exp2(s - m_i[:, None])
    l_i = gl.sum(p, 1)

    consts = (zeros, qk_scale)
    n_split = gl.maximum(n_full, 1)
    for j in range(1, n_split):
        p, m_i, l_i, acc = _step(j, q, p, m_i, l_i, acc, smem, bars, c, consts, row0, diag,
                                 seqlen_k, CAUSAL, False)
    for j in range(n_split, n_blocks):
        p, m_i, l_i, acc = _step(j, q, p, m_i, l_i, acc, smem, bars, c, consts, row0, diag,
                                 seqlen_k, CAUSAL, True)

    last = (n_blocks - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_blocks - 1) // STAGES) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout),
                        v_bufs.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(v_empty.index(last), count=1)
    acc = acc / gl.convert_layout(l_i, o_rows)[:, None]
    rows = row0 + gl.arange(0, ROWS, layout=o_rows)
    # emitted even without STORE_LSE, then masked off: triton 3.6 fails to lower this kernel
    # when the partitions leave the lse arguments unused
    lse = gl.convert_layout((m_i + gl.log2(l_i)) * LN2, o_rows)
    gl.store(lse_ptr + b.to(gl.int64) * lse_sb + h.to(gl.int64) * lse_sh + rows, lse,
             mask=(rows < seqlen_q) & STORE_LSE)
    if row0 + ROWS <= seqlen_q:
        # a whole tile: staged in its (now free) Q slot and stored by TMA
        q.store(acc.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [o_row + row0, o_col], q)
        tma.store_wait(0)
    else:
        # the last tile: a pointer store masked by row, since the rows past Sq belong to
        # another head or batch in the 2-D view the descriptor writes
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        base = out_ptr + b.to(gl.int64) * out_sb + h.to(gl.int64) * out_sh
        gl.store(base + rows.to(gl.int64)[:, None] * out_sm + cols[None, :], acc.to(dtype),
                 mask=(rows < seqlen_q)[:, None])


# The partitions: warpgroup 0 runs as the default partition (the kernel's own 4 warps), the
# loader (1 warp) and the other warpgroups as workers. Worker functions must share one signature, so
# all three take the same arguments; each warpgroup needs a function of its own, since its
# index is a constexpr.
@gluon.jit
def _warpgroup0(q_desc, k_desc, v_desc, smem, bars, coords, n_blocks, scalars, out,
                lse_ptr, CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr):
    _consume(q_desc, k_desc, smem, bars, coords, n_blocks, 0, scalars, out, lse_ptr,
             CAUSAL, STORE_LSE)


@gluon.jit
def _warpgroup1(q_desc, k_desc, v_desc, smem, bars, coords, n_blocks, scalars, out,
                lse_ptr, CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr):
    _consume(q_desc, k_desc, smem, bars, coords, n_blocks, 1, scalars, out, lse_ptr,
             CAUSAL, STORE_LSE)


@gluon.jit
def _warpgroup2(q_desc, k_desc, v_desc, smem, bars, coords, n_blocks, scalars, out,
                lse_ptr, CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr):
    _consume(q_desc, k_desc, smem, bars, coords, n_blocks, 2, scalars, out, lse_ptr,
             CAUSAL, STORE_LSE)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, smem, bars, coords, n_blocks, scalars, out, lse_ptr,
            CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr):
    _loads(q_desc, k_desc, v_desc, smem, bars, coords, n_blocks)


@gluon.jit
def attention_fwd_hopper(
    q_desc, k_desc, v_desc, out_desc, out_ptr, lse_ptr, q_rb, q_rh, q_ch, kv_nb, kv_nh,
    kv_ch, o_rb, o_rh, o_ch, out_sb, out_sh, out_sm, lse_sb, lse_sh, H, GROUP, seqlen_q,
    seqlen_k, qk_scale,
    NC: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
):
    """Q is read through a 2-D tensor descriptor over its memory (blocks [64, D]): query row
    s of head (b, h) is descriptor row b * q_rb + h * q_rh + s at column h * q_ch. K and V
    through 3-D descriptors (blocks [1, BLOCK_N, D], one layout for both) whose second
    dimension ends at Sk, so that TMA reads zeros past the last key: key s of K/V head hk =
    h // GROUP is at [b * kv_nb + hk * kv_nh, s, hk * kv_ch]. out (B, H, Sq, D): whole
    64-row tiles through ``out_desc`` (blocks [64, D], rows b * o_rb + h * o_rh + s, column
    h * o_ch), the last partial tile through ``out_ptr`` with strides (out_sb, out_sh,
    out_sm, 1). lse (B, H, Sq) float32 with strides (lse_sb, lse_sh, 1) when STORE_LSE.
    Grid: (query tiles of 64 * NC rows, B * H); kernel num_warps 4 (warpgroup 0); the
    workers get CONSUMER_REGS registers per thread (the loader 24), warpgroup 0 what the
    kernel's maxnreg leaves."""
    BN: gl.constexpr = k_desc.block_type.shape[1]
    D: gl.constexpr = k_desc.block_type.shape[2]
    dtype: gl.constexpr = q_desc.dtype
    n_tiles = gl.num_programs(0)
    tile = gl.program_id(0)
    if CAUSAL:  # the longest key ranges first, out of the final wave
        tile = n_tiles - 1 - tile
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    m0 = tile * (NC * ROWS)
    n_blocks = gl.cdiv(seqlen_k, BN)
    if CAUSAL:
        last_row = gl.minimum(m0 + NC * ROWS, seqlen_q) - 1
        n_blocks = gl.minimum(n_blocks, gl.cdiv(last_row + seqlen_k - seqlen_q + 1, BN))

    q_bufs = gl.allocate_shared_memory(dtype, [NC, ROWS, D], q_desc.layout)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], dtype)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BN, D], kv_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BN, D], kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NC)  # every consumer releases every block
        mbarrier.init(v_empty.index(i), count=NC)
    for i in gl.static_range(NC):
        mbarrier.init(turn.index(i), count=1)

    hk = h // GROUP
    coords = (b, h, m0, b * q_rb + h * q_rh, h * q_ch, b * kv_nb + hk * kv_nh, hk * kv_ch,
              b * o_rb + h * o_rh, h * o_ch)
    scalars = (qk_scale, seqlen_q, seqlen_k, out_sb, out_sh, out_sm, lse_sb, lse_sh)
    args = (q_desc, k_desc, v_desc, (q_bufs, k_bufs, v_bufs),
            (q_bar, k_ready, k_empty, v_ready, v_empty, turn), coords, n_blocks, scalars,
            (out_ptr, out_desc), lse_ptr, CAUSAL, STORE_LSE)
    if NC == 2:
        gl.warp_specialize([(_warpgroup0, args), (_loader, args), (_warpgroup1, args)],
                           [1, 4], [24, CONSUMER_REGS])
    else:
        gl.static_assert(NC == 3, "two or three consumer warpgroups")
        gl.warp_specialize([(_warpgroup0, args), (_loader, args), (_warpgroup1, args),
                            (_warpgroup2, args)], [1, 4, 4], [24, CONSUMER_REGS, CONSUMER_REGS])
