"""Old keyword names that still work for one release: renamed when `layer` came to mean a
hidden_states index everywhere and `block` the block whose output a steering vector is added to.

    @old_keywords(layer="block")
    def load_vector(path, *, block=None): ...

    load_vector("v.npy", layer=3)   # DeprecationWarning, then load_vector("v.npy", block=3)

On a class, the decorator wraps its ``__init__`` (put it above ``@dataclasses.dataclass``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=Callable)


def old_keywords(**renamed: str) -> Callable[[T], T]:
    """Decorator: a call that uses an old keyword (``old="new"`` pairs) is passed on under the
    new name, with a DeprecationWarning pointing at the caller; old and new together are a
    TypeError."""

    def decorate(target: T) -> T:
        if isinstance(target, type):
            target.__init__ = decorate(target.__init__)
            return target
        name = target.__qualname__.removesuffix(".__init__")

        @functools.wraps(target)
        def call(*args, **kwargs):
            for old, new in renamed.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{name}: got {new}= and its old name {old}=; pass only {new}=")
                warnings.warn(
                    f"{name}: the keyword {old}= is deprecated, use {new}= (same meaning)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return target(*args, **kwargs)

        return call  # type: ignore[return-value]

    return decorate


def old_name(function: T, old: str) -> T:
    """`function` under its old name `old`: the same call, with a DeprecationWarning."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        warnings.warn(
            f"{old} is deprecated, use {function.__name__} (same arguments)",
            DeprecationWarning,
            stacklevel=2,
        )
        return function(*args, **kwargs)

    call.__name__ = call.__qualname__ = old
    call.__doc__ = f"The old name of `{function.__name__}` (deprecated)."
    return call  # type: ignore[return-value]


def renamed_field(row: dict, old: str, new: str) -> dict:
    """A row read from a file written before a field was renamed: its `old` field named `new`
    (in place of it, the order kept); rows that already have `new` come back as they are."""
    if new in row or old not in row:
        return row
    return {(new if k == old else k): v for k, v in row.items()}
