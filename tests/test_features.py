"""Score features against the float64 reference: GQA/MQA, attention masks, sliding windows,
softcap, ALiBi, varlen, and gradients (autograd vs float64 autograd of the reference).

CPU tests run the real kernels through Triton's interpreter (16 x 16 tiles). The ``gpu``
tests at the end repeat every feature on CUDA in fp16, bf16 and fp32 (TF32 on and off), with
sequences up to 8k, for both variants.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import flash_attention, flash_attention_v2, flash_attention_varlen
from tests.reference import (
    TOLERANCE,
    assert_lse_matches,
    assert_matches,
    reference_attention,
    reference_varlen,
)
from tests.test_kernels import (
    APIS,
    BF16,
    DTYPE_NAME,
    F16,
    F32,
    _strided,
    call,
    check_call,
    layout_of,
    make_qkv,
    spy_calls,
)

NEG_INF = float("-inf")


def alibi_slopes(heads: int, batch: int | None = None, device="cpu") -> torch.Tensor:
    """The ALiBi paper's geometric slopes, (H,) or, per batch entry, scaled (B, H)."""
    base = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)],
                        device=device)
    if batch is None:
        return base
    return base[None] * torch.rand(batch, 1, device=device).add(0.5)


# ----------------------------------------------------------------------------- GQA / MQA

@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 1), (6, 3)],
                         ids=["gqa-4-2", "mqa-4-1", "gqa-6-3"])
def test_gqa_mqa(api, heads, kv_heads):
    causal = heads == 4 and kv_heads == 2
    dtype = {"v1": F16, "v2": BF16, "bshd": F32}[api]
    q, k, v = make_qkv(1, heads, 33, 20, 40, dtype=dtype, layout=layout_of(api),
                       kv_heads=kv_heads)
    out, _, ref, _ = check_call(api, q, k, v, causal=causal)
    # Sanity of the test itself: with distinct K/V heads, heads of one group differ from
    # heads of another group.
    if kv_heads > 1:
        h_axis = 2 if api == "bshd" else 1
        first, last = out.select(h_axis, 0), out.select(h_axis, heads - 1)
        assert not torch.allclose(first.float(), last.float())


@pytest.mark.parametrize("api", APIS)
def test_gqa_heads_not_a_multiple(api):
    q, k, v = make_qkv(1, 4, 8, 8, 16, layout=layout_of(api), kv_heads=3)
    with pytest.raises(ValueError, match=r"q's heads \(4\) must be a multiple of k/v's heads "
                                         r"\(3\)"):
        call(api, q, k, v)


# ----------------------------------------------------------------------------- masks

B, H, SQ, SK = 2, 2, 20, 33
# Mask shapes that broadcast to (B, H, Sq, Sk), SDPA-style (aligned to the right).
MASK_SHAPES = {
    "SqSk": (SQ, SK),
    "B11Sk": (B, 1, 1, SK),
    "B1SqSk": (B, 1, SQ, SK),
    "1HSqSk": (1, H, SQ, SK),
    "HSqSk": (H, SQ, SK),
    "BHSqSk": (B, H, SQ, SK),
    "Sk": (SK,),
    "1Sk": (1, SK),
    "B1Sq1": (B, 1, SQ, 1),
}


def make_mask(shape, kind, dtype=torch.float32, empty_rows=True):
    """A random mask: bool (about 70% True) or float (N(0, 2) with about 15% -inf). With
    ``empty_rows`` and a query axis, one query row takes no key at all."""
    if kind == "bool":
        mask = torch.rand(shape) < 0.7
        if len(shape) >= 2 and shape[-2] > 3 and shape[-1] > 1 and empty_rows:
            mask[..., 3, :] = False
    else:
        mask = torch.randn(shape) * 2
        mask = mask.masked_fill(torch.rand(shape) < 0.15, NEG_INF)
        if len(shape) >= 2 and shape[-2] > 3 and shape[-1] > 1 and empty_rows:
            mask[..., 3, :] = NEG_INF
        mask = mask.to(dtype)
    return mask


def _mask_cases():
    cases = []
    for i, (name, shape) in enumerate(MASK_SHAPES.items()):
        for j, kind in enumerate(("bool", "float")):
            for a, api in enumerate(APIS):
                causal = (i + j + a) % 2 == 1
                cases.append(pytest.param(api, name, shape, kind, causal,
                                          id=f"{api}-{kind}-{name}-"
                                             f"{'causal' if causal else 'full'}"))
    return cases


@pytest.mark.parametrize("api, name, shape, kind, causal", _mask_cases())
def test_attn_mask_broadcast(api, name, shape, kind, causal):
    q, k, v = make_qkv(B, H, SQ, SK, 40, layout=layout_of(api))
    mask = make_mask(shape, kind)
    out, lse, ref, ref_lse = check_call(api, q, k, v, attn_mask=mask, causal=causal)
    if len(shape) >= 2 and shape[-2] == SQ and shape[-1] == SK:  # row 3 takes no key
        row = out[:, 3] if api == "bshd" else out[:, :, 3]
        assert torch.equal(row, torch.zeros_like(row))
        assert (lse[:, :, 3] == NEG_INF).all()
    assert torch.isfinite(lse).sum() > 0


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("dtype", [F16, BF16], ids=DTYPE_NAME.get)
def test_float_mask_dtypes(api, dtype):
    """Float masks in q's dtype, and in float64, are added as well as float32 ones."""
    q, k, v = make_qkv(B, H, SQ, SK, 48, dtype=dtype, layout=layout_of(api))
    check_call(api, q, k, v, attn_mask=make_mask((B, 1, SQ, SK), "float", dtype=dtype))
    check_call(api, q, k, v, attn_mask=make_mask((SQ, SK), "float", dtype=torch.float64),
               causal=True)


@pytest.mark.parametrize("api", APIS)
def test_mask_views(api):
    """A transposed (non-contiguous) mask, and an expanded one with stride 0 on the key axis."""
    q, k, v = make_qkv(B, H, SQ, SK, 32, layout=layout_of(api))
    mask = make_mask((B, H, SK, SQ), "float", empty_rows=False).transpose(-1, -2)
    assert not mask.is_contiguous()
    check_call(api, q, k, v, attn_mask=mask)
    mask = (torch.rand(B, 1, SQ, 1) < 0.8).expand(B, H, SQ, SK)
    assert mask.stride(-1) == 0
    check_call(api, q, k, v, attn_mask=mask, causal=True)


@pytest.mark.parametrize("api", APIS)
def test_fully_masked_batch(api):
    """A key-padding mask that removes every key of one batch entry: that entry's output is
    0 and its lse -inf, the other entry is unaffected, no NaN anywhere."""
    q, k, v = make_qkv(B, H, SQ, SK, 40, layout=layout_of(api))
    mask = torch.ones(B, 1, 1, SK, dtype=torch.bool)
    mask[0] = False
    mask[1, ..., 25:] = False
    out, lse, _, _ = check_call(api, q, k, v, attn_mask=mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert (lse[0] == NEG_INF).all() and torch.isfinite(lse[1]).all()


def padding_masks(kind: str, lengths: tuple[int, ...], sk: int, left: int, hole: int,
                  bias_at: int, dtype: torch.dtype = F32) -> torch.Tensor:
    """Key-vector masks (len(lengths) + 2, 1, 1, sk): right padding to each length, then one
    entry with its first ``left`` keys masked and one with a single masked key at ``hole``
    (float: plus a non-zero bias on 5 keys from ``bias_at``)."""
    keep = torch.ones(len(lengths) + 2, 1, 1, sk, dtype=torch.bool)
    for i, length in enumerate(lengths):
        keep[i, ..., length:] = False
    keep[-2, ..., :left] = False
    keep[-1, ..., hole] = False
    if kind == "bool":
        return keep
    mask = torch.zeros(keep.shape).masked_fill(~keep, NEG_INF)
    mask[-1, ..., bias_at:bias_at + 5] = torch.randn(5)
    return mask.to(dtype)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_padding_mask_skipped_before_first_masked_key(api, kind, causal):
    """Key-vector masks run mask-free on the key blocks before the first key they change and
    skip the blocks after the last key they let through (``mask_key_bounds``): right padding
    that ends inside a block, on a block edge (the CPU tiles are 16 keys), no padding, one
    key left, left padding, and a float bias that starts mid-sequence. Each row must still
    match the reference."""
    sk = 70
    mask = padding_masks(kind, (sk, 48, 37, 1), sk, left=20, hole=50, bias_at=40)
    q, k, v = make_qkv(mask.shape[0], H, 23, sk, 40, layout=layout_of(api))
    check_call(api, q, k, v, attn_mask=mask, causal=causal)


@pytest.mark.parametrize(("kind", "causal", "length"),
                         [("bool", True, 2048), ("float", False, 3000)])
def test_key_padding_mask_bounds_across_scan_steps(kind, causal, length):
    """``mask_key_bounds`` reads MASK_SCAN (2048) keys per step: right padding from a step
    edge or from inside the second step, left padding past the first step, a hole in the
    third step only. Few query rows so the interpreter stays quick."""
    sk = 2 * 2048 + 37
    mask = padding_masks(kind, (length,), sk, left=2100, hole=4120, bias_at=4096)
    q, k, v = make_qkv(mask.shape[0], 1, 2, sk, 16)
    check_call("v2", q, k, v, attn_mask=mask, causal=causal)


@pytest.mark.parametrize("api", APIS)
def test_mask_errors(api):
    q, k, v = make_qkv(B, H, SQ, SK, 16, layout=layout_of(api))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        call(api, q, k, v, attn_mask=torch.ones(SQ, SK, dtype=torch.int32))
    with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor"):
        call(api, q, k, v, attn_mask=[[True]])
    with pytest.raises(ValueError, match="does not broadcast"):
        call(api, q, k, v, attn_mask=torch.zeros(SQ + 1, SK))
    with pytest.raises(ValueError, match="does not broadcast"):
        call(api, q, k, v, attn_mask=torch.zeros(3, 1, SQ, SK))
    with pytest.raises(ValueError, match="at most 4 dims"):
        call(api, q, k, v, attn_mask=torch.zeros(1, B, H, SQ, SK))
    with pytest.raises(ValueError, match="attn_mask is on meta"):
        call(api, q, k, v, attn_mask=torch.zeros(SQ, SK, device="meta"))


@pytest.mark.parametrize("api", APIS)
def test_mask_requiring_grad(api):
    q, k, v = make_qkv(B, H, SQ, SK, 16, layout=layout_of(api))
    mask = torch.randn(SQ, SK, requires_grad=True)
    with pytest.raises(ValueError, match="attn_mask requires grad"):
        call(api, q, k, v, attn_mask=mask)
    with torch.no_grad():  # no gradient can be asked for: allowed
        out = call(api, q, k, v, attn_mask=mask)
    ref, _ = reference_attention(q, k, v, layout=layout_of(api), attn_mask=mask.detach())
    assert_matches(out, ref, TOLERANCE[F32])


# ----------------------------------------------------------------------------- windows

# (batch, heads, Sq, Sk, head_dim, window, causal). Windows narrower and wider than a tile,
# on both sides, with Sq = Sk, Sq < Sk and Sq > Sk (rows with no key when the window misses
# every key), and long rows where whole key blocks are skipped.
WINDOW_CASES = [
    ((2, 2, 33, 33, 40), (3, -1), False),
    ((2, 2, 33, 33, 40), (-1, 2), False),
    ((2, 2, 33, 33, 40), (4, 4), False),
    ((2, 2, 33, 33, 40), (0, 0), False),
    ((2, 2, 17, 40, 64), (16, 17), False),
    ((2, 2, 40, 17, 64), (5, 1), False),
    ((2, 2, 40, 17, 64), (-1, 3), False),
    ((2, 2, 17, 40, 24), (7, -1), True),
    ((2, 2, 40, 17, 24), (3, 5), True),  # causal: right becomes 0
    ((1, 1, 129, 129, 32), (20, 20), False),
    ((1, 1, 129, 129, 32), (15, -1), True),
    ((1, 1, 100, 129, 32), (-1, 16), False),
]


def _window_cases():
    cases = []
    for i, (shape, window, causal) in enumerate(WINDOW_CASES):
        b, h, sq, sk, d = shape
        apis = APIS if sq < 100 or i % 2 == 0 else ("v1", "v2")
        for api in apis:
            cases.append(pytest.param(api, shape, window, causal,
                                      id=f"{api}-Sq{sq}Sk{sk}D{d}-w{window[0]}_{window[1]}"
                                         f"{'-causal' if causal else ''}"))
    return cases


@pytest.mark.parametrize("api, shape, window, causal", _window_cases())
def test_window(api, shape, window, causal):
    b, h, sq, sk, d = shape
    dtype = F16 if sq == 33 else F32
    q, k, v = make_qkv(b, h, sq, sk, d, dtype=dtype, layout=layout_of(api))
    check_call(api, q, k, v, window_size=window, causal=causal)


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(40, 57), (57, 50)], ids=["diag17", "diag-7"])
def test_window_edges_sweep(variant, seqlen_q, seqlen_k):
    """Which key blocks a query block visits (and which it visits without bounds checks)
    depends on (Sk - Sq - left) and (Sk - Sq + right) modulo the 16-wide tiles: sweep left
    and right so that both take every residue."""
    q, k, v = make_qkv(1, 1, seqlen_q, seqlen_k, 16)
    for i in range(16):
        window = (i, (5 * i + 3) % 16)
        out, lse = flash_attention(q, k, v, variant=variant, window_size=window,
                                   return_lse=True)
        ref, ref_lse = reference_attention(q, k, v, window_size=window)
        assert_matches(out, ref, TOLERANCE[F32], what=f"window {window}")
        assert_lse_matches(lse, ref_lse)


def test_window_with_causal_equals_right_zero():
    """causal=True with window (left, right) is the window (left, 0)."""
    q, k, v = make_qkv(2, 2, 33, 40, 40)
    a = flash_attention(q, k, v, variant="v2", causal=True, window_size=(6, 9))
    b = flash_attention(q, k, v, variant="v2", window_size=(6, 0))
    ref, _ = reference_attention(q, k, v, window_size=(6, 0))
    assert_matches(a, ref, TOLERANCE[F32])
    assert_matches(b, ref, TOLERANCE[F32])


# ----------------------------------------------------------------------------- softcap, ALiBi

# A softcap far below the scores saturates tanh: exp2 overflows to inf in the interpreter's
# numpy (tanh is then exactly +-1), which numpy reports as a warning.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("softcap, causal", [(2.0, False), (30.0, True), (0.5, True)],
                         ids=["cap2", "cap30-causal", "cap0.5-causal"])
def test_softcap(api, softcap, causal):
    # Large scores so that tanh saturates: the capped and uncapped answers differ.
    q, k, v = make_qkv(2, 2, 20, 33, 40, layout=layout_of(api), scale=3.0)
    out, _, _, _ = check_call(api, q, k, v, softcap=softcap, causal=causal)
    if softcap <= 2.0:
        uncapped, _ = reference_attention(q, k, v, layout=layout_of(api), causal=causal)
        assert (out.double() - uncapped).abs().max() > 1e-2


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes-H", "slopes-BH"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi(api, per_batch, causal):
    b, h = 2, 2
    q, k, v = make_qkv(b, h, 17, 40, 32, layout=layout_of(api))
    slopes = alibi_slopes(h, b if per_batch else None)
    check_call(api, q, k, v, alibi_slopes=slopes, causal=causal)


@pytest.mark.parametrize("api", APIS)
def test_alibi_sq_greater_than_sk(api):
    q, k, v = make_qkv(2, 2, 40, 17, 32, layout=layout_of(api))
    check_call(api, q, k, v, alibi_slopes=torch.rand(2, 2) * 2, softmax_scale=0.3)


def test_alibi_errors():
    q, k, v = make_qkv(2, 4, 8, 8, 16)
    with pytest.raises(TypeError, match="alibi_slopes must be float32"):
        flash_attention(q, k, v, alibi_slopes=alibi_slopes(4).half())
    with pytest.raises(TypeError, match="alibi_slopes must be a torch.Tensor"):
        flash_attention(q, k, v, alibi_slopes=[0.5] * 4)
    for shape in [(5,), (2, 4, 1), (3, 4), (4, 2)]:
        with pytest.raises(ValueError, match="alibi_slopes must have shape"):
            flash_attention(q, k, v, alibi_slopes=torch.rand(shape))
    with pytest.raises(ValueError, match="alibi_slopes is on meta"):
        flash_attention(q, k, v, alibi_slopes=torch.empty(4, device="meta"))


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=DTYPE_NAME.get)
@pytest.mark.parametrize("api", APIS)
def test_every_feature_together(api, dtype):
    """GQA + float mask + causal + window + softcap + ALiBi (B, H) + custom scale."""
    b, h, hkv = 2, 4, 2
    q, k, v = make_qkv(b, h, 33, 40, 48, dtype=dtype, layout=layout_of(api), kv_heads=hkv,
                       scale=2.0)
    mask = make_mask((b, 1, 33, 40), "float")
    check_call(api, q, k, v, attn_mask=mask, causal=True, window_size=(12, 3), softcap=4.0,
               alibi_slopes=alibi_slopes(h, b), softmax_scale=0.2)


# ----------------------------------------------------------------------------- varlen

def _pack(lengths, heads, head_dim, dtype):
    total = sum(lengths)
    return (torch.randn(total, heads, head_dim) * 1.0).to(dtype)


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


# (lengths_q, lengths_k, heads, kv_heads, options); Sq != Sk per sequence, empty sequences.
VARLEN_CASES = {
    "plain": ([5, 17, 1, 33], [9, 17, 40, 20], 2, 2, {}),
    "causal-gqa": ([5, 17, 1, 33], [9, 17, 40, 20], 4, 2, dict(causal=True)),
    "window-mqa": ([20, 3, 33], [33, 17, 5], 4, 1, dict(window_size=(6, 2))),
    "window-causal": ([33, 12], [20, 40], 2, 2, dict(window_size=(9, -1), causal=True)),
    "softcap-alibiH": ([7, 21], [21, 7], 2, 1, dict(softcap=3.0, alibi="H", causal=True)),
    "alibiBH-scale": ([16, 16, 2], [16, 1, 30], 2, 2, dict(alibi="BH", softmax_scale=0.4)),
    "empty-seqs": ([3, 0, 7, 4], [0, 5, 7, 6], 2, 2, dict(causal=True)),
}


# Every case in float32; the half-precision dtypes on a few (the interpreter is slow).
_VARLEN_PARAMS = [pytest.param(case, F32, id=f"{case}-fp32") for case in VARLEN_CASES] + [
    pytest.param(case, dtype, id=f"{case}-{DTYPE_NAME[dtype]}")
    for case, dtype in (("causal-gqa", F16), ("softcap-alibiH", BF16), ("empty-seqs", F16),
                        ("window-mqa", BF16))]


def _varlen_inputs(case: str, dtype: torch.dtype):
    """Packed q, k, v (head_dim 40), cu_seqlens_q, cu_seqlens_k, max lengths and options of
    a ``VARLEN_CASES`` case."""
    lq, lk, h, hkv, opts = VARLEN_CASES[case]
    opts = dict(opts)
    alibi = opts.pop("alibi", None)
    if alibi is not None:
        opts["alibi_slopes"] = alibi_slopes(h, len(lq) if alibi == "BH" else None)
    d = 40
    q, k, v = _pack(lq, h, d, dtype), _pack(lk, hkv, d, dtype), _pack(lk, hkv, d, dtype)
    return q, k, v, _cu(lq), _cu(lk), (max(lq), max(lk)), opts


@pytest.mark.parametrize("case, dtype", _VARLEN_PARAMS)
def test_varlen(case, dtype):
    q, k, v, cu_q, cu_k, max_lens, opts = _varlen_inputs(case, dtype)
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, *max_lens, return_lse=True, **opts)
    ref, ref_lse = reference_varlen(q, k, v, cu_q, cu_k, **opts)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (q.shape[1], q.shape[0])
    assert_matches(out, ref, TOLERANCE[dtype])
    assert_lse_matches(lse, ref_lse)


def test_varlen_strided_and_loose_max():
    """q, k, v as strided slices of one packed qkv tensor; max_seqlen_q above the longest."""
    lq = [9, 30, 17]
    total, h, d = sum(lq), 2, 40
    qkv = torch.randn(total, 3, h, d)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert not q.is_contiguous()
    cu = _cu(lq)
    out = flash_attention_varlen(q, k, v, cu, cu, 48, 48, causal=True)
    ref, _ = reference_varlen(q, k, v, cu, cu, causal=True)
    assert_matches(out, ref, TOLERANCE[F32])


def test_varlen_matches_dense_per_sequence():
    """One sequence packed is the same as the dense BSHD call on it."""
    q, k, v = make_qkv(1, 2, 20, 33, 32, layout="bshd")
    dense = flash_attention_v2(q, k, v, causal=True)
    packed = flash_attention_varlen(q[0], k[0], v[0], _cu([20]), _cu([33]), 20, 33,
                                    causal=True)
    assert torch.allclose(packed, dense[0], rtol=1e-5, atol=1e-6)


def test_varlen_errors():
    q = torch.randn(10, 2, 16)
    cu = _cu([4, 6])
    with pytest.raises(ValueError, match="cu_seqlens_q must be a 1-D int32"):
        flash_attention_varlen(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k must be a 1-D int32"):
        flash_attention_varlen(q, q, q, cu, torch.tensor([0], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="same length"):
        flash_attention_varlen(q, q, q, cu, _cu([4, 3, 3]), 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_q must be an int >= 0"):
        flash_attention_varlen(q, q, q, cu, cu, -1, 6)
    with pytest.raises(ValueError, match="q must be 3-D"):
        flash_attention_varlen(q[None], q, q, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="multiple of"):
        flash_attention_varlen(torch.randn(10, 3, 16), q, q, cu, cu, 6, 6)


# ----------------------------------------------------------------------------- descriptors

# (B, H, Hkv, Sq, Sk, head_dim, dtype, options): V2's tensor-descriptor (TMA) path over the
# cases its key loops treat apart: causal with Sq < Sk, key tails (rows past the tensor read
# as zeros), windows, softcap, ALiBi, a key-padding mask, GQA and a padded head_dim.
_DESCRIPTOR_CASES = {
    "causal-odd": (1, 2, 2, 33, 33, 40, F32, dict(causal=True)),
    "causal-sq<sk": (2, 2, 1, 17, 45, 32, F16, dict(causal=True)),
    "key-tail": (1, 2, 2, 20, 50, 32, F32, {}),
    "window-both": (1, 2, 2, 40, 37, 32, F32, dict(window_size=(5, 3))),
    "window-causal-softcap": (1, 2, 2, 50, 50, 32, F32,
                              dict(window_size=(9, -1), causal=True, softcap=2.0)),
    "softcap-causal": (1, 2, 1, 33, 40, 64, F16, dict(causal=True, softcap=3.0)),
    "alibi-causal": (1, 2, 2, 33, 33, 32, F32, dict(causal=True, alibi="H")),
    "keys-mask-causal": (2, 2, 2, 33, 33, 32, F32, dict(causal=True, mask="keys")),
}


@pytest.mark.parametrize("case", list(_DESCRIPTOR_CASES))
def test_descriptor_path_interpreted(case, monkeypatch):
    """The GPU's tensor-descriptor (TMA) load path of V2, run here by the interpreter, which
    reads host descriptors of CPU tensors (production takes it on Hopper from 256 query rows:
    the bounds are lowered to 0 here), matches the reference."""
    from kernels import _launch

    if _launch.TensorDescriptor is None:
        pytest.skip("this triton has no host tensor descriptors")
    monkeypatch.setattr(_launch, "_tma_ok", lambda *tensors: True)
    monkeypatch.setattr(_launch, "_TMA_MIN_ROWS", 0)
    monkeypatch.setattr(_launch, "_TMA_MIN_SCORES", 0)
    made = spy_calls(monkeypatch, _launch, ("_descriptor",))
    b, h, hkv, sq, sk, d, dtype, opts = _DESCRIPTOR_CASES[case]
    opts = dict(opts)
    q, k, v = make_qkv(b, h, sq, sk, d, dtype=dtype, kv_heads=hkv)
    if opts.pop("alibi", None):
        opts["alibi_slopes"] = alibi_slopes(h)
    if opts.pop("mask", None):
        mask = torch.ones(b, 1, 1, sk, dtype=torch.bool)
        mask[0, ..., sk // 2:] = False
        opts["attn_mask"] = mask
    check_call("v2", q, k, v, **opts)
    assert made == ["_descriptor"] * 3, made


# ----------------------------------------------------------------------------- autograd

GRAD_CASES = {
    # name: (api, dtype, (B, H, Hkv, Sq, Sk, D), options, mask kind): a random (B, 1, Sq, Sk)
    # mask ("bool"; "float" in float32, "float-same-dtype" in the inputs' dtype) or a
    # key-padding mask (B, 1, 1, Sk) ("padding": the last quarter of the keys of batch 0)
    "plain-v2": ("v2", F32, (2, 2, 2, 17, 33, 40), {}, None),
    "causal-empty-rows-v1": ("v1", F32, (2, 2, 2, 33, 17, 40), dict(causal=True), None),
    "gqa-causal-bshd": ("bshd", F32, (2, 4, 2, 20, 20, 32), dict(causal=True), None),
    "mqa-v1": ("v1", F32, (1, 4, 1, 17, 24, 24), {}, None),
    "bool-mask-empty-rows-v2": ("v2", F32, (2, 2, 2, 20, 33, 40), {}, "bool"),
    "float-mask-causal-bshd": ("bshd", F32, (2, 2, 2, 20, 33, 40), dict(causal=True), "float"),
    "softcap-alibi-v1": ("v1", F32, (2, 2, 2, 17, 33, 40),
                         dict(softcap=2.0, alibi_slopes="BH"), None),
    "window-v2": ("v2", F32, (2, 2, 1, 33, 33, 40), dict(window_size=(5, 2)), None),
    "all-v2-fp16": ("v2", F16, (2, 4, 2, 20, 33, 40),
                    dict(causal=True, softcap=5.0, alibi_slopes="H", window_size=(9, -1)),
                    "float"),
    "causal-bf16-bshd": ("bshd", BF16, (2, 2, 2, 33, 20, 40), dict(causal=True), "bool"),
    "padded-causal-v2": ("v2", F16, (2, 4, 2, 20, 20, 40), dict(causal=True), "padding"),
    "fp16-mask-bshd": ("bshd", F16, (2, 2, 2, 20, 33, 32), {}, "float-same-dtype"),
}


def _grad_inputs(api, dtype, dims, options, mask_kind):
    b, h, hkv, sq, sk, d = dims
    q, k, v = make_qkv(b, h, sq, sk, d, dtype=dtype, layout=layout_of(api), kv_heads=hkv,
                       scale=1.5)
    opts = dict(options)
    if opts.get("alibi_slopes") == "H":
        opts["alibi_slopes"] = alibi_slopes(h)
    elif opts.get("alibi_slopes") == "BH":
        opts["alibi_slopes"] = alibi_slopes(h, b)
    if mask_kind == "padding":
        opts["attn_mask"] = torch.ones(b, 1, 1, sk, dtype=torch.bool)
        opts["attn_mask"][0, ..., sk - sk // 4:] = False
    elif mask_kind is not None:
        native = mask_kind == "float-same-dtype"
        opts["attn_mask"] = make_mask((b, 1, sq, sk), "float" if native else mask_kind,
                                      dtype=dtype if native else F32)
    return q, k, v, opts


def _finite_or_zero(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients(case, with_lse):
    api, dtype, dims, options, mask_kind = GRAD_CASES[case]
    q, k, v, opts = _grad_inputs(api, dtype, dims, options, mask_kind)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = call(api, q, k, v, return_lse=True, **opts)
    grad_out = torch.randn(out.shape).to(dtype)
    grad_lse = torch.randn(lse.shape)
    loss = (out.float() * grad_out.float()).sum()
    if with_lse:  # rows with no key have lse -inf: they take no part in the loss
        loss = loss + (_finite_or_zero(lse) * grad_lse).sum()
    loss.backward()

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, layout=layout_of(api), **opts)
    ref_loss = (ref * grad_out.double()).sum()
    if with_lse:
        ref_loss = ref_loss + (_finite_or_zero(ref_lse) * grad_lse.double()).sum()
    ref_loss.backward()

    assert_matches(out, ref, TOLERANCE[dtype])
    for name, x, x64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape
        assert_matches(x.grad, x64.grad, TOLERANCE[dtype], what=name)
    if (ref_lse == NEG_INF).any():  # rows that see no key get zero gradient
        empty = (ref_lse == NEG_INF)  # (B, H, Sq)
        dq = q.grad if api != "bshd" else q.grad.transpose(1, 2)
        assert (dq[empty] == 0).all()


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "varlen"])
def test_gradient_through_lse_alone(packed):
    """A loss on lse alone (out takes no part: its gradient arrives as None) still gives
    the reference's gradients of q and k, and a zero gradient of v."""
    if packed:
        lengths = [7, 12]
        q, k, v = (_pack(lengths, 2, 32, F32).requires_grad_() for _ in range(3))
        cu = _cu(lengths)
        _, lse = flash_attention_varlen(q, k, v, cu, cu, 12, 12, causal=True,
                                        return_lse=True)
    else:
        q, k, v = (x.requires_grad_() for x in make_qkv(2, 2, 17, 20, 32))
        _, lse = flash_attention(q, k, v, variant="v2", causal=True, return_lse=True)
    weights = torch.randn(lse.shape)
    (_finite_or_zero(lse) * weights).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    if packed:
        _, ref_lse = reference_varlen(q64, k64, v64, cu, cu, causal=True)
    else:
        _, ref_lse = reference_attention(q64, k64, v64, causal=True)
    (_finite_or_zero(ref_lse) * weights.double()).sum().backward()
    assert_matches(q.grad, q64.grad, TOLERANCE[F32], what="dq")
    assert_matches(k.grad, k64.grad, TOLERANCE[F32], what="dk")
    assert v.grad is not None and (v.grad == 0).all()


def test_gradient_needs_no_grad_of_k():
    """Only q requires grad: dq still matches and k, v get none."""
    q, k, v = make_qkv(2, 2, 17, 20, 32)
    q.requires_grad_()
    out = flash_attention(q, k, v, variant="v2", causal=True)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    q64 = q.detach().double().requires_grad_()
    ref, _ = reference_attention(q64, k, v, causal=True)
    (ref * g.double()).sum().backward()
    assert_matches(q.grad, q64.grad, TOLERANCE[F32], what="dq")
    assert k.grad is None and v.grad is None


_VARLEN_GRAD_PARAMS = [pytest.param(case, F32, id=f"{case}-fp32") for case in VARLEN_CASES] + [
    pytest.param("causal-gqa", F16, id="causal-gqa-fp16"),
    pytest.param("softcap-alibiH", BF16, id="softcap-alibiH-bf16")]


def _check_varlen_gradients(case: str, dtype: torch.dtype, device, tol: float,
                            with_lse: bool = True, tail: int = 0) -> None:
    """Gradients of a ``VARLEN_CASES`` case on ``device`` (through out, and lse if
    ``with_lse``) against float64 autograd of the per-sequence reference; rows that see no
    key, and ``tail`` rows of q, k and v after the last sequence, get zero gradients."""
    q, k, v, cu_q, cu_k, max_lens, opts = _varlen_inputs(case, dtype)
    q, k, v = (torch.cat([x, torch.randn(tail, *x.shape[1:]).to(dtype)]) for x in (q, k, v))
    q, k, v = (x.to(device).requires_grad_() for x in (q, k, v))
    cu_q, cu_k = cu_q.to(device), cu_k.to(device)
    opts = {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in opts.items()}
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, *max_lens, return_lse=True, **opts)
    grad_out = torch.randn(out.shape, device=device).to(dtype)
    grad_out[q.shape[0] - tail:] = 0  # the rows after the last sequence are not outputs
    grad_lse = torch.randn(lse.shape, device=device) * with_lse
    loss = (out.float() * grad_out.float()).sum()
    if with_lse:  # otherwise lse takes no part in the loss (no gradient flows into it)
        loss = loss + (_finite_or_zero(lse) * grad_lse).sum()
    loss.backward()

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = reference_varlen(q64, k64, v64, cu_q, cu_k, **opts)
    rows = ref.shape[0]  # the sequences' rows (the reference leaves the tail out)
    ((ref * grad_out[:rows].double()).sum()
     + (_finite_or_zero(ref_lse) * grad_lse[:, :rows].double()).sum()).backward()
    assert_matches(out[:rows], ref, tol)
    for name, x, x64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape
        assert_matches(x.grad, x64.grad, tol, what=name)
    empty = (ref_lse == NEG_INF).T  # (total_q, H): rows that see no key
    assert (q.grad[:rows][empty] == 0).all()
    for x in (q, k, v):
        assert (x.grad[x.shape[0] - tail:] == 0).all()
    if case == "empty-seqs":
        assert empty.any()


@pytest.mark.parametrize("case, dtype", _VARLEN_GRAD_PARAMS)
def test_varlen_gradients(case, dtype):
    """Packed sequences: GQA/MQA, windows, softcap, ALiBi, empty sequences."""
    _check_varlen_gradients(case, dtype, "cpu", TOLERANCE[dtype])


def test_flash_attention_2_backward_covers_only_what_it_computes(monkeypatch):
    """The decision table of kernels._backward (a CUDA device with FlashAttention-2 faked):
    plain, causal, windowed and GQA calls in fp16/bf16 take FlashAttention-2's backward; a
    mask, ALiBi, softcap, a gradient into lse, float32, a head_dim that is not a multiple of
    8, or over 256 (over 192 below sm80/sm90), or a GPU before sm80 keep the blockwise one.
    cuDNN's takes those without a window, causal only when Sq == Sk, on sm90, unless
    deterministic algorithms are on."""
    from kernels import _backward
    from kernels._launch import ScoreArgs

    capability = (9, 0)
    monkeypatch.setattr(_backward._runtime, "capability", lambda device: capability)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(_backward, "_FA2_WINDOWS", True)
    cuda = torch.device("cuda")
    plain = ScoreArgs(0.125, True, 7, 0, 0.0, None, None)

    def covers(args=plain, dtype=F16, head_dim=64, grad_lse=None, device=cuda):
        return _backward.fa2_covers(device, dtype, head_dim, args, grad_lse)

    assert covers() and covers(dtype=BF16, head_dim=256)
    assert covers(plain._replace(causal=False, window_left=-1, window_right=-1), head_dim=8)
    assert not covers(plain._replace(attn_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)))
    assert not covers(plain._replace(alibi_slopes=torch.ones(1, 1)))
    assert not covers(plain._replace(softcap=5.0))
    assert not covers(grad_lse=torch.zeros(1))
    assert not covers(dtype=F32)
    assert not covers(head_dim=40 + 4) and not covers(head_dim=264)
    assert not covers(device=torch.device("cpu"))
    capability = (8, 6)
    assert covers(head_dim=192) and not covers(head_dim=256)
    capability = (7, 5)
    assert not covers()

    # cuDNN's backward: no window, causal only when Sq == Sk, sm90 only; masks as a bias of
    # the inputs' dtype (bool, or floating in that dtype)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    capability = (9, 0)
    causal = plain._replace(window_left=-1)

    def cudnn(sq=64, sk=64, args=causal, dtype=F16, head_dim=64, grad_lse=None):
        return _backward.cudnn_covers(cuda, dtype, head_dim, sq, sk, args, grad_lse)

    assert cudnn() and cudnn(48, 64, ScoreArgs(0.1, False, -1, -1, 0.0, None, None))
    assert not cudnn(48, 64)
    assert not cudnn(args=plain)  # a left window
    assert not cudnn(args=ScoreArgs(0.1, False, -1, 3, 0.0, None, None))
    for mask, dtype, taken in ((torch.ones(1, 1, 1, 64, dtype=torch.bool), BF16, True),
                               (torch.zeros(1, 1, 64, 64, dtype=F16), F16, True),
                               (torch.zeros(1, 1, 64, 64, dtype=F32), F16, False),
                               (torch.zeros(1, 1, 64, 64, dtype=F16), BF16, False)):
        assert cudnn(args=causal._replace(attn_mask=mask), dtype=dtype) == taken
    assert not cudnn(args=causal._replace(alibi_slopes=torch.ones(1, 1)))
    assert not cudnn(args=causal._replace(softcap=5.0))
    assert not cudnn(grad_lse=torch.zeros(1)) and not cudnn(dtype=F32)
    assert not cudnn(head_dim=44)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not cudnn()
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    capability = (8, 0)
    assert not cudnn()


def _restore_inf_rows(lse: torch.Tensor) -> torch.Tensor:
    """Statistics as a fused backward received them (+inf rows) -> our lse; asserts that no
    -inf row reached the fused kernel."""
    assert not (lse == NEG_INF).any()
    return torch.where(lse == float("inf"), NEG_INF, lse)


@pytest.mark.parametrize("refuse", [False, True], ids=["taken", "refused"])
def test_masked_backward_hands_cudnn_its_bias(refuse, monkeypatch):
    """The plumbing of a masked call into cuDNN's backward, with the kernel faked on the CPU
    by the blockwise backward on what it receives (the additive bias, +inf lse rows): the
    gradients match the reference's, rows that see no key included. When cuDNN refuses the
    configuration, the blockwise backward runs (FlashAttention-2's takes no mask)."""
    from kernels import _backward
    from kernels._launch import ScoreArgs
    from kernels.torch_attention import attention_backward

    received = []

    def fake_cudnn(grad_out, q, k, v, out, stats, seed, offset, bias, cum_q, cum_k, max_q,
                   max_k, dropout_p, causal, *, scale):
        received.append(bias)
        if refuse:
            raise RuntimeError("cuDNN Frontend error: no plan for this configuration")
        assert bias.dtype == q.dtype and stats.shape == (*q.shape[:3], 1)
        args = ScoreArgs(scale, causal, -1, 0 if causal else -1, 0.0, bias, None)
        return attention_backward(grad_out, None, q, k, v, out,
                                  _restore_inf_rows(stats.squeeze(-1)), args)

    def fake_fa2(*args, **kwargs):
        raise AssertionError("FlashAttention-2's backward takes no mask")

    monkeypatch.setattr(_backward, "cudnn_covers", lambda *args: True)
    monkeypatch.setattr(_backward, "_CUDNN_BACKWARD", fake_cudnn)
    monkeypatch.setattr(_backward, "_FA2_BACKWARD", fake_fa2)
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 4, 20, 33, 32, kv_heads=2, scale=1.5))
    mask = make_mask((2, 1, 20, 33), "bool")  # row 3 sees no key
    out = flash_attention(q, k, v, variant="v2", causal=False, attn_mask=mask)
    grad_out = torch.randn(out.shape)
    (out * grad_out).sum().backward()
    assert len(received) == 1 and received[0].shape == (2, 1, 20, 33)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, attn_mask=mask)
    (ref * grad_out.double()).sum().backward()
    for name, x, x64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_matches(x.grad, x64.grad, TOLERANCE[F32], what=name)
    assert (q.grad[:, :, 3] == 0).all()


def test_varlen_backward_hands_flash_attention_2_the_bounds(monkeypatch):
    """The plumbing of packed sequences into FlashAttention-2's varlen backward, faked on the
    CPU: it gets the forward's maximum lengths and +inf lse rows, and the rows after the last
    sequence (which it leaves unwritten: NaN here) come back zero."""
    from kernels import _backward
    from kernels._launch import ScoreArgs
    from kernels.torch_attention import varlen_attention_backward

    received = []

    def fake_fa2(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, causal,
                 seed, offset, *, scale, window_size_left, window_size_right):
        received.append((max_q, max_k, causal, window_size_left, window_size_right))
        args = ScoreArgs(scale, causal, window_size_left, window_size_right, 0.0, None, None)
        grads = varlen_attention_backward(grad_out, None, q, k, v, out, _restore_inf_rows(lse),
                                          cu_q, cu_k, args)
        for grad, cu in zip(grads, (cu_q, cu_k, cu_k), strict=True):
            grad[cu[-1]:] = float("nan")
        return (*grads, None)

    monkeypatch.setattr(_backward, "fa2_covers", lambda *args: True)
    monkeypatch.setattr(_backward, "_FA2_BACKWARD", fake_fa2)
    lq, lk = [9, 0, 14, 4], [5, 6, 14, 0]  # keys without queries; queries without keys
    q = torch.randn(sum(lq) + 3, 4, 32, requires_grad=True)  # 3 rows after the last sequence
    k, v = (torch.randn(sum(lk) + 2, 2, 32, requires_grad=True) for _ in range(2))
    cu_q, cu_k = _cu(lq), _cu(lk)
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, 16, 20, causal=True, window_size=(7, -1))
    grad_out = torch.randn(out.shape)
    (out * grad_out).sum().backward()
    assert received == [(16, 20, True, 7, 0)]
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_varlen(q64, k64, v64, cu_q, cu_k, causal=True, window_size=(7, -1))
    (ref[:sum(lq)] * grad_out[:sum(lq)].double()).sum().backward()
    for name, x, x64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_matches(x.grad, x64.grad, TOLERANCE[F32], what=name)
    assert (q.grad[sum(lq):] == 0).all() and (k.grad[sum(lk):] == 0).all()


@pytest.mark.parametrize("shape, kind", [((2, 1, 1, 33), "bool"), ((1, 3, 20, 33), "float"),
                                         ((20, 1), "bool"), ((2, 3, 20, 33), "bool")],
                         ids=["key-padding", "float-1H", "rows-only", "full"])
def test_cudnn_bias_of_a_mask(shape, kind):
    """cuDNN's additive bias: the mask's values (0 / -inf for bool), broadcast to (B, 1 or H,
    Sq, Sk) from a tensor no larger than the mask (float masks of the inputs' dtype are not
    copied), unit stride along the keys."""
    from kernels._backward import _cudnn_bias

    b, h, sq, sk = 2, 3, 20, 33
    mask = make_mask(shape, kind, dtype=F16)
    view = mask.expand(b, h, sq, sk)
    bias = _cudnn_bias(view, F16)
    heads = 1 if view.stride(1) == 0 else h
    assert bias.shape == (b, heads, sq, sk) and bias.dtype == F16 and bias.stride(-1) == 1
    expected = (torch.zeros(view.shape, dtype=F16).masked_fill(~view, NEG_INF)
                if kind == "bool" else view)
    assert torch.equal(bias.expand(b, h, sq, sk), expected)
    keys = sk if shape[-1] == 1 else 1  # a mask broadcast along the keys is written out
    assert bias.untyped_storage().nbytes() == mask.numel() * keys * 2
    if kind == "float":
        assert bias.data_ptr() == mask.data_ptr()


# ============================================================================= GPU
# Run by hand on a CUDA machine: ``pytest -m gpu tests/test_features.py``. One process
# compiles each constexpr combination once (1-3 s each), so the cases below share shapes and
# options where they can.

GPU_TOL = {F16: 2e-3, BF16: 1e-2, F32: 1e-5}
GPU_TOL_TF32 = 2e-3  # TF32 rounds matmul inputs to 10-bit mantissas
# One dtype per API in most GPU tests (each API still meets each dtype across the tests, and
# each test meets every dtype): every (kernel, dtype, option) combination is a compile.
API_DTYPE = [("v1", F16), ("v2", BF16), ("bshd", F32)]


def _api_dtype_ids(pairs):
    return [f"{api}-{DTYPE_NAME[dtype]}" for api, dtype in pairs]


@pytest.fixture
def tf32(request):
    """Set torch's float32 matmul precision for the test, restore it afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision(before)


def _gpu_tol(dtype):
    if dtype == F32 and torch.get_float32_matmul_precision() != "highest":
        return GPU_TOL_TF32
    return GPU_TOL[dtype]


def _gpu_check(api, q, k, v, **kw):
    out, lse = call(api, q, k, v, return_lse=True, **kw)
    torch.cuda.synchronize()
    ref, ref_lse = reference_attention(q, k, v, layout=layout_of(api), **kw)
    assert out.device == q.device and out.dtype == q.dtype and out.shape == q.shape
    assert_matches(out, ref, _gpu_tol(q.dtype))
    tf32 = q.dtype == F32 and torch.get_float32_matmul_precision() != "highest"
    assert_lse_matches(lse, ref_lse, atol=1e-2 if tf32 else 2e-3)
    return out, lse


GPU_SHAPES = [
    # (B, H, Hkv, Sq, Sk, D)
    (2, 4, 4, 1, 1, 64),
    (2, 4, 2, 1, 1000, 128),
    (2, 4, 4, 129, 129, 64),
    (1, 4, 1, 257, 1023, 96),
    (2, 2, 2, 1000, 300, 80),
    (1, 2, 2, 513, 513, 40),
    (1, 2, 2, 77, 200, 256),
    (1, 2, 2, 64, 200, 160),
    (2, 3, 3, 100, 100, 1),
]


def _gpu_shape_cases():
    """Every shape with two of the three APIs in fp16 or bf16 (alternating), and float32 (its
    compiles are slowest) on two shapes."""
    cases = []
    for i, shape in enumerate(GPU_SHAPES):
        apis = [APIS[i % 3], APIS[(i + 1) % 3]]
        combos = [(api, (F16, BF16)[(i + j) % 2]) for j, api in enumerate(apis)]
        if i in (2, 6):
            combos += [(api, F32) for api in apis]
        for api, dtype in combos:
            cases.append(pytest.param(
                shape, api, dtype,
                id="B{}H{}Hkv{}Sq{}Sk{}D{}".format(*shape) + f"-{api}-{DTYPE_NAME[dtype]}"))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", ["highest"], indirect=True)
@pytest.mark.parametrize("shape, api, dtype", _gpu_shape_cases())
def test_gpu_shapes(shape, api, dtype, tf32, gpu_device):
    b, h, hkv, sq, sk, d = shape
    q, k, v = make_qkv(b, h, sq, sk, d, dtype=dtype, layout=layout_of(api), kv_heads=hkv,
                       device=gpu_device)
    _gpu_check(api, q, k, v, causal=sq % 2 == 1)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", ["high", "medium"], indirect=True)
@pytest.mark.parametrize("api", APIS)
def test_gpu_fp32_tf32(api, tf32, gpu_device):
    """TF32 on (float32 with "highest", TF32 off, runs in test_gpu_shapes)."""
    q, k, v = make_qkv(2, 4, 300, 517, 64, dtype=F32, layout=layout_of(api), kv_heads=2,
                       device=gpu_device)
    _gpu_check(api, q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("api, dtype, causal", [
    ("v1", F16, False), ("v1", BF16, True), ("v2", BF16, False), ("v2", F16, True),
    ("bshd", F16, False), ("bshd", BF16, True)],
    ids=["v1-fp16-full", "v1-bf16-causal", "v2-bf16-full", "v2-fp16-causal", "bshd-fp16-full",
         "bshd-bf16-causal"])
def test_gpu_long_8k(api, dtype, causal, gpu_device):
    q, k, v = make_qkv(1, 2, 8192, 8192, 64, dtype=dtype, layout=layout_of(api),
                       device=gpu_device)
    _gpu_check(api, q, k, v, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("api", APIS)
def test_gpu_long_decode_and_prefill(api, gpu_device):
    """Sq = 1 against 8k keys, and Sq = 8k against fewer keys (causal: rows with no key)."""
    q, k, v = make_qkv(2, 4, 1, 8000, 128, dtype=F16, layout=layout_of(api), kv_heads=1,
                       device=gpu_device)
    _gpu_check(api, q, k, v, causal=True)
    q, k, v = make_qkv(1, 2, 8000, 3001, 128, dtype=BF16, layout=layout_of(api),
                       device=gpu_device)
    out, lse = _gpu_check(api, q, k, v, causal=True)
    assert (lse[:, :, :4999] == NEG_INF).all()


@pytest.mark.gpu
@pytest.mark.parametrize("api, dtype", API_DTYPE, ids=_api_dtype_ids(API_DTYPE))
def test_gpu_strided_and_unaligned(api, dtype, gpu_device):
    """Views that the TMA path cannot take (odd strides, offsets) and ones it can."""
    b, h, sq, sk, d = 2, 2, 200, 333, 64
    layout = layout_of(api)

    q = torch.randn(b, h, sq, d + 3, device=gpu_device).to(dtype)[..., 1:d + 1]
    k = torch.randn(b, h, sk, d + 3, device=gpu_device).to(dtype)[..., 1:d + 1]
    v = torch.randn(b, h, sk, d + 3, device=gpu_device).to(dtype)[..., 1:d + 1]
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    _gpu_check(api, q, k, v, causal=True)  # unaligned base pointers: pointer path
    q, k, v = make_qkv(b, h, sq, sk, d, dtype=dtype, layout="bshd" if layout == "bhsd" else
                       "bhsd", device=gpu_device)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # the other layout's memory
    _gpu_check(api, q, k, v, causal=False)
    logical = (b, h, sq, d) if layout == "bhsd" else (b, sq, h, d)
    q = _strided(logical, dtype, device=gpu_device)  # non-contiguous in every dim
    _gpu_check(api, q, k, v, window_size=(50, 7))


@pytest.mark.gpu
def test_gpu_tma_size_rule(gpu_device, monkeypatch):
    """V2 builds tensor descriptors only from _TMA_MIN_SCORES scores (B*H*Sq*Sk) and 256 query
    rows: smaller calls are host-bound and take the pointer path. Both give the right answer."""
    from kernels import _launch

    bound = 4 * 300 * 800
    monkeypatch.setattr(_launch, "_TMA_MIN_SCORES", bound)
    built = []
    real = _launch._descriptor
    monkeypatch.setattr(_launch, "_descriptor", lambda *a: built.append(a) or real(*a))
    for sq, sk, expected in [(300, 799, 0), (300, 800, 3), (255, 2000, 0), (1000, 300, 3)]:
        built.clear()
        q, k, v = make_qkv(1, 4, sq, sk, 64, dtype=F16, layout="bshd", kv_heads=2,
                           device=gpu_device)
        assert (4 * sq * sk >= bound and sq >= 256) == (expected > 0)
        _gpu_check("bshd", q, k, v, causal=True)
        assert len(built) == expected, (sq, sk)


def _record_tiles(monkeypatch) -> list[tuple]:
    """Record (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg, USE_TMA or None) of every
    launch (``kernels._runtime.launch``) into the returned list; the launches still run."""
    from kernels import _runtime

    tiles: list[tuple] = []
    real = _runtime.launch

    def launch(kernel, grid, device, args, constexprs, num_warps, num_stages, maxnreg=None):
        tiles.append((constexprs["BLOCK_M"], constexprs["BLOCK_N"], num_warps, num_stages,
                      maxnreg, constexprs.get("USE_TMA")))
        real(kernel, grid, device, args, constexprs, num_warps, num_stages, maxnreg)

    monkeypatch.setattr(_runtime, "launch", launch)
    return tiles


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, dtype, causal, sms, tile, seqlen", [
    (256, F16, False, 1, (128, 64, 8, 2, None), 600),
    (256, BF16, True, 1, (128, 64, 8, 3, None), 600),
    (256, F16, True, 1000, (64, 64, 4, 3, None), 600),
    (256, BF16, False, 1000, (128, 64, 8, 2, None), 600),
    (128, BF16, True, 1000, (64, 64, 4, 3, None), 600),
    (128, F16, True, 1, (128, 64, 8, 2, 128), 600),
    (128, BF16, True, 1, (128, 128, 8, 3, None), 1100),
    (64, BF16, False, 1, (128, 128, 8, 3, 128), 600),
    (64, F16, True, 1000, (64, 64, 4, 3, 128), 600),
], ids=["D256-full-large", "D256-causal-large", "D256-causal-small", "D256-full-small",
        "D128-causal-small", "D128-causal-short", "D128-causal-large", "D64-full",
        "D64-causal-small"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_gpu_v2_tiles(head_dim, dtype, causal, sms, tile, seqlen, tma, gpu_device,
                      monkeypatch):
    """The V2 tiles of kernels/configs.py at head_dim 64 (the register-capped ones), 128 and
    256, on pointers and on tensor descriptors: the grid (2 x 2 x ceil(seqlen / 128)
    programs of 128 rows) counts as large against one multiprocessor and as small against a
    thousand (the small-grid rule of causal calls); causal head_dim-128 sequences up to 1024
    take the short-sequence tile."""
    from kernels import _launch, configs

    monkeypatch.setattr(configs, "multiprocessors", lambda device: sms)
    monkeypatch.setattr(_launch, "_TMA_MIN_SCORES", 0 if tma else 1 << 62)
    monkeypatch.setattr(_launch, "HOPPER_CONFIGS", {})  # V2 at every head_dim, on sm_90 too
    tiles = _record_tiles(monkeypatch)
    q, k, v = make_qkv(2, 2, seqlen, seqlen + 11, head_dim, dtype=dtype, device=gpu_device)
    _gpu_check("v2", q, k, v, causal=causal)
    assert tiles == [(*tile, tma)]


@pytest.mark.gpu
@pytest.mark.parametrize("api, dtype", [("v2", BF16), ("bshd", F16)], ids=["v2-bf16",
                                                                           "bshd-fp16"])
def test_gpu_short_causal_tile_with_every_feature(api, dtype, gpu_device, monkeypatch):
    """The short-sequence causal tile (128x64, 8 warps, 2 stages, 128 registers) with GQA,
    windows, softcap, ALiBi, float and key-padding masks at head_dim 80, 96 and 128 (the
    multiprocessor count patched to 1, so that no grid counts as small)."""
    from kernels import _launch, configs

    monkeypatch.setattr(configs, "multiprocessors", lambda device: 1)
    monkeypatch.setattr(_launch, "HOPPER_CONFIGS", {})  # V2 at every head_dim, on sm_90 too
    tiles = _record_tiles(monkeypatch)
    b, h, dev = 2, 4, gpu_device
    for d, sq, sk in ((128, 700, 1000), (96, 257, 1023), (80, 1000, 1000)):
        q, k, v = make_qkv(b, h, sq, sk, d, dtype=dtype, layout=layout_of(api), kv_heads=2,
                           device=dev, scale=2.0)
        _gpu_check(api, q, k, v, causal=True)
        _gpu_check(api, q, k, v, window_size=(100, -1), causal=True, softcap=5.0)
        _gpu_check(api, q, k, v, causal=True, alibi_slopes=alibi_slopes(h, device=dev))
        _gpu_check(api, q, k, v, alibi_slopes=alibi_slopes(h, b, device=dev), causal=True,
                   softcap=20.0, window_size=(300, 0),
                   attn_mask=make_mask((b, 1, sq, sk), "float", dtype=dtype).to(dev))
        _gpu_check(api, q, k, v, causal=True,
                   attn_mask=make_mask((b, 1, 1, sk), "bool", dtype=dtype).to(dev))
    assert [tile[:5] for tile in tiles] == [(128, 64, 8, 2, 128)] * 15


@pytest.mark.gpu
@pytest.mark.parametrize("api, dtype", API_DTYPE, ids=_api_dtype_ids(API_DTYPE))
def test_gpu_masks(api, dtype, gpu_device):
    b, h, sq, sk, d = 2, 4, 300, 517, 64
    q, k, v = make_qkv(b, h, sq, sk, d, dtype=dtype, layout=layout_of(api), kv_heads=2,
                       device=gpu_device)
    for shape, kind, causal in [((sq, sk), "bool", False), ((b, 1, 1, sk), "bool", True),
                                ((b, 1, sq, sk), "float", True), ((h, sq, sk), "float", False),
                                ((b, 1, sq, 1), "bool", False)]:
        mask = make_mask(shape, kind, dtype=dtype if kind == "float" else F32)
        out, lse = _gpu_check(api, q, k, v, attn_mask=mask.to(gpu_device), causal=causal)
        if kind == "bool" and len(shape) == 2:
            assert (lse[:, :, 3] == NEG_INF).all()


@pytest.mark.gpu
@pytest.mark.parametrize("api, dtype", API_DTYPE, ids=_api_dtype_ids(API_DTYPE))
def test_gpu_key_padding_masks(api, dtype, gpu_device):
    """The compiled mask-free prefix of key-vector masks (64- and 128-key tiles): padding on
    and off block edges, none, one key left, left padding, a hole, a float bias."""
    sk = 1000
    for kind, causal in [("bool", True), ("float", False)]:
        mask = padding_masks(kind, (sk, 512, 700, 1), sk, left=200, hole=900, bias_at=300,
                             dtype=dtype)
        q, k, v = make_qkv(mask.shape[0], 4, 300, sk, 64, dtype=dtype, layout=layout_of(api),
                           kv_heads=2, device=gpu_device)
        _gpu_check(api, q, k, v, attn_mask=mask.to(gpu_device), causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("api, dtype", API_DTYPE, ids=_api_dtype_ids(API_DTYPE))
def test_gpu_window_softcap_alibi(api, dtype, gpu_device):
    b, h, hkv = 2, 4, 2
    dev = gpu_device
    q, k, v = make_qkv(b, h, 700, 1500, 128, dtype=dtype, layout=layout_of(api), kv_heads=hkv,
                       device=dev, scale=2.0)
    _gpu_check(api, q, k, v, window_size=(256, 64))
    _gpu_check(api, q, k, v, window_size=(100, -1), causal=True, softcap=5.0)
    _gpu_check(api, q, k, v, window_size=(-1, 33), alibi_slopes=alibi_slopes(h, device=dev))
    _gpu_check(api, q, k, v, alibi_slopes=alibi_slopes(h, b, device=dev), causal=True,
               softcap=20.0, window_size=(300, 0),
               attn_mask=make_mask((b, 1, 700, 1500), "float", dtype=dtype).to(dev))


@pytest.mark.gpu
@pytest.mark.parametrize("case, dtype", [
    ("causal-gqa", F16), ("window-mqa", BF16), ("softcap-alibiH", F16), ("alibiBH-scale", BF16),
    ("empty-seqs", BF16), ("long", F16)],
    ids=["causal-gqa-fp16", "window-mqa-bf16", "softcap-alibiH-fp16", "alibiBH-scale-bf16",
         "empty-seqs-bf16", "long-fp16"])
def test_gpu_varlen(case, dtype, gpu_device):
    if case == "long":
        lq, lk, h, hkv, opts = [4000, 1, 2500], [4096, 3000, 2000], 4, 2, dict(causal=True)
    else:
        lq, lk, h, hkv, opts = VARLEN_CASES[case]
        lq, lk = [x * 13 for x in lq], [x * 11 for x in lk]
    opts = dict(opts)
    alibi = opts.pop("alibi", None)
    if alibi is not None:
        opts["alibi_slopes"] = alibi_slopes(h, len(lq) if alibi == "BH" else None,
                                            device=gpu_device)
    d = 128
    q, k, v = (_pack(n, hh, d, dtype).to(gpu_device) for n, hh in ((lq, h), (lk, hkv),
                                                                 (lk, hkv)))
    cu_q, cu_k = _cu(lq).to(gpu_device), _cu(lk).to(gpu_device)
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), return_lse=True,
                                      **opts)
    ref, ref_lse = reference_varlen(q, k, v, cu_q, cu_k, **opts)
    assert_matches(out, ref, GPU_TOL[dtype])
    assert_lse_matches(lse, ref_lse, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("case, dtype", [("causal-gqa", F16), ("softcap-alibiH", BF16),
                                         ("empty-seqs", BF16), ("window-mqa", BF16),
                                         ("alibiBH-scale", F32)],
                         ids=["causal-gqa-fp16", "softcap-alibiH-bf16", "empty-seqs-bf16",
                              "window-mqa-bf16", "alibiBH-scale-fp32"])
@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out+lse"])
def test_gpu_varlen_gradients(case, dtype, with_lse, gpu_device, monkeypatch):
    """Through out alone, fp16/bf16 cases without ALiBi or softcap take FlashAttention-2's
    varlen backward (rows without keys, empty sequences and rows after the last sequence
    included); the others the per-sequence blockwise one. All match the reference."""
    from kernels import _backward

    calls = spy_calls(monkeypatch, _backward, ("_FA2_BACKWARD",), returned_only=True)
    _check_varlen_gradients(case, dtype, gpu_device, _gpu_tol(dtype) * (1 if dtype == F32 else 2),
                            with_lse=with_lse, tail=5)
    options = VARLEN_CASES[case][4]
    covered = (dtype != F32 and not with_lse and "alibi" not in options
               and not options.get("softcap"))
    assert calls == (["_FA2_BACKWARD"] if covered else [])


@pytest.mark.gpu
@pytest.mark.parametrize("case, dtype", [
    ("causal-empty-rows-v1", F16), ("gqa-causal-bshd", BF16), ("bool-mask-empty-rows-v2", F32),
    ("softcap-alibi-v1", BF16), ("window-v2", F16), ("bool-mask-empty-rows-v2", F16),
    ("padded-causal-v2", BF16), ("fp16-mask-bshd", F16), ("float-mask-causal-bshd", F16),
    ("causal-bf16-bshd", BF16)],
    ids=["causal-empty-rows-v1-fp16", "gqa-causal-bshd-bf16", "bool-mask-empty-rows-v2-fp32",
         "softcap-alibi-v1-bf16", "window-v2-fp16", "bool-mask-empty-rows-v2-fp16",
         "padded-causal-v2-bf16", "fp16-mask-bshd-fp16", "fp32-mask-causal-bshd-fp16",
         "bool-mask-causal-sq-gt-sk-bshd-bf16"])
@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out+lse"])
def test_gpu_gradients(case, dtype, with_lse, gpu_device, monkeypatch):
    """Through out alone, fp16/bf16 calls without ALiBi or softcap take a fused backward
    (kernels._backward), rows that see no key included: cuDNN's on sm90 without a window,
    causal only when Sq == Sk, with a bool mask or a float mask of the inputs' dtype as its
    bias; FlashAttention-2's for the other calls without a mask. With lse in the loss, or
    the rest, the blockwise one. All match the reference."""
    from kernels import _backward

    api, _, dims, options, mask_kind = GRAD_CASES[case]
    b, h, hkv, sq, sk, d = dims
    dims = (b, h, hkv, sq * 9, sk * 9, d)
    q, k, v, opts = _grad_inputs(api, dtype, dims, options, mask_kind)
    q, k, v = (x.to(gpu_device).requires_grad_() for x in (q, k, v))
    opts = {n: (x.to(gpu_device) if isinstance(x, torch.Tensor) else x)
            for n, x in opts.items()}
    calls = spy_calls(monkeypatch, _backward, ("_FA2_BACKWARD", "_CUDNN_BACKWARD"),
                      returned_only=True)
    out, lse = call(api, q, k, v, return_lse=True, **opts)
    grad_out = torch.randn(out.shape, device=gpu_device).to(dtype)
    grad_lse = torch.randn(lse.shape, device=gpu_device) * with_lse
    loss = (out.float() * grad_out.float()).sum()
    if with_lse:
        loss = loss + (_finite_or_zero(lse) * grad_lse).sum()
    loss.backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, layout=layout_of(api), **opts)
    ((ref * grad_out.double()).sum() + (_finite_or_zero(ref_lse) * grad_lse.double()).sum()
     ).backward()
    tol = _gpu_tol(dtype) * (1 if dtype == F32 else 2)
    for name, x, x64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_matches(x.grad, x64.grad, tol, what=name)
    fused = (dtype != F32 and not options.get("softcap") and not options.get("alibi_slopes")
             and not with_lse)
    cudnn = (fused and torch.cuda.get_device_capability(gpu_device) == (9, 0)
             and "window_size" not in options and (not options.get("causal") or sq == sk)
             and mask_kind in (None, "bool", "padding", "float-same-dtype"))
    expected = "_CUDNN_BACKWARD" if cudnn else "_FA2_BACKWARD" if mask_kind is None else None
    assert calls == ([expected] if fused and expected else [])
    empty = ref_lse == NEG_INF  # (B, H, Sq): rows that see no key get zero gradient
    dq = q.grad if api != "bshd" else q.grad.transpose(1, 2)
    assert (dq[empty] == 0).all()


@pytest.mark.gpu
def test_gpu_selector_and_auto(gpu_device):
    from kernels import BackendSelector

    sel = BackendSelector().select_attention(2, 8, 1024, 128, dtype=F16)
    assert sel.variant in ("v1", "v2") and sel.layout == "bhsd"
    q, k, v = make_qkv(2, 8, 1024, 1024, 128, dtype=F16, device=gpu_device)
    out = sel(q, k, v, causal=True)
    assert_matches(out, reference_attention(q, k, v, causal=True)[0], GPU_TOL[F16])
    out = flash_attention(q, k, v, variant="auto")
    assert_matches(out, reference_attention(q, k, v)[0], GPU_TOL[F16])


@pytest.mark.gpu
def test_gpu_no_nan_on_empty_rows_and_side_streams(gpu_device):
    """A launch on a side stream sees inputs written on it; rows with no key give 0."""
    stream = torch.cuda.Stream(gpu_device)
    with torch.cuda.stream(stream):
        q, k, v = make_qkv(2, 2, 600, 100, 64, dtype=F16, device=gpu_device)
        out, lse = flash_attention(q, k, v, variant="v2", causal=True, return_lse=True)
    stream.synchronize()
    ref, _ = reference_attention(q, k, v, causal=True)
    assert_matches(out, ref, GPU_TOL[F16])
    assert torch.equal(out[:, :, :500], torch.zeros_like(out[:, :, :500]))
    assert math.isinf(lse[0, 0, 0].item())


@pytest.mark.gpu
def test_gpu_split_kv_on_two_streams(gpu_device):
    """Decode calls with many splits on two streams at once: each stream merges through its
    own counters (shared ones would mix the two streams' counts), so every call equals the
    one made alone."""
    from kernels.selector import SelectedKernel

    kernel = SelectedKernel("splitkv")
    q, k, v = make_qkv(1, 8, 1, 4096, 128, dtype=F16, kv_heads=2, device=gpu_device)
    want = kernel(q, k, v)
    streams = [torch.cuda.Stream(gpu_device) for _ in range(2)]
    outs = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream(gpu_device))
    for _ in range(20):
        for stream in streams:
            with torch.cuda.stream(stream):
                outs.append(kernel(q, k, v))
    torch.cuda.synchronize(gpu_device)
    assert all(torch.equal(out, want) for out in outs)
