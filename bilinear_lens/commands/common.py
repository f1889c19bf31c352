"""Pieces shared by the subcommands: the usage-error type, checkpoint loading, and the
``--device``/``--dtype``/``--quiet`` flags."""

from __future__ import annotations

from typing import Any

from bilinear_lens.models.checkpoint import CheckpointError


class UsageError(Exception):
    """A problem with the arguments or inputs, reported as ``error: ...`` with exit code 2."""


def load_model_with_tokenizer(path: str, command: str) -> Any:
    """Load a checkpoint for ``command``; a missing/corrupt checkpoint or a missing
    tokenizer (needed to read text) is a :class:`UsageError`."""
    from bilinear_lens.models.model import BilinearTransformer

    try:
        model = BilinearTransformer.from_pretrained(path)
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        raise UsageError(f"cannot load checkpoint {path}: {err}") from err
    if model.tokenizer is None:
        raise UsageError(f"checkpoint {path} has no tokenizer.json; the {command} command needs one to read text")
    return model.eval()


# ---- --device / --dtype / --quiet: shared by the analysis commands (eigen, ablate, polytope, report)

DTYPES = ("float32", "float64", "bfloat16", "float16")


def add_device_args(parser: Any) -> None:
    """Add ``--device`` (auto/cpu/cuda/cuda:N), ``--dtype`` and ``--quiet`` to ``parser``."""
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help=f"compute dtype: {', '.join(DTYPES)} (default float32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_device(args: Any) -> tuple[Any, Any]:
    """``(torch.device, torch.dtype)`` from ``args.device`` / ``args.dtype``; bad values are a
    one-line :class:`UsageError` naming the flag, the value and what is allowed."""
    import torch

    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise UsageError(f"--device {args.device!r} is not one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device!r}: CUDA is not available on this machine; use --device cpu or auto")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPES)}")
    return torch.device(name), getattr(torch, args.dtype)


def place_model(model: Any, args: Any) -> Any:
    """``model`` moved to ``--device`` in ``--dtype`` (see :func:`resolve_device`)."""
    device, dtype = resolve_device(args)
    return model.to(device=device, dtype=dtype)
