"""The process environment of a training run, read once: rank, world size, device.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without it a run is one
process. They are read by :func:`bilinear_lens.distributed.env_ranks`, shared with the
analysis commands; this module adds what a training run needs on top (joining and leaving
the group, the barrier, the device of this rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from bilinear_lens.distributed import env_ranks, resolve_device

__all__ = ["DistEnv", "read_environment"]


@dataclass
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on
    its host, the ``device`` it trains on, and whether it created the process group (then
    :meth:`close` destroys it)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process: gradients and metrics are all-reduced."""
        return self.world_size > 1

    def init_group(self) -> None:
        """Join the process group (gloo on CPU, nccl on CUDA) when there are several ranks."""
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self.created_group = True

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.created_group:
            dist.destroy_process_group()
            self.created_group = False


def read_environment(device: str = "cpu") -> DistEnv:
    """Rank and world size from torchrun's variables, and the device ``device`` resolves to
    for this rank (see :func:`resolve_device`). Does not join the process group."""
    ranks = env_ranks()
    return DistEnv(rank=ranks.rank, local_rank=ranks.local_rank, world_size=ranks.world_size,
                   device=resolve_device(device, ranks.local_rank, what="train.device"))
