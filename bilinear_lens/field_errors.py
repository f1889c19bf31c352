"""Errors that name a library parameter, so a command can name its own flag instead.

A library function says ``k must be in [1, 24] (d_model), got 25``; the ``eigen`` command,
which took ``k`` from ``--top``, prints ``--top must be in [1, 24] (d_model), got 25``. The
message is a template with one ``{field}`` placeholder per parameter it names:

    err.fields               ("k",)                         the parameters named, in order
    err.field                "k"                            the first
    str(err)                 template with the library's names ("k", "resume=True", ...)
    err.message(flags)       template with ``flags[field]`` where given ({"k": "--top"});
                             a FieldError (a bad value) says ``k (--top)``
"""

from __future__ import annotations

from typing import Mapping, Optional


def literal(text: str) -> str:
    """``text`` as literal template text (braces doubled, so paths and values stay verbatim)."""
    return text.replace("{", "{{").replace("}", "}}")


class FieldMessage(Exception):
    """An exception whose message names parameters (module docstring). ``names``: each
    field's library wording (default: the field itself)."""

    def __init__(self, template: str, fields: tuple[str, ...], names: Optional[Mapping[str, str]] = None):
        self.template, self.fields = template, tuple(fields)
        self.field: Optional[str] = self.fields[0] if self.fields else None
        self.library_names = {f: (names or {}).get(f, f) for f in self.fields}
        super().__init__(self.message())

    def message(self, names: Optional[Mapping[str, str]] = None) -> str:
        """The message with ``names[field]`` (e.g. a CLI flag) for each field it has, the
        library wording for the rest."""
        return self.template.format(**{f: (names or {}).get(f, lib) for f, lib in self.library_names.items()})


class FieldError(FieldMessage, ValueError):
    """A bad argument value: ``ValueError`` naming the parameter (``field``) and the value.
    :meth:`message` names both the parameter and the flag (``k (--top) must be ...``): the
    user who typed ``--top`` sees it, and the parameter ties the line to the library's docs."""

    def message(self, names: Optional[Mapping[str, str]] = None) -> str:
        given = {f: f"{self.library_names[f]} ({flag})" for f, flag in (names or {}).items() if f in self.library_names}
        return super().message(given)

    @classmethod
    def from_prefixed(cls, field: str, err: Exception) -> "FieldError":
        """``err`` (a message starting with ``field``, as ``resolve_device`` and
        ``check_eigh_dtype`` write them for ``what=field``) as a :class:`FieldError`."""
        text = str(err)
        rest = text[len(field):] if text.startswith(field) else ": " + text
        return cls("{" + field + "}" + literal(rest), (field,))


def message_for(err: BaseException, names: Mapping[str, str]) -> str:
    """``err``'s message with ``names`` (flags) for the fields it names; other errors as they are."""
    return err.message(names) if isinstance(err, FieldMessage) else str(err)
