"""End-to-end Hugging Face benchmark: patched (triton_fa) vs SDPA vs eager attention.

A model patched to our kernels (``patch_hf_model``) against transformers' SDPA and eager
attention, same random weights.

Models: GPT-2 (GPT2Config(n_positions=8192), fp16) and a 1.2B Llama (hidden 2048, 16
layers, 32 heads, 8 KV heads, vocab 32000, 8192 positions, bf16). For each implementation:
- relative logit error against SDPA, ||logits - sdpa|| / ||sdpa|| over a random 2k prompt;
- prefill time (batch 1, full forward without cache, last-token logits) at 2k and 8k tokens;
- greedy generation throughput with a DynamicCache from 128-token random prompts, 256 new
  tokens (no early stop), batch 1 and 16, in generated tokens per second.
Times are medians of --repeats runs (default 5; fewer fit a tight time budget), taken
round-robin over the implementations after one warm-up run of each (the order rotated every
round), so that drifts of the host's or the GPU's clocks fall on every implementation alike.
A second table gives, for every timed measurement, sdpa's time over triton_fa's within each
round (median, min and max over the rounds): a ratio paired by round, which cancels what
drifts between rounds (a noisy host moves whole runs by 10% and more).

    PYTHONPATH=. python benchmarks/bench_hf.py --out benchmarks/RESULTS.md

Prints a markdown table and appends it, dated, with the GPU and the torch, triton and
transformers versions, to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import triton

IMPLEMENTATIONS = ("triton_fa", "sdpa", "eager")
MODELS = ("gpt2", "llama")


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    """A randomly initialised model of the benchmark's configuration, on ``device``."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if name == "gpt2":
        config, dtype = GPT2Config(n_positions=8192), torch.float16
    elif name == "llama":
        config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                             max_position_embeddings=8192)
        dtype = torch.bfloat16
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 dtype=dtype)
    return model.eval()


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one ``fn()``, the GPU drained before and after. Every run starts from an
    empty garbage collector (a full collection first, untimed), so that a collection that the
    previous runs provoked does not land in this one's time; the ones it provokes do."""
    gc.collect()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    return statistics.median(seconds(fn) for _ in range(repeats))


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, impl: str) -> Iterator[None]:
    """``model`` switched to ``impl`` (triton_fa through ``patch_hf_model``), back to sdpa after."""
    from flashattn_modules import patch_hf_model

    if impl == "triton_fa":
        with patch_hf_model(model):
            yield
    else:
        model.set_attn_implementation(impl)
        try:
            yield
        finally:
            model.set_attn_implementation("sdpa")


def generate_options(prompts: torch.Tensor, new_tokens: int) -> dict:
    """``generate()`` keyword arguments of the generation rows: greedy, exactly
    ``new_tokens`` new tokens, a DynamicCache, ``prompts`` (B, S) unpadded."""
    return dict(attention_mask=torch.ones_like(prompts), do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                cache_implementation="dynamic")


def interleaved_times(model: torch.nn.Module, impls: list[str], fn: Callable[[], object],
                      repeats: int) -> dict[str, list[float]]:
    """Wall times of ``fn`` per implementation, timed round-robin: one warm-up run each, then
    ``repeats`` rounds that run every implementation once, the order rotated each round, so
    that drifts of the host or GPU clocks fall on all of them alike. Entry r of every list is
    round r."""
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for round_ in range(-1, repeats):
        shift = max(round_, 0) % len(impls)
        for impl in impls[shift:] + impls[:shift]:
            with attention_implementation(model, impl):
                elapsed = seconds(fn)
            if round_ >= 0:
                times[impl].append(elapsed)
    return times


def paired_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """``num[i] / den[i]`` of each round i of two interleaved timings, as (median, min, max).
    A ratio taken within a round cancels what drifts between rounds, which a ratio of two
    medians does not."""
    ratios = sorted(a / b for a, b in zip(num, den, strict=True))
    return statistics.median(ratios), ratios[0], ratios[-1]


def paired_speedups(times: dict[str, list[float]]) -> tuple[float, float, float] | None:
    """sdpa's time over triton_fa's in each round of ``interleaved_times`` (above 1: ours
    faster; ``paired_ratio``); None unless both were timed."""
    if "triton_fa" not in times or "sdpa" not in times:
        return None
    return paired_ratio(times["sdpa"], times["triton_fa"])


Speedups = dict[str, tuple[float, float, float] | None]


def run_model(name: str, args: argparse.Namespace,
              device: torch.device) -> tuple[list[dict], Speedups]:
    """Every measurement of one model, for every implementation of ``args.impls``: a row per
    implementation, and ``paired_speedups`` per timed measurement (named as in the table)."""
    model = build_model(name, device)
    vocab = model.config.vocab_size
    rows = {impl: {"model": name, "impl": impl} for impl in args.impls}
    speedups: Speedups = {}
    prompt_2k = torch.randint(0, vocab, (1, 2048), device=device)
    with torch.no_grad():
        reference = model(prompt_2k, use_cache=False).logits.float()  # SDPA
        for impl in args.impls:
            with attention_implementation(model, impl):
                logits = model(prompt_2k, use_cache=False).logits.float()
            rows[impl]["rel_err"] = ((logits - reference).norm() / reference.norm()).item()
        for length in args.prefill_lengths:
            ids = torch.randint(0, vocab, (1, length), device=device)
            print(f"{name} prefill {length} ...", flush=True)
            def prefill(m=model, ids=ids):
                return m(ids, use_cache=False, logits_to_keep=1)

            times = interleaved_times(model, args.impls, prefill, args.repeats)
            for impl, t in times.items():
                rows[impl][f"prefill_{length}"] = 1e3 * statistics.median(t)
            speedups[f"prefill {length}"] = paired_speedups(times)
    for batch in args.batch_sizes:
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), device=device)
        options = generate_options(prompts, args.new_tokens)
        print(f"{name} generate batch {batch} ...", flush=True)
        def generate(m=model, p=prompts, o=options):
            return m.generate(p, **o)

        times = interleaved_times(model, args.impls, generate, args.repeats)
        for impl, t in times.items():
            rows[impl][f"gen_b{batch}"] = batch * args.new_tokens / statistics.median(t)
        speedups[f"generate b{batch}"] = paired_speedups(times)
    for row in rows.values():
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)
    del model
    torch.cuda.empty_cache()
    return list(rows.values()), speedups


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    cols = [("model", "model", "{}"), ("impl", "attention", "{}"),
            ("rel_err", "rel. logit err vs sdpa", "{:.2e}")]
    cols += [(f"prefill_{n}", f"prefill {n // 1024}k ms" if n % 1024 == 0 else
              f"prefill {n} ms", "{:.1f}") for n in args.prefill_lengths]
    cols += [(f"gen_b{b}", f"generate b{b} tok/s", "{:.0f}") for b in args.batch_sizes]
    lines = ["| " + " | ".join(title for _, title, _ in cols) + " |",
             "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) if key in row else "-"
                                       for key, _, fmt in cols) + " |")
    return "\n".join(lines)


def format_speedups(speedups: dict[str, Speedups], args: argparse.Namespace) -> str:
    """The per-round speedups of triton_fa over sdpa (``paired_speedups``) of every model, as a
    markdown table; empty unless both were timed."""
    lines = [f"| model | measurement | sdpa time / triton_fa time, median of {args.repeats} "
             "rounds | min | max |", "|---|---|---|---|---|"]
    for model, by_name in speedups.items():
        lines += ["| " + " | ".join([model, name] + [f"{r:.3f}" for r in ratio]) + " |"
                  for name, ratio in by_name.items() if ratio is not None]
    return "\n".join(lines) if len(lines) > 2 else ""


def header(args: argparse.Namespace) -> str:
    import transformers

    return (f"\n### Hugging Face end to end, {datetime.date.today().isoformat()}, "
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
            f"{triton.__version__}, transformers {transformers.__version__}\n\n"
            f"GPT-2 (124M, fp16) and Llama 1.2B (GQA 32/8, bf16), random weights; prefill: "
            f"batch 1, no cache; generate: greedy, DynamicCache, {args.prompt_len}-token "
            f"prompts, {args.new_tokens} new tokens; median of {args.repeats}, the "
            f"implementations timed round-robin.\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS,
                        default=list(IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per measurement (median); lower it to fit a budget")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/RESULTS.md",
                        help="markdown file the table is appended to ('' to skip)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not torch.cuda.is_available():
        sys.exit("bench_hf.py needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    rows, speedups = [], {}
    for name in args.models:
        model_rows, speedups[name] = run_model(name, args, device)
        rows += model_rows
    table = format_table(rows, args)
    ratios = format_speedups(speedups, args)
    if ratios:
        table += "\n\n" + ratios
    print(table)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(header(args) + "\n" + table + "\n")


if __name__ == "__main__":
    main()
