"""Plot the rows of ``bench_attention.py --json``: TFLOP/s against sequence length, one panel
per head_dim x causal, our ``auto`` against the peers, one line style per dtype (--dtypes).

    python benchmarks/plot_attention.py benchmarks/attention_fp16.json \\
        benchmarks/attention_bf16.json --out benchmarks/attention_h100.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LINES = {"auto": ("ours (auto)", "C3"), "sdpa_cudnn": ("SDPA cuDNN", "C0"),
         "sdpa_flash": ("SDPA flash", "C2"), "flex": ("FlexAttention (compiled)", "C1"),
         "sdpa_efficient": ("SDPA efficient", "C7")}
STYLES = {"float16": "-", "bfloat16": "--"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", nargs="+")
    p.add_argument("--out", default="benchmarks/attention_h100.png")
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=STYLES)
    args = p.parse_args(argv)
    rows, headers = [], []
    for path in args.json:
        with open(path) as fh:
            data = json.load(fh)
        rows += data["rows"]
        headers.append(data["header"].removeprefix("### Forward TFLOP/s, "))
    panels = sorted({(r["D"], r["H"], r["Hkv"], r["causal"]) for r in rows},
                    key=lambda x: (x[3], x[2] != x[1], x[0]))
    columns = (len(panels) + 1) // 2
    fig, axes = plt.subplots(2, columns, figsize=(4.2 * columns, 7.5), squeeze=False)
    for ax, (d, h, hkv, causal) in zip(axes.flat, panels, strict=False):
        for dtype in args.dtypes:
            style = STYLES[dtype]
            sel = sorted((r for r in rows if (r["D"], r["H"], r["Hkv"], r["causal"], r["dtype"])
                          == (d, h, hkv, causal, dtype)), key=lambda r: r["S"])
            if not sel:
                continue
            for name, (label, color) in LINES.items():
                ax.plot([r["S"] for r in sel], [r.get(name) for r in sel], style, color=color,
                        marker="o", markersize=3, label=f"{label}, {dtype}")
        gqa = f", GQA {h}/{hkv}" if hkv != h else ""
        ax.set_title(f"D={d}{gqa}, {'causal' if causal else 'non-causal'}", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (B*S = 32k tokens)")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle("Attention forward TFLOP/s, " + "; ".join(sorted(set(headers))), fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
