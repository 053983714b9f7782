"""StaICC's seeded random draws (``StaICC.util.stable_random``), bit for bit, at a cost that grows with the
draws and not with the pool.

StaICC draws from a linear congruential generator, ``x <- (1664525 x + 1013904223) mod 2**32``, and picks
``int(x / 2**32 * len(rest))`` from what is left of ``range(n)``, popping it. Its own implementation copies
``range(n)`` for every draw and pops from a Python list, so sampling demonstrations for every test query of a
large custom dataset, or shuffling its rows, grows with the square of the dataset (600,000 rows did not finish
in 7 minutes). :class:`LcgSampler` gives the same numbers in O(k²) per k-sample and O(n log n) per shuffle
(an order-statistic Fenwick tree); the tests compare it with StaICC's own functions.

    from abft_lens.data.stable_random import LcgSampler

    LcgSampler(42).sample(4, 100)     # StaICC: stable_random(42).sample_index_set(4, 100)
    LcgSampler(42).shuffle([1, 2, 3])  # StaICC: stable_random(42).shuffle_list([1, 2, 3])
"""

from __future__ import annotations

from typing import Sequence, TypeVar

__all__ = ["LcgSampler"]

T = TypeVar("T")


class LcgSampler:
    """The LCG state of one StaICC ``stable_random(seed)``; each method advances it as StaICC's would."""

    A, B, C = 1664525, 1013904223, 2**32

    def __init__(self, seed: int):
        self.state = seed

    def _float(self) -> float:
        self.state = (self.state * self.A + self.B) % self.C
        return self.state / self.C

    def sample(self, k: int, n: int, allow_repetition: bool = False) -> list[int]:
        """``sample_index_set(k, n, allow_repetition)``: k indices of ``range(n)``."""
        if allow_repetition:
            return [int(self._float() * n) for _ in range(k)]
        if k > n:
            raise ValueError("sample_number should be less than max_index")
        chosen: list[int] = []
        removed: list[int] = []  # sorted
        for j in range(k):
            value = int(self._float() * (n - j))
            for r in removed:  # the value at position `value` of range(n) with `removed` popped
                if r <= value:
                    value += 1
                else:
                    break
            chosen.append(value)
            removed.append(value)
            removed.sort()
        return chosen

    def shuffle(self, items: Sequence[T]) -> list[T]:
        """``shuffle_list(items)``: every item once, in StaICC's order."""
        n = len(items)
        tree = [0] * (n + 1)  # Fenwick tree of "still there" counts over positions 1..n
        for i in range(1, n + 1):
            tree[i] += 1
            parent = i + (i & -i)
            if parent <= n:
                tree[parent] += tree[i]
        top = 1 << max(0, n.bit_length() - 1) if n else 0
        order = []
        for j in range(n):
            rank = int(self._float() * (n - j)) + 1  # the rank-th item still there
            position, step = 0, top
            while step:
                if position + step <= n and tree[position + step] < rank:
                    position += step
                    rank -= tree[position]
                step >>= 1
            order.append(items[position])
            i = position + 1
            while i <= n:
                tree[i] -= 1
                i += i & -i
        return order
