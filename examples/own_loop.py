"""Private training in your own Flax/optax loop: one mechanism object (patchdp.DPSGD)
gives the jitted step and the ledger, so they cannot disagree. Trains a tiny CNN on synthetic images
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
    n, size, epochs = (512, 16, 2) if quick else (4096, 28, 10)
    images, labels = synthetic(n, size, seed=0)
    mechanism = patchdp.DPSGD(  # everything the guarantee rests on, validated once; the step and ledger derive from it
        sampling=patchdp.FixedSizeSampling(batch_size=64, dataset_size=n),  # draws batches AND gives q
        crop=patchdp.CropSpec(size * 3 // 8), image_shape=(size, size), patch=patchdp.Patch.rectangle(3),
        clip_norm=1.0, noise_multiplier=2.0, delta=0.1 / n, resolution=1e-3 if quick else 1e-4)

    model, (h, w) = CNN(), mechanism.crop.output_size
    params = model.init(jax.random.key(0), images[:1, :h, :w])["params"]
    loss = patchdp.linen_loss(model, optax.softmax_cross_entropy_with_integer_labels)
    optimizer = optax.adam(0.05)
    step = patchdp.make_train_step(loss, optimizer, mechanism)  # crops, clipping to C, noise z·C: the mechanism's
    state, ledger = patchdp.TrainState.create(params, optimizer), mechanism.ledger()

    seed = patchdp.SamplingSeed.from_os()  # secret: which examples each step used
    base_key = jax.random.key(secrets.randbits(63))  # secret: crops and noise
    for t in range(mechanism.sampling.steps_for_epochs(epochs)):
        chosen = mechanism.sampling.sample(seed, t)
        batch = patchdp.Batch(images[chosen.indices], labels[chosen.indices], chosen.mask)
        state, stats = step(state, batch, jax.random.fold_in(base_key, t))
        ledger.step()  # one step of the ledger's mechanism: no z to get wrong

    test_images, test_labels = synthetic(512, size, seed=1)
    accuracy = np.mean(np.argmax(model.apply({"params": state.params}, test_images), -1) == test_labels)
    print(f"{ledger.steps} steps, test accuracy {accuracy:.3f}, clipped {float(stats['clipped_fraction']):.2f}")
    print(f"ε = {ledger.epsilon():.3f} at δ = {ledger.delta:.2g}, patch-level "
          f"(3x3 patch, p* = {mechanism.inclusion_probability:.3f}); mechanism.epsilon(T) = "
          f"{mechanism.epsilon(ledger.steps):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few steps on a small set (seconds)")
    main(parser.parse_args().quick)
