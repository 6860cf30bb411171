"""A thin, strict name -> constructor registry (timm's decorator style)."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Generic, List, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case names to constructors.

    ``build(name, **kwargs)`` raises ``KeyError`` naming the unknown name and the known ones, and
    ``TypeError`` naming any keyword the constructor does not accept (never silently dropped).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Callable[..., T]] = {}

    def register(self, *names: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(obj: Callable[..., T]) -> Callable[..., T]:
            for name in names:
                key = name.lower()
                if key in self._entries:
                    raise KeyError(f"{self.kind} '{key}' is registered twice")
                self._entries[key] = obj
            return obj

        return decorator

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name.lower()]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{name}'; known: {self.names()}") from None

    def build(self, name: str, **kwargs: Any) -> T:
        constructor = self.get(name)
        check_kwargs(constructor, kwargs, f"{self.kind} '{name}'")
        return constructor(**kwargs)


def check_kwargs(constructor: Callable[..., Any], kwargs: Dict[str, Any], what: str) -> None:
    """Raise ``TypeError`` if ``constructor`` does not accept every key of ``kwargs``."""
    try:
        params = inspect.signature(constructor).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"{what} got unknown argument(s) {unknown}; accepted: {accepted}")
