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

**Growing caches.** A decode step's K/V cache is one key longer at every step (transformers'
DynamicCache concatenates), so an exact signature would never repeat. Calls with at most
``FAMILY_MAX_Q`` query rows and contiguous k and v therefore share the plan of their *family*:
the signature without the key length, keyed instead by the key length's power-of-two bucket
(the selector's decode threshold, 128, and the launcher's eager one-split bound, 1024, are
bucket edges) and by what Triton specialises on in the key length and the k/v strides
(divisibility by 16, equality to 1: the bucket of 1, 32-bit range): at most five families per
bucket, by gcd(key length, 16). The kernel arguments that depend on the key length are found
by recording the call a second time with the same kernel variant, without launching, on a
16-key probe cache (small whatever the cache: a probe as long as a large cache would double
its memory for a moment): every integer argument that differs must be the key length or a
k/v stride, linear in the key length as they all are (then it is read from the call's k on
replay), and nothing else (grid, constexprs, workspace, other arguments) may differ. V1, V2
and the split-KV kernel with one split qualify, whose arguments are those values
themselves; with several splits the split count and length are step functions of the key
length. The entry of a family that does not qualify is a ``ByLength`` dict: the exact plans
of its calls by key length (the family key fixes everything else, and the strides of
contiguous K/V follow from the length), so those calls still cost one key and two dict
lookups.

Plans are kept per process in a dict bounded by ``_MAX_PLANS`` (cleared when full). Recording
is per thread.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch

from ._counters import counters, is_counters

_MAX_PLANS = 4096
FAMILY_MAX_Q = 16  # query rows up to which calls on contiguous K/V share a growing-cache plan
NOT_REPLAYABLE = object()  # a signature whose calls always take the general path
_FAMILY = "family"  # marks a family key, at _FAMILY_AT (after the part common to all keys)
_FAMILY_AT = 19
_plans: dict[tuple, object] = {}
_recording = threading.local()

# tensor slots of a plan: the call's q, k, v, its outputs, the zeroed counters of its
# stream (``kernels._counters``); workspace slots follow
_Q, _K, _V, _OUT, _LSE, _COUNTERS = range(6)


class Step(NamedTuple):
    """One recorded launch. ``args`` holds its arguments with the call's tensors left as
    None at ``slots`` (position, tensor slot). CUDA: ``runner`` is a compiled kernel, ``grid``
    three-dimensional and ``args`` ends with the constexpr values. CPU: ``runner`` is the jit
    function, launched through the interpreter with ``constexprs``. ``sizes`` (family plans):
    (position, i) of the integers read from the call's k as ``(*k.shape, *k.stride())[i]``
    (caller's layout; a family's v has k's shape and strides)."""

    runner: object
    grid: tuple[int, ...]
    args: tuple
    slots: tuple[tuple[int, int], ...]
    constexprs: dict
    num_warps: int
    num_stages: int
    sizes: tuple[tuple[int, int], ...] = ()


class Plan(NamedTuple):
    """The launches of one call signature and what they need allocated (``counters``: how
    many zeroed counters, 0 for none). ``cuda_index``: the CUDA device of the call (part of
    its signature), None for CPU tensors (the interpreter)."""

    out_shape: tuple[int, ...]
    lse_shape: tuple[int, ...] | None
    workspace: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    steps: tuple[Step, ...]
    counters: int = 0
    cuda_index: int | None = None


class ByLength(dict):
    """The entry of a family whose launches do not qualify: key length -> Plan (or
    ``NOT_REPLAYABLE``) of its calls."""


class LengthKey(NamedTuple):
    """Where the plan of one key length of a ``ByLength`` family is kept."""

    family: tuple
    length: int


def signature(q: object, k: object, v: object, layout: str, out_bshd: bool, variant: str,
              causal: object, softmax_scale: object, return_lse: bool, window_size: object,
              softcap: object) -> tuple | None:
    """The plan key of a call of ``kernels.api.attention`` without mask and ALiBi slopes (q,
    k, v as the caller passed them, not yet validated), or None when the call must take the
    general path. Inputs of other types than the common ones (plain tensors; bool, float or
    None, tuple, float options) take it too, so that its checks still reject what they reject
    (``1 == True`` would otherwise share a key). A call that may share a growing-cache plan
    gets its family key."""
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
    dtype = q.dtype
    # is_cuda: 0.3 us less than device.type, which builds a new string at every read
    if dtype is (torch.float32 if q.is_cuda else torch.bfloat16):
        return None
    common = (layout, out_bshd, variant, return_lse, causal, softmax_scale, window_size,
              softcap, dtype, k.dtype, v.dtype, q.device, k.device, v.device, q.shape, q.stride(),
              q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15)
    shape = k.shape
    if (len(shape) == 4 and q.dim() == 4 and v.shape == shape
            and k.is_contiguous() and v.is_contiguous()):
        batch, dim1, dim2, head_dim = shape
        if layout == "bshd":
            rows, keys, heads = q.shape[1], dim1, dim2
        else:
            rows, keys, heads = q.shape[2], dim2, dim1
        if rows <= FAMILY_MAX_Q:
            # The k/v strides of a contiguous cache are c * keys: whether Triton sees them (and
            # keys) divisible by 16 follows from gcd(keys, 16); 32-bit range from the largest.
            return common + (_FAMILY, batch, heads, head_dim, keys.bit_length(),
                             math.gcd(keys, 16), k.stride(0) >= 1 << 31)
    return common + (shape, k.stride(), v.shape, v.stride())


def is_family(key: tuple) -> bool:
    """Whether ``key`` (from ``lookup``) is a family key."""
    return type(key) is tuple and key[_FAMILY_AT] is _FAMILY


def probe_cache(k: torch.Tensor, v: torch.Tensor, layout: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous k and v (caller's layout) shaped as ``k`` and ``v`` but for the key length,
    16 (32 if ``k`` has 16), for the dry recording that finds the key-length arguments
    (never read). A different length is enough: the candidate arguments (key length, k/v
    strides) are linear in it, so two of them that agree at two lengths are the same."""
    seq = 1 if layout == "bshd" else 2
    shape = list(k.shape)
    shape[seq] = 32 if shape[seq] == 16 else 16
    return k.new_empty(shape), v.new_empty(shape)


def lookup(key: tuple, k: torch.Tensor, layout: str) -> tuple[tuple, Plan | None | object]:
    """(the key under which a call with signature ``key`` and keys ``k`` is kept, its plan:
    None if none was recorded, ``NOT_REPLAYABLE`` if it cannot be)."""
    entry = _plans.get(key)
    if type(entry) is ByLength:
        length = k.shape[1 if layout == "bshd" else 2]
        return LengthKey(key, length), entry.get(length)
    return key, entry


class Recorder:
    """Collects the launches of one general-path call (``with Recorder() as rec:``);
    ``kernels._runtime.launch`` reports to the active recorder of its thread: in ``launches``
    what a replay needs (None where it cannot replay), in ``calls`` each launch as the
    launcher asked for it (kernel, grid, args, constexprs, num_warps, num_stages, maxnreg).
    A ``dry`` recorder's launches are recorded in ``calls`` only, never run. ``variant`` is
    the kernel variant the general path ran (a family's probe runs the same one)."""

    def __init__(self, dry: bool = False) -> None:
        self.dry = dry
        self.launches: list[tuple | None] = []
        self.calls: list[tuple] = []
        self.variant = ""

    def __enter__(self) -> Recorder:
        self._outer = getattr(_recording, "active", None)
        _recording.active = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        _recording.active = self._outer


def active_recorder() -> Recorder | None:
    """The recorder collecting this thread's launches, if any."""
    return getattr(_recording, "active", None)


class Call(NamedTuple):
    """What one general-path call ran on: the views its launchers saw (q, k, v: distinct
    objects, made for the recording, so that identity tells them apart even when the caller
    passed one tensor three times), its outputs, and the caller's k (its layout)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor | None
    k_in: torch.Tensor


def store(key: tuple, recorder: Recorder, call: Call,
          probe: tuple[Recorder, Call] | None = None) -> None:
    """Turn what ``recorder`` saw during ``call`` into the plan of ``key`` (from ``lookup``).
    Tensor arguments are matched by identity to q, k, v and the counters of
    ``kernels._counters``, by data pointer to the fresh outputs; any other tensor is workspace
    that the general path allocated, allocated again (same shape and dtype, contiguous) on
    replay. For a family ``key``, ``probe`` is the dry
    recording of the same call on a probe cache; a family that does not qualify becomes a
    ``ByLength`` entry holding this call's plan."""
    _put(key, _plan_of(recorder, call, probe))


def _put(key: tuple, entry: object) -> None:
    """Keep ``entry`` under ``key``, a signature or a ``LengthKey``; each dict is bounded."""
    plans = _plans
    if type(key) is LengthKey:
        plans = _plans.get(key.family)
        if type(plans) is not ByLength:  # the store was cleared since the lookup
            plans = _plans[key.family] = ByLength()
        key = key.length
    if len(plans) >= _MAX_PLANS:
        plans.clear()
    plans[key] = entry


def _plan_of(recorder: Recorder, call: Call, probe: tuple[Recorder, Call] | None) -> object:
    """The entry ``store`` keeps: a Plan, ``NOT_REPLAYABLE``, or (a family that does not
    qualify) a ``ByLength`` holding the call's own plan."""
    launches = recorder.launches
    if not launches or any(entry is None for entry in launches):
        return NOT_REPLAYABLE
    steps: list[Step] = []
    shapes: list[tuple[tuple[int, ...], torch.dtype]] = []
    slot_of = _slot_finder(call, shapes)
    n_counters = 0
    for runner, grid, args, constexprs, num_warps, num_stages in launches:
        slots, template = [], list(args)
        for position, arg in enumerate(args):
            if not isinstance(arg, torch.Tensor):
                if not isinstance(arg, (int, float, bool, str)) and arg is not None:
                    return NOT_REPLAYABLE  # e.g. a tensor descriptor
                continue
            slot = slot_of(arg)
            if slot is None:
                return NOT_REPLAYABLE
            if slot == _COUNTERS:
                n_counters = max(n_counters, arg.numel())
            slots.append((position, slot))
            template[position] = None
        steps.append(Step(runner, grid, tuple(template), tuple(slots), constexprs, num_warps,
                          num_stages))
    plan = Plan(tuple(call.out.shape), None if call.lse is None else tuple(call.lse.shape),
                tuple(shapes), tuple(steps), n_counters,
                call.q.device.index if call.q.is_cuda else None)
    if probe is None:
        return plan
    family = _family_plan(plan, recorder, call, *probe)
    return ByLength({call.k.shape[2]: plan}) if family is None else family


def _slot_finder(call: Call, shapes: list[tuple[tuple[int, ...], torch.dtype]]):
    """A function from a tensor argument of ``call``'s launches to its plan slot (None: not
    replayable); new workspace shapes are appended to ``shapes``."""
    io = {id(call.q): _Q, id(call.k): _K, id(call.v): _V}
    pointers = {call.out.data_ptr(): _OUT}
    if call.lse is not None:
        pointers[call.lse.data_ptr()] = _LSE
    workspace: dict[int, int] = {}

    def slot_of(arg: torch.Tensor) -> int | None:
        slot = io.get(id(arg))
        if slot is None:
            slot = pointers.get(arg.data_ptr())
        if slot is None and is_counters(arg):
            slot = _COUNTERS
        if slot is None:
            if not arg.is_contiguous():
                return None
            if id(arg) not in workspace:
                workspace[id(arg)] = _COUNTERS + 1 + len(shapes)
                shapes.append((tuple(arg.shape), arg.dtype))
            slot = workspace[id(arg)]
        return slot

    return slot_of


def _family_plan(plan: Plan, recorder: Recorder, call: Call, probe: Recorder,
                 probe_call: Call) -> Plan | None:
    """``plan`` with its key-length arguments read from each call's k, or None when
    the recorded call does not qualify (see the module docstring)."""
    if len(probe.calls) != len(recorder.calls):
        return None
    probe_shapes: list[tuple[tuple[int, ...], torch.dtype]] = []
    probe_slot = _slot_finder(probe_call, probe_shapes)
    ints = (*call.k_in.shape, *call.k_in.stride())
    probe_ints = (*probe_call.k_in.shape, *probe_call.k_in.stride())

    steps = []
    for step, seen, probed in zip(plan.steps, recorder.calls, probe.calls, strict=True):
        kernel, grid, args, constexprs = seen[:4]
        if (probed[0] is not kernel or probed[1] != grid or probed[3] != constexprs
                or probed[4:] != seen[4:] or len(probed[2]) != len(args)):
            return None
        sizes, slots = [], dict(step.slots)
        for position, (arg, other) in enumerate(zip(args, probed[2], strict=True)):
            if isinstance(arg, torch.Tensor):
                if not isinstance(other, torch.Tensor) or probe_slot(other) != slots[position]:
                    return None
            elif type(arg) is int and type(other) is int and arg != other:
                found = [i for i, (a, b) in enumerate(zip(ints, probe_ints, strict=True))
                         if (a, b) == (arg, other)]
                if not found:
                    return None
                sizes.append((position, found[0]))
            elif type(arg) is not type(other) or arg != other:
                return None
        steps.append(step._replace(sizes=tuple(sizes)))
    if probe_shapes != list(plan.workspace):
        return None
    return plan._replace(steps=tuple(steps))


def replay(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, launch_step
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``plan`` on a call's q, k, v (same signature as the recorded call): allocate the
    output (and lse, workspace), launch every step with ``launch_step(step, plan.cuda_index,
    args)`` (``kernels._runtime.replay_launch``). Returns (out, lse or None)."""
    out = q.new_empty(plan.out_shape)
    lse = None if plan.lse_shape is None else q.new_empty(plan.lse_shape, dtype=torch.float32)
    tensors = [q, k, v, out, lse, counters(q.device, plan.counters) if plan.counters else None]
    for shape, dtype in plan.workspace:
        tensors.append(q.new_empty(shape, dtype=dtype))
    if plan.cuda_index is not None:
        # Triton's launcher takes a pointer given as an int as it is; for a tensor it calls
        # data_ptr() and asks the driver about the pointer, per argument (about 1.4 us of a
        # GPT-2 decode call's 7.5 us launch on the H200 host; benchmarks/NOTES.md). The
        # general path that recorded the plan checked the devices.
        tensors = [None if t is None else t.data_ptr() for t in tensors]
    for step in plan.steps:
        args = list(step.args)
        for position, slot in step.slots:
            args[position] = tensors[slot]
        if step.sizes:
            ints = (*k.shape, *k.stride())
            for position, i in step.sizes:
                args[position] = ints[i]
        launch_step(step, plan.cuda_index, args)
    return out, lse
