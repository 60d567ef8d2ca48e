"""Zeroed int32 counters for kernels whose programs count the peers that finished before
them (the split-KV kernel: the last split of a tile merges it).

Every kernel leaves the counters it used at zero, so one buffer serves all the launches of a
stream, which run one after another: no memset per call. One buffer per (device, stream), so
that kernels of two streams never share a counter. Buffers are allocated and zeroed by a
helper thread: the allocations of the calling thread may be routed to a CUDA-graph memory
pool (torch.compile's CUDA-graph trees warm up that way), which must not hold a tensor kept
here. A launch being captured into a CUDA graph gets counters of its own, zeroed by a memset
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
                where = device if device.type != "cuda" else torch.device("cuda", key[0])
                buffer = _zeroed(where, max(size, _MIN_SIZE))
                _buffers[key] = buffer
    return buffer


def _zeroed(device: torch.device, size: int) -> torch.Tensor:
    """``size`` int32 zeros on ``device`` (CUDA: an explicit index), allocated and filled by a
    helper thread on the device's default stream: torch (2.8 and later) routes every
    allocation of a thread that warms up a CUDA graph of torch.compile's graph trees to the
    graphs' memory pool, which must hold no tensor kept here. The current stream waits for the
    fill and is recorded as a user, so that a replaced buffer is not reused before the
    launches of this stream that read it have run."""
    if device.type != "cuda":
        return torch.zeros(size, dtype=torch.int32, device=device)
    made: list = []

    def work() -> None:
        try:
            made.append(torch.zeros(size, dtype=torch.int32, device=device))
        except BaseException as error:  # re-raised in the caller's thread
            made.append(error)

    helper = threading.Thread(target=work)
    helper.start()
    helper.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    buffer = made[0]
    current = torch.cuda.current_stream(device)
    current.wait_stream(torch.cuda.default_stream(device))
    buffer.record_stream(current)
    return buffer


def is_counters(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` came from ``counters``."""
    return (any(tensor is buffer for buffer in _buffers.values())
            or _captured.get(id(tensor)) is tensor)
