"""The process environment of a training run, read once: rank, world size, device.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without it a run is one
process. :func:`read_environment` is the only place that reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "read_environment", "resolve_device"]


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


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: CUDA if available, else CPU; ``"cuda"``: this rank's GPU; else as named."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={name!r} but CUDA is not available; use 'auto' or 'cpu'")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device(name)


def read_environment(device: str = "cpu") -> DistEnv:
    """Rank and world size from torchrun's variables, and the device ``device`` resolves to
    for this rank (see :func:`resolve_device`). Does not join the process group."""
    local_rank = _env_int("LOCAL_RANK", 0)
    return DistEnv(rank=_env_int("RANK", 0), local_rank=local_rank, world_size=_env_int("WORLD_SIZE", 1),
                   device=resolve_device(device, local_rank))
