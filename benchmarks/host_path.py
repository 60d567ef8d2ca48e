"""Python cost of one call on the way to a kernel launch, on the CPU (no GPU needed).

The launch itself is stubbed out (``kernels._runtime.launch`` only reports to a recording
``kernels._plan.Recorder``, ``replay_launch`` does nothing), so what is timed is validation,
option handling, the selector, output allocation and building the kernel arguments: the part
of an eager call's host cost that this package's Python decides. Each case is timed twice:
replaying its recorded launch plan (what every call after the first of a signature does) and
through the general path (plans off). The GPU host adds Triton's C launcher, the general
path's specialisation key of about 45 arguments and the CUDA caching allocator on top (see
NOTES.md, "Host overhead"). Shapes: a GPT-2 decode step (B1 H12 Sq1 Sk300 D64, fp16), also on
a cache that grows by one key per call (one growing-cache plan family per specialisation),
and a split-KV decode call (B1 H32 Hkv8 Sq1 Sk1k D128: its family keeps plans by key length).
Before them, the checks that ``flashattn_modules.hf.triton_fa_attention`` runs on every call
of a patched model, on a GPT-2 layer with the keyword arguments GPT-2's generation passes.

    PYTHONPATH=. python benchmarks/host_path.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kernels import _plan, _runtime, flash_attention, flash_attention_v2
from kernels.api import attention
from kernels.selector import SelectedKernel


def best_us(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Best mean time per call over ``rounds`` rounds of ``calls`` calls, in microseconds."""
    for _ in range(min(300, calls)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def _stub_launch(kernel, grid, device, args, constexprs, num_warps, num_stages,
                 maxnreg=None) -> None:
    """``_runtime.launch`` without the launch: it only reports to the active recorder."""
    recorder = _plan.active_recorder()
    if recorder is not None:
        recorder.calls.append((kernel, grid, args, constexprs, num_warps, num_stages, maxnreg))
        if not recorder.dry:
            recorder.launches.append((kernel, grid, args, constexprs, num_warps, num_stages))


def main(calls: int = 4000, rounds: int = 5) -> dict[str, tuple[float, float]]:
    """Time every case (best of ``rounds`` means over ``calls`` calls), print and return
    {case: (us replayed, us general path)}. On return the launch stubs and the plans switch
    are undone, and the plan store holds what it held before (none of the stubs' plans)."""
    saved = _runtime.launch, _runtime.replay_launch, _plan.signature
    saved_plans = dict(_plan._plans)
    _runtime.launch = _stub_launch  # kernels._launch calls it through the module
    _runtime.replay_launch = lambda step, cuda_index, args: None
    try:
        print(f"patched layer's checks (GPT-2 layer, generation's kwargs): "
              f"{layer_checks_us(calls, rounds):.1f} us", flush=True)
        return _time_cases(calls, rounds)
    finally:
        _runtime.launch, _runtime.replay_launch, _plan.signature = saved
        _plan._plans.clear()
        _plan._plans.update(saved_plans)


def layer_checks_us(calls: int, rounds: int) -> float:
    """Time of ``hf._check_call`` (kwargs, dropout, the layer config's output_attentions) on
    a one-layer GPT-2's attention layer, with the kwargs that its generation passes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from flashattn_modules import hf

    layer = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4)).transformer.h[0].attn
    query = torch.randn(16, 4, 1, 16, dtype=torch.float16)
    kwargs = {"use_cache": True, "position_ids": torch.arange(1)}
    return best_us(lambda: hf._check_call(layer, query, None, 0.0, kwargs), calls, rounds)


def _time_cases(calls: int, rounds: int) -> dict[str, tuple[float, float]]:
    q = torch.randn(1, 12, 1, 64, dtype=torch.float16)
    k = torch.randn(1, 12, 300, 64, dtype=torch.float16)
    v = torch.randn_like(k)
    q2, k2, v2 = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    def patched_call() -> torch.Tensor:
        # what flashattn_modules.hf.triton_fa_attention does on CUDA tensors
        return attention(q, k, v, layout="bhsd", out_bshd=True, variant="auto", causal=False,
                         softmax_scale=0.125, return_lse=False, attn_mask=None,
                         window_size=(-1, -1), softcap=0.0, alibi_slopes=None)

    caches = [(torch.randn(1, 12, sk, 64, dtype=torch.float16),) * 2 for sk in range(257, 512)]
    step = iter(range(1 << 62))

    def growing_call() -> torch.Tensor:
        # a decode step on a DynamicCache: one key more than the last call's (cycling)
        k_n, v_n = caches[next(step) % len(caches)]
        return attention(q, k_n, v_n, layout="bhsd", out_bshd=True, variant="auto",
                         causal=False, softmax_scale=0.125, return_lse=False, attn_mask=None,
                         window_size=(-1, -1), softcap=0.0, alibi_slopes=None)

    qd = torch.randn(1, 32, 1, 128, dtype=torch.float16)
    kd = torch.randn(1, 8, 1024, 128, dtype=torch.float16)
    splitkv = SelectedKernel("splitkv")

    cases = {
        "Hugging Face attention call (BHSD in, BSHD out)": patched_call,
        "the same, cache growing by one key per call (Sk 257-511)": growing_call,
        'flash_attention(variant="v2")': lambda: flash_attention(q, k, v, variant="v2"),
        'flash_attention(variant="auto")': lambda: flash_attention(q, k, v, variant="auto"),
        "flash_attention_v2 (BSHD)": lambda: flash_attention_v2(q2, k2, v2),
        "flash_attention_v2, return_lse=True": lambda: flash_attention_v2(q2, k2, v2,
                                                                           return_lse=True),
        "split-KV decode (B1 H32/8 Sq1 Sk1k D128, several splits)": lambda: splitkv(qd, kd, kd),
    }
    signature = _plan.signature
    times = {}
    for name, fn in cases.items():
        replayed = best_us(fn, calls, rounds)
        _plan.signature = lambda *args, **kw: None  # plans off: the general path every call
        general = best_us(fn, calls, rounds)
        _plan.signature = signature
        times[name] = replayed, general
        print(f"{name}: {replayed:.1f} us replayed, {general:.1f} us general path", flush=True)
    return times


if __name__ == "__main__":
    main()
