"""Several sensitive patches per image: p*_k, the worst case over unions of up to k patches.

The relation (docs/method.md, "Several patches per image"): two neighbouring images differ
only inside S = (R + t_1) ∪ … ∪ (R + t_k), up to k placements of one public shape R that
the adversary chooses. A crop that misses S sees the same pixels, so w = q · p*_k with

    p*_k = max over t_1, …, t_k of P[at least one of the example's K crops meets S].

**Exact reduction.** One crop (size s with probability π_s, offset uniform over U_s) meets
S exactly when its offset lies in the union of the hit regions H_s(t_i) (the offsets whose
window meets R + t_i: R dilated by the crop box, inside U_s). With

    g(T) = Σ_s π_s · |∪_{t ∈ T} H_s(t)| / |U_s|        (one crop meets the union of T)

the K independent crops meet S with probability 1 − (1 − g(T))^K, an increasing function
of g, so p*_k = 1 − (1 − g*)^K with g* = max_{|T| ≤ k} g(T). Neither the K crops nor the
size mixture is additive over patches; both are handled by g exactly.

**Bounds.** g is a weighted coverage function, hence monotone and submodular, so for every
set T of placements (Nemhauser, Wolsey & Fisher 1978)

    g* ≤ g(T) + (sum of the k largest marginal gains g(T ∪ {t}) − g(T) over all t).   (*)

T = ∅ gives the sum of the k largest p(t), at most k · p*_1 (the union bound). patchdp

1. runs the greedy algorithm (each step adds the placement of largest marginal gain):
   its k placements T_k are an explicit worst-case candidate, a LOWER bound g(T_k) ≤ g*;
2. takes the smallest of 1 and (*) over the greedy's sets T_0 = ∅, …, T_k: an UPPER bound;
3. when they differ, searches all sets of up to k placements by branch and bound, pruned
   with (*), within a deterministic work limit; a finished search makes both exact.

The result is **exact** when the two bounds meet (e.g. k worst-case placements with
pairwise disjoint hit regions exist, where p*_k = k·p*_1 for one crop), and otherwise an
**upper bound**, which the accountant uses: never below the truth. All counts are exact
integers and all values exact fractions.

Hit regions are unions of disjoint rectangles (the dilated mask cut into blocks of equal
rows), so the marginal gains of all placements at once are rectangle sums over one
summed-area table of the uncovered offsets: O(#rectangles · #placements) per step.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np

from patchdp.inclusion import CropSpec, Patch, _check_fits, _check_types, _dilate, _round_up, image_hw

__all__ = ["UnionInclusion", "union_inclusion", "SEARCH_WORK_LIMIT"]

SEARCH_WORK_LIMIT = 10 ** 7
"""The exhaustive search stops (the result stays an upper bound) after this much work: a
node of the search costs (rectangles + 20) units per placement (its rectangle sums and the
exact ranking of the gains), and at least 2,000 (numpy's per-call overhead). About one to
a few seconds; deterministic, so the same inputs give the same result on any CPU."""


@dataclasses.dataclass(frozen=True)
class UnionInclusion:
    """p*_k of up to k patches, as an interval that holds the truth.

    Attributes:
      upper: an upper bound on p*_k (a ``Fraction``); the accountant's value.
      lower: P[the crops meet the union of ``placements``] (a ``Fraction``), so ≤ p*_k.
      placements: the (row, column) of each patch's bounding box in the unpadded image
        that achieve ``lower`` (at most k of them): a worst case when ``exact``.
    """

    upper: Fraction
    lower: Fraction
    placements: tuple[tuple[int, int], ...]

    @property
    def exact(self) -> bool:
        """True when ``upper`` is p*_k itself (the bounds meet)."""
        return self.upper == self.lower

    @property
    def probability(self) -> float:
        """``upper`` as the smallest float ≥ it: what the accountant uses."""
        return _round_up(self.upper)


@dataclasses.dataclass(frozen=True, eq=False)
class _Geometry:
    """One crop size: its weight π_s / |U_s|, its offset grid U_s (rows, cols), the dilated
    mask as disjoint rectangles (int64 (n, 4): row start, row end, column start, column end,
    relative), and where that dilation starts in U_s for each placement row and column."""

    weight: Fraction
    grid: tuple[int, int]
    rectangles: np.ndarray
    first_rows: np.ndarray
    first_cols: np.ndarray

    def boxes(self, rows: np.ndarray, cols: np.ndarray):
        """For each rectangle, its row and column bounds in U_s (clipped) at the given
        placement rows and columns: four arrays (n, len(rows)) / (n, len(cols))."""
        r0, r1, c0, c1 = self.rectangles.T[:, :, None]
        clip_rows = lambda r: np.clip(rows[None] + r, 0, self.grid[0])
        clip_cols = lambda c: np.clip(cols[None] + c, 0, self.grid[1])
        return clip_rows(r0), clip_rows(r1), clip_cols(c0), clip_cols(c1)

    def gains(self, covered: np.ndarray) -> np.ndarray:
        """For every placement, the number of offsets of U_s that its hit region adds to
        ``covered`` (bool, shape ``grid``): int64 array (placement rows, placement cols)."""
        table = np.zeros((self.grid[0] + 1, self.grid[1] + 1), np.int64)
        np.cumsum(np.cumsum(~covered, 0, dtype=np.int64), 1, out=table[1:, 1:])
        total = np.zeros((len(self.first_rows), len(self.first_cols)), np.int64)
        for lo, hi, left, right in zip(*self.boxes(self.first_rows, self.first_cols)):
            strips = table[hi] - table[lo]
            total += strips[:, right] - strips[:, left]
        return total

    def cover(self, covered: np.ndarray, row: int, col: int) -> None:
        """Marks the hit region of the placement at (row, col) in ``covered``, in place."""
        for lo, hi, left, right in zip(*self.boxes(self.first_rows[[row]], self.first_cols[[col]])):
            covered[lo[0]:hi[0], left[0]:right[0]] = True


def _rectangles(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as disjoint rectangles, int64 (n, 4) of [row0, row1) × [col0, col1):
    consecutive equal rows form one block, each run of True in the block one rectangle."""
    out, start = [], 0
    for end in range(1, mask.shape[0] + 1):
        if end < mask.shape[0] and np.array_equal(mask[end], mask[start]):
            continue
        edges = np.diff(np.concatenate([[0], mask[start].astype(np.int8), [0]]))
        out += [(start, end, a, b) for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]
        start = end
    return np.array(out, np.int64).reshape(-1, 4)


def _geometries(image: tuple[int, int], crop: CropSpec, patch: Patch) -> list[_Geometry]:
    out = []
    for (ch, cw), probability, grid in zip(crop.sizes, crop.probabilities, crop.offset_ranges(image)):
        placements = image[0] - patch.shape[0] + 1, image[1] - patch.shape[1] + 1
        out.append(_Geometry(
            weight=Fraction(probability) / Fraction(sum(Fraction(p) for p in crop.probabilities))
            / (grid[0] * grid[1]),
            grid=grid, rectangles=_rectangles(_dilate(patch.mask, ch, cw)),
            first_rows=crop.padding + np.arange(placements[0], dtype=np.int64) - (ch - 1),
            first_cols=crop.padding + np.arange(placements[1], dtype=np.int64) - (cw - 1)))
    return out


def _largest(gains: list[np.ndarray], weights: list[Fraction], count: int) -> tuple[np.ndarray, list[Fraction]]:
    """The (at most) ``count`` placements with the largest positive weighted gain
    Σ_s w_s · gains_s, best first (ties: lower flat index first), and their exact values.

    Floats only preselect: a sum of m nonnegative rounded products has relative error at
    most (m + 1)·2⁻⁵³, far inside the 1e-9 margin, so every placement of the exact top
    ``count`` is among the candidates; their order and values are exact."""
    flat = [g.ravel() for g in gains]
    approx = sum(float(w) * g for w, g in zip(weights, flat))
    count = min(count, approx.size)
    threshold = np.partition(approx, approx.size - count)[approx.size - count]
    candidates = np.flatnonzero((approx >= threshold * (1 - 1e-9)) & (approx > 0))
    if candidates.size == 0:
        return candidates, []
    tuples, inverse = np.unique(np.stack([g[candidates] for g in flat], 1), axis=0, return_inverse=True)
    values = [sum((w * int(x) for w, x in zip(weights, row)), Fraction(0)) for row in tuples]
    position = {v: i for i, v in enumerate(sorted(set(values), reverse=True))}
    rank = np.array([position[v] for v in values])  # 0 = the largest value
    order = np.lexsort((candidates, rank[inverse.reshape(-1)]))[:count]
    return candidates[order], [values[i] for i in inverse.reshape(-1)[order]]


class _Budget(Exception):
    """The exhaustive search ran out of work."""


class _Coverage:
    """Maximum weighted coverage of the hit regions of up to ``k`` placements."""

    def __init__(self, geometries: list[_Geometry], k: int, work_limit: int):
        self.geometries, self.k, self.work_left = geometries, k, work_limit
        self.weights = [g.weight for g in geometries]
        self.shape = len(geometries[0].first_rows), len(geometries[0].first_cols)
        self.rectangles = sum(len(g.rectangles) for g in geometries)

    def empty(self) -> list[np.ndarray]:
        return [np.zeros(g.grid, bool) for g in self.geometries]

    def add(self, covered: list[np.ndarray], index: int) -> list[np.ndarray]:
        row, col = np.unravel_index(index, self.shape)
        covered = [c.copy() for c in covered]
        for geometry, c in zip(self.geometries, covered):
            geometry.cover(c, row, col)
        return covered

    def gains(self, covered: list[np.ndarray]) -> list[np.ndarray]:
        return [g.gains(c) for g, c in zip(self.geometries, covered)]

    def greedy(self) -> tuple[Fraction, Fraction, list[int]]:
        """(lower, upper, chosen): the greedy's k placements, their value, and the smallest
        bound (*) over its steps."""
        covered, chosen, value, upper = self.empty(), [], Fraction(0), Fraction(1)
        for _ in range(self.k + 1):
            best, gains = _largest(self.gains(covered), self.weights, self.k)
            upper = min(upper, value + sum(gains, Fraction(0)))
            if len(chosen) == self.k or not gains:  # k placed, or nothing left to add: T is optimal
                break
            chosen.append(int(best[0]))
            covered = self.add(covered, chosen[-1])
            value += gains[0]
            if value == upper:  # the bounds met: exact
                break
        return value, upper, chosen

    def search(self, best: tuple[Fraction, list[int]]) -> tuple[Fraction, list[int]]:
        """The maximum over all sets of up to k placements and a set that attains it, given a
        known (value, set); raises _Budget when the work limit is reached."""
        return self._branch(self.empty(), Fraction(0), [], np.zeros(self.shape[0] * self.shape[1], bool), best)

    def _branch(self, covered, value, chosen, excluded, best):
        """The better of ``best`` and the best set that adds to ``chosen`` (of value
        ``value``, covering ``covered``) up to k − len(chosen) placements not ``excluded``."""
        self.work_left -= max((self.rectangles + 20) * excluded.size, 2000)
        if self.work_left < 0:
            raise _Budget
        gains = self.gains(covered)
        for g in gains:
            g.ravel()[excluded] = 0
        order, values = _largest(gains, self.weights, excluded.size)
        left = self.k - len(chosen)
        for i, (index, gain) in enumerate(zip(order, values)):
            # (*) at this node: nothing in this branch or the later ones can do better
            if value + gain + sum(values[i + 1:i + left], Fraction(0)) <= best[0]:
                break
            if left == 1:
                return value + gain, chosen + [int(index)]
            excluded = excluded.copy()
            excluded[order[:i + 1]] = True
            best = self._branch(self.add(covered, index), value + gain, chosen + [int(index)], excluded, best)
        return best


def union_inclusion(image_shape, crop: CropSpec, patch: Patch, *,
                    work_limit: int = SEARCH_WORK_LIMIT) -> UnionInclusion:
    """p*_k for up to k = ``patch.count`` patches of ``patch``'s shape anywhere in one
    image of ``image_shape`` ((H, W) or (H, W, C)), under the crops ``crop`` (sizes
    mixture, padding, K crops per example): exact where the bounds meet, else an upper
    bound (module docstring). For k = 1 it is exact and equals
    :func:`patchdp.inclusion.inclusion_probability` (as a fraction)."""
    _check_types(crop, patch)
    image = image_hw(image_shape)
    crop.offset_ranges(image)
    _check_fits(image, patch)
    coverage = _Coverage(_geometries(image, crop, patch), patch.count, work_limit)
    lower, upper, chosen = coverage.greedy()
    if lower < upper:
        try:
            lower, chosen = coverage.search((lower, chosen))
            upper = lower
        except _Budget:
            pass
    crops = crop.crops_per_example
    hit = lambda g: 1 - (1 - g) ** crops  # one of K independent crops meets the union
    placements = tuple(tuple(int(i) for i in np.unravel_index(c, coverage.shape)) for c in chosen)
    return UnionInclusion(upper=hit(upper), lower=hit(lower), placements=placements)
