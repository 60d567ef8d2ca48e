"""Where the time goes (GPU): host cost of one kernel call and of one patched Hugging Face
attention call in eager decoding, profiles of eager generation, prefill and the
nn.TransformerEncoder of bench_encoder.py, and what
torch.compile does with the static-cache path (graph breaks, recompilations, CUDA-graph
skips, kernel times).

    PYTHONPATH=.:benchmarks TORCH_LOGS=graph_breaks,recompiles,perf_hints \\
        python benchmarks/profile_hf.py [launcher_calls attention_calls ...]
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from collections.abc import Callable

import torch
from bench_hf import build_model, generate_options
from torch._dynamo.utils import counters

from flashattn_modules import patch_hf_model
from flashattn_modules.hf import triton_fa_attention


def per_call_us(fn, n: int = 300) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def _cprofile(fn, lines: int) -> None:
    """Print the ``lines`` costliest functions (own time) of ``fn()``."""
    pr = cProfile.Profile()
    pr.enable()
    fn()
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(lines)


def _kernel_table(fn) -> None:
    """Print the GPU kernels (and host ops) of ``fn()`` by total CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22,
                                    max_name_column_width=60))


def launcher_calls() -> None:
    """One decode call (B1 H32 Hkv8 Sk1k D128 fp16), whole and launcher by launcher."""
    from kernels import _launch, flash_attention
    from kernels.api import score_args

    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    args = score_args(q, k, causal=False, softmax_scale=None, attn_mask=None,
                      window_size=(-1, -1), softcap=0.0, alibi_slopes=None)
    out = torch.empty_like(q)
    lse = torch.empty(1, 32, 1, device="cuda", dtype=torch.float32)
    print("full call us", per_call_us(lambda: flash_attention(q, k, v, variant="auto")))
    print("forward_splitkv us",
          per_call_us(lambda: _launch.forward_splitkv(q, k, v, out, lse, args)))
    print("forward_v2 us", per_call_us(lambda: _launch.forward_v2(q, k, v, out, lse, args)))
    _cprofile(lambda: [flash_attention(q, k, v, variant="auto") for _ in range(200)], 25)


def attention_calls() -> None:
    """One decode call (Sk 300, D64, fp16) through each attention function, back to back: the
    GPT-2 shape (H12) and the Llama config's (H32, Hkv 8), at batch 1 and 16."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    for batch, heads, kv_heads in ((1, 12, 12), (16, 12, 12), (1, 32, 8), (16, 32, 8)):
        q = torch.randn(batch, heads, 1, 64, device="cuda", dtype=torch.float16)
        k = torch.randn(batch, kv_heads, 300, 64, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        module.num_key_value_groups = heads // kv_heads  # read by transformers' sdpa function
        for name, fn in (("triton_fa", triton_fa_attention), ("sdpa", sdpa_attention_forward)):
            us = per_call_us(lambda f=fn, q=q, k=k, v=v: f(module, q, k, v, None))
            print(f"B{batch} H{heads}/{kv_heads} {name} attention function: {us:.1f} us per call",
                  flush=True)
    _cprofile(lambda: [triton_fa_attention(module, q, k, v, None) for _ in range(200)], 12)


def eager_generate() -> None:
    model = build_model("gpt2", torch.device("cuda"))
    prompts = torch.randint(0, 50000, (1, 128), device="cuda")
    options = dict(attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=32,
                   min_new_tokens=32, pad_token_id=0)
    with patch_hf_model(model):
        model.generate(prompts, **options)
        _cprofile(lambda: model.generate(prompts, **options), 20)


def batch_generate() -> None:
    """GPT-2 greedy generation at batch 16 (bench_hf's batch-16 row, 64 new tokens), triton_fa
    and sdpa: wall time per step, GPU kernels, and the host's costliest functions."""
    model = build_model("gpt2", torch.device("cuda"))
    prompts = torch.randint(0, 50000, (16, 128), device="cuda")
    options = generate_options(prompts, 64)
    for impl in ("triton_fa", "sdpa"):
        handle = patch_hf_model(model) if impl == "triton_fa" else None
        for _ in range(2):
            model.generate(prompts, **options)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompts, **options)
        torch.cuda.synchronize()
        print(f"== {impl}: {1e3 * (time.perf_counter() - start) / 64:.3f} ms per step",
              flush=True)
        _kernel_table(lambda m=model: m.generate(prompts, **options))
        _cprofile(lambda m=model: m.generate(prompts, **options), 25)
        if handle is not None:
            handle.restore()


def _batch16_generation(name: str) -> tuple[torch.nn.Module, Callable[[], object]]:
    """bench_hf's model ``name`` on the GPU and its batch-16 generation row as a callable:
    greedy, 128-token random prompts, 256 new tokens, a DynamicCache."""
    model = build_model(name, torch.device("cuda"))
    prompts = torch.randint(0, model.config.vocab_size, (16, 128), device="cuda")
    options = generate_options(prompts, 256)
    return model, lambda: model.generate(prompts, **options)


def _speedup_text(times: dict[str, list[float]]) -> str:
    """``bench_hf.paired_speedups`` of round-robin ``times`` (triton_fa and sdpa), as text."""
    from bench_hf import paired_speedups

    return "sdpa / triton_fa per round: {:.3f} (min {:.3f}, max {:.3f})".format(
        *paired_speedups(times))


def step_attribution() -> None:
    """Batch-16 greedy generation (bench_hf's row) with triton_fa, sdpa and a no-op attention
    (returns the query as its output: no kernel), medians of round-robin runs: what the
    attention call costs each implementation inside a host-bound decoding step."""
    from bench_hf import interleaved_times
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def noop_attention(module, query, key, value, attention_mask, **kwargs):
        return query.transpose(1, 2), None

    AttentionInterface.register("noop_attention", noop_attention)
    AttentionMaskInterface.register("noop_attention", sdpa_mask)
    for name, repeats in (("gpt2", 9), ("llama", 5)):
        model, generate = _batch16_generation(name)
        times = interleaved_times(model, ["triton_fa", "sdpa", "noop_attention"], generate,
                                  repeats)
        print(name, {impl: f"{1e3 * statistics.median(t) / 256:.3f} ms per step"
                     for impl, t in times.items()}, _speedup_text(times), flush=True)
        del model, generate  # the callable holds the model too
        torch.cuda.empty_cache()


def collector_generate(models: tuple[str, ...] = ("gpt2", "llama")) -> None:
    """Batch-16 greedy generation (bench_hf's row) of each of ``models``, triton_fa against
    sdpa round-robin, with Python's garbage collector running as usual and then switched off
    during each timed run: whether the collections that a run provokes weigh on one
    implementation more."""
    import gc

    from bench_hf import interleaved_times

    for name in models:
        model, generate = _batch16_generation(name)

        def without_collector(fn=generate):
            gc.disable()
            try:
                return fn()
            finally:
                gc.enable()

        for label, fn in (("collector on", generate), ("collector off", without_collector)):
            times = interleaved_times(model, ["triton_fa", "sdpa"], fn, 7)
            rates = {impl: 16 * 256 / statistics.median(t) for impl, t in times.items()}
            print(f"{name} b16, {label}: " + ", ".join(f"{impl} {r:.0f} tok/s"
                                                      for impl, r in rates.items())
                  + ", " + _speedup_text(times), flush=True)
        del model, generate, without_collector, fn  # the callables hold the model too
        torch.cuda.empty_cache()


def _static_llama(new_tokens: int) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """bench_hf's Llama config, one random 128-token prompt, and greedy static-cache
    generate() options for ``new_tokens`` tokens."""
    model = build_model("llama", torch.device("cuda"))
    prompts = torch.randint(0, 32000, (1, 128), device="cuda")
    options = dict(attention_mask=torch.ones_like(prompts), do_sample=False,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                   cache_implementation="static")
    return model, prompts, options


def static_generate() -> None:
    model, prompts, options = _static_llama(new_tokens=16)
    with patch_hf_model(model):
        for run in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(prompts, **options)
            torch.cuda.synchronize()
            print(f"static generate run {run}: {time.perf_counter() - start:.2f} s", flush=True)
    for group in ("stats", "graph_break", "inductor"):
        print(group, dict(counters[group]), flush=True)


def prefill_profile() -> None:
    """GPU kernel times of one prefill with triton_fa and with sdpa: GPT-2 at 2k and 8k
    tokens, the Llama config at 2k (the rows of issue 5 nearest to parity)."""
    for name, length in (("gpt2", 2048), ("gpt2", 8192), ("llama", 2048)):
        model = build_model(name, torch.device("cuda"))
        ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
        for impl in ("triton_fa", "sdpa"):
            handle = patch_hf_model(model) if impl == "triton_fa" else None
            with torch.no_grad():
                for _ in range(2):
                    model(ids, use_cache=False, logits_to_keep=1)
                print(f"== {name} {length} tokens, {impl}")
                _kernel_table(lambda m=model, ids=ids: m(ids, use_cache=False, logits_to_keep=1))
            if handle is not None:
                handle.restore()
        del model
        torch.cuda.empty_cache()


def encoder_profile() -> None:
    """GPU kernel times of one forward of bench_encoder.py's encoder (no mask), torch's
    original (its fused fast path) and after replace_multihead_attention."""
    import bench_encoder

    args = bench_encoder.parse_args([])
    original, _, ours = bench_encoder.build_models(args, torch.device("cuda"))
    src = torch.randn(args.batch, args.seq, args.d_model, device="cuda",
                      dtype=getattr(torch, args.dtype))
    for name, model in (("torch", original), ("ours", ours)):
        with torch.no_grad():
            for _ in range(3):
                model(src)
            print(f"== {name}")
            _kernel_table(lambda m=model: m(src))


def static_calls() -> None:
    """The attention calls of a compiled static-cache generation (Llama, batch 1): the
    arguments of each distinct call, and its GPU time replayed outside the graph on fresh
    tensors of the same sizes and strides (holding the graph's own would upset CUDA graphs)."""
    import triton

    from kernels import api

    model, prompts, options = _static_llama(new_tokens=8)
    seen: dict[str, tuple] = {}
    run_kernel = api._run_kernel

    def describe(t):
        return None if t is None else (t.dtype, tuple(t.shape), t.stride())

    def fresh(desc):
        if desc is None:
            return None
        dtype, shape, stride = desc
        t = torch.empty_strided(shape, stride, dtype=dtype, device="cuda")
        return t.normal_() if dtype.is_floating_point and dtype != torch.float32 else t.zero_()

    def logged(q, k, v, args, variant, *rest):
        descs = (describe(q), describe(k), describe(v), describe(args.attn_mask))
        seen.setdefault(str((variant, args.causal, descs)), (descs, args, variant, rest))
        return run_kernel(q, k, v, args, variant, *rest)

    api._run_kernel = logged
    try:
        with patch_hf_model(model):
            model.generate(prompts, **options)
    finally:
        api._run_kernel = run_kernel
    for key, (descs, args, variant, rest) in seen.items():
        q, k, v, mask = map(fresh, descs)
        call = (q, k, v, args._replace(attn_mask=mask), variant, *rest)
        us = triton.testing.do_bench(lambda c=call: run_kernel(*c)) * 1e3
        print(f"{us:8.1f} us  {key}", flush=True)


def static_profile() -> None:
    """GPU kernel times of a compiled static-cache generation (16 new tokens), triton_fa."""
    model, prompts, options = _static_llama(new_tokens=16)
    with patch_hf_model(model):
        for _ in range(2):
            model.generate(prompts, **options)
        _kernel_table(lambda: model.generate(prompts, **options))


if __name__ == "__main__":
    import sys

    parts = sys.argv[1:] or ["launcher_calls", "attention_calls", "eager_generate",
                             "static_generate"]
    for part in parts:
        globals()[part]()
