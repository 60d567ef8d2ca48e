"""Forward attention throughput on the GPU: our kernels against SDPA's backends and compiled
FlexAttention, every provider in the same process and run.

Shapes: B*S = 32k tokens, H*D = 2048, S in {1k, 2k, 4k, 8k, 16k}, D in {64, 128} (and more
with --head-dims), fp16 and bf16, causal and not. FLOPs = 4*B*H*Sq*Sk*D, halved for causal
(Sq = Sk). Time = triton.testing.do_bench median (L2 cleared between runs).

    PYTHONPATH=. python benchmarks/bench_attention.py --out benchmarks/RESULTS.md

Prints a markdown table (TFLOP/s per provider and our ratios to each peer) and appends it,
dated, with the GPU and versions, to --out.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys

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
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--causal", nargs="+", default=["false", "true"])
    p.add_argument("--providers", nargs="+",
                   default=list(OURS) + list(PEERS) + ["flex"])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--kv-heads-div", type=int, default=1,
                   help="GQA: kv_heads = heads // this")
    p.add_argument("--out", default=None, help="append the table to this markdown file")
    p.add_argument("--check", action="store_true", help="check each provider against SDPA")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    device = torch.device("cuda")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for causal in [c == "true" for c in args.causal]:
            for head_dim in args.head_dims:
                for seq in args.seqs:
                    heads = args.hidden // head_dim
                    batch = max(1, args.tokens // seq)
                    kv_heads = heads // args.kv_heads_div
                    q = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)
                    k = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype)
                    v = torch.randn_like(k)
                    flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1)
                    fns = providers(args.providers, causal, batch, heads, seq, device)
                    ref = None
                    result = {}
                    for name, fn in fns.items():
                        try:
                            if kv_heads != heads and name not in OURS:
                                kk = k.repeat_interleave(heads // kv_heads, 1)
                                vv = v.repeat_interleave(heads // kv_heads, 1)
                            else:
                                kk, vv = k, v
                            out = fn(q, kk, vv)
                            if name == "v2":
                                out = out.transpose(1, 2)
                            if args.check:
                                if ref is None:
                                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                                        ref = torch.nn.functional.scaled_dot_product_attention(
                                            q, kk, vv, is_causal=causal).float()
                                err = ((out.float() - ref).norm() / ref.norm()).item()
                                if not err < 2e-2:
                                    print(f"  !! {name} rel err {err:.2e}", flush=True)
                            ms = triton.testing.do_bench(lambda f=fn, q=q, a=kk, b=vv: f(q, a, b),
                                                         return_mode="median")
                            result[name] = flops / ms * 1e-9
                        except Exception as exc:  # a peer may not support a shape
                            print(f"  {name} failed: {type(exc).__name__}: {exc}"[:200],
                                  flush=True)
                            result[name] = math.nan
                    row = dict(dtype=dtype_name, causal=causal, D=head_dim, S=seq, B=batch,
                               H=heads, Hkv=kv_heads, **result)
                    rows.append(row)
                    print(" ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()), flush=True)
    table = format_table(rows, args.providers)
    print(table)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(header() + "\n" + table + "\n")


def header() -> str:
    props = torch.cuda.get_device_properties(0)
    return (f"\n### Forward TFLOP/s, {datetime.date.today().isoformat()}, {props.name}, "
            f"torch {torch.__version__}, triton {triton.__version__}\n")


def format_table(rows: list[dict], names: list[str]) -> str:
    peers = [n for n in names if n not in OURS]
    cols = ["dtype", "causal", "D", "S", "B", "H", "Hkv"] + names
    cols += [f"auto/{p}" for p in peers]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r[c]) for c in cols[:7]] + [f"{r.get(n, math.nan):.0f}" for n in names]
        cells += [f"{r.get('auto', math.nan) / r.get(p, math.nan):.2f}" for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
