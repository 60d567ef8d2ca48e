"""Repository consistency that no other test sees."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_all_runs_every_file_with_gpu_tests():
    """``benchmarks/gpu_all.sh`` (the one-call GPU run) lists every test file that has
    tests marked ``gpu``: a new file of GPU tests is not left out of it."""
    script = (REPO / "benchmarks" / "gpu_all.sh").read_text()
    lanes = re.search(r"for lane in (.+?); do", script, re.DOTALL).group(1)
    listed = {re.sub(r"_[ab]$", "", word) for word in re.findall(r"\w+", lanes)}
    marked = re.compile(r"^@pytest\.mark\.gpu$", re.MULTILINE)
    with_gpu_tests = {path.stem.removeprefix("test_") for path in REPO.glob("tests/test_*.py")
                      if marked.search(path.read_text())}
    assert with_gpu_tests and listed == with_gpu_tests


def test_host_path_harness_runs():
    """``benchmarks/host_path.py`` stubs ``_runtime.launch`` with a function of its own: the
    stub keeps the real signature, the harness times every case on the CPU, and it leaves the
    launcher and the plan store as it found them."""
    import importlib.util
    import inspect

    from kernels import _plan, _runtime

    spec = importlib.util.spec_from_file_location("host_path",
                                                  REPO / "benchmarks" / "host_path.py")
    host_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_path)
    assert (list(inspect.signature(host_path._stub_launch).parameters)
            == list(inspect.signature(_runtime.launch).parameters))
    before = _runtime.launch, _runtime.replay_launch, _plan.signature, dict(_plan._plans)
    times = host_path.main(calls=2, rounds=1)
    assert (_runtime.launch, _runtime.replay_launch, _plan.signature, _plan._plans) == before
    assert len(times) == 7 and all(t > 0 for pair in times.values() for t in pair)


def test_ruff_clean():
    """The repository passes ``ruff check`` with pyproject's rules (ruff comes with the test
    extra, pinned to one minor series so that a new release's rules do not turn CI red)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
