"""The numbers a user asks for, side by side: patch-level against image-level privacy.

These functions join the two halves of patchdp — :mod:`patchdp.inclusion` (p* from the
crop description and the patch shape) and :mod:`patchdp.accounting` (ε from w = q·p*) —
so that the CLI, the training loop and the experiments all report the same quantities
under the same names.
"""

from __future__ import annotations

import math

from patchdp import accounting
from patchdp.inclusion import CropSpec, Patch, inclusion_probability


LABELS = {
    "epsilon_patch": "ε patch-level, substitution",
    "epsilon_image": "ε image-level, substitution (paper's baseline)",
    "epsilon_add_remove": "ε image-level, add/remove + Poisson (Opacus/jax-privacy)",
    "epsilon_gaussian_augmentation": "ε Gaussian augmentation, w = q·TV (paper's comparator)",
}
"""How every report names the three guarantees. Substitution (one image replaced, or
changed inside one patch) is the paper's relation; add/remove (one image added or removed)
with Poisson sampling at the same rate q is what Opacus and jax-privacy report; its
sensitivity is C instead of 2C, so its ε at the same noise is much smaller. Compare a
number from those libraries with ``epsilon_add_remove``, and patch-level with
``epsilon_image``. A run with ``accounting = "gaussian_augmentation"`` also reports its
own guarantee, ``epsilon_gaussian_augmentation`` (pixel noise on the input, no credit
for the crops)."""


def add_remove_setting(sampling: accounting.Sampling) -> dict:
    """The Opacus / jax-privacy view of a run: Poisson sampling at the run's rate q and
    the add/remove relation (for fixed-size batches this describes a comparable Poisson
    run, not a guarantee of the run itself)."""
    return dict(sampling=accounting.PoissonSampling(rate=sampling.rate,
                                                    dataset_size=getattr(sampling, "dataset_size", None)),
                relation=accounting.AddRemove())


def _rates(image_shape, crop: CropSpec, patch: Patch, sampling: accounting.Sampling) -> dict:
    p_star = inclusion_probability(image_shape, crop, patch)
    return {"inclusion_probability": p_star, "sampling_rate": sampling.rate,
            "effective_sampling_rate": sampling.rate * p_star}


def privacy_report(*, image_shape, crop: CropSpec, patch: Patch, sampling: accounting.Sampling,
                   steps: int, delta: float, noise_multiplier: float,
                   resolution: float = accounting.DEFAULT_RESOLUTION) -> dict:
    """ε at δ for patch-level and image-level DP-SGD with the same noise and training
    (both substitution), and the add/remove ε with Poisson sampling at the same rate.

    Keys: inclusion_probability (p*), sampling_rate (q), effective_sampling_rate (w),
    epsilon_patch, epsilon_image, epsilon_ratio (image / patch), epsilon_add_remove
    (see :data:`LABELS`), and the inputs.
    """
    rates = _rates(image_shape, crop, patch, sampling)
    patch_level = accounting.PatchLevel(rates["inclusion_probability"])
    kwargs = dict(sampling=sampling, resolution=resolution)
    eps_patch = accounting.epsilon(noise_multiplier, steps, delta, relation=patch_level, **kwargs)
    eps_image = accounting.epsilon(noise_multiplier, steps, delta, relation=accounting.ImageLevel(), **kwargs)
    eps_add_remove = accounting.epsilon(noise_multiplier, steps, delta, resolution=resolution,
                                        **add_remove_setting(sampling))
    return {
        **rates,
        "noise_multiplier": noise_multiplier,
        "steps": steps,
        "delta": delta,
        "epsilon_patch": eps_patch,
        "epsilon_image": eps_image,
        "epsilon_ratio": eps_image / eps_patch if eps_patch > 0 else math.inf,
        "epsilon_add_remove": eps_add_remove,
    }


def noise_report(*, image_shape, crop: CropSpec, patch: Patch, sampling: accounting.Sampling,
                 steps: int, delta: float, target_epsilon: float,
                 resolution: float = accounting.DEFAULT_RESOLUTION) -> dict:
    """The smallest noise multiplier reaching (target_epsilon, δ) under patch-level and
    under image-level accounting. Keys: noise_multiplier_patch, noise_multiplier_image,
    noise_ratio (image / patch), inclusion_probability, sampling_rate,
    effective_sampling_rate, and the inputs."""
    rates = _rates(image_shape, crop, patch, sampling)
    patch_level = accounting.PatchLevel(rates["inclusion_probability"])
    kwargs = dict(sampling=sampling, resolution=resolution)
    z_patch = accounting.calibrate_noise(target_epsilon, delta, steps, relation=patch_level, **kwargs)
    z_image = accounting.calibrate_noise(target_epsilon, delta, steps, relation=accounting.ImageLevel(), **kwargs)
    return {
        **rates,
        "target_epsilon": target_epsilon,
        "steps": steps,
        "delta": delta,
        "noise_multiplier_patch": z_patch,
        "noise_multiplier_image": z_image,
        "noise_ratio": z_image / z_patch,
    }


def shown(section: dict, key: str, spec: str) -> str:
    """``section[key]`` formatted with ``spec``, or "n/a (<its reason>)" when it is None."""
    value = section.get(key)
    return format(value, spec) if value is not None else f"n/a ({section.get(f'{key}_reason', 'unknown')})"


def noise_runs_text(privacy: dict) -> str:
    """The noise of a run's steps: "1" or, when it changed, "1 (40 steps), then 3 (40 steps)"."""
    runs = privacy["noise_runs"]
    if len(runs) == 1:
        return f"{runs[0][0]:.4g}"
    return ", then ".join(f"{z:.4g} ({count} steps)" for z, count in runs)
