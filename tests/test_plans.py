"""Launch plans (``kernels._plan``): the first mask-free eager call of a signature records its
launches, later calls replay them. On the CPU the replayed launches run through the
interpreter, so every check here compares real kernel outputs."""

from __future__ import annotations

import pytest
import torch
import triton

import kernels._launch as launch
from kernels import _plan, _runtime, flash_attention, flash_attention_v2
from kernels.selector import SelectedKernel
from tests.reference import TOLERANCE, assert_matches, reference_attention
from tests.test_kernels import F16, F32, _strided, make_qkv, spy_calls

# (name, layout, call) for every way a dense call reaches kernels.api.attention
ENTRY_POINTS = [
    ("v1", "bhsd", lambda q, k, v, **kw: flash_attention(q, k, v, variant="v1", **kw)),
    ("v2", "bhsd", lambda q, k, v, **kw: flash_attention(q, k, v, variant="v2", **kw)),
    ("auto", "bhsd", lambda q, k, v, **kw: flash_attention(q, k, v, variant="auto", **kw)),
    ("bshd", "bshd", lambda q, k, v, **kw: flash_attention_v2(q, k, v, **kw)),
    ("splitkv", "bhsd", lambda q, k, v, **kw: SelectedKernel("splitkv")(q, k, v, **kw)),
]
IDS = [name for name, _, _ in ENTRY_POINTS]


def _forward_calls(monkeypatch) -> list[str]:
    """Spy on the launchers of the general path; returns the list of their names called."""
    return spy_calls(monkeypatch, launch, ("forward_v1", "forward_v2", "forward_splitkv"))


@pytest.mark.parametrize("name, layout, run", ENTRY_POINTS, ids=IDS)
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "lse"])
def test_replay_equals_the_general_path(name, layout, run, return_lse, monkeypatch):
    """The second call of a signature launches the recorded plan (no launcher runs) on its
    own tensors, and gives bit for bit what the general path gives for them."""
    calls = _forward_calls(monkeypatch)
    options = dict(causal=True, window_size=(6, 0), softcap=3.0, softmax_scale=0.3,
                   return_lse=return_lse)
    q, k, v = make_qkv(2, 4, 3 if name == "splitkv" else 17, 40, 24, dtype=F16, layout=layout,
                       kv_heads=2)
    run(q, k, v, **options)
    # split-KV (3 query rows, one split here): also the dry probe of its growing-cache family
    recorded = 2 if name == "splitkv" else 1
    assert len(calls) == recorded
    [entry] = _plan._plans.values()
    assert isinstance(entry, _plan.Plan)
    q2, k2, v2 = (torch.randn_like(x) for x in (q, k, v))
    replayed = run(q2, k2, v2, **options)
    assert len(calls) == recorded, "the second call did not replay"
    monkeypatch.setattr(_plan, "signature", lambda *args, **kw: None)  # plans off
    general = run(q2, k2, v2, **options)
    assert len(calls) == recorded + 1
    for got, want in zip(replayed if return_lse else (replayed,),
                         general if return_lse else (general,), strict=True):
        assert got.shape == want.shape and got.stride() == want.stride()
        assert torch.equal(got, want)
    ref, _ = reference_attention(q2, k2, v2, layout=layout, causal=True, window_size=(6, 0),
                                 softcap=3.0, softmax_scale=0.3)
    assert_matches(replayed[0] if return_lse else replayed, ref, TOLERANCE[F16])


def test_a_split_kv_plan_takes_the_counters_of_its_stream(monkeypatch):
    """A split-KV call with several splits records the counters as their own slot (never as
    workspace, which replays would allocate uninitialised): replays read the zeroed
    counters and give what the general path gives."""
    from kernels import _counters

    calls = _forward_calls(monkeypatch)
    q, k, v = make_qkv(1, 4, 1, 300, 24, dtype=F16, kv_heads=1)
    run = SelectedKernel("splitkv")
    run(q, k, v)
    [entry] = _plan._plans.values()
    [plan] = entry.values()
    assert plan.counters > 0 and len(plan.steps) == 1
    assert any(slot == _plan._COUNTERS for _, slot in plan.steps[0].slots)
    for _ in range(2):
        q2, k2, v2 = (torch.randn_like(x) for x in (q, k, v))
        replayed = run(q2, k2, v2)
        assert len(calls) == 2, "the call did not replay"
        ref, _ = reference_attention(q2, k2, v2)
        assert_matches(replayed, ref, TOLERANCE[F16])
    assert not _counters.counters(q.device, plan.counters).any()


def test_a_plan_recorded_on_one_tensor_reads_three():
    """Recorded with q = k = v (one tensor), replayed on three: each kernel argument takes
    its own tensor (tensors are matched by position, never by data pointer)."""
    x = torch.randn(1, 2, 16, 16, dtype=F16)
    flash_attention(x, x, x, variant="v2")
    q, k, v = (torch.randn_like(x) for _ in range(3))
    out = flash_attention(q, k, v, variant="v2")
    assert len(_plan._plans) == 1
    ref, _ = reference_attention(q, k, v)
    assert_matches(out, ref, TOLERANCE[F16])


def test_replays_allocate_fresh_outputs():
    q, k, v = make_qkv(1, 2, 9, 9, 16, dtype=F16)
    first = flash_attention_v2(q, k, v, causal=True)
    kept = first.clone()
    second = flash_attention_v2(q * 2, k, v, causal=True)
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, kept)


@pytest.mark.parametrize("change", ["causal", "scale", "window", "softcap", "lse", "strides",
                                    "alignment", "heads", "variant", "layout"])
def test_a_changed_signature_records_a_new_plan(change, monkeypatch):
    """Each of these changes what the kernels must compute or read: a new plan, right
    results."""
    calls = _forward_calls(monkeypatch)
    base = dict(causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                return_lse=False)
    # more query rows than a growing-cache family takes: exact signatures
    q, k, v = make_qkv(1, 4, _plan.FAMILY_MAX_Q + 1, 20, 16, dtype=F16, kv_heads=2)
    flash_attention(q, k, v, variant="v2", **base)
    options, variant, layout = dict(base), "v2", "bhsd"
    if change == "causal":
        options["causal"] = True
    elif change == "scale":
        options["softmax_scale"] = 0.7
    elif change == "window":
        options["window_size"] = (3, 3)
    elif change == "softcap":
        options["softcap"] = 2.0
    elif change == "lse":
        options["return_lse"] = True
    elif change == "strides":
        q = _strided(tuple(q.shape), F16)
    elif change == "alignment":  # a view 2 bytes into its storage
        q = torch.randn(q.numel() + 1, dtype=F16)[1:].view(q.shape)
    elif change == "heads":
        k, v = (torch.randn(1, 4, 20, 16, dtype=F16) for _ in range(2))
    elif change == "variant":
        variant = "v1"
    else:
        layout = "bshd"
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    if layout == "bshd":
        out = flash_attention_v2(q, k, v, **options)
    else:
        out = flash_attention(q, k, v, variant=variant, **options)
    assert len(calls) == 2 and len(_plan._plans) == 2
    ref, _ = reference_attention(q, k, v, layout=layout, causal=options["causal"],
                                 softmax_scale=options["softmax_scale"],
                                 window_size=options["window_size"], softcap=options["softcap"])
    assert_matches(out[0] if options["return_lse"] else out, ref, TOLERANCE[F16])


def test_calls_with_masks_slopes_or_gradients_take_the_general_path(monkeypatch):
    calls = _forward_calls(monkeypatch)
    q, k, v = make_qkv(1, 2, 8, 8, 16, dtype=F32)
    keep = torch.rand(8, 8) > 0.3
    slopes = torch.rand(2)
    for _ in range(2):
        flash_attention(q, k, v, variant="v2", attn_mask=keep)
        flash_attention(q, k, v, variant="v2", alibi_slopes=slopes)
        flash_attention(q.requires_grad_(), k, v, variant="v2").sum().backward()
        q = q.detach()
    assert len(calls) == 6 and not _plan._plans
    bf16 = [x.bfloat16() for x in (q, k, v)]  # computed in float32 on the CPU
    flash_attention(*bf16, variant="v2")
    assert not _plan._plans


def test_an_empty_call_is_never_replayed(monkeypatch):
    q, k, v = make_qkv(1, 2, 4, 0, 16, dtype=F16)
    for _ in range(2):
        out = flash_attention(q, k, v, variant="v2")
        assert torch.equal(out, torch.zeros_like(out))
    assert list(_plan._plans.values()) == [_plan.NOT_REPLAYABLE]


def test_invalid_calls_are_still_rejected_after_a_plan():
    """Inputs and options of other types than the recorded ones never share its key, so the
    checks of the general path still see them."""
    q, k, v = make_qkv(1, 2, 8, 8, 16, dtype=F16)
    flash_attention(q, k, v, variant="v2", causal=True, softmax_scale=1.0)
    with pytest.raises(TypeError, match="causal"):
        flash_attention(q, k, v, variant="v2", causal=1, softmax_scale=1.0)
    with pytest.raises(TypeError, match="softmax_scale"):
        flash_attention(q, k, v, variant="v2", causal=True, softmax_scale=True)
    with pytest.raises(TypeError, match="k has dtype"):
        flash_attention(q, k.float(), v, variant="v2", causal=True, softmax_scale=1.0)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        flash_attention(q.numpy(), k, v, variant="v2", causal=True, softmax_scale=1.0)
    with pytest.raises(ValueError, match="variant"):
        flash_attention(q, k, v, variant="v3", causal=True, softmax_scale=1.0)


def test_the_plan_store_is_bounded(monkeypatch):
    monkeypatch.setattr(_plan, "_MAX_PLANS", 2)
    for sk in (5, 6, 7):
        q, k, v = make_qkv(1, 1, _plan.FAMILY_MAX_Q + 1, sk, 16, dtype=F16)
        flash_attention(q, k, v, variant="v2")
    assert 1 <= len(_plan._plans) <= 2
    for sk in (41, 43, 45, 47):  # split-KV with several splits: plans by key length
        q, k, v = make_qkv(1, 2, 1, sk, 16, dtype=F16, kv_heads=1)
        SelectedKernel("splitkv")(q, k, v)
    by_length = [e for e in _plan._plans.values() if type(e) is _plan.ByLength]
    assert len(by_length) == 1 and 1 <= len(by_length[0]) <= 2


def _growing_cache(run, layout: str, lengths, device="cpu", dtype=F16, head_dim=40):
    """Decode-like calls (3 query rows, GQA) on contiguous caches of the given lengths, as a
    DynamicCache grows; returns [(q, k, v, out)]."""
    calls = []
    for sk in lengths:
        q, k, v = make_qkv(2, 4, 3, sk, head_dim, dtype=dtype, layout=layout, kv_heads=2,
                           device=device)
        calls.append((q, k, v, run(q, k, v, causal=True, softcap=2.0)))
    return calls


GROWING = ENTRY_POINTS  # split-KV: one split at these sizes


def _count_launches(monkeypatch) -> list[int]:
    """Kernels actually run on the CPU (each holds the interpreter lock once)."""
    from kernels import _runtime

    launches: list[int] = []

    class Counted:
        def __enter__(self) -> None:
            launches.append(1)

        def __exit__(self, *exc_info: object) -> None:
            pass

    monkeypatch.setattr(_runtime, "_interpreter_lock", Counted())
    return launches


@pytest.mark.parametrize("name, layout, run", GROWING, ids=[e[0] for e in GROWING])
def test_a_growing_cache_replays_one_family_plan(name, layout, run, monkeypatch):
    """Odd key lengths 17-31 are one family (one power-of-two bucket; Triton specialises
    neither them nor the k/v strides differently):
    one recording (and its dry probe), then replays that read the key length and the k/v
    strides from each call, bit for bit what the general path gives and right."""
    calls = _forward_calls(monkeypatch)
    launches = _count_launches(monkeypatch)
    grown = _growing_cache(run, layout, (17, 19, 23, 31))
    assert len(calls) == 2, "later lengths did not replay the family plan"
    assert launches == [1] * 4, "the dry probe launched a kernel"
    [(key, plan)] = _plan._plans.items()
    assert _plan.is_family(key) and isinstance(plan, _plan.Plan)
    assert all(step.sizes for step in plan.steps)
    monkeypatch.setattr(_plan, "signature", lambda *args, **kw: None)  # plans off
    for q, k, v, out in grown:
        assert torch.equal(out, run(q, k, v, causal=True, softcap=2.0))
        ref, _ = reference_attention(q, k, v, layout=layout, causal=True, softcap=2.0)
        assert_matches(out, ref, TOLERANCE[F16])


def test_family_keys_follow_the_bucket_and_triton_specialisation(monkeypatch):
    """A length divisible by 16 (Triton specialises on it) or in another power-of-two bucket
    (the selector's thresholds are bucket edges) records a new family plan."""
    calls = _forward_calls(monkeypatch)
    run = ENTRY_POINTS[1][2]
    _growing_cache(run, "bhsd", (17, 32, 33, 35, 64, 65))
    assert len(calls) == 2 * 5  # families 17, 32 (16 | 32), 33 and 35, 64, 65
    assert all(_plan.is_family(key) for key in _plan._plans)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_the_probe_cache_is_small_whatever_the_cache(layout):
    """A probe as long as the cache would double a large cache's memory for a moment."""
    for keys, probed in ((4096, 16), (16, 32), (1, 16)):
        shape = (2, 3, keys, 8) if layout == "bhsd" else (2, keys, 3, 8)
        k = torch.empty(shape, dtype=F16)
        kp, vp = _plan.probe_cache(k, k, layout)
        seq = 2 if layout == "bhsd" else 1
        assert kp.shape[seq] == vp.shape[seq] == probed and kp.is_contiguous()
        assert kp.shape[:seq] + kp.shape[seq + 1:] == k.shape[:seq] + k.shape[seq + 1:]


def test_split_kv_and_other_calls_use_exact_plans(monkeypatch):
    """Split-KV launches with several splits depend on the key length through their split
    count and length, so its family keeps a plan per key length (ByLength); non-contiguous
    caches (a slice of a static cache) and calls with more than FAMILY_MAX_Q query rows never
    form a family."""
    calls = _forward_calls(monkeypatch)
    run = ENTRY_POINTS[4][2]
    first = []
    for sk in (41, 43, 43):  # one kv head: two splits on the interpreter's 4 "multiprocessors"
        q, k, v = make_qkv(1, 2, 3, sk, 40, dtype=F16, kv_heads=1)
        first.append((q, k, v, run(q, k, v, causal=True, softcap=2.0)))
    assert len(calls) == 2 + 1  # 41: recorded and probed; 43: recorded; 43 again: replayed
    [entry] = _plan._plans.values()
    assert type(entry) is _plan.ByLength and sorted(entry) == [41, 43]
    assert all(isinstance(plan, _plan.Plan) for plan in entry.values())
    for q, k, v, out in first:
        ref, _ = reference_attention(q, k, v, causal=True, softcap=2.0)
        assert_matches(out, ref, TOLERANCE[F16])
    cache = torch.randn(1, 2, 64, 16, dtype=F16)
    q = torch.randn(1, 2, 1, 16, dtype=F16)
    assert not _plan.is_family(_plan.signature(q, cache[:, :, :20], cache[:, :, :20], "bhsd",
                                               False, "v2", False, None, False, (-1, -1), 0.0))
    q = torch.randn(1, 2, _plan.FAMILY_MAX_Q + 1, 16, dtype=F16)
    assert not _plan.is_family(_plan.signature(q, cache, cache, "bhsd", False, "v2", False,
                                               None, False, (-1, -1), 0.0))


@pytest.mark.gpu
@pytest.mark.parametrize("name, layout, run", ENTRY_POINTS, ids=IDS)
def test_gpu_replay_equals_the_general_path(name, layout, run, monkeypatch, gpu_device):
    """On CUDA a replay calls the compiled kernels' launchers directly, with pointers passed
    as ints (split-KV: several splits, its workspace and its stream's counters; V1: its
    float32 workspace); under triton 3.6, their C launch functions."""
    calls = _forward_calls(monkeypatch)
    # V2 on sm_90 too: the Hopper kernel's descriptor launches are not replayed
    monkeypatch.setattr(launch, "HOPPER_CONFIGS", {})
    sq, sk = (1, 3000) if name in ("splitkv", "auto") else (100, 300)
    q, k, v = make_qkv(2, 8, sq, sk, 128, dtype=torch.bfloat16, layout=layout, kv_heads=2,
                       device=gpu_device)
    run(q, k, v, causal=True, return_lse=True)
    recorded = 2 if sq == 1 else 1  # one query row: also the dry probe of its family
    q2, k2, v2 = (torch.randn_like(x) for x in (q, k, v))
    out, lse = run(q2, k2, v2, causal=True, return_lse=True)
    assert len(calls) == recorded, "the second call did not replay"
    monkeypatch.setattr(_plan, "signature", lambda *args, **kw: None)
    want_out, want_lse = run(q2, k2, v2, causal=True, return_lse=True)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    ref, _ = reference_attention(q2, k2, v2, layout=layout, causal=True)
    assert_matches(out, ref, 1e-2)
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) == _runtime._DIRECT_TRITON:
        assert any(_runtime._direct.values()), "no launch took the C launch function"


def test_threads_record_and_replay_their_own_calls(monkeypatch):
    """Recording is per thread: threads calling the same and different signatures at once
    each get their own right answers; they also race on the first import of the interpreted
    kernels, which starts afresh here."""
    import sys
    import threading

    from kernels import _runtime

    monkeypatch.setattr(_runtime, "_modules", {})
    for name in [n for n in sys.modules if n.startswith("kernels._triton_interpreted")]:
        monkeypatch.delitem(sys.modules, name)
    inputs = [make_qkv(1, 2, sq, 12, 16, dtype=F16) for sq in (5, 5, 9, 9, 5, 9)]
    results: dict[int, list[torch.Tensor]] = {}
    start = threading.Barrier(len(inputs))

    def work(index: int) -> None:
        q, k, v = inputs[index]
        start.wait()
        results[index] = [flash_attention(q, k, v, variant="v2", causal=True)
                          for _ in range(3)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(_plan._plans) == 2
    for index, (q, k, v) in enumerate(inputs):
        ref, _ = reference_attention(q, k, v, causal=True)
        for out in results[index]:
            assert_matches(out, ref, TOLERANCE[F16])


@pytest.mark.gpu
def test_gpu_growing_cache_family_replays(monkeypatch, gpu_device):
    """Family replays on CUDA (compiled kernels, odd key lengths 129-251: one family) equal
    the general path bit for bit, in both layouts."""
    for name, layout, run in GROWING[2:]:
        calls = _forward_calls(monkeypatch)
        grown = _growing_cache(run, layout, (129, 131, 201, 251), device=gpu_device,
                               dtype=torch.bfloat16, head_dim=128)
        assert len(calls) == 2, name
        with monkeypatch.context() as off:
            off.setattr(_plan, "signature", lambda *args, **kw: None)
            for q, k, v, out in grown:
                assert torch.equal(out, run(q, k, v, causal=True, softcap=2.0))
                ref, _ = reference_attention(q, k, v, layout=layout, causal=True, softcap=2.0)
                assert_matches(out, ref, 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_calls_on_a_second_device_launch_there(monkeypatch):
    """Inputs on cuda:1 while cuda:0 is current: each entry point's first call (general
    path), its replay (pointers as ints, the direct C launch under triton 3.6) and a masked
    call launch on cuda:1, split-KV with several splits and its counters included, and
    give the reference's answer there; cuda:0 stays current."""
    calls = _forward_calls(monkeypatch)
    monkeypatch.setattr(launch, "HOPPER_CONFIGS", {})  # V2's replays, on sm_90 too
    device = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    for name, layout, run in ENTRY_POINTS:
        sq, sk = (1, 3000) if name in ("splitkv", "auto") else (100, 300)
        q, k, v = make_qkv(2, 8, sq, sk, 128, dtype=torch.bfloat16, layout=layout,
                           kv_heads=2, device=device)
        first = run(q, k, v, causal=True)
        recorded = len(calls)
        q2, k2, v2 = (torch.randn_like(x) for x in (q, k, v))
        replayed = run(q2, k2, v2, causal=True)
        assert len(calls) == recorded, f"{name}: the second call did not replay"
        keep = torch.rand(2, 1, 1, sk, device=device) > 0.2
        masked = run(q2, k2, v2, attn_mask=keep)
        assert torch.cuda.current_device() == 0
        torch.cuda.synchronize(device)
        for out, args, kw in ((first, (q, k, v), dict(causal=True)),
                              (replayed, (q2, k2, v2), dict(causal=True)),
                              (masked, (q2, k2, v2), dict(attn_mask=keep))):
            assert out.device == device, name
            ref, _ = reference_attention(*args, layout=layout, **kw)
            assert_matches(out, ref, 1e-2)
