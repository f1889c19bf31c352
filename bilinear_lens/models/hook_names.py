"""Hook-name validation shared by our model and analysis code that runs on bridges."""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping


class UnknownHookError(KeyError):
    """A hook name that the model does not have. The message lists close matches."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def check_hook_names(hook_dict: Mapping[str, Any], names: Iterable[str], where: str = "model") -> None:
    """Raise :class:`UnknownHookError` for the first name not in ``hook_dict``."""
    for name in names:
        if name not in hook_dict:
            close = difflib.get_close_matches(name, list(hook_dict), n=3, cutoff=0.6)
            hint = f"; did you mean {close}?" if close else ""
            raise UnknownHookError(
                f"unknown hook name {name!r} on {where}{hint} ({len(hook_dict)} hook points; "
                f"list them with `list(model.hook_dict)`)"
            )
