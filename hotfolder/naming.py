"""Which names a job's outputs get: the output templates, NAME_MAX, and what happens when two
different inputs would give the same output name.

``item.jpg`` and ``item.png`` in one folder both give ``item.png`` by the default template, and
so do ``x_y.jpg`` and ``x<newline>y.jpg`` once the newline is made safe. The collision policy
decides, per inbox:

- ``suffix`` (the default, loses nothing): the first input keeps ``item.png``, the next one gets
  ``item-2.png``, ``item-2.mask.png`` … (one number for its whole output set);
- ``replace``: the newest input's outputs replace the older ones (hotfolder before 0.3);
- ``error``: the second input is refused with the reason ``name_collision``.

Whatever the policy, a re-upload of the *same* input (same inbox, same path inside it) replaces
its own earlier outputs. Who owns a name is asked of a :class:`NameRegistry` (the journal keeps
one row per output name): a name is free for an input if nobody has registered it and no file
holds it, or if that input itself registered it.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath
from typing import Protocol

from hotfolder import names, recipes

MAX_SUFFIX = 999  # item-2 … item-999; past that the input is refused rather than searched on


class Collision(enum.StrEnum):
    SUFFIX = "suffix"
    REPLACE = "replace"
    ERROR = "error"


class NameCollisionError(Exception):
    """No output name is free for this input under its inbox's policy."""


class NameRegistry(Protocol):
    def reserve(self, owner: str, names: Sequence[str], taken: Callable[[str], bool]) -> bool:
        """Register ``names`` to ``owner`` in one atomic step, unless one of them belongs to
        another owner, or has no owner but ``taken(name)`` (a file nobody registered). True
        when every name is now ``owner``'s."""
        ...

    def assign(self, owner: str, names: Sequence[str]) -> None:
        """Register ``names`` to ``owner``, whoever had them."""
        ...


def candidate(outputs: Sequence[recipes.Output], relative: str, number: int) -> list[PurePosixPath]:
    """The output paths (relative to the outbox) of the input at ``relative`` (a POSIX path
    inside the inbox) with collision number ``number``: 1 is the plain name, 2 adds ``-2``."""
    folder = PurePosixPath(relative).parent
    stem, ext = os.path.splitext(PurePosixPath(relative).name)
    tag = "" if number == 1 else f"-{number}"
    return [folder / output.filename(stem, ext, tag) for output in outputs]


def choose(
    outputs: Sequence[recipes.Output],
    relative: str,
    policy: Collision,
    owner: str,
    registry: NameRegistry,
    key: Callable[[PurePosixPath], str],
    taken: Callable[[str], bool],
) -> list[PurePosixPath]:
    """The output paths for one input, registered to ``owner`` in ``registry``.

    ``key`` turns an output path into the registry's text key; ``taken(key)`` says whether a file
    holds that name on disk. Raises :class:`NameCollisionError` when the policy allows no name.
    """
    if policy == Collision.REPLACE:
        paths = candidate(outputs, relative, 1)
        registry.assign(owner, [key(p) for p in paths])
        return paths
    last = 1 if policy == Collision.ERROR else MAX_SUFFIX
    for number in range(1, last + 1):
        paths = candidate(outputs, relative, number)
        if registry.reserve(owner, [key(p) for p in paths], taken):
            return paths
    first = ", ".join(names.escape(str(p)) for p in candidate(outputs, relative, 1))
    if policy == Collision.ERROR:
        raise NameCollisionError(f"its output name is taken by another input ({first})")
    raise NameCollisionError(
        f"its output names ({first}) and {MAX_SUFFIX - 1} numbered ones are taken"
    )


class MemoryRegistry:
    """A registry for one command's run (``hotfolder matte``): names live as long as it does."""

    def __init__(self) -> None:
        self.owners: dict[str, str] = {}

    def reserve(self, owner: str, names: Sequence[str], taken: Callable[[str], bool]) -> bool:
        for name in names:
            holder = self.owners.get(name)
            if (holder is None and taken(name)) or holder not in (None, owner):
                return False
        self.assign(owner, names)
        return True

    def assign(self, owner: str, names: Sequence[str]) -> None:
        self.owners.update(dict.fromkeys(names, owner))
