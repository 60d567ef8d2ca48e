"""Static-cache generation through transformers' automatic compile: patched (triton_fa) vs SDPA.

On CUDA, ``generate(..., cache_implementation="static")`` compiles the forward pass by itself
(mode "reduce-overhead": CUDA graphs). Both implementations run that same path on the same
random weights: the 1.2B Llama config of ``bench_hf.py`` in bf16, 128-token prompts, 256 new
tokens, batch 1 and 16, generated tokens per second as the median of --repeats runs (after a
warm-up run that compiles). Token agreement with SDPA: the first step where the greedy tokens
differ, and SDPA's top-two logit gap there (random weights make near-ties; two correct
kernels that sum in different orders may flip a tie under 0.05), plus the largest logit
difference on the steps before it.

    PYTHONPATH=. python benchmarks/bench_static.py --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton
from bench_hf import build_model, median_seconds


def generate(model, prompts: torch.Tensor, new_tokens: int):
    return model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                          cache_implementation="static", return_dict_in_generate=True,
                          output_logits=True)


def agreement(ours, ref) -> dict:
    """First differing step, SDPA's top-two gap there, max logit diff before it."""
    ours_tokens, ref_tokens = ours.sequences, ref.sequences
    steps = len(ref.logits)
    first = steps
    for step in range(steps):
        col = ref_tokens.shape[1] - steps + step
        if not torch.equal(ours_tokens[:, col], ref_tokens[:, col]):
            first = step
            break
    gap = float("nan")
    if first < steps:
        top2 = ref.logits[first].float().topk(2, dim=-1).values
        gap = (top2[:, 0] - top2[:, 1]).min().item()
    diff = max(((a.float() - b.float()).abs().max().item()
                for a, b in zip(ours.logits[:first], ref.logits[:first], strict=True)),
               default=0.0)
    return dict(first_diff=first, gap_at_diff=gap, max_logit_diff=diff, steps=steps)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_static.py needs a CUDA GPU")
    from flashattn_modules import patch_hf_model

    device = torch.device("cuda")
    model = build_model("llama", device)
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len),
                                device=device)
        results = {}
        for impl in ("sdpa", "triton_fa"):
            torch._dynamo.reset()
            handle = patch_hf_model(model) if impl == "triton_fa" else None
            try:
                out = generate(model, prompts, args.new_tokens)  # compiles
                seconds = median_seconds(lambda p=prompts: generate(model, p, args.new_tokens),
                                         args.repeats)
            finally:
                if handle is not None:
                    handle.restore()
            results[impl] = out
            row = dict(batch=batch, impl=impl, tok_s=batch * args.new_tokens / seconds)
            if impl != "sdpa":
                row.update(agreement(out, results["sdpa"]))
            rows.append(row)
            print(row, flush=True)
    table = format_table(rows)
    print(table)
    if args.out:
        import transformers

        with open(args.out, "a") as fh:
            fh.write(f"\n### Static-cache generation (automatic compile), "
                     f"{datetime.date.today().isoformat()}, {torch.cuda.get_device_name()}, "
                     f"torch {torch.__version__}, triton {triton.__version__}, transformers "
                     f"{transformers.__version__}\n\nLlama 1.2B config (GQA 32/8), bf16, "
                     f"random weights, {args.prompt_len}-token prompts, {args.new_tokens} "
                     f"new tokens, greedy, median of {args.repeats}.\n\n{table}\n")


def format_table(rows: list[dict]) -> str:
    lines = ["| batch | attention | tok/s | first differing step (of 256) | sdpa top-2 gap "
             "there | max logit diff before |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["impl"] == "sdpa":
            lines.append(f"| {r['batch']} | sdpa | {r['tok_s']:.0f} | - | - | - |")
        else:
            first = "none" if r["first_diff"] == r["steps"] else str(r["first_diff"])
            lines.append(f"| {r['batch']} | {r['impl']} | {r['tok_s']:.0f} | {first} | "
                         f"{r['gap_at_diff']:.3g} | {r['max_logit_diff']:.3g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
