"""Name -> class registries filled by class decorators: the upsamplers and the training objectives.

A class defined anywhere (featlift, a user's module, a test file) joins one by being decorated; a name is
taken once (registering the same class again is a no-op, another class under a taken name is refused).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import FeatliftError

C = TypeVar("C", bound=type)


class Registry(Generic[C]):
    """Classes of one `base` by name. `kind` names them in errors ("upsampler", "training objective")."""

    def __init__(self, kind: str, base: type, check: Callable[[type, str], None] | None = None):
        self.kind = kind
        self.base = base
        self.check = check  # extra checks of a class before it is registered: check(cls, name)
        self._classes: dict[str, C] = {}

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator: register the class under `name` and set its ``name`` attribute."""

        def decorate(cls: C) -> C:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise FeatliftError(f"{self.kind} {name!r}: {cls!r} is no subclass of {self.base.__name__}")
            if name in self._classes and self._classes[name] is not cls:
                raise FeatliftError(
                    f"{self.kind} {name!r} is already registered by {self._classes[name].__qualname__}"
                )
            if self.check is not None:
                self.check(cls, name)
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorate

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> C:
        try:
            return self._classes[name]
        except KeyError:
            raise FeatliftError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            ) from None

    def unregister(self, name: str) -> None:
        """Forget `name` (for tests that register throw-away classes)."""
        self._classes.pop(name, None)
