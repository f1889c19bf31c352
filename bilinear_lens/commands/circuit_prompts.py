"""What the ``circuit`` commands share. ``circuit patch`` and ``circuit attribute``: the
clean/corrupted prompt flags, loading the model with those prompts and the metric from the
output-direction flags (:func:`load_patching_inputs`), and writing results (JSON or an HTML
heatmap), and their ``main`` (:func:`run_command`). ``circuit graph`` and ``circuit pairs``: the one-prompt ``--text``/``--ids`` flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from bilinear_lens.commands.common import (
    UsageError,
    load_model_with_tokenizer,
    place_model,
    report_error,
    resolve_direction_arguments,
)


def add_one_prompt_arguments(parser: Any, text_help: str) -> None:
    """``--text`` or ``--ids`` (exactly one): the single prompt of ``circuit graph``/``circuit pairs``."""
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--text", help=text_help)
    prompt.add_argument("--ids", type=int, nargs="+", metavar="ID", help="the prompt as token ids")


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
    from bilinear_lens.circuits.prompts import prompt_pair_tokens

    pairs = []
    for name, texts, ids in (("clean", args.clean, args.clean_ids), ("corrupt", args.corrupt, args.corrupt_ids)):
        if bool(texts) == bool(ids):
            raise UsageError(f"give --{name} (texts) or --{name}-ids (token ids), exactly one of them")
        pairs.append(texts if texts else _ids(f"--{name}-ids", ids))
    try:
        clean, corrupted = prompt_pair_tokens(model, pairs[0], pairs[1], ("--clean", "--corrupt"))
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


def load_patching_inputs(args: Any, command: str) -> tuple[Any, torch.Tensor, torch.Tensor, str, Callable, Any]:
    """``(model, clean, corrupted, label, metric, spec)`` for ``circuit patch``/``attribute``:
    the placed model, the prompt ids on its device (:func:`resolve_prompts`) and the metric
    (:func:`resolve_metric`)."""
    model = place_model(load_model_with_tokenizer(args.checkpoint, command), args)
    clean, corrupted = resolve_prompts(args, model)
    device = model.embed.weight.device
    label, metric, spec = resolve_metric(args, model)
    return model, clean.to(device), corrupted.to(device), label, metric, spec


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


def run_command(argv: Any, parser: Any, run: Callable[[Any], dict], command: str,
                print_text: Callable[[Any, dict], None]) -> int:
    """A patching command's ``main``: parse ``argv``, ``run`` it (a ``UsageError`` or
    ``ValueError`` exits with code 2, one line), then print the payload as one JSON object
    (``--json``) or as ``print_text(args, payload)``; 0 on success."""
    args = parser.parse_args(argv)
    try:
        payload = run(args)
    except (UsageError, ValueError) as err:
        return report_error(command, err)
    if args.json:
        print(json.dumps(payload))
    else:
        print_text(args, payload)
    return 0
