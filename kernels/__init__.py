"""FlashAttention forward kernels in Triton.

Public names: ``flash_attention`` (BHSD), ``flash_attention_v2`` (BSHD),
``flash_attention_varlen`` (packed tokens) and ``BackendSelector``.
"""

from .api import flash_attention, flash_attention_v2, flash_attention_varlen
from .selector import BackendSelector

__all__ = ["BackendSelector", "flash_attention", "flash_attention_v2", "flash_attention_varlen"]
