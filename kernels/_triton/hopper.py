"""FlashAttention-2's forward with Hopper's asynchronous schedule (FlashAttention-3's), in
Gluon, Triton's lower-level language: only for sm_90, fp16/bf16, and calls without a window,
softcap or ALiBi whose mask, if any, is one key vector per batch and head (key padding:
``kernels._launch.hopper_covers`` says exactly which).

Why a second kernel for the plain case: triton 3.6 compiles ``v2.py``'s loop with CTA-wide
barriers around its loads, so the two warpgroups of a program do their softmax at the same
time and leave the tensor cores idle together (benchmarks/NOTES.md). Here the work is split
by hand (``gl.warp_specialize``):
- one loader warp issues the TMA loads of each tile's Q and of the K and V blocks into a ring of
  ``STAGES`` shared-memory slots, each slot guarded by a "ready" and an "empty" mbarrier
  (K and V through descriptors that end at Sk: a last partial block reads zeros past it,
  never another head's keys or a cache's unwritten slots);
- ``NC`` consumer warpgroups (2 or 3) each own 64 query rows of the program's 64*NC-row
  tile. They take turns issuing their matrix products, in a ring (the ``turn`` mbarriers:
  ping-pong for two), so one warpgroup's softmax runs under the others' products; and
  inside a warpgroup the scores of block j + 1 are computed while the softmax of block j
  runs (the wgmma is asynchronous);
- a program runs two query tiles of a head (``PAIRED``: the last and the first, the
  second and the second-to-last, ...): under a causal mask every program then sees about
  the same number of key blocks, and the ring, the turns and the Q slots run on from one
  tile to the next, so the loader brings the second tile's first K/V blocks while the
  consumers finish the first, and its Q as soon as each consumer has stored its output;
- whole output tiles leave through TMA from the consumer's Q slot, a last partial tile
  through masked pointer stores; the slot is then free for the next tile's Q.
- a key-vector mask (MASK_KIND, ``common.py``'s kinds) is scanned once per program before
  the partitions start, as V2 does (``common.mask_key_bounds``): the blocks after the last
  key it lets through are neither loaded nor visited, and the blocks before the first key
  it changes run as if there were no mask; the others add it to their scores as a [BN]
  bias vector, once both products of their step are complete.

Conventions and constants are ``common.py``'s: scores in log2 units, query row i sees key j
iff j <= i + Sk - Sq when causal, a row that sees no key gives 0 (lse -inf). The launcher
calls this kernel with Sq <= Sk when causal, so that only a mask can leave a row without keys.
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

from .common import LN2, LOG2E, MASK_BOOL, MASK_NONE, MASK_SCAN, tile_order

ROWS = gl.constexpr(64)  # query rows of one consumer warpgroup (the wgmma's M)
# Gluon calls renamed after triton 3.6 (3.9 raises on the old names): the TMA copies are
# async_load / async_store, and a shared-memory view's _reinterpret is reinterpret
_tma_load = getattr(tma, "async_load", tma.async_copy_global_to_shared)
_tma_store = getattr(tma, "async_store", tma.async_copy_shared_to_global)
_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))


@gluon.jit
def _as_block(buf, desc):
    """A [BN, D] ring slot seen as the [1, BN, D] block of a K/V descriptor."""
    if _REINTERPRET:
        view = buf.reinterpret(desc.dtype, desc.block_type.shape, desc.layout)
    else:
        view = buf._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)
    return view


@gluon.jit
def _load_kv(k_desc, v_desc, smem, bars, kv_n, kv_col, g, j):
    """Key block j into ring slot g % STAGES (g counts the program's blocks over its tiles):
    K, then V, each once the consumers have released the slot's previous block."""
    q_bufs, k_bufs, v_bufs = smem
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn = bars
    BN: gl.constexpr = k_desc.block_type.shape[1]
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    slot = g % STAGES
    phase = (g // STAGES) & 1
    # a fresh mbarrier counts as having completed phase 1: the first pass does not wait
    mbarrier.wait(k_empty.index(slot), phase ^ 1)
    mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
    _tma_load(k_desc, [kv_n, j * BN, kv_col], k_ready.index(slot),
              _as_block(k_bufs.index(slot), k_desc))
    mbarrier.wait(v_empty.index(slot), phase ^ 1)
    mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
    _tma_load(v_desc, [kv_n, j * BN, kv_col], v_ready.index(slot),
              _as_block(v_bufs.index(slot), v_desc))


@gluon.jit
def _loads(q_desc, k_desc, v_desc, smem, bars, coords, tiles):
    """Loader partition: tile by tile, K and V block 0, each consumer's Q once its slot is
    free (the consumer has stored its output of the previous tile), then the other blocks.
    The ring runs on across tiles, so a tile's first blocks load under the previous one's
    end."""
    q_bufs, k_bufs, v_bufs = smem
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn = bars
    b, h, q_row, q_col, kv_n, kv_col, o_row, o_col = coords
    NC: gl.constexpr = q_bufs.type.shape[0]
    g = 0
    for t in range(tiles[2]):
        m0, n_blocks = _tile(tiles, t)
        _load_kv(k_desc, v_desc, smem, bars, kv_n, kv_col, g, 0)
        for c in gl.static_range(NC):
            mbarrier.wait(q_empty.index(c), (t & 1) ^ 1)
            mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
            _tma_load(q_desc, [q_row + m0 + c * ROWS, q_col], q_ready.index(c),
                      q_bufs.index(c))
        for j in range(1, n_blocks):
            _load_kv(k_desc, v_desc, smem, bars, kv_n, kv_col, g + j, j)
        g += n_blocks


@gluon.jit
def _tile(tiles, t):
    """(first query row, key blocks) of the program's tile t: ``tiles`` is ((m0, n_blocks)
    of tile 0, the same of tile 1, the number of tiles)."""
    first, second, n = tiles
    m0 = first[0]
    n_blocks = first[1]
    if t > 0:
        m0 = second[0]
        n_blocks = second[1]
    return m0, n_blocks


@gluon.jit
def _mask_bounds(mask_base, stride_n, hi, MASK_KIND: gl.constexpr):
    """Where the key-vector mask at ``mask_base`` matters among keys [0, hi): (first, end),
    ``first`` the first key it changes (a False of a bool mask, a non-zero of a float one;
    ``hi`` if none) and ``end`` one past the last key it lets through (0 if none). Read
    MASK_SCAN keys at a time, forwards to the first change, backwards to the last visible
    key: a right-padded row stops after one step of each."""
    layout: gl.constexpr = gl.BlockedLayout([MASK_SCAN // (32 * gl.num_warps())], [32],
                                            [gl.num_warps()], [0])
    offs = gl.arange(0, MASK_SCAN, layout=layout)
    first = hi
    n = hi * 0
    while (n < hi) & (first == hi):
        idx = n + offs
        inside = idx < hi
        vals = gl.load(mask_base + idx * stride_n, mask=inside, other=0)
        if MASK_KIND == MASK_BOOL:
            changed = vals == 0
        else:
            changed = vals != 0
        first = gl.min(gl.where(changed & inside, idx, hi), 0)
        n += MASK_SCAN
    last = hi * 0 - 1
    n = hi
    while (n > 0) & (last < 0):
        idx = n - MASK_SCAN + offs
        inside = idx >= 0
        vals = gl.load(mask_base + idx * stride_n, mask=inside, other=0)
        if MASK_KIND == MASK_BOOL:
            seen = vals != 0
        else:
            seen = vals != float("-inf")
        last = gl.max(gl.where(seen & inside, idx, -1), 0)
        n -= MASK_SCAN
    return first, last + 1


@gluon.jit
def _key_bias(keys, j, seqlen_k, BN: gl.constexpr, layout: gl.constexpr,
              MASK_KIND: gl.constexpr):
    """Key block j's [BN] slice of the key-vector mask as an additive bias in log2 units (a
    bool mask's False, and keys past Sk, become -inf), in ``layout``. Loaded one key per
    thread, then spread to the score layout: loading it in that layout directly would hold
    an address per column in every thread (spills)."""
    mask_base, stride_n, first = keys
    flat: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    cols = j * BN + gl.arange(0, BN, layout=flat)
    inside = cols < seqlen_k
    vals = gl.load(mask_base + cols * stride_n, mask=inside, other=0)
    if MASK_KIND == MASK_BOOL:
        bias = gl.where(vals != 0, 0.0, float("-inf"))
    else:
        bias = gl.where(inside, vals.to(gl.float32) * LOG2E, float("-inf"))
    return gl.convert_layout(bias, layout)


@gluon.jit
def _exp_base(m, KEYS: gl.constexpr):
    """The row maxima the exponentials subtract: ``m``, except that on a block that adds the
    key-vector mask a row that has seen no key yet (m = -inf) subtracts 0, so that its exp2
    gives 0, not NaN. (Blocks without it come before the first key the mask changes: every
    row has seen a key there.)"""
    if KEYS:
        m = gl.where(m == float("-inf"), 0.0, m)
    return m


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
def _step(j, p, m_i, l_i, acc, ctx, c: gl.constexpr, CAUSAL: gl.constexpr,
          MASKED: gl.constexpr, KEYS: gl.constexpr, MASK_KIND: gl.constexpr):
    """One key block j >= 1 of consumer ``c``: issue S_j = Q K_j^T, then P_{j-1} V_{j-1} into
    the accumulator, hand the tensor cores to the next warpgroup, and run S_j's softmax while
    P_{j-1} V_{j-1} completes. KEYS: add the key-vector mask to S_j, after both products
    complete (its [BN] bias would not fit in the registers beside P.V's operands). The tile's
    block j is the program's block g0 + j in the ring and the turns."""
    q, smem, bars, zeros, qk_scale, row0, diag, seqlen_k, keys, g0 = ctx
    q_bufs, k_bufs, v_bufs = smem
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn = bars
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    NC: gl.constexpr = q_bufs.type.shape[0]
    FIRST: gl.constexpr = 1 if c == 0 else 0  # warpgroup 0 takes the first turn
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout,
                                                 k_width=2)
    g = g0 + j
    slot = g % STAGES
    prev = (g - 1) % STAGES
    mbarrier.wait(k_ready.index(slot), (g // STAGES) & 1)
    mbarrier.wait(turn.index(c), (g & 1) ^ FIRST)
    s = warpgroup_mma(q, k_bufs.index(slot).permute((1, 0)), zeros,
                      use_acc=False, is_async=True)
    mbarrier.wait(v_ready.index(prev), ((g - 1) // STAGES) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(q.dtype), p_layout),
                        v_bufs.index(prev), acc, is_async=True)
    mbarrier.arrive(turn.index((c + 1) % NC), count=1)
    if KEYS:
        s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc))
        mbarrier.arrive(k_empty.index(slot), count=1)
        mbarrier.arrive(v_empty.index(prev), count=1)
        bias = _key_bias(keys, j, seqlen_k, zeros.type.shape[1],
                         gl.SliceLayout(0, zeros.type.layout), MASK_KIND)
        s = _scores(s, qk_scale, j, row0, seqlen_k, diag, CAUSAL, MASKED) + bias[None, :]
    else:
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))  # the scores; P.V still runs
        mbarrier.arrive(k_empty.index(slot), count=1)
        s = _scores(s, qk_scale, j, row0, seqlen_k, diag, CAUSAL, MASKED)
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_use = _exp_base(m_new, KEYS)
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + gl.sum(p, 1)
    if not KEYS:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(v_empty.index(prev), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    return p, m_new, l_i, acc


@gluon.jit
def _steps(start, stop, state, ctx, c: gl.constexpr, CAUSAL: gl.constexpr,
           MASKED: gl.constexpr, KEYS: gl.constexpr, MASK_KIND: gl.constexpr):
    """``_step`` over key blocks [start, stop): one loop per masking, whose flags are
    constexprs. ``state`` is (p, m_i, l_i, acc)."""
    p, m_i, l_i, acc = state
    for j in range(start, stop):
        p, m_i, l_i, acc = _step(j, p, m_i, l_i, acc, ctx, c, CAUSAL, MASKED, KEYS, MASK_KIND)
    return p, m_i, l_i, acc


@gluon.jit
def _consume(ops, c: gl.constexpr, CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr,
             MASK_KIND: gl.constexpr):
    """Consumer warpgroup ``c``: rows [m0 + 64c, m0 + 64c + 64) of each of the program's
    tiles, its ring and turn counts running on across them."""
    tiles = ops[5]
    g0 = 0
    for t in range(tiles[2]):
        m0, n_blocks = _tile(tiles, t)
        _consume_tile(ops, c, t, m0, n_blocks, g0, CAUSAL, STORE_LSE, MASK_KIND)
        g0 += n_blocks


@gluon.jit
def _consume_tile(ops, c: gl.constexpr, t, m0, n_blocks, g0, CAUSAL: gl.constexpr,
                  STORE_LSE: gl.constexpr, MASK_KIND: gl.constexpr):
    """Consumer ``c`` on the program's tile t (rows from m0, key blocks [0, n_blocks)), whose
    block 0 is the program's block g0 in the ring."""
    q_desc, k_desc, smem, bars, coords, tiles, scalars, out, lse_ptr, keys = ops
    q_bufs, k_bufs, v_bufs = smem
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn = bars
    b, h, q_row, q_col, kv_n, kv_col, o_row, o_col = coords
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
    KEYS: gl.constexpr = MASK_KIND != MASK_NONE
    q = q_bufs.index(c)
    zeros = gl.zeros([ROWS, BN], gl.float32, layout=s_layout)
    acc = gl.zeros([ROWS, D], gl.float32, layout=o_layout)
    mbarrier.wait(q_ready.index(c), t & 1)

    # block 0 (every row sees key 0): its scores and softmax start the running state
    slot0 = g0 % STAGES
    mbarrier.wait(k_ready.index(slot0), (g0 // STAGES) & 1)
    mbarrier.wait(turn.index(c), (g0 & 1) ^ FIRST)
    s = warpgroup_mma(q, k_bufs.index(slot0).permute((1, 0)), zeros,
                      use_acc=False, is_async=True)
    mbarrier.arrive(turn.index((c + 1) % NC), count=1)
    if KEYS:
        bias = _key_bias(keys, 0, seqlen_k, BN, gl.SliceLayout(0, s_layout), MASK_KIND)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    mbarrier.arrive(k_empty.index(slot0), count=1)
    if n_full > 0:
        s = _scores(s, qk_scale, 0, row0, seqlen_k, diag, CAUSAL, False)
    else:
        s = _scores(s, qk_scale, 0, row0, seqlen_k, diag, CAUSAL, True)
    if KEYS:
        s = s + bias[None, :]
    m_i = gl.max(s, 1)
    p = gl.exp2(s - _exp_base(m_i, KEYS)[:, None])
    l_i = gl.sum(p, 1)

    # blocks [1, n_split) need no bounds mask, blocks [n_split, n_blocks) do; under a
    # key-vector mask, only the blocks from that of the first key it changes add it
    ctx = (q, smem, bars, zeros, qk_scale, row0, diag, seqlen_k, keys, g0)
    state = (p, m_i, l_i, acc)
    n_split = gl.maximum(n_full, 1)
    if KEYS:
        n_keys = keys[2] // BN
        n_plain = gl.maximum(gl.minimum(n_split, n_keys), 1)
        n_edge = gl.maximum(gl.minimum(n_blocks, n_keys), n_split)
        state = _steps(1, n_plain, state, ctx, c, CAUSAL, False, False, MASK_KIND)
        state = _steps(n_plain, n_split, state, ctx, c, CAUSAL, False, True, MASK_KIND)
        state = _steps(n_split, n_edge, state, ctx, c, CAUSAL, True, False, MASK_KIND)
        state = _steps(n_edge, n_blocks, state, ctx, c, CAUSAL, True, True, MASK_KIND)
    else:
        state = _steps(1, n_split, state, ctx, c, CAUSAL, False, False, MASK_KIND)
        state = _steps(n_split, n_blocks, state, ctx, c, CAUSAL, True, False, MASK_KIND)
    p, m_i, l_i, acc = state

    last = (g0 + n_blocks - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((g0 + n_blocks - 1) // STAGES) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout),
                        v_bufs.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(v_empty.index(last), count=1)
    # a row that saw no key (only under a mask) has l = 0 and acc = 0: output 0, lse -inf
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    acc = acc / gl.convert_layout(l_safe, o_rows)[:, None]
    rows = row0 + gl.arange(0, ROWS, layout=o_rows)
    if STORE_LSE:
        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
        lse = gl.convert_layout(lse, o_rows)
        gl.store(lse_ptr + b.to(gl.int64) * lse_sb + h.to(gl.int64) * lse_sh + rows, lse,
                 mask=rows < seqlen_q)
    if row0 + ROWS <= seqlen_q:
        # a whole tile: staged in its (now free) Q slot and stored by TMA
        q.store(acc.to(dtype))
        fence_async_shared()
        _tma_store(out_desc, [o_row + row0, o_col], q)
        tma.store_wait(0)
    else:
        # the last tile: a pointer store masked by row, since the rows past Sq belong to
        # another head or batch in the 2-D view the descriptor writes
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        base = out_ptr + b.to(gl.int64) * out_sb + h.to(gl.int64) * out_sh
        gl.store(base + rows.to(gl.int64)[:, None] * out_sm + cols[None, :], acc.to(dtype),
                 mask=(rows < seqlen_q)[:, None])
    # the Q slot is free: the loader may bring the next tile's Q
    mbarrier.arrive(q_empty.index(c), count=1)


# The partitions: warpgroup 0 runs as the default partition (the kernel's own 4 warps), the
# loader (``_loads``, 1 warp) and the other warpgroups as workers; each warpgroup needs a
# function of its own, since its index is a constexpr.
@gluon.jit
def _warpgroup0(ops, CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr, MASK_KIND: gl.constexpr):
    _consume(ops, 0, CAUSAL, STORE_LSE, MASK_KIND)


@gluon.jit
def _warpgroup1(ops, CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr, MASK_KIND: gl.constexpr):
    _consume(ops, 1, CAUSAL, STORE_LSE, MASK_KIND)


@gluon.jit
def _warpgroup2(ops, CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr, MASK_KIND: gl.constexpr):
    _consume(ops, 2, CAUSAL, STORE_LSE, MASK_KIND)


@gluon.jit
def _tile_blocks(tile, seqlen_q, seqlen_k, end, M: gl.constexpr, BN: gl.constexpr,
                 CAUSAL: gl.constexpr):
    """(first query row, key blocks) of query tile ``tile`` (M rows): the blocks up to its
    last row's causal diagonal, and up to ``end`` (one past the last key a mask lets
    through), at least one."""
    m0 = tile * M
    n_blocks = gl.cdiv(seqlen_k, BN)
    if CAUSAL:
        last_row = gl.minimum(m0 + M, seqlen_q) - 1
        n_blocks = gl.minimum(n_blocks, gl.cdiv(last_row + seqlen_k - seqlen_q + 1, BN))
    # at least one block: a tile whose keys are all hidden still runs its consumers (their
    # rows give 0)
    return m0, gl.maximum(gl.minimum(n_blocks, gl.cdiv(end, BN)), 1)


@gluon.jit
def attention_fwd_hopper(
    q_desc, k_desc, v_desc, out_desc, out_ptr, lse_ptr, mask_ptr, q_rb, q_rh, q_ch, kv_nb,
    kv_nh, kv_ch, o_rb, o_rh, o_ch, out_sb, out_sh, out_sm, lse_sb, lse_sh, mask_sb, mask_sh,
    mask_sn, n_tiles, order_group, H, GROUP, seqlen_q, seqlen_k, qk_scale,
    NC: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr,
    MASK_KIND: gl.constexpr, PAIRED: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):
    """Q is read through a 2-D tensor descriptor over its memory (blocks [64, D]): query row
    s of head (b, h) is descriptor row b * q_rb + h * q_rh + s at column h * q_ch. K and V
    through 3-D descriptors (blocks [1, BLOCK_N, D], one layout for both) whose second
    dimension ends at Sk, so that TMA reads zeros past the last key: key s of K/V head hk =
    h // GROUP is at [b * kv_nb + hk * kv_nh, s, hk * kv_ch]. out (B, H, Sq, D): whole
    64-row tiles through ``out_desc`` (blocks [64, D], rows b * o_rb + h * o_rh + s, column
    h * o_ch), the last partial tile through ``out_ptr`` with strides (out_sb, out_sh,
    out_sm, 1). lse (B, H, Sq) float32 with strides (lse_sb, lse_sh, 1) when STORE_LSE.
    With MASK_KIND, key s of (b, h) is masked by mask_ptr[b * mask_sb + h * mask_sh +
    s * mask_sn] (bool as uint8, or a float added to the scores).
    A head has n_tiles query tiles of 64 * NC rows. PAIRED: each program runs two of them,
    tile n_tiles - 1 - i, then tile i (the middle one alone when n_tiles is odd), so that
    causal programs all see about n_tiles + 1 key blocks and the second tile's first loads
    run under the first one's end; grid (cdiv(n_tiles, 2) * B * H,). Otherwise one tile per
    program, grid (n_tiles * B * H,). Both in ``common.tile_order``'s order with groups of
    ``order_group`` heads; kernel num_warps 4 (warpgroup 0); the workers get CONSUMER_REGS
    registers per thread (the loader 24), warpgroup 0 what the kernel's maxnreg leaves."""
    BN: gl.constexpr = k_desc.block_type.shape[1]
    D: gl.constexpr = k_desc.block_type.shape[2]
    M: gl.constexpr = NC * ROWS
    dtype: gl.constexpr = q_desc.dtype
    if PAIRED:
        n_pairs = (n_tiles + 1) // 2
        pair, bh = tile_order(n_pairs, order_group)
        lo = n_pairs - 1 - pair  # the first programs run the pairs (n_tiles - 1, 0), ...
        hi = n_tiles - 1 - lo
        n_run = gl.where(lo < hi, 2, 1)
    else:
        hi, bh = tile_order(n_tiles, order_group)
        lo = hi
        n_run = 1
    b = bh // H
    h = bh % H
    mask_base = mask_ptr + b.to(gl.int64) * mask_sb + h.to(gl.int64) * mask_sh
    first = seqlen_k  # the first key the mask changes
    end = seqlen_k  # one past the last key it lets through
    if MASK_KIND != MASK_NONE:
        # scanned once, over the keys of the longer tile (the first)
        _, n_scan = _tile_blocks(hi, seqlen_q, seqlen_k, end, M, BN, CAUSAL)
        first, end = _mask_bounds(mask_base, mask_sn, gl.minimum(n_scan * BN, seqlen_k),
                                  MASK_KIND)
    tiles = (_tile_blocks(hi, seqlen_q, seqlen_k, end, M, BN, CAUSAL),
             _tile_blocks(lo, seqlen_q, seqlen_k, end, M, BN, CAUSAL), n_run)

    q_bufs = gl.allocate_shared_memory(dtype, [NC, ROWS, D], q_desc.layout)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], dtype)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BN, D], kv_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BN, D], kv_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NC)  # every consumer releases every block
        mbarrier.init(v_empty.index(i), count=NC)
    for i in gl.static_range(NC):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)

    hk = h // GROUP
    coords = (b, h, b * q_rb + h * q_rh, h * q_ch, b * kv_nb + hk * kv_nh, hk * kv_ch,
              b * o_rb + h * o_rh, h * o_ch)
    scalars = (qk_scale, seqlen_q, seqlen_k, out_sb, out_sh, out_sm, lse_sb, lse_sh)
    smem = (q_bufs, k_bufs, v_bufs)
    bars = (q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn)
    # Constexprs reach the partitions only through a tuple built in the call: a tuple
    # assigned to a variable holds them as tensors, and the partitions would branch at run
    # time. Each partition takes its own arguments.
    ops = (q_desc, k_desc, smem, bars, coords, tiles, scalars, (out_ptr, out_desc), lse_ptr,
           (mask_base, mask_sn, first))
    loads = (q_desc, k_desc, v_desc, smem, bars, coords, tiles)
    if NC == 2:
        gl.warp_specialize([(_warpgroup0, (ops, CAUSAL, STORE_LSE, MASK_KIND)),
                            (_loads, loads),
                            (_warpgroup1, (ops, CAUSAL, STORE_LSE, MASK_KIND))],
                           [1, 4], [24, CONSUMER_REGS])
    else:
        gl.static_assert(NC == 3, "two or three consumer warpgroups")
        gl.warp_specialize([(_warpgroup0, (ops, CAUSAL, STORE_LSE, MASK_KIND)),
                            (_loads, loads),
                            (_warpgroup1, (ops, CAUSAL, STORE_LSE, MASK_KIND)),
                            (_warpgroup2, (ops, CAUSAL, STORE_LSE, MASK_KIND))],
                           [1, 4, 4], [24, CONSUMER_REGS, CONSUMER_REGS])
