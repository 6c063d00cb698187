"""One DP-SGD step (crops, clipping, noise) of a tiny CNN, in one process of a multi-process run or alone.

Launched by tests/test_multiprocess.py; it follows the "Multi-host" recipe of
patchdp/training.py's docstring and the README, and is its executable example:

    # every process (here 2 on one machine, 2 CPU devices each):
    PYTHONPATH=. JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
      python tests/multiprocess_worker.py OUT.npz --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I

    # the same step in one process, on one device, for comparison:
    PYTHONPATH=. JAX_PLATFORMS=cpu python tests/multiprocess_worker.py OUT.npz

It writes the parameters after one step, the metrics, and which examples this
process loaded, to OUT.npz.
"""

import argparse

import flax.linen as nn
import jax
import numpy as np

BATCH_SIZE, IMAGE_SIZE, CLASSES = 8, 16, 3
PADDED_SLOT = 5  # mask[5] = False: a padded slot of a Poisson batch
CLIP_NORM, NOISE_MULTIPLIER, LEARNING_RATE = 2.0, 1.0, 0.1  # C = 2 clips 3 of the 7 examples
INIT_SEED, STEP_SEED = 0, 1  # the same in every process


class TinyCNN(nn.Module):
    """(N, H, W, 3) images → (N, CLASSES) logits: two 3×3 convolutions (4 channels, the
    second with stride 2), global average pooling, a dense layer; 275 parameters."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
        return nn.Dense(CLASSES)(x.mean(axis=(1, 2)))


def load_examples(rows):
    """The "dataset": example i is drawn from its own generator, so a process can load
    only its own rows. Returns (images (n, 16, 16, 3) float32, labels (n,) int32, mask (n,))."""
    images = np.stack([np.random.default_rng(i).normal(size=(IMAGE_SIZE, IMAGE_SIZE, 3)) for i in rows])
    labels = np.array([i % CLASSES for i in rows], np.int32)
    return images.astype(np.float32), labels, np.asarray(rows) != PADDED_SLOT


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the .npz file to write")
    parser.add_argument("--coordinator", help="host:port of process 0; omit for one process on one device")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args()

    if args.coordinator:  # before any other JAX call
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives (jax 0.10's default)
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   initialization_timeout=60, heartbeat_timeout_seconds=30,
                                   shutdown_timeout_seconds=30)
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    import patchdp
    from patchdp.training import linen_loss, replicate

    model = TinyCNN()
    loss = linen_loss(model, optax.softmax_cross_entropy_with_integer_labels)
    optimizer = optax.sgd(LEARNING_RATE)
    crop = patchdp.CropSpec(12, padding=2, crops_per_example=2)
    params = jax.jit(model.init)(jax.random.key(INIT_SEED), np.zeros((1, 12, 12, 3), np.float32))["params"]
    state = patchdp.TrainState.create(params, optimizer)

    if args.coordinator:
        mesh = jax.make_mesh((jax.device_count(),), ("data",))  # all processes' devices
        examples = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        # The rows this process's devices hold (here 4·process_id … 4·process_id + 3).
        rows = sorted({i for index in examples.addressable_devices_indices_map((BATCH_SIZE,)).values()
                       for i in range(BATCH_SIZE)[index[0]]})
        local = patchdp.Batch(*load_examples(rows))
        batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(examples, x), local)
        state = replicate(state, mesh)
    else:
        mesh, rows = None, list(range(BATCH_SIZE))
        batch = patchdp.Batch(*load_examples(rows))

    mechanism = patchdp.DPSGD(sampling=patchdp.FixedSizeSampling(batch_size=BATCH_SIZE, dataset_size=BATCH_SIZE),
                              clip_norm=CLIP_NORM, noise_multiplier=NOISE_MULTIPLIER, delta=1e-5, crop=crop,
                              accounting="image")
    step = patchdp.make_train_step(loss, optimizer, mechanism, flip=True, mesh=mesh)
    state, metrics = step(state, batch, jax.random.key(STEP_SEED))
    # Replicated outputs: every process holds the whole result.
    params = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    np.savez(args.out, rows=np.array(rows), devices=jax.device_count(), processes=jax.process_count(),
             **{f"param:{k}": v for k, v in params.items()},
             **{f"metric:{k}": np.asarray(v) for k, v in metrics.items()})


if __name__ == "__main__":
    main()
