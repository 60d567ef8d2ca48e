"""The one float64 reference the tests compare against.

Written naively from the documented semantics, independently of ``kernels`` (it must not
import ``kernels.torch_attention``): the full (B, H, Sq, Sk) score matrix in float64, then
every modifier in the documented order. Differentiable in q, k, v (float64 autograd), with
zero (never NaN) gradients for rows that see no key.

Semantics (``kernels.flash_attention``'s docstring):
- query head h reads K/V head h // (H // Hkv) (GQA/MQA);
- scores = scale * q @ k^T, scale = 1 / sqrt(D) by default;
- softcap > 0: scores = softcap * tanh(scores / softcap), after scaling, before masks/ALiBi;
- ALiBi: scores -= slope[b, h] * |i + Sk - Sq - j|;
- attn_mask broadcast to (B, H, Sq, Sk): bool True = take part, floating = added;
- causal: j <= i + Sk - Sq (bottom-right); window (left, right):
  i + Sk - Sq - left <= j <= i + Sk - Sq + right, -1 unbounded;
- a row that sees no key: out 0, lse -inf; lse is the natural-log log-sum-exp.
"""

from __future__ import annotations

import math

import torch


def _to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "bhsd":
        return x
    if layout == "bshd":
        return x.transpose(1, 2)
    raise ValueError(f"unknown layout {layout!r}")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        layout: str = "bhsd", causal: bool = False,
                        softmax_scale: float | None = None,
                        attn_mask: torch.Tensor | None = None,
                        window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                        alibi_slopes: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in float64. q (B, H, Sq, D) / k, v (B, Hkv, Sk, D) for layout "bhsd", or
    (B, S, H, D) for "bshd". Returns out (float64, in the input layout) and lse (B, H, Sq)
    float64. Gradients flow to q, k, v if they require grad (cast to float64 inside)."""
    q = _to_bhsd(q, layout).to(torch.float64)
    k = _to_bhsd(k, layout).to(torch.float64)
    v = _to_bhsd(v, layout).to(torch.float64)
    batch, heads, seqlen_q, head_dim = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    assert heads % kv_heads == 0
    group = heads // kv_heads
    head_index = torch.arange(heads, device=q.device) // group
    k = k[:, head_index]  # (B, H, Sk, D): query head h reads K/V head h // group
    v = v[:, head_index]

    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)

    i = torch.arange(seqlen_q, device=q.device, dtype=torch.float64)[:, None]
    j = torch.arange(seqlen_k, device=q.device, dtype=torch.float64)[None, :]
    offset = i + (seqlen_k - seqlen_q) - j  # (Sq, Sk); 0 on the bottom-right diagonal
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float64)
        slopes = slopes.expand(batch, heads) if slopes.dim() == 2 else slopes[None].expand(
            batch, heads)
        s = s - slopes[:, :, None, None] * offset.abs()

    allowed = torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        mask = attn_mask.to(q.device)
        if mask.dtype == torch.bool:
            allowed = allowed & mask.expand(batch, heads, seqlen_q, seqlen_k)
        else:
            s = s + mask.to(torch.float64).expand(batch, heads, seqlen_q, seqlen_k)
    if causal:
        allowed = allowed & (offset >= 0)
    left, right = window_size
    if left >= 0:
        allowed = allowed & (offset <= left)
    if right >= 0:
        allowed = allowed & (offset >= -right)
    allowed = allowed & (s > float("-inf"))  # a float mask's -inf removes a key too
    s = s.masked_fill(~allowed, float("-inf"))

    empty = ~allowed.any(dim=-1, keepdim=True)  # (B, H, Sq, 1): rows that see no key
    s_safe = s.masked_fill(empty, 0.0)  # keeps softmax and its gradient finite
    p = torch.softmax(s_safe, dim=-1).masked_fill(empty, 0.0)
    out = torch.einsum("bhij,bhjd->bhid", p, v)
    lse = torch.logsumexp(s_safe, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    if layout == "bshd":
        out = out.transpose(1, 2)
    return out, lse


def reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *,
                     causal: bool = False, softmax_scale: float | None = None,
                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed-sequence reference: q (Tq, H, D), k/v (Tk, Hkv, D); sequence b is rows
    cu[b]:cu[b+1]. Returns out (Tq, H, D) float64 and lse (H, Tq) float64."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    heads = q.shape[1]
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]][None]
        kb, vb = k[ck[b]:ck[b + 1]][None], v[ck[b]:ck[b + 1]][None]
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        if qb.shape[1] == 0:
            continue
        if kb.shape[1] == 0:  # no key at all: every row is empty
            outs.append(torch.zeros(qb.shape[1:], dtype=torch.float64, device=q.device))
            lses.append(torch.full((heads, qb.shape[1]), float("-inf"), dtype=torch.float64,
                                   device=q.device))
            continue
        ob, lb = reference_attention(qb, kb, vb, layout="bshd", causal=causal,
                                     softmax_scale=softmax_scale, window_size=window_size,
                                     softcap=softcap, alibi_slopes=slopes)
        outs.append(ob[0])
        lses.append(lb[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (Frobenius norms over all elements)."""
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    denom = ref64.norm().item()
    assert denom > 0, "reference is all zeros: the comparison would prove nothing"
    return (out64 - ref64).norm().item() / denom


# ----------------------------------------------------------------------------- comparisons

#: Largest relative error (``rel_err``) against the float64 reference, by input dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_matches(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "out") -> None:
    """out matches ref: finite everywhere, relative error <= tol, and no single element off
    by more than 5 * tol * max|ref| (catches a few wrong or never-written elements that a
    norm would average away)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: {(~torch.isfinite(out)).sum().item()} " \
        f"non-finite elements"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"
    worst = (out.detach().double() - ref.detach().double()).abs().max().item()
    bound = 5 * tol * ref.detach().abs().max().item()
    assert worst <= bound, f"{what}: worst element off by {worst:.3g} > {bound:.3g}"


def assert_lse_matches(lse: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4) -> None:
    """lse (float32, natural log) matches the reference: -inf exactly where the reference
    row sees no key, within atol elsewhere, and never NaN or +inf."""
    assert lse.dtype == torch.float32, f"lse dtype {lse.dtype}"
    assert lse.shape == ref.shape, f"lse shape {tuple(lse.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(lse).any(), "lse has NaN"
    assert not (lse == float("inf")).any(), "lse has +inf"
    ref_empty = ref == float("-inf")
    got_empty = lse == float("-inf")
    assert torch.equal(got_empty.cpu(), ref_empty.cpu()), (
        f"-inf rows differ: {int((got_empty != ref_empty).sum())} rows")
    if (~ref_empty).any():
        diff = (lse[~ref_empty].double() - ref[~ref_empty]).abs().max().item()
        assert diff <= atol, f"lse off by {diff:.3g} > {atol:.3g}"
