"""Fixtures shared by the training tests: a tiny U-Net config on 16x16 synthetic scenes,
and one finished run of it (trained once per session; tests copy it before changing it)."""

import pytest

from patchdp.config import Config

TINY = """
model = "unet"
dataset = "synthetic"
crop = 8
padding = 2
patch = "rect:3x3"
batch_size = 8
noise_multiplier = 1.0
delta = 1e-5
steps = 12
optimizer = "adam"
learning_rate = 1e-2
seed = 0
log_every = 1
epsilon_every = 4
checkpoint_every = 4
eval_examples = 8
eval_batch_size = 8
resolution = 1e-3

[model_options]
width = 4
levels = 1

[dataset_options]
num_examples = 32
image_size = 16
"""


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="session")
def finished(tmp_path_factory, tiny):
    """A finished secure run (OS-entropy seeds) of 4 steps at z = 1, checkpoints at steps 2
    and 4: (config, run directory, report). Read it; copy it before changing it."""
    from patchdp.trainer import train  # jax: imported when a test needs the run
    config = Config.from_toml(tiny, {"seed": None, "steps": 4, "checkpoint_every": 2})
    run_dir = tmp_path_factory.mktemp("finished")
    return config, run_dir, train(config, run_dir=run_dir, progress=False)
