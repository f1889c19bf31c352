"""Hook types of the ablation package and the context-manager form of a hook factory."""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union

from torch import Tensor

from bilinear_lens.models.protocol import HookedModel

HookFn = Callable[..., Optional[Tensor]]
FwdHook = tuple[str, HookFn]
HookFactory = Callable[..., Union[FwdHook, list[FwdHook]]]


def context_manager_form(factory: HookFactory, name: str, doc: str) -> Callable[..., Any]:
    """A context manager ``name`` taking ``factory``'s arguments: every forward pass inside
    runs with the hook(s) ``factory(model, ...)`` returns installed (``model.hooks``),
    removed on exit. ``functools.wraps`` keeps the factory's signature for ``help()``."""

    @contextmanager
    @functools.wraps(factory)
    def installed(model: HookedModel, *args: Any, **kwargs: Any) -> Iterator[None]:
        hooks = factory(model, *args, **kwargs)
        with model.hooks(fwd_hooks=hooks if isinstance(hooks, list) else [hooks]):
            yield

    installed.__name__ = installed.__qualname__ = name
    installed.__signature__ = inspect.signature(factory).replace(return_annotation="Iterator[None]")  # type: ignore[attr-defined]
    installed.__doc__ = doc
    return installed
