"""End-to-end Hugging Face benchmark: patched (triton_fa) vs SDPA vs eager attention.

A model patched to our kernels (``patch_hf_model``) against transformers' SDPA and eager
attention, same random weights.

Models: GPT-2 (GPT2Config(n_positions=8192), fp16) and a 1.2B Llama (hidden 2048, 16
layers, 32 heads, 8 KV heads, vocab 32000, 8192 positions, bf16). For each implementation:
- relative logit error against SDPA, ||logits - sdpa|| / ||sdpa|| over a random 2k prompt;
- prefill time (batch 1, full forward without cache, last-token logits) at 2k and 8k tokens;
- greedy generation throughput with a DynamicCache from 128-token random prompts, 256 new
  tokens (no early stop), batch 1 and 16, in generated tokens per second.
Times are medians of --repeats runs (default 5; fewer fit a tight time budget).

    PYTHONPATH=. python benchmarks/bench_hf.py --out benchmarks/RESULTS.md

Prints a markdown table and appends it, dated, with the GPU and the torch, triton and
transformers versions, to --out.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable

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


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model: torch.nn.Module, args: argparse.Namespace, prompt_2k: torch.Tensor,
            reference: torch.Tensor) -> dict:
    """One implementation's measurements (the model already switched to it)."""
    vocab, device = model.config.vocab_size, prompt_2k.device
    row: dict = {}
    with torch.no_grad():
        logits = model(prompt_2k, use_cache=False).logits.float()
        row["rel_err"] = ((logits - reference).norm() / reference.norm()).item()
        for length in args.prefill_lengths:
            ids = torch.randint(0, vocab, (1, length), device=device)
            row[f"prefill_{length}"] = 1e3 * median_seconds(
                lambda ids=ids: model(ids, use_cache=False, logits_to_keep=1), args.repeats)
    for batch in args.batch_sizes:
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), device=device)
        options = dict(attention_mask=torch.ones_like(prompts), do_sample=False,
                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                       pad_token_id=0, cache_implementation="dynamic")
        seconds = median_seconds(lambda p=prompts, o=options: model.generate(p, **o),
                                 args.repeats)
        row[f"gen_b{batch}"] = batch * args.new_tokens / seconds
    return row


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    from flashattn_modules import patch_hf_model

    model = build_model(name, device)
    prompt_2k = torch.randint(0, model.config.vocab_size, (1, 2048), device=device)
    with torch.no_grad():
        reference = model(prompt_2k, use_cache=False).logits.float()  # SDPA
    rows = []
    for impl in args.impls:
        print(f"{name} {impl} ...", flush=True)
        if impl == "triton_fa":
            with patch_hf_model(model):
                row = measure(model, args, prompt_2k, reference)
        else:
            model.set_attn_implementation(impl)
            row = measure(model, args, prompt_2k, reference)
        rows.append({"model": name, "impl": impl, **row})
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in rows[-1].items()), flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


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


def header(args: argparse.Namespace) -> str:
    import transformers

    return (f"\n### Hugging Face end to end, {datetime.date.today().isoformat()}, "
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
            f"{triton.__version__}, transformers {transformers.__version__}\n\n"
            f"GPT-2 (124M, fp16) and Llama 1.2B (GQA 32/8, bf16), random weights; prefill: "
            f"batch 1, no cache; generate: greedy, DynamicCache, {args.prompt_len}-token "
            f"prompts, {args.new_tokens} new tokens; median of {args.repeats}.\n")


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
    rows = [row for name in args.models for row in run_model(name, args, device)]
    table = format_table(rows, args)
    print(table)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(header(args) + "\n" + table + "\n")


if __name__ == "__main__":
    main()
