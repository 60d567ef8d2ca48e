"""Shared test set-up.

- ``@pytest.mark.gpu`` tests are skipped when no CUDA device is present.
- Inputs are fresh random draws on every run (no fixed seeds): each test starts from a new,
  non-deterministic seed that is printed, so a failure's captured output tells how to replay
  it (``torch.manual_seed(<seed>)`` at the top of the test).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# The repository root, so ``kernels`` and ``tests.reference`` import without installing.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Draw a new random seed for this test and record it (printed on failure)."""
    seed = torch.seed()  # non-deterministic, also seeds CUDA
    request.node.user_properties.append(("torch_seed", seed))
    print(f"[{request.node.nodeid}] torch seed {seed}")
    yield


@pytest.fixture(autouse=True)
def _fresh_launch_plans(monkeypatch):
    """Every test starts without recorded launch plans (``kernels._plan``), so that its first
    call of a signature runs (and is seen by spies on) the general path."""
    from kernels import _plan

    monkeypatch.setattr(_plan, "_plans", {})


@pytest.fixture(autouse=True)
def _descriptors_at_test_sizes(request, monkeypatch):
    """GPU tests run small shapes, below the size from which the V2 kernel takes tensor
    descriptors (TMA) in production (``kernels._launch._TMA_MIN_SCORES``), and the Hopper
    kernel (``_HOPPER_MIN_WORK``). They lower both bounds to 0, so every load path stays
    covered: descriptors from 256 query rows (with aligned strides), pointers below and for
    odd views. ``test_gpu_tma_size_rule`` and ``test_hopper_size_bound`` check the real
    bounds."""
    if "gpu" in request.node.keywords:
        from kernels import _launch

        monkeypatch.setattr(_launch, "_TMA_MIN_SCORES", 0)
        monkeypatch.setattr(_launch, "_HOPPER_MIN_WORK", 0)


@pytest.fixture
def gpu_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def pytest_terminal_summary(terminalreporter):
    """Show what the examples printed (tests/test_examples.py runs them), so that a CI log
    shows them running."""
    for name, module in list(sys.modules.items()):
        runs = getattr(module, "RUNS", None) if name.endswith("test_examples") else None
        if runs:
            terminalreporter.section("examples (CPU defaults)")
            for run in runs:
                terminalreporter.write_line(run)
