"""patchdp: DP-SGD for vision models with patch-level privacy amplified by random cropping.

The public API, importable from here (``import patchdp``); see the README's API section
for one example of each. One :class:`CropSpec` drives both the on-device crops and the
accountant's inclusion probability p*; one sampling object (:class:`FixedSizeSampling`,
:class:`PoissonSampling`) both draws the batches and gives the accountant its rate q.

- the mechanism: ``DPSGD`` (sampling, crops, patch, clip norm, noise, accounting: the
  step, its noise and its ledger are all built from it)
- crops and inclusion: ``CropSpec``, ``Patch``, ``inclusion_probability``, ``inclusion_map``,
  ``crop``, ``crop_batch`` (the random crops, on device)
- sampling schemes: ``FixedSizeSampling``, ``PoissonSampling``, ``SamplingSeed``
- relations (what is protected): ``PatchLevel``, ``ImageLevel``, ``AddRemove``,
  ``GaussianAugmentation``
- accounting: ``epsilon``, ``delta``, ``privacy_profile``, ``numerical_floor``,
  ``calibrate_noise``, ``max_steps``, ``Ledger`` (of a mechanism)
- training: ``private_grad``, ``gaussian_noise``, ``make_train_step``, ``TrainState``,
  ``Batch``, ``linen_loss``, ``gaussian_pixel_noise``

Names are loaded on first use (module ``__getattr__``), so ``import patchdp`` itself
imports neither jax nor scipy.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("patchdp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_HOMES = {
    "patchdp.mechanism": ("DPSGD",),
    "patchdp.inclusion": ("CropSpec", "Patch", "inclusion_probability", "inclusion_map"),
    "patchdp.crops": ("crop", "crop_batch"),
    "patchdp.sampling": ("FixedSizeSampling", "PoissonSampling", "SamplingSeed"),
    "patchdp.accounting": ("PatchLevel", "ImageLevel", "AddRemove", "GaussianAugmentation", "epsilon", "delta",
                           "privacy_profile", "numerical_floor", "calibrate_noise", "max_steps", "Ledger"),
    "patchdp.noise": ("gaussian_noise",),
    "patchdp.training": ("private_grad", "make_train_step", "TrainState", "Batch", "linen_loss",
                         "gaussian_pixel_noise"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = ["__version__", *_HOME]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'patchdp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
