"""A name -> builder registry, as MONAI does it: configs name a builder and pass its parameters."""

from __future__ import annotations

from typing import Callable

from .errors import LungSegError


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable:
        def decorator(builder: Callable) -> Callable:
            self[name] = builder
            return builder

        return decorator

    def build(self, name: str, **params):
        if name not in self:
            raise LungSegError(f"unknown {self.kind} '{name}'; known: {', '.join(sorted(self))}")
        return self[name](**params)
