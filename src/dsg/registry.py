"""Name -> class registries: how SAE architectures, SAE file formats, latent scorers, unlearning methods and
evaluation suites are found by the name a user types.

    SCORERS = Registry("latent scorer")

    @SCORERS.register("ratio")
    class RatioScorer: ...

    SCORERS["ratio"]          # the class; an unknown name is a DSGError listing the known ones

Adding one of those things is one file plus one registration line (the decorator) and one import in its
package's `__init__`, so that the module runs and registers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import DSGError

T = TypeVar("T")


class Registry(Generic[T]):
    """Things registered under unique names, in registration order."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"A {self.what} named {name!r} is registered twice.")
            self._items[name] = item
            return item

        return add

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise DSGError(f"Unknown {self.what} {name!r}; expected one of {', '.join(self._items)}.") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def items(self):
        return self._items.items()

    def values(self):
        return self._items.values()
