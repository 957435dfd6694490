"""One small generic registry: name -> object, with close-match suggestions for unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from kdforge.errors import RecipeError

T = TypeVar("T")


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """' (did you mean: a, b?)' for the closest candidates, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


class Registry(Generic[T]):
    """Maps names to objects. `kind` names what is registered, for error messages ("dataset", "loss")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise RecipeError(
                f"unknown {self.kind} {name!r}{suggest(name, self._items)}; known: {known}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
