"""FlashMultiheadAttention and replace_multihead_attention against torch.nn.MultiheadAttention.

CPU tests run the Triton kernels through the interpreter (FLASHATTN_CPU_BACKEND=triton) and
compare with torch's module run in float64 on the same weights, by relative error. Shapes are
tiny and drawn at random on each run (seed printed by conftest.py); every case is built so that
the compared values are not zero. GPU tests (fp16 / bf16) are marked ``gpu``.
"""

from __future__ import annotations

import copy
import io
import random
import warnings

import pytest
import torch
from torch import nn

import flashattn_modules.attention as attention_module
import flashattn_modules.mha as mha_module
from flashattn_modules import FlashMultiheadAttention, replace_multihead_attention
from tests.reference import TOLERANCE, assert_matches, rel_err

F32 = torch.float32
TOL = TOLERANCE[F32]
# torch's own notices, from the reference modules
pytestmark = [
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning"),
]


@pytest.fixture(autouse=True)
def _triton_policy(monkeypatch):
    monkeypatch.setenv("FLASHATTN_CPU_BACKEND", "triton")
    monkeypatch.setattr(attention_module, "_shown_notices", set())


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the keyword options of every kernel call the MHA module makes."""
    calls = []
    real = mha_module.kernel_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mha_module, "kernel_attention", spy)
    return calls


# ----------------------------------------------------------------------------- helpers

def _pair(seed: int | None = None, **config) -> tuple[nn.MultiheadAttention,
                                                      FlashMultiheadAttention]:
    """torch's module and ours built from the same seed (so with the same initial values)."""
    seed = torch.seed() if seed is None else seed
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(**config)
    torch.manual_seed(seed)
    ours = FlashMultiheadAttention(**config)
    for param in ref.parameters():  # non-zero biases, so that they are tested too
        if param.dim() == 1 or param.shape[:2] == (1, 1):
            with torch.no_grad():
                param.normal_()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _mask(kind: str | None, shape: tuple[int, ...]):
    """A torch-convention mask of ``shape``: bool (True = masked out) or float (added, with
    some -inf); None for no mask."""
    if kind is None:
        return None
    masked = torch.rand(shape) < 0.4
    if kind == "bool":
        return masked
    return torch.randn(shape).masked_fill(masked, float("-inf"))


def _unmask(mask: torch.Tensor, index: tuple) -> None:
    """Make mask[index] visible (False, or a finite float) in place."""
    mask[index] = False if mask.dtype == torch.bool else 0.5


def _to64(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _reference(ref: nn.MultiheadAttention, query, key, value, *, need_weights=True,
               average_attn_weights=True, **masks):
    """torch's module in float64 on the same weights (weights path, which honours every
    mask)."""
    ref64 = copy.deepcopy(ref).double()
    same_kv = key is value
    query64 = _to64(query)
    key64 = query64 if key is query else _to64(key)
    value64 = key64 if same_kv else _to64(value)
    out, weights = ref64(query64, key64, value64, need_weights=True,
                         average_attn_weights=average_attn_weights,
                         **{name: _to64(m) for name, m in masks.items()})
    return out, (weights if need_weights else None)


# ----------------------------------------------------------------------------- construction

CONFIGS = [
    dict(embed_dim=16, num_heads=4),
    dict(embed_dim=12, num_heads=3, bias=False, batch_first=True),
    dict(embed_dim=16, num_heads=2, add_bias_kv=True, add_zero_attn=True, dropout=0.1),
    dict(embed_dim=8, num_heads=1, kdim=6, vdim=10),
    dict(embed_dim=8, num_heads=2, kdim=8, vdim=8, bias=False, add_bias_kv=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                   c.items()))
def test_same_parameters_attributes_and_init(config):
    seed = torch.seed()
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(**config)
    after_ref = torch.rand(3)
    torch.manual_seed(seed)
    ours = FlashMultiheadAttention(**config)
    after_ours = torch.rand(3)
    assert torch.equal(after_ref, after_ours), "construction drew a different random stream"
    assert isinstance(ours, nn.MultiheadAttention)
    assert list(ours._parameters) == list(ref._parameters)
    named_ref, named_ours = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert list(named_ours) == list(named_ref)
    for name, param in named_ref.items():
        assert named_ours[name].shape == param.shape, name
        assert torch.equal(named_ours[name], param), f"{name} initialised differently"
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert type(ours.out_proj) is type(ref.out_proj)
    assert type(ours.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "batch_first",
                 "_qkv_same_embed_dim", "dropout", "add_zero_attn", "bias_k", "bias_v",
                 "training"):
        ref_value, our_value = getattr(ref, attr), getattr(ours, attr)
        if isinstance(ref_value, torch.Tensor):
            assert torch.equal(ref_value, our_value), attr
        else:
            assert ref_value == our_value, attr


def test_device_and_dtype_arguments():
    ours = FlashMultiheadAttention(8, 2, kdim=4, device="cpu", dtype=torch.float64)
    assert {p.dtype for p in ours.parameters()} == {torch.float64}
    assert {p.device.type for p in ours.parameters()} == {"cpu"}


@pytest.mark.parametrize("args, exc, match", [
    ((0, 2), ValueError, "greater than 0"),
    ((8, -1), ValueError, "greater than 0"),
    ((10, 3), (ValueError, AssertionError), "divisible"),
    ((8.0, 2), TypeError, "embed_dim must be an int"),
    ((8, 2, 1.5), ValueError, "dropout"),
    ((8, 2, 0.0, True, False, False, 0), ValueError, "kdim"),
])
def test_constructor_validation(args, exc, match):
    for exc_type in (exc if isinstance(exc, tuple) else (exc,)):
        with pytest.raises(exc_type, match=match):
            FlashMultiheadAttention(*args)


def pickle_roundtrip(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_state_dict_round_trips_copy_and_save(kernel_calls):
    config = dict(embed_dim=16, num_heads=4, add_bias_kv=True, batch_first=True)
    ref, ours = _pair(**config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    fresh = FlashMultiheadAttention(**config)
    fresh.load_state_dict(ref.state_dict(), strict=True)
    loaded = pickle_roundtrip(ours)
    clone = copy.deepcopy(ours)
    x = torch.randn(2, 5, 16)
    expected, _ = _reference(ref, x, x, x)
    for module in (ours, fresh, loaded, clone):
        assert type(module) is FlashMultiheadAttention
        assert list(module._forward_pre_hooks.values()) == [mha_module._skip_fused_paths]
        out, weights = module(x, x, x, need_weights=False)
        assert weights is None
        assert_matches(out, expected, TOL)
    assert len(kernel_calls) == 4, "every copy must keep running our forward"
    assert not any(p.data_ptr() == q.data_ptr()
                   for p, q in zip(clone.parameters(), ours.parameters(), strict=True))


def test_from_torch_shares_parameters_and_keeps_mode():
    ref = nn.MultiheadAttention(16, 4, kdim=8, vdim=12, add_bias_kv=True, dropout=0.2,
                                batch_first=True, dtype=torch.float64)
    ref.eval()
    state = torch.get_rng_state()
    ours = FlashMultiheadAttention.from_torch(ref)
    assert torch.equal(state, torch.get_rng_state()), "from_torch drew random numbers"
    assert not ours.training
    assert ours.out_proj is ref.out_proj
    for (name, p), (ref_name, q) in zip(ours.named_parameters(), ref.named_parameters(),
                                        strict=True):
        assert name == ref_name and p is q
    assert all(p.device.type == "cpu" and p.dtype == torch.float64 for p in ours.parameters())
    assert (ours.dropout, ours.batch_first, ours.kdim, ours.vdim) == (0.2, True, 8, 12)
    with pytest.raises(TypeError, match="mha must be"):
        FlashMultiheadAttention.from_torch(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- forward

# Each case: constructor options, inputs ("self": query is key is value; "kv": key is value;
# "distinct"), attn_mask kind and form ("2d" (L, S) or "3d" per head), key_padding_mask kind,
# need_weights / average_attn_weights, batched.
FORWARD_CASES = [
    dict(cfg=dict(), inputs="self", attn=None, kpm=None, weights="avg"),
    dict(cfg=dict(batch_first=True), inputs="self", attn=("bool", "2d"), kpm="bool",
         weights=None),
    dict(cfg=dict(batch_first=True), inputs="self", attn=("float", "2d"), kpm=None,
         weights="heads"),
    dict(cfg=dict(), inputs="kv", attn=("bool", "3d"), kpm="bool", weights="avg"),
    dict(cfg=dict(kdim=12, vdim=8), inputs="distinct", attn=("float", "3d"), kpm="float",
         weights=None),
    dict(cfg=dict(kdim=12, vdim=20, bias=False, batch_first=True), inputs="distinct",
         attn=None, kpm="bool", weights="heads"),
    dict(cfg=dict(), inputs="self", attn=("bool", "2d"), kpm="bool", weights="heads",
         batched=False),
    dict(cfg=dict(add_bias_kv=True), inputs="kv", attn=("float", "3d"), kpm=None,
         weights=None, batched=False),
    dict(cfg=dict(batch_first=True, add_bias_kv=True, add_zero_attn=True), inputs="self",
         attn=("bool", "2d"), kpm="bool", weights="avg"),
    dict(cfg=dict(add_zero_attn=True), inputs="kv", attn=("float", "2d"), kpm="bool",
         weights=None),
    dict(cfg=dict(batch_first=True, bias=False, add_bias_kv=True), inputs="kv",
         attn=("bool", "3d"), kpm=None, weights=None),
    dict(cfg=dict(), inputs="distinct", attn=None, kpm="float", weights="heads"),
    dict(cfg=dict(batch_first=True, kdim=6, vdim=10, add_zero_attn=True), inputs="distinct",
         attn=("bool", "3d"), kpm="bool", weights="avg", batched=False),
    dict(cfg=dict(embed_dim=12, num_heads=3), inputs="self", attn=("float", "2d"), kpm=None,
         weights="heads"),
    dict(cfg=dict(embed_dim=8, num_heads=1, batch_first=True), inputs="kv", attn=None,
         kpm="bool", weights="avg"),
]


def _case_id(case):
    parts = [",".join(f"{k}={v}" for k, v in case["cfg"].items()) or "default", case["inputs"],
             f"attn={case['attn'] and '-'.join(case['attn'])}", f"kpm={case['kpm']}",
             f"weights={case['weights']}"]
    if not case.get("batched", True):
        parts.append("unbatched")
    return "/".join(parts)


def _forward_inputs(case, ours):
    """Random inputs and masks for a case; every query row keeps a visible key."""
    batched = case.get("batched", True)
    batch = random.randint(1, 2)
    seqlen_q = random.randint(1, 9)
    seqlen_k = seqlen_q if case["inputs"] == "self" else random.randint(1, 9)
    heads, embed = ours.num_heads, ours.embed_dim

    def tensor(seqlen, dim):
        if not batched:
            return torch.randn(seqlen, dim)
        return torch.randn(batch, seqlen, dim) if ours.batch_first else torch.randn(
            seqlen, batch, dim)

    query = tensor(seqlen_q, embed)
    if case["inputs"] == "self":
        key = value = query
    elif case["inputs"] == "kv":
        key = value = tensor(seqlen_k, embed)
    else:
        key, value = tensor(seqlen_k, ours.kdim), tensor(seqlen_k, ours.vdim)
    nb = batch if batched else 1
    rows = torch.arange(nb)
    keep_key = torch.randint(seqlen_k, (nb,))  # visible to every query of batch element b
    masks = {}
    if case["kpm"] is not None:
        kpm = _mask(case["kpm"], (nb, seqlen_k))
        _unmask(kpm, (rows, keep_key))
        masks["key_padding_mask"] = kpm if batched else kpm[0]
    if case["attn"] is not None:
        kind, form = case["attn"]
        if form == "2d":
            attn_mask = _mask(kind, (seqlen_q, seqlen_k))
            _unmask(attn_mask, (slice(None), keep_key))
        else:
            attn_mask = _mask(kind, (nb, heads, seqlen_q, seqlen_k))
            _unmask(attn_mask, (rows, slice(None), slice(None), keep_key))
            attn_mask = attn_mask.flatten(0, 1)
        masks["attn_mask"] = attn_mask
    return query, key, value, masks


@pytest.mark.parametrize("case", FORWARD_CASES, ids=_case_id)
def test_forward_matches_torch(case, kernel_calls):
    config = dict(embed_dim=16, num_heads=4) | case["cfg"]
    ref, ours = _pair(**config)
    ours.eval()
    ref.eval()
    query, key, value, masks = _forward_inputs(case, ours)
    need_weights = case["weights"] is not None
    average = case["weights"] == "avg"
    out, weights = ours(query, key, value, need_weights=need_weights,
                        average_attn_weights=average, **masks)
    expected, expected_weights = _reference(ref, query, key, value, need_weights=need_weights,
                                            average_attn_weights=average, **masks)
    assert len(kernel_calls) == 1
    assert out.dtype == F32 and out.is_contiguous()
    assert_matches(out, expected, TOL)
    if need_weights:
        assert_matches(weights, expected_weights, TOL, what="weights")
    else:
        assert weights is None


def test_rows_that_see_no_key_give_out_proj_bias(kernel_calls):
    ref, ours = _pair(embed_dim=16, num_heads=4, batch_first=True)
    ours.eval()
    seqlen = 6
    x = torch.randn(2, seqlen, 16)
    kpm = torch.zeros(2, seqlen, dtype=torch.bool)
    kpm[1] = True  # batch element 1 sees no key at all
    attn_mask = torch.rand(seqlen, seqlen) < 0.3
    attn_mask[:, 0] = False
    attn_mask[2] = True  # row 2 sees no key in every batch element
    for need_weights in (True, False):
        out, weights = ours(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask,
                            need_weights=need_weights, average_attn_weights=False)
        bias = ours.out_proj.bias.detach()
        empty = torch.zeros(2, seqlen, dtype=torch.bool)
        empty[1] = True
        empty[:, 2] = True
        assert torch.allclose(out[empty], bias.expand(int(empty.sum()), 16), atol=1e-6)
        expected, expected_weights = _reference(ref, x, x, x, key_padding_mask=kpm,
                                                attn_mask=attn_mask,
                                                average_attn_weights=False)
        assert expected[empty].isnan().all(), "torch returns NaN there (documented)"
        assert_matches(out[~empty], expected[~empty], TOL)
        if need_weights:
            assert (weights.transpose(1, 2)[empty] == 0).all()
            assert_matches(weights.transpose(1, 2)[~empty],
                           expected_weights.transpose(1, 2)[~empty], TOL, what="weights")
    assert len(kernel_calls) == 2


def test_is_causal(kernel_calls, monkeypatch):
    ref, ours = _pair(embed_dim=16, num_heads=2, batch_first=True)
    ours.eval()
    seqlen = random.randint(3, 9)
    x = torch.randn(2, seqlen, 16)
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        ours(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="is_causal=True needs attn_mask"):
        ours(x, x, x, is_causal=True, need_weights=False)
    causal_float = nn.Transformer.generate_square_subsequent_mask(seqlen)
    causal_bool = torch.ones(seqlen, seqlen, dtype=torch.bool).triu(1)
    kpm = torch.zeros(2, seqlen, dtype=torch.bool)
    kpm[0, -1] = True
    for mask in (causal_float, causal_bool):
        out, weights = ours(x, x, x, attn_mask=mask, key_padding_mask=kpm, is_causal=True)
        expected, expected_weights = _reference(ref, x, x, x, attn_mask=mask,
                                                key_padding_mask=kpm)
        assert_matches(out, expected, TOL)
        assert_matches(weights, expected_weights, TOL, what="weights")
        assert kernel_calls[-1]["causal"] is True
        assert kernel_calls[-1]["attn_mask"].shape == (2, 1, 1, seqlen)  # the padding only
    with torch.inference_mode():  # inference tensors have no version counter
        mask = nn.Transformer.generate_square_subsequent_mask(seqlen)
        out, _ = ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    assert kernel_calls[-1]["causal"] is True
    assert_matches(out, _reference(ref, x, x, x, attn_mask=causal_float)[0], TOL)
    # A wrong hint: the mask decides, with the mask itself passed to the kernel.
    not_causal = torch.rand(seqlen, seqlen) < 0.3
    not_causal[:, 0] = False
    out, _ = ours(x, x, x, attn_mask=not_causal, is_causal=True, need_weights=False)
    assert_matches(out, _reference(ref, x, x, x, attn_mask=not_causal)[0], TOL)
    assert kernel_calls[-1]["causal"] is False
    # Under torch.compile no mask value is read: the mask is passed as is.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out, _ = ours(x, x, x, attn_mask=causal_bool, is_causal=True, need_weights=False)
    assert kernel_calls[-1]["causal"] is False
    assert_matches(out, _reference(ref, x, x, x, attn_mask=causal_bool)[0], TOL)


def test_square_causal_check_follows_in_place_changes():
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert mha_module._is_square_causal(mask)
    mask[4, 0] = True
    assert not mha_module._is_square_causal(mask)
    assert not mha_module._is_square_causal(torch.zeros(5, 5))
    assert mha_module._is_square_causal(nn.Transformer.generate_square_subsequent_mask(5))


def test_input_validation():
    ours = FlashMultiheadAttention(16, 4, kdim=8)
    x, k = torch.randn(5, 2, 16), torch.randn(7, 2, 8)
    cases = [
        (lambda: ours(x[None], k, x), (ValueError, AssertionError), "query must be 3-D"),
        (lambda: ours(x, k[0], x), (ValueError, AssertionError), "key must be 3-D"),
        (lambda: ours(x, x, x), (ValueError, AssertionError), "key's last dim must be 8"),
        (lambda: ours(x, k, x), (ValueError, AssertionError), "key and value must agree"),
        (lambda: ours(x, k, k.double()), (TypeError, AssertionError), "value has dtype"),
        (lambda: ours(x, k[:, :1], torch.randn(7, 1, 16)), ValueError, "same batch size"),
        (lambda: ours(x, k, torch.randn(7, 2, 16), attn_mask=torch.zeros(5, 6)),
         (ValueError, RuntimeError), r"attn_mask must have shape \(L, S\) = \(5, 7\)"),
        (lambda: ours(x, k, torch.randn(7, 2, 16), attn_mask=torch.zeros(4, 5, 7)),
         (ValueError, RuntimeError), r"\(N \* num_heads, L, S\) = \(8, 5, 7\)"),
        (lambda: ours(x, k, torch.randn(7, 2, 16), attn_mask=torch.zeros(5, 7, dtype=int)),
         (TypeError, AssertionError), "attn_mask must be bool"),
        (lambda: ours(x, k, torch.randn(7, 2, 16), key_padding_mask=torch.zeros(7, 2)),
         (ValueError, AssertionError), r"key_padding_mask must have shape \(2, 7\)"),
        (lambda: ours(x, k, torch.randn(7, 2, 16), key_padding_mask=[[0] * 7] * 2),
         TypeError, "key_padding_mask must be a torch.Tensor"),
        (lambda: ours(x.numpy(), k, x), TypeError, "query must be a torch.Tensor"),
    ]
    for call, exc, match in cases:
        for exc_type in (exc if isinstance(exc, tuple) else (exc,)):
            with pytest.raises(exc_type, match=match):
                call()


def test_invalid_cpu_backend(monkeypatch):
    ours = FlashMultiheadAttention(8, 2)
    monkeypatch.setenv("FLASHATTN_CPU_BACKEND", "cuda")
    x = torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="FLASHATTN_CPU_BACKEND"):
        ours(x, x, x)


def test_nested_input_is_refused_with_guidance():
    ours = FlashMultiheadAttention(8, 2, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prototype warning of strided nested tensors
        nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(2, 8)])
    with pytest.raises(TypeError, match="use_nested_tensor"):
        ours(nested, nested, nested)


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("config, need_weights", [
    (dict(add_bias_kv=True), False),
    (dict(kdim=12, vdim=8, batch_first=True, add_zero_attn=True), True),
], ids=["bias_kv", "kdim_vdim_weights"])
def test_training_gradients(config, need_weights, kernel_calls):
    ref, ours = _pair(embed_dim=16, num_heads=4, **config)
    ours.train()
    batch, seqlen_q, seqlen_k = 2, random.randint(2, 8), random.randint(2, 8)

    def tensor(seqlen, dim):
        shape = (batch, seqlen, dim) if ours.batch_first else (seqlen, batch, dim)
        return torch.randn(shape, requires_grad=True)

    query, key, value = tensor(seqlen_q, 16), tensor(seqlen_k, ours.kdim), tensor(seqlen_k,
                                                                                  ours.vdim)
    kpm = torch.zeros(batch, seqlen_k, dtype=torch.bool)
    kpm[0, -1] = True
    attn_mask = torch.randn(seqlen_q, seqlen_k)  # float, not learned
    out, weights = ours(query, key, value, key_padding_mask=kpm, attn_mask=attn_mask,
                        need_weights=need_weights)
    grad_out = torch.randn_like(out)
    loss = (out * grad_out).sum()
    grad_w = None
    if need_weights:
        grad_w = torch.randn_like(weights)
        loss = loss + (weights * grad_w).sum()
    loss.backward()
    assert len(kernel_calls) == 1, "training without dropout runs the kernels"

    ref64 = copy.deepcopy(ref).double().train()
    inputs64 = [x.detach().double().requires_grad_() for x in (query, key, value)]
    out64, weights64 = ref64(*inputs64, key_padding_mask=kpm, attn_mask=attn_mask.double(),
                             need_weights=need_weights)
    loss64 = (out64 * grad_out.double()).sum()
    if need_weights:
        loss64 = loss64 + (weights64 * grad_w.double()).sum()
    loss64.backward()
    assert_matches(out, out64, TOL)
    for name, x, x64 in zip(("query", "key", "value"), (query, key, value), inputs64,
                            strict=True):
        assert_matches(x.grad, x64.grad, 1e-4, what=f"grad of {name}")
    for (name, p), p64 in zip(ours.named_parameters(), ref64.parameters(), strict=True):
        assert_matches(p.grad, p64.grad, 1e-4, what=f"grad of {name}")


def test_dropout_in_training_runs_torch_with_notice(monkeypatch):
    ref, ours = _pair(embed_dim=16, num_heads=4, dropout=0.5, batch_first=True)
    ref.train()
    ours.train()

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernels have no dropout: they must not run")

    monkeypatch.setattr(mha_module, "kernel_attention", no_kernel)
    x = torch.randn(2, 6, 16)
    with pytest.warns(UserWarning, match="dropout > 0 in training"):
        seed = torch.seed()
        out, weights = ours(x, x, x)
    torch.manual_seed(seed)
    expected, expected_weights = ref(x, x, x)
    # Same random stream, same dropout mask: torch's weights path exactly (weights after
    # dropout, as torch returns them).
    assert_matches(out, expected, TOL)
    assert_matches(weights, expected_weights, TOL, what="weights")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the notice is shown once per process
        out_sdpa, no_weights = ours(x, x, x, need_weights=False)
    assert no_weights is None
    ours.eval()
    monkeypatch.setattr(mha_module, "kernel_attention", attention_module.kernel_attention)
    out_eval, _ = ours(x, x, x, need_weights=False)
    assert rel_err(out_sdpa, out_eval) > 1e-3, "dropout was not applied"
    out_sdpa.sum().backward()


def test_learned_float_mask_trains_through_torch():
    ref, ours = _pair(embed_dim=16, num_heads=2)
    seqlen = 5
    x = torch.randn(seqlen, 2, 16)
    learned = torch.randn(seqlen, seqlen, requires_grad=True)
    learned64 = learned.detach().double().requires_grad_()
    kpm = torch.zeros(2, seqlen, dtype=torch.bool)
    kpm[1, 0] = True
    with pytest.warns(UserWarning, match="a float mask that requires grad"):
        out, _ = ours(x, x, x, attn_mask=learned, key_padding_mask=kpm, need_weights=False)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    ref64 = copy.deepcopy(ref).double()
    out64, _ = ref64(x.double(), x.double(), x.double(), attn_mask=learned64,
                     key_padding_mask=kpm)
    (out64 * grad_out.double()).sum().backward()
    assert_matches(out, out64, TOL)
    assert_matches(learned.grad, learned64.grad, 1e-4, what="grad of attn_mask")
    # Without grad the same mask is an ordinary float mask: the kernels run.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out_nograd, _ = ours(x, x, x, attn_mask=learned, key_padding_mask=kpm,
                             need_weights=False)
    assert_matches(out_nograd, out64, TOL)


@pytest.mark.parametrize("embed_dim, num_heads, dtype, notice", [
    (16, 2, torch.float64, "dtype torch.float64"),
    (514, 2, F32, "head_dim 257 > 256"),
])
def test_inputs_the_kernels_do_not_take_run_torch(embed_dim, num_heads, dtype, notice,
                                                   monkeypatch):
    ref, ours = _pair(embed_dim=embed_dim, num_heads=num_heads, batch_first=True)
    ref, ours = ref.to(dtype).eval(), ours.to(dtype).eval()
    monkeypatch.setattr(mha_module, "kernel_attention", None)  # must not be reached
    x = torch.randn(2, 5, embed_dim, dtype=dtype)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, 1:] = True
    attn_mask = torch.randn(5, 5, dtype=dtype)
    with pytest.warns(UserWarning, match=notice):
        out, weights = ours(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask)
    expected, expected_weights = _reference(ref, x, x, x, key_padding_mask=kpm,
                                            attn_mask=attn_mask)
    assert out.dtype == dtype
    assert_matches(out, expected, TOL)
    assert_matches(weights, expected_weights, TOL, what="weights")


def test_notice_skipped_while_compiling(monkeypatch):
    ours = FlashMultiheadAttention(8, 2, dropout=0.3).train()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(4, 1, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x, x, x)
    assert not attention_module._shown_notices


# ----------------------------------------------------------------------------- swapping

def _count_forwards(monkeypatch):
    calls = []
    real = FlashMultiheadAttention.forward

    def counting(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    # Patched on the class, not as a hook: a hook would itself turn the fused paths off.
    monkeypatch.setattr(FlashMultiheadAttention, "forward", counting)
    return calls


def test_replace_in_transformer_encoder(monkeypatch, kernel_calls):
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0,
                                       batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = nn.TransformerEncoder(layer, num_layers=2)  # enable_nested_tensor=True
    original.eval()
    assert original.use_nested_tensor, "the original takes the nested-tensor route"
    swapped = replace_multihead_attention(copy.deepcopy(original))
    assert not swapped.use_nested_tensor
    assert all(type(m.self_attn) is FlashMultiheadAttention for m in swapped.layers)
    assert all(type(m) is mha_module._FusedFeedForwardEncoderLayer for m in swapped.layers)
    forwards = _count_forwards(monkeypatch)
    batch, seqlen = 2, random.randint(4, 9)
    src = torch.randn(batch, seqlen, 16)
    kpm = torch.zeros(batch, seqlen, dtype=torch.bool)
    kpm[1, seqlen // 2:] = True
    with torch.no_grad():
        expected = original(src, src_key_padding_mask=kpm)  # torch's nested fused route
        out = swapped(src, src_key_padding_mask=kpm)
        assert len(forwards) == 2 and len(kernel_calls) == 2
        assert_matches(out[~kpm], expected[~kpm], TOL)  # torch leaves padded positions 0
        causal = nn.Transformer.generate_square_subsequent_mask(seqlen)
        expected = original(src, mask=causal, is_causal=True)
        out = swapped(src, mask=causal, is_causal=True)
    assert_matches(out, expected, TOL)
    assert [c["causal"] for c in kernel_calls[2:]] == [True, True]


@pytest.mark.parametrize("batch_first", [True, False])
def test_replace_fuses_encoder_feed_forward(monkeypatch, batch_first):
    relu_layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=48,
                                            dropout=0.0, batch_first=batch_first)
    gelu_layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=48,
                                            dropout=0.0, activation="gelu")
    model = nn.ModuleList([relu_layer, gelu_layer, nn.TransformerEncoderLayer(16, 2)])
    model[2].self_attn = nn.Identity()  # no attention swapped in: left as it is
    swapped = replace_multihead_attention(copy.deepcopy(model))
    assert [type(m).__name__ for m in swapped] == ["_FusedFeedForwardEncoderLayer"] * 2 + [
        "TransformerEncoderLayer"]
    assert all(isinstance(m, nn.TransformerEncoderLayer) for m in swapped)
    assert swapped.state_dict().keys() == model.state_dict().keys()
    fused = []
    real = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation",
                        lambda *a, **k: fused.append(1) or real(*a, **k))
    x = torch.randn(3, random.randint(2, 9), 16)
    with torch.no_grad():
        for ours, theirs in zip(swapped[:2], model[:2], strict=True):
            assert_matches(ours._ff_block(x), theirs._ff_block(x), 1e-6)
            ours.eval(), theirs.eval()
            assert_matches(ours(x), theirs(x), TOL)
    assert len(fused) == 2, "ReLU layers fuse, GELU ones do not"
    swapped[0].train()
    x.requires_grad_(True)
    swapped[0](x).sum().backward()  # a gradient is needed: torch's own feed-forward
    assert len(fused) == 2 and x.grad is not None
    assert pickle_roundtrip(swapped)[0].linear1.weight.equal(swapped[0].linear1.weight)


def test_replace_in_transformer(kernel_calls):
    original = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=32, dropout=0.0)
    swapped = copy.deepcopy(original)
    assert replace_multihead_attention(swapped) is swapped
    kinds = [type(m) for m in swapped.modules() if isinstance(m, nn.MultiheadAttention)]
    assert kinds == [FlashMultiheadAttention] * 3
    seqlen_src, seqlen_tgt, batch = random.randint(3, 8), random.randint(3, 8), 2
    src, tgt = torch.randn(seqlen_src, batch, 16), torch.randn(seqlen_tgt, batch, 16)
    src_kpm = torch.zeros(batch, seqlen_src, dtype=torch.bool)
    src_kpm[0, -2:] = True
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(seqlen_tgt)
    kwargs = dict(tgt_mask=tgt_mask, src_key_padding_mask=src_kpm,
                  memory_key_padding_mask=src_kpm, tgt_is_causal=True)
    target = torch.randn(seqlen_tgt, batch, 16)
    for module in (original, swapped):
        module.train()
        out = module(src, tgt, **kwargs)
        (out * target).sum().backward()
    assert len(kernel_calls) == 3
    assert_matches(swapped(src, tgt, **kwargs), original(src, tgt, **kwargs), TOL)
    for (name, p), q in zip(swapped.named_parameters(), original.parameters(), strict=True):
        assert_matches(p.grad, q.grad, 1e-4, what=f"grad of {name}")


def test_replace_edge_cases():
    shared = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared, nn.Linear(8, 8))})

    class Custom(nn.MultiheadAttention):
        pass

    model["c"] = Custom(8, 2)
    replace_multihead_attention(model)
    assert type(model["a"]) is FlashMultiheadAttention and model["b"][0] is model["a"]
    assert type(model["c"]) is Custom, "subclasses may override forward: left alone"
    lone = nn.MultiheadAttention(8, 2)
    assert type(replace_multihead_attention(lone)) is FlashMultiheadAttention
    with pytest.raises(TypeError, match="model must be"):
        replace_multihead_attention("not a module")


# ----------------------------------------------------------------------------- GPU

def _gpu_case(dtype, batch_first, device, masks):
    torch.manual_seed(torch.seed())
    ref = nn.MultiheadAttention(256, 4, batch_first=batch_first, device=device)
    ours = FlashMultiheadAttention.from_torch(copy.deepcopy(ref)).to(dtype).eval()
    ref_half = copy.deepcopy(ref).to(dtype).eval()
    batch, seqlen = 2, 200
    shape = (batch, seqlen, 256) if batch_first else (seqlen, batch, 256)
    x = torch.randn(shape, device=device)
    kwargs = {}
    if masks:
        kpm = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
        kpm[1, 150:] = True
        kwargs = dict(key_padding_mask=kpm,
                      attn_mask=nn.Transformer.generate_square_subsequent_mask(seqlen,
                                                                               device=device))
        kwargs["attn_mask"] = kwargs["attn_mask"].to(dtype)
    return ref, ours, ref_half, x, kwargs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch_first, masks", [(True, False), (False, True)])
def test_gpu_matches_torch(dtype, batch_first, masks, gpu_device):
    ref, ours, ref_half, x, kwargs = _gpu_case(dtype, batch_first, gpu_device, masks)
    ref64 = copy.deepcopy(ref).double()
    kwargs64 = {k: _to64(v) for k, v in kwargs.items()}
    expected, expected_w = ref64(x.double(), x.double(), x.double(), **kwargs64)
    xh = x.to(dtype)
    for need_weights in (False, True):
        with torch.no_grad():
            out, weights = ours(xh, xh, xh, need_weights=need_weights, **kwargs)
            torch_out, torch_w = ref_half(xh, xh, xh, need_weights=need_weights, **kwargs)
        torch_err = rel_err(torch_out, expected)
        assert rel_err(out, expected) <= max(2 * torch_err, TOLERANCE[dtype])
        assert_matches(out.float(), expected, 4 * TOLERANCE[dtype])
        if need_weights:
            assert rel_err(weights, expected_w) <= max(2 * rel_err(torch_w, expected_w),
                                                       TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_training_gradients(dtype, gpu_device):
    ref, ours, _, x, kwargs = _gpu_case(dtype, True, gpu_device, masks=True)
    ours.train()
    xh = x.to(dtype).requires_grad_()
    out, _ = ours(xh, xh, xh, need_weights=False, **kwargs)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    ref64 = copy.deepcopy(ref).double()
    x64 = x.double().requires_grad_()
    out64, _ = ref64(x64, x64, x64, need_weights=False,
                     **{k: _to64(v) for k, v in kwargs.items()})
    (out64 * grad_out.double()).sum().backward()
    tol = 4 * TOLERANCE[dtype]
    assert_matches(out.float(), out64, tol)
    assert_matches(xh.grad.float(), x64.grad, tol, what="grad of x")
    for (name, p), p64 in zip(ours.named_parameters(), ref64.parameters(), strict=True):
        assert_matches(p.grad.float(), p64.grad, tol, what=f"grad of {name}")


@pytest.mark.gpu
def test_gpu_compile_full_graph(gpu_device):
    """Our forward compiles without graph breaks (no host sync, no mask read) and matches eager
    mode, where the causal kernel runs for the square causal mask."""
    ref, ours, _, x, kwargs = _gpu_case(torch.float16, True, gpu_device, masks=True)
    xh = x.half()
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        eager, _ = ours(xh, xh, xh, need_weights=False, is_causal=True, **kwargs)
        out, _ = compiled(xh, xh, xh, need_weights=False, is_causal=True, **kwargs)
    assert_matches(out.float(), eager.float(), TOLERANCE[torch.float16])


@pytest.mark.gpu
def test_gpu_encoder_swap(gpu_device, kernel_calls):
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=512, dropout=0.0,
                                       batch_first=True, device=gpu_device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = nn.TransformerEncoder(layer, num_layers=2).half().eval()
    swapped = replace_multihead_attention(copy.deepcopy(original))
    src = torch.randn(4, 300, 256, device=gpu_device, dtype=torch.float16)
    kpm = torch.zeros(4, 300, dtype=torch.bool, device=gpu_device)
    kpm[2:, 225:] = True
    with torch.no_grad():
        expected = original(src, src_key_padding_mask=kpm)
        out = swapped(src, src_key_padding_mask=kpm)
    assert len(kernel_calls) == 2
    assert_matches(out[~kpm].float(), expected[~kpm].float(), 4 * TOLERANCE[torch.float16])
