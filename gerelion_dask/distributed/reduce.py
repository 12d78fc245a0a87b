"""Deterministic pairwise reductions: the one summation order used in process and on Dask.

Floating-point addition is not associative, so partial sums added in the order tasks happen to finish would give maps
that differ in the last bits from run to run and with the number of workers.  Both runners therefore add the partial
sums of one half set in one fixed tree, by pool index::

    level 0:  p0  p1  p2  p3  p4
    level 1:  (p0+p1)  (p2+p3)  p4          pairs (2i, 2i+1); an odd last item moves up unchanged
    level 2:  ((p0+p1)+(p2+p3))  p4
    level 3:  (((p0+p1)+(p2+p3))+p4)

:func:`tree_sum` evaluates it on values, :class:`TreeSum` on values as they arrive (the in-process runner: it holds
O(log n) partial sums instead of all n), :func:`tree_reduce_futures` submits the same tree
as Dask tasks (``operator.add`` on the workers, keys ``{key_prefix}-{level}-{i}``), so with the same pools the
result is bit-identical whatever the number of workers and whatever order the tasks finish in.  The caller reduces
each half set separately (:class:`~gerelion_dask.expectation.partials.Partials` refuses to add different halves).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["tree_pairs", "tree_sum", "TreeSum", "tree_reduce_futures"]


def tree_pairs(n: int) -> list[list[tuple[int, int] | tuple[int]]]:
    """The shape of the tree over ``n`` items: per level, the index groups of the previous level that form each node.

    ``tree_pairs(5) == [[(0, 1), (2, 3), (4,)], [(0, 1), (2,)], [(0, 1)]]``: a pair is added, a single index moves up.
    """
    if n < 1:
        raise ValueError("cannot reduce an empty list")
    levels = []
    while n > 1:
        level = [(i, i + 1) for i in range(0, n - 1, 2)]
        if n % 2:
            level.append((n - 1,))
        levels.append(level)
        n = len(level)
    return levels


def tree_sum(items: Sequence[Any], add: Callable[[Any, Any], Any] = operator.add) -> Any:
    """Sum ``items`` pairwise in the fixed tree of :func:`tree_pairs` (``((p0+p1)+(p2+p3))+...``)."""
    level = list(items)
    for groups in tree_pairs(len(level)):
        level = [add(level[g[0]], level[g[1]]) if len(g) == 2 else level[g[0]] for g in groups]
    return level[0]


class TreeSum:
    """:func:`tree_sum` of items given one at a time with :meth:`add`, holding at most ~log2(n) partial sums.

    The tree of :func:`tree_pairs` is a binary counter: items are added in pairs, pairs of pairs, ... as soon as two
    subtrees of the same size stand side by side, and :meth:`result` adds what is left from the right (the odd items
    that moved up).  ``TreeSum`` over ``items`` gives exactly ``tree_sum(items)``, additions in the same order.
    """

    def __init__(self, add: Callable[[Any, Any], Any] = operator.add):
        self._add = add
        self._stack: list[tuple[int, Any]] = []  # (items in the subtree, its sum), left to right

    def add(self, item: Any) -> None:
        size, value = 1, item
        while self._stack and self._stack[-1][0] == size:
            left_size, left = self._stack.pop()
            value = self._add(left, value)
            size += left_size
        self._stack.append((size, value))

    def __len__(self) -> int:
        return sum(size for size, _ in self._stack)

    def result(self) -> Any:
        if not self._stack:
            raise ValueError("cannot reduce an empty list")
        value = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            value = self._add(left, value)
        return value


def tree_reduce_futures(client, futures: Sequence[Any], key_prefix: str, *, key_suffix: str = "", retries: int = 2,
                        add: Callable[[Any, Any], Any] = operator.add):
    """Submit the tree of :func:`tree_pairs` over ``futures`` (in list order) and return the root future.

    Each addition is one task ``client.submit(add, a, b, key=f"{key_prefix}-{level}-{i}{key_suffix}")`` (level from
    1), so the dashboard shows the stage by the key's first word (use ``key_prefix="reduce-{iteration}-{half}"``).
    Keys are global on a shared scheduler: make them unique per call with ``key_suffix`` (e.g. ``"-<job token>"``).
    A single future is returned as it is.  Pass the futures of one half set only.
    """
    level = list(futures)
    for depth, groups in enumerate(tree_pairs(len(level)), start=1):
        level = [client.submit(add, level[g[0]], level[g[1]], key=f"{key_prefix}-{depth}-{i}{key_suffix}", pure=False,
                               retries=retries) if len(g) == 2 else level[g[0]]
                 for i, g in enumerate(groups)]
    return level[0]
