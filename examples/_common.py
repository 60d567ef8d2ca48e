"""What the examples share. Imported as ``_common``: the directory of a script run as
``python examples/<name>.py`` comes first on ``sys.path``."""

from __future__ import annotations

import os
from typing import Any


def use_interpreter_on_cpu() -> None:
    """Run our Triton kernels through Triton's interpreter on CPU tensors, and say so."""
    os.environ["FLASHATTN_CPU_BACKEND"] = "triton"
    print("CPU: running our Triton kernels through Triton's interpreter "
          "(FLASHATTN_CPU_BACKEND=triton); sizes are small and times are not speeds.")


def load_tokenizer(name: str, vocab_size: int, probe: str) -> Any:
    """The tokenizer of ``name``, or None (said) when there is none that fits the model
    (checked on the text ``probe``): without tokenizer files transformers builds an empty
    one from the config."""
    from transformers import AutoTokenizer  # here: replace_mha.py needs no transformers

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        print(f"no tokenizer found for {name} ({type(exc).__name__}): random token ids")
        return None
    ids = tokenizer(probe)["input_ids"]
    if not ids or max(ids) >= vocab_size:
        print(f"the tokenizer of {name} is empty or does not fit the model: random token ids")
        return None
    return tokenizer
