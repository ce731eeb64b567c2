"""The one bounded cache type: a ceiling on entries and on the size of each entry.

Every cache that a request can add to is one of these, so that memory is bounded in bytes and not
only in entries: an entry larger than ``max_entry_size`` (in characters or bytes, as the caller
measures it) is never kept, so the whole cache holds at most ``max_entries * max_entry_size`` of
request data. When full, the oldest entry makes room (first in, first out): no request pays for
clearing the whole cache, and no single pattern of requests can grow it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["BoundedCache"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    __slots__ = ("_entries", "max_entries", "max_entry_size")

    def __init__(self, max_entries: int, max_entry_size: int) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()
        self.max_entries = max_entries
        self.max_entry_size = max_entry_size

    def get(self, key: K, default: V | None = None) -> V | None:
        return self._entries.get(key, default)

    def put(self, key: K, value: V, size: int) -> bool:
        """Keep ``value`` unless ``size`` is over the entry ceiling; True when kept."""
        if size > self.max_entry_size:
            return False
        entries = self._entries
        if key not in entries and len(entries) >= self.max_entries:
            entries.popitem(last=False)
        entries[key] = value
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
