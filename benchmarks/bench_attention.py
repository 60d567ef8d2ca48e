"""Forward attention throughput on the GPU: our kernels against SDPA's backends and compiled
FlexAttention, every provider in the same process and run.

Shapes: B*S = 32k tokens, H*D = 2048, S in {1k, 2k, 4k, 8k, 16k}, D in {64, 128, 256},
fp16 and bf16, causal and not, plus GQA rows (H = 32, Hkv = 8, D = 128). FLOPs =
4*B*H*Sq*Sk*D, halved for causal (Sq = Sk). Time = triton.testing.do_bench median (L2 cleared
between runs). Also measured in the same run: the dense matrix-product ceiling (an 8192^3
matmul in each dtype) and, per shape, the first call of ``variant="auto"`` (compile on a new
specialisation, otherwise a cold launch) against its steady-state median.

    PYTHONPATH=. python benchmarks/bench_attention.py --out benchmarks/RESULTS.md \
        --json benchmarks/attention_h100.json
    python benchmarks/plot_attention.py benchmarks/attention_h100.json   # the PNG

Prints a markdown table (TFLOP/s per provider and our ratios to each peer) and appends it,
dated, with the GPU and versions, to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import flash_attention, flash_attention_v2

PEERS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}
OURS = ("v1", "v2", "auto")


def _flex(causal: bool, batch: int, heads: int, seq: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.config.recompile_limit = 256  # one compile per benchmark shape
    torch._dynamo.config.accumulated_recompile_limit = 4096
    compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, seq, seq,
                                       device=device)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def providers(names: list[str], causal: bool, batch: int, heads: int, seq: int,
              device: torch.device) -> dict:
    """name -> fn(q, k, v) on BHSD inputs (V2 gets BSHD views of the same data)."""
    fns = {}
    for name in names:
        if name in ("v1", "auto"):
            fns[name] = (lambda var: lambda q, k, v: flash_attention(
                q, k, v, causal=causal, variant=var))(name)
        elif name == "v2":
            fns[name] = lambda q, k, v: flash_attention_v2(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        elif name in PEERS:
            def run(q, k, v, backend=PEERS[name]):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=causal)
            fns[name] = run
        elif name == "flex":
            fns[name] = _flex(causal, batch, heads, seq, device)
        else:
            raise ValueError(f"unknown provider {name!r}")
    return fns


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="*", default=[64, 128, 256])
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--causal", nargs="+", default=["false", "true"])
    p.add_argument("--providers", nargs="+",
                   default=list(OURS) + list(PEERS) + ["flex"])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--gqa", type=int, nargs=3, default=[32, 8, 128], metavar=("H", "HKV", "D"),
                   help="extra GQA rows (heads, kv_heads, head_dim); 0 0 0 for none")
    p.add_argument("--out", default=None, help="append the table to this markdown file")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--check", action="store_true", help="check each provider against SDPA")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    device = torch.device("cuda")
    ceiling = {name: matmul_ceiling(getattr(torch, name)) for name in args.dtypes}
    print("matmul ceiling TFLOP/s:", {k: round(v) for k, v in ceiling.items()}, flush=True)
    shapes = [(d, args.hidden // d, args.hidden // d) for d in args.head_dims]
    if args.gqa[0]:
        gqa_heads, gqa_kv_heads, gqa_dim = args.gqa
        shapes.append((gqa_dim, gqa_heads, gqa_kv_heads))
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for causal in [c == "true" for c in args.causal]:
            for head_dim, heads, kv_heads in shapes:
                for seq in args.seqs:
                    row = measure(args, device, dtype, causal, head_dim, heads, kv_heads, seq)
                    row["ceiling"] = ceiling[dtype_name]
                    rows.append(row)
                    print(" ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(header=header().strip(), rows=rows), fh, indent=1)
    table = format_table(rows, args.providers)
    print(table)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(header() + "\n" + table + "\n")


def matmul_ceiling(dtype: torch.dtype, n: int = 8192) -> float:
    """Dense matrix-product TFLOP/s of an n^3 matmul (do_bench median)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / triton.testing.do_bench(lambda: a @ b, return_mode="median") * 1e-9


def measure(args, device, dtype, causal, head_dim, heads, kv_heads, seq) -> dict:
    """One benchmark row: TFLOP/s per provider, and auto's first-call and steady times."""
    batch = max(1, args.tokens // seq)
    q = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1)
    row = dict(dtype=str(dtype).removeprefix("torch."), causal=causal, D=head_dim, S=seq,
               B=batch, H=heads, Hkv=kv_heads)
    torch.cuda.synchronize()
    start = time.perf_counter()
    flash_attention(q, k, v, causal=causal, variant="auto")
    torch.cuda.synchronize()
    row["first_call_ms"] = (time.perf_counter() - start) * 1e3
    ref = None
    k_rep = k.repeat_interleave(heads // kv_heads, 1) if kv_heads != heads else k
    v_rep = v.repeat_interleave(heads // kv_heads, 1) if kv_heads != heads else v
    for name, fn in providers(args.providers, causal, batch, heads, seq, device).items():
        try:
            # ours read the shared K/V heads in place; peers get them repeated per head
            kk, vv = (k, v) if name in OURS else (k_rep, v_rep)
            out = fn(q, kk, vv)
            if name == "v2":
                out = out.transpose(1, 2)
            if args.check:
                if ref is None:
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        ref = torch.nn.functional.scaled_dot_product_attention(
                            q, k_rep, v_rep, is_causal=causal).float()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if not err < 2e-2:
                    print(f"  !! {name} rel err {err:.2e}", flush=True)
            ms = triton.testing.do_bench(lambda f=fn, a=kk, b=vv: f(q, a, b),
                                         return_mode="median")
            row[name] = flops / ms * 1e-9
            if name == "auto":
                row["auto_ms"] = ms
        except Exception as exc:  # a peer may not support a shape
            print(f"  {name} failed: {type(exc).__name__}: {exc}"[:200], flush=True)
            row[name] = math.nan
    return row


def header() -> str:
    props = torch.cuda.get_device_properties(0)
    return (f"\n### Forward TFLOP/s, {datetime.date.today().isoformat()}, {props.name}, "
            f"torch {torch.__version__}, triton {triton.__version__}\n")


def format_table(rows: list[dict], names: list[str]) -> str:
    """TFLOP/s per provider, auto's ratio to each peer and to the matmul ceiling, and auto's
    first call (ms) against its steady-state median (ms)."""
    peers = [n for n in names if n not in OURS]
    cols = ["dtype", "causal", "D", "S", "B", "H", "Hkv"] + names
    cols += [f"auto/{p}" for p in peers] + ["auto/ceiling", "first ms", "steady ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        auto = r.get("auto", math.nan)
        cells = [str(r[c]) for c in cols[:7]] + [f"{r.get(n, math.nan):.0f}" for n in names]
        cells += [f"{auto / r.get(p, math.nan):.2f}" for p in peers]
        cells += [f"{auto / r['ceiling']:.2f}", f"{r['first_call_ms']:.1f}",
                  f"{r.get('auto_ms', math.nan):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
