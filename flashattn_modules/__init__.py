"""PyTorch modules and the Hugging Face patcher built on the kernels."""

from .attention import FlashCrossAttention, FlashSelfAttention

# Hugging Face integration: importing registers the "triton_fa" attention implementation when
# transformers >= 5.4 is installed (an optional extra); without it, import still succeeds.
from .hf import patch_hf_model, register, unpatch_hf_model
from .hf import register_if_available as _register_if_available
from .mha import FlashMultiheadAttention, replace_multihead_attention

_register_if_available()

__all__ = [
    "FlashCrossAttention",
    "FlashMultiheadAttention",
    "FlashSelfAttention",
    "patch_hf_model",
    "register",
    "replace_multihead_attention",
    "unpatch_hf_model",
]
