"""``DataError``: a dataset problem, named by file and line."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad data: a missing or malformed metadata file, a missing or undecodable image, a box
    outside its image, a label out of range. The message starts with ``path:line:`` (or the
    path alone when no line applies), so the first problem can be fixed where it is."""
