"""Quick GPU correctness smoke test of V1/V2 against float64 (used before the full suite)."""
import math

import torch

from kernels import flash_attention, flash_attention_v2


def ref(q, k, v, causal):
    q, k, v = (x.double() for x in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    sq, sk = s.shape[-2:]
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0) @ v


for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for (B, H, sq, sk, d, causal) in [(2, 4, 129, 129, 64, True), (1, 3, 1000, 777, 80, True),
                                       (2, 2, 17, 300, 128, False), (1, 2, 513, 513, 256, True),
                                       (2, 4, 1, 4096, 128, False), (1, 2, 300, 200, 40, True)]:
        q = torch.randn(B, H, sq, d, device="cuda", dtype=dtype)
        k = torch.randn(B, H, sk, d, device="cuda", dtype=dtype)
        v = torch.randn(B, H, sk, d, device="cuda", dtype=dtype)
        r = ref(q, k, v, causal)
        for var in ("v1", "v2", "auto"):
            o = flash_attention(q, k, v, causal=causal, variant=var)
            again = flash_attention(q, k, v, causal=causal, variant=var)  # cached launch
            assert torch.equal(o, again), "relaunch through the compiled-kernel cache differs"
            err = ((o.double() - r).norm() / r.norm()).item()
            print(f"{str(dtype):15s} {var} B{B} H{H} sq{sq} sk{sk} d{d} causal={causal} "
                  f"err={err:.2e} {'OK' if err < 1e-2 else 'FAIL'}", flush=True)
        o2 = flash_attention_v2(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                causal=causal).transpose(1, 2)
        err = ((o2.double() - r).norm() / r.norm()).item()
        print(f"{str(dtype):15s} v2-bshd err={err:.2e} {'OK' if err < 1e-2 else 'FAIL'}")
