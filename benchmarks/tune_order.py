"""A/B of the causal grid order (``kernels/_triton/common.py``'s ``tile_order``): the
launcher's heads per group (``kernels._launch._order_group``) against head-by-head order (one
head per group), with SDPA's cuDNN backend in the same process. Rounds alternate between
the providers, and each shape reports the median of its rounds (do_bench medians, L2
cleared), ours as a fraction of cuDNN and the grouped order over head-by-head.

Shapes: issue 7's causal table (B*S = 32k tokens, H*D = 2048, S 1k-16k, D 64/128/256, and
GQA H32/Hkv8 at D 128) and the batch-1 prefill shapes of issue 5's models (GPT-2 H12 D64,
the Llama config H32/Hkv8 D64, at 2k and 8k).

    PYTHONPATH=. python benchmarks/tune_order.py --dtypes float16 bfloat16
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import BackendSelector, _launch, api
from kernels.api import score_args


def shapes(seqs: list[int], head_dims: list[int], table: bool
           ) -> list[tuple[int, int, int, int, int]]:
    """(B, H, Hkv, S, D) rows: the attention table's causal shapes (if ``table``), then the
    batch-1 ones."""
    rows = []
    for d in head_dims if table else []:
        for s in seqs:
            rows.append((32768 // s, 2048 // d, 2048 // d, s, d))
    for s in seqs if table else []:
        rows.append((32768 // s, 32, 8, s, 128))
    for s in (2048, 8192):
        rows += [(1, 12, 12, s, 64), (1, 32, 8, s, 64)]
    return rows


def _time(fn, graph: bool) -> float:
    """do_bench median (ms); under a CUDA graph for batch-1 shapes, whose host time (the
    launcher's general path, taken on every call here) would otherwise show."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return triton.testing.do_bench(fn, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--dtypes", nargs="+", default=["float16"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch1-only", action="store_true", help="skip the table's shapes")
    a = p.parse_args()
    rule = _launch._order_group

    def ours(grouped: bool):
        """The kernel ``variant="auto"`` runs at these shapes (V2, or the Hopper kernel where
        it applies), through the launcher's general path (a launch plan would replay the
        first call's order)."""
        def run(q, k, v):
            out = torch.empty_like(q)
            args = score_args(q, k, causal=True, softmax_scale=None, attn_mask=None,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None)
            _launch._order_group = rule if grouped else (lambda *args: 1)
            try:
                api._dispatch(q, k, v, out, None, args, "v2", None, None, 0)
            finally:
                _launch._order_group = rule
            return out
        return run

    def cudnn(q, k, v):
        """cuDNN on K/V heads repeated per query head (outside the timed call), as
        bench_attention.py gives its peers."""
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, L2 {torch.cuda.get_device_properties(0).L2_cache_size >> 20}"
          " MiB")
    print("| dtype | B | H | Hkv | S | D | heads/group | grouped TF/s | by head TF/s | cuDNN TF/s "
          "| grouped/cuDNN | by head/cuDNN | grouped/by head |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in a.dtypes:
        for B, H, Hkv, S, D in shapes(a.seqs, a.head_dims, not a.batch1_only):
            row(getattr(torch, dtype_name), B, H, Hkv, S, D, a.rounds, ours, cudnn, rule)


def row(dtype: torch.dtype, B: int, H: int, Hkv: int, S: int, D: int, rounds: int, ours,
        cudnn, rule) -> None:
    """Check each provider against cuDNN, time them round-robin, print the table row."""
    device = torch.device("cuda")
    q = torch.randn(B, H, S, D, device=device, dtype=dtype)
    k, v = (torch.randn(B, Hkv, S, D, device=device, dtype=dtype) for _ in range(2))
    chosen = BackendSelector().select_attention(B, H, S, D, kv_heads=Hkv, dtype=dtype,
                                                causal=True, device=device)
    assert chosen.variant == "v2", chosen.variant
    flops = 2 * B * H * S * S * D  # causal: half of 4 * B * H * S * S * D
    k_rep, v_rep = (x.repeat_interleave(H // Hkv, 1) for x in (k, v))
    calls = {"grouped": lambda: ours(True)(q, k, v), "by head": lambda: ours(False)(q, k, v),
             "cudnn": lambda: cudnn(q, k_rep, v_rep)}
    ref = calls["cudnn"]().float()
    for name, fn in calls.items():
        err = ((fn().float() - ref).norm() / ref.norm()).item()
        assert err < 2e-2, (name, err)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(_time(fn, B == 1))
    tf = {name: flops / statistics.median(t) * 1e-9 for name, t in times.items()}
    group = rule(device, True, B * H, H // Hkv, S, S, D, q.element_size())
    print(f"| {str(dtype)[6:]} | {B} | {H} | {Hkv} | {S} | {D} | {group} "
          f"| {tf['grouped']:.0f} | {tf['by head']:.0f} | {tf['cudnn']:.0f} "
          f"| {tf['grouped'] / tf['cudnn']:.3f} | {tf['by head'] / tf['cudnn']:.3f} "
          f"| {tf['grouped'] / tf['by head']:.3f} |", flush=True)

if __name__ == "__main__":
    main()
