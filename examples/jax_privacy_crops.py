"""jax-privacy's per-example clipping with patchdp's crops, noise and accountant.

``jax_privacy.clipped_grad`` computes the sum of per-example clipped gradients; the loss it
differentiates cuts the example's K random crops with ``patchdp.crop`` (which accepts
the (1, H, W, C) example that ``keep_batch_dim=True`` passes). The crop key is a
``prng_argnum`` argument, which jax-privacy splits into one key per example. The sum's
sensitivity under substitution is 2C (jax-privacy's "replace-one"), the one patchdp's
accountant assumes; ``patchdp.gaussian_noise`` adds N(0, (z·C)²) once per step and the
ledger composes the steps with w = q·p*.

Needs jax-privacy (``pip install jax-privacy``); without it this prints why and exits 0.
    python examples/jax_privacy_crops.py [--quick]
"""
import argparse
import secrets
import sys

import jax
import numpy as np
import optax
from own_loop import CNN, synthetic  # the same tiny CNN and synthetic data as examples/own_loop.py

import patchdp


def main(quick: bool) -> int:
    try:
        import jax_privacy
    except ImportError:
        print("jax_privacy is not installed (pip install jax-privacy): skipping this example.")
        return 0
    n, size, epochs = (512, 16, 2) if quick else (4096, 28, 10)
    images, labels = synthetic(n, size, seed=0)
    mechanism = patchdp.DPSGD(
        sampling=patchdp.FixedSizeSampling(batch_size=64, dataset_size=n),
        crop=patchdp.CropSpec(size * 3 // 8, crops_per_example=2), image_shape=(size, size),
        patch=patchdp.Patch.rectangle(3), clip_norm=1.0, noise_multiplier=2.0, delta=0.1 / n,
        resolution=1e-3 if quick else 1e-4)
    crop, ledger = mechanism.crop, mechanism.ledger()
    model = CNN()
    params = model.init(jax.random.key(0), images[:1, :crop.output_size[0], :crop.output_size[1]])["params"]

    def loss(params, image, label, key):  # image (1, H, W, C), label (1,): one example
        crops, crop_labels = patchdp.crop(crop, key, image, label)  # (K, h, w, C), (K,)
        logits = model.apply({"params": params}, crops)
        return optax.softmax_cross_entropy_with_integer_labels(logits, crop_labels).mean()

    grad_sum = jax_privacy.clipped_grad(loss, l2_clip_norm=mechanism.clip_norm, batch_argnums=(1, 2), prng_argnum=3)
    optimizer = optax.chain(mechanism.noise(), optax.adam(0.05))  # + N(0, (z·C)²), / B: the mechanism's
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, image, label, key):
        crop_key, noise_key = jax.random.split(key)
        grads = grad_sum(params, image, label, crop_key)
        updates, opt_state = optimizer.update(grads, opt_state, params, noise_key=noise_key)
        return optax.apply_updates(params, updates), opt_state

    seed, base_key = patchdp.SamplingSeed.from_os(), jax.random.key(secrets.randbits(63))
    for t in range(mechanism.sampling.steps_for_epochs(epochs)):
        chosen = mechanism.sampling.sample(seed, t).indices  # fixed-size batches: no padded slots
        params, opt_state = step(params, opt_state, images[chosen], labels[chosen], jax.random.fold_in(base_key, t))
        ledger.step()

    test_images, test_labels = synthetic(512, size, seed=1)
    accuracy = np.mean(np.argmax(model.apply({"params": params}, test_images), -1) == test_labels)
    print(f"jax-privacy {jax_privacy.__version__} clipping: {ledger.steps} steps, test accuracy {accuracy:.3f}")
    print(f"ε = {ledger.epsilon():.3f} at δ = {ledger.delta:.2g}, patch-level (3x3 patch, p* = {mechanism.inclusion_probability:.3f})")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps on a small set (seconds)")
    sys.exit(main(parser.parse_args().quick))
