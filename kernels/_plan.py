"""Launch plans: the kernel launches of an eager call, recorded once per call signature and
replayed for later calls with the same signature.

An eager call of ours spends tens of microseconds of Python before its kernels start (option
checks, the selector, the tile table, about forty-five kernel arguments and their
specialisation key), which a decode step or a small prefill cannot hide: the GPU waits for
the host (benchmarks/NOTES.md, "Host overhead"). Everything those microseconds compute is a
function of the call's signature: the options, and the dtype, device, shapes, strides and
16-byte alignment of q, k and v. So the first call of a signature runs the general path
(``kernels.api``) while recording what it launched; later calls allocate the outputs and
workspace, put their tensors into the recorded argument lists, and launch.

Only mask-free, ALiBi-free eager calls that need no gradient take this path (masks and slopes
are tensors whose values and strides would join the key; autograd and torch.compile have
their own paths), and neither float32 on the GPU (its dot precision follows a global torch
setting) nor bfloat16 on the CPU (computed in float32 there) does. A call whose launches cannot be
replayed (tensor descriptors, which hold their tensor; a triton without a direct launcher;
no launch at all for empty inputs) is marked so and always runs the general path.

Plans are kept per process in a dict bounded by ``_MAX_PLANS`` (cleared when full: a growing
KV cache makes a new signature per decode step). Recording is per thread.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch

_MAX_PLANS = 4096
NOT_REPLAYABLE = object()  # a signature whose calls always take the general path
_plans: dict[tuple, object] = {}
_recording = threading.local()

# tensor slots of a plan: the call's q, k, v, then its outputs; workspace slots follow
_Q, _K, _V, _OUT, _LSE = range(5)


class Step(NamedTuple):
    """One recorded launch. ``args`` holds its arguments with the call's tensors left as
    None at ``slots`` (position, tensor slot). CUDA: ``runner`` is a compiled kernel, ``grid``
    three-dimensional and ``args`` ends with the constexpr values. CPU: ``runner`` is the jit
    function, launched through the interpreter with ``constexprs``."""

    runner: object
    grid: tuple[int, ...]
    args: tuple
    slots: tuple[tuple[int, int], ...]
    constexprs: dict
    num_warps: int
    num_stages: int


class Plan(NamedTuple):
    """The launches of one call signature and what they need allocated."""

    out_shape: tuple[int, ...]
    lse_shape: tuple[int, ...] | None
    workspace: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    steps: tuple[Step, ...]


def signature(q: object, k: object, v: object, layout: str, out_bshd: bool, variant: str,
              causal: object, softmax_scale: object, return_lse: bool, window_size: object,
              softcap: object) -> tuple | None:
    """The plan key of a call of ``kernels.api.attention`` without mask and ALiBi slopes (q,
    k, v as the caller passed them, not yet validated), or None when the call must take the
    general path. Inputs of other types than the common ones (plain tensors; bool, float or
    None, tuple, float options) take it too, so that its checks still reject what they reject
    (``1 == True`` would otherwise share a key)."""
    if torch.compiler.is_compiling():
        return None
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if (type(causal) is not bool or type(window_size) is not tuple
            or type(softcap) is not float
            or (softmax_scale is not None and type(softmax_scale) is not float)):
        return None
    dtype, device = q.dtype, q.device
    if dtype is (torch.float32 if device.type == "cuda" else torch.bfloat16):
        return None
    return (layout, out_bshd, variant, return_lse, causal, softmax_scale, window_size, softcap,
            dtype, k.dtype, v.dtype, device, k.device, v.device, q.shape, q.stride(),
            k.shape, k.stride(), v.shape, v.stride(), q.data_ptr() & 15, k.data_ptr() & 15,
            v.data_ptr() & 15)


def lookup(key: tuple) -> Plan | None | object:
    """The plan of ``key``; None if none was recorded; ``NOT_REPLAYABLE`` if it cannot be."""
    return _plans.get(key)


class Recorder:
    """Collects the launches of one general-path call (``with Recorder() as rec:``);
    ``kernels._runtime.launch`` reports to the active recorder of its thread."""

    def __init__(self) -> None:
        self.launches: list[tuple | None] = []

    def __enter__(self) -> Recorder:
        self._outer = getattr(_recording, "active", None)
        _recording.active = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        _recording.active = self._outer


def active_recorder() -> Recorder | None:
    """The recorder collecting this thread's launches, if any."""
    return getattr(_recording, "active", None)


def store(key: tuple, recorder: Recorder, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Turn what ``recorder`` saw during a call on distinct q, k, v objects (views made for
    the recording, so that identity tells them apart even when the caller passed one tensor
    three times) into the plan of ``key``. Tensor arguments are matched by identity to q, k
    and v, by data pointer to the fresh outputs; any other tensor is workspace that the
    general path allocated, allocated again (same shape and dtype, contiguous) on replay."""
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    launches = recorder.launches
    if not launches or any(entry is None for entry in launches):
        _plans[key] = NOT_REPLAYABLE
        return
    io = {id(q): _Q, id(k): _K, id(v): _V}
    pointers = {out.data_ptr(): _OUT}
    if lse is not None:
        pointers[lse.data_ptr()] = _LSE
    workspace: dict[int, int] = {}
    shapes: list[tuple[tuple[int, ...], torch.dtype]] = []
    steps = []
    for runner, grid, args, constexprs, num_warps, num_stages in launches:
        slots, template = [], list(args)
        for position, arg in enumerate(args):
            if not isinstance(arg, torch.Tensor):
                if not isinstance(arg, (int, float, bool, str)) and arg is not None:
                    _plans[key] = NOT_REPLAYABLE  # e.g. a tensor descriptor
                    return
                continue
            slot = io.get(id(arg))
            if slot is None:
                slot = pointers.get(arg.data_ptr())
            if slot is None:
                if not arg.is_contiguous():
                    _plans[key] = NOT_REPLAYABLE
                    return
                if id(arg) not in workspace:
                    workspace[id(arg)] = _LSE + 1 + len(shapes)
                    shapes.append((tuple(arg.shape), arg.dtype))
                slot = workspace[id(arg)]
            slots.append((position, slot))
            template[position] = None
        steps.append(Step(runner, grid, tuple(template), tuple(slots), constexprs, num_warps,
                          num_stages))
    _plans[key] = Plan(tuple(out.shape), None if lse is None else tuple(lse.shape),
                       tuple(shapes), tuple(steps))


def replay(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``plan`` on a call's q, k, v (same signature as the recorded call): allocate the
    output (and lse, workspace), launch every step. Returns (out, lse or None)."""
    from . import _runtime

    device = q.device
    out = torch.empty(plan.out_shape, device=device, dtype=q.dtype)
    lse = (None if plan.lse_shape is None
           else torch.empty(plan.lse_shape, device=device, dtype=torch.float32))
    tensors = [q, k, v, out, lse]
    for shape, dtype in plan.workspace:
        tensors.append(torch.empty(shape, device=device, dtype=dtype))
    for step in plan.steps:
        args = list(step.args)
        for position, slot in step.slots:
            args[position] = tensors[slot]
        _runtime.replay_launch(step, device, args)
    return out, lse
