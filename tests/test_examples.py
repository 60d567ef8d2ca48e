"""The examples (GitHub issue 8), each run as a script in a subprocess at its CPU defaults.

Each runs under a small wrapper that counts the launches of our Triton kernels
(``kernels._runtime.launch``), so a test fails if an example silently ran PyTorch's attention
instead of the interpreted kernels. Besides the defaults (random weights, no tokenizer), the
Hugging Face examples are run once with --model on a tiny model saved to a temporary directory
with a word-level tokenizer, which covers loading weights and real token ids offline.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
RUNS: list[str] = []  # what each example printed; conftest shows them after the run

# Runs the script argv[1] with the arguments after it, as `python script ...` would, and
# prints how many times our kernels were launched.
_WRAPPER = textwrap.dedent("""
    import os
    import runpy
    import sys

    from kernels import _runtime

    launches = [0]
    real_launch = _runtime.launch

    def counting_launch(*args, **kwargs):
        launches[0] += 1
        return real_launch(*args, **kwargs)

    _runtime.launch = counting_launch
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python script`
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        print(f"kernel launches: {launches[0]}")
""")


def run_example(name: str, *args: str) -> str:
    """Run examples/<name> with ``args`` (PYTHONPATH = the repository root); its stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FLASHATTN_CPU_BACKEND", None)  # the examples set it themselves
    done = subprocess.run([sys.executable, "-c", _WRAPPER, str(EXAMPLES / name), *args],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    launches = int(re.search(r"kernel launches: (\d+)", done.stdout).group(1))
    assert launches > 0, f"our kernels never ran:\n{done.stdout}"
    RUNS.append(f"$ python examples/{name} {' '.join(args)}\n{done.stdout}")
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A 1-layer GPT-2 and a 1-layer Llama with random weights, each saved with a word-level
    tokenizer (unknown words -> [UNK]) whose ids fit the model."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the of a is in to and attention keys queries tile capital France sea".split()
    vocab = {"[UNK]": 0, "[EOS]": 1, **{word: i + 2 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend,
                                                     unk_token="[UNK]", eos_token="[EOS]")
    configs = {
        "gpt2": transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100,
                                        bos_token_id=1, eos_token_id=1),
        "llama": transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1, bos_token_id=1, eos_token_id=1,
                                          pad_token_id=None),
    }
    paths = {}
    for name, config in configs.items():
        path = tmp_path_factory.mktemp(name)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def _gpt2_checks(out: str, tokens: int) -> None:
    """The table row of triton_fa: logits within 1e-4 of eager, all greedy tokens agree."""
    row = re.search(r"^triton_fa\s+(\S+)\s+(\d+)/(\d+)\s", out, re.MULTILINE)
    assert row is not None, out
    assert float(row.group(1)) <= 1e-4, out
    assert row.group(2) == row.group(3) == str(tokens), out
    assert "logits match eager within" in out
    assert f"greedy generation: triton_fa agrees with eager on {tokens}/{tokens} tokens" in out


def test_replace_mha():
    out = run_example("replace_mha.py")
    assert "Triton's interpreter" in out
    diff = float(re.search(r"max \|ours - torch\| on unpadded positions: (\S+)", out).group(1))
    assert diff <= 1e-4, out
    assert "outputs match" in out


def test_gpt2_patch():
    pytest.importorskip("transformers")
    out = run_example("gpt2_patch.py")
    assert "Triton's interpreter" in out
    assert "random weights (no --model given)" in out
    assert "2 layers, 12 heads, width 768" in out  # GPT-2 small's width, 2 layers on CPU
    assert "token ids from random draws" in out
    _gpt2_checks(out, tokens=2 * 4)  # batch 2, 4 new tokens


def test_gpt2_patch_with_model_and_tokenizer(tiny_models):
    out = run_example("gpt2_patch.py", "--model", str(tiny_models["gpt2"]))
    assert f"weights from {tiny_models['gpt2']}" in out
    assert "random weights" not in out
    assert "token ids from the tokenizer" in out
    _gpt2_checks(out, tokens=2 * 4)


def test_inference():
    pytest.importorskip("transformers")
    out = run_example("inference.py")
    assert "Triton's interpreter" in out
    assert "random weights (no --model given)" in out
    assert "6 prompts of" in out and "3 batches of up to 2" in out
    assert "batches: 100%" in out  # the tqdm bar, on stderr
    assert len(re.findall(r"^prompt \d+ \(\d+ ids\) -> \[", out, re.MULTILINE)) == 3
    generated = int(re.search(r"(\d+) generated tokens in", out).group(1))
    assert 0 < generated <= 6 * 4
    assert re.search(r"throughput: [\d.]+ generated tokens/s, [\d.]+ prompts/s", out)


def test_inference_with_model_and_tokenizer(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the capital of France is\n\nthe keys of the sea\na tile\n")
    out = run_example("inference.py", "--model", str(tiny_models["llama"]), "--prompts",
                      str(prompts), "--max-new-tokens", "3")
    assert f"weights from {tiny_models['llama']}" in out
    assert "random weights" not in out
    assert "3 prompts of" in out and "2 batches of up to 2" in out  # the empty line is skipped
    assert "'the capital of France is' -> '" in out  # decoded with the tokenizer
    assert re.search(r"throughput: [\d.]+ generated tokens/s", out)
