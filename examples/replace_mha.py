"""Swap the attention of an nn.TransformerEncoder for ours, check the outputs, time both.

    python examples/replace_mha.py                      # CPU: small sizes, kernels interpreted
    python examples/replace_mha.py --device cuda        # GPU: a BERT-large-sized encoder

On CPU the example runs our Triton kernels through Triton's interpreter
(FLASHATTN_CPU_BACKEND=triton, set below) at small sizes, so it shows the real kernels at work;
it is not a speed test there. On a GPU it times the encoder before and after the swap.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import use_interpreter_on_cpu
from torch import nn

from flashattn_modules import replace_multihead_attention


def median_time(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of fn() in milliseconds (synchronising the GPU around each call)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on GPU, 2 on CPU")
    p.add_argument("--seq-len", type=int, default=None, help="default: 2048 on GPU, 24 on CPU")
    p.add_argument("--d-model", type=int, default=None, help="default: 1024 on GPU, 64 on CPU")
    p.add_argument("--heads", type=int, default=None, help="default: 16 on GPU, 4 on CPU")
    p.add_argument("--layers", type=int, default=None, help="default: 12 on GPU, 2 on CPU")
    p.add_argument("--dtype", default=None, help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (median)")
    a = p.parse_args()
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    batch = a.batch or (8 if gpu else 2)
    seq = a.seq_len or (2048 if gpu else 24)
    d_model = a.d_model or (1024 if gpu else 64)
    heads = a.heads or (16 if gpu else 4)
    layers = a.layers or (12 if gpu else 2)
    dtype = getattr(torch, a.dtype or ("float16" if gpu else "float32"))
    repeats = a.repeats or (10 if gpu else 1)
    if not gpu:
        use_interpreter_on_cpu()

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0,
                                       batch_first=True)
    original = nn.TransformerEncoder(layer, layers).to(device, dtype).eval()
    swapped = replace_multihead_attention(copy.deepcopy(original))
    x = torch.randn(batch, seq, d_model, device=device, dtype=dtype)
    keep = torch.ones(batch, seq, dtype=torch.bool, device=device)
    keep[: batch // 2, seq - seq // 4:] = False  # half the batch is padded by 25%
    padding = ~keep  # nn.TransformerEncoder: True = padding

    with torch.no_grad():
        ref = original(x, src_key_padding_mask=padding)
        out = swapped(x, src_key_padding_mask=padding)
        # The original may return a nested-tensor result with zeros at padded positions;
        # compare the unpadded positions only.
        diff = (out - ref).abs()[keep].max().item()
        print(f"encoder: {layers} layers, d_model {d_model}, {heads} heads, batch {batch}, "
              f"seq {seq}, {dtype}, {device}")
        print(f"max |ours - torch| on unpadded positions: {diff:.2e}")
        t_ref = median_time(lambda: original(x, src_key_padding_mask=padding), device, repeats)
        t_out = median_time(lambda: swapped(x, src_key_padding_mask=padding), device, repeats)
    print(f"forward time: torch {t_ref:.2f} ms, swapped {t_out:.2f} ms "
          f"({t_ref / t_out:.2f}x)")
    tolerance = 5e-2 if dtype != torch.float32 else 1e-4
    if not diff <= tolerance:
        raise SystemExit(f"outputs differ by {diff:.2e} > {tolerance:.0e}")
    print("outputs match")


if __name__ == "__main__":
    main()
