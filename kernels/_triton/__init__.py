"""Triton sources of the kernels.

Every module here holds ``@triton.jit`` code only and imports its helpers relatively, so
``kernels._runtime`` can load this folder a second time, as an interpreted copy, for CPU tensors.
Call no jit function of ``triton.language.standard`` (``tl.max``, ``tl.sum``, ``tl.cdiv``...):
those were decorated in compiled mode when triton was imported and fail inside the
interpreter; ``common.py`` has our own equivalents.
"""
