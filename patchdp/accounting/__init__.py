"""Privacy accounting for DP-SGD with patch-level privacy amplified by random cropping.

One step of DP-SGD adds N(0, (z·C)²) to the sum of per-example gradients clipped to norm
C. In units of C (noise std z, sensitivity Δ) the privacy of one step under the relations
below is that of a *dominating pair* of distributions on the real line (docs/method.md, "The switching substitution profile"):

- **patch** (:class:`PatchLevel`, the point of patchdp) and **image-level substitution**
  (:class:`ImageLevel`, the baseline): the protected image stays in the dataset and its
  clipped gradient can change by up to 2C only when it is sampled AND (patch level) one of
  its crops hits the patch. With effective sampling rate w = q·p* (w = q at image level)
  and Δ = 2, one step is dominated by (Zhu, Dong & Wang 2022)

      ε ≥ 0 ("remove" branch):  P = (1 − w)·N(0, z²) + w·N(Δ, z²)  against  Q = N(0, z²),
      ε < 0 ("add" branch):     Q against P,

  which together are ONE privacy profile δ(ε), i.e. one symmetric privacy loss
  distribution (PLD), composed T times.
- **add/remove** (:class:`AddRemove`, Poisson sampling only, Δ = 1): the Opacus /
  jax-privacy convention, composing the remove pair and the add pair separately and
  taking the larger δ, for comparing numbers with those libraries.

Numerics: each pair's profile is evaluated in closed form (Gaussian tails in log space)
on the grid ε_i = i·Δε, turned into a PLD with the pessimistic connect-the-dots
discretisation of Doroshenko et al. (2022) (implemented here from its definition; only
tests and :mod:`patchdp.interop` import ``dp_accounting``), self-composed with an
FFT, and queried for ε(δ) or δ(ε). Every approximation rounds towards *less* privacy:
the discretisation is pessimistic, truncated tails move to ε = +∞, the lowest losses
are lumped upwards, and the FFT's floating-point error, bounded a priori for any CPU
(:mod:`patchdp.accounting.composition`), is added to every δ. Tests cross-check against dp_accounting's
PLD code and its RDP accountant (the latter a sanity check, not a proof: see
:mod:`patchdp.interop` for why no standard DpEvent provably bounds the switching pair).

Units: ``noise_multiplier`` z is the noise std divided by the clip norm C; ``steps`` T is
the number of DP-SGD steps; ``delta`` δ ∈ (0, 1); ``epsilon`` ε > 0 in nats.

The package in layers, each importing only those above it in this list:

- :mod:`~patchdp.accounting.loss` — one step's PLD: closed-form profiles, connect-the-dots;
- :mod:`~patchdp.accounting.composition` — FFT composition with derived error bounds, δ(ε), ε(δ);
- :mod:`~patchdp.accounting.relations` — what is protected; each relation builds its own step;
- :mod:`~patchdp.accounting.queries` — ``epsilon``, ``delta``, ``privacy_profile``,
  ``numerical_floor``, ``calibrate_noise``, ``max_steps``;
- :mod:`~patchdp.accounting.ledger` — the steps a mechanism actually took;
- :mod:`~patchdp.accounting.closed_forms` — the Gaussian mechanism, data-level noise.

The sampling schemes live in :mod:`patchdp.sampling` (one object draws the batches and
gives the accountant its rate q); the mechanism that ties sampling, crops, clipping, noise
and relation together is :class:`patchdp.DPSGD` (:mod:`patchdp.mechanism`).
"""

from patchdp.accounting.closed_forms import (data_level_noise_profile, gaussian_mechanism_delta,
                                             gaussian_mechanism_epsilon)
from patchdp.accounting.ledger import Ledger
from patchdp.accounting.queries import (DEFAULT_RESOLUTION, calibrate_noise, delta, epsilon, max_steps,
                                        numerical_floor, privacy_profile)
from patchdp.accounting.relations import (AddRemove, GaussianAugmentation, ImageLevel, PatchLevel, Relation,
                                          effective_sampling_rate, relation_from_dict)

__all__ = [
    "PatchLevel", "ImageLevel", "AddRemove", "GaussianAugmentation", "Relation", "relation_from_dict",
    "effective_sampling_rate", "epsilon", "delta", "privacy_profile", "numerical_floor", "calibrate_noise",
    "max_steps", "Ledger", "gaussian_mechanism_delta", "gaussian_mechanism_epsilon", "data_level_noise_profile",
    "DEFAULT_RESOLUTION",
]
