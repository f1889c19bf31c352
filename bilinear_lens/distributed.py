"""The runtime of every process, training and analysis alike: torchrun's rank record, the
device rule, the process group and the collectives.

``torchrun --nproc_per_node N -m bilinear_lens.cli eigen ...`` (or ``... train ...``) sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (:func:`env_ranks`; a plain process is
``Ranks(0, 1)``). One device rule (:func:`resolve_device`) serves ``train.device``, the
commands' ``--device`` and the library's ``device=`` arguments. One backend rule
(:func:`backend_for`: nccl on CUDA, gloo otherwise) serves both ways of joining the group:
:func:`process_group` for the duration of an analysis command, :class:`DistEnv` for a
training run (read once by :func:`read_environment`). Library functions ask
:func:`current_ranks`, so the same code runs with or without a group.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from jaxtyping import Int


@dataclass(frozen=True)
class Ranks:
    """This process' ``rank`` among ``world_size`` (``local_rank``: its index on this host)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, item: int) -> bool:
        """Round-robin split of work items ``0, 1, 2, ...`` over the ranks."""
        return item % self.world_size == self.rank


def env_ranks() -> Ranks:
    """``Ranks`` from torchrun's environment (a single process when unset)."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        raw = os.environ.get(name) or str(default)
        if not raw.isdigit():
            raise ValueError(f"environment variable {name}={raw!r} must be a non-negative integer")
        values[name] = int(raw)
    return Ranks(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])


def current_ranks() -> Ranks:
    """This process' place in the initialised default group, or ``Ranks(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), env_ranks().local_rank)
    return Ranks()


DEVICE_NAMES = ("auto", "cpu", "cuda")  # and "cuda:N"


def is_device_name(name: object) -> bool:
    """Whether ``name`` is in the device grammar: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    return isinstance(name, str) and (name in DEVICE_NAMES or (name.startswith("cuda:") and name[5:].isdigit()))


def resolve_device(
    name: Union[str, torch.device], local_rank: Optional[int] = None, what: str = "device"
) -> torch.device:
    """The one rule for devices (training's ``train.device``, the analysis commands'
    ``--device``, the library's ``device=``): ``"auto"``: CUDA if available, else CPU;
    ``"cuda"``: this rank's GPU (``cuda:<local_rank>``, so torchrun ranks do not share one;
    ``local_rank`` defaults to ``LOCAL_RANK``); ``"cuda:N"``, ``"cpu"`` or a ``torch.device``
    of those: as named. Anything else, or CUDA on a machine without it, is a ``ValueError``
    whose message starts with ``what`` (e.g. ``"train.device"``, ``"--device"``) and the value."""
    if local_rank is None:  # read even where unused: a malformed torchrun environment is named, not ignored
        local_rank = env_ranks().local_rank
    if isinstance(name, torch.device):
        name = name.type if name.index is None or name.type == "cpu" else f"{name.type}:{name.index}"
    if not is_device_name(name):
        raise ValueError(f"{what} {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {name!r}: CUDA is not available on this machine; use auto or cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device(name)


def backend_for(device: torch.device) -> str:
    """The process-group backend for ranks computing on ``device``: nccl on CUDA, else gloo."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join torchrun's process group while inside (nothing to do for one process).

    The backend is nccl for a CUDA ``device``, gloo otherwise; a group this context
    created is destroyed on exit.
    """
    ranks = env_ranks()
    created = ranks.world_size > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group(backend=backend_for(device))
    try:
        yield current_ranks()
    finally:
        if created:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if current_ranks().world_size > 1:
        dist.barrier()


def all_gather_int64(array: Int[np.ndarray, "n"]) -> list[Int[np.ndarray, "m"]]:
    """Every rank's 1-D ``int64`` array (lengths may differ), in rank order.

    Uses tensor collectives (gloo/nccl), never pickling: lengths first, then arrays padded
    to the longest. A single process gets ``[array]``.
    """
    ranks = current_ranks()
    if ranks.world_size == 1:
        return [array]
    # nccl moves only CUDA tensors
    device = torch.device("cuda", ranks.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(ranks.world_size)]
    dist.all_gather(lengths, torch.tensor([local.numel()], device=device))
    longest = int(max(n.item() for n in lengths))
    padded = torch.zeros(longest, dtype=torch.int64, device=device)
    padded[: local.numel()] = local
    gathered = [torch.zeros(longest, dtype=torch.int64, device=device) for _ in range(ranks.world_size)]
    dist.all_gather(gathered, padded)
    return [g[: int(n.item())].cpu().numpy() for g, n in zip(gathered, lengths)]


# ---- a training run's environment: rank, world size, device, its own group ----


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
            dist.init_process_group(backend=backend_for(self.device))
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


__all__ = ["DEVICE_NAMES", "DistEnv", "Ranks", "all_gather_int64", "backend_for", "barrier", "current_ranks", "env_ranks",
           "is_device_name", "process_group", "read_environment", "resolve_device"]
