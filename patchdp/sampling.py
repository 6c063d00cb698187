"""Sampling schemes: which examples enter each step, for the host sampler AND the accountant.

One frozen dataclass per scheme describes it completely, so the batches drawn and the
rate the accountant composes come from the same object (as one ``CropSpec`` drives both
the crops and p*):

* :class:`FixedSizeSampling` (``batch_size=B, dataset_size=N``) — B distinct indices
  drawn uniformly without replacement from N, independently at every step (the paper's
  scheme); q = B / N.
* :class:`PoissonSampling` (``rate=q, dataset_size=N``) — every index joins
  independently with probability q, so the batch size is Binomial(N, q). To give jit one
  static shape the batch is padded to ``padded_size`` slots with a validity mask; padded
  slots contribute nothing. ``dataset_size`` may be omitted for accounting alone (then
  there is no expected batch size, padded size or sampler).

Both have ``rate`` (q), ``expected_batch_size`` (what the noisy gradient sum is divided
by), ``padded_size``, ``steps_for_epochs(epochs)`` and ``sample(seed, step)``. Their
fields are keyword-only, so (batch_size, dataset_size) cannot be swapped silently.

**Poisson overflow.** A batch larger than ``padded_size`` is neither truncated nor
resampled (both would change the sampling distribution the accountant assumes):
``sample`` raises :class:`BatchOverflowError` and training stops. ``padded_size`` is
by default the smallest size whose overflow probability — the exact binomial tail
P[Binomial(N, q) > padded_size] — is at most ``max_overflow_probability`` (1e-12 per
step); :attr:`PoissonSampling.overflow_probability` reports the value. Training that
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
and broadcast it (``jax.experimental.multihost_utils.broadcast_one_to_all``; the trainer:
:meth:`patchdp.distributed.Processes.from_writer`), then each process loads its own slice
of ``indices``.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import NamedTuple, Union

import numpy as np
from scipy import stats

from patchdp import _validation

__all__ = ["BatchOverflowError", "FixedSizeSampling", "IndexBatch", "PoissonSampling", "Sampling", "SamplingSeed",
           "sampling_from_dict"]


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
        return cls(_validation.integer("sampling seed", seed, 0), secure=False)

    def generator(self, step: int) -> np.random.Generator:
        """An independent generator for batch ``step``, from (seed, step)."""
        return np.random.default_rng([self.value, int(step)])

    def __repr__(self) -> str:
        if self.secure:
            return "SamplingSeed(OS entropy, secure)"
        return f"SamplingSeed({self.value}, reproducible, NOT secure)"


def _draw(rng: np.random.Generator, dataset_size: int, count: int, slots: int) -> IndexBatch:
    """``count`` distinct uniform indices in the first slots of a batch of ``slots``."""
    indices = np.zeros(slots, np.int64)
    indices[:count] = rng.choice(dataset_size, count, replace=False)
    return IndexBatch(indices, np.arange(slots) < count)


class _Scheme:
    """What every scheme derives from its rate q."""

    rate: float

    def to_dict(self) -> dict:
        """Plain JSON: ``{"type": <class name>, <fields>}`` (:func:`sampling_from_dict`)."""
        return {"type": type(self).__name__, **dataclasses.asdict(self)}

    def steps_for_epochs(self, epochs: float) -> int:
        """Steps that make ``epochs`` passes over the data in expectation: ceil(epochs / q)."""
        epochs = _validation.number("epochs", epochs, 0, math.inf, low_open=True)
        return max(1, math.ceil(epochs / self.rate - 1e-9))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedSizeSampling(_Scheme):
    """B indices uniformly without replacement from N, independently every step.

    Attributes:
      batch_size: B, 1 ≤ B ≤ N.
      dataset_size: N.
    """

    batch_size: int
    dataset_size: int

    def __post_init__(self):
        n = _validation.integer("dataset_size", self.dataset_size)
        b = _validation.integer("batch_size", self.batch_size)
        if b > n:
            raise ValueError(f"batch_size {b} exceeds dataset_size {n}: a batch is drawn without replacement.")

    @property
    def rate(self) -> float:
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
        return _draw(seed.generator(_step(step)), self.dataset_size, self.batch_size, self.batch_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoissonSampling(_Scheme):
    """Each of N indices joins independently with probability q; padded to a fixed size.

    Attributes:
      rate: q in (0, 1].
      dataset_size: N; None describes the scheme for the accountant only (no expected
        batch size, padded size or :meth:`sample`).
      max_overflow_probability: bound on P[batch size > padded_size] per step, used to
        choose ``padded_size`` when it is not given.
      padded_size: slots per batch; default the smallest size meeting the bound.
      multiple_of: round the default ``padded_size`` up to a multiple of this (e.g.
        microbatch size × number of devices).
    """

    rate: float
    dataset_size: int | None = None
    max_overflow_probability: float = 1e-12
    padded_size: int | None = None
    multiple_of: int = 1

    def __post_init__(self):
        q = _validation.rate("sampling rate q", self.rate)
        object.__setattr__(self, "rate", q)
        bound = _validation.number("max_overflow_probability", self.max_overflow_probability, 0, 1,
                                   low_open=True, high_open=True)
        m = _validation.integer("multiple_of", self.multiple_of)
        size = self.padded_size
        if self.dataset_size is None:
            if size is not None:
                raise ValueError("PoissonSampling: padded_size needs dataset_size; pass dataset_size=N.")
            return
        n = _validation.integer("dataset_size", self.dataset_size)
        if size is None:
            size = max(1, _tail_quantile(n, q, bound))
            size = min(m * math.ceil(size / m), m * math.ceil(n / m))
        object.__setattr__(self, "padded_size", _validation.integer("padded_size", size))

    def _size(self) -> int:
        if self.dataset_size is None:
            raise ValueError("this PoissonSampling has no dataset_size; pass dataset_size=N to sample batches "
                             "or to get the expected batch size q·N.")
        return self.dataset_size

    @property
    def expected_batch_size(self) -> float:
        """q·N: what the noisy gradient sum is divided by."""
        return self.rate * self._size()

    @property
    def overflow_probability(self) -> float:
        """P[Binomial(N, q) > padded_size]: the chance per step that ``sample`` raises."""
        return float(stats.binom.sf(self.padded_size, self._size(), self.rate))

    def sample(self, seed: SamplingSeed, step: int) -> IndexBatch:
        """Batch ``step``: a Binomial(N, q) number of distinct uniform indices (which is
        exactly independent inclusion with probability q), then padding.

        Raises BatchOverflowError if the batch exceeds ``padded_size``.
        """
        rng = seed.generator(_step(step))
        count = int(rng.binomial(self._size(), self.rate))
        if count > self.padded_size:
            raise BatchOverflowError(
                f"step {step}: the Poisson batch has {count} examples but only {self.padded_size} "
                f"slots (overflow probability {self.overflow_probability:.3g} per step). Truncating "
                "or resampling would break the privacy accounting; restart with a larger "
                "padded_size or a smaller max_overflow_probability.")
        return _draw(rng, self.dataset_size, count, self.padded_size)


Sampling = Union[FixedSizeSampling, PoissonSampling]


def sampling_from_dict(state) -> Sampling:
    """The scheme that ``to_dict`` wrote; ValueError naming an unknown type."""
    state = dict(state)
    kinds = {"FixedSizeSampling": FixedSizeSampling, "PoissonSampling": PoissonSampling}
    name = state.pop("type", None)
    if name not in kinds:
        raise ValueError(f"unknown sampling type {name!r}; expected one of {', '.join(kinds)}.")
    return kinds[name](**state)


def _step(step) -> int:
    """A step index: an integer >= 0."""
    return _validation.integer("step (index of the batch to draw)", step, 0)


def _tail_quantile(n: int, q: float, bound: float) -> int:
    """The smallest m with P[Binomial(n, q) > m] ≤ bound."""
    m = int(stats.binom.isf(bound, n, q))
    while m < n and stats.binom.sf(m, n, q) > bound:
        m += 1
    while m > 0 and stats.binom.sf(m - 1, n, q) <= bound:
        m -= 1
    return m
