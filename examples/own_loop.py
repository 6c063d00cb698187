"""Private training in your own Flax/optax loop with patchdp's pieces: crops, private_grad,
gaussian_noise, a sampling scheme and the ledger. Trains a tiny CNN on synthetic images
(class 1 is brighter) with patch-level DP and prints its ε.  python examples/own_loop.py [--quick]"""
import argparse
import secrets

import flax.linen as nn
import jax
import numpy as np
import optax

import patchdp


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(8, (3, 3))(x)))
        return nn.Dense(2)(x.mean(axis=(1, 2)))


def synthetic(n, size, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.normal(0, 1, (n, size, size, 1)) + 1.0 * labels[:, None, None, None]
    return images.astype(np.float32), labels.astype(np.int32)


def main(quick: bool):
    n, size, epochs, clip_norm, z = (512, 16, 2, 1.0, 2.0) if quick else (4096, 28, 10, 1.0, 2.0)
    images, labels = synthetic(n, size, seed=0)
    crop = patchdp.CropSpec(size * 3 // 8)  # what the model sees AND what p* is computed from
    sampling = patchdp.FixedSizeSampling(batch_size=64, dataset_size=n)  # draws batches AND gives q
    p_star = patchdp.inclusion_probability((size, size), crop, patchdp.Patch.rectangle(3))
    ledger = patchdp.Ledger(sampling=sampling, relation=patchdp.PatchLevel(p_star), delta=0.1 / n,
                            resolution=1e-3 if quick else 1e-4)

    model = CNN()
    params = model.init(jax.random.key(0), images[:1, :crop.output_size[0], :crop.output_size[1]])["params"]
    loss = patchdp.linen_loss(model, optax.softmax_cross_entropy_with_integer_labels)
    grad_fn = patchdp.private_grad(loss, crop=crop, clip_norm=clip_norm)
    optimizer = optax.chain(patchdp.gaussian_noise(z, clip_norm, sampling.expected_batch_size), optax.adam(0.05))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch, key):
        crop_key, noise_key = jax.random.split(key)
        grads, stats = grad_fn(params, batch, crop_key)
        updates, opt_state = optimizer.update(grads, opt_state, params, noise_key=noise_key)
        return optax.apply_updates(params, updates), opt_state, stats

    seed = patchdp.SamplingSeed.from_os()  # secret: which examples each step used
    base_key = jax.random.key(secrets.randbits(63))  # secret: crops and noise
    for t in range(sampling.steps_for_epochs(epochs)):
        chosen = sampling.sample(seed, t)
        batch = patchdp.Batch(images[chosen.indices], labels[chosen.indices], chosen.mask)
        params, opt_state, stats = step(params, opt_state, batch, jax.random.fold_in(base_key, t))
        ledger.step(z)

    test_images, test_labels = synthetic(512, size, seed=1)
    accuracy = np.mean(np.argmax(model.apply({"params": params}, test_images), -1) == test_labels)
    print(f"{ledger.steps} steps, test accuracy {accuracy:.3f}, clipped {float(stats['clipped_fraction']):.2f}")
    print(f"ε = {ledger.epsilon():.3f} at δ = {ledger.delta:.2g}, patch-level (3x3 patch, p* = {p_star:.3f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few steps on a small set (seconds)")
    main(parser.parse_args().quick)
