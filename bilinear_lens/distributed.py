"""Process groups for analysis launched with ``torchrun`` (as training is) and the
collectives analysis needs: which rank owns which work item, and gathering arrays.

``torchrun --nproc_per_node N -m bilinear_lens.cli eigen ...`` sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; :func:`process_group` joins the group (gloo on CPU, nccl on CUDA)
for the duration of a command. Library functions ask :func:`current_ranks`, which is
``Ranks(0, 1)`` in a plain single process, so the same code runs either way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

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


def resolve_device(name: str, local_rank: int = 0, what: str = "device") -> torch.device:
    """The one rule for device names (training's ``train.device`` and the analysis
    commands' ``--device``): ``"auto"``: CUDA if available, else CPU; ``"cuda"``: this
    rank's GPU (``cuda:<local_rank>``, so torchrun ranks do not share one); ``"cuda:N"``,
    ``"cpu"``: as named. Anything else, or CUDA on a machine without it, is a
    ``ValueError`` whose message starts with ``what`` (e.g. ``"train.device"``,
    ``"--device"``) and the value."""
    if not isinstance(name, str) or not (name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ValueError(f"{what} {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {name!r}: CUDA is not available on this machine; use auto or cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device(name)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join torchrun's process group while inside (nothing to do for one process).

    The backend is nccl for a CUDA ``device``, gloo otherwise; a group this context
    created is destroyed on exit.
    """
    ranks = env_ranks()
    created = ranks.world_size > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
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


__all__ = ["Ranks", "all_gather_int64", "barrier", "current_ranks", "env_ranks", "process_group", "resolve_device"]
