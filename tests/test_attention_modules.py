"""FlashSelfAttention and FlashCrossAttention (flash-attn's module contract) against the float64
reference, and the CPU policies: FLASHATTN_CPU_BACKEND=sdpa (PyTorch) against =triton (the
kernels through the interpreter) in one process.

Shapes are tiny and drawn at random on each run (seed printed by conftest.py). GPU tests
(fp16 / bf16) are marked ``gpu``.
"""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
from torch import nn

import flashattn_modules._dispatch as dispatch_module
import flashattn_modules.attention as attention_module
from flashattn_modules import FlashCrossAttention, FlashMultiheadAttention, FlashSelfAttention
from tests.reference import (
    TOLERANCE,
    assert_matches,
    reference_attention,
    reference_varlen,
    rel_err,
)
from tests.test_kernels import spy_calls

F32 = torch.float32
TOL = TOLERANCE[F32]


@pytest.fixture(autouse=True)
def _triton_policy(monkeypatch):
    monkeypatch.setenv("FLASHATTN_CPU_BACKEND", "triton")
    monkeypatch.setattr(attention_module, "_shown_notices", set())


@pytest.fixture
def calls(monkeypatch):
    """Names of the kernel entry points the modules call, in order."""
    return spy_calls(monkeypatch, attention_module,
                     ("kernel_attention", "flash_attention_varlen"))


def _slopes(heads: int) -> torch.Tensor:
    return torch.rand(heads) * 0.5 + 0.1


def _keep_mask(batch: int, seqlen: int) -> torch.Tensor:
    """(B, S) bool, True = keep, at least one key kept per row."""
    keep = torch.rand(batch, seqlen) < 0.7
    keep[torch.arange(batch), torch.randint(seqlen, (batch,))] = True
    return keep


def _cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


# ----------------------------------------------------------------------------- dense

SELF_CASES = [
    dict(layout="bshd"),
    dict(layout="bhsd", causal=True),
    dict(layout="bshd", causal=True, window_size=(2, 0), alibi=True),
    dict(layout="bhsd", window_size=(1, 2), softmax_scale=0.3, key_padding_mask=True),
    dict(layout="bshd", key_padding_mask=True, override=True, alibi=True),
]


@pytest.mark.parametrize("case", SELF_CASES, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items()))
def test_self_attention_matches_reference(case, calls):
    batch, seqlen = random.randint(1, 2), random.randint(1, 12)
    heads, head_dim = random.randint(1, 3), random.choice([4, 8, 16])
    layout = case["layout"]
    slopes = _slopes(heads) if case.get("alibi") else None
    module = FlashSelfAttention(causal=case.get("causal", False),
                                softmax_scale=case.get("softmax_scale"),
                                window_size=case.get("window_size", (-1, -1)),
                                alibi_slopes=slopes, layout=layout)
    shape = (batch, seqlen, 3, heads, head_dim) if layout == "bshd" else (
        batch, 3, heads, seqlen, head_dim)
    qkv = torch.randn(shape)
    keep = _keep_mask(batch, seqlen) if case.get("key_padding_mask") else None
    causal = not module.causal if case.get("override") else module.causal
    out = module(qkv, causal=causal if case.get("override") else None,
                 key_padding_mask=keep)
    q, k, v = qkv.unbind(2 if layout == "bshd" else 1)
    expected, _ = reference_attention(
        q, k, v, layout=layout, causal=causal, softmax_scale=case.get("softmax_scale"),
        attn_mask=None if keep is None else keep[:, None, None, :],
        window_size=case.get("window_size", (-1, -1)), alibi_slopes=slopes)
    assert out.is_contiguous() and out.dtype == F32
    assert_matches(out, expected, TOL)
    assert calls == ["kernel_attention"]


@pytest.mark.parametrize("layout, kv_heads, causal", [
    ("bshd", 2, True), ("bhsd", 1, False), ("bhsd", 4, True)])
def test_cross_attention_matches_reference(layout, kv_heads, causal, calls):
    batch, heads, head_dim = 2, 4, 8
    seqlen_q, seqlen_k = random.randint(1, 10), random.randint(1, 10)
    module = FlashCrossAttention(causal=causal, layout=layout)
    if layout == "bshd":
        q = torch.randn(batch, seqlen_q, heads, head_dim)
        kv = torch.randn(batch, seqlen_k, 2, kv_heads, head_dim)
        k, v = kv.unbind(2)
    else:
        q = torch.randn(batch, heads, seqlen_q, head_dim)
        kv = torch.randn(batch, 2, kv_heads, seqlen_k, head_dim)
        k, v = kv.unbind(1)
    out = module(q, kv)
    expected, _ = reference_attention(q, k, v, layout=layout, causal=causal)
    if causal and seqlen_q > seqlen_k:  # bottom-right: the first rows see no key
        assert (expected.abs().sum(-1) == 0).any()
    if expected.abs().max() > 0:
        assert_matches(out, expected, TOL)
    else:
        assert (out == 0).all()
    assert calls == ["kernel_attention"]


# ----------------------------------------------------------------------------- varlen

@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("grad, fused_backward", [(False, False), (True, False), (True, True)],
                         ids=["no_grad", "grad", "grad-fused-backward"])
def test_varlen_matches_reference(cross, grad, fused_backward, calls, monkeypatch):
    """Without grad the varlen kernel runs; with grad too when its backward is fused (the
    rule faked here: on the CPU it is not), else the padded dense path."""
    if fused_backward:
        monkeypatch.setattr(attention_module, "varlen_backward_is_fused",
                            lambda q, alibi_slopes=None: True)
    batch, heads, head_dim = 3, 2, 8
    # Sequence 0 has rows that see two keys or more, so that no gradient is zero throughout.
    lengths_q = [random.randint(2, 7)] + [random.randint(1, 7) for _ in range(batch - 1)]
    lengths_k = [random.randint(2, 7)] + [random.randint(0, 7) for _ in range(batch - 1)]
    lengths_k = lengths_k if cross else lengths_q
    cu_q, cu_k = _cu_seqlens(lengths_q), _cu_seqlens(lengths_k)
    slopes = _slopes(heads)
    window = (random.randint(1, 4), -1)
    options = dict(causal=True, window_size=window, alibi_slopes=slopes)
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    if cross:
        module = FlashCrossAttention(**options)
        q = torch.randn(total_q, heads, head_dim, requires_grad=grad)
        kv = torch.randn(total_k, 2, 1, head_dim, requires_grad=grad)  # MQA
        out = module(q, kv, cu_seqlens=cu_q, max_seqlen=max(lengths_q), cu_seqlens_k=cu_k,
                     max_seqlen_k=max(lengths_k) + 1)  # a loose bound is allowed
        leaves = (q, kv)
        k, v = kv.unbind(1)
    else:
        module = FlashSelfAttention(**options)
        qkv = torch.randn(total_q, 3, heads, head_dim, requires_grad=grad)
        out = module(qkv, cu_seqlens=cu_q, max_seqlen=max(lengths_q))
        leaves = (qkv,)
        q, k, v = qkv.unbind(1)
    expected, _ = reference_varlen(q, k, v, cu_q, cu_k, **options)
    assert out.shape == (total_q, heads, head_dim)
    assert_matches(out, expected, TOL)
    # With grad and no fused varlen backward: the padded dense path (one batched backward).
    padded = grad and not fused_backward
    assert calls == (["kernel_attention"] if padded else ["flash_attention_varlen"])
    if grad:
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad((out * grad_out).sum(), leaves)
        expected_grads = torch.autograd.grad((expected * grad_out.double()).sum(), leaves)
        for got, want in zip(grads, expected_grads, strict=True):
            assert_matches(got, want, 1e-4, what="grad")


# ----------------------------------------------------------------------------- dropout

def test_attention_dropout_runs_torch_in_training_only(calls):
    batch, seqlen, heads, head_dim = 2, 8, 2, 8
    slopes = _slopes(heads)
    module = FlashSelfAttention(causal=True, attention_dropout=0.3, window_size=(4, 0),
                                alibi_slopes=slopes)
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, requires_grad=True)
    keep = _keep_mask(batch, seqlen)
    module.eval()
    out_eval = module(qkv, key_padding_mask=keep)
    assert calls == ["kernel_attention"], "eval ignores dropout: the kernels run"
    q, k, v = qkv.unbind(2)
    expected, _ = reference_attention(q, k, v, layout="bshd", causal=True, window_size=(4, 0),
                                      alibi_slopes=slopes, attn_mask=keep[:, None, None, :])
    assert_matches(out_eval, expected, TOL)

    module.train()
    with pytest.warns(UserWarning, match="attention dropout in training"):
        first = module(qkv, key_padding_mask=keep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown once
        draws = torch.stack([module(qkv, key_padding_mask=keep) for _ in range(400)])
    assert calls == ["kernel_attention"], "training with dropout must not run the kernels"
    assert rel_err(first, out_eval) > 1e-2, "no dropout was applied"
    # Inverted dropout: the mean over draws is the eval output (masks, window and ALiBi held).
    assert rel_err(draws.mean(0), out_eval) < 0.1
    first.sum().backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- validation

def test_constructor_and_buffers():
    slopes = _slopes(2)
    module = FlashSelfAttention(alibi_slopes=slopes, deterministic=True, layout="bhsd")
    assert module.alibi_slopes is slopes and module.state_dict() == {}
    assert module.drop.p == 0.0 and module.window_size == (-1, -1)
    assert "layout='bhsd'" in repr(module)
    for kwargs, exc, match in [
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(softmax_scale="0.5"), TypeError, "softmax_scale"),
        (dict(attention_dropout=1.5), ValueError, "attention_dropout"),
        (dict(window_size=(3,)), ValueError, "window_size"),
        (dict(window_size=(-2, 0)), ValueError, "window_size"),
        (dict(alibi_slopes=torch.ones(2, 2, 2)), ValueError, "alibi_slopes"),
        (dict(alibi_slopes=[0.5]), TypeError, "alibi_slopes"),
        (dict(layout="sbhd"), ValueError, "layout"),
        (dict(deterministic=None), TypeError, "deterministic"),
    ]:
        with pytest.raises(exc, match=match):
            FlashCrossAttention(**kwargs)


def test_half_module_keeps_float32_slopes(calls):
    heads = 2
    slopes = _slopes(heads)
    module = FlashSelfAttention(alibi_slopes=slopes).half()  # casts the buffer to fp16
    assert module.alibi_slopes.dtype == torch.float16
    qkv = torch.randn(1, 5, 3, heads, 8)
    out = module(qkv.half())
    q, k, v = qkv.half().unbind(2)
    expected, _ = reference_attention(q, k, v, layout="bshd",
                                      alibi_slopes=module.alibi_slopes.float())
    assert_matches(out.float(), expected, TOLERANCE[torch.float16])


def test_forward_validation():
    self_attn, cross_attn = FlashSelfAttention(), FlashCrossAttention(layout="bhsd")
    qkv = torch.randn(2, 5, 3, 2, 8)
    cu = _cu_seqlens([2, 3])
    cases = [
        (lambda: self_attn(qkv[:, :, :2]), ValueError, r"\(B, S, 3, H, D\)"),
        (lambda: self_attn(qkv, causal=1), TypeError, "causal must be a bool"),
        (lambda: self_attn(qkv[0], cu_seqlens=cu), ValueError, "max_seqlen must be an int"),
        (lambda: self_attn(qkv, cu_seqlens=cu, max_seqlen=3), ValueError, r"\(total, 3, H, D\)"),
        (lambda: self_attn(qkv[0], cu_seqlens=cu.long(), max_seqlen=3), ValueError, "int32"),
        (lambda: self_attn(qkv[0], cu_seqlens=cu, max_seqlen=3,
                           key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
         ValueError, "already unpadded"),
        (lambda: self_attn(qkv, key_padding_mask=torch.ones(2, 5)), TypeError, "bool"),
        (lambda: self_attn(qkv, key_padding_mask=torch.ones(2, 4, dtype=torch.bool)),
         ValueError, r"\(2, 5\)"),
        (lambda: self_attn(qkv.numpy()), TypeError, "qkv must be a torch.Tensor"),
        (lambda: cross_attn(torch.randn(2, 2, 5, 8), torch.randn(2, 5, 2, 2, 8)), ValueError,
         r"\(B, 2, Hkv, Sk, D\)"),
        (lambda: cross_attn(torch.randn(5, 2, 8), torch.randn(5, 2, 2, 8), cu_seqlens=cu,
                            max_seqlen=3), ValueError, "given together"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


# ----------------------------------------------------------------------------- CPU policies

def _forbid_kernels(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the sdpa policy must not run the Triton kernels")

    monkeypatch.setattr(dispatch_module, "flash_attention", forbidden)
    monkeypatch.setattr(attention_module, "flash_attention_v2", forbidden)
    monkeypatch.setattr(attention_module, "flash_attention_varlen", forbidden)


def test_cpu_policy_parity_sdpa_vs_triton(monkeypatch):
    """Same calls under FLASHATTN_CPU_BACKEND=triton then =sdpa: masks, bottom-right causal,
    windows, ALiBi, GQA, varlen and rows that see no key give the same results."""
    heads, head_dim = 4, 8
    slopes = _slopes(heads)
    self_bshd = FlashSelfAttention(causal=True, window_size=(3, -1), alibi_slopes=slopes)
    self_bhsd = FlashSelfAttention(causal=True, layout="bhsd")
    cross = FlashCrossAttention(causal=True, window_size=(-1, 1))
    mha = FlashMultiheadAttention(16, 2, batch_first=True).eval()
    for p in (mha.in_proj_bias, mha.out_proj.bias):
        nn.init.normal_(p)

    qkv = torch.randn(2, 7, 3, heads, head_dim)
    keep = _keep_mask(2, 7)
    keep[1, :3] = False  # with causal masking, rows 0-2 of batch 1 see no key
    qkv_bhsd = torch.randn(2, 3, heads, 6, head_dim)
    q = torch.randn(2, 9, heads, head_dim)  # Sq > Sk: bottom-right causal empties rows 0-3
    kv = torch.randn(2, 5, 2, 2, head_dim)
    lengths = [3, 5]
    packed = torch.randn(8, 3, heads, head_dim)
    x = torch.randn(2, 6, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1] = True  # batch 1 sees no key
    attn_mask = nn.Transformer.generate_square_subsequent_mask(6)

    def run_all():
        with torch.no_grad():
            return [
                self_bshd(qkv, key_padding_mask=keep),
                self_bhsd(qkv_bhsd),
                cross(q, kv),
                self_bshd(packed, cu_seqlens=_cu_seqlens(lengths), max_seqlen=5),
                *mha(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, is_causal=True,
                     average_attn_weights=False),
            ]

    results_triton = run_all()
    monkeypatch.setenv("FLASHATTN_CPU_BACKEND", "sdpa")
    _forbid_kernels(monkeypatch)
    results_sdpa = run_all()
    assert (results_triton[0][1, :3] == 0).all() and (results_triton[2][:, :4] == 0).all()
    assert torch.allclose(results_triton[4][1], mha.out_proj.bias.detach().expand(6, 16))
    for name, got, want in zip(["self bshd", "self bhsd", "cross", "varlen", "mha", "weights"],
                               results_sdpa, results_triton, strict=True):
        assert_matches(got, want, TOL, what=name)


def test_cpu_policy_sdpa_gradients(monkeypatch):
    monkeypatch.setenv("FLASHATTN_CPU_BACKEND", "sdpa")
    _forbid_kernels(monkeypatch)
    module = FlashSelfAttention(causal=True, alibi_slopes=_slopes(2))
    lengths = [4, 2, 5]
    packed = torch.randn(sum(lengths), 3, 2, 8, requires_grad=True)
    cu = _cu_seqlens(lengths)
    out = module(packed, cu_seqlens=cu, max_seqlen=5)
    q, k, v = packed.unbind(1)
    expected, _ = reference_varlen(q, k, v, cu, cu, causal=True,
                                   alibi_slopes=module.alibi_slopes)
    assert_matches(out, expected, TOL)
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad((out * grad_out).sum(), packed)
    (want,) = torch.autograd.grad((expected * grad_out.double()).sum(), packed)
    assert_matches(got, want, 1e-4, what="grad")


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_gpu_self_and_cross(dtype, layout, gpu_device):
    batch, seqlen, heads, head_dim = 2, 300, 8, 64
    slopes = _slopes(heads).to(gpu_device)
    self_attn = FlashSelfAttention(causal=True, window_size=(128, 0), alibi_slopes=slopes,
                                   layout=layout)
    shape = (batch, seqlen, 3, heads, head_dim) if layout == "bshd" else (
        batch, 3, heads, seqlen, head_dim)
    qkv = torch.randn(shape, device=gpu_device, dtype=dtype, requires_grad=True)
    keep = _keep_mask(batch, seqlen).to(gpu_device)
    out = self_attn(qkv, key_padding_mask=keep)
    q, k, v = qkv.unbind(2 if layout == "bshd" else 1)
    expected, _ = reference_attention(q, k, v, layout=layout, causal=True, window_size=(128, 0),
                                      alibi_slopes=slopes, attn_mask=keep[:, None, None, :])
    assert out.dtype == dtype and out.is_contiguous()
    assert_matches(out.float(), expected, TOLERANCE[dtype])
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * grad_out).sum(), qkv)
    (grad64,) = torch.autograd.grad((expected * grad_out.double()).sum(), qkv)
    assert_matches(grad.float(), grad64, 4 * TOLERANCE[dtype], what="grad")

    cross = FlashCrossAttention(causal=True, layout=layout)
    q = torch.randn(batch, 200, heads, head_dim, device=gpu_device, dtype=dtype)
    kv = torch.randn(batch, 333, 2, 2, head_dim, device=gpu_device, dtype=dtype)
    k, v = kv.unbind(2)
    if layout == "bhsd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        kv = torch.stack([k, v], dim=1)
    expected, _ = reference_attention(q, k, v, layout=layout, causal=True)
    assert_matches(cross(q, kv).float(), expected, TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_varlen_and_mha_policy(dtype, gpu_device, calls):
    """Packed training: the varlen kernel with FlashAttention-2's fused varlen backward;
    with ALiBi (no fused backward) the padded dense path."""
    lengths = [100, 1, 257, 64]
    cu = _cu_seqlens(lengths).to(gpu_device)
    packed = torch.randn(sum(lengths), 3, 4, 64, device=gpu_device, dtype=dtype)
    slopes = _slopes(4).to(gpu_device)
    for alibi, path in ((None, "flash_attention_varlen"), (slopes, "kernel_attention")):
        module = FlashSelfAttention(causal=True, alibi_slopes=alibi)
        packed64 = packed.double().requires_grad_()
        q, k, v = packed64.unbind(1)
        expected, _ = reference_varlen(q, k, v, cu, cu, causal=True, alibi_slopes=alibi)
        calls.clear()
        assert_matches(module(packed, cu_seqlens=cu, max_seqlen=max(lengths)).float(), expected,
                       TOLERANCE[dtype])
        assert calls == ["flash_attention_varlen"]
        calls.clear()
        leaf = packed.clone().requires_grad_()
        out_grad = module(leaf, cu_seqlens=cu, max_seqlen=max(lengths))
        assert calls == [path]
        assert_matches(out_grad.float(), expected, TOLERANCE[dtype])
        grad_out = torch.randn_like(out_grad)
        (grad,) = torch.autograd.grad((out_grad * grad_out).sum(), leaf)
        (grad64,) = torch.autograd.grad((expected * grad_out.double()).sum(), packed64)
        assert_matches(grad.float(), grad64, 4 * TOLERANCE[dtype], what="grad")
    # The module ignores FLASHATTN_CPU_BACKEND on CUDA.
    reference = nn.MultiheadAttention(128, 2, device=gpu_device).eval()
    mha = FlashMultiheadAttention.from_torch(copy.deepcopy(reference)).to(dtype)
    x = torch.randn(50, 3, 128, device=gpu_device, dtype=dtype)
    want, _ = reference.double()(x.double(), x.double(), x.double())
    got, _ = mha(x, x, x, need_weights=False)
    assert_matches(got.float(), want, 4 * TOLERANCE[dtype])
