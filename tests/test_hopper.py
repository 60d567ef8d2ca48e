"""The warp-specialised Hopper kernel (kernels/_triton/hopper.py): its 2-D and 3-D views of
the inputs (CPU), and on an sm_90 GPU its results, the calls it takes and the ones it leaves
to V2."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels import _launch, _plan, flash_attention, flash_attention_v2
from tests.reference import assert_lse_matches, assert_matches, reference_attention
from tests.test_kernels import spy_calls

F16, BF16 = torch.float16, torch.bfloat16


def _through_view(t: torch.Tensor, view: _launch.RowView) -> torch.Tensor:
    """Rebuild ``t`` (B, H, S, D) by reading its storage as ``view`` says."""
    B, H, S, D = t.shape
    matrix = torch.as_strided(t, (view.rows, view.cols), (view.stride, 1),
                              t.storage_offset())
    out = torch.empty_like(t)
    for b in range(B):
        for h in range(H):
            row = b * view.per_batch + h * view.per_head
            col = h * view.head_col
            out[b, h] = matrix[row:row + S, col:col + D]
    return out


@pytest.mark.parametrize("kind", ["bhsd", "bshd", "packed_qkv", "one_head"])
def test_row_view_reads_every_element(kind):
    B, H, S, D = 2, 3, 5, 16
    if kind == "bhsd":
        t = torch.randn(B, H, S, D)
    elif kind == "bshd":
        t = torch.randn(B, S, H, D).transpose(1, 2)
    elif kind == "packed_qkv":  # the modules' in-projection, (B, S, 3, H, D)
        t = torch.randn(B, S, 3, H, D)[:, :, 1].transpose(1, 2)
    else:
        t = torch.randn(B, S, 1, D).transpose(1, 2)
    view = _launch.row_view(t)
    assert view is not None
    assert torch.equal(_through_view(t, view), t)


def _through_key_view(t: torch.Tensor, view: _launch.KeyView) -> torch.Tensor:
    """Rebuild ``t`` (B, H, S, D) by reading its storage as the 3-D ``view`` says."""
    B, H, S, D = t.shape
    keys = torch.as_strided(t, (view.n, S, view.cols), (view.n_stride, view.stride, 1),
                            t.storage_offset())
    out = torch.empty_like(t)
    for b in range(B):
        for h in range(H):
            col = h * view.head_col
            out[b, h] = keys[b * view.per_batch + h * view.per_head, :, col:col + D]
    return out


@pytest.mark.parametrize("kind", ["bhsd", "bshd", "packed_kv", "one_head", "cache_slice",
                                  "one_batch_of_a_wider_cache"])
def test_key_view_reads_every_element(kind):
    """K/V as the kernel's 3-D descriptors read them: the S dimension is the view's own (a
    cache sliced along S ends at the slice, not at the cache's end)."""
    B, H, S, D = 2, 3, 5, 16
    if kind == "bhsd":
        t = torch.randn(B, H, S, D)
    elif kind == "bshd":
        t = torch.randn(B, S, H, D).transpose(1, 2)
    elif kind == "packed_kv":  # the modules' projections, (B, S, 2, H, D)
        t = torch.randn(B, S, 2, H, D)[:, :, 1].transpose(1, 2)
    elif kind == "one_head":
        t = torch.randn(B, S, 1, D).transpose(1, 2)
    elif kind == "cache_slice":  # a static cache of 9 slots, 5 written
        t = torch.randn(B, H, 9, D)[:, :, :S]
    else:  # heads 1..3 of a 5-head cache, one batch: heads at a uniform distance
        t = torch.randn(1, 5, S, D)[:, 1:4]
    view = _launch.key_view(t)
    assert view is not None
    assert torch.equal(_through_key_view(t, view), t)


@pytest.mark.parametrize("kind", ["heads_of_a_wider_cache", "expanded_batch"])
def test_key_view_refuses_heads_without_one_distance(kind):
    """Rows-mode heads whose batches are not H heads apart, and batches at one address, have
    no 3-D form of one n per (b, h)."""
    if kind == "heads_of_a_wider_cache":
        t = torch.randn(2, 5, 8, 16)[:, 1:4]
    else:
        t = torch.randn(1, 8, 3, 16).transpose(1, 2).expand(2, 3, 8, 16)
    assert _launch.row_view(t) is not None and _launch.key_view(t) is None


@pytest.mark.parametrize("kind", ["d_strided", "row_misaligned", "heads_interleaved"])
def test_row_view_refuses_what_tma_cannot_read(kind):
    if kind == "d_strided":
        t = torch.randn(1, 2, 8, 32)[..., ::2]
    elif kind == "row_misaligned":  # rows of 20 fp16 elements: 40 bytes apart
        t = torch.randn(1, 2, 8, 20, dtype=F16)[..., :16]
    else:  # heads 8 elements apart with 16 each: neither rows nor columns of their own
        t = torch.randn(256).as_strided((1, 2, 8, 16), (256, 8, 32, 1))
    assert _launch.row_view(t) is None


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "bhsd_in_bshd_out"])
@pytest.mark.parametrize("mask_kind", [_launch.MASK_NONE, _launch.MASK_BOOL, _launch.MASK_FLOAT])
def test_hopper_launch_addresses_every_head(monkeypatch, layout, mask_kind):
    """The launch arguments, read back the way the kernel reads them: each (b, h)'s Q, K/V
    (head h // group) and output rows through the descriptors and their per-head
    coordinates, the pointer strides of the last tile and of lse, and each (b, h)'s key
    vector of a mask (bool read as bytes; one vector per batch entry, or per head)."""
    from types import SimpleNamespace

    from kernels import _runtime

    launches = []
    monkeypatch.setattr(_runtime, "kernel_module",
                        lambda name, device: SimpleNamespace(attention_fwd_hopper=name))
    monkeypatch.setattr(_runtime, "launch", lambda *call: launches.append(call))
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 200, 250, 128
    if layout != "bshd":  # the Hugging Face patcher's call: BHSD in, BSHD out
        q, out = torch.randn(B, H, Sq, D, dtype=F16), torch.empty(B, H, Sq, D, dtype=F16)
        k, v = (torch.randn(B, Hkv, Sk, D, dtype=F16) for _ in range(2))
        if layout == "bhsd_in_bshd_out":
            out = torch.empty(B, Sq, H, D, dtype=F16).transpose(1, 2)
    else:
        q = torch.randn(B, Sq, H, D, dtype=F16).transpose(1, 2)
        out = torch.empty(B, Sq, H, D, dtype=F16).transpose(1, 2)
        kv = torch.randn(B, Sk, 2, Hkv, D, dtype=F16)  # packed, as the modules' projections
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    lse = torch.empty(B, H, Sq)
    mask = None
    if mask_kind == _launch.MASK_BOOL:
        mask = torch.rand(B, 1, 1, Sk) < 0.5
    elif mask_kind == _launch.MASK_FLOAT:
        mask = torch.randn(B, H, 1, Sk, dtype=F16)
    view = None if mask is None else mask.expand(B, H, Sq, Sk)
    _launch.forward_hopper(q, k, v, out, lse, _args(True, attn_mask=view))
    (kernel, grid, device, call_args, constexprs, warps, stages, maxnreg), = launches
    (q_desc, k_desc, v_desc, o_desc, out_ptr, lse_ptr, mask_ptr, q_rb, q_rh, q_ch, kv_nb,
     kv_nh, kv_ch, o_rb, o_rh, o_ch, out_sb, out_sh, out_sm, lse_sb, lse_sh, mask_sb, mask_sh,
     mask_sn, n_tiles, order, heads, group, seqlen_q, seqlen_k, _) = call_args
    # two query tiles of 128 rows per head: one program runs both without a mask
    per_head = 1 if mask is None else 2
    assert kernel == "hopper" and grid == (per_head * B * H,) and (warps, maxnreg) == (4, 168)
    assert n_tiles == 2 and order == _launch._order_group(q.device, True, B * H, H // Hkv, Sq,
                                                          Sk, D, 2)
    assert constexprs["CAUSAL"] and constexprs["STORE_LSE"]
    assert constexprs["PAIRED"] == (mask is None)
    assert constexprs["MASK_KIND"] == mask_kind
    if mask is not None:
        for b in range(B):
            for h in range(H):
                vector = torch.as_strided(mask_ptr, (Sk,), (mask_sn,),
                                        mask_ptr.storage_offset() + b * mask_sb + h * mask_sh)
                assert torch.equal(vector, view[b, h, 0].view(mask_ptr.dtype))
    assert (heads, group, seqlen_q, seqlen_k) == (H, H // Hkv, Sq, Sk)
    assert out_ptr is out and lse_ptr is lse
    assert (out_sb, out_sh, out_sm) == out.stride()[:3] and (lse_sb, lse_sh) == lse.stride()[:2]
    assert q_desc.block_shape == [64, D] and k_desc.block_shape == [1, 128, D]
    assert k_desc.shape[1] == v_desc.shape[1] == Sk  # TMA reads zeros past the last key

    def rows(desc, row, col, n):
        matrix = torch.as_strided(desc.base, desc.shape, desc.strides,
                                  desc.base.storage_offset())
        return matrix[row:row + n, col:col + D]

    def keys(desc, n, col):
        tensor = torch.as_strided(desc.base, desc.shape, desc.strides,
                                  desc.base.storage_offset())
        return tensor[n, :, col:col + D]

    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            assert torch.equal(rows(q_desc, b * q_rb + h * q_rh, h * q_ch, Sq), q[b, h])
            assert torch.equal(keys(k_desc, b * kv_nb + hk * kv_nh, hk * kv_ch), k[b, hk])
            assert torch.equal(keys(v_desc, b * kv_nb + hk * kv_nh, hk * kv_ch), v[b, hk])
            out[b, h] = torch.randn(Sq, D, dtype=F16)  # fresh values at this head only
            assert torch.equal(rows(o_desc, b * o_rb + h * o_rh, h * o_ch, Sq), out[b, h])


@pytest.mark.parametrize("consumers", [2, 3])
def test_hopper_registers_fill_the_file(consumers):
    """Each consumer's share, the loader's 24 and warpgroup 0's remainder (at least a share)
    fit in the 64K registers of a multiprocessor."""
    share, maxnreg = _launch.HopperConfig(64, 2, consumers).registers()
    warpgroups = consumers + 1
    assert maxnreg * warpgroups * 128 <= 65536 and share % 8 == 0
    assert maxnreg * warpgroups - 24 - (consumers - 1) * share >= share


def _args(causal=False, **changes) -> _launch.ScoreArgs:
    fields = dict(sm_scale=128 ** -0.5, causal=causal, window_left=-1,
                  window_right=0 if causal else -1, softcap=0.0, attn_mask=None,
                  alibi_slopes=None)
    return _launch.ScoreArgs(**{**fields, **changes})


def _bhsd(B, H, S, D=128, dtype=F16):
    return torch.empty(B, H, S, D, dtype=dtype)


def _rule_cases():
    q, kv = _bhsd(1, 16, 4096), _bhsd(1, 16, 4096)
    gqa_q, gqa_kv = _bhsd(1, 32, 2048), _bhsd(1, 8, 4096)
    bshd = torch.empty(1, 4096, 16, 128, dtype=F16).transpose(1, 2)
    kv2, wide = _bhsd(2, 16, 4096), _bhsd(2, 16, 4096)
    yes = {
        "plain": ((9, 0), q, kv, kv, _args()),
        "bf16 causal": ((9, 0), q.bfloat16(), kv.bfloat16(), kv.bfloat16(), _args(True)),
        "gqa causal Sq<Sk": ((9, 0), gqa_q, gqa_kv, gqa_kv, _args(True)),
        "bshd views": ((9, 0), bshd, bshd, bshd, _args()),
        "head_dim 256, Sk 4000": ((9, 0), _bhsd(2, 16, 4096, 256), _bhsd(2, 16, 4000, 256),
                                  _bhsd(2, 16, 4000, 256), _args()),
        "cache slice, Sk 4000": ((9, 0), _bhsd(2, 16, 4096), kv2[:, :, :4000],
                                 kv2[:, :, :4000], _args()),
        "key padding mask": ((9, 0), q, kv, kv, _args(
            attn_mask=torch.ones(1, 1, 1, 4096, dtype=torch.bool).expand(1, 16, 4096, 4096))),
        "float key mask per head, causal": ((9, 0), q, kv, kv, _args(
            True, attn_mask=torch.zeros(1, 16, 1, 4096).expand(1, 16, 4096, 4096))),
    }
    no = {
        "sm80": ((8, 0), q, kv, kv, _args()),
        "sm100": ((10, 0), q, kv, kv, _args()),
        "float32": ((9, 0), q.float(), kv.float(), kv.float(), _args()),
        "head_dim 64": ((9, 0), _bhsd(1, 16, 4096, 64), _bhsd(1, 16, 4096, 64),
                        _bhsd(1, 16, 4096, 64), _args()),
        "mask with a row per query": ((9, 0), q, kv, kv, _args(
            attn_mask=torch.ones(4096, 4096, dtype=torch.bool).expand(1, 16, 4096, 4096))),
        "alibi": ((9, 0), q, kv, kv, _args(alibi_slopes=torch.ones(1, 16))),
        "softcap": ((9, 0), q, kv, kv, _args(softcap=30.0)),
        "window": ((9, 0), q, kv, kv, _args(window_left=256)),
        "causal Sq>Sk": ((9, 0), gqa_kv.repeat(1, 4, 1, 1), gqa_q[:, :8], gqa_q[:, :8],
                         _args(True)),
        "head_dim 96": ((9, 0), _bhsd(1, 16, 4096, 96), _bhsd(1, 16, 4096, 96),
                        _bhsd(1, 16, 4096, 96), _args()),
        "kv heads of a wider cache": ((9, 0), _bhsd(2, 8, 4096), wide[:, 4:12], wide[:, 4:12],
                                      _args()),
        "small call": ((9, 0), _bhsd(1, 1, 256), _bhsd(1, 1, 256), _bhsd(1, 1, 256), _args()),
        "k and v laid out apart": ((9, 0), q, kv, bshd, _args()),
        "strided head_dim": ((9, 0), q, kv, torch.empty(1, 16, 4096, 256, dtype=F16)[..., ::2],
                             _args()),
    }
    return [(name, case, True) for name, case in yes.items()] + [
        (name, case, False) for name, case in no.items()]


@pytest.mark.parametrize("name,case,expected", _rule_cases(), ids=lambda x: x
                         if isinstance(x, str) else "")
def test_hopper_rule(name, case, expected):
    capability, q, k, v, args = case
    assert _launch.hopper_covers(capability, q, k, v, args) is expected


def test_hopper_rule_needs_keys(monkeypatch):
    """With the size bound out of the way (the GPU tests lower it), an empty K/V is still
    refused: the consumers would wait for a first key block forever."""
    monkeypatch.setattr(_launch, "_HOPPER_MIN_WORK", 0)
    q, kv = _bhsd(1, 2, 128), _bhsd(1, 2, 128)
    assert _launch.hopper_covers((9, 0), q, kv, kv, _args())
    assert not _launch.hopper_covers((9, 0), q, kv[:, :, :0], kv[:, :, :0], _args())


@pytest.mark.parametrize("head_dim", [128, 256])
def test_hopper_size_bound(head_dim):
    """The kernel takes calls from ``_HOPPER_MIN_WORK`` (B*H*Sq*Sk*D) on; smaller ones are
    host-bound and run V2, whose launch costs less host time than four descriptors."""
    sk = _launch._HOPPER_MIN_WORK // (16 * 1024 * head_dim)
    q = _bhsd(1, 16, 1024, head_dim)
    kv, small = _bhsd(1, 16, sk, head_dim), _bhsd(1, 16, sk - 1, head_dim)
    assert _launch.hopper_covers((9, 0), q, kv, kv, _args())
    assert not _launch.hopper_covers((9, 0), q, small, small, _args())


def test_hopper_kernel_only_on_cuda():
    q = torch.randn(1, 2, 128, 128, dtype=F16)
    args = _launch.ScoreArgs(128 ** -0.5, False, -1, -1, 0.0, None, None)
    assert not _launch.hopper_ok(q, q, q, q, args)


def _hopper_gpu() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and _launch._runtime.GluonDescriptor is not None)


needs_hopper = pytest.mark.skipif(not _hopper_gpu(), reason="needs an sm_90 GPU and Gluon")


def _attend(case: tuple, dtype: torch.dtype, head_dim: int, device: torch.device,
            attn_mask_of=None) -> tuple[torch.Tensor, ...]:
    """Fresh q, k, v for ``case`` (batch, heads, kv heads, Sq, Sk, causal, layout, ...) in its
    layout, attended by ``flash_attention`` (BHSD, variant "auto") or ``flash_attention_v2``
    (BSHD), with the mask ``attn_mask_of(batch, Sk)`` if given: (out, lse, the reference's
    out, the reference's lse)."""
    B, H, Hkv, Sq, Sk, causal, layout = case[:7]
    shape_q = (B, H, Sq, head_dim) if layout == "bhsd" else (B, Sq, H, head_dim)
    shape_k = (B, Hkv, Sk, head_dim) if layout == "bhsd" else (B, Sk, Hkv, head_dim)
    q = torch.randn(shape_q, device=device, dtype=dtype)
    k, v = (torch.randn(shape_k, device=device, dtype=dtype) for _ in range(2))
    mask = None if attn_mask_of is None else attn_mask_of(B, Sk)
    if layout == "bhsd":
        out, lse = flash_attention(q, k, v, causal=causal, variant="auto", attn_mask=mask,
                                   return_lse=True)
    else:
        out, lse = flash_attention_v2(q, k, v, causal=causal, attn_mask=mask, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, layout=layout, causal=causal, attn_mask=mask)
    return out, lse, ref, ref_lse


CASES = [  # batch, heads, kv heads, Sq, Sk, causal, layout
    (2, 4, 4, 256, 256, False, "bhsd"),
    (2, 4, 4, 256, 256, True, "bhsd"),
    (1, 8, 2, 1000, 1024, True, "bhsd"),
    (2, 3, 3, 129, 384, False, "bshd"),
    (2, 4, 1, 333, 640, True, "bshd"),
    (1, 2, 2, 17, 128, False, "bhsd"),
    (1, 2, 2, 64, 128, False, "bshd"),
    # keys that end inside a block: TMA's zeros past Sk, masked (not causal) or past every
    # row's diagonal (causal)
    (2, 4, 4, 256, 200, False, "bhsd"),
    (1, 8, 2, 1000, 1037, True, "bhsd"),
    (2, 3, 3, 129, 383, False, "bshd"),
    (2, 2, 2, 300, 300, True, "bhsd"),
    (1, 2, 2, 1, 77, False, "bshd"),
]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_hopper_kernel_matches_reference(monkeypatch, gpu_device, case, dtype, head_dim):
    taken = spy_calls(monkeypatch, _launch, ("forward_hopper", "forward_v2"))
    Sq = case[3]
    out, lse, ref, ref_lse = _attend(case, dtype, head_dim, gpu_device)
    # up to FAMILY_MAX_Q query rows, a first call also records a dry probe of its
    # growing-cache family (kernels._plan): the launcher runs twice, the kernel once
    assert taken == ["forward_hopper"] * (2 if Sq <= _plan.FAMILY_MAX_Q else 1)
    assert_matches(out, ref, 2e-3 if dtype == F16 else 1e-2)
    assert_lse_matches(lse, ref_lse)


@pytest.mark.gpu
@needs_hopper
def test_gpu_hopper_kernel_writes_every_row(gpu_device):
    """Direct launch into a NaN-filled output: every row below Sq written, lse too."""
    q = torch.randn(2, 4, 200, 128, device=gpu_device, dtype=F16)
    k, v = (torch.randn(2, 2, 256, 128, device=gpu_device, dtype=F16) for _ in range(2))
    args = _launch.ScoreArgs(128 ** -0.5, True, -1, 0, 0.0, None, None)
    assert _launch.hopper_ok(q, k, v, q, args)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, 4, 200), float("nan"), device=gpu_device)
    _launch.forward_hopper(q, k, v, out, lse, args)
    ref, ref_lse = reference_attention(q, k, v, causal=True)
    assert_matches(out, ref, 2e-3)
    assert_lse_matches(lse, ref_lse)


@pytest.mark.gpu
@needs_hopper
def test_gpu_hopper_kernel_leaves_the_rest_to_v2(monkeypatch, gpu_device):
    """A KV cache sliced along S takes the Hopper kernel whether or not the slice ends on a
    block edge, and its unwritten slots (NaN here) stay unread; head_dim 64, a mask with a row
    per query, Sq > Sk causal: V2."""
    taken = spy_calls(monkeypatch, _launch, ("forward_hopper", "forward_v2"))
    cache = torch.full((2, 4, 512, 128), float("nan"), device=gpu_device, dtype=F16)
    q = torch.randn(2, 4, 64, 128, device=gpu_device, dtype=F16)
    for Sk in (200, 256, 1):
        keys = torch.randn(2, 4, Sk, 128, device=gpu_device, dtype=F16)
        cache[:, :, :Sk] = keys
        k, v = cache[:, :, :Sk], cache[:, :, :Sk]
        taken.clear()
        out = flash_attention(q, k, v, variant="auto")
        assert taken == ["forward_hopper"]
        assert not out.isnan().any()
        assert_matches(out, reference_attention(q, k, v)[0], 2e-3)
        cache[:, :, :Sk] = float("nan")
    q64 = torch.randn(1, 4, 256, 64, device=gpu_device, dtype=F16)
    taken.clear()
    flash_attention(q64, q64, q64, variant="auto")
    q128 = torch.randn(1, 4, 256, 128, device=gpu_device, dtype=F16)
    flash_attention(q128, q128, q128, variant="auto",
                    attn_mask=torch.ones(256, 256, dtype=torch.bool, device=gpu_device))
    flash_attention(q128, q128[:, :, :128], q128[:, :, :128], variant="auto", causal=True)
    assert taken == ["forward_v2"] * 3


def _key_mask(pattern: str, batch: int, heads: int, seqlen_k: int, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """A key-vector mask (batch, heads, 1, Sk) (heads 1: shared by every head) in ``dtype``
    (bool: True = take part; floating: added, -inf hides). The last batch entry hides every
    key, the others as ``pattern`` says: "right" keeps a prefix of each row (padding at the
    end, lengths off the block edges), "left" hides a prefix (left padding: early query rows
    of a causal call see no key for a while), "random" hides keys anywhere."""
    keys = torch.arange(seqlen_k, device=device)
    rows = []
    for b in range(batch * heads):
        if b // heads == batch - 1:
            keep = torch.zeros(seqlen_k, dtype=torch.bool, device=device)
        elif pattern == "right":
            keep = keys < seqlen_k - 77 * (b % 3)
        elif pattern == "left":
            keep = keys >= 131 * (b % 3 + 1)
        else:
            keep = torch.rand(seqlen_k, device=device) < 0.7
        rows.append(keep)
    keep = torch.stack(rows).view(batch, heads, 1, seqlen_k)
    if dtype == torch.bool:
        return keep
    bias = torch.randn(keep.shape, device=device).clamp(-2, 2).to(dtype)
    return bias.masked_fill(~keep, float("-inf"))


MASK_CASES = [  # batch, heads, kv heads, Sq, Sk, causal, layout, pattern, mask heads, mask dtype
    (3, 4, 4, 256, 256, False, "bhsd", "right", 1, torch.bool),
    (3, 4, 4, 300, 300, True, "bhsd", "right", 1, torch.bool),
    (3, 4, 2, 384, 640, True, "bshd", "left", 1, torch.bool),
    (3, 4, 4, 129, 383, False, "bshd", "left", 4, torch.bool),
    (3, 8, 2, 1000, 1037, True, "bhsd", "random", 8, torch.bool),
    (3, 4, 4, 256, 700, False, "bhsd", "random", 1, torch.float32),
    (3, 4, 1, 333, 640, True, "bshd", "right", 4, None),  # float mask in the inputs' dtype
]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_hopper_kernel_key_masks(monkeypatch, gpu_device, case, dtype, head_dim):
    """Key-vector masks (key padding) run the Hopper kernel and match the reference: padding
    on either side, random holes, per-head masks, float masks, with causal and GQA; the batch
    entry whose keys are all hidden gives 0 and lse -inf."""
    pattern, mask_heads, mask_dtype = case[7:]
    taken = spy_calls(monkeypatch, _launch, ("forward_hopper", "forward_v2"))
    out, lse, ref, ref_lse = _attend(
        case, dtype, head_dim, gpu_device, lambda batch, seqlen_k: _key_mask(
            pattern, batch, mask_heads, seqlen_k, gpu_device, mask_dtype or dtype))
    assert taken == ["forward_hopper"]
    assert not out.isnan().any()
    assert_matches(out, ref, 2e-3 if dtype == F16 else 1e-2)
    assert_lse_matches(lse, ref_lse)
    assert (out[-1] == 0).all() and (lse[-1] == float("-inf")).all()


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("head_dim", [128, 256])
def test_gpu_hopper_kernel_key_mask_writes_every_row(gpu_device, head_dim):
    """Direct launch with a left-padded key mask into NaN-filled out and lse: rows that see
    no key (causal, before their first kept key) are written as 0 and -inf, the rest match."""
    q = torch.randn(2, 4, 200, head_dim, device=gpu_device, dtype=F16)
    k, v = (torch.randn(2, 2, 256, head_dim, device=gpu_device, dtype=F16) for _ in range(2))
    keep = torch.arange(256, device=gpu_device) >= torch.tensor([[90], [170]],
                                                                 device=gpu_device)
    mask = keep.view(2, 1, 1, 256)
    args = _launch.ScoreArgs(head_dim ** -0.5, True, -1, 0, 0.0, mask.expand(2, 4, 200, 256),
                             None)
    assert _launch.hopper_ok(q, k, v, q, args)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, 4, 200), float("nan"), device=gpu_device)
    _launch.forward_hopper(q, k, v, out, lse, args)
    ref, ref_lse = reference_attention(q, k, v, causal=True, attn_mask=mask)
    assert_matches(out, ref, 2e-3)
    assert_lse_matches(lse, ref_lse)
    # with Sk - Sq = 56, row i sees keys up to i + 56: rows below 34 (batch 0) and 114
    # (batch 1) see none
    assert (out[0, :, :34] == 0).all() and (out[1, :, :114] == 0).all()
    assert (lse[0, :, :34] == float("-inf")).all() and (lse[0, :, 34:] > float("-inf")).all()
    assert (lse[1, :, :114] == float("-inf")).all() and (lse[1, :, 114:] > float("-inf")).all()


@pytest.mark.parametrize("head_dim, causal, masked, n_tiles, expected", [
    (128, True, False, 1, True),
    (128, True, False, _launch._PAIRED_MAX_TILES, True),
    (128, True, False, _launch._PAIRED_MAX_TILES + 1, False),
    (128, False, False, 16, False),
    (128, True, True, 16, False),
    (256, True, False, 16, False),
])
def test_paired_tiles_rule(head_dim, causal, masked, n_tiles, expected):
    """Two query tiles per program only where they were measured faster: head_dim 128,
    causal, no mask, up to 8k query rows."""
    cfg = _launch.HOPPER_CONFIGS[head_dim]
    assert _launch.paired_tiles(cfg, causal, masked, n_tiles) is expected


def _hopper_signature(fn, dtype: str, head_dim: int, block_n: int, mask_type: str) -> dict:
    """The Hopper kernel's argument types for ``triton.compile``: descriptors of Q/out
    (blocks [64, D]) and K/V ([1, BN, D]) with their shared-memory layouts, pointers, scalars;
    constexprs left to the caller."""
    from triton.experimental.gluon import language as gl

    element = gl.float16 if dtype == "fp16" else gl.bfloat16

    def descriptor(block: list[int]) -> str:
        layout = gl.NVMMASharedLayout.get_default_for(block, element)
        return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{layout!r}>"

    types = {"q_desc": descriptor([64, head_dim]), "out_desc": descriptor([64, head_dim]),
             "k_desc": descriptor([1, block_n, head_dim]),
             "v_desc": descriptor([1, block_n, head_dim]),
             "out_ptr": f"*{dtype}", "lse_ptr": "*fp32", "mask_ptr": mask_type,
             "qk_scale": "fp32"}
    return {name: "constexpr" if param.is_constexpr else types.get(name, "i32")
            for name, param in zip(fn.arg_names, fn.params, strict=True)}


@pytest.mark.parametrize("dtype, head_dim, causal, mask_kind, mask_type, store_lse", [
    ("fp16", 128, False, _launch.MASK_NONE, "*fp16", True),
    ("bf16", 128, True, _launch.MASK_BOOL, "*u8", False),
    ("fp16", 256, True, _launch.MASK_FLOAT, "*fp32", True),
])
def test_hopper_kernel_compiles_for_sm90(dtype, head_dim, causal, mask_kind, mask_type,
                                          store_lse, tmp_path, monkeypatch):
    """The Gluon kernel compiles for an sm_90 target with the installed triton (no GPU needed:
    its TMA and shared-memory calls are renamed between triton releases), with the launcher's
    configuration and register split, with and without a key-vector mask."""
    triton = pytest.importorskip("triton")
    gluon_runtime = pytest.importorskip("triton.experimental.gluon._runtime")
    from triton.backends.compiler import GPUTarget

    from kernels import _runtime

    monkeypatch.setattr(triton.knobs.cache, "dir", str(tmp_path))
    fn = importlib.import_module("kernels._triton.hopper").attention_fwd_hopper
    cfg = _launch.HOPPER_CONFIGS[head_dim]
    consumer_regs, maxnreg = cfg.registers()
    constexprs = dict(NC=cfg.consumers, STAGES=cfg.num_stages, CAUSAL=causal,
                      STORE_LSE=store_lse, MASK_KIND=mask_kind, PAIRED=cfg.paired,
                      CONSUMER_REGS=consumer_regs)
    source = gluon_runtime.GluonASTSource(
        fn, _hopper_signature(fn, dtype, head_dim, cfg.block_n, mask_type), constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=_runtime._options(4, 1, maxnreg))
    assert len(compiled.asm["cubin"]) > 1000
    assert "attention_fwd_hopper" in compiled.asm["ptx"]
