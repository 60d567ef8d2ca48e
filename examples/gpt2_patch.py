"""GPT-2 with eager, SDPA and our patched attention: compare logits and greedy tokens, time.

    python examples/gpt2_patch.py                            # CPU: 2 layers, kernels interpreted
    python examples/gpt2_patch.py --device cuda              # GPU: GPT-2 small, random weights
    python examples/gpt2_patch.py --device cuda --model gpt2 # pretrained (directory or hub name)

The model has GPT-2 small's architecture (``GPT2Config()``), with the weights of --model when
given and random weights otherwise (the example says which). One left-padded batch, so the
padding mask is exercised, runs through transformers' eager attention, its SDPA attention and
ours (``patch_hf_model``); the logits of each are compared with eager's on the real (unpadded)
positions, greedy generation is run with each and its tokens compared with eager's, and the
prefill time and generation speed of each are printed.

On CPU the example runs our Triton kernels through Triton's interpreter
(FLASHATTN_CPU_BACKEND=triton, set below) at small sizes: it shows the real kernels at work,
not their speed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import load_tokenizer, use_interpreter_on_cpu
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from flashattn_modules import patch_hf_model

# Tokenised and repeated to make the prompts when the model comes with a tokenizer.
TEXT = ("FlashAttention computes exact attention in tiles that stay in on-chip memory, so the "
        "full matrix of attention scores is never written out. Each tile of queries walks over "
        "the keys and values once, keeping a running maximum and a running sum of the softmax, "
        "and rescales its partial output whenever the maximum grows. ")
# Max |logits - eager| allowed for ours, relative to the largest |logit| (at least 1).
RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[Any, float]:
    """fn()'s last result and its median wall time in milliseconds. On a GPU one untimed call
    comes first (Triton compiles the kernels on first use) and the GPU is synchronised around
    each timed call."""
    if device.type == "cuda":
        fn()
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return result, sorted(times)[len(times) // 2]


def load_model(name: str | None, layers: int, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer or None): the weights of ``name`` when given, else GPT-2 small's
    architecture with ``layers`` layers and random weights."""
    if name is None:
        print(f"random weights (no --model given): GPT2Config() with {layers} layers; the "
              f"logits and generated tokens mean nothing, only their agreement counts")
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers))
        tokenizer = None
    else:
        print(f"weights from {name}")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = load_tokenizer(name, model.config.vocab_size, TEXT)
    return model.to(device, dtype).eval(), tokenizer



def make_batch(tokenizer: Any, vocab_size: int, batch: int, prompt_len: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded token ids and attention mask, both (batch, prompt_len): the first row fills
    the width and the real lengths fall evenly to half of it in the last row. The ids come from
    the tokenizer (TEXT, from a different offset in each row) when there is one, else random."""
    lengths = [prompt_len - (prompt_len // 2) * i // max(batch - 1, 1) for i in range(batch)]
    if tokenizer is not None:
        text_ids = tokenizer(TEXT)["input_ids"]
        needed = prompt_len + 7 * batch
        stream = torch.tensor(text_ids * (needed // len(text_ids) + 1))
        rows = [stream[7 * i: 7 * i + n] for i, n in enumerate(lengths)]
    else:
        rows = [torch.randint(vocab_size, (n,)) for n in lengths]
    ids = torch.zeros(batch, prompt_len, dtype=torch.long)  # pad id: any id, masked out
    mask = torch.zeros(batch, prompt_len, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, prompt_len - len(row):] = row
        mask[i, prompt_len - len(row):] = 1
    return ids.to(device), mask.to(device)


def run_backend(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
                device: torch.device, repeats: int) -> dict[str, Any]:
    """Logits of the batch, greedy tokens, prefill time (ms) and generation speed (new tokens
    of the batch per second of generate(), its prefill included) with the model's current
    attention implementation."""
    # Positions count real tokens only, as generate() numbers them for left-padded rows.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits, prefill_ms = timed(
            lambda: model(input_ids=ids, attention_mask=mask, position_ids=positions).logits,
            device, repeats)
    # min_new_tokens: every row generates exactly new_tokens tokens (end-of-text suppressed),
    # so every backend does the same work.
    tokens, generate_ms = timed(
        lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0),
        device, repeats)
    return {"logits": logits.float(), "tokens": tokens[:, ids.shape[1]:], "prefill_ms": prefill_ms,
            "tokens_per_s": tokens.shape[0] * new_tokens / (generate_ms / 1e3)}


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="weights: a local directory or a hub name (default: random weights)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--layers", type=int, default=None,
                   help="random weights only; default: 12 (GPT-2 small) on GPU, 2 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on GPU, 2 on CPU")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="padded prompt width; default: 512 on GPU, 12 on CPU")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="greedy tokens per row; default: 64 on GPU, 4 on CPU")
    p.add_argument("--dtype", default=None, help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs (median); default: 5 on GPU, 1 on CPU")
    a = p.parse_args()
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    if a.model is not None and a.layers is not None:
        p.error("--layers applies to random weights only (without --model)")
    layers = a.layers or (12 if gpu else 2)
    batch = a.batch or (8 if gpu else 2)
    prompt_len = a.prompt_len or (512 if gpu else 12)
    new_tokens = a.new_tokens or (64 if gpu else 4)
    dtype = getattr(torch, a.dtype or ("float16" if gpu else "float32"))
    repeats = a.repeats or (5 if gpu else 1)
    if not gpu:
        use_interpreter_on_cpu()

    torch.manual_seed(0)
    model, tokenizer = load_model(a.model, layers, dtype, device)
    config = model.config
    if prompt_len + new_tokens > config.n_positions:
        p.error(f"--prompt-len + --new-tokens must be <= {config.n_positions} (n_positions)")
    ids, mask = make_batch(tokenizer, config.vocab_size, batch, prompt_len, device)
    print(f"model: {config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, "
          f"{dtype}, {device}; batch {batch}, prompt width {prompt_len} (left-padded, "
          f"{int(mask.sum())} real tokens), {new_tokens} new tokens per row; token ids from "
          f"{'the tokenizer' if tokenizer is not None else 'random draws (no tokenizer)'}")

    results = {}
    for name in ("eager", "sdpa"):
        model.set_attn_implementation(name)
        results[name] = run_backend(model, ids, mask, new_tokens, device, repeats)
    with patch_hf_model(model):  # restores sdpa on exit
        results["triton_fa"] = run_backend(model, ids, mask, new_tokens, device, repeats)

    real = mask.bool()
    ref = results["eager"]
    total = ref["tokens"].numel()
    print(f"{'backend':<10} {'max |logits - eager|':>21} {'greedy tokens = eager':>22} "
          f"{'prefill ms':>11} {'generate() tokens/s':>20}")
    for name, r in results.items():
        r["diff"] = (r["logits"] - ref["logits"]).abs()[real].max().item()
        r["agree"] = int((r["tokens"] == ref["tokens"]).sum())
        print(f"{name:<10} {r['diff']:>21.2e} {str(r['agree']) + '/' + str(total):>22} "
              f"{r['prefill_ms']:>11.2f} {r['tokens_per_s']:>20.1f}")
    print("(generate() tokens/s: the batch's new tokens over generate()'s time, prefill included)")
    if dtype != torch.float32:
        print("half precision: a near-tie between two logits may flip a greedy choice (after "
              "which the continuations differ), with SDPA as with ours; in fp32 exact "
              "agreement is expected")

    ours = results["triton_fa"]
    tolerance = RTOL[dtype] * max(1.0, ref["logits"][real].abs().max().item())
    if not ours["diff"] <= tolerance:
        raise SystemExit(f"triton_fa logits differ from eager by {ours['diff']:.2e} > "
                         f"{tolerance:.1e}")
    print(f"logits match eager within {tolerance:.1e}")
    print(f"greedy generation: triton_fa agrees with eager on {ours['agree']}/{total} tokens")
    if dtype == torch.float32 and ours["agree"] != total:
        raise SystemExit("float32 greedy tokens differ from eager's")


if __name__ == "__main__":
    main()
