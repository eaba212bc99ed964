"""The one-shot all-reduce's policy, on the CPU: which messages take it, and that the ranks
enable it together or not at all (the kernel itself runs in tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from sgl_engine.config import EngineConfig
from sgl_engine.distributed import one_shot
from sgl_engine.distributed.group import TPGroup


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
