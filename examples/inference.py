"""Batch inference of a causal LM with our attention: prompts of different lengths, padded.

    python examples/inference.py                          # CPU: tiny random Llama, interpreted
    python examples/inference.py --device cuda            # GPU: small random Llama-style model
    python examples/inference.py --device cuda --model Qwen/Qwen2.5-0.5B   # weights, tokenizer

The model is loaded with ``attn_implementation="triton_fa"`` (registered by importing
``flashattn_modules``). The prompts (the built-in ones, or one a line from --prompts, when the
model has a tokenizer; random token ids of varied lengths otherwise) are sorted by length,
cut into batches, left-padded and completed greedily, with a progress bar over the batches;
the throughput comes at the end. Without --model the weights are random and the completions
mean nothing: the run shows batching, padding and speed.

On CPU the example runs our Triton kernels through Triton's interpreter
(FLASHATTN_CPU_BACKEND=triton, set below) at small sizes: it shows the real kernels at work,
not their speed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable

import torch
from _common import load_tokenizer, use_interpreter_on_cpu
from tqdm import tqdm  # a requirement of transformers (and in the project's "examples" extra)
from transformers import AutoModelForCausalLM, LlamaConfig

import flashattn_modules  # noqa: F401  (registers the "triton_fa" attention implementation)

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "Explain in one paragraph why the sky is blue, as you would to a ten-year-old who has just "
    "asked you on a summer afternoon:",
    "def fibonacci(n):",
    "Q: What is the boiling point of water at sea level, in degrees Celsius? A:",
    "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker "
    "who had never once left the valley. One morning a letter arrived",
    "Translate to German: Good morning, how are you?",
    "The three laws of thermodynamics are",
]


def random_llama(gpu: bool, dtype: torch.dtype, attn: str) -> torch.nn.Module:
    """A Llama-style model (GQA, RoPE, SwiGLU) with random weights: ~200M parameters on GPU,
    a tiny one on CPU."""
    if gpu:
        config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                             num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                             max_position_embeddings=4096)
    else:
        config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256)
    print(f"random weights (no --model given): a Llama-style model with "
          f"{config.num_hidden_layers} layers, width {config.hidden_size}, "
          f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value heads; "
          f"the completions mean nothing")
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)



def pad_left(rows: list[list[int]], pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (len(rows), longest row), padded on the left."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def completion_lengths(new: torch.Tensor, eos_ids: Iterable[int]) -> list[int]:
    """Generated tokens per row of ``new`` (batch, steps): up to and including the first
    end-of-sequence token (generate() pads the rows that finished early)."""
    is_eos = torch.isin(new, torch.tensor(list(eos_ids), device=new.device))
    first = is_eos.int().argmax(dim=1) + 1
    return torch.where(is_eos.any(dim=1), first, new.shape[1]).tolist()


def sync(device: torch.device) -> None:
    """Wait for the GPU, so that wall-clock times cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="a local directory or a hub name (default: a random Llama-style model)")
    p.add_argument("--prompts", default=None,
                   help="a text file, one prompt a line (default: the built-in prompts)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 on GPU, 2 on CPU")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: 128 on GPU, 4 on CPU")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="default: 64 on GPU, 6 on CPU (built-in prompts repeat when fewer)")
    p.add_argument("--max-prompt-len", type=int, default=None,
                   help="random token ids only: default 1024 on GPU, 16 on CPU")
    p.add_argument("--attn", default="triton_fa", choices=["triton_fa", "sdpa", "eager"],
                   help="attention implementation (default: ours), to compare throughput")
    a = p.parse_args()
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, a.dtype or ("bfloat16" if gpu else "float32"))
    batch_size = a.batch_size or (16 if gpu else 2)
    max_new_tokens = a.max_new_tokens or (128 if gpu else 4)
    max_prompt_len = a.max_prompt_len or (1024 if gpu else 16)
    if not gpu and a.attn == "triton_fa":
        use_interpreter_on_cpu()

    torch.manual_seed(0)
    if a.model is None:
        model, tokenizer = random_llama(gpu, dtype, a.attn), None
    else:
        print(f"weights from {a.model}")
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype,
                                                     attn_implementation=a.attn)
        tokenizer = load_tokenizer(a.model, model.config.vocab_size, PROMPTS[0])
    model = model.to(device).eval()
    vocab_size = model.config.vocab_size

    if tokenizer is not None:
        if a.prompts is not None:
            with open(a.prompts, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f if line.strip()]
        else:
            count = a.num_prompts or (64 if gpu else 6)
            texts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
        prompts = [tokenizer(text)["input_ids"] for text in texts]
    else:
        if a.prompts is not None:
            p.error("--prompts needs a model with a tokenizer")
        count = a.num_prompts or (64 if gpu else 6)
        lengths = torch.randint(max(1, max_prompt_len // 8), max_prompt_len + 1, (count,))
        prompts = [torch.randint(vocab_size, (int(n),)).tolist() for n in lengths]
    # Any id: padded positions are masked out, and completions are cut after the first
    # end-of-sequence token, where generate() starts padding a finished row.
    pad_id = 0
    eos = model.generation_config.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # Longest first (an out-of-memory error shows at once); neighbours in length share a
    # batch, so little of each batch is padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    print(f"{len(prompts)} prompts of {min(map(len, prompts))} to {max(map(len, prompts))} "
          f"tokens, {len(batches)} batches of up to {batch_size}, up to {max_new_tokens} new "
          f"tokens each (greedy), attention {a.attn}, {dtype}, {device}")

    def generate(rows: list[list[int]], new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy completion of the rows, padded: (new tokens, attention mask of the prompts)."""
        ids, mask = pad_left(rows, pad_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad_id)
        return out[:, ids.shape[1]:], mask

    if gpu:
        print("warm-up batch (Triton compiles the kernels on first use)")
        generate([prompts[i] for i in batches[0]], 2)

    completions: dict[int, list[int]] = {}
    prompt_tokens = padding = generated = 0
    sync(device)
    start = time.perf_counter()
    for batch in tqdm(batches, desc="batches", unit="batch"):
        new, mask = generate([prompts[i] for i in batch], max_new_tokens)
        for i, row, length in zip(batch, new.tolist(), completion_lengths(new, eos_ids),
                                  strict=True):
            completions[i] = row[:length]
            generated += length
        prompt_tokens += int(mask.sum())
        padding += mask.numel() - int(mask.sum())
    sync(device)
    elapsed = time.perf_counter() - start

    for i in range(min(3, len(prompts))):
        if tokenizer is not None:
            print(f"{texts[i]!r} -> {tokenizer.decode(completions[i], skip_special_tokens=True)!r}")
        else:
            print(f"prompt {i} ({len(prompts[i])} ids) -> {completions[i]}")
    print(f"{len(prompts)} prompts: {prompt_tokens} prompt tokens "
          f"({100 * padding / (prompt_tokens + padding):.0f}% padding), {generated} generated "
          f"tokens in {elapsed:.2f} s")
    print(f"throughput: {generated / elapsed:.1f} generated tokens/s, "
          f"{len(prompts) / elapsed:.2f} prompts/s")


if __name__ == "__main__":
    main()
