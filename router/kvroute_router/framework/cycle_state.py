"""Per-request scratch space shared by the plugins of one scheduling cycle (and the hooks
around it): a plugin writes what it computed (e.g. the prompt's block hashes) so later
plugins and the post-dispatch step reuse it instead of recomputing."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


class CycleState:
    """A typed key-value store living for one request."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}

    def write(self, key: str, value: Any) -> None:
        self._data[key] = value

    def read(self, key: str, kind: type[T]) -> T | None:
        """The value under ``key`` if it is a ``kind``, else None."""
        value = self._data.get(key)
        return value if isinstance(value, kind) else None

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def keys(self) -> list[str]:
        return list(self._data)
