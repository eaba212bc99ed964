"""Tensor parallelism over torch.distributed: the process group, the parallel layers, and the
follower ranks' worker processes that the engine starts and stops (`TensorParallel`)."""

from __future__ import annotations

from sgl_engine.distributed.group import TPGroup

__all__ = ["TPGroup"]
