"""Pieces shared by the subcommands: the usage-error type and exit codes, plain-text help,
checkpoint and text-file loading (one rule for cutting texts into rows), the
``--device``/``--dtype``/``--quiet`` flags, and the output-direction arguments."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Optional, Sequence

from bilinear_lens.data.packing import stream_rows as pack_rows
from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.models.config import DTYPES, TORCH_DTYPES
from bilinear_lens.weights.tensor import EIGH_DTYPES as TENSOR_EIGH_DTYPES


EXIT_USAGE = 2  # bad arguments, recipe/config or inputs (argparse's own convention)
EXIT_FAILURE = 1  # valid inputs, but the work itself failed (e.g. training diverged)


class UsageError(Exception):
    """A problem with the arguments or inputs, reported as ``error: ...`` with exit code 2."""


def report_error(command: str, err: Any, code: int = EXIT_USAGE) -> int:
    """Print ``bilinear-lens COMMAND: error: ERR`` (one line) to stderr and return ``code``:
    :data:`EXIT_USAGE` (2) for usage/config/input errors, :data:`EXIT_FAILURE` (1) for
    runtime failures."""
    print(f"bilinear-lens {command}: error: {err}", file=sys.stderr)
    return code


_ROLE = re.compile(r":(?:[\w.+-]+:)?[\w.+-]+:`([^`]+)`")


def _role_text(match: "re.Match[str]") -> str:
    content = match.group(1).strip()
    if content.endswith(">") and "<" in content:  # `title <target>`
        return content[: content.rindex("<")].strip()
    if content.startswith("~"):  # ~pkg.mod.name: the last component
        return content[1:].rsplit(".", 1)[-1]
    return content.lstrip("!")


def plain_text(doc: str) -> str:
    """A reStructuredText docstring as plain text for ``--help``: a role such as
    ``:func:`~pkg.mod.name``` becomes its target (the last component after ``~``; the
    title of ``title <target>``), double-backtick literals and single-backtick text lose
    their backticks, and a paragraph-ending ``::`` becomes ``:``. Line breaks and
    indentation are kept (the parsers print descriptions verbatim)."""
    text = _ROLE.sub(_role_text, doc)
    text = re.sub(r"``([^`]+?)``", r"\1", text)
    text = re.sub(r"`([^`\n]+)`_{0,2}", r"\1", text)
    text = re.sub(r"(\S)::$", r"\1:", text, flags=re.M)
    text = re.sub(r"\s+::$", "", text, flags=re.M)
    return text.strip("\n")


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


def analysis_parser(command: str, description: str) -> Any:
    """The parser every analysis command starts from: ``prog``, the description (a module
    docstring, shown as :func:`plain_text` with its line breaks) and ``--checkpoint``, the
    model directory (our format, HF Llama or a hub id)."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"bilinear-lens {command}", description=plain_text(description),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="model directory (save_pretrained or HF Llama format, with a tokenizer) or hub id")
    return parser


def read_text_file(path: str) -> str:
    """The UTF-8 text of ``path`` (:func:`bilinear_lens.training.measured_text.read_text_file`);
    a missing or non-UTF-8 file is a :class:`UsageError`."""
    from bilinear_lens.training.measured_text import MeasuredTextError, read_text_file as read_library

    try:
        return read_library(path)
    except MeasuredTextError as err:
        raise UsageError(str(err)) from err


def read_documents(path: str, limit: Optional[int] = None, rule: str = "auto") -> list[str]:
    """The first ``limit`` (``None``: all) documents of ``path`` under the document ``rule``
    training uses (:func:`bilinear_lens.data.documents.split_text`: by default
    ``<|endoftext|>`` lines when present, else the whole file); a file without text is a
    :class:`UsageError`."""
    return documents_of_text(read_text_file(path), path, rule)[:limit]


def documents_of_text(text: str, path: str, rule: str = "auto") -> list[str]:
    """The documents of ``text`` (read from ``path``) under ``rule``; none is a :class:`UsageError`."""
    from bilinear_lens.data.documents import split_text

    documents = split_text(text, rule)
    if not documents:
        raise UsageError(f"text file {path} holds no text")
    return documents


def add_documents_argument(parser: argparse.ArgumentParser) -> None:
    """``--documents RULE``: where a document ends in ``--text-file`` (training's rule)."""
    from bilinear_lens.data.documents import DOCUMENT_RULES

    parser.add_argument("--documents", choices=DOCUMENT_RULES, default="auto",
                        help="where a document ends in --text-file: auto (<|endoftext|> lines if any, else the "
                             "whole file), endoftext, paragraph (each blank-line-separated paragraph), line, file "
                             "(default auto, as training)")


def stream_rows(stream: Sequence[int], length: int, flag: str = "--seq-len") -> tuple[Any, int]:
    """:func:`bilinear_lens.data.packing.stream_rows` for a command: a stream shorter than one
    row is a :class:`UsageError` naming ``flag``."""
    try:
        return pack_rows(stream, length, flag)
    except ValueError as err:
        raise UsageError(str(err)) from None


# ---- --device / --dtype / --quiet: shared by the analysis commands (eigen, ablate, polytope, report)

# What a command that eigendecomposes can compute in (eigen, report): the weight analysis'
# own list (torch.linalg.eigh has no float16 or bfloat16 kernel, CPU or CUDA), by name.
EIGH_DTYPES = tuple(str(dtype).removeprefix("torch.") for dtype in TENSOR_EIGH_DTYPES)


def add_device_args(parser: Any, dtypes: Sequence[str] = DTYPES) -> None:
    """Add ``--device`` (auto/cpu/cuda/cuda:N), ``--dtype`` and ``--quiet`` to ``parser``.

    ``--dtype`` accepts only ``dtypes`` (default: every model dtype; commands that
    eigendecompose pass :data:`EIGH_DTYPES`): argparse refuses any other value, naming
    ``--dtype`` and the value, with exit code 2 before any work is done or file written."""
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or "float32" not in dtypes:
        raise ValueError(f"dtypes must be among {', '.join(DTYPES)} and include float32 (the default), got {list(dtypes)}")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=tuple(dtypes),
                        help=f"compute dtype: {', '.join(dtypes)} (default float32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_device(args: Any) -> tuple[Any, Any]:
    """``(torch.device, torch.dtype)`` from ``args.device`` / ``args.dtype`` by the rule of
    :func:`bilinear_lens.distributed.resolve_device` (under torchrun ``cuda`` is each rank's
    own GPU); bad values are a one-line :class:`UsageError` naming the flag, the value and
    what is allowed."""
    from bilinear_lens.distributed import resolve_device as resolve_device_name

    try:
        device = resolve_device_name(args.device, what="--device")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.dtype not in TORCH_DTYPES:
        raise UsageError(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPES)}")
    return device, TORCH_DTYPES[args.dtype]


def place_model(model: Any, args: Any) -> Any:
    """``model`` moved to ``--device`` in ``--dtype`` (see :func:`resolve_device`)."""
    device, dtype = resolve_device(args)
    return model.to(device=device, dtype=dtype)


# ---- counts and output-direction arguments (eigen, ablate, report) ----
# One place for --token/--token-id/--logit-diff/--sae/--feature and the input-token/-SAE
# arguments, so every command reads them by the same rule: a --token is always text that
# must be exactly one token (ids only through --token-id); nothing falls back silently.
# Counts are checked by one rule too (require_positive).


def require_at_least(args: Any, minimum: int, *names: str) -> None:
    """:class:`UsageError` ``--name must be >= MINIMUM, got V`` for the first integer option
    (attribute name) below ``minimum``; ``None`` (option not given, no default) passes."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def require_positive(args: Any, *names: str) -> None:
    """:class:`UsageError` ``--name must be >= 1, got V`` for the first integer option
    (attribute name) below 1; ``None`` (option not given, no default) passes."""
    require_at_least(args, 1, *names)


def require_non_negative(args: Any, *names: str) -> None:
    """:class:`UsageError` ``--name must be >= 0, got V`` for the first integer option
    (attribute name) below 0; ``None`` passes."""
    require_at_least(args, 0, *names)


def add_direction_arguments(parser: Any, input_tokens: bool = False, input_sae: bool = False) -> None:
    """Add the output-direction options (repeatable; commands that take one direction check
    the count in :func:`resolve_direction_arguments`) and optionally the input-basis ones."""
    group = parser.add_argument_group("output direction")
    group.add_argument("--token", action="append", default=[], metavar="TEXT",
                       help='output token as text, exactly one token (mind the space: " happy"; "42" is the text 42)')
    group.add_argument("--token-id", action="append", default=[], type=int, metavar="ID", help="output token by id")
    group.add_argument("--logit-diff", nargs=2, metavar=("A", "B"), help="direction logit[A] - logit[B] (token texts)")
    group.add_argument("--logit-diff-id", nargs=2, type=int, metavar=("A", "B"), help="the same, by token ids")
    group.add_argument("--sae", metavar="DIR", help="SAE directory (SAELens format) whose --feature is the direction")
    group.add_argument("--feature", action="append", default=[], type=int, metavar="N", help="feature index of --sae")
    group.add_argument("--feature-read", choices=("decoder", "encoder"), default="decoder",
                       help="the feature's decoder row (what it writes, default) or encoder column (what reads it)")
    if input_tokens:
        group.add_argument("--input-token", action="append", default=[], metavar="TEXT", help="input token as text (repeatable)")
        group.add_argument("--input-token-id", action="append", default=[], type=int, metavar="ID", help="input token by id")
    if input_sae:
        group.add_argument("--input-sae", metavar="DIR", help="SAE whose features name the eigenvectors' inputs")
        group.add_argument("--n-input-features", type=int, default=8, help="input features per pole")


def _token_ids(model: Any, flag: str, texts: list[str], ids: list[int]) -> list[int]:
    from bilinear_lens.weights.directions import token_id

    out = []
    for value in [*texts, *ids]:
        try:
            out.append(token_id(model, value))
        except (ValueError, TypeError) as err:
            raise UsageError(f"--{flag}{'-id' if isinstance(value, int) else ''} {value!r}: {err}") from None
    return out


def load_sae_argument(path: str, model: Any, flag: str = "--sae") -> Any:
    """An SAE directory checked against ``model``; any problem is a :class:`UsageError`."""
    from bilinear_lens.sae.model import load_sae

    try:
        return load_sae(path, model=model)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"{flag} {path}: {err}") from None


def resolve_direction_arguments(
    args: Any, model: Any, several: bool = False, required: bool = True
) -> list[tuple[str, Any]]:
    """``(label, spec)`` for every output direction given (spec as
    :func:`~bilinear_lens.weights.directions.resolve_direction` takes it: a token id, an id
    pair, a ``FeatureDirection``), each checked to resolve to a nonzero direction.
    ``several=False``: at most one; ``required``: at least one."""
    from bilinear_lens.weights.directions import FeatureDirection, resolve_direction

    found = [(repr(model.tokenizer.decode([t])) if model.tokenizer else str(t), t)
             for t in _token_ids(model, "token", args.token, args.token_id)]
    pair = args.logit_diff or args.logit_diff_id
    if args.logit_diff and args.logit_diff_id:
        raise UsageError("give --logit-diff or --logit-diff-id, not both")
    if pair:
        a, b = _token_ids(model, "logit-diff", *((list(pair), []) if args.logit_diff else ([], list(pair))))
        found.append((f"logit[{pair[0]!r}] - logit[{pair[1]!r}]", (a, b)))
    if bool(args.sae) != bool(args.feature):
        raise UsageError("--sae and --feature go together: an SAE directory and the feature index(es) in it")
    if args.sae:
        sae = load_sae_argument(args.sae, model)
        found += [(f"feature {i} of {args.sae}", FeatureDirection(sae, i, args.feature_read)) for i in args.feature]
    if not found and required:
        raise UsageError("give an output direction: --token, --token-id, --logit-diff(-id), or --sae with --feature")
    if not several and len(found) > 1:
        raise UsageError(f"give one output direction, got {len(found)}: {', '.join(label for label, _ in found)}")
    for label, spec in found:
        try:
            resolve_direction(model, spec)
        except ValueError as err:
            raise UsageError(f"output direction {label}: {err}") from None
    return found


def resolve_input_token_arguments(args: Any, model: Any) -> Optional[list[int]]:
    """Ids of ``--input-token``/``--input-token-id`` (``None`` when neither was given)."""
    if not args.input_token and not args.input_token_id:
        return None
    return _token_ids(model, "input-token", args.input_token, args.input_token_id)


def warn_special_token_text(tokenizer: Any, path: Optional[str], command: str, documents: str = "auto") -> None:
    """One ``warning:`` line on stderr per special token (``<|endoftext|>``...) whose text
    occurs literally inside the documents of text file ``path`` (``documents``: the rule
    that splits it, :func:`~bilinear_lens.data.documents.split_text`): the tokenizer reads it as
    that special token (one id), not as the characters (documented behaviour: the text is
    not escaped). Separator lines the rule consumes are not counted: they are not text."""
    if path is None:
        return
    from bilinear_lens.data.documents import split_text

    inside = split_text(read_text_file(path), documents)
    for token in getattr(tokenizer, "all_special_tokens", []) or []:
        count = sum(document.count(token) for document in inside) if token else 0
        if count:
            print(f"bilinear-lens {command}: warning: text file {path} holds the literal {token!r} {count} time(s) "
                  f"inside its documents (--documents {documents}); it is read as the special token "
                  f"(id {tokenizer.convert_tokens_to_ids(token)}), not as text",
                  file=sys.stderr)
