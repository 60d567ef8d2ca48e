"""torch.compile, the custom operator, recompilation and CUDA graphs (GitHub issue 6).

CPU tests run the kernels through Triton's interpreter (FLASHATTN_CPU_BACKEND=triton) at tiny
shapes. They compile with ``fullgraph=True`` (a graph break, a warning, a print or a host read
while tracing is an error) and, except where Inductor is named, the ``aot_eager`` backend:
Dynamo, fake tensors (the op's fake implementation), functionalisation and AOTAutograd (the
backward registered with torch.library) all run; only Inductor's code generation does not.
Every compiled call is checked for one graph holding ``flashattn::attention_fwd`` (so the kernel
really ran, not a fallback) and for results equal to eager mode. Recompilation counts: layers
share one compilation, decode steps do not recompile, changing shapes settle after one
recompilation.

GPU tests (``-m gpu``): the same under Inductor, CUDA-graph capture and replay of the kernels
(new inputs copied into the captured buffers) equal to eager, and Hugging Face static-cache
generation, eager and with ``torch.compile(mode="reduce-overhead", fullgraph=True)``, whose
greedy tokens equal SDPA's in float32 with TF32 off.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import kernels.api as api
from flashattn_modules import (
    FlashCrossAttention,
    FlashMultiheadAttention,
    FlashSelfAttention,
    replace_multihead_attention,
)
from flashattn_modules import attention as attention_module
from kernels import (
    BackendSelector,
    _plan,
    flash_attention,
    flash_attention_v2,
    flash_attention_varlen,
)
from kernels.selector import SelectedKernel
from tests.reference import (
    TOLERANCE,
    assert_lse_matches,
    assert_matches,
    reference_attention,
    reference_varlen,
)

OP = torch.ops.flashattn.attention_fwd.default
ARG = {arg.name: i for i, arg in enumerate(OP._schema.arguments)}  # the op's input positions
NOTICE_WORDS = ("computed through PyTorch", "not supported by the kernels")


@pytest.fixture(autouse=True)
def _triton_on_cpu_and_fresh_dynamo(monkeypatch):
    monkeypatch.setenv("FLASHATTN_CPU_BACKEND", "triton")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- helpers

def _counter(backend: str = "aot_eager") -> CompileCounterWithBackend:
    return CompileCounterWithBackend(backend)


def _op_calls(counter: CompileCounterWithBackend) -> int:
    """How many times the custom op appears in the graphs Dynamo captured."""
    return sum(node.target is OP for graph in counter.graphs for node in graph.graph.nodes)


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _assert_equal(out, ref) -> None:
    out, ref = _as_tuple(out), _as_tuple(ref)
    assert len(out) == len(ref)
    for i, (a, b) in enumerate(zip(out, ref, strict=True)):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape)
        assert torch.equal(a, b), f"output {i}: max abs diff {(a - b).abs().max().item():.3g}"


def _assert_close(out, ref, tol: float) -> None:
    out, ref = _as_tuple(out), _as_tuple(ref)
    assert len(out) == len(ref)
    for a, b in zip(out, ref, strict=True):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape)
        a, b = a.double(), b.double()
        assert b.norm() > 0  # not comparing zeros
        # relative error, whatever the scale (attention weights are ~1/S each)
        assert (a - b).norm() / b.norm() < tol, f"relative error {(a - b).norm() / b.norm():.3g}"


def _keep_mask(batch: int, seqlen_q: int, seqlen_k: int, device) -> torch.Tensor:
    """Random bool (B, 1, Sq, Sk) mask that keeps each query's bottom-right diagonal key, so
    every row sees a key (finite lse, non-zero gradients)."""
    keep = torch.rand(batch, 1, seqlen_q, seqlen_k, device=device) > 0.4
    rows = torch.arange(seqlen_q, device=device)
    keep[:, :, rows, rows + seqlen_k - seqlen_q] = True
    return keep


# ----------------------------------------------------------------------------- entry points

ENTRY_POINTS = ["v1_causal", "v2_all_options", "auto_float_mask", "bshd_lse", "bshd_bf16",
                "varlen", "selector_decode"]
GRAD_ENTRY_POINTS = ["v1_causal", "v2_all_options", "auto_float_mask", "bshd_lse", "varlen"]


def _entry_point(name: str, device, dtype=torch.float32, *, seqlen: int = 8,
                 head_dim: int = 16, requires_grad: bool = False):
    """(fn, tensor args, reference) for one public entry point. fn's non-tensor options are
    constants; ``reference(*args)`` is the float64 reference (``tests.reference``) of fn's
    outputs (out, and lse where fn returns it). B = 2, H = 4, Hkv = 2 (GQA) unless said
    otherwise."""
    batch, heads, kv_heads, s, d = 2, 4, 2, seqlen, head_dim
    if name == "bshd_bf16":  # on the CPU: computed in float32, rounded once (see _run_kernel)
        dtype = torch.bfloat16

    def rand(*shape, grad=requires_grad):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    if name == "v1_causal":  # flash_attention's default variant
        return (lambda q, k, v: flash_attention(q, k, v, causal=True),
                (rand(batch, heads, s, d), rand(batch, kv_heads, s, d),
                 rand(batch, kv_heads, s, d)),
                lambda q, k, v: reference_attention(q, k, v, causal=True)[0])
    if name == "v2_all_options":
        options = dict(window_size=(5, 2), softcap=2.0, softmax_scale=0.3)
        return (lambda q, k, v, mask, slopes: flash_attention(
                    q, k, v, variant="v2", attn_mask=mask, alibi_slopes=slopes,
                    return_lse=True, **options),
                (rand(batch, heads, s, d), rand(batch, kv_heads, s, d),
                 rand(batch, kv_heads, s, d), _keep_mask(batch, s, s, device),
                 torch.rand(heads, device=device)),
                lambda q, k, v, mask, slopes: reference_attention(
                    q, k, v, attn_mask=mask, alibi_slopes=slopes, **options))
    if name == "auto_float_mask":  # Sk > Sq, bottom-right causal, additive mask
        return (lambda q, k, v, mask: flash_attention(q, k, v, variant="auto", causal=True,
                                                      attn_mask=mask, return_lse=True),
                (rand(batch, heads, s, d), rand(batch, kv_heads, s + 4, d),
                 rand(batch, kv_heads, s + 4, d), rand(1, 1, s, s + 4, grad=False)),
                lambda q, k, v, mask: reference_attention(q, k, v, causal=True,
                                                          attn_mask=mask.double()))
    if name in ("bshd_lse", "bshd_bf16"):
        return (lambda q, k, v: flash_attention_v2(q, k, v, causal=True, return_lse=True),
                (rand(batch, s, heads, d), rand(batch, s, kv_heads, d),
                 rand(batch, s, kv_heads, d)),
                lambda q, k, v: reference_attention(q, k, v, layout="bshd", causal=True))
    if name == "varlen":  # sequence lengths q: 3, 5; k: 5, 6
        cu_q = torch.tensor([0, 3, 8], device=device, dtype=torch.int32)
        cu_k = torch.tensor([0, 5, 11], device=device, dtype=torch.int32)
        return (lambda q, k, v, cu_q, cu_k, slopes: flash_attention_varlen(
                    q, k, v, cu_q, cu_k, 5, 6, causal=True, alibi_slopes=slopes,
                    return_lse=True),
                (rand(8, heads, d), rand(11, kv_heads, d), rand(11, kv_heads, d), cu_q, cu_k,
                 torch.rand(heads, device=device)),
                lambda q, k, v, cu_q, cu_k, slopes: reference_varlen(
                    q, k, v, cu_q, cu_k, causal=True, alibi_slopes=slopes))
    if name == "selector_decode":  # one query row against a 1024-key cache: split-KV
        cache, batch = 1024, 1
        keep = (torch.arange(cache, device=device) < 700)[None, None, None, :]

        def decode(q, k, v, keep):
            kernel = BackendSelector().select_attention(
                batch, heads, 1, d, seq_len_k=cache, kv_heads=kv_heads, dtype=dtype,
                device=q.device)
            assert kernel.variant == "splitkv"
            return kernel(q, k, v, attn_mask=keep)

        return (decode, (rand(batch, heads, 1, d), rand(batch, kv_heads, cache, d),
                         rand(batch, kv_heads, cache, d), keep),
                lambda q, k, v, keep: reference_attention(q, k, v, attn_mask=keep)[0])
    raise ValueError(name)


def _assert_matches_reference(outs, refs, dtype) -> None:
    """out (and lse) against the float64 reference, at the tolerance of the other tests."""
    outs, refs = _as_tuple(outs), _as_tuple(refs)
    assert len(outs) == len(refs)
    assert_matches(outs[0].float(), refs[0], TOLERANCE[dtype])
    if len(outs) == 2:
        assert_lse_matches(outs[1], refs[1])


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_compiles_to_one_graph_equal_to_eager(name):
    """One graph holding the op, output (and lse) bitwise equal to eager mode's and within
    tolerance of the float64 reference."""
    fn, args, reference = _entry_point(name, "cpu")
    with torch.no_grad():
        ref = fn(*args)
        counter = _counter()
        out = torch.compile(fn, backend=counter, fullgraph=True)(*args)
    assert counter.frame_count == 1
    assert _op_calls(counter) == 1
    _assert_equal(out, ref)
    _assert_matches_reference(out, reference(*args), args[0].dtype)


def _loss_and_grads(fn, args, weights):
    """Weighted sum of fn's outputs (out, lse), backward; (outputs, grads of args that
    require grad)."""
    leaves = [a for a in args if a.requires_grad]
    for x in leaves:
        x.grad = None
    outs = _as_tuple(fn(*args))
    sum((o.double() * w).sum() for o, w in zip(outs, weights, strict=True)).backward()
    return [o.detach() for o in outs], [x.grad.clone() for x in leaves]


@pytest.mark.parametrize("name", GRAD_ENTRY_POINTS)
def test_autograd_through_the_compiled_op(name):
    """Forward and backward under compile (AOTAutograd traces the backward registered with
    torch.library): outputs and gradients of q, k, v equal eager mode's and match the
    float64 reference's gradients."""
    fn, args, reference = _entry_point(name, "cpu", requires_grad=True)
    with torch.no_grad():
        weights = [torch.randn(o.shape, dtype=torch.float64) for o in _as_tuple(fn(*args))]
    ref_out, ref_grads = _loss_and_grads(fn, args, weights)
    counter = _counter()
    out, grads = _loss_and_grads(torch.compile(fn, backend=counter, fullgraph=True), args,
                                 weights)
    assert counter.frame_count == 1 and _op_calls(counter) == 1
    _assert_equal(out, ref_out)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    args64 = [a.detach().double().requires_grad_() if a.requires_grad else a for a in args]
    _, grads64 = _loss_and_grads(reference, args64, weights)
    for what, g, g64 in zip("qkv", grads, grads64, strict=True):
        assert_matches(g, g64, 4 * TOLERANCE[torch.float32], what=f"grad of {what}")


def test_inductor_forward_and_backward():
    """The default backend (Inductor, C++ code for the CPU) around the op: one graph, output
    equal to eager, gradients equal up to Inductor's fusion of the PyTorch backward."""
    fn, args, _ = _entry_point("bshd_lse", "cpu", requires_grad=True)
    with torch.no_grad():
        weights = [torch.randn(o.shape, dtype=torch.float64) for o in fn(*args)]
    ref, ref_grads = _loss_and_grads(fn, args, weights)
    counter = _counter("inductor")
    out, grads = _loss_and_grads(torch.compile(fn, backend=counter, fullgraph=True), args,
                                 weights)
    assert counter.frame_count == 1 and _op_calls(counter) == 1
    _assert_equal(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- opcheck

def _captured_op_inputs(run) -> list[tuple]:
    """Call ``run()`` and return the custom op's inputs for every kernel call it made, as the
    public entry points build them (spying on ``kernels.api._call``; launch plans off, so
    that no dry probe recording of a growing-cache family is captured)."""
    captured = []
    real, signature = api._call, _plan.signature

    def spy(*inputs, **options):
        captured.append(inputs)
        return real(*inputs, **options)

    api._call, _plan.signature = spy, lambda *args, **kw: None
    try:
        run()
    finally:
        api._call, _plan.signature = real, signature
    return captured


def _op_inputs(name: str, device="cpu", dtype=torch.float32, requires_grad: bool = False):
    """The op's inputs for one entry point (broadcast mask and slope views, layout flag,
    variant)."""
    fn, args, _ = _entry_point(name, device, dtype, requires_grad=requires_grad)
    captured = _captured_op_inputs(lambda: fn(*args))
    assert len(captured) == 1
    return captured[0]


OPCHECK_CASES = [("v1_causal", False), ("v2_all_options", False), ("v2_all_options", True),
                 ("auto_float_mask", True), ("bshd_lse", False), ("bshd_lse", True),
                 ("bshd_bf16", False), ("varlen", False), ("varlen", True)]


@pytest.mark.parametrize("name, requires_grad", OPCHECK_CASES)
def test_opcheck(name, requires_grad):
    """Schema (no hidden mutation), autograd registration, fake implementation (shapes,
    strides, dtypes of the real outputs) and AOT dispatch with dynamic shapes."""
    inputs = _op_inputs(name, requires_grad=requires_grad)
    assert inputs[0].requires_grad == requires_grad
    result = torch.library.opcheck(OP, inputs)
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_split_kv_variant():
    """The split-KV decode variant through the op (a short cache: interpreter time)."""
    q = torch.randn(1, 4, 1, 16)
    k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    captured = _captured_op_inputs(lambda: SelectedKernel("splitkv")(q, k, v))
    assert captured[0][ARG["variant"]] == "splitkv"
    result = torch.library.opcheck(OP, captured[0])
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_dense_backward_op():
    """The dense backward op that compiled graphs call (``flashattn::attention_bwd``):
    schema, fake implementation and dispatch, on q, k and v that are BHSD views of BSHD
    memory; the gradients have their strides, as the fake implementation says."""
    q, k, v = (torch.randn(2, 9, heads, 16).transpose(1, 2) for heads in (4, 2, 2))
    keep = _keep_mask(2, 9, 9, "cpu")
    out, lse = flash_attention(q, k, v, variant="v2", return_lse=True, attn_mask=keep)
    inputs = (torch.randn_like(out), None, q, k, v, out, lse, keep.expand(2, 4, 9, 9), None,
              0.25, False, -1, -1, 0.0)
    result = torch.library.opcheck(torch.ops.flashattn.attention_bwd.default, inputs)
    assert set(result.values()) == {"SUCCESS"}, result
    grads = torch.ops.flashattn.attention_bwd(*inputs)
    assert [g.stride() for g in grads] == [x.stride() for x in (q, k, v)]


def test_op_differentiates_varlen():
    """Called directly with packed (varlen) inputs that require grad, the op's registered
    backward (the varlen backward op, sequence by sequence) gives the reference's
    gradients."""
    inputs = list(_op_inputs("varlen"))
    q, k, v = (x.detach().clone().requires_grad_() for x in inputs[:3])
    inputs[:3] = q, k, v
    slopes, cu_q, cu_k, causal, scale = (inputs[ARG[name]] for name in (
        "alibi_slopes", "cu_seqlens_q", "cu_seqlens_k", "causal", "sm_scale"))
    out, _ = OP(*inputs)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_varlen(q64, k64, v64, cu_q, cu_k, causal=causal, softmax_scale=scale,
                              alibi_slopes=slopes)
    (ref * grad_out.double()).sum().backward()
    for x, x64 in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- modules

MODULE_CASES = ["self_bshd", "self_bshd_train", "self_bhsd_window", "self_key_padding",
                "self_varlen", "cross_gqa_alibi", "cross_varlen", "mha_weights",
                "mha_causal_mask", "mha_train_key_padding", "encoder_train"]


def _module_case(name: str, device="cpu", dtype=torch.float32, *, seqlen: int = 8,
                 heads: int = 4, head_dim: int = 8):
    """(module, args, kwargs); the module is in training mode for names with "train" (with
    dropout 0, so the kernels run), else in eval mode."""
    s, h, d = seqlen, heads, head_dim
    embed = h * d

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    cu = torch.tensor([0, s // 2 - 1, s], device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, s // 2 + 1, s + 2], device=device, dtype=torch.int32)
    if name.startswith("self_bshd"):
        case = FlashSelfAttention(causal=True), (rand(2, s, 3, h, d),), {}
    elif name == "self_bhsd_window":
        case = FlashSelfAttention(window_size=(3, 1), layout="bhsd"), (rand(2, 3, h, s, d),), {}
    elif name == "self_key_padding":
        case = (FlashSelfAttention(), (rand(2, s, 3, h, d),),
                dict(key_padding_mask=torch.arange(s, device=device) < torch.tensor(
                    [[s], [s - 3]], device=device)))
    elif name == "self_varlen":
        case = (FlashSelfAttention(causal=True), (rand(s, 3, h, d),),
                dict(cu_seqlens=cu, max_seqlen=s // 2 + 1))
    elif name == "cross_gqa_alibi":
        slopes = torch.rand(h, device=device)
        case = (FlashCrossAttention(alibi_slopes=slopes), (rand(2, s, h, d),
                                                           rand(2, s + 3, 2, h // 2, d)), {})
    elif name == "cross_varlen":
        case = (FlashCrossAttention(causal=True), (rand(s, h, d), rand(s + 2, 2, h // 2, d)),
                dict(cu_seqlens=cu, max_seqlen=s // 2 + 1, cu_seqlens_k=cu_k,
                     max_seqlen_k=s // 2 + 1))
    elif name.startswith("mha"):
        mha = FlashMultiheadAttention(embed, h, batch_first=True, device=device, dtype=dtype)
        x = rand(2, s, embed)
        if name == "mha_weights":
            case = mha, (x, x, x), {}
        elif name == "mha_causal_mask":
            mask = nn.Transformer.generate_square_subsequent_mask(s, device=device, dtype=dtype)
            case = mha, (x, x, x), dict(attn_mask=mask, is_causal=True, need_weights=False)
        else:
            kpm = torch.arange(s, device=device) >= torch.tensor([[s], [s - 2]], device=device)
            case = mha, (x, x, x), dict(key_padding_mask=kpm, need_weights=False)
    elif name == "encoder_train":
        layer = nn.TransformerEncoderLayer(embed, h, 2 * embed, dropout=0.0, batch_first=True,
                                           device=device, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        mask = nn.Transformer.generate_square_subsequent_mask(s, device=device, dtype=dtype)
        case = (replace_multihead_attention(encoder), (rand(2, s, embed),),
                dict(mask=mask, is_causal=True))
    else:
        raise ValueError(name)
    module, args, kwargs = case
    return module.train("train" in name), args, kwargs


@pytest.mark.parametrize("name", MODULE_CASES)
def test_module_compiles_to_one_graph_equal_to_eager(name):
    module, args, kwargs = _module_case(name)
    expected_ops = 2 if name == "encoder_train" else 1
    with torch.no_grad():
        ref = module(*args, **kwargs)
        counter = _counter()
        out = torch.compile(module, backend=counter, fullgraph=True)(*args, **kwargs)
    assert counter.frame_count == 1
    assert _op_calls(counter) == expected_ops
    _assert_close(out, ref, 1e-6)


@pytest.mark.parametrize("name", ["self_bshd_train", "cross_gqa_alibi", "mha_train_key_padding"])
def test_module_training_gradients_under_compile(name):
    """Training mode, dropout 0: the compiled forward and backward give eager mode's
    gradients for the inputs and the parameters."""
    module, args, kwargs = _module_case(name)
    module.train()
    args = tuple(a.detach().requires_grad_() for a in args)
    params = list(module.parameters())
    grad_out = None

    def run(f):
        nonlocal grad_out
        for x in (*args, *params):
            x.grad = None
        out = _as_tuple(f(*args, **kwargs))[0]
        if grad_out is None:
            grad_out = torch.randn_like(out)
        (out * grad_out).sum().backward()
        return out.detach(), [x.grad.clone() for x in (*args, *params)]

    ref, ref_grads = run(module)
    counter = _counter()
    out, grads = run(torch.compile(module, backend=counter, fullgraph=True))
    assert counter.frame_count == 1 and _op_calls(counter) == 1
    _assert_close(out, ref, 1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


FALLBACKS = ["self_dropout", "self_float64", "mha_dropout", "mha_learned_mask"]


@pytest.mark.parametrize("name", FALLBACKS)
def test_fallbacks_trace_without_notice_or_graph_break(name, monkeypatch):
    """What the kernels do not take (dropout in training, float64, a mask that requires grad)
    runs through PyTorch with a one-time warning in eager mode; under compile the warning is
    skipped (it would break the graph) and not used up."""
    monkeypatch.setattr(attention_module, "_shown_notices", set())
    x = torch.randn(2, 8, 32)
    if name.startswith("self"):
        dropout = 0.5 if name == "self_dropout" else 0.0
        module = FlashSelfAttention(causal=True, attention_dropout=dropout).train()
        qkv = torch.randn(2, 8, 3, 4, 8)
        args, kwargs = (qkv.double() if name == "self_float64" else qkv,), {}
    else:
        dropout = 0.5 if name == "mha_dropout" else 0.0
        module = FlashMultiheadAttention(32, 4, dropout=dropout, batch_first=True)
        module.train(name == "mha_dropout")
        kwargs = dict(need_weights=False)
        if name == "mha_learned_mask":
            kwargs["attn_mask"] = torch.zeros(8, 8).uniform_(-1, 0).requires_grad_()
        args = (x, x, x)
    counter = _counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(module, backend=counter, fullgraph=True)(*args, **kwargs)
    assert counter.frame_count == 1 and _op_calls(counter) == 0
    assert not [w for w in caught if any(s in str(w.message) for s in NOTICE_WORDS)]
    assert not attention_module._shown_notices
    with pytest.warns(UserWarning, match="|".join(NOTICE_WORDS)):
        ref = module(*args, **kwargs)
    if dropout == 0:
        _assert_close(out, ref, 1e-6)


# ----------------------------------------------------------------------------- recompilation

class _Block(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn = FlashSelfAttention(causal=True)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))
        return x + self.out(self.attn(qkv).flatten(-2))


def test_layers_share_one_compilation():
    """Six layers compiled one by one share one graph (no recompilation per layer); the whole
    stack compiles to one graph with six kernel calls."""
    stack = nn.Sequential(*[_Block() for _ in range(6)]).eval()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        ref = stack(x)
        whole = _counter()
        out = torch.compile(stack, backend=whole, fullgraph=True)(x)
        assert whole.frame_count == 1 and _op_calls(whole) == 6
        _assert_close(out, ref, 1e-6)

        torch._dynamo.reset()
        counter = _counter()
        for block in stack:
            block.compile(backend=counter, fullgraph=True)
        out = stack(x)
        stack(torch.randn(2, 8, 32))
    assert counter.frame_count == 1 and _op_calls(counter) == 1
    _assert_close(out, ref, 1e-6)


def test_growing_kv_cache_recompiles_once():
    """A decode loop whose cache grows by one key per step: one recompilation (to dynamic
    shapes) in all, results equal to eager at every step."""
    counter = _counter()
    decode = torch.compile(lambda q, k, v: flash_attention(q, k, v, variant="auto"),
                           backend=counter, fullgraph=True)
    k_all, v_all = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    with torch.no_grad():
        for length in range(5, 12):
            q = torch.randn(1, 4, 1, 16)
            k, v = k_all[:, :, :length], v_all[:, :, :length]
            _assert_equal(decode(q, k, v), flash_attention(q, k, v, variant="auto"))
    assert counter.frame_count == 2


def test_varlen_packings_recompile_once():
    """Batches packed differently (total tokens, number of sequences and longest sequence all
    change): one recompilation in all; cu_seqlens values are never read on the host."""
    counter = _counter()
    fn = torch.compile(
        lambda q, k, v, cu, max_len: flash_attention_varlen(q, k, v, cu, cu, max_len, max_len,
                                                            causal=True),
        backend=counter, fullgraph=True)
    packings = [[3, 5], [2, 6, 4], [4, 3, 2], [7, 2, 3, 2], [5, 5, 2]]
    with torch.no_grad():
        for lengths in packings:
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            total = sum(lengths)
            q, k, v = torch.randn(total, 4, 16), torch.randn(total, 2, 16), torch.randn(
                total, 2, 16)
            ref = flash_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths),
                                         causal=True)
            _assert_equal(fn(q, k, v, cu, max(lengths)), ref)
    assert counter.frame_count == 2


# ----------------------------------------------------------------------------- Hugging Face

VOCAB = 97


def _llama_config(**overrides):
    transformers = pytest.importorskip("transformers")
    options = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                   initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                   attention_dropout=0.0)
    options.update(overrides)
    return transformers.LlamaConfig(**options)


def _causal_lm(config, implementation: str = "eager"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


def _padded_batch(lengths: list[int], seqlen: int, device="cpu"):
    ids = torch.randint(3, VOCAB, (len(lengths), seqlen), device=device)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, seqlen - n:] = 1  # left padding
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_patched_hf_model_compiles_to_one_graph(family):
    """A patched model's forward (padding mask; Gemma 2: softcap and sliding window) compiles
    to one graph holding one kernel call per layer, with eager mode's logits."""
    from flashattn_modules import patch_hf_model

    if family == "llama":
        config = _llama_config()
    else:
        from transformers import Gemma2Config

        config = Gemma2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              vocab_size=VOCAB, sliding_window=4, attn_logit_softcapping=1.5,
                              query_pre_attn_scalar=8, initializer_range=0.2)
    model = _causal_lm(config)
    ids, mask = _padded_batch([10, 7], 10)
    patch_hf_model(model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        counter = _counter()
        forward = torch.compile(model.forward, backend=counter, fullgraph=True)
        out = forward(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert counter.frame_count == 1 and _op_calls(counter) == 2
    valid = mask.bool()
    _assert_close(out[valid], ref[valid], 1e-5)


def test_patched_hf_training_step_under_compile():
    """Training (attention dropout 0): the compiled forward and backward of a patched model
    give eager mode's loss and parameter gradients."""
    from flashattn_modules import patch_hf_model

    model = _causal_lm(_llama_config()).train()
    patch_hf_model(model)
    ids = torch.randint(3, VOCAB, (2, 8))

    def step(forward):
        model.zero_grad()
        loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}

    ref_loss, ref_grads = step(model)
    counter = _counter()
    loss, grads = step(torch.compile(model.forward, backend=counter, fullgraph=True))
    assert counter.frame_count == 1 and _op_calls(counter) == 2
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_hf_layers_compiled_one_by_one_share_one_graph():
    """Four decoder layers of a patched model, each compiled on its own: one compilation."""
    from flashattn_modules import patch_hf_model

    model = _causal_lm(_llama_config(num_hidden_layers=4))
    ids = torch.randint(3, VOCAB, (1, 8))
    patch_hf_model(model)
    counter = _counter()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        for layer in model.model.layers:
            layer.compile(backend=counter, fullgraph=True)
        out = model(input_ids=ids, use_cache=False).logits
        model(input_ids=ids, use_cache=False)
    assert counter.frame_count == 1 and _op_calls(counter) == 1
    _assert_close(out, ref, 1e-5)


_GENERATE_GRAPHS: list = []


def _recording_backend(gm, example_inputs):
    """A backend that survives transformers' deepcopy of the compile config (a function)."""
    from torch._dynamo.backends.debugging import aot_eager

    _GENERATE_GRAPHS.append(gm)
    return aot_eager(gm, example_inputs)


def test_hf_static_cache_generate_compiles_decode_once():
    """generate(cache_implementation="static") compiling the decode step with fullgraph=True
    (transformers' auto-compile, allowed on the CPU): one graph for every decode step, and
    the greedy tokens of SDPA."""
    from transformers import CompileConfig

    from flashattn_modules import patch_hf_model, unpatch_hf_model

    model = _causal_lm(_llama_config(num_key_value_heads=1), "sdpa")
    ids, mask = _padded_batch([8, 5], 8)
    options = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                   cache_implementation="static")
    ref = model.generate(ids, disable_compile=True, **options)
    compile_config = CompileConfig(fullgraph=True, backend=_recording_backend, mode=None)
    compile_config._compile_all_devices = True
    _GENERATE_GRAPHS.clear()
    patch_hf_model(model)
    try:
        ours = model.generate(ids, compile_config=compile_config, **options)
    finally:
        unpatch_hf_model(model)
    assert len(_GENERATE_GRAPHS) == 1, "decode steps recompiled"
    assert sum(node.target is OP for node in _GENERATE_GRAPHS[0].graph.nodes) == 2
    assert torch.equal(ours, ref)


def _greedy_decode(model, forward, ids, cache, steps: int):
    """Prefill with ``model``, then ``steps`` greedy decode steps with ``forward``."""
    token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(
        -1, keepdim=True)
    tokens, position = [token], ids.shape[1]
    for _ in range(steps):
        if ids.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        cache_position = torch.tensor([position], device=ids.device)
        logits = forward(input_ids=token, past_key_values=cache, use_cache=True,
                         cache_position=cache_position,
                         position_ids=cache_position[None].repeat(ids.shape[0], 1)).logits
        token = logits[:, -1].argmax(-1, keepdim=True)  # read before the next replay
        del logits
        tokens.append(token)
        position += 1
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_hf_decode_steps_do_not_recompile(cache):
    """Decode steps with a compiled forward: a StaticCache keeps one graph; a DynamicCache,
    whose length grows, recompiles once (to dynamic shapes) and then never again. Greedy
    tokens equal eager attention's."""
    from transformers import DynamicCache, StaticCache

    from flashattn_modules import patch_hf_model

    config = _llama_config()
    model = _causal_lm(config)
    ids = torch.randint(3, VOCAB, (2, 6))

    def new_cache():
        if cache == "static":
            return StaticCache(config=config, max_cache_len=16)
        return DynamicCache(config=config)

    with torch.no_grad():
        ref = _greedy_decode(model, model, ids, new_cache(), steps=6)
        patch_hf_model(model)
        counter = _counter()
        forward = torch.compile(model.forward, backend=counter, fullgraph=True)
        ours = _greedy_decode(model, forward, ids, new_cache(), steps=6)
    assert counter.frame_count == (1 if cache == "static" else 2)
    assert all(count == 2 for count in (
        sum(n.target is OP for n in g.graph.nodes) for g in counter.graphs))
    assert torch.equal(ours, ref)


# ----------------------------------------------------------------------------- GPU

@pytest.fixture
def no_tf32():
    """Float32 matmuls in full precision (kernels, SDPA, cuBLAS) for the test's duration."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


GPU_ENTRY_POINTS = ["v1_causal", "v2_all_options", "auto_float_mask", "bshd_lse", "varlen",
                    "selector_decode"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_ENTRY_POINTS)
def test_gpu_entry_point_inductor_fullgraph(name, gpu_device):
    """Inductor on CUDA: one graph holding the op, eager mode's results (fp16)."""
    fn, args, reference = _entry_point(name, gpu_device, torch.float16, seqlen=256,
                                       head_dim=64)
    counter = _counter("inductor")
    with torch.no_grad():
        ref = fn(*args)
        out = torch.compile(fn, backend=counter, fullgraph=True)(*args)
    assert counter.frame_count == 1 and _op_calls(counter) == 1
    _assert_close(out, ref, 1e-3)
    _assert_matches_reference(out, reference(*args), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["v2_all_options", "bshd_lse"])
def test_gpu_autograd_inductor(name, gpu_device, no_tf32):
    """Inductor on CUDA, fp32 without TF32: compiled gradients equal eager mode's up to
    Inductor's fusion of the PyTorch backward, and match the float64 reference."""
    fn, args, reference = _entry_point(name, gpu_device, torch.float32, seqlen=128,
                                       head_dim=64, requires_grad=True)
    with torch.no_grad():
        weights = [torch.randn(o.shape, dtype=torch.float64, device=gpu_device)
                   for o in _as_tuple(fn(*args))]
    ref, ref_grads = _loss_and_grads(fn, args, weights)
    counter = _counter("inductor")
    out, grads = _loss_and_grads(torch.compile(fn, backend=counter, fullgraph=True), args,
                                 weights)
    assert counter.frame_count == 1 and _op_calls(counter) == 1
    _assert_close(out, ref, 1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    args64 = [a.detach().double().requires_grad_() if a.requires_grad else a for a in args]
    _, grads64 = _loss_and_grads(reference, args64, weights)
    for what, g, g64 in zip("qkv", grads, grads64, strict=True):
        assert_matches(g, g64, 4 * TOLERANCE[torch.float32], what=f"grad of {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True], ids=["window", "key-padding"])
def test_gpu_compiled_backward_kernels(masked, gpu_device, monkeypatch):
    """A compiled fp16 training step takes the fused backward eager mode takes, chosen at
    run time inside the backward op: cuDNN's for a causal call with a key-padding mask,
    FlashAttention-2's for a windowed one; gradients match the float64 reference."""
    from kernels import _backward
    from tests.test_kernels import spy_calls

    calls = spy_calls(monkeypatch, _backward, ("_FA2_BACKWARD", "_CUDNN_BACKWARD"),
                      returned_only=True)
    q, k, v = (torch.randn(2, heads, 256, 64, device=gpu_device, dtype=torch.float16,
                           requires_grad=True) for heads in (8, 2, 2))
    keep = torch.ones(2, 1, 1, 256, dtype=torch.bool, device=gpu_device)
    keep[0, ..., 192:] = False
    opts = dict(causal=True, attn_mask=keep) if masked else dict(window_size=(64, 32))

    def fn(q, k, v):
        return flash_attention(q, k, v, variant="auto", **opts)

    grad_out = torch.randn(2, 8, 256, 64, device=gpu_device, dtype=torch.float16)
    counter = _counter("inductor")
    out = torch.compile(fn, backend=counter, fullgraph=True)(q, k, v)
    out.backward(grad_out)
    assert counter.frame_count == 1
    assert calls == (["_CUDNN_BACKWARD"] if masked else ["_FA2_BACKWARD"])
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, **opts)
    (ref * grad_out.double()).sum().backward()
    for what, x, x64 in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        assert_matches(x.grad, x64.grad, 4 * TOLERANCE[torch.float16], what=f"grad of {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["self_bshd_train", "self_varlen", "cross_gqa_alibi",
                                  "mha_causal_mask", "mha_weights", "encoder_train"])
def test_gpu_module_inductor_fullgraph(name, gpu_device):
    module, args, kwargs = _module_case(name, gpu_device, torch.float16, seqlen=128, heads=4,
                                        head_dim=64)
    counter = _counter("inductor")
    with torch.no_grad():
        ref = module(*args, **kwargs)
        out = torch.compile(module, backend=counter, fullgraph=True)(*args, **kwargs)
    assert counter.frame_count == 1 and _op_calls(counter) >= 1
    _assert_close(out, ref, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name, requires_grad", [("v2_all_options", False),
                                                 ("v2_all_options", True),
                                                 ("bshd_lse", True), ("varlen", False)])
def test_gpu_opcheck(name, requires_grad, gpu_device):
    inputs = _op_inputs(name, gpu_device, torch.float16, requires_grad=requires_grad)
    result = torch.library.opcheck(OP, inputs)
    assert set(result.values()) == {"SUCCESS"}, result


def _graph_case(name: str, device):
    """(fn, static inputs, refill) for CUDA-graph capture: ``refill(inputs)`` writes new
    values (and, for masks and cu_seqlens, new patterns) into the captured buffers."""
    def rand(*shape, dtype=torch.float16):
        return torch.randn(*shape, device=device, dtype=dtype)

    def refill_randn(inputs):
        for x in inputs:
            if x.is_floating_point():
                x.copy_(torch.randn_like(x))

    def refill_lengths(inputs):  # fresh q, k, v and a key mask kept up to random lengths
        refill_randn(inputs[:3])
        keep = inputs[3]
        lengths = torch.randint(1, keep.shape[-1] + 1, (keep.shape[0],), device=device)
        keep.copy_(torch.arange(keep.shape[-1], device=device) < lengths[:, None, None, None])

    if name == "prefill_v2":
        args = [rand(2, 8, 512, 64), rand(2, 2, 512, 64), rand(2, 2, 512, 64)]
        return (lambda q, k, v: flash_attention(q, k, v, causal=True, variant="auto")), args, \
            refill_randn
    if name == "v1":
        args = [rand(2, 4, 256, 64), rand(2, 4, 256, 64), rand(2, 4, 256, 64)]
        return (lambda q, k, v: flash_attention(q, k, v, causal=True)), args, refill_randn
    if name == "bshd_mask":
        keep = torch.ones(2, 1, 1, 384, dtype=torch.bool, device=device)
        args = [rand(2, 384, 8, 64), rand(2, 384, 2, 64), rand(2, 384, 2, 64), keep]
        return (lambda q, k, v, keep: flash_attention_v2(q, k, v, attn_mask=keep)), args, \
            refill_lengths
    if name == "decode_selector":  # Sq = 1 against a 4096-key cache, filled up to a length
        selected = BackendSelector().select_attention(4, 8, 1, 128, seq_len_k=4096, kv_heads=2,
                                                      dtype=torch.float16, device=device)
        assert selected.variant == "splitkv"
        keep = torch.ones(4, 1, 1, 4096, dtype=torch.bool, device=device)
        args = [rand(4, 8, 1, 128), rand(4, 2, 4096, 128), rand(4, 2, 4096, 128), keep]
        return (lambda q, k, v, keep: selected(q, k, v, attn_mask=keep)), args, refill_lengths
    if name == "varlen":  # 4 sequences in 1024 tokens, each at most 512 long
        patterns = [[0, 100, 612, 800, 1024], [0, 500, 520, 1000, 1024], [0, 256, 512, 768, 1024]]
        cu = torch.tensor(patterns[0], device=device, dtype=torch.int32)

        def refill(inputs):
            refill_randn(inputs[:3])
            pattern = patterns[int(torch.randint(1, 3, ()))]
            inputs[3].copy_(torch.tensor(pattern, dtype=torch.int32))

        args = [rand(1024, 8, 64), rand(1024, 2, 64), rand(1024, 2, 64), cu]
        return (lambda q, k, v, cu: flash_attention_varlen(q, k, v, cu, cu, 512, 512,
                                                           causal=True)), args, refill
    raise ValueError(name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["prefill_v2", "v1", "bshd_mask", "decode_selector",
                                  "varlen"])
def test_gpu_cuda_graph_capture_and_replay(name, gpu_device):
    """Capture one call in a CUDA graph (after a warm-up on a side stream, which compiles the
    kernels), then, twice: write new inputs into the captured buffers, replay, and compare with
    an eager call on the same inputs: bitwise equal. A host read, a launch off the capture
    stream or an allocation kept from capture time would give stale or wrong results."""
    fn, inputs, refill = _graph_case(name, gpu_device)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn(*inputs)
        for _ in range(2):
            refill(inputs)
            graph.replay()
            torch.cuda.synchronize()
            ref = fn(*[x.clone() for x in inputs])
            assert torch.isfinite(ref).all()
            assert torch.equal(static_out, ref), (static_out - ref).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["decode_selector", "varlen"])
def test_gpu_reduce_overhead_compile(name, gpu_device):
    """torch.compile(mode="reduce-overhead", fullgraph=True): CUDA graphs are not skipped, one
    compilation serves every call, each equal to eager."""
    fn, inputs, refill = _graph_case(name, gpu_device)
    skips = counters["inductor"]["cudagraph_skips"]
    graphs = counters["stats"]["unique_graphs"]
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(4):
            refill(inputs)
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(*inputs).clone()
            assert torch.equal(out, fn(*inputs))
    assert counters["inductor"]["cudagraph_skips"] == skips, "CUDA graphs were skipped"
    assert counters["stats"]["unique_graphs"] - graphs == 1


def _gpu_llama(device):
    config = _llama_config(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                           num_attention_heads=8, num_key_value_heads=2, vocab_size=512)
    return _causal_lm(config, "sdpa").to(device), config


@pytest.mark.gpu
def test_gpu_hf_static_cache_generate_matches_sdpa(gpu_device, no_tf32):
    """generate(cache_implementation="static") on the patched model, eager and auto-compiled
    by transformers, gives SDPA's greedy tokens (fp32, TF32 off), left-padded batch."""
    from flashattn_modules import patch_hf_model, unpatch_hf_model

    model, _ = _gpu_llama(gpu_device)
    ids, mask = _padded_batch([24, 19, 13], 24, gpu_device)
    options = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                   cache_implementation="static")
    ref = model.generate(ids, disable_compile=True, **options)
    patch_hf_model(model)
    try:
        eager = []
        calls = _captured_op_inputs(
            lambda: eager.append(model.generate(ids, disable_compile=True, **options)))
        compiled = model.generate(ids, **options)
    finally:
        unpatch_hf_model(model)
    assert calls, "our kernel never ran"
    assert torch.equal(eager[0], ref)
    assert torch.equal(compiled, ref)


@pytest.mark.gpu
def test_gpu_hf_reduce_overhead_fullgraph_static_cache(gpu_device, no_tf32):
    """torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) with a StaticCache:
    the decode steps compile once, run as CUDA graphs, and give SDPA's greedy tokens."""
    from transformers import StaticCache

    from flashattn_modules import patch_hf_model

    model, config = _gpu_llama(gpu_device)
    ids = torch.randint(3, 512, (2, 20), device=gpu_device)
    steps = 12
    with torch.no_grad():
        ref = _greedy_decode(model, model, ids, StaticCache(config=config, max_cache_len=40),
                             steps)
        patch_hf_model(model)
        skips = counters["inductor"]["cudagraph_skips"]
        graphs = counters["stats"]["unique_graphs"]
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        ours = _greedy_decode(model, forward, ids, StaticCache(config=config, max_cache_len=40),
                              steps)
    assert counters["stats"]["unique_graphs"] - graphs == 1, "decode steps recompiled"
    assert counters["inductor"]["cudagraph_skips"] == skips, "CUDA graphs were skipped"
    assert torch.equal(ours, ref)
