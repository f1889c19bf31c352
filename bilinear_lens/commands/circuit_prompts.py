"""What ``circuit patch`` and ``circuit attribute`` share: the clean/corrupted prompt flags,
the metric from the output-direction flags, and writing results (JSON or an HTML heatmap)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from bilinear_lens.commands.common import UsageError, resolve_direction_arguments


def add_prompt_arguments(parser: Any) -> None:
    group = parser.add_argument_group("prompts (one length, no padding)")
    group.add_argument("--clean", action="append", default=[], metavar="TEXT", help="clean prompt text (repeatable)")
    group.add_argument("--corrupt", action="append", default=[], metavar="TEXT", help="corrupted prompt text (repeatable)")
    group.add_argument("--clean-ids", action="append", default=[], metavar="IDS", help="clean prompt as comma-separated token ids")
    group.add_argument("--corrupt-ids", action="append", default=[], metavar="IDS", help="corrupted prompt as comma-separated ids")
    group.add_argument("--position", type=int, default=-1, help="position whose logits the metric reads (default -1, the last)")


def _ids(flag: str, rows: list[str]) -> torch.Tensor:
    try:
        parsed = [[int(t) for t in row.replace(" ", "").split(",") if t] for row in rows]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integer token ids, got {rows!r}") from None
    lengths = sorted({len(r) for r in parsed})
    if len(lengths) != 1 or lengths[0] == 0:
        raise UsageError(f"{flag}: every prompt needs the same, nonzero number of ids, got lengths {[len(r) for r in parsed]}")
    return torch.tensor(parsed, dtype=torch.long)


def resolve_prompts(args: Any, model: Any) -> tuple[Any, Any]:
    """``(clean, corrupted)``: texts or id tensors, one kind each, the same count."""
    from bilinear_lens.circuits.prompts import check_prompt_pair, prompt_tokens

    pairs = []
    for name, texts, ids in (("clean", args.clean, args.clean_ids), ("corrupt", args.corrupt, args.corrupt_ids)):
        if bool(texts) == bool(ids):
            raise UsageError(f"give --{name} (texts) or --{name}-ids (token ids), exactly one of them")
        pairs.append(texts if texts else _ids(f"--{name}-ids", ids))
    try:
        clean = prompt_tokens(model, pairs[0], "--clean")
        corrupted = prompt_tokens(model, pairs[1], "--corrupt")
        check_prompt_pair(clean, corrupted)
        for tokens in (clean, corrupted):
            model._check_tokens(tokens)  # ids in the vocabulary, at most n_ctx positions
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not -clean.shape[1] <= args.position < clean.shape[1]:
        raise UsageError(f"--position {args.position} is out of range for prompts of {clean.shape[1]} tokens")
    return clean, corrupted


def resolve_metric(args: Any, model: Any) -> tuple[str, Callable[[torch.Tensor], torch.Tensor], Any]:
    """``(label, metric, direction spec)``: the logit of ``--token`` or the logit difference of
    ``--logit-diff`` at ``--position``, per prompt (``[batch]``). SAE features are refused:
    a patching metric reads the logits."""
    label, spec = resolve_direction_arguments(args, model)[0]
    if not isinstance(spec, (int, tuple)):
        raise UsageError("circuit metrics read the logits: give --token(-id) or --logit-diff(-id), not --sae/--feature")
    pos = args.position
    if isinstance(spec, tuple):
        a, b = spec
        return label, (lambda logits: logits[:, pos, a] - logits[:, pos, b]), spec
    return label, (lambda logits: logits[:, pos, spec]), spec


def to_list(t: Any) -> Any:
    return t.detach().cpu().tolist() if isinstance(t, torch.Tensor) else t


OUT_SUFFIXES = (".json", ".html")


def check_out(path: Any) -> None:
    """Refuse an ``--out`` that is neither ``.json`` nor ``.html`` before any work is done."""
    if path is not None and Path(path).suffix not in OUT_SUFFIXES:
        raise UsageError(f"--out {path}: the file must end in .json or .html")


def write_output(path: str, payload: dict, heatmap: Any) -> None:
    """``--out``: ``.json`` (the payload) or ``.html`` (the heatmap page), written atomically."""
    from bilinear_lens.files.atomic import atomic_write_text

    check_out(path)
    text = json.dumps(payload, indent=1) + "\n" if Path(path).suffix == ".json" else heatmap.to_html(full_page=True)
    atomic_write_text(path, text)
