"""The kernels' semantics written in PyTorch, blockwise over query rows.

Two users: the backward pass (autograd recomputes attention from the saved lse; packed varlen
inputs sequence by sequence), and callers that want our exact semantics without Triton (the
modules' CPU policy). It never holds more than ``_CHUNK_ELEMENTS`` float32 scores at a time,
so long sequences do not build the full Sq x Sk matrix. GQA is handled by viewing query heads
as (kv_heads, group): K and V are never repeated.
"""

from __future__ import annotations

import math

import torch

from ._launch import ScoreArgs

_CHUNK_ELEMENTS = 1 << 25  # 32M float32 scores (128 MiB) per query chunk


def _row_chunk(q5: torch.Tensor, seqlen_k: int) -> int:
    batch, kv_heads, group, seqlen_q, _ = q5.shape
    per_row = max(1, batch * kv_heads * group * seqlen_k)
    return max(1, min(seqlen_q, _CHUNK_ELEMENTS // per_row))


def _to5(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, S, ...) -> (B, Hkv, H // Hkv, S, ...) as a view."""
    return x.unflatten(1, (kv_heads, x.shape[1] // kv_heads))


def _chunk_scores(q5c: torch.Tensor, k5: torch.Tensor, r0: int, seqlen_q: int, seqlen_k: int,
                  args: ScoreArgs, mask5: torch.Tensor | None, slopes5: torch.Tensor | None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Natural-log scores (B, Hkv, G, R, Sk) of rows r0.. of q, and tanh(.) when softcapped."""
    s = torch.matmul(q5c, k5.transpose(-1, -2)) * args.sm_scale
    t = None
    if args.softcap > 0:
        t = torch.tanh(s / args.softcap)
        s = args.softcap * t
    rows = torch.arange(r0, r0 + q5c.shape[-2], device=s.device)
    cols = torch.arange(seqlen_k, device=s.device)
    rel = rows[:, None] + (seqlen_k - seqlen_q) - cols[None, :]
    if slopes5 is not None:
        s = s - slopes5[..., None, None] * rel.abs().to(s.dtype)
    if mask5 is not None:
        m = mask5[..., r0:r0 + q5c.shape[-2], :]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
    valid = None
    if args.window_right >= 0:
        valid = rel >= -args.window_right
    if args.window_left >= 0:
        left = rel <= args.window_left
        valid = left if valid is None else valid & left
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    return s, t


def _prepare(q: torch.Tensor, k: torch.Tensor, args: ScoreArgs):
    kv_heads = k.shape[1]
    mask5 = _to5(args.attn_mask, kv_heads) if args.attn_mask is not None else None
    slopes5 = _to5(args.alibi_slopes, kv_heads) if args.alibi_slopes is not None else None
    return kv_heads, mask5, slopes5


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: ScoreArgs,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in PyTorch (float32 math). q (B, H, Sq, D), k/v (B, Hkv, Sk, D) views;
    returns out (B, H, Sq, D) in q's dtype and lse (B, H, Sq) float32. Empty rows give 0, -inf.
    """
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    kv_heads, mask5, slopes5 = _prepare(q, k, args)
    q5, k5, v5 = _to5(q, kv_heads).float(), k.float()[:, :, None], v.float()[:, :, None]
    outs, lses = [], []
    step = _row_chunk(q5, seqlen_k)
    for r0 in range(0, seqlen_q, step):
        s, _ = _chunk_scores(q5[..., r0:r0 + step, :], k5, r0, seqlen_q, seqlen_k, args,
                             mask5, slopes5)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
        outs.append(torch.matmul(p, v5))
        lses.append(lse)
    out = torch.cat(outs, dim=-2).flatten(1, 2).to(q.dtype)
    return out, torch.cat(lses, dim=-1).flatten(1, 2)


def attention_backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, args: ScoreArgs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q (B, H, Sq, D), k and v (B, Hkv, Sk, D), recomputing the probabilities
    blockwise from the forward's lse. Rows with lse = -inf get zero gradients."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    kv_heads, mask5, slopes5 = _prepare(q, k, args)
    q5 = _to5(q, kv_heads).float()
    k5, v5 = k.float()[:, :, None], v.float()[:, :, None]
    do5 = _to5(grad_out, kv_heads).float()
    lse5 = _to5(lse, kv_heads)
    lse5 = lse5.masked_fill(lse5 == float("-inf"), 0.0)
    delta5 = (do5 * _to5(out, kv_heads).float()).sum(-1)
    if grad_lse is not None:
        delta5 = delta5 - _to5(grad_lse, kv_heads).float()
    dq5 = torch.empty_like(q5)
    dk5 = torch.zeros_like(k5)
    dv5 = torch.zeros_like(v5)
    step = _row_chunk(q5, seqlen_k)
    for r0 in range(0, seqlen_q, step):
        rows = slice(r0, r0 + step)
        qc, doc = q5[..., rows, :], do5[..., rows, :]
        s, t = _chunk_scores(qc, k5, r0, seqlen_q, seqlen_k, args, mask5, slopes5)
        p = torch.exp(s - lse5[..., rows, None])
        dv5 += torch.matmul(p.transpose(-1, -2), doc).sum(2, keepdim=True)
        ds = p * (torch.matmul(doc, v5.transpose(-1, -2)) - delta5[..., rows, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        ds = ds * args.sm_scale
        dq5[..., rows, :] = torch.matmul(ds, k5)
        dk5 += torch.matmul(ds.transpose(-1, -2), qc).sum(2, keepdim=True)
    return (dq5.flatten(1, 2).to(q.dtype), dk5[:, :, 0].to(k.dtype), dv5[:, :, 0].to(v.dtype))


def varlen_attention_backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, args: ScoreArgs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of packed q (total_q, H, D), k and v (total_k, Hkv, D): ``attention_backward``
    on each sequence in turn (grad_out and out (total_q, H, D), lse and grad_lse (H, total_q),
    ``args.alibi_slopes`` (batch, H) or None). The cumulative lengths are read on the host,
    one synchronisation per backward; rows outside every sequence get zero gradients."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()

    def bhsd(x: torch.Tensor, rows: slice) -> torch.Tensor:
        return x[rows].unsqueeze(0).transpose(1, 2)  # (1, heads, rows, D) view

    for b in range(len(starts_q) - 1):
        rq, rk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        if rq.start == rq.stop or rk.start == rk.stop:  # no rows, or rows that see no key
            continue
        slopes = args.alibi_slopes
        seq_args = args._replace(alibi_slopes=None if slopes is None else slopes[b:b + 1])
        seq_grad_lse = None if grad_lse is None else grad_lse[:, rq].unsqueeze(0)
        dq_b, dk_b, dv_b = attention_backward(
            bhsd(grad_out, rq), seq_grad_lse, bhsd(q, rq), bhsd(k, rk), bhsd(v, rk),
            bhsd(out, rq), lse[:, rq].unsqueeze(0), seq_args)
        dq[rq] = dq_b[0].transpose(0, 1)
        dk[rk] = dk_b[0].transpose(0, 1)
        dv[rk] = dv_b[0].transpose(0, 1)
    return dq, dk, dv


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
