"""The mechanism: one frozen object that says what a DP-SGD step does and what it protects.

:class:`DPSGD` is to patchdp what a ``DpEvent`` is to dp_accounting, extended to the
step itself. It holds every number the privacy guarantee rests on — the sampling scheme
(q, and the expected batch size the noisy sum is divided by), the crop distribution, the
image size and protected patch (hence p*), the clip norm C, the noise multiplier z, the
pixel noise of Gaussian augmentation, the clipping method, δ and the accountant's grid —
and it is validated once, here, at construction. Everything that must agree is *derived*
from it, so nothing can be given its own z, C, crops or sampling:

    mechanism ──► training.make_train_step   crops, clip to C, + N(0, (z·C)²) once, / E[B]
              ├─► mechanism.noise()          the optax noise transformation
              └─► mechanism.ledger()         ε of the steps taken (acc.Ledger)
                  mechanism.epsilon(T), .privacy_profile(T, ε), .max_steps(ε), ...

Which part carries which part of the guarantee (docs/method.md, "Who carries what"):
``sampling`` gives q and draws the batches; ``crop`` draws the crops on device and gives
p* with ``image_shape`` and ``patch``; ``clip_norm`` bounds each example's contribution;
``noise_multiplier`` scales the noise; ``accounting`` names the relation the ε is for.

It is immutable (``dataclasses.FrozenInstanceError`` on assignment), keyword-only, and
serialises to strict JSON (:meth:`DPSGD.to_dict` / :meth:`DPSGD.from_dict`): a run's
checkpoints and reports store this object, and a resumed run is refused, one line naming
each difference, when its mechanism differs in anything but the noise (which the ledger
composes explicitly, :meth:`patchdp.acc.Ledger.change_noise`).

Importing this module imports neither jax nor dp_accounting.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Sequence

import numpy as np

from patchdp import _validation, accounting as acc
from patchdp.accounting import queries
from patchdp.accounting.relations import AddRemove, GaussianAugmentation, ImageLevel, PatchLevel, Relation
from patchdp.inclusion import CropSpec, Patch, image_hw, inclusion_probability
from patchdp.sampling import FixedSizeSampling, PoissonSampling, Sampling, sampling_from_dict

__all__ = ["DPSGD", "ACCOUNTINGS", "CLIPPING"]

ACCOUNTINGS = ("patch", "image", "add_remove", "gaussian_augmentation")
"""What the ε is for: patch level (w = q·p*), image-level substitution (w = q, standard
DP-SGD), add/remove with Poisson sampling (the Opacus / jax-privacy convention), or the
Gaussian-augmentation comparator (w = q·TV, no credit for the crops)."""

CLIPPING = ("auto", "per_example", "direct", "unfold", "ghost")
"""The clipping methods (``patchdp.clipping.CLIPPING``, named here without importing jax);
all compute the same clipped sum."""

PIXEL_RANGE = 255.0  # the most one pixel value can change (uint8 images)


@functools.lru_cache(maxsize=32)
def _p_star(image: tuple[int, int], crop: CropSpec, patch: Patch) -> float:
    return inclusion_probability(image, crop, patch)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSGD:
    """One DP-SGD step with crops, and the guarantee it is accounted under.

    Attributes:
      sampling: :class:`~patchdp.FixedSizeSampling` or :class:`~patchdp.PoissonSampling`
        with its ``dataset_size`` (the step divides by its expected batch size).
      clip_norm: C > 0, finite: each example's whole gradient is clipped to norm ≤ C.
      noise_multiplier: z ≥ 0, finite: the noise std on the clipped sum is z·C (z = 0
        adds none, and the accountant answers ε = ∞).
      delta: δ in (0, 1) of the (ε, δ) guarantee (a warning above 1/N).
      crop: the crop distribution (:class:`~patchdp.CropSpec`), or None to train on the
        whole images (then p* = 1: no amplification).
      image_shape: (H, W) or (H, W, C) of the training images; needed for patch-level
        and Gaussian-augmentation accounting (C for the latter) and checked against the crop.
      patch: the protected region (:class:`~patchdp.Patch`); needed for ``"patch"`` and
        ``"gaussian_augmentation"`` accounting.
      accounting: one of :data:`ACCOUNTINGS` (default ``"patch"``).
      augmentation_noise: σ_aug, pixel noise std (units of 0–255) added to every sampled
        image before cropping, or None; required by ``"gaussian_augmentation"``.
      clipping: one of :data:`CLIPPING` (all exact; ``"auto"`` is the fastest).
      resolution: the accountant's PLD grid spacing (nats).

    Derived (read-only): ``relation``, ``inclusion_probability`` (p*, or None without a
    patch), ``sampling_rate`` (q), ``effective_sampling_rate`` (w), ``expected_batch_size``.
    """

    sampling: Sampling
    clip_norm: float
    noise_multiplier: float
    delta: float
    crop: CropSpec | None = None
    image_shape: tuple[int, ...] | None = None
    patch: Patch | None = None
    accounting: str = "patch"
    augmentation_noise: float | None = None
    clipping: str = "auto"
    resolution: float = queries.DEFAULT_RESOLUTION
    relation: Relation = dataclasses.field(init=False, repr=False, compare=False)
    inclusion_probability: float | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        if not isinstance(self.sampling, (FixedSizeSampling, PoissonSampling)) or \
                getattr(self.sampling, "dataset_size", None) is None:
            raise TypeError(f"DPSGD: sampling must be FixedSizeSampling(batch_size=B, dataset_size=N) or "
                            f"PoissonSampling(rate=q, dataset_size=N), got {self.sampling!r}.")
        set_("clip_norm", _validation.clip_norm(self.clip_norm, "DPSGD: clip_norm C"))
        set_("noise_multiplier", queries.check_noise(self.noise_multiplier))
        set_("delta", queries.check_delta(self.delta, self.sampling))
        if self.accounting not in ACCOUNTINGS:
            raise ValueError(f"DPSGD: accounting must be one of {', '.join(ACCOUNTINGS)}, got {self.accounting!r}.")
        if self.clipping not in CLIPPING:
            raise ValueError(f"DPSGD: clipping must be one of {', '.join(CLIPPING)} (all exact; 'auto' is the "
                             f"fastest), got {self.clipping!r}.")
        set_("resolution", queries.check_resolution(self.resolution))
        if self.augmentation_noise is not None:
            set_("augmentation_noise", _validation.number("DPSGD: augmentation_noise (pixel noise std)",
                                                          self.augmentation_noise, 0, math.inf, low_open=True))
        if self.crop is not None and not isinstance(self.crop, CropSpec):
            raise TypeError(f"DPSGD: crop must be a patchdp.CropSpec or None, got {type(self.crop).__name__}.")
        if self.patch is not None and not isinstance(self.patch, Patch):
            raise TypeError(f"DPSGD: patch must be a patchdp.Patch or None, got {type(self.patch).__name__}.")
        needs = {"patch": ("image_shape", "patch"),
                 "gaussian_augmentation": ("image_shape", "patch", "augmentation_noise")}.get(self.accounting, ())
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"DPSGD: accounting {self.accounting!r} needs {' and '.join(missing)}.")
        if self.image_shape is not None:
            shape = self.image_shape
            if not isinstance(shape, Sequence) or len(shape) not in (2, 3):
                raise ValueError(f"DPSGD: image_shape must be (H, W) or (H, W, C), got {shape!r}.")
            set_("image_shape", image_hw(shape) + tuple(_validation.integer("image channels", c) for c in shape[2:]))
            if self.crop is not None:
                self.crop.offset_ranges(self.image_shape)  # the crop must fit the padded image
        p_star = None
        if self.patch is not None and self.image_shape is not None:
            p_star = 1.0 if self.crop is None else _p_star(self.image_shape[:2], self.crop, self.patch)
        set_("inclusion_probability", p_star)
        set_("relation", self._relation())
        self.relation.effective_sampling_rate(self.sampling)  # e.g. add/remove needs Poisson sampling

    def _relation(self) -> Relation:
        if self.accounting == "patch":
            return PatchLevel(self.inclusion_probability)
        if self.accounting == "gaussian_augmentation":
            if len(self.image_shape) != 3:
                raise ValueError("DPSGD: Gaussian-augmentation accounting needs image_shape (H, W, C): the patch's "
                                 "L2 sensitivity counts channels.")
            sensitivity = math.sqrt(self.patch.area * self.image_shape[2]) * PIXEL_RANGE
            return GaussianAugmentation(self.augmentation_noise, sensitivity)
        return AddRemove() if self.accounting == "add_remove" else ImageLevel()

    # ------------------------------------------------------------------ derived numbers

    @property
    def sampling_rate(self) -> float:
        """q."""
        return self.sampling.rate

    @property
    def effective_sampling_rate(self) -> float:
        """w = q · (p*, TV or 1): the probability that a step depends on the protected content."""
        return self.relation.effective_sampling_rate(self.sampling)

    @property
    def expected_batch_size(self) -> float:
        """E[B]: what the noisy clipped sum is divided by (B, or q·N for Poisson sampling)."""
        return self.sampling.expected_batch_size

    # ------------------------------------------------------------------ constructors

    @classmethod
    def calibrated(cls, *, target_epsilon: float, steps: int, **fields) -> "DPSGD":
        """The mechanism (``fields`` as for the constructor, without ``noise_multiplier``)
        with the smallest z for which ``steps`` steps are (target_epsilon, δ)-DP under its
        accounting (:func:`patchdp.acc.calibrate_noise`, rounded up)."""
        if "noise_multiplier" in fields:
            raise TypeError("DPSGD.calibrated computes noise_multiplier; do not pass one.")
        draft = cls(noise_multiplier=1.0, **fields)  # validates everything but z
        z = acc.calibrate_noise(target_epsilon, draft.delta, steps, sampling=draft.sampling,
                                       relation=draft.relation, resolution=draft.resolution)
        return draft.replace(noise_multiplier=z)

    def replace(self, **changes) -> "DPSGD":
        """A copy with ``changes``, validated again (the object itself never changes)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ the accountant

    def epsilon(self, steps: int) -> float:
        """ε at δ after ``steps`` steps of this mechanism (an upper bound)."""
        return acc.epsilon(self.noise_multiplier, steps, self.delta, **self._accountant())

    def privacy_profile(self, steps: int, epsilons) -> np.ndarray:
        """δ(ε) after ``steps`` steps on a grid of ε ≥ 0 (upper bounds)."""
        return acc.privacy_profile(self.noise_multiplier, steps, epsilons, **self._accountant())

    def numerical_floor(self, steps: int) -> float:
        """The δ below which the float64 accountant cannot be tight (see
        :func:`patchdp.acc.numerical_floor`)."""
        return acc.numerical_floor(self.noise_multiplier, steps, **self._accountant())

    def max_steps(self, target_epsilon: float, limit: int = 10 ** 7) -> int:
        """The most steps that stay (target_epsilon, δ)-DP (0 if not even one)."""
        if self.noise_multiplier == 0:
            return 0
        return acc.max_steps(self.noise_multiplier, target_epsilon, self.delta, limit=limit,
                                    **self._accountant())

    def ledger(self, budget_epsilon: float | None = None) -> acc.Ledger:
        """A new :class:`~patchdp.acc.Ledger` recording steps of this mechanism."""
        return acc.Ledger(self, budget_epsilon=budget_epsilon)

    def _accountant(self) -> dict:
        return dict(sampling=self.sampling, relation=self.relation, resolution=self.resolution)

    # ------------------------------------------------------------------ the step's noise

    def noise(self):
        """The Gaussian mechanism of this step as an optax transformation:
        ``patchdp.gaussian_noise(z, C, E[B])`` (imports jax)."""
        from patchdp.noise import gaussian_noise

        return gaussian_noise(self.noise_multiplier, self.clip_norm, self.expected_batch_size)

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        """Strict JSON (no NaN or ∞) that :meth:`from_dict` turns back into an equal mechanism."""
        return {
            "sampling": self.sampling.to_dict(),
            "clip_norm": self.clip_norm, "noise_multiplier": self.noise_multiplier, "delta": self.delta,
            "crop": None if self.crop is None else self.crop.to_dict(),
            "image_shape": None if self.image_shape is None else list(self.image_shape),
            "patch": None if self.patch is None else self.patch.to_dict(),
            "accounting": self.accounting, "augmentation_noise": self.augmentation_noise,
            "clipping": self.clipping, "resolution": self.resolution,
        }

    @classmethod
    def from_dict(cls, state) -> "DPSGD":
        """The mechanism :meth:`to_dict` wrote; ValueError in one line for a missing,
        unknown or invalid entry."""
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        if not isinstance(state, dict) or set(state) != set(names):
            got = set(state) if isinstance(state, dict) else set()
            raise ValueError(f"not a DPSGD state (from DPSGD.to_dict): missing {sorted(set(names) - got)}, "
                             f"unknown {sorted(got - set(names))}.")
        values = dict(state, sampling=sampling_from_dict(state["sampling"]))
        for key, kind in (("crop", CropSpec), ("patch", Patch)):
            values[key] = None if state[key] is None else kind.from_dict(state[key])
        if state["image_shape"] is not None:
            values["image_shape"] = tuple(state["image_shape"])
        return cls(**values)

    def differences(self, saved: dict, ignore: tuple[str, ...] = ()) -> list[str]:
        """Each entry (``"crop.padding 0 → 4"``) in which this mechanism differs from the
        ``saved`` one (a :meth:`to_dict`), except the top-level keys in ``ignore``."""
        now, before = _flat(json.loads(json.dumps(self.to_dict()))), _flat(saved if isinstance(saved, dict) else {})
        keys = [k for k in dict.fromkeys([*before, *now]) if k.split(".")[0] not in ignore]
        return [f"{key} {before.get(key)!r} → {now.get(key)!r}" for key in keys if before.get(key) != now.get(key)]


def _flat(values: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    flat = {}
    for key, value in values.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat
