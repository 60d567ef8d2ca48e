"""The CUDA launch path of ``kernels._runtime`` on the CPU, with stand-in kernel objects: the
compiled-kernel cache (its key, the direct relaunch and its argument order) and the retry
with fewer pipeline stages when shared memory overflows. (The real launches run in the GPU
tests and in benchmarks/gpu_smoke.py, which checks relaunches against first launches.)"""

from __future__ import annotations

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

from kernels import _runtime

DEVICE = torch.device("cuda", 0)


class FakeCompiled:
    """What triton returns from a launch: the launcher ``run`` and its handles."""

    function = "function-handle"
    packed_metadata = "metadata"

    def __init__(self, log: list) -> None:
        self.log = log

    def run(self, *call) -> None:
        self.log.append(("run", call))

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("runner", grid, args))


class CudaLauncher:
    """Triton 3.6's launcher object (its class name is part of what ``_direct_launch``
    checks): ``launch`` is its C function, called directly where allowed."""

    launch_cooperative_grid = False
    launch_pdl = True
    profile_scratch_size = 0

    def __init__(self, log: list, global_scratch_size: int) -> None:
        self.global_scratch_size = global_scratch_size
        self.launch = lambda *call: log.append(("launch", call))
        self.log = log

    def __call__(self, *call) -> None:
        self.log.append(("run", call))


class FakeCompiled36(FakeCompiled):
    def __init__(self, log: list, global_scratch_size: int) -> None:
        super().__init__(log)
        self.run = CudaLauncher(log, global_scratch_size)


class FakeKernel:
    """A jit function with arguments (x, n, scale, A, B) where A and B are constexprs.
    ``scratch``: None compiles to a plain launcher, an int to a triton-3.6 one that asks
    for that much global scratch."""

    arg_names = ["x", "n", "scale", "A", "B"]

    def __init__(self, fail_above_stages: int = 99, with_launcher: bool = True,
                 scratch: int | None = None) -> None:
        self.log: list = []
        self.fail_above_stages = fail_above_stages
        self.with_launcher = with_launcher
        self.scratch = scratch

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages, **constexprs):
            self.log.append(("compile", grid, args, constexprs, num_warps, num_stages))
            if num_stages > self.fail_above_stages:
                raise OutOfResources(300_000, 232_448, "shared memory")
            if not self.with_launcher:
                return object()
            if self.scratch is None:
                return FakeCompiled(self.log)
            return FakeCompiled36(self.log, self.scratch)
        return launch


class FakeDriver:
    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> str:
        return "stream-0"


@pytest.fixture(autouse=True)
def fake_driver(monkeypatch):
    monkeypatch.setattr(triton.runtime.driver, "_active", FakeDriver())
    monkeypatch.setattr(_runtime, "_compiled", {})
    monkeypatch.setattr(_runtime, "_direct", {})


def _launch(kernel, x, n, *, stages=3):
    # constexprs given in an order other than the kernel's: the relaunch must reorder them
    _runtime._launch_cuda(kernel, (4, 2), DEVICE, (x, n, 0.5), {"B": 7, "A": 3}, 4, stages)


def test_relaunch_goes_through_the_launcher_with_kernel_order_arguments():
    kernel = FakeKernel()
    x = torch.randn(64)
    _launch(kernel, x, 32)
    _launch(kernel, x, 48)  # same specialisation (multiple of 16): no new compile
    kinds = [entry[0] for entry in kernel.log]
    assert kinds == ["compile", "run"]
    call = kernel.log[1][1]
    assert call[:4] == (4, 2, 1, "stream-0")  # grid padded to 3-D, current stream
    assert call[4:9] == ("function-handle", "metadata", None, None, None)
    assert call[9:] == (x, 48, 0.5, 3, 7)  # args, then constexprs in the kernel's order


@pytest.mark.parametrize("triton_version, scratch, direct", [
    ("3.6.0", 0, True), ("3.6.1", 0, True), ("3.6.0", 64, False), ("3.7.0", 0, False),
])
def test_triton_36_relaunch_calls_the_c_launch_function(triton_version, scratch, direct,
                                                         monkeypatch):
    """Under triton 3.6 a relaunch calls the launcher's C function with the arguments that
    triton's own launcher object passes it (no scratch memory); other versions, or a kernel
    that needs scratch memory, go through the launcher object."""
    monkeypatch.setattr(triton, "__version__", triton_version)
    kernel = FakeKernel(scratch=scratch)
    x = torch.randn(64)
    _launch(kernel, x, 32)
    _launch(kernel, x, 48)
    kind, call = kernel.log[-1]
    if direct:
        assert kind == "launch"
        assert call[:5] == (4, 2, 1, "stream-0", "function-handle")
        # cooperative grid, PDL, global and profile scratch, metadata, launch metadata, hooks
        assert call[5:13] == (False, True, None, None, "metadata", None, None, None)
        assert call[13:] == (x, 48, 0.5, 3, 7)
    else:
        assert kind == "run"
        assert call == (4, 2, 1, "stream-0", "function-handle", "metadata", None, None, None,
                        x, 48, 0.5, 3, 7)


@pytest.mark.parametrize("first, second", [(32, 33), (32, 1), (5, 2**31 + 5)])
def test_a_new_specialisation_compiles_again(first, second):
    """Divisibility by 16, equality to 1 and width of an int are part of the key."""
    kernel = FakeKernel()
    x = torch.randn(64)
    _launch(kernel, x, first)
    _launch(kernel, x, second)
    assert [entry[0] for entry in kernel.log] == ["compile", "compile"]


def test_tensor_dtype_and_alignment_are_part_of_the_key():
    kernel = FakeKernel()
    x = torch.randn(64)
    _launch(kernel, x, 16)
    _launch(kernel, x.half(), 16)
    _launch(kernel, x[1:], 16)  # 4-byte offset: not 16-byte aligned
    _launch(kernel, x[4:], 16)  # 16-byte offset: aligned again, same key as x
    assert [entry[0] for entry in kernel.log] == ["compile", "compile", "compile", "run"]


def test_shared_memory_overflow_retries_with_fewer_stages():
    kernel = FakeKernel(fail_above_stages=1)
    x = torch.randn(64)
    _launch(kernel, x, 16, stages=3)
    stages = [entry[5] for entry in kernel.log if entry[0] == "compile"]
    assert stages == [3, 2, 1]
    _launch(kernel, x, 16, stages=3)  # remembered: relaunched, no new attempt
    assert [entry[0] for entry in kernel.log][-1] == "run"


def test_overflow_at_one_stage_is_raised():
    kernel = FakeKernel(fail_above_stages=0)
    with pytest.raises(OutOfResources):
        _launch(kernel, torch.randn(64), 16, stages=2)


def test_without_a_launcher_triton_launches_with_the_stages_that_fitted():
    kernel = FakeKernel(fail_above_stages=2, with_launcher=False)
    x = torch.randn(64)
    _launch(kernel, x, 16, stages=3)
    _launch(kernel, x, 16, stages=3)
    compiles = [entry for entry in kernel.log if entry[0] == "compile"]
    assert [entry[5] for entry in compiles] == [3, 2, 2]
    assert compiles[-1][3] == {"B": 7, "A": 3, "enable_fp_fusion": True}


def test_a_profiler_hook_gets_tritons_own_runner(monkeypatch):
    """With a launch hook set (proton, for one), relaunches go through triton's runner,
    which builds the launch metadata the hook reads."""
    kernel = FakeKernel()
    x = torch.randn(64)
    _launch(kernel, x, 16)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda metadata: None)
    _launch(kernel, x, 16)
    assert kernel.log[-1] == ("runner", (4, 2, 1), (x, 16, 0.5, 3, 7))


@pytest.mark.parametrize("batch, heads, seqlen, head_dim, causal, dtype, want", [
    (1, 12, 2048, 64, True, torch.float16, (64, 64)),  # 192 programs: < 4 per SM
    (1, 32, 2048, 64, True, torch.bfloat16, (64, 64)),  # 512 (3.9 per SM)
    (1, 12, 8192, 64, True, torch.float16, (64, 128)),  # 768 (5.8 per SM)
    (1, 32, 8192, 40, True, torch.bfloat16, (64, 128)),  # 2048 (15.5 per SM)
    (4, 32, 8192, 64, True, torch.float16, (128, 128)),  # 8192: the table's tile
    (1, 12, 2048, 64, False, torch.float16, (128, 128)),  # not causal: the table
    (1, 12, 2048, 128, True, torch.float16, (64, 64)),  # head_dim 128: 192 (1.5 per SM)
    (1, 16, 8192, 128, True, torch.bfloat16, (128, 128)),  # 1024 (7.8 per SM): the table
    (1, 8, 8192, 256, True, torch.float16, (64, 64)),  # head_dim 256: 512 (3.9 per SM)
    (4, 8, 8192, 256, True, torch.bfloat16, (128, 64)),  # 2048 (15.5 per SM): the table
    (1, 8, 2048, 256, False, torch.float16, (128, 64)),  # not causal: the table
    (1, 12, 2048, 64, True, torch.float32, (64, 64)),  # float32: its own table row
    (8, 16, 1024, 128, True, torch.float16, (128, 64)),  # short causal sequences, 1024 (7.8)
    (8, 16, 1024, 128, True, torch.float32, (64, 32)),  # float32: its own table row
    (8, 16, 1024, 128, False, torch.bfloat16, (128, 128)),  # not causal: the table
    (8, 16, 1040, 128, True, torch.bfloat16, (128, 128)),  # longer than 1024: the table
    (32, 32, 1024, 64, True, torch.float16, (128, 128)),  # head_dim 64 (62): the table
    (1, 16, 1024, 128, True, torch.float16, (64, 64)),  # a small grid first
])
def test_tile_rules_for_small_grids_and_short_causal_sequences(batch, heads, seqlen, head_dim,
                                                               causal, dtype, want,
                                                               monkeypatch):
    """The V2 tile rules on a 132-multiprocessor GPU (kernels.configs): 64-row query blocks
    for causal fp16/bf16 calls whose 128-row grid would be small (below 4 programs per
    multiprocessor at head_dim <= 128, 8 at 256; 64x128 tiles up to 16 at head_dim <= 64);
    then, for causal fp16/bf16 calls at 64 < head_dim <= 128 whose sequences are at most
    1024 long, 128x64 tiles capped at 128 registers."""
    from kernels import configs

    monkeypatch.setattr(configs, "multiprocessors", lambda device: 132)
    blocks_128 = batch * heads * -(-seqlen // 128)
    cfg = configs.tile_config("v2", DEVICE, head_dim, dtype, causal, blocks_128, seqlen)
    assert (cfg.block_m, cfg.block_n) == want
    if want == (128, 64) and head_dim == 128:
        assert cfg.maxnreg == 128
    if dtype == torch.float32:  # the float32 row, whatever the grid
        assert cfg == configs.tile_config("v2", DEVICE, head_dim, dtype, causal)


@pytest.mark.parametrize("name", ["NVIDIA H200", "NVIDIA A100-SXM4-80GB"])
def test_split_kv_adds_a_stage_with_one_program_per_multiprocessor(monkeypatch, name):
    """kernels.configs.splitkv_grid on a 132-multiprocessor GPU other than the H100: one stage
    more for fp16/bf16 at 64 < head_dim <= 128 when the grid has at most one program per
    multiprocessor (GQA decode with two splits, 128 programs), the table's tile otherwise."""
    from kernels import configs

    monkeypatch.setattr(configs, "multiprocessors", lambda device: 132)
    monkeypatch.setattr(configs, "device_name", lambda device: name)
    cuda = torch.device("cuda")
    base = configs.tile_config("splitkv", cuda, 128, torch.float16, False)
    deeper = configs.splitkv_grid(base, cuda, 128, torch.bfloat16, 128)
    assert deeper == configs.TileConfig(base.block_m, base.block_n, base.num_warps,
                                        base.num_stages + 1, base.maxnreg)
    assert configs.splitkv_grid(base, cuda, 128, torch.float16, 133) == base
    assert configs.splitkv_grid(base, cuda, 128, torch.float32, 64) == base
    assert configs.splitkv_grid(base, cuda, 256, torch.float16, 64) == base
    assert configs.splitkv_grid(base, torch.device("cpu"), 128, torch.float16, 4) == base
    small = configs.tile_config("splitkv", cuda, 64, torch.bfloat16, False)
    assert configs.splitkv_grid(small, cuda, 64, torch.bfloat16, 128) == small


def test_split_kv_on_the_h100_takes_small_tiles_on_a_full_grid(monkeypatch):
    """kernels.configs.splitkv_grid on the H100: with more programs than multiprocessors
    (one split), 32-key tiles with 2 warps, which divide the table's tile so that the split
    length stays whole; the table's tile, without an extra stage, on smaller grids; fp32,
    head_dim 64 and 256 keep the table's tile."""
    from kernels import configs

    monkeypatch.setattr(configs, "multiprocessors", lambda device: 132)
    monkeypatch.setattr(configs, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda")
    for head_dim in (80, 128):
        base = configs.tile_config("splitkv", cuda, head_dim, torch.float16, False)
        full = configs.splitkv_grid(base, cuda, head_dim, torch.bfloat16, 256)
        assert (full.block_n, full.num_warps, full.num_stages) == (32, 2, 3)
        assert full.block_m == base.block_m and base.block_n % full.block_n == 0
        assert configs.splitkv_grid(base, cuda, head_dim, torch.float16, 132) == base
    for head_dim, dtype in ((128, torch.float32), (64, torch.float16), (256, torch.float16)):
        base = configs.tile_config("splitkv", cuda, head_dim, dtype, False)
        assert configs.splitkv_grid(base, cuda, head_dim, dtype, 256) == base


def test_a_register_cap_reaches_the_compiler_and_keys_the_compiled_kernel():
    """A configuration's maxnreg is passed to Triton as a launch option (retries with fewer
    stages keep it), and launches that differ only in it compile separately. Every compile
    asks for fused multiply-adds by name (triton 3.10 stops enabling them by default)."""
    kernel = FakeKernel(fail_above_stages=2)
    x = torch.randn(64)
    for maxnreg in (128, None, 128):
        _runtime._launch_cuda(kernel, (4, 2), DEVICE, (x, 32, 0.5), {"A": 3, "B": 7}, 8, 3,
                              maxnreg)
    compiles = [(entry[3].get("maxnreg"), entry[5]) for entry in kernel.log
                if entry[0] == "compile"]
    assert compiles == [(128, 3), (128, 2), (None, 3), (None, 2)]
    assert all(entry[3]["enable_fp_fusion"] is True for entry in kernel.log
               if entry[0] == "compile")
    assert [entry[0] for entry in kernel.log[-1:]] == ["run"]  # the third launch: a relaunch
