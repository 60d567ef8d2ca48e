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
