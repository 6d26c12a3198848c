"""Named parts by family: one small `Registry` behind every `register_*` decorator of forkrl.

Each family of interchangeable parts is a `Registry` holding its parts by name: advantage
estimators (`forkrl.algo.advantages`), policy losses and loss normalizers (`forkrl.algo.losses`),
selection strategies (`forkrl.ops.token_ranking`) and scopes (`forkrl.algo.selection`), rewards
(`forkrl.tasks.rewards`) and rollout backends (`forkrl.rollout.registry`). A part is added with
the family's decorator (`@register_advantage("rloo")`), or by import path (`register_lazy(name,
"package.module:attribute")`), which imports the module only when the part is first asked for:
that is how a family names parts whose modules import the family's own module (the forecast
rewards subclass `BatchReward`), without an import circle.

An unknown name raises `ValueError` with one text for every family:
"unknown <family> '<name>'; registered: [<names, sorted>]".
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def import_attribute(path: str) -> object:
    """The object at `package.module:attribute` (the attribute may be dotted: `module:Class.method`)."""
    module, _, attribute = path.partition(":")
    obj: object = importlib.import_module(module)
    for name in attribute.split("."):
        obj = getattr(obj, name)
    return obj


class _Lazy:
    """A part registered by import path, imported when first looked up."""

    def __init__(self, path: str):
        self.path = path


class Registry(Generic[T]):
    """Parts of one family by name; reads like a dict (`in`, `[]`, iteration, `del`)."""

    def __init__(self, family: str, hint: str = ""):
        self.family = family
        """Names the family in errors: `unknown <family> 'x'`."""
        self.hint = hint
        """Appended to the unknown-name error (e.g. that an import path works too)."""
        self._parts: dict[str, T | _Lazy] = {}

    def register(self, name: str, part: T | None = None):
        """Add `part` as `name`: `registry.register(name, part)`, or `@registry.register(name)`."""

        def add(part: T) -> T:
            self._parts[name] = part
            return part

        return add if part is None else add(part)

    def register_lazy(self, name: str, path: str) -> None:
        """Add the object at `package.module:attribute` as `name`, imported on first lookup."""
        self._parts[name] = _Lazy(path)

    def get(self, name: str) -> T:
        """The part `name`; `ValueError` naming the registered ones when there is none."""
        if name not in self._parts:
            raise ValueError(self.unknown(name))
        return self[name]

    def unknown(self, name: str) -> str:
        """The error text for a name that is not registered."""
        return f"unknown {self.family} {name!r}; registered: {sorted(self._parts)}{self.hint}"

    def __getitem__(self, name: str) -> T:
        part = self._parts[name]
        if isinstance(part, _Lazy):
            part = self._parts[name] = import_attribute(part.path)
        return part

    def __setitem__(self, name: str, part: T) -> None:
        self._parts[name] = part

    def __delitem__(self, name: str) -> None:
        del self._parts[name]

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self[name]) for name in self._parts]
