"""Which examples enter each step: fixed-size and Poisson batch samplers, on the host.

The accountant's sampling rate q describes exactly one of these schemes:

* :class:`FixedSizeSampler` — B distinct indices drawn uniformly without replacement
  from N, independently at every step (the paper's scheme); q = B / N.
* :class:`PoissonSampler` — every index joins independently with probability q, so the
  batch size is Binomial(N, q). To give jit one static shape the batch is padded to
  ``padded_size`` slots with a validity mask; padded slots contribute nothing.

**Poisson overflow.** A batch larger than ``padded_size`` is neither truncated nor
resampled (both would change the sampling distribution the accountant assumes):
``sample`` raises :class:`BatchOverflowError` and training stops. ``padded_size`` is
by default the smallest size whose overflow probability — the exact binomial tail
P[Binomial(N, q) > padded_size] — is at most ``max_overflow_probability`` (1e-12 per
step); :attr:`PoissonSampler.overflow_probability` reports the value. Training that
stops on overflow differs from ideal Poisson DP-SGD only on an event of probability
at most T × overflow_probability over T steps, whatever the data, so an (ε, δ)
guarantee of the ideal mechanism holds with δ + T × overflow_probability (1e-7 for
10^5 steps at the default bound: negligible against δ = 1e-5, but to be reported).
The price is compute: padded slots are computed and masked (e.g. 178 slots for an
expected batch of 100).

**Randomness.** A :class:`SamplingSeed` holds a 128-bit seed; batch t is drawn from a
generator keyed by (seed, t), so ``sample(seed, step)`` is a pure function and a
checkpoint needs nothing but the seed and the step. ``SamplingSeed.from_os()`` (secure
mode, the default) takes the seed from OS entropy; keep it secret like the data.
``SamplingSeed.fixed(s)`` gives reproducible runs and reports itself as not secure.
(numpy's PCG64 is not a cryptographic generator; the seed is what must stay secret.)

Multi-host: every process must draw the same global batch; draw the seed on process 0
and broadcast it (``jax.experimental.multihost_utils.broadcast_one_to_all``), then each
process loads its own slice of ``indices``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from typing import NamedTuple

import numpy as np
from scipy import stats

__all__ = ["BatchOverflowError", "FixedSizeSampler", "IndexBatch", "PoissonSampler", "SamplingSeed"]


class BatchOverflowError(RuntimeError):
    """A Poisson batch had more examples than the padded size."""


class IndexBatch(NamedTuple):
    """Indices into the dataset and a validity mask, both of shape (padded size,).

    ``indices[mask]`` are the sampled examples; padded slots hold index 0 (any valid
    index, so that loading works) with mask False.
    """

    indices: np.ndarray  # int64
    mask: np.ndarray  # bool


@dataclasses.dataclass(frozen=True)
class SamplingSeed:
    """The host-side state of batch sampling: a 128-bit seed, and whether it came from OS
    entropy (``secure``). Batch t uses the generator :meth:`generator` (t)."""

    value: int
    secure: bool

    @classmethod
    def from_os(cls) -> "SamplingSeed":
        """Secure mode: 128 bits from the operating system's CSPRNG (``secrets``)."""
        return cls(secrets.randbits(128), secure=True)

    @classmethod
    def fixed(cls, seed: int) -> "SamplingSeed":
        """A reproducible seed. NOT secure: anyone who knows it knows every batch."""
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"a sampling seed must be a non-negative integer, got {seed!r}.")
        return cls(int(seed), secure=False)

    def generator(self, step: int) -> np.random.Generator:
        """An independent generator for batch ``step``, from (seed, step)."""
        return np.random.default_rng([self.value, int(step)])

    def __repr__(self) -> str:
        if self.secure:
            return "SamplingSeed(OS entropy, secure)"
        return f"SamplingSeed({self.value}, reproducible, NOT secure)"


def _check_dataset_size(dataset_size) -> int:
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, numbers.Integral) or dataset_size < 1:
        raise ValueError(f"dataset_size must be a positive integer, got {dataset_size!r}.")
    return int(dataset_size)


def _draw(rng: np.random.Generator, dataset_size: int, count: int, slots: int) -> IndexBatch:
    """``count`` distinct uniform indices in the first slots of a batch of ``slots``."""
    indices = np.zeros(slots, np.int64)
    indices[:count] = rng.choice(dataset_size, count, replace=False)
    return IndexBatch(indices, np.arange(slots) < count)


@dataclasses.dataclass(frozen=True)
class FixedSizeSampler:
    """B indices uniformly without replacement from N, independently every step.

    Attributes:
      dataset_size: N.
      batch_size: B ≤ N.
    """

    dataset_size: int
    batch_size: int

    def __post_init__(self):
        n = _check_dataset_size(self.dataset_size)
        b = self.batch_size
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 1 <= b <= n:
            raise ValueError(f"batch_size must be an integer in [1, dataset_size={n}], got {b!r}.")

    @property
    def sampling_rate(self) -> float:
        """q = B / N, the rate the accountant uses."""
        return self.batch_size / self.dataset_size

    @property
    def expected_batch_size(self) -> float:
        """B: what the noisy gradient sum is divided by."""
        return float(self.batch_size)

    @property
    def padded_size(self) -> int:
        """Slots per batch: B (every slot valid)."""
        return self.batch_size

    def sample(self, seed: SamplingSeed, step: int) -> IndexBatch:
        """Batch ``step``: B distinct indices, mask all True."""
        return _draw(seed.generator(step), self.dataset_size, self.batch_size, self.batch_size)


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
    """Each of N indices joins independently with probability q; padded to a fixed size.

    Attributes:
      dataset_size: N.
      sampling_rate: q in (0, 1].
      max_overflow_probability: bound on P[batch size > padded_size] per step, used to
        choose ``padded_size`` when it is not given.
      padded_size: slots per batch; default the smallest size meeting the bound.
      multiple_of: round the default ``padded_size`` up to a multiple of this (e.g.
        microbatch size × number of devices).
    """

    dataset_size: int
    sampling_rate: float
    max_overflow_probability: float = 1e-12
    padded_size: int | None = None
    multiple_of: int = 1

    def __post_init__(self):
        n = _check_dataset_size(self.dataset_size)
        q = self.sampling_rate
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 < q <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {q!r}.")
        bound = self.max_overflow_probability
        if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not 0 < bound < 1:
            raise ValueError(f"max_overflow_probability must be in (0, 1), got {bound!r}.")
        m = self.multiple_of
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"multiple_of must be a positive integer, got {m!r}.")
        size = self.padded_size
        if size is None:
            size = max(1, _tail_quantile(n, float(q), float(bound)))
            size = min(m * math.ceil(size / m), m * math.ceil(n / m))
        elif isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"padded_size must be a positive integer, got {size!r}.")
        object.__setattr__(self, "padded_size", int(size))

    @property
    def expected_batch_size(self) -> float:
        """q·N: what the noisy gradient sum is divided by."""
        return self.sampling_rate * self.dataset_size

    @property
    def overflow_probability(self) -> float:
        """P[Binomial(N, q) > padded_size]: the chance per step that ``sample`` raises."""
        return float(stats.binom.sf(self.padded_size, self.dataset_size, self.sampling_rate))

    def sample(self, seed: SamplingSeed, step: int) -> IndexBatch:
        """Batch ``step``: a Binomial(N, q) number of distinct uniform indices (which is
        exactly independent inclusion with probability q), then padding.

        Raises BatchOverflowError if the batch exceeds ``padded_size``.
        """
        rng = seed.generator(step)
        count = int(rng.binomial(self.dataset_size, self.sampling_rate))
        if count > self.padded_size:
            raise BatchOverflowError(
                f"step {step}: the Poisson batch has {count} examples but only {self.padded_size} "
                f"slots (overflow probability {self.overflow_probability:.3g} per step). Truncating "
                "or resampling would break the privacy accounting; restart with a larger "
                "padded_size or a smaller max_overflow_probability.")
        return _draw(rng, self.dataset_size, count, self.padded_size)


def _tail_quantile(n: int, q: float, bound: float) -> int:
    """The smallest m with P[Binomial(n, q) > m] ≤ bound."""
    m = int(stats.binom.isf(bound, n, q))
    while m < n and stats.binom.sf(m, n, q) > bound:
        m += 1
    while m > 0 and stats.binom.sf(m - 1, n, q) <= bound:
        m -= 1
    return m
