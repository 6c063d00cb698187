"""The mechanism object: every public way to make the step, its noise and its accountant
disagree is impossible (frozen, derived) or refused in one line naming the value."""

import dataclasses
import inspect
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import patchdp
from patchdp import accounting
from patchdp.cli import main
from patchdp.mechanism import DPSGD

CROP = patchdp.CropSpec(4, padding=1, crops_per_example=2)
FIELDS = dict(sampling=patchdp.PoissonSampling(rate=0.006, dataset_size=1000), clip_norm=0.7,
              noise_multiplier=1.3, delta=1e-4, crop=CROP, image_shape=(6, 5, 3),
              patch=patchdp.Patch.rectangle(2, 3), resolution=1e-3)
MECHANISM = DPSGD(**FIELDS)
BAD_CLIP_NORMS = [0.0, -1.0, math.nan, math.inf, -math.inf]
BAD_NOISE = [math.nan, math.inf, -1.0]


def pixel_loss(params, image, label):
    """A per-pixel linear classifier (1×1 convolution) on one (h, w, C) crop."""
    logits = image @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()


def problem(batch_size=8):
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(keys[0], (3, 4)), "b": jnp.zeros(4)}
    batch = patchdp.Batch(3 * jax.random.normal(keys[1], (batch_size, 6, 5, 3)),
                          jax.random.randint(keys[2], (batch_size, 6, 5), 0, 4), jnp.arange(batch_size) != 2)
    return params, batch


# ---------------------------------------------------------------- impossible by construction


def test_a_mechanism_cannot_be_changed_after_construction():
    for field in dataclasses.fields(DPSGD):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(MECHANISM, field.name, getattr(MECHANISM, field.name))
    with pytest.raises(TypeError):  # keyword-only: nothing can be passed in the wrong place
        DPSGD(FIELDS["sampling"], 1.0, 1.0, 1e-5)
    with pytest.raises(TypeError):  # the derived relation and p* cannot be given
        DPSGD(relation=accounting.PatchLevel(0.01), **FIELDS)
    changed = MECHANISM.replace(noise_multiplier=2.0)
    assert changed.noise_multiplier == 2.0 and MECHANISM.noise_multiplier == 1.3


def test_the_step_takes_nothing_privacy_related_but_the_mechanism():
    parameters = inspect.signature(patchdp.make_train_step).parameters
    for name in ("clip_norm", "noise_multiplier", "expected_batch_size", "crop", "augment", "clipping", "sampling"):
        assert name not in parameters
    with pytest.raises(TypeError):
        patchdp.make_train_step(pixel_loss, optax.sgd(0.1), MECHANISM, clip_norm=2.0)
    with pytest.raises(TypeError, match="needs the mechanism"):
        patchdp.make_train_step(pixel_loss, optax.sgd(0.1), FIELDS)


def test_the_step_is_the_mechanisms_pieces():
    """The jitted step equals private_grad with the mechanism's crop and C, then its noise
    (z·C once, / E[B] = q·N), then the optimizer, for the same key."""
    params, batch = problem()
    key, optimizer = jax.random.key(3), optax.adam(0.05)
    crop_key, noise_key = jax.random.split(key)
    grads, _ = patchdp.private_grad(pixel_loss, crop=MECHANISM.crop, clip_norm=MECHANISM.clip_norm)(
        params, batch, crop_key)
    noisy, _ = patchdp.gaussian_noise(1.3, 0.7, 6.0).update(grads, optax.EmptyState(), noise_key=noise_key)
    updates, _ = optimizer.update(noisy, optimizer.init(params), params)
    want = optax.apply_updates(params, updates)
    step = patchdp.make_train_step(pixel_loss, optimizer, MECHANISM)
    state, _ = step(patchdp.TrainState.create(jax.tree.map(jnp.copy, params), optimizer), batch, key)
    for got, expected in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_the_noise_is_the_mechanisms():
    noise = MECHANISM.noise()
    zeros = {"w": jnp.zeros((300, 200))}
    sample, _ = noise.update(zeros, noise.init(zeros), noise_key=jax.random.key(1))
    std = MECHANISM.noise_multiplier * MECHANISM.clip_norm / MECHANISM.expected_batch_size  # z·C / (q·N)
    assert stats.kstest(np.ravel(sample["w"]), "norm", args=(0, std)).pvalue > 1e-3
    assert stats.kstest(np.ravel(sample["w"]), "norm", args=(0, 0.8 * std)).pvalue < 1e-6


def test_the_accountant_is_the_mechanisms():
    """Every query equals the low-level accountant at the mechanism's own z, sampling, δ
    and relation, the relation's p* from its own crop, image and patch."""
    m, steps = MECHANISM, 50
    p_star = patchdp.inclusion_probability((6, 5), CROP, FIELDS["patch"])
    settings = dict(sampling=FIELDS["sampling"], relation=patchdp.PatchLevel(p_star), resolution=1e-3)
    assert m.inclusion_probability == p_star and m.effective_sampling_rate == 0.006 * p_star
    assert m.epsilon(steps) == patchdp.epsilon(1.3, steps, 1e-4, **settings)
    np.testing.assert_array_equal(m.privacy_profile(steps, [0.1, 1.0]),
                                  patchdp.privacy_profile(1.3, steps, [0.1, 1.0], **settings))
    assert m.numerical_floor(steps) == patchdp.numerical_floor(1.3, steps, **settings)
    assert m.max_steps(2.0) == patchdp.max_steps(1.3, 2.0, 1e-4, **settings)
    ledger = m.ledger()
    ledger.step(steps)
    assert ledger.epsilon() == m.epsilon(steps)
    image = m.replace(accounting="image")
    assert image.epsilon(steps) == patchdp.epsilon(1.3, steps, 1e-4, sampling=FIELDS["sampling"],
                                                   relation=patchdp.ImageLevel(), resolution=1e-3)


def test_calibration_gives_the_smallest_sufficient_noise():
    fields = {k: v for k, v in FIELDS.items() if k != "noise_multiplier"}
    m = DPSGD.calibrated(target_epsilon=2.0, steps=100, **fields)
    assert m.epsilon(100) <= 2.0 < m.replace(noise_multiplier=m.noise_multiplier * (1 - 2e-3)).epsilon(100)
    with pytest.raises(TypeError, match="do not pass one"):
        DPSGD.calibrated(target_epsilon=2.0, steps=100, **FIELDS)


# ---------------------------------------------------------------- the ledger: its mechanism's steps only


def test_a_ledger_records_only_its_mechanisms_steps():
    ledger = MECHANISM.ledger()
    with pytest.raises(TypeError):
        ledger.step(noise_multiplier=2.0)  # a step carries no z of its own
    with pytest.raises(ValueError, match="count must be an integer >= 1, got 2.0"):
        ledger.step(2.0)  # a z passed where the count goes is refused, not taken for a count
    ledger.step(10)
    ledger.change_noise(2.6)  # explicit: later steps at z = 2.6
    ledger.step(5)
    assert ledger.runs == ((1.3, 10), (2.6, 5)) and ledger.mechanism == MECHANISM.replace(noise_multiplier=2.6)
    state = json.loads(json.dumps(ledger.to_dict()))
    assert accounting.Ledger.from_dict(state, MECHANISM).epsilon() == ledger.epsilon()
    for other, named in [(dict(clip_norm=0.8), "clip_norm 0.7 → 0.8"),
                         (dict(crop=patchdp.CropSpec(3)), "crop.sizes [[4, 4]] → [[3, 3]]"),
                         (dict(sampling=patchdp.PoissonSampling(rate=0.007, dataset_size=1000)),
                          "sampling.rate 0.006 → 0.007"),
                         (dict(accounting="image"), "accounting 'patch' → 'image'"),
                         (dict(delta=1e-5), "delta 0.0001 → 1e-05")]:
        with pytest.raises(ValueError, match="another mechanism") as error:
            accounting.Ledger.from_dict(state, MECHANISM.replace(**other))
        assert named in str(error.value) and "\n" not in str(error.value)


def test_no_noise_is_no_privacy():
    m = MECHANISM.replace(noise_multiplier=0.0)
    ledger = m.ledger(budget_epsilon=100.0)
    assert m.epsilon(1) == math.inf and not ledger.can_step()
    ledger.step()
    assert ledger.epsilon() == math.inf


# ---------------------------------------------------------------- bad values: one line everywhere


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("value", BAD_CLIP_NORMS)
def test_a_bad_clip_norm_is_refused_everywhere(value):
    for make in (lambda: MECHANISM.replace(clip_norm=value),
                 lambda: patchdp.gaussian_noise(1.0, value, 10),
                 lambda: patchdp.private_grad(pixel_loss, crop=CROP, clip_norm=value)):
        with pytest.raises(ValueError) as error:
            make()
        assert f"clip_norm C must be a finite number in (0, inf), got {value!r}" in one_line(error)


@pytest.mark.parametrize("value", BAD_NOISE)
def test_a_bad_noise_multiplier_is_refused_everywhere(value):
    ledger = MECHANISM.ledger()
    for make in (lambda: MECHANISM.replace(noise_multiplier=value),
                 lambda: patchdp.gaussian_noise(value, 1.0, 10),
                 lambda: ledger.change_noise(value),
                 lambda: patchdp.epsilon(value, 10, 1e-5, sampling=FIELDS["sampling"], relation=patchdp.ImageLevel())):
        with pytest.raises(ValueError) as error:
            make()
        assert f"noise_multiplier z (noise std / clip norm) must be a finite number in [0, inf), got {value!r}" \
            in one_line(error)


@pytest.mark.parametrize("argv, named", [
    (["privacy", "--noise", "nan"], "got nan"), (["privacy", "--noise", "-1"], "got -1.0"),
    (["calibrate", "--epsilon", "1", "--delta", "inf"], "delta must be a finite number in (0, 1), got inf"),
    (["train", "--config", "demo", "--clip-norm", "nan"], "clip_norm must be a finite number in (0, inf), got nan"),
    (["train", "--config", "demo", "--clip-norm", "0"], "clip_norm must be a finite number in (0, inf), got 0"),
    (["train", "--config", "demo", "--noise-multiplier", "inf"], "noise_multiplier must be a finite number"),
])
def test_the_cli_refuses_bad_values_in_one_line(argv, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err


@pytest.mark.parametrize("fields, message", [
    (dict(delta=0.0), "delta must be a finite number in (0, 1), got 0.0"),
    (dict(accounting="patch", patch=None), "accounting 'patch' needs patch"),
    (dict(accounting="image_level"), "accounting must be one of"),
    (dict(sampling=patchdp.FixedSizeSampling(batch_size=4, dataset_size=8), accounting="add_remove"),
     "Poisson sampling only"),
    (dict(sampling=patchdp.PoissonSampling(rate=0.1)), "sampling must be"),
    (dict(crop=patchdp.CropSpec(8)), "crop 8x8 is larger than the padded image"),
    (dict(clipping="fast"), "clipping must be one of"),
    (dict(accounting="gaussian_augmentation"), "needs augmentation_noise"),
    (dict(augmentation_noise=-1.0), "augmentation_noise"),
])
def test_the_mechanism_refuses_inconsistent_settings_in_one_line(fields, message):
    with pytest.raises((ValueError, TypeError)) as error:
        MECHANISM.replace(**fields)
    assert message in one_line(error)


# ---------------------------------------------------------------- serialisation and small mends


@pytest.mark.parametrize("fields", [
    {},
    dict(sampling=patchdp.FixedSizeSampling(batch_size=4, dataset_size=100), patch=patchdp.Patch.disc(3),
         crop=patchdp.CropSpec([(3, 3), (4, 4)], probabilities=[0.25, 0.75], output_size=3)),
    dict(accounting="gaussian_augmentation", augmentation_noise=40.0, clipping="ghost"),
    dict(crop=None, image_shape=None, patch=None, accounting="add_remove"),
])
def test_the_mechanism_round_trips_through_strict_json(fields):
    m = MECHANISM.replace(**fields)
    state = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    back = DPSGD.from_dict(state)
    assert back == m and back.relation == m.relation and back.differences(state) == []
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        DPSGD.from_dict({**state, "extra": 1})


def test_batch_shapes_that_do_not_fit_are_named():
    params, batch = problem()
    grad_fn = patchdp.private_grad(pixel_loss, crop=CROP, clip_norm=1.0)
    for bad in (batch._replace(mask=batch.mask[:5]), batch._replace(label=batch.label[:7])):
        with pytest.raises(ValueError, match=r"Batch shapes do not fit together: image \(8, 6, 5, 3\)") as error:
            grad_fn(params, bad, jax.random.key(0))
        assert "\n" not in str(error.value)


def test_small_mends():
    assert patchdp.Patch.rectangle((3, 5)) == patchdp.Patch.rectangle(3, 5) and patchdp.Patch.rectangle((3, 5)).shape == (3, 5)
    with pytest.raises(ValueError, match="step .* got -1"):
        FIELDS["sampling"].sample(patchdp.SamplingSeed.fixed(0), step=-1)
