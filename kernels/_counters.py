"""Zeroed int32 counters for kernels whose programs count the peers that finished before
them (the split-KV kernel: the last split of a tile merges it).

Every kernel leaves the counters it used at zero, so one buffer serves all the launches of a
stream, which run one after another: no memset per call. One buffer per (device, stream), so
that kernels of two streams never share a counter. Buffers are allocated and zeroed on a side
stream: the allocations of the current stream may be routed to a CUDA-graph memory pool
(torch.compile's CUDA-graph trees warm up that way), which must not hold a tensor kept here.
A launch being captured into a CUDA graph gets counters of its own, zeroed by a memset
captured with it (the graph owns them, and its replays cannot meet an eager launch's).
"""

from __future__ import annotations

import threading
import weakref

import torch
import triton

_MIN_SIZE = 4096
_buffers: dict[tuple[int, int], torch.Tensor] = {}
_lock = threading.Lock()
_captured: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def counters(device: torch.device, size: int) -> torch.Tensor:
    """At least ``size`` zeroed int32 counters on ``device`` for a launch on its current
    stream (CPU: one buffer; interpreted launches run one at a time)."""
    if device.type != "cuda":
        key = (-1, 0)
    else:
        current = torch.cuda.current_device()
        index = current if device.index is None else device.index
        if index != current:
            with torch.cuda.device(index):
                return counters(device, size)
        if torch.cuda.is_current_stream_capturing():
            buffer = torch.zeros(size, dtype=torch.int32, device=device)
            _captured[id(buffer)] = buffer
            return buffer
        key = (index, triton.runtime.driver.active.get_current_stream(index))
    buffer = _buffers.get(key)
    if buffer is None or buffer.numel() < size:
        with _lock:
            buffer = _buffers.get(key)
            if buffer is None or buffer.numel() < size:
                buffer = _zeroed(device, max(size, _MIN_SIZE))
                _buffers[key] = buffer
    return buffer


def _zeroed(device: torch.device, size: int) -> torch.Tensor:
    """``size`` int32 zeros allocated and filled on a side stream (CPU: plainly); the current
    stream waits for the fill and is recorded as a user, so that a replaced buffer is not
    reused before the launches of this stream that read it have run."""
    if device.type != "cuda":
        return torch.zeros(size, dtype=torch.int32, device=device)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        buffer = torch.zeros(size, dtype=torch.int32, device=device)
    current.wait_stream(side)
    buffer.record_stream(current)
    return buffer


def is_counters(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` came from ``counters``."""
    return (any(tensor is buffer for buffer in _buffers.values())
            or _captured.get(id(tensor)) is tensor)
