"""p*_k for up to k patches per image (patchdp.coverage) against brute force from the
definition: every k-tuple of placements, every crop offset, pixel by pixel."""

import functools
import itertools
import json
import operator
from fractions import Fraction

import numpy as np
import pytest

import patchdp
from patchdp.config import Config
from patchdp.coverage import union_inclusion
from patchdp.inclusion import CropSpec, Patch, inclusion_probability
from patchdp.mechanism import DPSGD
from patchdp.sampling import FixedSizeSampling


def hit_sets(image, crop: CropSpec, patch: Patch):
    """{placement: [bitmask of the offsets of U_s whose window meets the placed patch, per size]},
    from the definition: place the mask in the padded image, look inside every window."""
    (h, w), pad = image, crop.padding
    out = {}
    for a, b in itertools.product(range(h - patch.shape[0] + 1), range(w - patch.shape[1] + 1)):
        padded = np.zeros((h + 2 * pad, w + 2 * pad), bool)
        padded[pad + a:pad + a + patch.shape[0], pad + b:pad + b + patch.shape[1]] = patch.mask
        masks = []
        for ch, cw in crop.sizes:
            windows = [padded[u:u + ch, v:v + cw].any()
                       for u in range(h + 2 * pad - ch + 1) for v in range(w + 2 * pad - cw + 1)]
            masks.append(sum(1 << i for i, hit in enumerate(windows) if hit))
        out[(a, b)] = masks
    return out


def crop_probability(image, crop: CropSpec, masks) -> Fraction:
    """P[at least one of the K crops meets the union whose per-size hit bitmasks are given]."""
    weights = [Fraction(p) / (rows * cols) for p, (rows, cols) in zip(crop.probabilities, crop.offset_ranges(image))]
    one = sum((wt * m.bit_count() for wt, m in zip(weights, masks)), Fraction(0)) / sum(map(Fraction, crop.probabilities))
    return 1 - (1 - one) ** crop.crops_per_example


def union(hits, placements) -> list[int]:
    """Per crop size, the bitmask of offsets that hit at least one of the placements."""
    return [functools.reduce(operator.or_, masks) for masks in zip(*(hits[t] for t in placements))]


def brute_force(image, crop: CropSpec, patch: Patch):
    """(p*_k, hit sets): the max over all multisets of k placements (so up to k distinct)."""
    hits = hit_sets(image, crop, patch)
    best = max(crop_probability(image, crop, union(hits, ts))
               for ts in itertools.combinations_with_replacement(list(hits), patch.count))
    return best, hits


SETTINGS = [  # tiny on purpose (the brute force visits every k-tuple), not so tiny that p*_k saturates at 1
    ((9, 9), CropSpec(3), Patch.rectangle(2, 2)),
    ((9, 9), CropSpec(2), Patch.disc(4)),
    ((6, 7), CropSpec((4, 3), padding=2), Patch.rectangle(1, 2)),
    ((8, 8), CropSpec(2, crops_per_example=2), Patch.rectangle(2, 1)),
    ((8, 8), CropSpec([(2, 2), (3, 4)], probabilities=[0.3, 0.7], output_size=3), Patch.disc(4)),
    ((9, 8), CropSpec([(2, 2), (3, 3)], probabilities=[0.5, 0.5], output_size=3, padding=1,
                      crops_per_example=2), Patch.blob(3)),
]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("image, crop, patch", SETTINGS)
def test_union_inclusion_equals_brute_force_over_all_k_tuples(image, crop, patch, k):
    truth, hits = brute_force(image, crop, patch.up_to(k))
    result = union_inclusion(image, crop, patch.up_to(k))
    assert result.lower <= truth <= result.upper
    assert result.exact and result.upper == truth  # small grids: the search finishes
    assert 1 <= len(result.placements) <= k
    assert crop_probability(image, crop, union(hits, result.placements)) == result.lower  # achieved
    assert inclusion_probability(image, crop, patch.up_to(k), exact=True) == result.upper
    assert inclusion_probability(image, crop, patch.up_to(k)) >= result.upper  # rounded up


def test_without_the_search_the_bound_is_an_upper_bound_and_says_so():
    """The example of SCIENCE.md §7: 12×12 image, crop 5, 2×2 patch: p*_1 = 36/64 and
    p*_2 = 56/64, below the union bound 1. Greedy alone cannot prove it."""
    image, crop, patch = (12, 12), CropSpec(5), Patch.rectangle(2).up_to(2)
    assert union_inclusion(image, crop, patch.up_to(1)).upper == Fraction(36, 64)
    assert brute_force(image, crop, patch)[0] == Fraction(56, 64)
    searched = union_inclusion(image, crop, patch)
    assert searched.exact and searched.upper == Fraction(56, 64)
    greedy_only = union_inclusion(image, crop, patch, work_limit=0)
    assert not greedy_only.exact
    assert greedy_only.lower <= Fraction(56, 64) < greedy_only.upper <= 1


def test_disjoint_worst_cases_give_k_times_p_star_at_cityscapes_scale():
    """1024×2048, crop 505, 10×10: p* = (514/520)(514/1544) in closed form; three worst
    placements with disjoint hit regions fit side by side, so p*_3 = 3p* exactly; four do
    not, and p*_4 lies between 3p* and 1."""
    image, crop, patch = (1024, 2048), CropSpec(505), Patch.rectangle(10)
    p_star = Fraction(514 * 514, 520 * 1544)
    three = union_inclusion(image, crop, patch.up_to(3))
    assert three.exact and three.upper == 3 * p_star
    four = union_inclusion(image, crop, patch.up_to(4))
    assert 3 * p_star < four.lower <= four.upper <= 1


@pytest.mark.parametrize("image, crop, patch", SETTINGS + [((64, 48), CropSpec(16, padding=3), Patch.cluster(3))])
def test_one_patch_is_unchanged(image, crop, patch):
    result = union_inclusion(image, crop, patch)
    assert result.exact and result.upper == inclusion_probability(image, crop, patch, exact=True)
    assert "count" not in patch.to_dict()  # a single patch serialises as before


def test_count_travels_with_the_mechanism_and_a_changed_count_is_refused():
    fields = dict(sampling=FixedSizeSampling(batch_size=10, dataset_size=100), clip_norm=1.0, noise_multiplier=1.0,
                  delta=1e-3, crop=CropSpec(8), image_shape=(32, 32, 3), patch=Patch.rectangle(3).up_to(4))
    mechanism = DPSGD(**fields)
    assert DPSGD.from_dict(json.loads(json.dumps(mechanism.to_dict()))) == mechanism
    assert mechanism != mechanism.replace(patch=Patch.rectangle(3))
    assert mechanism.replace(patch=Patch.rectangle(3)).differences(mechanism.to_dict()) == ["patch.count 4 → 1"]
    ledger = mechanism.ledger()
    ledger.step(3)
    with pytest.raises(ValueError, match="patch.count 4 → 2"):
        patchdp.Ledger.from_dict(ledger.to_dict(), mechanism.replace(patch=Patch.rectangle(3).up_to(2)))
    single = mechanism.replace(patch=Patch.rectangle(3))
    assert mechanism.inclusion_probability > single.inclusion_probability and mechanism.inclusion_exact
    assert mechanism.epsilon(50) > single.epsilon(50)
    # Gaussian augmentation: k patches change at most k · area pixels
    augmented = mechanism.replace(accounting="gaussian_augmentation", augmentation_noise=100.0)
    assert augmented.relation.patch_sensitivity == pytest.approx((4 * 9 * 3) ** 0.5 * 255, rel=1e-15)


def test_config_patches_and_the_words_of_the_report():
    config = Config(patch="rect:10x10", patches=6, noise_multiplier=1.0)
    assert config.patch_shape == Patch.rectangle(10).up_to(6)
    assert config.patch_shape.describe() == "any 6 patches of 10x10 px in one image"
    assert Patch.disc(5).describe() == "one patch of disc5 (21 px) in one image"
    with pytest.raises(ValueError, match="patches.*>= 1, got 0"):
        Config(patches=0, noise_multiplier=1.0)


def test_the_trainer_plans_k_patches_and_refuses_to_resume_with_another_k(tmp_path):
    from patchdp.run_dir import _resumable_ledger
    from patchdp.trainer import make_plan

    config = Config(patch="rect:3x3", patches=3, crop=8, batch_size=8, noise_multiplier=1.0, steps=5)
    plan = make_plan(config, 64, (16, 16, 3))
    assert plan.mechanism.patch == Patch.rectangle(3).up_to(3)
    ledger = plan.mechanism.ledger()
    ledger.step(2)
    checkpoint = {"step": 2, "ledger": json.loads(json.dumps(ledger.to_dict()))}
    assert _resumable_ledger(checkpoint, plan.mechanism, plan.budget, tmp_path).steps == 2
    other = make_plan(config.replace(patches=1), 64, (16, 16, 3))
    with pytest.raises(ValueError, match="patch.count 3 → 1"):
        _resumable_ledger(checkpoint, other.mechanism, other.budget, tmp_path)


def cli(capsys, *argv):
    from patchdp.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_patches(capsys):
    small = ["--image-size", "12", "--crop", "5", "--patch", "rect:2x2"]
    code, out, err = cli(capsys, "inclusion", *small, "--patches", "2", "--json")
    r = json.loads(out)
    assert code == 0 and err == "" and r["inclusion_probability_exact"] == "7/8"
    assert r["inclusion_probability_is"] == "exact" and r["protected"] == "any 2 patches of 2x2 px in one image"
    code, out, _ = cli(capsys, "privacy", *small, "--patches", "2", "--batch-size", "10", "--dataset-size", "100",
                       "--steps", "20", "--resolution", "1e-3", "--json")
    r = json.loads(out)
    mechanism = DPSGD.from_dict(r["mechanism"])
    assert mechanism.patch.count == 2 and r["inclusion_probability"] == 7 / 8
    assert r["inclusion_probability_is"] == "exact" and r["epsilon_patch"] == mechanism.epsilon(20)
    assert r["epsilon_patch"] > mechanism.replace(patch=Patch.rectangle(2)).epsilon(20)
    code, out, _ = cli(capsys, "privacy", *small, "--patches", "2", "--steps", "20", "--batch-size", "10",
                       "--dataset-size", "100", "--resolution", "1e-3")
    assert "any 2 patches of 2x2 px in one image" in out and "0.875  (exact)" in out
    code, _, err = cli(capsys, "calibrate", *small, "--patches", "0", "--epsilon", "1")
    assert code == 2 and err.count("\n") == 1 and "patch count (patches per image) must be an integer >= 1" in err


def test_the_audit_canary_covers_the_k_worst_placements():
    from patchdp.audit import canary_datasets

    image, crop, patch = (12, 12), CropSpec(5), Patch.rectangle(2).up_to(2)
    _, with_canary, location = canary_datasets(image, crop, patch, dataset_size=3)
    placements = union_inclusion(image, crop, patch).placements
    assert location == placements[0] and len(placements) == 2
    marked = np.zeros(image, bool)
    for a, b in placements:
        marked[a:a + 2, b:b + 2] = True
    assert ((with_canary[0, :, :, 0] > 0) == marked).all() and not with_canary[1:].any()
