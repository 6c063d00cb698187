"""Speed of the privacy core, measured side by side in one run.

    .venv/bin/python benchmarks/bench_privacy.py

Inclusion (targets from issue #2): p* for a disc of diameter 10 in a 1000×1000 image
with crop 100 in < 30 ms; a 1024×2048 image with any mask in < 100 ms. Compared with
an FFT convolution of the same dilated mask (scipy) and with the reference
implementation's loop over placements (timed on a slice, extrapolated).

Accounting (targets): calibrating z for the Cityscapes-like setting (T = 1500) ≤ 2 s;
ε for 10^5 steps ≤ 2 s. Compared with composing the same single-step PLD with
dp_accounting's own ``self_compose`` and ``get_epsilon_for_delta``.
"""

from __future__ import annotations

import time

import numpy as np
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import signal

from patchdp import accounting as acc
from patchdp.inclusion import CropSpec, Patch, inclusion_probability


def best_time(fn, repeat=5):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def fft_inclusion(image, crop, patch):
    """Independent method: hits(t) = Σ_u 1_U(u)·D(u − t + c − 1), the correlation of the
    crop-offset indicator with the crop-dilated mask D, by FFT (padding 0)."""
    (H, W), (c, _), mask = image, crop, patch.mask
    offsets = np.zeros((H, W))
    offsets[: H - c + 1, : W - c + 1] = 1
    dilated = signal.fftconvolve(mask.astype(float), np.ones((c, c))) > 0.5
    counts = signal.fftconvolve(offsets, dilated[::-1, ::-1].astype(float))
    ph, pw = mask.shape
    return np.rint(counts[ph - 1: H, pw - 1: W]).max() / ((H - c + 1) * (W - c + 1))


def loop_inclusion_seconds(image, crop, patch, placements=200):
    """The reference implementation's method (every placement × every pixel), timed on a
    few placements and extrapolated to all of them."""
    (H, W), (c, _), mask = image, crop, patch.mask
    pixels = np.argwhere(mask)
    start = time.perf_counter()
    for k in range(placements):
        a, b = divmod(k * 7919, H - mask.shape[0] + 1)
        b %= W - mask.shape[1] + 1
        hit = np.zeros((H - c + 1, W - c + 1), bool)
        for i, j in pixels:
            r, s = a + i, b + j
            hit[max(r - c + 1, 0): r + 1, max(s - c + 1, 0): s + 1] = True
        hit.sum()
    per = (time.perf_counter() - start) / placements
    return per * (H - mask.shape[0] + 1) * (W - mask.shape[1] + 1)


def main():
    print("== inclusion probability p* ==")
    disc = Patch.disc(10)
    t_disc = best_time(lambda: inclusion_probability((1000, 1000), CropSpec(100), disc))
    t_fft = best_time(lambda: fft_inclusion((1000, 1000), (100, 100), disc), repeat=2)
    assert abs(fft_inclusion((1000, 1000), (100, 100), disc)
               - inclusion_probability((1000, 1000), CropSpec(100), disc)) < 1e-12
    t_loop = loop_inclusion_seconds((1000, 1000), (100, 100), disc)
    print(f"disc d=10, 1000x1000, crop 100: patchdp {t_disc * 1e3:7.1f} ms (target < 30 ms)   "
          f"FFT convolution {t_fft * 1e3:7.1f} ms ({t_fft / t_disc:.1f}x slower)   "
          f"numpy loop over placements ~{t_loop / 3600:.1f} h extrapolated ({t_loop / t_disc:.0e}x slower)")
    for name, patch in [("disc d=10", Patch.disc(10)), ("blob d=40", Patch.blob(40)),
                        ("cluster d=20", Patch.cluster(20)), ("rect 10x10", Patch.rectangle(10))]:
        t = best_time(lambda: inclusion_probability((1024, 2048), CropSpec(505), patch))
        print(f"{name:12s} 1024x2048, crop 505: patchdp {t * 1e3:7.1f} ms (target < 100 ms)")

    print("\n== accounting ==")
    city = dict(sampling=acc.FixedSizeSampling(batch_size=200, dataset_size=2975), relation=acc.PatchLevel(0.329))
    start = time.perf_counter()
    z = acc.calibrate_noise(8.0, 1e-5, 1500, **city)
    t_cal = time.perf_counter() - start
    print(f"calibrate z for ε = 8, δ = 1e-5, T = 1500 (Cityscapes-like): {t_cal:.2f} s "
          f"(target ≤ 2 s) → z = {z:.4f}")
    long = dict(sampling=acc.FixedSizeSampling(batch_size=100, dataset_size=10 ** 5), relation=acc.PatchLevel(0.0146))
    acc._single_step.cache_clear()
    start = time.perf_counter()
    eps = acc.epsilon(1.0, 10 ** 5, 1e-5, **long)
    t_ours = time.perf_counter() - start
    (one,) = acc._single_step("substitution", 1e-3 * 0.0146, 1.0, acc.DEFAULT_RESOLUTION)
    theirs = pld_lib.PrivacyLossDistribution(
        pld_pmf.DensePLDPmf(one.step, one.offset, one.probs.copy(), one.infinity_mass, True))
    start = time.perf_counter()
    eps_theirs = theirs.self_compose(10 ** 5).get_epsilon_for_delta(1e-5)
    t_theirs = time.perf_counter() - start
    print(f"ε for 1e5 steps (w = 1.46e-5, z = 1): {t_ours:.2f} s incl. building the PLD "
          f"(target ≤ 2 s) → ε = {eps:.4f}; dp_accounting composing the same PLD: "
          f"{t_theirs:.2f} s → ε = {eps_theirs:.4f} ({t_theirs / t_ours:.1f}x our time)")


if __name__ == "__main__":
    main()
