"""PyTorch modules and the Hugging Face patcher built on the kernels."""
