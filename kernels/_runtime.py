"""Where kernels run: compiled for CUDA tensors, through Triton's interpreter for CPU tensors.

The interpreter is chosen when a function is decorated, not when it is launched, so the jit
sources in ``kernels/_triton`` are imported twice: once as ``kernels._triton`` (compiled), and
once, with the interpreter knob on, as ``kernels._triton_interpreted`` (a synthetic package over
the same folder). Nothing is set by the caller, and compiling for CUDA keeps working in the same
process. An interpreted launch patches ``triton.language`` for the whole process, so interpreted
launches are serialised by a lock.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import threading
import types
from collections.abc import Iterator
from types import ModuleType

import torch
import triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton without host tensor descriptors
    TensorDescriptor = None

_COMPILED = "kernels._triton"
_INTERPRETED = "kernels._triton_interpreted"
_import_lock = threading.Lock()
_interpreter_lock = threading.Lock()


def kernel_module(name: str, device: torch.device) -> ModuleType:
    """The module ``kernels/_triton/<name>.py`` built for ``device`` (compiled or interpreted)."""
    if device.type == "cuda":
        return importlib.import_module(f"{_COMPILED}.{name}")
    if device.type == "cpu":
        return _interpreted_module(name)
    raise ValueError(f"tensors must be on a CUDA or CPU device, got {device}")


def _interpreted_module(name: str) -> ModuleType:
    full_name = f"{_INTERPRETED}.{name}"
    module = sys.modules.get(full_name)
    if module is not None:
        return module
    with _import_lock:
        if _INTERPRETED not in sys.modules:
            compiled = importlib.import_module(_COMPILED)
            package = types.ModuleType(_INTERPRETED, compiled.__doc__)
            package.__path__ = list(compiled.__path__)
            sys.modules[_INTERPRETED] = package
        previous = triton.knobs.runtime.interpret
        triton.knobs.runtime.interpret = True
        try:
            return importlib.import_module(full_name)
        finally:
            triton.knobs.runtime.interpret = previous


def _specialization(value: object) -> object:
    """What Triton may specialise a kernel on for one argument (a superset of it): dtype and
    16-byte alignment of tensors, equality to 1, divisibility by 16 and width of integers,
    the type of descriptors and other values."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value == 1, value % 16 == 0, -(2**31) <= value < 2**31, value < 2**63
    if isinstance(value, float):
        return float
    if TensorDescriptor is not None and isinstance(value, TensorDescriptor):
        return value.base.dtype, tuple(value.block_shape), value.base.data_ptr() % 16 == 0
    return type(value), value


# (kernel, device, config, specialisation) -> CompiledKernel, or False where it has no launcher
_compiled: dict[tuple, object] = {}


def launch(kernel, grid: tuple[int, ...], device: torch.device, args: tuple,
           constexprs: dict, num_warps: int, num_stages: int) -> None:
    """Launch ``kernel[grid](*args, **constexprs)`` on ``device`` and its current stream.

    ``args`` are the kernel's leading non-constexpr arguments, in order, and ``constexprs``
    the rest by name. CPU tensors go through the interpreter, one launch at a time. On CUDA,
    the compiled kernel is remembered per (kernel, device, constexprs, specialisation of every
    argument) and relaunched directly, skipping Triton's per-call argument binding, which
    costs tens of microseconds: more than a decode step's whole GPU time.
    """
    if device.type != "cuda":
        with _interpreter_lock:
            kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    with _on_device(device):
        key = (kernel, device.index, num_warps, num_stages, tuple(constexprs.items()),
               tuple(map(_specialization, args)))
        compiled = _compiled.get(key)
        if compiled is None:
            compiled = kernel[grid](*args, **constexprs, num_warps=num_warps,
                                    num_stages=num_stages)
            # Relaunch directly only where this triton exposes the compiled kernel's launcher.
            _compiled[key] = compiled if hasattr(compiled, "__getitem__") else False
        elif compiled is False:
            kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        else:
            names = kernel.arg_names[len(args):]
            grid3 = (*grid, *(1,) * (3 - len(grid)))
            compiled[grid3](*args, *(constexprs[name] for name in names))


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    if device.index is None or device.index == torch.cuda.current_device():
        yield
    else:
        with torch.cuda.device(device):
            yield


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot precision for float32 inputs: TF32 on the GPU only when torch's float32 matmul
    precision is not "highest" (torch's default is "highest"); the interpreter is exact."""
    if dtype == torch.float32 and device.type == "cuda":
        if torch.get_float32_matmul_precision() != "highest":
            return "tf32"
    return "ieee"


@functools.cache
def _cuda_properties(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, (0, 0) for the CPU; cached."""
    if device.type != "cuda":
        return (0, 0)
    index = torch.cuda.current_device() if device.index is None else device.index
    return _cuda_properties(index)[0]


def multiprocessors(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device; cached."""
    index = torch.cuda.current_device() if device.index is None else device.index
    return _cuda_properties(index)[1]
