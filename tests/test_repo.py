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


def test_bench_hf_pairs_speedups_by_round():
    """``benchmarks/bench_hf.py`` reports sdpa's time over triton_fa's within each round
    (median, min, max), so a host that slows a whole round cancels out of the ratio, and leaves
    the speedup table out when either implementation was not timed."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_hf", REPO / "benchmarks" / "bench_hf.py")
    bench_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_hf)
    # Round 2 runs on a host twice as slow; within every round sdpa takes 1.1x or 0.9x ours.
    times = {"triton_fa": [1.0, 2.0, 1.0], "sdpa": [1.1, 2.2, 0.9], "eager": [3.0, 6.0, 3.0]}
    median, low, high = bench_hf.paired_speedups(times)
    assert abs(median - 1.1) < 1e-12 and abs(low - 0.9) < 1e-12 and abs(high - 1.1) < 1e-12
    assert bench_hf.paired_speedups({"triton_fa": [1.0], "eager": [2.0]}) is None
    args = argparse.Namespace(repeats=3)
    table = bench_hf.format_speedups({"gpt2": {"generate b16": (median, low, high),
                                               "prefill 2048": None}}, args).splitlines()
    assert len(table) == 3 and table[2] == "| gpt2 | generate b16 | 1.100 | 0.900 | 1.100 |"
    assert bench_hf.format_speedups({"gpt2": {"generate b16": None}}, args) == ""


def test_ruff_clean():
    """The repository passes ``ruff check`` with pyproject's rules (ruff comes with the test
    extra, pinned to one minor series so that a new release's rules do not turn CI red)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
