"""Route path templates (``/{id}/items/{rest*}``), parsed once and matched in linear time.

A template is a list of segments. A segment is literal text with ``{name}`` placeholders, each
standing for one or more characters other than ``/``; the last segment may instead be
``{name*}``, zero or more whole segments (so ``/admin/{rest*}`` covers ``/admin``, ``/admin/``
and everything below). Matching never uses a regular expression: a segment with placeholders
is matched by finding its literal pieces left to right (the leftmost place for each piece leaves
the most room for the rest, so one pass decides), which is linear in the segment's length however
many dots or repeats a client puts in the path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["RouteTemplate"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\*?)\}")


@dataclass(frozen=True, slots=True)
class _Segment:
    """One template segment: its literal pieces around the placeholders.

    ``pieces`` has one more element than there are placeholders; a segment without placeholders
    is one piece that must equal the path segment.
    """

    pieces: tuple[str, ...]

    def matches(self, segment: str) -> bool:
        pieces = self.pieces
        if len(pieces) == 1:
            return segment == pieces[0]
        first, last = pieces[0], pieces[-1]
        # Each placeholder takes at least one character.
        if len(segment) < sum(map(len, pieces)) + len(pieces) - 1:
            return False
        if not (segment.startswith(first) and segment.endswith(last)):
            return False
        pos = len(first)
        end = len(segment) - len(last)
        for piece in pieces[1:-1]:
            found = segment.find(piece, pos + 1, end - 1)
            if found == -1:
                return False
            pos = found + len(piece)
        return pos < end  # the last placeholder's character(s)


@dataclass(frozen=True, slots=True)
class RouteTemplate:
    """A parsed route path: ``segments`` then, when ``rest`` is true, any number of segments."""

    text: str
    segments: tuple[_Segment, ...]
    rest: bool

    @classmethod
    def parse(cls, template: str) -> RouteTemplate:
        """Parse a route path; ``ValueError`` says what is wrong with it."""
        if not template.startswith("/"):
            raise ValueError("must start with '/'")
        parts = template[1:].split("/")
        segments: list[_Segment] = []
        rest = False
        for i, part in enumerate(parts):
            pieces: list[str] = []
            pos = 0
            for m in _PLACEHOLDER.finditer(part):
                if m.group(2):
                    if m.group(0) != part or i != len(parts) - 1:
                        raise ValueError(
                            f"a {{name*}} placeholder must be the whole last segment: {template!r}"
                        )
                    rest = True
                    break
                pieces.append(part[pos : m.start()])
                pos = m.end()
            if rest:
                break
            pieces.append(part[pos:])
            if any("{" in p or "}" in p for p in pieces):
                raise ValueError(f"bad placeholder in {template!r}")
            segments.append(_Segment(tuple(pieces)))
        return cls(template, tuple(segments), rest)

    @property
    def max_segments(self) -> int:
        """How many leading path segments matching needs to see on their own."""
        return len(self.segments)

    def matches(self, path: str) -> bool:
        """Whether ``path`` (starting with ``/``) matches; cost linear in the path's length."""
        return self.matches_segments(path[1:].split("/", len(self.segments)))

    def matches_segments(self, parts: list[str]) -> bool:
        """Match a path split as ``path[1:].split("/", n)`` with ``n >= max_segments``: the
        leading segments one by one, and any element after them (the unsplit rest) only when
        the template ends in ``{name*}``.

        An empty path below the prefix (``/admin`` under the template ``/admin/{rest*}``) is
        ``parts`` one short of the template's segments and still matches the zero-segment rest.
        """
        segments = self.segments
        n = len(segments)
        if self.rest:
            if len(parts) < n:
                return False
        elif len(parts) != n:
            return False
        return all(s.matches(part) for s, part in zip(segments, parts, strict=False))
