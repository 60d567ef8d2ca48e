"""A 12-layer nn.TransformerEncoder before and after replace_multihead_attention, on the GPU.

Model: nn.TransformerEncoderLayer(d_model=1024, nhead=16, dim_feedforward=4096, dropout=0.0,
batch_first=True) x 12, batch 8, seq 2048, fp16, eval, no_grad (every size is an option).
Two inputs: no mask, and a key-padding mask that pads the last 25% of half of the batch.
Rows per input:
- "torch": the original encoder (enable_nested_tensor=True, torch's default: its fused fast
  path, and with padding its nested-tensor route, which skips pad tokens);
- "torch dense" (padded input only): the same weights built with enable_nested_tensor=False;
- "ours": the original after replace_multihead_attention.
Time: median of --reps forward passes (CUDA events) after --warmup passes. Difference: max
|out - torch's out| over unpadded positions (torch's nested route leaves pad positions 0).

    PYTHONPATH=. python benchmarks/bench_encoder.py --out benchmarks/RESULTS.md

Prints a markdown table and appends it, dated, with the GPU and versions, to --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import warnings

import torch
import triton
from torch import nn

from flashattn_modules import replace_multihead_attention


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--pad-fraction", type=float, default=0.25,
                   help="fraction of the sequence padded at the end, in half of the batch")
    p.add_argument("--reps", type=int, default=10, help="timed forward passes (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="benchmarks/RESULTS.md",
                   help="markdown file the table is appended to ('' to skip)")
    args = p.parse_args(argv)
    if not 0.0 <= args.pad_fraction < 1.0:
        p.error(f"--pad-fraction must be in [0, 1), got {args.pad_fraction}")
    return args


def build_models(args: argparse.Namespace, device: torch.device
                 ) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(torch original, torch with enable_nested_tensor=False, ours), same weights, eval."""
    dtype = getattr(torch, args.dtype)
    layer = nn.TransformerEncoderLayer(d_model=args.d_model, nhead=args.heads,
                                       dim_feedforward=args.ffn, dropout=0.0, batch_first=True,
                                       device=device, dtype=dtype)
    original = nn.TransformerEncoder(layer, num_layers=args.layers).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the enable_nested_tensor notice
        dense = nn.TransformerEncoder(copy.deepcopy(layer), num_layers=args.layers,
                                      enable_nested_tensor=False).eval()
    dense.load_state_dict(original.state_dict())
    ours = replace_multihead_attention(copy.deepcopy(original))
    return original, dense, ours


def time_forward(model: nn.Module, src: torch.Tensor, kpm: torch.Tensor | None,
                 reps: int, warmup: int) -> tuple[float, torch.Tensor]:
    """Median milliseconds of ``reps`` forward passes, and the output."""
    with torch.no_grad():
        for _ in range(warmup):
            out = model(src, src_key_padding_mask=kpm)
        times = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(src, src_key_padding_mask=kpm)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_encoder.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.manual_seed(0)
    original, dense, ours = build_models(args, device)
    src = torch.randn(args.batch, args.seq, args.d_model, device=device,
                      dtype=getattr(torch, args.dtype))
    padded = torch.zeros(args.batch, args.seq, dtype=torch.bool, device=device)
    padded[args.batch // 2:, args.seq - int(args.seq * args.pad_fraction):] = True
    rows = []
    for case, kpm in (("no mask", None), ("padded", padded)):
        keep = ~padded if kpm is not None else torch.ones_like(padded)
        base_ms, base_out = time_forward(original, src, kpm, args.reps, args.warmup)
        models = [("torch", original)]
        if kpm is not None:
            models.append(("torch dense", dense))
        models.append(("ours", ours))
        for name, model in models:
            ms, out = (base_ms, base_out) if model is original else time_forward(
                model, src, kpm, args.reps, args.warmup)
            diff = (out[keep].float() - base_out[keep].float()).abs().max().item()
            rows.append(dict(case=case, model=name, ms=ms, speedup=base_ms / ms, diff=diff,
                             finite=bool(torch.isfinite(out[keep]).all())))
            print(rows[-1], flush=True)
    table = format_table(rows)
    print(table)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(header(args) + "\n" + table + "\n")


def header(args: argparse.Namespace) -> str:
    props = torch.cuda.get_device_properties(0)
    return (f"\n### TransformerEncoder forward, {datetime.date.today().isoformat()}, "
            f"{props.name}, torch {torch.__version__}, triton {triton.__version__}\n\n"
            f"{args.layers} x TransformerEncoderLayer(d_model={args.d_model}, "
            f"nhead={args.heads}, dim_feedforward={args.ffn}, dropout=0.0, batch_first=True), "
            f"batch {args.batch}, seq {args.seq}, {args.dtype}, eval, no_grad; padded: last "
            f"{args.pad_fraction:.0%} of half of the batch. Median of {args.reps} (CUDA "
            f"events); difference = max |out - torch's out| on unpadded positions.\n")


def format_table(rows: list[dict]) -> str:
    lines = ["| input | model | forward ms | speed-up vs torch | max abs diff | finite |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['model']} | {r['ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['diff']:.2e} | {'yes' if r['finite'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
