"""Neighbouring relations: what one step protects, and how a step is accounted under it.

Each relation is a small frozen dataclass that carries its own behaviour: its
``amplification`` (the factor by which the sampling rate q shrinks to the effective
rate w = q·amplification), the sampling schemes it is valid for, and the PLD of one
step (:meth:`Relation.one_step`). Adding a relation means adding one class here; no
other module dispatches on relation types.

- :class:`PatchLevel` (the point of patchdp) and :class:`ImageLevel` (standard DP-SGD,
  the paper's baseline) are substitutions: one step is the switching pair with Δ = 2,
  at w = q·p* and w = q (docs/method.md, "The switching substitution profile").
- :class:`AddRemove` (Poisson sampling only, Δ = 1) is the Opacus / jax-privacy
  convention, for comparing numbers with those libraries.
- :class:`GaussianAugmentation` is a COMPARATOR (the paper's): w = q·TV from pixel noise.
"""

from __future__ import annotations

import dataclasses
import math

from scipy import special

from patchdp import _validation
from patchdp.accounting.loss import PLD, add_remove_step, substitution_step
from patchdp.sampling import FixedSizeSampling, PoissonSampling, Sampling

__all__ = ["Relation", "PatchLevel", "ImageLevel", "GaussianAugmentation", "AddRemove",
           "effective_sampling_rate", "relation_from_dict"]


class Relation:
    """A neighbouring relation: the base of the four below."""

    amplification: float  # w / q

    def effective_sampling_rate(self, sampling: Sampling) -> float:
        """w: the probability that a step's gradient depends on the protected content."""
        if not isinstance(sampling, (FixedSizeSampling, PoissonSampling)):
            raise TypeError(f"sampling must be FixedSizeSampling(batch_size=B, dataset_size=N) or "
                            f"PoissonSampling(rate=q, dataset_size=N), got {sampling!r}.")
        return sampling.rate * self.amplification

    def one_step(self, rate: float, noise_multiplier: float, resolution: float) -> tuple[PLD, ...]:
        """The PLD(s) of one step at effective rate w = ``rate`` and noise multiplier z on
        the grid of spacing ``resolution``; δ of a composition is the max over the tuple.
        Substitution relations: the switching pair with Δ = 2 (units of C)."""
        return substitution_step(rate, noise_multiplier, resolution)

    def to_dict(self) -> dict:
        """Plain JSON: ``{"type": <class name>, <fields>}`` (:func:`relation_from_dict`)."""
        return {"type": type(self).__name__, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class PatchLevel(Relation):
    """Patch-level substitution (docs/method.md, "The patch relation"): one image changes
    inside one patch region; amplified by cropping with worst-case inclusion probability
    p* (:func:`patchdp.inclusion.inclusion_probability`). w = q·p*, Δ = 2."""

    inclusion_probability: float

    def __post_init__(self):
        object.__setattr__(self, "inclusion_probability",
                           _validation.rate("inclusion probability p*", self.inclusion_probability))

    @property
    def amplification(self) -> float:
        return self.inclusion_probability


@dataclasses.dataclass(frozen=True)
class ImageLevel(Relation):
    """Image-level substitution, standard DP-SGD (the paper's baseline): w = q, Δ = 2."""

    amplification = 1.0


@dataclasses.dataclass(frozen=True)
class GaussianAugmentation(Relation):
    """COMPARATOR, not a patchdp guarantee: amplification by Gaussian data augmentation.

    Each sampled image gets N(0, σ²) noise on every pixel; the patch changes the input by
    at most ``patch_sensitivity`` in L2 (e.g. sqrt(p_h·p_w·channels)·255), so the sampled
    example's input distributions differ in total variation by
    TV = 2Φ(sensitivity / 2σ) − 1, and w = q·TV: the two noisy inputs can be coupled to
    coincide with probability 1 − TV, so the example's gradient differs with probability
    at most TV. No credit is taken for crops. The trainer's ``accounting =
    "gaussian_augmentation"`` uses this relation alone, with the noise added before
    cropping (:func:`patchdp.training.gaussian_pixel_noise`).
    """

    noise_std: float
    patch_sensitivity: float

    def __post_init__(self):
        if not (self.noise_std > 0) or not (self.patch_sensitivity > 0):
            raise ValueError("GaussianAugmentation needs noise_std > 0 and patch_sensitivity > 0.")

    @property
    def amplification(self) -> float:
        return float(-special.expm1(special.log_ndtr(-self.patch_sensitivity / (2 * self.noise_std)) + math.log(2)))


@dataclasses.dataclass(frozen=True)
class AddRemove(Relation):
    """Add/remove one example with Poisson sampling (Opacus / jax-privacy convention):
    w = q, Δ = 1, remove and add pairs composed separately, the larger δ reported."""

    amplification = 1.0

    def effective_sampling_rate(self, sampling: Sampling) -> float:
        rate = super().effective_sampling_rate(sampling)
        if not isinstance(sampling, PoissonSampling):
            raise ValueError("the add/remove relation is accounted for Poisson sampling only; "
                             "use PoissonSampling, or ImageLevel() for fixed-size batches.")
        return rate

    def one_step(self, rate: float, noise_multiplier: float, resolution: float) -> tuple[PLD, ...]:
        """The Poisson-subsampled Gaussian with Δ = 1: its remove and add pairs."""
        return add_remove_step(rate, noise_multiplier, resolution)


def effective_sampling_rate(sampling: Sampling, relation: Relation) -> float:
    """w: the probability that a step's gradient depends on the protected content;
    TypeError unless ``relation`` is one of this module's relations."""
    if not isinstance(relation, Relation):
        raise TypeError(f"relation must be PatchLevel(inclusion_probability), ImageLevel(), AddRemove() "
                        f"or GaussianAugmentation(...), got {relation!r}.")
    return relation.effective_sampling_rate(sampling)


_KINDS = {cls.__name__: cls for cls in (PatchLevel, ImageLevel, GaussianAugmentation, AddRemove)}


def relation_from_dict(spec) -> Relation:
    """The relation that :meth:`Relation.to_dict` wrote; ValueError naming an unknown type."""
    spec = dict(spec)
    name = spec.pop("type", None)
    if name not in _KINDS:
        raise ValueError(f"unknown relation type {name!r}; expected one of {', '.join(_KINDS)}.")
    return _KINDS[name](**spec)
