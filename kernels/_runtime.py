"""Where kernels run: compiled for CUDA tensors, through Triton's interpreter for CPU tensors.

The interpreter is chosen when a function is decorated, not when it is launched, so the jit
sources in ``kernels/_triton`` are imported twice: once as ``kernels._triton`` (compiled), and
once, with the interpreter knob on, as ``kernels._triton_interpreted`` (a synthetic package over
the same folder). Nothing is set by the caller, and compiling for CUDA keeps working in the same
process. An interpreted launch patches ``triton.language`` for the whole process, so interpreted
launches are serialised by a lock.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
import types
from types import ModuleType

import torch
import triton
from triton.runtime.errors import OutOfResources

from . import _plan

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton without host tensor descriptors
    TensorDescriptor = None
try:  # Gluon's descriptors carry their shared-memory layout (kernels/_triton/hopper.py)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
except ImportError:
    GluonDescriptor = None

_COMPILED = "kernels._triton"
_INTERPRETED = "kernels._triton_interpreted"
_import_lock = threading.Lock()
_interpreter_lock = threading.Lock()


# (name, device type) -> module; filled once per pair (a dict read on every launch)
_modules: dict[tuple[str, str], ModuleType] = {}


def kernel_module(name: str, device: torch.device) -> ModuleType:
    """The module ``kernels/_triton/<name>.py`` built for ``device`` (compiled or interpreted).
    First imports are serialised: the interpreter knob they set is process-wide, and another
    thread must not see a module before its import has finished."""
    module = _modules.get((name, device.type))
    if module is None:
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"tensors must be on a CUDA or CPU device, got {device}")
        with _import_lock:
            if device.type == "cuda":
                module = importlib.import_module(f"{_COMPILED}.{name}")
            else:
                module = _interpreted_module(name)
        _modules[(name, device.type)] = module
    return module


def _interpreted_module(name: str) -> ModuleType:
    """Import ``kernels/_triton/<name>.py`` with the interpreter knob on (``_import_lock``
    held)."""
    full_name = f"{_INTERPRETED}.{name}"
    module = sys.modules.get(full_name)
    if module is not None:
        return module
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
    """What Triton may specialise a kernel on, for an argument other than an int or a plain
    tensor (those two are handled inline in ``_launch_cuda``): dtype and 16-byte alignment of
    tensor subclasses and descriptors, the value of bools and None, the type of floats and
    of anything else."""
    kind = type(value)
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() & 15
    if kind is bool or value is None:
        return value
    if kind is float:
        return float
    if TensorDescriptor is not None and isinstance(value, TensorDescriptor):
        return value.base.dtype, tuple(value.block_shape), value.base.data_ptr() & 15
    if GluonDescriptor is not None and isinstance(value, GluonDescriptor):
        return value.base.dtype, tuple(value.block_shape), value.layout
    return kind, value


# (kernel, device, config, specialisation) -> (compiled kernel, names of its constexprs in
# order), or (None, num_stages) where this triton does not expose the compiled launcher
_compiled: dict[tuple, tuple] = {}


def launch(kernel, grid: tuple[int, ...], device: torch.device, args: tuple,
           constexprs: dict, num_warps: int, num_stages: int, maxnreg: int | None = None
           ) -> None:
    """Launch ``kernel[grid](*args, **constexprs)`` on ``device`` and its current stream.

    ``args`` are the kernel's leading non-constexpr arguments, in order, and ``constexprs``
    the rest by name; ``maxnreg`` caps the registers per thread on CUDA (Triton's option,
    None: the compiler's choice; the interpreter has no registers to cap). CPU tensors go
    through the interpreter, one launch at a time. On CUDA,
    the compiled kernel is remembered per (kernel, device, constexprs, specialisation of every
    argument) and relaunched directly, skipping Triton's per-call argument binding, which
    costs tens of microseconds: more than a decode step's whole GPU time. The launch is
    reported to this thread's active ``kernels._plan.Recorder``, if any (a dry one only
    records it).
    """
    recorder = _plan.active_recorder()
    if recorder is not None:
        recorder.calls.append((kernel, grid, args, constexprs, num_warps, num_stages, maxnreg))
        if recorder.dry:
            return
    if device.type != "cuda":
        with _interpreter_lock:
            kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if recorder is not None:
            recorder.launches.append((kernel, grid, args, constexprs, num_warps, num_stages))
        return
    launched = _on_device(device, _launch_cuda, kernel, grid, device, args, constexprs,
                          num_warps, num_stages, maxnreg)
    if recorder is not None:
        recorder.launches.append(launched)


def _launch_cuda(kernel, grid, device, args, constexprs, num_warps, num_stages, maxnreg=None):
    """Launch on the current CUDA device; returns (compiled kernel, 3-D grid, full argument
    list, {}, num_warps, num_stages) when the launch can be replayed directly, else None."""
    # The key holds, per argument, a superset of what Triton specialises on, computed inline
    # (this runs on every call): for ints their residue mod 16, whether they equal 1 and
    # their sign/width; for tensors their dtype and alignment.
    spec = tuple([a & 15 | (a == 1) << 4 | a >> 31 << 5 if type(a) is int
                  else (a.dtype, a.data_ptr() & 15) if type(a) is torch.Tensor
                  else _specialization(a) for a in args])
    key = (kernel, device.index, num_warps, num_stages, maxnreg, tuple(constexprs.values()),
           spec)
    entry = _compiled.get(key, False)
    launched = entry is False
    if launched:
        compiled, num_stages = _compile_and_launch(kernel, grid, args, constexprs, num_warps,
                                                   num_stages, maxnreg)
        # Relaunch directly only where this triton exposes the compiled kernel's launcher.
        direct = all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata"))
        entry = (compiled, kernel.arg_names[len(args):]) if direct else (None, num_stages)
        _compiled[key] = entry
    if entry[0] is None:
        if not launched:
            kernel[grid](*args, **constexprs, **_options(num_warps, entry[1], maxnreg))
        return None
    compiled, names = entry
    grid3 = (*grid, *(1,) * (3 - len(grid)))
    full_args = (*args, *[constexprs[name] for name in names])
    if not launched:
        run_compiled(compiled, grid3, full_args)
    return compiled, grid3, full_args, {}, num_warps, num_stages


def run_compiled(compiled, grid3: tuple[int, int, int], args: tuple | list,
                 device_index: int | None = None) -> None:
    """Launch a compiled kernel through its launcher on the current device and stream;
    ``args`` are all its arguments, constexpr values included, in order. ``device_index``:
    the current device when the caller knows it (None: asked for here)."""
    if _hooked(triton.knobs.runtime.launch_enter_hook) or _hooked(
            triton.knobs.runtime.launch_exit_hook):
        # a profiler's hooks want their launch metadata: Triton's own runner builds it
        compiled[grid3](*args)
        return
    driver = triton.runtime.driver.active
    if device_index is None:
        device_index = driver.get_current_device()
    stream = driver.get_current_stream(device_index)
    direct = _direct.get(compiled)
    if direct is None:
        direct = _direct[compiled] = _direct_launch(compiled)
    if direct:
        launch_c, function, cooperative, pdl, metadata = direct
        launch_c(grid3[0], grid3[1], grid3[2], stream, function, cooperative, pdl, None, None,
                 metadata, None, None, None, *args)
    else:
        compiled.run(grid3[0], grid3[1], grid3[2], stream, compiled.function,
                     compiled.packed_metadata, None, None, None, *args)


# compiled kernel -> its C launch function and fixed arguments, or False (see _direct_launch)
_direct: dict = {}
_DIRECT_TRITON = (3, 6)


def _direct_launch(compiled) -> tuple | bool:
    """Triton 3.6's C launch function of ``compiled`` with its fixed arguments, when its
    launcher needs no scratch memory; False otherwise. Calling it directly skips the Python
    launcher object's ``__call__`` (two closures and two scratch allocations that allocate
    nothing): about 2 us of a 7.5 us launch on the H200 host (benchmarks/NOTES.md). Other
    triton versions pass other arguments to their C function and take ``compiled.run``."""
    launcher = compiled.run
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if (version != _DIRECT_TRITON or type(launcher).__name__ != "CudaLauncher"
            or launcher.global_scratch_size or launcher.profile_scratch_size):
        return False
    return (launcher.launch, compiled.function, launcher.launch_cooperative_grid,
            launcher.launch_pdl, compiled.packed_metadata)


_CPU = torch.device("cpu")


def replay_launch(step, cuda_index: int | None, args: list) -> None:
    """Launch one recorded ``kernels._plan.Step`` with this call's ``args`` on CUDA device
    ``cuda_index`` (made current for the launch if it is not), or through the interpreter
    (None: CPU tensors). The plan was recorded by a CUDA launch of this process, so the
    device query is torch's own, without ``torch.cuda.current_device``'s initialisation
    check (about 0.3 us a call)."""
    if cuda_index is None:
        launch(step.runner, step.grid, _CPU, tuple(args), step.constexprs, step.num_warps,
               step.num_stages)
    elif cuda_index == torch._C._cuda_getDevice():
        run_compiled(step.runner, step.grid, args, cuda_index)
    else:
        with torch.cuda.device(cuda_index):
            run_compiled(step.runner, step.grid, args, cuda_index)


def _on_device(device: torch.device, fn, *args):
    """``fn(*args)`` with ``device`` (a CUDA device) current: the inputs' device, cuda:1 too."""
    if device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return fn(*args)
    return fn(*args)


def _hooked(hook: object) -> bool:
    """Whether a launch hook is set (newer triton keeps an empty HookChain when none is)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _options(num_warps: int, num_stages: int, maxnreg: int | None) -> dict:
    """Triton's launch options of a configuration (maxnreg only when set). Fused multiply-adds
    are asked for by name: the kernels are written and measured with them (the softmax's
    scale-and-subtract, the rescaled accumulator), triton up to 3.9 enables them by default
    and warns that 3.10 will not (``TRITON_DEFAULT_FP_FUSION``)."""
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return options


def _compile_and_launch(kernel, grid, args, constexprs, num_warps, num_stages, maxnreg=None):
    """First launch of a specialisation. A tile configuration whose software pipeline does
    not fit in shared memory (extra mask tiles can push a tuned one over) is retried with
    fewer stages. Returns the compiled kernel and the stage count that fitted."""
    while True:
        try:
            compiled = kernel[grid](*args, **constexprs,
                                    **_options(num_warps, num_stages, maxnreg))
            return compiled, num_stages
        except OutOfResources:
            if num_stages <= 1:
                raise
            num_stages -= 1


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot precision for float32 inputs: TF32 on the GPU only when torch's float32 matmul
    precision is not "highest" (torch's default is "highest"); the interpreter is exact."""
    if dtype == torch.float32 and device.type == "cuda":
        if torch.get_float32_matmul_precision() != "highest":
            return "tf32"
    return "ieee"


@functools.cache
def _cuda_properties(index: int) -> tuple[tuple[int, int], int, int, str]:
    props = torch.cuda.get_device_properties(index)
    return ((props.major, props.minor), props.multi_processor_count, props.L2_cache_size,
            props.name)


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


def l2_cache_bytes(device: torch.device) -> int:
    """L2 cache size of a CUDA device in bytes; cached."""
    index = torch.cuda.current_device() if device.index is None else device.index
    return _cuda_properties(index)[2]


def device_name(device: torch.device) -> str:
    """Name of a CUDA device ("NVIDIA H100 80GB HBM3"), "" for the CPU; cached."""
    if device.type != "cuda":
        return ""
    index = torch.cuda.current_device() if device.index is None else device.index
    return _cuda_properties(index)[3]
