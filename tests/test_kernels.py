"""The kernels against the float64 reference on CPU (Triton's interpreter runs the real
kernels), plus validation, the selector, CUDA compilation after interpreted launches, and
thread safety.

Interpreter tiles are 16 x 16, so lengths 1, 17, 33 and 129 cross block edges. Inputs are
fresh random draws on each run (see conftest.py for the seed printed on failure).
"""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
import triton

import kernels
from kernels import BackendSelector, _runtime, flash_attention, flash_attention_v2
from kernels.selector import SelectedKernel
from tests.reference import (
    TOLERANCE,
    assert_lse_matches,
    assert_matches,
    reference_attention,
    rel_err,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
DTYPE_NAME = {F32: "fp32", F16: "fp16", BF16: "bf16"}
# "v1"/"v2": flash_attention (BHSD) with that variant; "bshd": flash_attention_v2 (BSHD).
APIS = ("v1", "v2", "bshd")


def layout_of(api: str) -> str:
    return "bshd" if api == "bshd" else "bhsd"


def spy_calls(monkeypatch, module, names: tuple[str, ...], returned_only: bool = False
              ) -> list[str]:
    """Wrap ``module``'s functions ``names`` (for this test) so that each call appends its
    name to the returned list, then runs the real function; with ``returned_only`` the name
    is appended when the function returns (a call that raises is not listed)."""
    seen: list[str] = []
    for name in names:
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            if not returned_only:
                seen.append(_name)
                return _real(*args, **kwargs)
            result = _real(*args, **kwargs)
            seen.append(_name)
            return result

        monkeypatch.setattr(module, name, spy)
    return seen


def make_qkv(batch, heads, seqlen_q, seqlen_k, head_dim, dtype=F32, layout="bhsd",
             kv_heads=None, device="cpu", scale=1.0):
    kv_heads = heads if kv_heads is None else kv_heads

    def draw(h, s):
        shape = (batch, h, s, head_dim) if layout == "bhsd" else (batch, s, h, head_dim)
        return (torch.randn(shape, device=device) * scale).to(dtype)

    return draw(heads, seqlen_q), draw(kv_heads, seqlen_k), draw(kv_heads, seqlen_k)


def call(api, q, k, v, **kw):
    if api == "bshd":
        return flash_attention_v2(q, k, v, **kw)
    return flash_attention(q, k, v, variant=api, **kw)


def check_call(api, q, k, v, **kw):
    """Run ``api`` with return_lse and compare out and lse with the reference."""
    out, lse = call(api, q, k, v, return_lse=True, **kw)
    ref, ref_lse = reference_attention(q, k, v, layout=layout_of(api), **kw)
    assert out.dtype == q.dtype and out.device == q.device
    assert out.shape == q.shape
    assert out.is_contiguous()
    batch, heads, seqlen_q = (q.shape[0], q.shape[2], q.shape[1]) if api == "bshd" \
        else q.shape[:3]
    assert lse.shape == (batch, heads, seqlen_q)
    assert_matches(out, ref, TOLERANCE[q.dtype])
    assert_lse_matches(lse, ref_lse)
    return out, lse, ref, ref_lse


# ----------------------------------------------------------------------------- the reference

def test_reference_matches_torch_sdpa():
    """The reference itself agrees with torch's SDPA where their semantics coincide."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = make_qkv(2, 4, 9, 9, 24, dtype=torch.float64, kv_heads=2)
    ref, _ = reference_attention(q, k, v, causal=True)
    expect = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(ref, expect) < 1e-12
    mask = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    ref, _ = reference_attention(q, k, v, attn_mask=mask, softmax_scale=0.3)
    expect = sdpa(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert rel_err(ref, expect) < 1e-12
    ref, lse = reference_attention(q, k, v)
    s = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(2, dim=1)) / 24 ** 0.5
    assert torch.allclose(lse, torch.logsumexp(s, -1), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- correctness

# (batch, heads, seqlen_q, seqlen_k, head_dim): Sq = 1, odd lengths crossing 16-wide tiles,
# Sq < Sk and Sq > Sk, head_dims that are not powers of two, and 1, 160, 256.
SHAPES = [
    (2, 2, 1, 1, 64),
    (2, 2, 1, 17, 40),
    (2, 2, 1, 129, 80),
    (2, 2, 17, 17, 40),
    (2, 2, 17, 33, 96),
    (2, 2, 33, 17, 80),
    (1, 1, 129, 129, 64),
    (1, 1, 129, 17, 96),
    (1, 1, 17, 129, 40),
    (2, 2, 16, 32, 1),
    (2, 1, 33, 33, 160),
    (2, 1, 17, 33, 256),
    (2, 2, 32, 48, 128),
    (2, 2, 20, 7, 48),
]


def _core_cases():
    """Every shape with every API and causal flag; the dtype rotates so that each shape
    meets every dtype and each (api, causal) pair meets every dtype across shapes."""
    cases = []
    for s, shape in enumerate(SHAPES):
        for c, (api, causal) in enumerate((a, cz) for a in APIS for cz in (False, True)):
            dtype = DTYPES[(s + c) % 3]
            b, h, sq, sk, d = shape
            cid = (f"{api}-{DTYPE_NAME[dtype]}-B{b}H{h}Sq{sq}Sk{sk}D{d}-"
                   f"{'causal' if causal else 'full'}")
            cases.append(pytest.param(api, dtype, shape, causal, id=cid))
    return cases


@pytest.mark.parametrize("api, dtype, shape, causal", _core_cases())
def test_matches_reference(api, dtype, shape, causal):
    b, h, sq, sk, d = shape
    q, k, v = make_qkv(b, h, sq, sk, d, dtype=dtype, layout=layout_of(api))
    out, lse, _, ref_lse = check_call(api, q, k, v, causal=causal)
    if causal and sq > sk:  # the first Sq - Sk rows see no key
        rows = slice(0, sq - sk)
        empty_out = out[:, rows] if api == "bshd" else out[:, :, rows]
        assert torch.equal(empty_out, torch.zeros_like(empty_out))
        assert (lse[:, :, rows] == float("-inf")).all()
        assert torch.isfinite(lse[:, :, sq - sk:]).all()
    else:
        assert torch.isfinite(lse).all()
    assert torch.isfinite(ref_lse[~torch.isinf(ref_lse)]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAME.get)
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_dtype_api_causal(api, dtype, causal):
    """Full cross of dtype x API x causal on one shape with Sq > Sk (rows with no key under
    causal) and a non-power-of-two head_dim."""
    q, k, v = make_qkv(2, 2, 33, 20, 80, dtype=dtype, layout=layout_of(api))
    check_call(api, q, k, v, causal=causal)


@pytest.mark.parametrize("api", APIS)
def test_softmax_scale_and_default(api):
    q, k, v = make_qkv(2, 2, 17, 17, 40, layout=layout_of(api))
    check_call(api, q, k, v, softmax_scale=0.05)
    check_call(api, q, k, v, softmax_scale=2)  # an int is a valid scale
    with pytest.raises(TypeError, match="softmax_scale must be a float"):
        call(api, q, k, v, softmax_scale=True)
    with pytest.raises(TypeError, match="softmax_scale must be a float"):
        call(api, q, k, v, softmax_scale="0.1")


@pytest.mark.parametrize("api", APIS)
def test_return_lse_flag(api, monkeypatch):
    """Without return_lse (and no gradient) the kernels get no lse to write (STORE_LSE off);
    the output is the same, bit for bit, as with it."""
    import kernels._launch as launch

    lse_args = []
    for name in ("forward_v1", "forward_v2"):
        original = getattr(launch, name)

        def spy(q, k, v, out, lse, *rest, _original=original, **kw):
            lse_args.append(lse)
            return _original(q, k, v, out, lse, *rest, **kw)

        monkeypatch.setattr(launch, name, spy)
    q, k, v = make_qkv(2, 2, 17, 9, 40, layout=layout_of(api))
    out = call(api, q, k, v, causal=True)
    assert isinstance(out, torch.Tensor) and lse_args == [None]
    ref, _ = reference_attention(q, k, v, layout=layout_of(api), causal=True)
    assert_matches(out, ref, TOLERANCE[F32])
    with_lse, lse = call(api, q, k, v, causal=True, return_lse=True)
    assert torch.equal(out, with_lse) and lse_args[1] is not None


def test_split_kv_without_lse():
    """The split-KV merge with and without its lse output."""
    q, k, v = make_qkv(2, 4, 2, 70, 24, kv_heads=2)
    kernel = SelectedKernel("splitkv")
    out = kernel(q, k, v, causal=True)
    with_lse, _ = kernel(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out, with_lse)
    ref, _ = reference_attention(q, k, v, causal=True)
    assert_matches(out, ref, TOLERANCE[F32])


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("kv_heads, seqlen_q", [(4, 1), (2, 3)])
def test_split_kv_merges_in_one_launch(splits, kv_heads, seqlen_q, monkeypatch):
    """Several splits run as one launch: the last split of each tile merges them into the
    NaN-filled output (rows of a window that no split sees give 0), and the counters are
    left at zero for the next launch."""
    from kernels import _counters, _launch, _runtime
    from kernels.api import score_args

    launches = spy_calls(monkeypatch, _runtime, ("launch",))
    q, k, v = make_qkv(2, 4, seqlen_q, 150, 40, kv_heads=kv_heads)
    for window in ((-1, -1), (20, 0), (0, 0)):
        args = score_args(q, k, causal=False, softmax_scale=None, attn_mask=None,
                          window_size=window, softcap=0.0, alibi_slopes=None)
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:3], float("nan"))
        _launch.forward_splitkv(q, k, v, out, lse, args, num_splits=splits)
        ref, ref_lse = reference_attention(q, k, v, window_size=window)
        assert_matches(out, ref, TOLERANCE[F32], what=f"window {window}")
        assert_lse_matches(lse, ref_lse, TOLERANCE[F32])
    assert launches == ["launch"] * 3
    assert not _counters.counters(q.device, 1).any()


@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("causal", [False, True])
def test_tile_order_groups_cover_every_tile(group, causal, monkeypatch):
    """V2's 1-D grid in ``common.tile_order``'s order, whatever the heads per group (here
    B * H = 6: whole groups, a leading partial group, one group of all): every query tile of
    every (batch, head) is computed once, into a NaN-filled output and lse."""
    from kernels import _launch
    from kernels.api import score_args

    monkeypatch.setattr(_launch, "_order_group", lambda *a: group)
    launches = spy_calls(monkeypatch, _launch._runtime, ("launch",))
    q, k, v = make_qkv(2, 3, 45, 45, 24)  # three 16-row tiles of the interpreter's tile
    args = score_args(q, k, causal=causal, softmax_scale=None, attn_mask=None,
                      window_size=(-1, -1), softcap=0.0, alibi_slopes=None)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"))
    _launch.forward_v2(q, k, v, out, lse, args)
    ref, ref_lse = reference_attention(q, k, v, causal=causal)
    assert_matches(out, ref, TOLERANCE[F32])
    assert_lse_matches(lse, ref_lse, TOLERANCE[F32])
    assert launches == ["launch"]


def test_order_group_rule():
    """Heads per ordering group: 1 without a causal mask or on a grid of 16 query tiles of 128
    rows per multiprocessor or more; below, the heads whose K/V fill half the L2 cache (a GQA
    group's query heads share theirs), at least 1, at most all (the CPU counts 4
    multiprocessors and a 1 MiB cache)."""
    from kernels._launch import _order_group

    cpu = torch.device("cpu")
    per_head = 2 * 256 * 64 * 2  # K and V of 256 keys at head_dim 64, fp16
    assert _order_group(cpu, False, 48, 1, 128, 256, 64, 2) == 1
    assert _order_group(cpu, True, 48, 1, 128, 256, 64, 2) == (1 << 19) // per_head
    assert _order_group(cpu, True, 48, 4, 128, 256, 64, 2) == 4 * ((1 << 19) // per_head)
    assert _order_group(cpu, True, 3, 1, 128, 16, 64, 2) == 3
    assert _order_group(cpu, True, 32, 1, 256, 256, 64, 2) == 1  # 64 tiles: 16 per SM
    assert _order_group(cpu, True, 31, 1, 256, 256, 64, 2) == (1 << 19) // per_head
    assert _order_group(cpu, True, 3, 1, 128, 1 << 16, 128, 4) == 1


@pytest.mark.parametrize("api", APIS)
def test_empty_sequences(api):
    """Sk = 0: every row sees no key (out 0, lse -inf); Sq = 0: empty outputs."""
    q, k, v = make_qkv(2, 2, 5, 0, 16, layout=layout_of(api))
    out, lse = call(api, q, k, v, return_lse=True)
    assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
    assert lse.shape == (2, 2, 5) and (lse == float("-inf")).all()
    q, k, v = make_qkv(2, 2, 0, 7, 16, layout=layout_of(api))
    out, lse = call(api, q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)


# ----------------------------------------------------------------------------- strides

def _strided(logical, dtype, device="cpu"):
    """A view of ``logical`` shape (4-D) that is non-contiguous in every dim, with a storage
    offset, made without copying: a permuted, sliced, step-2 view of a larger tensor."""
    d0, d1, d2, d3 = logical
    base = torch.randn(d2 + 3, 2 * d3 + 1, 2 * d0, d1 + 2, device=device).to(dtype)
    view = base.permute(2, 3, 0, 1)[::2, 1:d1 + 1, 2:d2 + 2, 1::2][..., :d3]
    assert view.shape == logical
    assert view.data_ptr() != base.data_ptr()
    assert view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    contiguous_strides = torch.empty(logical).stride()
    for dim in range(4):
        if logical[dim] > 1:
            assert view.stride(dim) != contiguous_strides[dim]
    assert view.stride(3) != 1
    return view


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=DTYPE_NAME.get)
@pytest.mark.parametrize("api", APIS)
def test_strided_views(api, dtype):
    b, h, sq, sk, d = 2, 2, 19, 23, 40
    logical_q = (b, h, sq, d) if api != "bshd" else (b, sq, h, d)
    logical_k = (b, h, sk, d) if api != "bshd" else (b, sk, h, d)
    q, k, v = _strided(logical_q, dtype), _strided(logical_k, dtype), _strided(logical_k, dtype)
    before = [x.clone() for x in (q, k, v)]
    check_call(api, q, k, v, causal=dtype != F32)
    for x, x0 in zip((q, k, v), before, strict=True):
        assert torch.equal(x, x0), "inputs were modified"


@pytest.mark.parametrize("api", APIS)
def test_transposed_and_broadcast_inputs(api):
    """The other layout's tensors transposed into this one, and K/V broadcast over the batch
    with stride 0 (expand)."""
    b, h, sq, sk, d = 2, 2, 17, 33, 48
    other = "bhsd" if api == "bshd" else "bshd"
    q, k, v = make_qkv(b, h, sq, sk, d, layout=other)
    q = q.transpose(1, 2)
    k1, v1 = k[:1].transpose(1, 2), v[:1].transpose(1, 2)
    shape_k = (b,) + tuple(k1.shape[1:])
    k, v = k1.expand(shape_k), v1.expand(shape_k)
    assert k.stride(0) == 0 and not q.is_contiguous()
    check_call(api, q, k, v, causal=True)


@pytest.mark.parametrize("api", APIS)
def test_kernel_reads_the_caller_views(api, monkeypatch):
    """No copy on the way in or out: the kernel launcher gets the caller's q/k/v memory with
    the caller's strides (BSHD as its (1, 2) transpose) and writes the returned output."""
    import kernels._launch as launch

    seen = {}
    for name in ("forward_v1", "forward_v2"):
        original = getattr(launch, name)

        def spy(q, k, v, out, lse, args, *rest, _original=original, _name=name, **kw):
            seen.update(name=_name, q=q, k=k, v=v, out=out)
            return _original(q, k, v, out, lse, args, *rest, **kw)

        monkeypatch.setattr(launch, name, spy)
    layout = layout_of(api)
    q = _strided((2, 2, 17, 24) if layout == "bhsd" else (2, 17, 2, 24), F32)
    k = _strided((2, 2, 20, 24) if layout == "bhsd" else (2, 20, 2, 24), F32)
    v = _strided((2, 2, 20, 24) if layout == "bhsd" else (2, 20, 2, 24), F32)
    out, _, _, _ = check_call(api, q, k, v)
    assert seen["name"] == ("forward_v1" if api == "v1" else "forward_v2")
    to_kernel = (lambda x: x.transpose(1, 2)) if layout == "bshd" else (lambda x: x)
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        got = seen[name]
        assert got.data_ptr() == x.data_ptr(), f"{name} was copied"
        assert got.stride() == to_kernel(x).stride(), f"{name} strides changed"


# ----------------------------------------------------------------------------- auto, selector

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_variant_auto(causal):
    q, k, v = make_qkv(2, 2, 33, 17, 96, dtype=F16)
    out, lse = flash_attention(q, k, v, variant="auto", causal=causal, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, causal=causal)
    assert_matches(out, ref, TOLERANCE[F16])
    assert_lse_matches(lse, ref_lse)


VARIANTS = ("v1", "v2", "splitkv")  # what the selector may pick


def test_selector_bhsd():
    sel = BackendSelector().select_attention(2, 2, 17, 40, dtype=F32, device="cpu")
    assert sel.variant in VARIANTS
    assert sel.layout == "bhsd"
    q, k, v = make_qkv(2, 2, 17, 17, 40)
    out = sel(q, k, v)
    assert_matches(out, reference_attention(q, k, v)[0], TOLERANCE[F32])
    # Other shapes, dtype and causal than the ones it was selected for are still right.
    q, k, v = make_qkv(1, 4, 33, 20, 96, dtype=BF16, kv_heads=2)
    out, lse = sel(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, causal=True)
    assert_matches(out, ref, TOLERANCE[BF16])
    assert_lse_matches(lse, ref_lse)


def test_selector_bshd_and_layout_override():
    sel = BackendSelector().select_attention(2, 2, 17, 40, seq_len_k=33, kv_heads=1,
                                             causal=True, device=torch.device("cpu"),
                                             layout="bshd")
    assert sel.layout == "bshd" and sel.variant in VARIANTS
    q, k, v = make_qkv(2, 2, 17, 33, 40, layout="bshd", kv_heads=1)
    out = sel(q, k, v, causal=True)
    assert out.shape == q.shape
    assert_matches(out, reference_attention(q, k, v, layout="bshd", causal=True)[0],
                   TOLERANCE[F32])
    q, k, v = make_qkv(2, 2, 17, 33, 40, layout="bhsd")
    out = sel(q, k, v, layout="bhsd")
    assert_matches(out, reference_attention(q, k, v)[0], TOLERANCE[F32])
    with pytest.raises(ValueError, match="layout must be"):
        sel(q, k, v, layout="sbhd")


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_selector_decode_shape(layout):
    """A kernel selected for one query row against a long cache: called on small shapes
    (the interpreter is slow), with GQA, causal, Sq > 1 and the lse, it is still right."""
    sel = BackendSelector().select_attention(2, 4, 1, 64, seq_len_k=4096, kv_heads=2,
                                             device="cpu", layout=layout)
    assert sel.variant in VARIANTS and sel.layout == layout
    for sq, sk, causal in [(1, 40, False), (3, 37, True), (17, 20, True)]:
        q, k, v = make_qkv(2, 4, sq, sk, 64, kv_heads=2, layout=layout, dtype=F16)
        out, lse = sel(q, k, v, causal=causal, return_lse=True)
        ref, ref_lse = reference_attention(q, k, v, layout=layout, causal=causal)
        assert_matches(out, ref, TOLERANCE[F16])
        assert_lse_matches(lse, ref_lse)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_selected_kernel_each_variant_bshd(variant):
    """Both variants behind the selector's callable on BSHD tensors (V1 on the BSHD strides)."""
    q, k, v = make_qkv(2, 2, 33, 17, 40, layout="bshd", dtype=F16)
    out, lse = SelectedKernel(variant=variant, layout="bshd")(q, k, v, causal=True,
                                                               return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, layout="bshd", causal=True)
    assert_matches(out, ref, TOLERANCE[F16])
    assert_lse_matches(lse, ref_lse)


# ----------------------------------------------------------------------------- errors

def _t(*shape, dtype=F32, device="cpu"):
    return torch.randn(shape, device=device).to(dtype) if device != "meta" else \
        torch.empty(shape, dtype=dtype, device="meta")


_OK = (2, 2, 8, 16)  # BHSD shapes of a valid call; BSHD of the same values below
ERROR_CASES = [
    ("q-not-tensor", lambda: ([[1.0]], _t(*_OK), _t(*_OK)), TypeError,
     "q must be a torch.Tensor, got list"),
    ("k-not-tensor", lambda: (_t(*_OK), None, _t(*_OK)), TypeError,
     "k must be a torch.Tensor, got NoneType"),
    ("v-numpy", lambda: (_t(*_OK), _t(*_OK), _t(*_OK).numpy()), TypeError,
     "v must be a torch.Tensor, got ndarray"),
    ("q-rank3", lambda: (_t(2, 8, 16), _t(*_OK), _t(*_OK)), ValueError, r"q must be 4-D"),
    ("k-rank5", lambda: (_t(*_OK), _t(1, *_OK), _t(*_OK)), ValueError, r"k must be 4-D"),
    ("batch", lambda: (_t(*_OK), _t(3, 2, 8, 16), _t(3, 2, 8, 16)), ValueError,
     "batch sizes of q, k, v differ"),
    ("kv-heads-differ", lambda: (_t(*_OK), _t(2, 2, 8, 16), _t(2, 1, 8, 16)), ValueError,
     "k and v must have the same number of heads"),
    ("heads-not-multiple", lambda: (_t(2, 3, 8, 16), _t(*_OK), _t(*_OK)), ValueError,
     r"q's heads \(3\) must be a multiple of k/v's heads \(2\)"),
    ("kv-seq-differ", lambda: (_t(*_OK), _t(2, 2, 8, 16), _t(2, 2, 9, 16)), ValueError,
     "k and v must have the same seq_len"),
    ("head-dim", lambda: (_t(*_OK), _t(2, 2, 8, 32), _t(2, 2, 8, 32)), ValueError,
     "head_dim of q, k, v must match"),
    ("v-head-dim", lambda: (_t(*_OK), _t(*_OK), _t(2, 2, 8, 8)), ValueError,
     "head_dim of q, k, v must match"),
    ("mixed-dtype", lambda: (_t(*_OK), _t(*_OK, dtype=F16), _t(*_OK)), TypeError,
     "k has dtype torch.float16 but q has torch.float32"),
    ("mixed-dtype-v", lambda: (_t(*_OK, dtype=BF16), _t(*_OK, dtype=BF16), _t(*_OK)),
     TypeError, "v has dtype torch.float32 but q has torch.bfloat16"),
    ("mixed-device", lambda: (_t(*_OK), _t(*_OK, device="meta"), _t(*_OK)), ValueError,
     "k is on meta but q is on cpu"),
    ("meta-device", lambda: tuple(_t(*_OK, device="meta") for _ in range(3)), ValueError,
     "must be on a CUDA or CPU device"),
    ("int-dtype", lambda: tuple(torch.randint(0, 5, _OK) for _ in range(3)), TypeError,
     "q has dtype torch.int64; expected float16, bfloat16 or float32"),
    ("float64", lambda: tuple(_t(*_OK, dtype=torch.float64) for _ in range(3)), TypeError,
     "expected float16, bfloat16 or float32"),
    ("head-dim-257", lambda: tuple(_t(1, 1, 4, 257) for _ in range(3)), ValueError,
     "head_dim must be between 1 and 256, got 257"),
    ("head-dim-0", lambda: tuple(_t(1, 1, 4, 0) for _ in range(3)), ValueError,
     "head_dim must be between 1 and 256, got 0"),
]


def _bshd(args):
    return tuple(x.transpose(1, 2) if isinstance(x, torch.Tensor) and x.dim() == 4 else x
                 for x in args)


@pytest.mark.parametrize("make, exc, match", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
@pytest.mark.parametrize("entry", ["flash_attention", "flash_attention_v2", "selected"])
def test_input_errors(entry, make, exc, match):
    args = make()
    if entry == "flash_attention":
        fn = flash_attention
    elif entry == "flash_attention_v2":
        fn, args = flash_attention_v2, _bshd(args)
    else:
        fn = BackendSelector().select_attention(2, 2, 8, 16, device="cpu")
    with pytest.raises(exc, match=match):
        fn(*args)


@pytest.mark.parametrize("variant", ["v3", "V2", "", None, "fa2"])
def test_unknown_variant(variant):
    q, k, v = make_qkv(1, 1, 4, 4, 16)
    with pytest.raises(ValueError, match="variant must be one of"):
        flash_attention(q, k, v, variant=variant)


def test_option_errors():
    q, k, v = make_qkv(1, 2, 4, 4, 16)
    with pytest.raises(TypeError, match="causal must be a bool"):
        flash_attention(q, k, v, causal=1)
    for bad in [(1,), (1, 2, 3), (-2, 0), (0.5, 1), "ab", 3]:
        with pytest.raises(ValueError, match="window_size must be a pair of ints"):
            flash_attention(q, k, v, window_size=bad)
    with pytest.raises(ValueError, match="softcap must be a float >= 0"):
        flash_attention(q, k, v, softcap=-1.0)


# ----------------------------------------------------------------------------- CUDA compile

# Pointer element types of the kernels' tensor arguments (others default to the input dtype).
_POINTER_TYPES = {"LSE": "*fp32", "ALIBI": "*fp32", "CU_Q": "*i32", "CU_K": "*i32",
                  "ACC": "*fp32", "M": "*fp32", "L": "*fp32"}
_FLOAT_ARGS = {"qk_scale", "softcap"}


def _compile_for_cuda(fn, dtype: str, constexprs: dict, mask_type: str, tma: bool,
                      num_warps: int, num_stages: int, maxnreg: int | None = None):
    """triton.compile ``fn`` for an sm_90 GPU target on this machine (no GPU needed). With
    ``tma``, Q, K and V are (B, H, S, D) tensor descriptors (kernels that take USE_TMA);
    ``maxnreg`` caps the registers per thread."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "USE_TMA" in fn.arg_names:
        constexprs = {**constexprs, "USE_TMA": tma}
    else:
        assert not tma, f"{fn.__name__} has no USE_TMA"
    block_d = constexprs["BLOCK_D"]
    descriptor_rows = {"Q": constexprs["BLOCK_M"], "K": constexprs["BLOCK_N"],
                       "V": constexprs["BLOCK_N"]}
    first_stride = next(i for i, n in enumerate(fn.arg_names) if n.startswith("stride_"))
    signature = {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if param.is_constexpr:
            assert name in constexprs, f"constexpr {name} not given"
            signature[name] = "constexpr"
        elif tma and name in descriptor_rows:
            signature[name] = f"tensordesc<{dtype}[1, 1, {descriptor_rows[name]}, {block_d}]>"
        elif name == "MASK":
            signature[name] = mask_type
        elif i < first_stride:  # the tensor arguments come first
            signature[name] = _POINTER_TYPES.get(name, f"*{dtype}")
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    params = inspect.signature(ASTSource).parameters
    key = "constexprs" if "constexprs" in params else "constants"
    src = ASTSource(fn=fn, signature=signature, **{key: constexprs})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=_runtime._options(num_warps, num_stages, maxnreg))
    cubin = compiled.asm["cubin"]
    assert isinstance(cubin, bytes) and len(cubin) > 1000
    assert fn.__name__ in compiled.asm["ptx"]
    return compiled


def _constexprs(head_dim, block_m, block_n, **overrides):
    c = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(max(head_dim, 16)),
             BLOCK_M=block_m, BLOCK_N=block_n, BOUNDED_LEFT=False, BOUNDED_RIGHT=False,
             MASK_KIND=0, MASK_KEYS_ONLY=True, HAS_SOFTCAP=False, HAS_ALIBI=False,
             STORE_LSE=True, DOT_PRECISION="ieee")
    c.update(overrides)
    return c


# (dtype, mask pointer type, constexprs, tensor descriptors, num_warps, num_stages[, maxnreg]),
# tiles and warps as in kernels/configs.py's table: plain; every feature; float32 with TF32;
# the TMA (tensor descriptor) path, plain, with every feature, with the head_dim-256 tile and
# with the register-capped head_dim-64 tile.
_V2_COMPILES = [
    ("fp16", "*fp16", _constexprs(64, 128, 64, IS_VARLEN=False, STORE_LSE=False), False, 4, 3),
    ("bf16", "*bf16", _constexprs(80, 128, 64, IS_VARLEN=True, BOUNDED_LEFT=True,
                                  BOUNDED_RIGHT=True, MASK_KIND=2, MASK_KEYS_ONLY=False,
                                  HAS_SOFTCAP=True, HAS_ALIBI=True), False, 8, 3),
    ("fp32", "*u8", _constexprs(256, 32, 32, IS_VARLEN=False, BOUNDED_RIGHT=True, MASK_KIND=1,
                                DOT_PRECISION="tf32"), False, 4, 1),
    ("fp16", "*fp16", _constexprs(128, 128, 64, IS_VARLEN=False, BOUNDED_RIGHT=True), True,
     8, 3),
    ("bf16", "*fp32", _constexprs(40, 128, 64, IS_VARLEN=True, BOUNDED_LEFT=True,
                                  BOUNDED_RIGHT=True, MASK_KIND=2, MASK_KEYS_ONLY=True,
                                  HAS_SOFTCAP=True, HAS_ALIBI=True), True, 4, 3),
    ("fp16", "*fp16", _constexprs(256, 128, 64, IS_VARLEN=False, STORE_LSE=False), True, 8, 2),
    ("bf16", "*bf16", _constexprs(64, 128, 128, IS_VARLEN=False), True, 8, 3, 128),
]
_V1_COMPILES = [
    ("fp16", "*fp16", _constexprs(64, 64, 64, STORE_LSE=False), False, 4, 1),
    ("fp32", "*fp32", _constexprs(96, 32, 32, BOUNDED_LEFT=True, BOUNDED_RIGHT=True,
                                  MASK_KIND=2, MASK_KEYS_ONLY=False, HAS_SOFTCAP=True,
                                  HAS_ALIBI=True, DOT_PRECISION="tf32"), False, 4, 1),
]


@pytest.mark.parametrize("variant, compiles", [("v2", _V2_COMPILES), ("v1", _V1_COMPILES)])
def test_cuda_compile_after_interpreted_launch(variant, compiles, tmp_path, monkeypatch):
    """An interpreted (CPU) launch must not break compiling the same kernels for CUDA in the
    same process, and the interpreter must keep working afterwards. A fresh Triton cache makes
    every run compile for real instead of loading an earlier run's cubin."""
    monkeypatch.setattr(triton.knobs.cache, "dir", str(tmp_path))
    q, k, v = make_qkv(1, 2, 17, 17, 40)
    check_call(variant, q, k, v, causal=True)
    import kernels._triton.v1 as v1_module
    import kernels._triton.v2 as v2_module

    fn = v2_module.attention_fwd_v2 if variant == "v2" else v1_module.attention_fwd_v1
    assert isinstance(fn, triton.runtime.JITFunction), type(fn)
    for dtype, mask_type, constexprs, tma, *options in compiles:
        if tma and "USE_TMA" not in fn.arg_names:
            continue  # a kernel without the tensor-descriptor path
        _compile_for_cuda(fn, dtype, constexprs, mask_type, tma, *options)
    check_call(variant, q, k, v, causal=False, window_size=(3, 2))


# ----------------------------------------------------------------------------- threads

def test_concurrent_cpu_calls():
    """Two threads running interpreted kernels at once both get correct results."""
    jobs = [
        ("v2", dict(shape=(2, 2, 33, 17, 40), dtype=F32), dict(causal=True)),
        ("v1", dict(shape=(2, 2, 17, 33, 96), dtype=F16), dict(window_size=(5, 3))),
        ("bshd", dict(shape=(1, 2, 20, 20, 64), dtype=BF16), dict(softcap=5.0)),
        ("v1", dict(shape=(2, 1, 9, 20, 24), dtype=F32), dict(causal=True)),
    ]
    inputs = []
    for api, spec, kw in jobs:
        b, h, sq, sk, d = spec["shape"]
        inputs.append((api, make_qkv(b, h, sq, sk, d, dtype=spec["dtype"],
                                     layout=layout_of(api)), kw))
    results: dict[int, object] = {}
    barrier = threading.Barrier(2)

    def worker(indices):
        try:
            barrier.wait(timeout=60)
            for i in indices:
                api, (q, k, v), kw = inputs[i]
                results[i] = call(api, q, k, v, return_lse=True, **kw)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            results[-1] = e

    threads = [threading.Thread(target=worker, args=(idx,)) for idx in ([0, 1], [2, 3])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    if -1 in results:
        raise results[-1]
    for i, (api, (q, k, v), kw) in enumerate(inputs):
        out, lse = results[i]
        ref, ref_lse = reference_attention(q, k, v, layout=layout_of(api), **kw)
        assert_matches(out, ref, TOLERANCE[q.dtype], what=f"job {i}")
        assert_lse_matches(lse, ref_lse)


def test_public_names():
    assert set(kernels.__all__) >= {"flash_attention", "flash_attention_v2",
                                    "flash_attention_varlen", "BackendSelector"}


def test_mask_rows_realigned_and_decode_masks_keys_only():
    """A mask with a row per query whose rows are not 16-byte aligned (odd Sk: every padded
    prefill) reaches the kernels copied into aligned rows, broadcast dims kept; a one-query
    mask is read as a key vector. Both give the reference's answer, in each variant."""
    from kernels._launch import ScoreArgs

    def args_for(mask):
        return ScoreArgs(0.1, False, -1, -1, 0.0, mask, None)

    batch, heads, sq, sk = 2, 4, 5, 19
    rows = torch.rand(batch, 1, sq, sk) > 0.3
    view = rows.expand(batch, heads, sq, sk)
    mask, strides = args_for(view).mask_arg(view)
    assert mask.dtype == torch.uint8 and strides[1] == 0 and strides[2] % 16 == 0
    assert torch.equal(mask.bool(), view)
    aligned = torch.ones(batch, 1, sq, 32, dtype=torch.bool)[..., :16].expand(batch, heads, sq, 16)
    assert args_for(aligned).mask_arg(aligned)[0].data_ptr() == aligned.data_ptr(), "no copy"
    one_query = torch.rand(batch, heads, 1, sk) > 0.3
    _, flags = args_for(one_query).kernel_args()
    assert flags["MASK_KEYS_ONLY"]
    assert args_for(one_query).mask_arg(one_query)[0].data_ptr() == one_query.data_ptr()

    for variant in VARIANTS:
        for sq_, mask in [(sq, rows), (sq, torch.randn(batch, heads, sq, sk)),
                          (1, one_query), (1, torch.randn(batch, heads, 1, sk))]:
            q, k, v = make_qkv(batch, heads, sq_, sk, 40, kv_heads=2, dtype=F16)
            out = SelectedKernel(variant)(q, k, v, attn_mask=mask)
            ref, _ = reference_attention(q, k, v, attn_mask=mask)
            assert_matches(out, ref, TOLERANCE[F16], what=f"{variant} mask {tuple(mask.shape)}")


def test_selector_decode_threshold_eager_and_compiled(monkeypatch):
    """Split-KV decode from 128 keys and up to 16 query rows, the same in eager mode and in a
    torch.compile graph (its merge is fused: one launch whatever the split count)."""
    from kernels.selector import choose_variant

    shape = dict(batch=1, heads=32, seq_len=1, seq_len_k=384, head_dim=64, kv_heads=8,
                 dtype=F16, causal=False)
    cpu = torch.device("cpu")
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        assert choose_variant(cpu, **shape) == "splitkv"
        assert choose_variant(cpu, **{**shape, "seq_len_k": 128, "seq_len": 16}) == "splitkv"
        assert choose_variant(cpu, **{**shape, "seq_len_k": 127}) == "v2"
        assert choose_variant(cpu, **{**shape, "seq_len": 17}) == "v2"
