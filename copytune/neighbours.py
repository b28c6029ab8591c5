"""The nearest tuned bucket: what a signature nobody tuned yet is served with while it tunes off the step.

Two signatures are neighbours when they have the same copies of the same itemsizes and layouts: a batch of 48 rows
meets the winner tuned for 32 or 64 rather than the untuned default. Distance is the sum over copies of how many
powers of two the rows, the columns and the alignments are apart. Alignment is a distance, not a class: an engine's
page table is ``[bs, max_len]`` with max_len the step's longest sequence, so its row stride is 4-, 8- or 16-byte
aligned from step to step, and a winner's parameters run at any alignment (the strategies derive vector widths
from the addresses they are bound to).
"""

from __future__ import annotations

from collections.abc import Iterable


def shape_class(signature: Iterable) -> tuple:
    """What must match exactly: per copy (itemsize, layout)."""
    return tuple((itemsize, layout) for itemsize, layout, _, _, _ in signature)


def sizes(signature: Iterable) -> tuple:
    """What may differ: per copy (rows, columns, alignment) as powers of two (bucket 0 counts as 2**-1)."""
    return tuple((_log2(rows), _log2(cols), _log2(align)) for _, _, rows, cols, align in signature)


def distance(a: tuple, b: tuple) -> int:
    return sum(abs(x - y) for copy_a, copy_b in zip(a, b) for x, y in zip(copy_a, copy_b))


class Neighbours:
    """Tuned choices by shape class, for ``nearest``. Not thread-safe by itself: the dispatcher holds its lock."""

    def __init__(self):
        self._by_class: dict[tuple, dict[tuple, object]] = {}

    def add(self, signature, choice) -> str | None:
        """Make ``choice`` the neighbour for ``signature``; the reason when the signature cannot be read (a
        hand-edited or foreign cache row), and then nothing changes."""
        try:
            cls, at = shape_class(signature), sizes(signature)
            hash(cls)
        except (TypeError, ValueError, AttributeError) as exc:
            return f"{type(exc).__name__}: {exc}"
        self._by_class.setdefault(cls, {})[at] = choice
        return None

    def nearest(self, signature, usable=lambda choice: True):
        """The usable choice of the nearest tuned bucket of ``signature``'s class, or None."""
        found = self._by_class.get(shape_class(signature))
        if not found:
            return None
        here = sizes(signature)
        for _, choice in sorted(found.items(), key=lambda item: distance(item[0], here)):
            if usable(choice):
                return choice
        return None


def _log2(bucket: int) -> int:
    return bucket.bit_length() - 1 if bucket > 0 else -1
