"""The one bounded cache type: a ceiling on entries and on the size of each entry.

Every cache that a request or an identity provider can add to is one of these, so that memory is
bounded in bytes and not only in entries: an entry larger than ``max_entry_size`` (in characters
or bytes, as the caller measures it) is never kept, so the whole cache holds at most
``max_entries * max_entry_size`` of such data. When full, the oldest entry makes room (first in,
first out), or with ``lru=True`` the least recently used one: no request pays for clearing the
whole cache, and no single pattern of requests can grow it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BoundedCache"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    __slots__ = ("_entries", "get", "max_entries", "max_entry_size")

    def __init__(self, max_entries: int, max_entry_size: int, *, lru: bool = False) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()
        self.max_entries = max_entries
        self.max_entry_size = max_entry_size
        # The value for a key, or None. First in, first out: the dict's own lookup, as fast as a
        # plain dict's (it is on every check's path); least recently used: a lookup that also
        # marks the entry as used.
        self.get: Callable[[K], V | None] = self._used if lru else self._entries.get

    def _used(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V, size: int) -> bool:
        """Keep ``value`` unless ``size`` is over the entry ceiling; True when kept."""
        if size > self.max_entry_size:
            return False
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
        elif len(entries) >= self.max_entries:
            entries.popitem(last=False)
        entries[key] = value
        return True

    def values(self) -> list[V]:
        return list(self._entries.values())

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
