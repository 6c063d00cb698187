"""Batch samplers: the distributions the accountant assumes, padded shapes, overflow,
and secure versus reproducible randomness."""

from fractions import Fraction
from math import comb

import numpy as np
import pytest
from scipy import stats

from patchdp.sampling import BatchOverflowError, FixedSizeSampling, PoissonSampling, SamplingSeed

SEED = SamplingSeed.fixed(1234)


def inclusion_counts(sampler, steps):
    counts = np.zeros(sampler.dataset_size)
    sizes = []
    for step in range(steps):
        batch = sampler.sample(SEED, step)
        assert batch.indices.shape == batch.mask.shape == (sampler.padded_size,)
        chosen = batch.indices[batch.mask]
        assert len(set(chosen.tolist())) == len(chosen)  # without replacement
        assert ((0 <= chosen) & (chosen < sampler.dataset_size)).all()
        counts[chosen] += 1
        sizes.append(batch.mask.sum())
    return counts, np.array(sizes)


def test_fixed_size_batches_are_uniform_without_replacement():
    sampler = FixedSizeSampling(dataset_size=50, batch_size=10)
    counts, sizes = inclusion_counts(sampler, 2000)
    assert (sizes == 10).all()
    assert sampler.rate == 0.2 and sampler.expected_batch_size == 10
    # every index is included with probability B/N = 0.2: chi-square over 50 cells
    assert stats.chisquare(counts).pvalue > 1e-3


def test_poisson_batches_include_each_index_independently_with_rate_q():
    sampler = PoissonSampling(dataset_size=200, rate=0.05)
    counts, sizes = inclusion_counts(sampler, 3000)
    n, q = 200, 0.05
    assert abs(sizes.mean() - n * q) < 5 * np.sqrt(n * q * (1 - q) / 3000)
    assert abs(sizes.var() / (n * q * (1 - q)) - 1) < 0.15  # binomial, not fixed-size
    assert stats.chisquare(counts).pvalue > 1e-3
    assert sampler.expected_batch_size == pytest.approx(10.0)


def exact_tail(n, q, m):
    """P[Binomial(n, q) > m] in exact rational arithmetic (q as a short decimal)."""
    q = Fraction(q).limit_denominator(10**6)
    return sum(comb(n, k) * q ** k * (1 - q) ** (n - k) for k in range(m + 1, n + 1))


@pytest.mark.parametrize("n, q, bound", [(300, 0.05, 1e-12), (600, 0.01, 1e-9), (50, 0.5, 1e-6)])
def test_padded_size_is_the_smallest_meeting_the_overflow_bound_exactly(n, q, bound):
    sampler = PoissonSampling(dataset_size=n, rate=q, max_overflow_probability=bound)
    m = sampler.padded_size
    assert exact_tail(n, q, m) <= bound < exact_tail(n, q, m - 1)
    assert sampler.overflow_probability == pytest.approx(float(exact_tail(n, q, m)), rel=1e-6)


def test_padded_size_rounds_up_to_a_multiple():
    plain = PoissonSampling(dataset_size=10_000, rate=0.01)
    rounded = PoissonSampling(dataset_size=10_000, rate=0.01, multiple_of=16)
    assert rounded.padded_size % 16 == 0 and 0 <= rounded.padded_size - plain.padded_size < 16
    assert rounded.overflow_probability <= plain.overflow_probability <= 1e-12


def test_overflow_raises_instead_of_truncating_or_resampling():
    sampler = PoissonSampling(dataset_size=100, rate=0.5, padded_size=40)
    assert sampler.overflow_probability > 0.9
    with pytest.raises(BatchOverflowError, match="privacy accounting"):
        for step in range(5):
            sampler.sample(SEED, step)


def test_sampling_is_a_pure_function_of_seed_and_step():
    sampler = PoissonSampling(dataset_size=1000, rate=0.02)
    a, b = sampler.sample(SEED, 7), sampler.sample(SamplingSeed.fixed(1234), 7)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, sampler.sample(SEED, 8).indices)
    assert not np.array_equal(a.indices, sampler.sample(SamplingSeed.fixed(1235), 7).indices)


def test_secure_mode_draws_the_seed_from_the_os_and_fixed_seeds_say_they_are_not_secure():
    first, second = SamplingSeed.from_os(), SamplingSeed.from_os()
    assert first.secure and second.secure and first.value != second.value
    assert first.value.bit_length() > 64
    assert str(first.value) not in repr(first)  # the secret seed is not printed
    assert not SEED.secure and "NOT secure" in repr(SEED)


@pytest.mark.parametrize("make, message", [
    (lambda: FixedSizeSampling(dataset_size=10, batch_size=11), "batch_size 11 exceeds dataset_size 10"),
    (lambda: FixedSizeSampling(dataset_size=0, batch_size=1), "dataset_size"),
    (lambda: PoissonSampling(dataset_size=10, rate=0.0), r"sampling rate q must be .* \(0, 1\]"),
    (lambda: PoissonSampling(dataset_size=10, rate=0.1, max_overflow_probability=0), "max_overflow_probability"),
    (lambda: PoissonSampling(dataset_size=10, rate=0.1, padded_size=0), "padded_size"),
    (lambda: PoissonSampling(rate=0.1, padded_size=8), "padded_size needs dataset_size"),
    (lambda: SamplingSeed.fixed(-1), "seed"),
])
def test_invalid_arguments_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_one_object_per_scheme_serves_sampler_and_accountant():
    import patchdp
    assert patchdp.FixedSizeSampling is FixedSizeSampling and patchdp.PoissonSampling is PoissonSampling
    fixed = FixedSizeSampling(batch_size=100, dataset_size=10_000)
    assert fixed.rate == 0.01 and fixed.expected_batch_size == 100 and fixed.padded_size == 100
    poisson = PoissonSampling(rate=0.01, dataset_size=10_000)
    assert poisson.expected_batch_size == pytest.approx(100) and poisson.padded_size > 100
    # the accountant composes the same rate the sampler draws with
    from patchdp import accounting
    kw = dict(relation=accounting.ImageLevel(), resolution=1e-2)
    assert accounting.epsilon(1.0, 10, 1e-5, sampling=fixed, **kw) == accounting.epsilon(
        1.0, 10, 1e-5, sampling=PoissonSampling(rate=0.01), **kw)


def test_fields_are_keyword_only_so_batch_and_dataset_size_cannot_be_swapped():
    with pytest.raises(TypeError):
        FixedSizeSampling(100, 10_000)
    with pytest.raises(TypeError):
        PoissonSampling(0.01, 10_000)


def test_accounting_only_poisson_scheme_says_what_it_lacks():
    scheme = PoissonSampling(rate=0.1)
    assert scheme.padded_size is None
    with pytest.raises(ValueError, match="no dataset_size"):
        scheme.expected_batch_size
    with pytest.raises(ValueError, match="no dataset_size"):
        scheme.sample(SEED, 0)


@pytest.mark.parametrize("rate, epochs, steps", [(0.1, 1, 10), (0.03, 1, 34), (0.5, 2.5, 5), (1.0, 0.1, 1)])
def test_steps_for_epochs_is_ceil_epochs_over_q(rate, epochs, steps):
    assert PoissonSampling(rate=rate).steps_for_epochs(epochs) == steps
    with pytest.raises(ValueError, match="epochs"):
        PoissonSampling(rate=rate).steps_for_epochs(0)


@pytest.mark.parametrize("scheme", [FixedSizeSampling(batch_size=32, dataset_size=1000),
                                    PoissonSampling(rate=0.03, dataset_size=1000, multiple_of=16)])
def test_the_mechanism_serialises_the_one_scheme_object(scheme):
    import json
    from patchdp.mechanism import DPSGD
    mechanism = DPSGD(sampling=scheme, clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, accounting="image")
    state = json.loads(json.dumps(mechanism.ledger().to_dict()))
    restored = DPSGD.from_dict(state["mechanism"]).sampling
    assert restored == scheme and restored.padded_size == scheme.padded_size
    np.testing.assert_array_equal(restored.sample(SEED, 3).indices, scheme.sample(SEED, 3).indices)
