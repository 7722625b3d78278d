"""Typing helpers: a structural `Array` protocol and a TypeVar so outputs follow inputs."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable


@runtime_checkable
class Array(Protocol):
    """Anything that behaves like an Array-API array."""

    @property
    def shape(self) -> tuple[int | None, ...]: ...

    @property
    def dtype(self) -> Any: ...


ArrayT = TypeVar("ArrayT", bound=Array)
