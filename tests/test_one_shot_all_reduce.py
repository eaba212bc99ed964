"""The one-shot all-reduce's policy, on the CPU: which messages take it, and that the ranks
enable it together or not at all (the kernel itself runs in tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from sgl_engine.config import EngineConfig
from sgl_engine.distributed import fused_norm, one_shot, push_norm
from sgl_engine.distributed.group import TPGroup
from sgl_engine.models.ops import TorchOps


class FakeOneShot(one_shot.OneShotAllReduce):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 2


def fake(numel: int = 1024, dtype=torch.bfloat16) -> FakeOneShot:
    return FakeOneShot(torch.zeros(numel, dtype=dtype), "g")


@pytest.mark.parametrize(
    ("shape", "dtype", "takes"),
    [
        ((1, 512), torch.bfloat16, True),  # a batch-1 decode message
        ((2, 512), torch.bfloat16, True),  # exactly the buffer
        ((3, 512), torch.bfloat16, False),  # over the buffer
        ((1, 512), torch.float32, False),  # another dtype than the buffer's
        ((1, 7), torch.bfloat16, False),  # 14 bytes: not whole 16-byte vectors
        ((0, 512), torch.bfloat16, False),  # empty
    ],
)
def test_fits_depends_only_on_dtype_and_size(shape, dtype, takes):
    assert fake().fits(torch.ones(shape, dtype=dtype)) is takes


def test_group_all_reduce_takes_the_fast_path_only_for_fitting_messages(monkeypatch):
    seen = []
    monkeypatch.setattr("torch.distributed.all_reduce", lambda x, group=None: seen.append(x.shape))
    group = TPGroup(0, 2, device_group=object(), fast=fake())
    small = torch.ones(1, 512, dtype=torch.bfloat16)
    big = torch.ones(64, 512, dtype=torch.bfloat16)
    assert torch.equal(group.all_reduce(small), small * 2)
    assert group.all_reduce(big) is big
    assert group.fast.calls == 1 and seen == [big.shape]


def test_setup_is_off_on_the_cpu_and_for_nccl():
    never = pytest.fail  # agree() must not be called: no collective happens
    assert one_shot.setup("auto", None, torch.float32, torch.device("cpu"), never) is None
    assert one_shot.setup("nccl", None, torch.bfloat16, torch.device("cuda"), never) is None
    with pytest.raises(ValueError, match="needs CUDA"):
        one_shot.setup("one_shot", None, torch.float32, torch.device("cpu"), never)
    with pytest.raises(ValueError, match="tp_all_reduce must be one of"):
        one_shot.setup("fast", None, torch.float32, torch.device("cpu"), never)


class Group:
    group_name = "g"


def test_a_rank_that_cannot_allocate_turns_the_path_off_everywhere(monkeypatch, caplog):
    """This rank allocated its buffer but another did not: no rendezvous (it would wait for the
    rank that is not coming), NCCL for everything, a warning; with 'one_shot' a clear error."""
    monkeypatch.setattr(one_shot, "_allocate", lambda *a: (torch.zeros(8), None))
    flags = []

    def agree(flag: int) -> int:
        flags.append(flag)
        return 0

    dev = torch.device("cuda")
    assert one_shot.setup("auto", Group(), torch.bfloat16, dev, agree) is None
    assert flags == [1]
    assert "another rank could not allocate" in caplog.text
    with pytest.raises(RuntimeError, match="not available: another rank could not allocate"):
        one_shot.setup("one_shot", Group(), torch.bfloat16, dev, agree)


def test_a_failed_rendezvous_is_agreed_on(monkeypatch):
    from torch.distributed import _symmetric_memory as symm_mem

    def broken(buffer, name):
        raise RuntimeError("no peer access")

    monkeypatch.setattr(one_shot, "_allocate", lambda *a: (torch.zeros(8), None))
    monkeypatch.setattr(symm_mem, "rendezvous", broken)
    flags = []

    def agree(flag: int) -> int:
        flags.append(flag)
        return min(flags[-1], 1)

    dev = torch.device("cuda")
    assert one_shot.setup("auto", Group(), torch.bfloat16, dev, agree) is None
    assert flags == [1, 0]
    with pytest.raises(RuntimeError, match="rendezvous failed.*no peer access"):
        one_shot.setup("one_shot", Group(), torch.bfloat16, dev, agree)


def test_setup_on_every_rank_returns_the_path(monkeypatch):
    from torch.distributed import _symmetric_memory as symm_mem

    buf = torch.zeros(8, dtype=torch.bfloat16)
    monkeypatch.setattr(one_shot, "_allocate", lambda *a: (buf, None))
    monkeypatch.setattr(symm_mem, "rendezvous", lambda b, name: None)
    fast = one_shot.setup("auto", Group(), torch.bfloat16, torch.device("cuda"), lambda f: f)
    assert fast is not None and fast.buffer is buf and fast.group_name == "g"


def test_config_and_serve_flag():
    import argparse

    from sgl_engine.server import launch

    with pytest.raises(ValueError, match="tp_all_reduce must be"):
        EngineConfig(tp_all_reduce="fast")
    parser = launch.add_serve_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--tp", "2", "--tp-all-reduce", "nccl"])
    assert launch.engine_kwargs_from_args(args)["tp_all_reduce"] == "nccl"


def test_a_step_waiting_on_a_dead_peers_one_shot_kernel_fails_instead_of_hanging():
    """The one-shot kernel spins at its barrier for a peer that died (no timeout, no abort), so
    the step's event never fires: the runner polls it and raises the watchdog's failure."""
    from types import SimpleNamespace

    from sgl_engine.distributed.driver import TensorParallelError
    from sgl_engine.model_runner import ModelRunner

    class NeverReady:
        synchronized = False

        def query(self) -> bool:
            return False

        def synchronize(self) -> None:
            self.synchronized = True

    runner = ModelRunner.__new__(ModelRunner)
    runner.tp = TPGroup(0, 2, device_group=object(), fast=fake())
    runner.driver = SimpleNamespace(failure="tensor-parallel rank 1 (pid 7) was killed by SIGKILL")
    with pytest.raises(TensorParallelError, match="rank 1 .* SIGKILL"):
        runner._wait(NeverReady())
    runner.release()  # after a death the graphs are kept: one may still be spinning
    assert runner.tp.fast is not None

    runner.tp.fast = None  # NCCL's collectives abort: a plain blocking wait
    event = NeverReady()
    runner._wait(event)
    assert event.synchronized


class FakeFused(fused_norm.FusedAllReduceNorm):
    """The fused path's policy without its kernel: sums as if the peer sent the same x."""

    def __init__(self, max_rows: int = 2, hidden: int = 512) -> None:
        self.max_rows, self.hidden, self.dtype, self.calls = max_rows, hidden, torch.bfloat16, 0

    def __call__(self, x, residual, weight, eps):
        self.calls += 1
        return TorchOps.add_rmsnorm(x * 2, residual, weight, eps)


@pytest.mark.parametrize(
    ("shape", "dtype", "takes"),
    [
        ((1, 512), torch.bfloat16, True),
        ((2, 512), torch.bfloat16, True),  # the workspace's rows
        ((3, 512), torch.bfloat16, False),  # more rows: NCCL (or one-shot) + the norm kernel
        ((1, 256), torch.bfloat16, False),  # another width than the workspace's
        ((1, 512), torch.float32, False),
        ((0, 512), torch.bfloat16, False),
        ((512,), torch.bfloat16, False),
    ],
)
def test_fused_fits_depends_only_on_shape_and_dtype(shape, dtype, takes):
    assert FakeFused().fits(torch.ones(shape, dtype=dtype)) is takes


def test_all_reduce_add_rmsnorm_fuses_fitting_messages_and_reduces_then_norms_the_rest(
    monkeypatch,
):
    """Both paths give the same (norm, residual) of the summed partials; only the fitting
    message takes the fused kernel, the other goes through all_reduce (here the fake one-shot)
    and then the add-RMSNorm."""
    monkeypatch.setattr("torch.distributed.all_reduce", lambda x, group=None: x.mul_(2))
    group = TPGroup(0, 2, device_group=object(), fused=FakeFused())
    weight, eps = torch.rand(512, dtype=torch.bfloat16) + 0.5, 1e-5
    for rows in (1, 3):
        x = torch.randn(rows, 512, dtype=torch.bfloat16)
        res = torch.randn(rows, 512, dtype=torch.bfloat16)
        want = TorchOps.add_rmsnorm(x * 2, res.clone(), weight, eps)
        got = group.all_reduce_add_rmsnorm(x.clone(), res.clone(), weight, eps, TorchOps)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert group.fused.calls == 1


def test_fused_mode_needs_cuda_and_refuses_on_every_rank_together():
    never = pytest.fail
    with pytest.raises(ValueError, match="'fused' needs CUDA"):
        one_shot.setup("fused", None, torch.bfloat16, torch.device("cpu"), never)
    seen = []

    def agree(flag):
        seen.append(flag)
        return 0  # another rank cannot build it

    with pytest.raises(RuntimeError, match="'fused' is not available: it needs CUDA"):
        fused_norm.setup(None, 0, 2, 512, torch.bfloat16, torch.device("cpu"), agree)
    assert seen == [0]  # asked before any workspace is made
    EngineConfig(tp_all_reduce="fused")


def test_bound_control_sets_the_default_groups_timeout_or_says_it_cannot(monkeypatch, caplog):
    from sgl_engine.distributed import group as group_module

    seen = []
    monkeypatch.setattr(group_module, "_set_pg_timeout", lambda t: seen.append(t))
    TPGroup.bound_control(7.5)
    assert [t.total_seconds() for t in seen] == [7.5]
    monkeypatch.setattr(group_module, "_set_pg_timeout", None)
    with caplog.at_level("WARNING"):
        TPGroup.bound_control(7.5)
    assert "cannot change a process group's timeout" in caplog.text and len(seen) == 1


class FakePush(push_norm.PushAllReduceNorm):
    """The push path's policy without its kernels: the 'peer' holds the same partial sums."""

    def __init__(self, hidden: int = 512) -> None:
        self.hidden, self.dtype, self.calls, self._pushed = hidden, torch.bfloat16, 0, None
        self.products = 0

    def product(self, x, weight):
        self.products += 1
        self._pushed = x @ weight.T
        return self._pushed

    def __call__(self, x, residual, weight, eps):
        assert self.took(x)
        self._pushed = None
        self.calls += 1
        return TorchOps.add_rmsnorm(x * 2, residual.clone(), weight, eps)


def test_push_takes_only_the_products_it_pushed_and_they_reduce_like_the_rest(monkeypatch):
    """A one-row product of a row-parallel layer with the one-row kernel pushes; its partial
    sums take the push kernel. Any other partial sums (more rows, another width, no one-row
    kernel, or one that was already reduced) go the usual way; the results are the same."""
    from sgl_engine.distributed.layers import RowParallelLinear

    monkeypatch.setattr("torch.distributed.all_reduce", lambda x, group=None: x.mul_(2))
    push = FakePush()
    group = TPGroup(0, 2, device_group=object(), push=push)
    layer = RowParallelLinear(256, 512, tp=group)
    torch.nn.init.normal_(layer.weight, std=0.05)
    layer.weight.data = layer.weight.data.bfloat16()
    weight, eps = torch.rand(512, dtype=torch.bfloat16) + 0.5, 1e-5
    res = torch.randn(1, 512, dtype=torch.bfloat16)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    plain = layer(x, reduce=False)  # no one-row kernel: the layer does not push
    assert push.products == 0 and not push.took(plain)
    layer.gemv = lambda a, w: a @ w.T
    pushed = layer(x, reduce=False)
    assert push.products == 1 and push.took(pushed) and not push.took(plain)
    want = TorchOps.add_rmsnorm(plain * 2, res.clone(), weight, eps)
    got = group.all_reduce_add_rmsnorm(pushed, res.clone(), weight, eps, TorchOps)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)) and push.calls == 1
    assert not push.took(pushed)  # reduced once; the same tensor again would go the usual way
    assert layer(torch.randn(2, 128, dtype=torch.bfloat16), reduce=False).shape == (2, 512)
    assert push.products == 1  # two rows: not pushed
    assert layer(x).shape == (1, 512) and push.products == 1  # reduce=True: the layer reduces


@pytest.mark.parametrize(
    ("shape", "wshape", "takes"),
    [
        ((1, 128), (512, 128), True),
        ((2, 128), (512, 128), False),  # two rows
        ((1, 128), (256, 128), False),  # another width than the buffer's
        ((128,), (512, 128), False),
    ],
)
def test_push_fits_depends_only_on_shapes(shape, wshape, takes):
    x, w = torch.ones(shape, dtype=torch.bfloat16), torch.ones(wshape, dtype=torch.bfloat16)
    assert FakePush().fits(x, w) is takes


def test_push_mode_needs_two_cuda_ranks_and_the_one_row_kernel():
    with pytest.raises(ValueError, match="'push' needs decode_gemv='triton'"):
        EngineConfig(tp_all_reduce="push", decode_gemv="cublas")
    EngineConfig(tp_all_reduce="push", decode_gemv="triton")
    with pytest.raises(ValueError, match="'push' needs decode_gemv='triton'"):
        EngineConfig(tp_all_reduce="push")  # the default is cuBLAS
    EngineConfig(tp_all_reduce="push", decode_gemv="auto")  # Triton wherever push can run
    with pytest.raises(ValueError, match="'push' needs CUDA"):
        one_shot.setup("push", None, torch.bfloat16, torch.device("cpu"), pytest.fail)
    for size, why in ((2, "it needs Hopper or later GPUs"), (4, "it is for two ranks, not 4")):
        seen = []

        def agree(flag, seen=seen):
            seen.append(flag)
            return min(seen)

        with pytest.raises(RuntimeError, match=f"'push' is not available: {why}"):
            push_norm.setup(None, 0, size, 512, torch.bfloat16, torch.device("cpu"), agree)
        assert seen == [0]  # refused before any buffer is made


@pytest.mark.parametrize(
    ("setting", "device", "dtype", "capability", "want"),
    [
        ("auto", "cuda", torch.bfloat16, (9, 0), "triton"),
        ("auto", "cuda", torch.float16, (10, 0), "triton"),
        ("auto", "cuda", torch.bfloat16, (8, 0), "cublas"),  # not where it was measured
        ("auto", "cuda", torch.float32, (9, 0), "cublas"),
        ("cublas", "cuda", torch.bfloat16, (9, 0), "cublas"),
        ("triton", "cuda", torch.bfloat16, (8, 0), "triton"),  # asked for: taken as asked
        ("triton", "cpu", torch.float32, None, "cublas"),  # nothing but torch runs there
        ("auto", "cpu", torch.bfloat16, None, "cublas"),
    ],
)
def test_decode_gemv_auto_is_triton_where_it_was_measured(
    monkeypatch, setting, device, dtype, capability, want
):
    from sgl_engine.models import gemv

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: capability)
    assert gemv.choose(setting, torch.device(device), dtype) == want


def test_decode_gemv_auto_is_cublas_without_triton(monkeypatch):
    import builtins

    from sgl_engine.models import gemv

    real = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: (9, 0))
    monkeypatch.setattr(builtins, "__import__", no_triton)
    assert gemv.choose("auto", torch.device("cuda"), torch.bfloat16) == "cublas"
    assert push_norm._unavailable(2, torch.bfloat16, torch.device("cuda")) == "it needs Triton"
