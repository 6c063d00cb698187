"""The privacy report: patch-level against image-level privacy, computed once, from a ledger.

:func:`privacy_comparison` turns the steps a ledger records into every guarantee a user
compares (patch level, image-level substitution, add/remove with Poisson sampling, and the
Gaussian-augmentation comparator for such runs); :func:`noise_comparison` gives the noise
each accounting needs for one ε. :func:`privacy_rows` renders both as (label, value)
rows, which the CLI prints as a table and the run's ``report.md`` as Markdown: one
computation, one rendering, for ``patchdp privacy``, ``patchdp calibrate``, ``train``
and ``demo`` alike. Every ε comes from a ledger (the steps taken, or a planned number of
steps recorded in a fresh ledger).

Strict JSON: a value that does not exist (a ratio to ε = 0, a noise multiplier no
search reaches, a non-finite ε) is None, with ``<key>_reason`` beside it.
"""

from __future__ import annotations

import math

from patchdp.accounting import Ledger
from patchdp.mechanism import DPSGD
from patchdp.sampling import PoissonSampling

__all__ = ["LABELS", "privacy_comparison", "noise_comparison", "privacy_rows", "noise_origin", "markdown", "strict", "shown", "noise_runs_text"]

LABELS = {
    "epsilon_patch": "ε patch-level, substitution",
    "epsilon_image": "ε image-level, substitution (paper's baseline)",
    "epsilon_add_remove": "ε image-level, add/remove + Poisson (Opacus/jax-privacy)",
    "epsilon_gaussian_augmentation": "ε Gaussian augmentation, w = q·TV (paper's comparator)",
}
"""How every report names the guarantees. Substitution (one image replaced, or changed
inside one patch) is the paper's relation; add/remove (one image added or removed) with
Poisson sampling at the same rate q is what Opacus and jax-privacy report; its
sensitivity is C instead of 2C, so its ε at the same noise is much smaller. Compare a
number from those libraries with ``epsilon_add_remove``, and patch-level with
``epsilon_image``. A mechanism with ``accounting = "gaussian_augmentation"`` also reports
its own guarantee, ``epsilon_gaussian_augmentation`` (pixel noise on the input, no credit
for the crops)."""


def _variants(mechanism: DPSGD) -> dict[str, DPSGD]:
    """The same mechanism accounted under each compared relation, by report key. The
    add/remove view is Poisson sampling at the same rate q (for fixed-size batches it
    describes a comparable Poisson run, not a guarantee of the run itself)."""
    poisson = PoissonSampling(rate=mechanism.sampling_rate, dataset_size=mechanism.sampling.dataset_size)
    variants = {"epsilon_image": mechanism.replace(accounting="image"),
                "epsilon_add_remove": mechanism.replace(accounting="add_remove", sampling=poisson)}
    if mechanism.patch is not None and mechanism.image_shape is not None:
        variants["epsilon_patch"] = mechanism.replace(accounting="patch")
    if mechanism.accounting == "gaussian_augmentation":
        variants["epsilon_gaussian_augmentation"] = mechanism
    return variants


def privacy_comparison(ledger: Ledger) -> dict:
    """ε at the ledger's δ for the steps it records, in runs of (z, count), under every
    compared relation (:data:`LABELS`): the ledger's own accounting is its ε, the others
    replay the same runs (:meth:`~patchdp.accounting.Ledger.replay`).

    Keys: inclusion_probability (p*), sampling_rate (q), effective_sampling_rate (w of the
    mechanism's own accounting), noise_runs ([[z, count], ...]), noise_multiplier (z, or
    None when it changed), steps, delta, epsilon_patch, epsilon_image, epsilon_ratio
    (image / patch), epsilon_add_remove; for a Gaussian-augmentation mechanism also
    augmentation_tv (its w is q·TV) and epsilon_gaussian_augmentation; with Poisson
    sampling delta_overflow (T × the per-step overflow probability: the guarantee holds
    at δ + delta_overflow, :mod:`patchdp.sampling`). Strict JSON.
    """
    m = ledger.mechanism
    runs = [list(run) for run in ledger.runs]
    privacy = {"inclusion_probability": m.inclusion_probability, "sampling_rate": m.sampling_rate,
               "effective_sampling_rate": m.effective_sampling_rate, "noise_runs": runs,
               "noise_multiplier": runs[0][0] if len(runs) == 1 else None, "steps": ledger.steps,
               "delta": ledger.delta}
    if len(runs) > 1:
        privacy["noise_multiplier_reason"] = "the noise multiplier changed during the run: see noise_runs"
    for key, variant in _variants(m).items():
        privacy[key] = ledger.epsilon() if variant == m else ledger.replay(variant).epsilon()
        if math.isinf(privacy[key]):
            privacy[key], privacy[f"{key}_reason"] = None, (
                f"∞ (δ = {ledger.delta:g} is not reachable: raise the noise or δ, or take fewer steps)")
    if "epsilon_patch" not in privacy:
        privacy["epsilon_patch"], privacy["epsilon_patch_reason"] = None, "no protected patch given"
    if m.accounting == "gaussian_augmentation":
        privacy["augmentation_tv"] = m.relation.amplification
    if isinstance(m.sampling, PoissonSampling):
        privacy["delta_overflow"] = ledger.steps * m.sampling.overflow_probability
    _ratio(privacy, "epsilon_ratio", "epsilon_image", "epsilon_patch")
    return strict(privacy)


def noise_comparison(mechanism: DPSGD, target_epsilon: float, steps: int) -> dict:
    """The smallest constant noise multiplier with which ``steps`` steps of ``mechanism``
    are (target_epsilon, δ)-DP under patch-level and under image-level accounting; None
    with a reason where none exists. Keys: target_epsilon, steps, delta,
    noise_multiplier_patch, noise_multiplier_image, noise_ratio (image / patch)."""
    needed = {"target_epsilon": target_epsilon, "steps": steps, "delta": mechanism.delta}
    target = f"{target_epsilon:g}" if isinstance(target_epsilon, (int, float)) else f"{target_epsilon}"
    fields = {f: getattr(mechanism, f) for f in ("sampling", "clip_norm", "delta", "crop", "image_shape", "patch",
                                                 "clipping", "resolution")}
    for level in ("patch", "image"):
        key = f"noise_multiplier_{level}"
        try:
            needed[key] = DPSGD.calibrated(target_epsilon=target_epsilon, steps=steps, accounting=level,
                                           **fields).noise_multiplier
        except ValueError as error:
            needed[key], needed[f"{key}_reason"] = None, f"no noise multiplier reaches ε = {target}: {error}"
    _ratio(needed, "noise_ratio", "noise_multiplier_image", "noise_multiplier_patch")
    return strict(needed)


def privacy_rows(privacy: dict, same_epsilon: dict | None = None, *, how: str = "") -> list[tuple[str, str]]:
    """The (label, value) rows of a :func:`privacy_comparison` (and, if given, a
    :func:`noise_comparison` for its patch-level ε), for the CLI table and report.md.
    ``how`` says where the noise multiplier came from (e.g. ", calibrated by ...")."""
    p = privacy
    rows = [("noise multiplier z", f"{noise_runs_text(p)}  (noise std = z · clip norm{how})"),
            ("p* (a crop hits the patch)", shown(p, "inclusion_probability", ".6g")),
            ("q (sampling rate)", f"{p['sampling_rate']:.6g}"),
            ("w (effective sampling rate)", f"{p['effective_sampling_rate']:.6g}"),
            (LABELS["epsilon_patch"], shown(p, "epsilon_patch", ".4f")),
            (f"{LABELS['epsilon_image']}, same noise", shown(p, "epsilon_image", ".4f")
             + (f"  ({p['epsilon_ratio']:.2f}x patch-level)" if p["epsilon_ratio"] is not None else "")),
            (f"{LABELS['epsilon_add_remove']}, same noise", shown(p, "epsilon_add_remove", ".4f"))]
    if "epsilon_gaussian_augmentation" in p:
        rows.append((f"{LABELS['epsilon_gaussian_augmentation']}, TV = {p['augmentation_tv']:.4g}",
                     shown(p, "epsilon_gaussian_augmentation", ".4f")))
    if same_epsilon is not None:
        rows.append((f"noise z image-level DP needs for ε = {shown(p, 'epsilon_patch', '.4g')}",
                     f"{shown(same_epsilon, 'noise_multiplier_image', '.4f')}  "
                     f"({shown(same_epsilon, 'noise_ratio', '.2f')}x the noise)"))
    if "delta_overflow" in p:
        rows.append(("δ added by stopping on Poisson overflow", f"{p['delta_overflow']:.3g}"))
    return rows


def noise_origin(result: dict) -> str:
    """Where a run's noise multiplier came from (a trainer report), as a clause for
    :func:`privacy_rows`' ``how``."""
    if result["noise_calibrated"]:
        return f", calibrated by {result['accounting']}-level accounting for ε = {result['budget_epsilon']:g}"
    return ""


def markdown(result: dict) -> str:
    """A trainer report (``patchdp.trainer.final_report``) as a Markdown page (the rows of :func:`privacy_rows`,
    as the CLI prints them); a value that does not exist shows its reason."""
    p = result["privacy"]
    c = result["config"]
    lines = [f"# patchdp run: {c['name']}", "",
             f"{c['model']} on {c['dataset']}, {result['steps']} of {result['steps_planned']} planned steps "
             f"({result['stop_reason']}), {result['seconds']:.0f} s. Seed: {result['seed']}.", "",
             *(f"**Warning:** {warning}" for warning in result["warnings"]),
             f"**Secrets:** {result['secrets']}", "",
             "| score | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result["scores"].items()]
    if p is not None:
        lines += ["", f"## Privacy (δ = {p['delta']:.3g})", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {label} | {value} |"
                  for label, value in privacy_rows(p, result["same_epsilon"], how=noise_origin(result))]
        lines += ["", "Patch-level and image-level ε are for the substitution relation (one image replaced; "
                  "the paper's comparison). Opacus and jax-privacy report add/remove ε (one image added or "
                  "removed, Poisson sampling): compare their numbers with the add/remove row."]
    else:
        lines += ["", "No step was taken: nothing was released."]
    return "\n".join(lines) + "\n"


def _ratio(section: dict, key: str, numerator: str, denominator: str) -> None:
    """section[key] = section[numerator] / section[denominator], or None with a reason."""
    top, bottom = section[numerator], section[denominator]
    if top is not None and bottom is not None and math.isfinite(top) and math.isfinite(bottom) and bottom > 0:
        section[key] = top / bottom
    else:
        section[key], section[f"{key}_reason"] = None, f"{numerator} / {denominator} is undefined for {top} / {bottom}"


def strict(value):
    """``value`` with every non-finite float replaced by None and, in a dict,
    ``<key>_reason`` beside it, so that ``json.dumps(value, allow_nan=False)`` accepts it."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                out[key], out[f"{key}_reason"] = None, f"{item} (not a finite number)"
            else:
                out[key] = strict(item)
        return out
    if isinstance(value, list):
        return [None if isinstance(item, float) and not math.isfinite(item) else strict(item) for item in value]
    return value


def shown(section: dict, key: str, spec: str) -> str:
    """``section[key]`` formatted with ``spec``; when it is None, its reason: "∞ (why)"
    for an infinite ε, else "n/a (why)"."""
    value = section.get(key)
    if value is not None:
        return format(value, spec)
    reason = section.get(f"{key}_reason", "unknown")
    return reason if reason.startswith("∞") else f"n/a ({reason})"


def noise_runs_text(privacy: dict) -> str:
    """The noise of a run's steps: "1" or, when it changed, "1 (40 steps), then 3 (40 steps)"."""
    runs = privacy["noise_runs"]
    if len(runs) == 1:
        return f"{runs[0][0]:.4g}"
    return ", then ".join(f"{z:.4g} ({count} steps)" for z, count in runs)
